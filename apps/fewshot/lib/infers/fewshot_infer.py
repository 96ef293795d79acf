"""The ``fewshot`` infer task: the engine's segmentation behind MONAI Label's infer API.

Its name holds for every preset (``classic`` runs no SAM 2); ``fewshot_sam2``, its name before,
stays an alias that /infer and /batch/infer accept, for clients written against it.

The task holds no segmentation logic: it turns a request into engine options, calls
``EngineHost.segment`` and packs the label file plus a JSON of labels, skipped labels (with the
reason), per-label provenance (the support slices used for every query slice) and latencies.

The label file has the image's exact voxel grid and geometry, as NIfTI (default) or as NRRD when
the client asks (``result_extension: .nrrd``, as OHIF's panel does, with ``result_dtype`` and
``result_compress``). Its ``label_names`` follow what 3D Slicer's plugin expects (``lib.labels``).
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Dict

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib import ohif_label
from lib.engine_host import EngineHost, InferOptions
from lib.labels import BACKGROUND, result_label_names, with_background
from lib.ohif_label import ViewerGrid
from lib.progress import PROGRESS_KEY, ProgressBoard
from lib.reviews import IMAGE_KEY, Reviews

logger = logging.getLogger(__name__)

TASK = "fewshot"
ALIASES = ("fewshot_sam2",)  # older names of the same task: accepted, not listed in /info's models

TOP_K_RANGE = (1, 512)
MEMORIES_RANGE = (1, 32)
# Engine timing keys that are pre-processing / post-processing in MONAI Label's latency terms.
PRE_STAGES = ("prepare_and_embed",)
POST_STAGES = ("postprocess",)
NOT_SECONDS = ("total", "slices", "reused")
RECENT_INFERENCES = 20  # kept for /info's seconds per volume
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32")


@dataclass(frozen=True)
class ResultFormat:
    extension: str = ".nii.gz"
    dtype: str | None = None  # None: the smallest unsigned type that holds the values
    compress: bool = False  # NRRD only (NIfTI .nii.gz is always gzipped)
    grid: ViewerGrid | None = None  # OHIF's volume (params.ohif_grid): the result is written on it


def write_nrrd(path: str, label: np.ndarray, affine: np.ndarray, dtype, compress: bool) -> None:
    """A labelmap NRRD on the image's voxel grid: MONAI's RAS affine written as NRRD's LPS space."""
    import nrrd

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    header = {
        "dimension": 3,
        "space": "left-posterior-superior",
        "space directions": lps[:3, :3].T,  # one row per array axis
        "space origin": lps[:3, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip" if compress else "raw",
        "endian": "little",
    }
    nrrd.write(path, np.ascontiguousarray(label).astype(dtype), header, index_order="F")


def _latencies(pre: float, infer: float, post: float, write: float, total: float) -> dict:
    parts = {"pre": round(pre, 3), "infer": round(infer, 3), "invert": 0.0, "post": round(post, 3), "write": round(write, 3)}
    total = round(max(total, sum(parts.values())), 3)
    return dict(parts, other=round(total - sum(parts.values()), 3), total=total, transform=None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise HTTPException(400, f"{name} must be true or false, not {value!r}")


def _as_int(value: Any, name: str, bounds: tuple[int, int]) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise HTTPException(400, f"{name} must be an integer, not {value!r}") from None
    if not bounds[0] <= number <= bounds[1]:
        raise HTTPException(400, f"{name} must lie in {bounds[0]}..{bounds[1]}, not {number}")
    return number


class FewshotInfer(InferTask):
    def __init__(self, host: EngineHost, bank_status: Callable[[], dict], progress: ProgressBoard | None = None,
                 reviews: Reviews | None = None):
        self.host = host
        self.progress = progress or ProgressBoard()
        self.reviews = reviews  # None in a background task's copy of the app: the live server keeps predictions
        self.bank_status = bank_status
        # Seconds per volume of the recent inferences, for /info: how long the next one will take.
        self._recent: deque[dict] = deque(maxlen=RECENT_INFERENCES)
        self._recent_lock = threading.Lock()
        super().__init__(
            type=InferType.SEGMENTATION,
            labels=None,
            dimension=3,
            description=host.describe(),
        )

    # ------------------------------------------------------------------ /info

    def config(self) -> Dict[str, Any]:
        d = self.host.defaults
        # A list is shown as a drop-down by the clients; the device is fixed at start-up (-c device).
        return {"top_k": d.top_k, "matching": d.matching, "memories": d.memories, "device": [self.host.device]}

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["labels"] = with_background(self.host.label_map())
        info["support_bank"] = self.bank_status()
        info["preset"] = self.host.config.preset
        info["transfer"] = self.host.transfer_summary()
        info["seconds_per_volume"] = self.recent_seconds()
        if self.reviews is not None:
            info["reviews"] = self.reviews.summary()
        return info

    def recent_seconds(self) -> dict:
        """Seconds per volume over the last inferences that computed a result (reused ones take ~0 s)."""
        with self._recent_lock:
            recent = [r for r in self._recent if not r["reused"]]
        if not recent:
            return {"count": 0, "median": None, "last": None, "last_slices": None, "last_stages": {}}
        return {"count": len(recent), "median": round(float(np.median([r["seconds"] for r in recent])), 2),
                "last": recent[-1]["seconds"], "last_slices": recent[-1]["slices"], "last_stages": recent[-1]["stages"]}

    def is_valid(self) -> bool:
        return True

    # ------------------------------------------------------------------ inference

    def options(self, request: Dict[str, Any]) -> tuple[InferOptions, list[str]]:
        notes = []
        options = self.host.defaults
        if request.get("top_k") is not None:
            options = replace(options, top_k=_as_int(request["top_k"], "top_k", TOP_K_RANGE))
        if request.get("memories") is not None:
            options = replace(options, memories=_as_int(request["memories"], "memories", MEMORIES_RANGE))
        if request.get("matching") is not None:
            matching = _as_bool(request["matching"], "matching")
            if matching and self.host.engine.matcher is None:
                notes.append(f"matching is not available in preset {self.host.config.preset!r}; ran without it")
                matching = False
            options = replace(options, matching=matching)
        device = request.get("device")
        if isinstance(device, list):
            device = device[0] if device else None
        if device and str(device) != self.host.device:
            notes.append(f"device is fixed at start-up (-c device); ran on {self.host.device}, not {device}")
        return options, notes

    @staticmethod
    def requested_labels(request: Dict[str, Any]) -> list[str] | None:
        """``labels``: names or values as a list, a comma-separated string, or /info's name -> value
        object (clients echo it); anything else is a 400 before any work."""
        labels = request.get("labels")
        if labels is None or labels == "" or labels == [] or labels == {}:
            return None
        if isinstance(labels, str):
            names = [s.strip() for s in labels.split(",") if s.strip()]
        elif isinstance(labels, dict):
            names = [str(k) for k in labels]
        elif isinstance(labels, list) and all(isinstance(v, str) or (type(v) is int and v >= 0) for v in labels):
            names = [str(v) for v in labels]
        else:
            raise HTTPException(400, f"labels must be a list of label names or values, a comma-separated string or "
                                     f"/info's name -> value object, not {type(labels).__name__} {_short(labels)}")
        # Clients echo the /info labels, background included; it is not a structure to segment.
        return [n for n in names if n != BACKGROUND] or None

    def result_format(self, request: Dict[str, Any]) -> ResultFormat:
        """Checked before any work: a request for a format we cannot write fails at once."""
        # Absent, null or "": the default. Anything else must be one of the names ([] is not "none").
        ext = request.get("result_extension")
        ext = ".nii.gz" if ext is None or ext == "" else ext
        if not isinstance(ext, str) or ext.lower() not in RESULT_EXTENSIONS:
            raise HTTPException(400, f"result_extension {_short(ext)} is not supported; use one of {', '.join(RESULT_EXTENSIONS)}")
        dtype = request.get("result_dtype")
        dtype = None if dtype is None or dtype == "" else dtype
        if dtype is not None:
            if not isinstance(dtype, str) or dtype not in RESULT_DTYPES:
                raise HTTPException(400, f"result_dtype {_short(dtype)} is not supported; use one of {', '.join(RESULT_DTYPES)}")
            top = max(self.host.label_map().values(), default=0)
            if top > np.iinfo(np.dtype(str(dtype))).max:
                raise HTTPException(400, f"result_dtype {dtype} cannot hold label value {top}")
        compress = _as_bool(request.get("result_compress", False), "result_compress")
        grid = request.get(ohif_label.GRID_KEY)
        # OHIF lays the answer's voxels on its own volume as they come: a folder datastore's image may
        # be stored in another axis order, so the panel says where its volume lies (lib/ohif_label.py).
        grid = None if grid is None else ViewerGrid.parse(grid, str(request.get("image") or "the image"))
        return ResultFormat(ext.lower(), None if dtype is None else str(dtype), compress, grid)

    def write(self, seg, fmt: ResultFormat) -> str:
        fd, out = tempfile.mkstemp(suffix=fmt.extension, prefix="fewshot-")
        os.close(fd)
        try:
            if fmt.extension == ".nrrd":
                label, affine = seg.label, seg.volume.affine
                if fmt.grid is not None:
                    label = ohif_label.turn_onto(label, affine, fmt.grid.affine(), fmt.grid.dimensions, "the image")
                    affine = fmt.grid.affine()
                dtype = fmt.dtype or (np.uint8 if label.max(initial=0) < 256 else np.uint16)
                write_nrrd(out, label, affine, dtype, fmt.compress)
            else:
                seg.save(out, sidecar=False)  # the engine's writer keeps a NIfTI image's header exactly
        except BaseException:
            os.unlink(out)  # MONAI Label removes the result file only once it has it
            raise
        return out

    def __call__(self, request: Dict[str, Any]):
        start = time.perf_counter()
        options, notes = self.options(request)
        fmt = self.result_format(request)
        tracker = self.progress.by_token(request.get(PROGRESS_KEY))
        try:
            seg = self.host.segment(request["image"], self.requested_labels(request), options, progress=tracker)
        except ValueError as exc:  # unknown label names, unreadable image (VolumeError)
            # First line only: readers append tracebacks and installation advice. The route replaces
            # the server's paths with what the client sent.
            raise HTTPException(422, str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable image") from None
        t_write = time.perf_counter()
        if tracker is not None:
            tracker.stage_to("writing")
        if self.reviews is not None:
            self.reviews.served(request.get(IMAGE_KEY), seg)
        out = self.write(seg, fmt)
        write = time.perf_counter() - t_write
        summary = seg.summary()
        timings = summary["timings"]
        seconds = {k: v for k, v in timings.items() if k not in NOT_SECONDS}
        pre = sum(seconds.get(k, 0.0) for k in PRE_STAGES)
        post = sum(seconds.get(k, 0.0) for k in POST_STAGES)
        infer = sum(v for k, v in seconds.items() if k not in PRE_STAGES + POST_STAGES)
        total = time.perf_counter() - start
        with self._recent_lock:
            self._recent.append({"seconds": round(total, 2), "reused": bool(timings.get("reused")),
                                 "slices": timings.get("slices"), "stages": {k: round(v, 2) for k, v in seconds.items()
                                                                             if isinstance(v, float) and v >= 0.01}})
        messages = [f"{name}: skipped, {why}" for name, why in seg.skipped.items()] + notes
        if not seg.labels:
            messages.insert(0, "nothing segmented: save a final label of these structures first, it joins the support bank")
        label_map = self.host.label_map()
        result = {
            # Slicer maps voxel value i to the i-th of these names (by value, background left out).
            "label_names": result_label_names(label_map),
            "centroids": {},  # OHIF's panel reads this key (stock tasks send {} when they compute none)
            "segmented": summary["labels"],
            "voxels": summary["voxels"],
            "skipped": summary["skipped"],
            "message": "; ".join(messages),
            "options": asdict(options),
            "preset": self.host.config.preset,
            "provenance": summary["provenance"],
            "timings": timings,
            # One clock (time.perf_counter) for all: pre + infer + post + write + other = total, where
            # other is what this request spent outside the engine (waiting for the bank, packing).
            "latencies": _latencies(pre, infer, post, write, total),
        }
        logger.info(
            TASK + ": %s -> %s%s in %.2f s", request["image"], summary["labels"] or "nothing",
            f" ({result['message']})" if result["message"] else "", total,
        )
        return out, result
