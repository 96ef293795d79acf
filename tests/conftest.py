"""Shared fixtures: the real data in ../shared/data (skipped cleanly when absent) and tiny random networks."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Tests check mechanics, not speed. One intra-op thread keeps them from thrashing when a server
# subprocess (or anything else) shares the two cores; timings live in `python -m fewshot bench`.
torch.set_num_threads(1)

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEWSHOT_SHARED_DATA", PROJECT.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir() or not any(path.glob("image_*")):
        pytest.skip(f"real data {path} is absent (it lives in ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """One models directory per test session: random-tiny checkpoints are generated here once,
    then loaded through the same loading code as real weights."""
    path = tmp_path_factory.mktemp("models")
    os.environ["FEWSHOT_MODELS_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_settings(models_dir):
    from fewshot.config import load_preset

    return load_preset("random-tiny")


def make_datastore(tmp: Path, source: Path, labelled: list[str], unlabelled: list[str]) -> Path:
    """A MONAI Label local datastore from ``image_N``/``label_N`` pairs: images at the top, final labels below."""
    (tmp / "labels" / "final").mkdir(parents=True, exist_ok=True)
    for case in labelled + unlabelled:
        shutil.copy(source / f"image_{case}.nii.gz", tmp / f"image_{case}.nii.gz")
    for case in labelled:
        shutil.copy(source / f"label_{case}.nii.gz", tmp / "labels" / "final" / f"image_{case}.nii.gz")
    return tmp
