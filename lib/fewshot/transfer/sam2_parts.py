"""SAM 2 transfer's small parts: the memory records, the payload convention, the query-feature
cache, hole filling and the propagation order (no networks here)."""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fewshot.types import SlicePlan, SliceResult

# SAM 2 normalises frames with the ImageNet statistics (sam2.utils.misc.load_video_frames).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PAYLOAD_KEYS = ("maskmem_features", "obj_ptr", "object_present")

@dataclass
class Memory:
    """One memory frame for B objects, as SAM 2 keeps it per frame in ``output_dict``."""

    features: torch.Tensor | None  # (B, mem_dim, h, w) maskmem_features; None: the frame lends its pointer only
    obj_ptr: torch.Tensor  # (B, hidden) object pointer
    t_pos: int  # SAM 2's t_pos: 0 for conditioning frames, num_maskmem - distance for recent frames
    ptr_tpos: int  # temporal position of the object pointer (frame distance t_diff in SAM 2)


@dataclass
class SliceMemory:
    """A predicted query slice as memory for the slices after it, for the labels run on it only
    (SAM 2 has no memory of an object on a frame it did not track, so none is made up)."""

    rows: dict[int, int]  # label position -> row
    obj_ptr: torch.Tensor  # (n, hidden)
    features: torch.Tensor | None = None  # (n, mem_dim, h, w); dropped once no slice within `neighbours` reads it


@dataclass
class QueryFeatures:
    """Image-encoder output of one query slice (what SAM 2 caches in ``cached_features``)."""

    backbone_fpn: list[torch.Tensor]  # the levels SAM 2 uses, each (1, C_l, H_l, W_l)
    digest: str  # of the slice's pixels: a reused cache key with other pixels is a miss


@dataclass
class SupportMemories:
    """encode_supports' result as tensors, one row per (support, label)."""

    maskmem_features: torch.Tensor  # (E, L, mem_dim, h, w)
    obj_ptr: torch.Tensor  # (E, L, hidden)
    object_present: torch.Tensor  # (E, L) bool


def payload_for_labels(
    payload: dict[str, np.ndarray], bank_labels: Sequence[int], labels: Sequence[int]
) -> dict[str, np.ndarray]:
    """One entry's arrays, stored in the bank's label order, re-indexed to ``labels``."""
    position = {int(v): i for i, v in enumerate(bank_labels)}
    missing = [int(v) for v in labels if int(v) not in position]
    if missing:
        raise KeyError(f"labels {missing} are not among the bank's labels {list(bank_labels)}")
    index = np.array([position[int(v)] for v in labels], dtype=np.int64)
    return {k: np.asarray(payload[k])[index] for k in PAYLOAD_KEYS}


class QueryFeatureCache:
    """LRU of query volumes' image features, so a second inference skips the image encoder."""

    def __init__(self, max_volumes: int):
        self.max_volumes = max(0, int(max_volumes))
        self._volumes: OrderedDict[tuple, dict[int, QueryFeatures]] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._volumes.clear()

    def get(self, cache_key: str | None, image_size: int, z: int, digest: str) -> QueryFeatures | None:
        if cache_key is None or self.max_volumes == 0:
            return None
        with self._lock:
            volume = self._volumes.get((cache_key, image_size))
            if volume is None:
                return None
            self._volumes.move_to_end((cache_key, image_size))
            hit = volume.get(z)
            return hit if hit is not None and hit.digest == digest else None

    def put(self, cache_key: str | None, image_size: int, z: int, features: QueryFeatures) -> None:
        if cache_key is None or self.max_volumes == 0:
            return
        with self._lock:
            key = (cache_key, image_size)
            self._volumes.setdefault(key, {})[z] = features
            self._volumes.move_to_end(key)
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)

    def __len__(self) -> int:
        return len(self._volumes)


