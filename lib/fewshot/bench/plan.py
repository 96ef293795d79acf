"""What the benchmark times, at which sizes and k, and on which data (real scans or synthetic ones)."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np


logger = logging.getLogger(__name__)


SHARED_DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))


DEFAULT_DATASET = "chaos-t2"  # abdominal MRI: 4 labels, ~35 slices, the literature's Abd-MRI benchmark


RECALL_K = 16


# Engine.segment stage timers, in pipeline order, with the names the report and plots use.
STAGES = {
    "prepare_and_embed": "prepare + embed (canvas, DINOv2)",
    "retrieve": "retrieve (faiss)",
    "match": "match (LPIPS)",
    "encode": "query encode (SAM 2 image encoder)",
    "attention_decode": "memory attention + decode",
    "memory_encode": "memory encode (neighbours)",
    "postprocess": "post-processing",
    "other": "other (planning, bookkeeping)",
}


# The classic preset's path. Registration and fusion run in worker processes, so their own timers sum
# busy time over workers (kept apart, under busy_s); the wall-time partition names what is in-process.
CLASSIC_STAGES = {
    "prepare_and_embed": "prepare + embed (canvas, descriptor)",
    "retrieve": "retrieve (faiss)",
    "match": "match (NCC)",
    "register_fuse_wall": "register + fuse (wall, worker pool)",
    "consistency": "3D consistency",
    "postprocess": "post-processing",
}


CLASSIC_BUSY = ("register", "fuse")


def stages_for(settings: Mapping) -> dict[str, str]:
    return STAGES if settings.get("transfer", {}).get("type") == "sam2" else CLASSIC_STAGES


@dataclass(frozen=True)
class BenchPlan:
    """How much to measure: full mode times the real networks, quick mode keeps CI under a minute."""

    preset: str
    sizes: tuple[int, ...]  # SAM 2 image sizes; the first is the preset's own (whole-volume runs)
    ks: tuple[int, ...] = (1, 4, 16)
    memory_query_slices: int = 2  # query slices timed per (size, k) in the memories comparison
    subvolume_slices: int = 4  # slices segmented per (size, k) for the stage and whole-path figures
    # Slices of the support / query volumes used for the whole-volume runs; None = the whole volume.
    support_slices: int | None = None
    query_slices: int | None = None
    retrieval_sizes: tuple[int, ...] = (1_000, 10_000, 100_000, 1_000_000)
    retrieval_queries: int = 1000  # recall@16 per query is noisy: 1000 give a 95 % CI of about +-0.005 at 0.95
    per_slice_budget_s: float = 1.5  # the CPU target for k=16 at 512, used for the recommendation
    # Bank sizes for the RSS and latency of engine.segment at scale (copies of the bench's bank); () skips it.
    scale_entries: tuple[int, ...] = (100_000,)


def quick_plan(preset: str = "random-tiny", preset_size: int | None = None) -> BenchPlan:
    size = preset_size or 128
    return BenchPlan(
        preset=preset, sizes=(size, max(32, size // 2 // 32 * 32)), memory_query_slices=1,
        subvolume_slices=3, support_slices=8, query_slices=6, retrieval_sizes=(1_000, 10_000),
        retrieval_queries=50, scale_entries=(1_000,),
    )


def full_plan(preset: str, preset_size: int) -> BenchPlan:
    # The preset's own size first: the whole-volume runs and the peak RSS happen there, in a clean process.
    sizes = (preset_size,) + tuple(s for s in (1024, 512) if s != preset_size)
    return BenchPlan(preset=preset, sizes=sizes)


def choose_preset(models_dir: str | os.PathLike | None) -> str:
    """``foundation`` when its pretrained weights are present and verify, else ``foundation-random``."""
    from fewshot import weights
    from fewshot.config import load_preset

    names = weights.preset_models(load_preset("foundation"))
    results = weights.verify(names, models_dir)
    missing = [r.name for r in results if not r.ok]
    if missing:
        logger.info("pretrained weights absent (%s): timing the same architectures with random weights", ", ".join(missing))
        return "foundation-random"
    return "foundation"


@dataclass
class BenchData:
    source: str  # dataset folder name, or "synthetic"
    support_image: Path  # labelled volume ingested into the bank
    support_label: Path
    query_image: Path  # volume segmented
    query_label: Path  # used only to centre the sub-volumes on the organs, never by the engine
    # A third labelled case: one of its slices is saved as a partial label (a correction on one
    # slice) to change the bank between two inferences. None: no third case.
    new_image: Path | None = None
    new_label: Path | None = None


def _case_pairs(directory: Path) -> list[tuple[Path, Path]]:
    def number(p: Path) -> tuple:
        m = re.search(r"(\d+)", p.name)
        return (int(m.group(1)) if m else 0, p.name)

    pairs = []
    for image in sorted(directory.glob("image_*.nii*"), key=number):
        label = directory / image.name.replace("image_", "label_", 1)
        if label.is_file():
            pairs.append((image, label))
    return pairs


def find_data(data: str | os.PathLike | None, work: Path, synthetic: bool = False) -> BenchData:
    """The first two labelled cases of ``data`` (default ../shared/data/chaos-t2), else synthetic ones."""
    if not synthetic:
        directory = Path(data) if data else SHARED_DATA / DEFAULT_DATASET
        pairs = _case_pairs(directory) if directory.is_dir() else []
        if len(pairs) >= 2:
            (si, sl), (qi, ql) = pairs[:2]
            extra = pairs[2] if len(pairs) > 2 else (None, None)
            return BenchData(directory.name, si, sl, qi, ql, *extra)
        if data:
            raise FileNotFoundError(f"{directory}: needs at least two image_N/label_N pairs")
        logger.warning("%s is absent: timing synthetic volumes instead", directory)
    folder = work / "synthetic"
    support = write_synthetic_case(folder, "1", seed=1)
    query = write_synthetic_case(folder, "2", seed=2)
    extra = write_synthetic_case(folder, "3", seed=3)
    return BenchData("synthetic", *support, *query, *extra)


def write_synthetic_case(folder: Path, name: str, seed: int, shape=(192, 192, 24),
                         spacing=(1.5, 1.5, 6.0)) -> tuple[Path, Path]:
    """An abdomen-like MR volume: a body ellipse with two organs (labels 1, 2) whose size varies along z."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    cx, cy = shape[0] / 2 + rng.uniform(-6, 6), shape[1] / 2 + rng.uniform(-6, 6)
    organs = [(1, 0.35, -0.15, 0.18, 700.0), (2, -0.3, 0.2, 0.1, 1100.0)]  # label, dx, dy, radius, intensity
    for z in range(shape[2]):
        t = z / max(1, shape[2] - 1)
        body = ((x - cx) / (0.45 * shape[0])) ** 2 + ((y - cy) / (0.35 * shape[1])) ** 2 <= 1
        image[..., z][body] = 300.0
        for value, dx, dy, radius, intensity in organs:
            r = radius * shape[0] * np.sin(np.pi * min(1.0, max(0.0, 1.3 * t - 0.15))) * rng.uniform(0.9, 1.1)
            if r < 2:
                continue
            inside = (x - cx - dx * shape[0]) ** 2 + (y - cy - dy * shape[1]) ** 2 <= r**2
            image[..., z][inside] = intensity
            label[..., z][inside] = value
    image += rng.normal(0, 40, shape).astype(np.float32)
    affine = np.diag(list(spacing) + [1.0])
    paths = folder / f"image_{name}.nii.gz", folder / f"label_{name}.nii.gz"
    nib.save(nib.Nifti1Image(np.clip(image, 0, None), affine), paths[0])
    nib.save(nib.Nifti1Image(label, affine), paths[1])
    return paths


