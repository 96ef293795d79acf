"""Finding labelled volumes in a folder, in the two layouts users have, and where a folder's bank
lives (``bank_dir_for``). Named for what it reads, not ``datastore``: the MONAI Label datastore (its
index, uploads, locks) is the app's ``apps/fewshot/lib/datastore.py``; this only lists files.

* A MONAI Label local datastore: images at the top level, final labels under ``labels/final/``
  with the same file name. The image id is the file name without its extension, as in MONAI Label.
* A dataset folder of ``image_N.nii.gz`` + ``label_N.nii.gz`` pairs (the few-shot benchmarks' layout).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fewshot.annotation import Annotation, AnnotationError
from fewshot.volume import IMAGE_SUFFIXES


def bank_dir_for(datastore: str | os.PathLike, preset: str) -> Path:
    """Where a datastore's bank for a preset lives; the CLI and the MONAI Label app use the same place."""
    return Path(datastore) / ".fewshot" / f"bank-{preset}"


def image_id_of(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _images_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(IMAGE_SUFFIXES)
    )


def scan_datastore(directory: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
    """image id -> (image path, final label path or None)."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such datastore directory")
    labels = {image_id_of(p): str(p) for p in _images_in(root / "labels" / "final")}
    return {image_id_of(p): (str(p), labels.get(image_id_of(p))) for p in _images_in(root)}


# MONAI Label's local datastore index, and where the app records a save's annotated part in it
# (apps/fewshot/lib/annotations.py: a final label's info["annotation"]).
INDEX_FILE = "datastore_v2.json"
ANNOTATION_KEY = "annotation"


def final_label_annotations(directory: str | os.PathLike) -> dict[str, Annotation]:
    """image id -> the annotated part of its final label, for the labels the app saved as partial
    (an image not listed was annotated whole). Read from MONAI Label's index, so a bank the CLI builds
    puts in only what was annotated, as the app's does. No index: a plain folder, all complete. An
    unreadable index is an error: guessing "complete" would teach the bank that unannotated slices hold
    no organ."""
    index = Path(directory) / INDEX_FILE
    if not index.exists():
        return {}
    try:
        objects = json.loads(index.read_text()).get("objects") or {}
        found = {}
        for image_id, entry in objects.items():
            info = ((entry.get("labels") or {}).get("final") or {}).get("info") or {}
            if info.get(ANNOTATION_KEY):
                found[str(image_id)] = Annotation.from_dict(info[ANNOTATION_KEY])
        return found
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise AnnotationError(f"{index}: cannot read which final labels are partial ({exc}); start the app on "
                              "this datastore once (it repairs a damaged index) or move the file aside") from None


def labelled(datastore: dict[str, tuple[str, str | None]]) -> dict[str, tuple[str, str]]:
    return {k: (img, lab) for k, (img, lab) in datastore.items() if lab}


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def scan_pairs(directory: str | os.PathLike) -> dict[str, tuple[str, str]]:
    """``image_N`` / ``label_N`` pairs -> {case id N: (image path, label path)}, in natural order."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such data directory")
    out = {}
    for image in _images_in(root):
        m = re.match(r"image_(.+)$", image_id_of(image))
        if not m:
            continue
        for suffix in IMAGE_SUFFIXES:
            label = root / f"label_{m.group(1)}{suffix}"
            if label.is_file():
                out[m.group(1)] = (str(image), str(label))
                break
    return dict(sorted(out.items(), key=lambda kv: _natural_key(kv[0])))
