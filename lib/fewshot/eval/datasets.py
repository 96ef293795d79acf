"""What eval reads: the dataset files in ``configs/datasets/`` (label names and settings that suit a
dataset), the scans of a data folder, and a scan's reference on the slicing-axis-first grid.

A dataset file ``configs/datasets/<name>.yaml`` (picked by ``--dataset`` or by the data folder's
name) supplies label names and volume settings that suit the dataset, e.g. a finer canvas
spacing for the tiny hippocampus crops. Precedence: preset < dataset file < ``--set``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import yaml

from fewshot.config import CONFIGS_DIR, ConfigError, parse_label_map

logger = logging.getLogger(__name__)


@dataclass
class DatasetConfig:
    """``configs/datasets/<name>.yaml``: label names and settings that suit one dataset."""

    name: str
    description: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # deep-merged over the preset (dotted-flattened)
    folds: str = ""  # where the alpnet folds come from for this dataset, recorded in metrics.json

    def overrides(self) -> dict:
        return _flatten(self.settings)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def available_datasets() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "datasets").glob("*.yaml"))


def load_dataset_config(name: str) -> DatasetConfig:
    path = CONFIGS_DIR / "datasets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown dataset {name!r}; available: {', '.join(available_datasets()) or 'none'}")
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping")
    unknown = set(raw) - {"description", "labels", "settings", "folds"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (use description, labels, settings, folds)")
    return DatasetConfig(name=name, description=str(raw.get("description", "")),
                         labels=parse_label_map(raw.get("labels")), settings=dict(raw.get("settings") or {}),
                         folds=" ".join(str(raw.get("folds", "")).split()))


def dataset_for(data_dir: str | Path, name: str | None) -> DatasetConfig | None:
    """The dataset file named by ``name``; without one, the file named like the data folder, if any."""
    if name == "none":
        return None
    if name:
        return load_dataset_config(name)
    folder = Path(data_dir).resolve().name
    if folder in available_datasets():
        logger.info("using dataset settings configs/datasets/%s.yaml (pass --dataset none to ignore)", folder)
        return load_dataset_config(folder)
    return None


@dataclass(frozen=True)
class Case:
    case_id: str
    image: str
    label: str


@dataclass
class Reference:
    """A scan's image and reference label on the native grid, slicing axis first (RAS order)."""

    image: np.ndarray  # (Z, H, W) float32
    label: np.ndarray  # (Z, H, W) uint16
    spacing: tuple[float, float, float]  # mm along (Z, H, W)


def slice_major(array: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """File-order array -> RAS with ``axis`` (the canvas's slicing axis) first, and its spacing.

    Uses the same reorientation as the canvas, so index z here is canvas slice z.
    """
    from fewshot.volume import to_ras

    ras, _, spacing_ras = to_ras(array, affine)
    spacing = (spacing_ras[axis],) + tuple(s for i, s in enumerate(spacing_ras) if i != axis)
    return np.moveaxis(ras, axis, 0), tuple(float(s) for s in spacing)


def label_values_in(cases: Sequence[Case]) -> list[int]:
    import nibabel as nib

    values: set[int] = set()
    for case in cases:
        values.update(int(v) for v in np.unique(np.asarray(nib.load(case.label).dataobj)) if v)
    return sorted(values)