def write_subvolume(image: Path, label: Path, count: int, folder: Path, tag: str) -> tuple[Path, Path]:
    """``count`` consecutive slices around the middle of the labelled extent, along the coarsest axis."""
    import nibabel as nib

    img, lab = nib.load(str(image)), nib.load(str(label))
    axis = int(np.argmax(img.header.get_zooms()[:3]))
    data = np.asarray(lab.dataobj)
    along = np.where(np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1).any(axis=1))[0]
    centre = int(round(along.mean())) if along.size else data.shape[axis] // 2
    start = int(np.clip(centre - count // 2, 0, max(0, data.shape[axis] - count)))
    index = tuple(slice(start, start + count) if a == axis else slice(None) for a in range(3))
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"image_{tag}.nii.gz", folder / f"label_{tag}.nii.gz"
    nib.save(img.slicer[index], out[0])  # slicer keeps header and moves the affine's origin
    nib.save(lab.slicer[index], out[1])
    return out


def one_labelled_slice(label: Path) -> tuple[int, int]:
    """(slice, voxel axis) of the labelled slice nearest the middle of the labelled extent, along the
    coarsest axis: the slice a person correcting one slice would save."""
    import nibabel as nib

    lab = nib.load(str(label))
    axis = int(np.argmax(lab.header.get_zooms()[:3]))
    data = np.asarray(lab.dataobj)
    along = np.where(np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1).any(axis=1))[0]
    if not along.size:
        raise ValueError(f"{label}: no labelled slice")
    return int(along[np.argmin(np.abs(along - along.mean()))]), axis