def fill_holes(low_res_logits: torch.Tensor, max_area: int) -> torch.Tensor:
    """sam2.utils.misc.fill_holes_in_mask_scores on any device: background components (8-connected)
    of at most ``max_area`` low-res pixels become foreground (logit 0.1). Meta's version needs its
    CUDA extension and silently skips the step without it; this one always runs."""
    from scipy import ndimage

    mask = (low_res_logits <= 0).cpu().numpy()
    fill = np.zeros_like(mask)
    for b in range(mask.shape[0]):
        components, n = ndimage.label(mask[b, 0], structure=np.ones((3, 3), bool))
        if n:
            areas = np.bincount(components.ravel())
            small = np.flatnonzero(areas <= max_area)
            fill[b, 0] = np.isin(components, small[small > 0])
    if not fill.any():
        return low_res_logits
    return torch.where(torch.as_tensor(fill, device=low_res_logits.device), torch.full_like(low_res_logits, 0.1), low_res_logits)


def propagation_order(plans: list[SlicePlan]) -> tuple[int | None, list[tuple[int, int]]]:
    """(anchor, [(slice, direction)]): outwards from the slice with the best-scoring support.

    The anchor is chosen among slices with at least one allowed label; direction +1 walks up from
    the anchor, -1 walks down from just below it. Slices without labels are visited too (they get
    zeros) but never run the networks.
    """
    candidates = [p for p in plans if p.labels and p.supports]
    if not candidates:
        return None, [(z, +1) for z in range(len(plans))]
    anchor = max(candidates, key=lambda p: max(s.score for s in p.supports)).slice_index
    order = [(z, +1) for z in range(anchor, len(plans))] + [(z, -1) for z in range(anchor - 1, -1, -1)]
    return anchor, order



@dataclass
class SliceRecord:
    """What one slice of a propagation computed, and from what, for a later run to reuse exactly."""

    signature: tuple  # the slice's own inputs: its pixels, its plan's supports (bank keys) and labels
    result: SliceResult
    rows: dict[int, int] | None  # its memory for later slices (None: no label ran)
    obj_ptr: torch.Tensor | None
    features: torch.Tensor | None

    def same_output(self, result: SliceResult, memory: SliceMemory | None) -> bool:
        """Bit-identical to what a re-run produced: then slices reading this one see no change."""
        if not (np.array_equal(self.result.probabilities, result.probabilities)
                and np.array_equal(self.result.object_scores, result.object_scores)):
            return False
        if memory is None or self.rows is None:
            return memory is None and self.rows is None
        same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        return self.rows == memory.rows and same(self.obj_ptr, memory.obj_ptr) and same(self.features, memory.features)

    def memory(self) -> SliceMemory | None:
        return None if self.rows is None else SliceMemory(dict(self.rows), self.obj_ptr, self.features)


@dataclass
class PropagationRecord:
    """One volume's last propagation: where it started and what each slice computed."""

    anchor: int | None
    num_frames: int
    slices: dict[int, SliceRecord]


class PropagationCache:
    """LRU of volumes' last propagations (query key, labels), so that a run after a bank change re-runs
    only the slices whose inputs changed. A slice record holds its result and its memory for later
    slices (float32, n_labels x mem_dim x h x w): a 30-slice volume with 4 labels keeps ~30 MB at 512²,
    ~120 MB at 1024², hence its own, smaller bound than the image-feature cache."""

    def __init__(self, max_volumes: int):
        self.max_volumes = max(0, int(max_volumes))
        self._volumes: OrderedDict[tuple, PropagationRecord] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._volumes.clear()

    def get(self, key: tuple | None) -> PropagationRecord | None:
        if key is None or self.max_volumes == 0:
            return None
        with self._lock:
            record = self._volumes.get(key)
            if record is not None:
                self._volumes.move_to_end(key)
            return record

    def put(self, key: tuple | None, record: PropagationRecord) -> None:
        if key is None or self.max_volumes == 0:
            return
        with self._lock:
            self._volumes[key] = record
            self._volumes.move_to_end(key)
            while len(self._volumes) > self.max_volumes:
                self._volumes.popitem(last=False)


def slice_signature(image: np.ndarray, plan: SlicePlan) -> tuple | None:
    """A slice's own inputs to the propagation: its pixels, its supports by bank key and rank, its
    allowed labels. None when a support has no key (nothing to tell it from another)."""
    if any(not s.key for s in plan.supports):
        return None
    pixels = hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=16).hexdigest()
    return pixels, tuple(s.key for s in plan.supports), tuple(int(v) for v in plan.labels)
