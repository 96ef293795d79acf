#!/usr/bin/env python
"""Write the demo datastore: procedurally generated abdominal phantoms in MONAI Label's local layout.

    python scripts/make_sample_datastore.py [--output sample-datastore] [--cases 6] [--labelled 3]

Each case is a 3D MR-like volume (an elliptic body with a liver, a spleen and two kidneys, all
ellipsoids with case-specific position, size and in-plane rotation, a smooth bias field and noise).
The first ``--labelled`` cases get a final label under ``labels/final/``; the others are left for the
few-shot app to segment. Everything derives from ``--seed``: the same arguments write the same bytes
(nibabel's gzip writer stores no timestamp), so the committed files can be checked against the script.
The phantoms are synthetic, so the project may ship them under any licence.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"liver": 1, "spleen": 2, "kidney": 3}
SHAPE = (72, 64, 20)  # voxels (x, y, z): a small field of view keeps the committed files tiny
SPACING = (2.5, 2.5, 7.0)  # mm: thick slices, as in abdominal MR
# Mean intensity of each tissue (MR-like arbitrary units); 0 outside the body.
INTENSITY = {"body": 250.0, "liver": 520.0, "spleen": 760.0, "kidney": 950.0}
NOISE_SD = 18.0


@dataclass(frozen=True)
class Ellipsoid:
    name: str
    centre: tuple[float, float, float]  # mm, body centred at 0
    radii: tuple[float, float, float]  # mm


# The reference anatomy (patient's right is -x here, as in a radiological view of RAS space).
ORGANS = (
    Ellipsoid("liver", (-32.0, 8.0, 6.0), (34.0, 30.0, 48.0)),
    Ellipsoid("spleen", (42.0, 16.0, 14.0), (14.0, 18.0, 30.0)),
    Ellipsoid("kidney", (-30.0, -28.0, -12.0), (10.0, 14.0, 26.0)),
    Ellipsoid("kidney", (32.0, -26.0, -8.0), (10.0, 14.0, 26.0)),
)
BODY_RADII = (82.0, 64.0)  # mm, an elliptic cylinder along z


def world_grid(shape, spacing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel centres in mm, centred on the volume."""
    axes = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing)]
    return np.meshgrid(*axes, indexing="ij")


def make_case(seed: int, case: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (image int16, label uint8, affine) of one phantom, all determined by (seed, case)."""
    rng = np.random.default_rng([seed, case])
    x, y, z = world_grid(SHAPE, SPACING)
    angle = np.deg2rad(rng.uniform(-10, 10))  # in-plane rotation of the whole anatomy
    xr = np.cos(angle) * x - np.sin(angle) * y
    yr = np.sin(angle) * x + np.cos(angle) * y
    body_scale = rng.uniform(0.92, 1.08)
    body = (xr / (BODY_RADII[0] * body_scale)) ** 2 + (yr / (BODY_RADII[1] * body_scale)) ** 2 <= 1.0

    image = np.where(body, INTENSITY["body"], 0.0)
    label = np.zeros(SHAPE, np.uint8)
    for organ in ORGANS:
        shift = rng.uniform(-7, 7, size=3)
        scale = rng.uniform(0.85, 1.15, size=3)
        c = np.asarray(organ.centre) + shift
        r = np.asarray(organ.radii) * scale
        inside = ((xr - c[0]) / r[0]) ** 2 + ((yr - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        inside &= body
        image[inside] = INTENSITY[organ.name] * rng.uniform(0.93, 1.07)
        label[inside] = LABELS[organ.name]

    # A smooth multiplicative bias field (coil sensitivity) and Rician-like noise, as in MR.
    gradient = rng.uniform(-0.12, 0.12, size=3)
    bias = 1.0 + gradient[0] * x / 90 + gradient[1] * y / 80 + gradient[2] * z / 70
    noisy = np.abs(image * bias + rng.normal(0, NOISE_SD, SHAPE) + 1j * rng.normal(0, NOISE_SD, SHAPE))
    image = np.round(noisy).clip(0, 4000).astype(np.int16)

    affine = np.diag([SPACING[0], SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(SHAPE, SPACING)]
    if case % 3 == 2:
        # Every third case is stored with its first two axes flipped (LPS-like, as DICOM
        # converters often write): same anatomy, another voxel order, to exercise orientation.
        image, label = image[::-1, ::-1], label[::-1, ::-1]
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [(SHAPE[0] - 1), (SHAPE[1] - 1)]
        affine = affine @ flip
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def write_datastore(output: Path, cases: int, labelled: int, seed: int) -> dict[str, str]:
    """Write the datastore; returns relative path -> sha256 of every file written."""
    if not 0 <= labelled <= cases:
        raise ValueError(f"--labelled must lie in 0..{cases}")
    written = {}
    for case in range(1, cases + 1):
        image, label, affine = make_case(seed, case)
        name = f"phantom_{case:02d}.nii.gz"
        save(image, affine, output / name)
        written[name] = output / name
        if case <= labelled:
            save(label, affine, output / "labels" / "final" / name)
            written[f"labels/final/{name}"] = output / "labels" / "final" / name
    labels_file = output / "labels.yaml"
    labels_file.write_text(
        "# Label names and values of the phantoms, read by the few-shot app (overridden by -c labels).\n"
        + "".join(f"{name}: {value}\n" for name, value in LABELS.items())
    )
    written["labels.yaml"] = labels_file
    return {rel: hashlib.sha256(path.read_bytes()).hexdigest() for rel, path in sorted(written.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "sample-datastore")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--labelled", type=int, default=3, help="cases that get a final label (the first N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    digests = write_datastore(args.output, args.cases, args.labelled, args.seed)
    total = sum((args.output / rel).stat().st_size for rel in digests)
    for rel, digest in digests.items():
        print(f"{digest[:16]}  {rel}")
    print(f"wrote {len(digests)} files ({total / 1024:.0f} KiB) to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
