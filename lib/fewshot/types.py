"""The small data types that flow between the engine's rooms, and the three step protocols.

A preset composes one Embedder, one Matcher and one LabelTransfer (see ``presets.py``). A transfer
works either slice by slice from the supports retrieval chose (``LabelTransfer``), or on whole
labelled scans, the *atlases* (``AtlasTransfer``: multi-atlas registration and label fusion).
All images handed between steps are 2D *canvas slices*: float32 arrays of shape (S, S) with
values in [0, 1], resampled to the preset's common in-plane pixel spacing (``volume.py``).
Masks on the canvas are integer label maps (uint16) with the dataset's own label values
(e.g. 200/500/600 for CMR), 0 = background.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np


Progress = Callable[[int, int], None]  # progress(done, total), called as a long step advances


@dataclass(frozen=True)
class SupportRef:
    """Where a support slice came from: enough for a user to open it and see why."""

    image_id: str
    slice_index: int
    augmentation: str = ""  # "" for the original slice, else a short description of the transform

    def as_dict(self) -> dict:
        d = {"image_id": self.image_id, "slice": self.slice_index}
        if self.augmentation:
            d["augmentation"] = self.augmentation
        return d


@dataclass
class Support:
    """One support slice chosen for a query slice, with what the transfer step needs of it.

    ``payload`` holds the transfer step's cached per-entry arrays (e.g. SAM 2 memories),
    read from the bank, so supports are never re-encoded at query time.
    """

    ref: SupportRef
    image: np.ndarray  # (S, S) float32 in [0, 1]
    mask: np.ndarray  # (S, S) uint16 label map
    labels: tuple[int, ...]  # label values present in ``mask``
    score: float = 0.0  # retrieval similarity (higher = closer)
    match_distance: float | None = None  # matcher distance (lower = closer), None if matching is off
    payload: dict[str, np.ndarray] = field(default_factory=dict)
    # The entry's identity in its bank, new whenever the entry is written again ("" when unknown): a
    # transfer may reuse what it computed from a support with the same key.
    key: str = ""


@dataclass
class SlicePlan:
    """The supports chosen for one query slice and the labels allowed on it.

    A label is allowed on a slice only if at least one chosen support contains it: that is how
    organ absence is respected (negative supports vote for "nothing here").
    """

    slice_index: int
    supports: list[Support]
    labels: tuple[int, ...]


@dataclass
class SliceResult:
    """Per-slice output of a transfer step on the canvas."""

    probabilities: np.ndarray  # (L, S, S) float32 in [0, 1], one channel per label in ``labels`` order
    object_scores: np.ndarray  # (L,) float32: >0 means the step thinks the label is present
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds spent on this slice
    ran: tuple[int, ...] | None = None  # label values the step ran on this slice; None: those of its plan
    reused: bool = False  # taken from an earlier run whose inputs to this slice were the same


@dataclass
class VolumeResult:
    labels: tuple[int, ...]  # label value for each probability channel
    slices: list[SliceResult]  # one per query slice, in slice order
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> total seconds
    atlases: list["AtlasUse"] = field(default_factory=list)  # scan-level transfers: the atlases used


@dataclass
class Atlas:
    """One labelled scan as a multi-atlas transfer registers it, computed when its label is saved.

    The canvas volume (slices in RAS order along the slicing axis, the canvas's in-plane grid) and
    its label map, so an inference never re-reads or re-samples a labelled scan.
    """

    image_id: str
    image: np.ndarray  # (Z, S, S) float in [0, 1]
    mask: np.ndarray  # (Z, S, S) uint16 label map
    spacing: tuple[float, float, float]  # mm between voxels along (slice, row, column)
    components: dict[int, int]  # label value -> its sizeable 3D pieces (2 for both kidneys under one label)
    key: str  # content hash: a registration cached against this atlas never outlives a changed label
    axis: int = -1  # RAS axis its header says its slices were cut along (-1: not recorded); logged when it differs
    # World unit vectors of its canvas's (slice, row, column) axes (volume.CanvasGeometry.directions):
    # whether its slices run the query's way. () when not recorded (banks from before 3 December 2026).
    directions: tuple[tuple[float, float, float], ...] = ()

    @property
    def labels(self) -> tuple[int, ...]:
        return tuple(sorted(self.components))


@dataclass
class AtlasUse:
    """Provenance of one atlas in a scan-level segmentation."""

    image_id: str
    similarity: float | None  # correlation with the query after the global affine, as selection ranks it (transfer.rank_by); None: not aligned
    reversed_slices: bool = False  # registered with its slice order reversed (see ``slice_order``)
    seconds: float = 0.0  # registration time (0 when reused from the cache)
    reused: bool = False
    # Correlation with the query within its structures after the whole registration (transfer/screen.py); None: not
    # registered, or its structures left the query
    registered_similarity: float | None = None
    fused: bool = True  # False: registered, but left out of the fusion by transfer.screen (or its registration failed)

    def as_dict(self) -> dict:
        def rounded(value):
            return None if value is None else round(value, 4)

        return {"image_id": self.image_id, "similarity": rounded(self.similarity), "reversed_slices": self.reversed_slices,
                "seconds": round(self.seconds, 2), "reused": self.reused,
                "registered_similarity": rounded(self.registered_similarity), "fused": self.fused}


@runtime_checkable
class Embedder(Protocol):
    """Canvas slices -> vectors for the faiss index."""

    name: str
    dim: int
    # faiss index_factory prefix applied inside the bank's index, e.g. "PCAW64,L2norm" for a
    # descriptor that must be whitened on the bank; "" when vectors are already L2-normalised.
    index_transform: str

    def embed(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S) float32 in [0, 1] -> (N, dim) float32."""
        ...


@runtime_checkable
class Matcher(Protocol):
    """Re-ranks retrieved candidates for one query slice."""

    name: str

    def distances(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """query (S, S), candidates (M, S, S), all float32 in [0, 1] -> (M,) distances, lower = closer."""
        ...


@runtime_checkable
class LabelTransfer(Protocol):
    """Chosen supports -> masks for the query volume."""

    name: str

    def fingerprint(self) -> str:
        """Identifies what ``encode_supports`` produces (network, weights, input size).

        The bank stores it; a bank built with another fingerprint is rebuilt, never mixed.
        """
        ...

    def encode_supports(
        self, images: np.ndarray, masks: np.ndarray, labels: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """Computed once when slices enter the bank.

        images (E, S, S) float32, masks (E, S, S) uint16, labels: the bank's label values.
        Returns named arrays with leading dimension E (e.g. SAM 2 ``maskmem_features``), or {}
        when the step needs nothing beyond image and mask.
        """
        ...

    def segment_volume(self, query: np.ndarray, plans: list[SlicePlan], labels: Sequence[int],
                       cache_key: str | None = None, progress: Progress | None = None) -> VolumeResult:
        """query (Z, S, S) float32 canvas slices; ``plans[z]`` are the supports for slice z.

        ``cache_key`` identifies the query volume so that expensive per-slice features can be
        reused by a second call on the same volume. ``progress`` is an optional callable
        ``progress(done, total)``.
        """
        ...


@runtime_checkable
class AtlasTransfer(LabelTransfer, Protocol):
    """Whole labelled scans -> masks for the query volume (multi-atlas segmentation).

    ``scope = "scan"`` tells the engine to hand it atlases (``Atlas``) instead of per-slice plans.
    Its ``segment_volume`` (a ``LabelTransfer``'s) serves protocols that fix support slices (alpnet).
    """

    scope: str

    def segment_with_atlases(self, query: np.ndarray, spacing: tuple[float, float, float], atlases: Sequence[Atlas],
                             labels: Sequence[int], keep: int, cache_key: str | None = None,
                             progress: Progress | None = None,
                             directions: tuple[tuple[float, float, float], ...] = ()) -> VolumeResult:
        """query (Z, S, S) canvas volume with its voxel ``spacing`` (and the world directions of its
        axes, when known); the ``keep`` atlases most like the query (of ``atlases``) are registered
        to it and their labels fused."""
        ...
