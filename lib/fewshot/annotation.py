"""What part of a label a person actually annotated.

A label file cannot tell "painted as background" from "not looked at": a correction drawn on one
slice of a 31-slice scan is zero on the other 30, most of which hold organs. Taken as complete,
those 30 slices would enter the bank as organ-free negatives. An :class:`Annotation` says which
slices (indices along one voxel axis of the label's array) and which label values were annotated;
only annotated slices become bank entries. ``None`` means all of them: a complete label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

DEFAULT_AXIS = 2  # the third voxel axis: a DICOM series' instance order, 3D Slicer's K


class AnnotationError(ValueError):
    pass


@dataclass(frozen=True)
class Annotation:
    slices: tuple[int, ...] | None = None  # annotated slices along ``axis``; None: every slice
    axis: int = DEFAULT_AXIS
    labels: tuple[int, ...] | None = None  # annotated label values; None: every label
    how: str = ""  # how the client said so (for provenance): "SEG frames", "params annotated_slices", ...

    @property
    def partial(self) -> bool:
        return self.slices is not None or self.labels is not None

    def check(self, shape: Sequence[int]) -> "Annotation":
        """Refuses slices outside a label of ``shape`` (a client's mistake must not pass silently)."""
        if self.axis not in (0, 1, 2):
            raise AnnotationError(f"annotated_axis must be 0, 1 or 2, not {self.axis}")
        if self.slices is not None:
            n = int(shape[self.axis])
            outside = sorted(z for z in self.slices if not 0 <= z < n)
            if outside:
                raise AnnotationError(f"annotated slices {outside[:10]} lie outside the label's {n} slices along axis {self.axis}")
        return self

    def file_slices(self, shape: Sequence[int], file_axis: int) -> set[int] | None:
        """Annotated slices along the engine's slicing axis ``file_axis`` of a volume of ``shape``
        (None: all). Along another axis a slice is annotated only if it lies wholly in the
        annotated region, that is, if every slice along ``axis`` was annotated."""
        if self.slices is None:
            return None
        if self.axis == file_axis:
            return set(self.slices)
        return set(range(int(shape[file_axis]))) if set(self.slices) >= set(range(int(shape[self.axis]))) else set()

    def as_dict(self) -> dict:
        return {
            "partial": self.partial,
            "slices": None if self.slices is None else list(self.slices),
            "axis": self.axis,
            "labels": None if self.labels is None else list(self.labels),
            "how": self.how,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "Annotation":
        if not data:
            return cls()
        slices, labels = data.get("slices"), data.get("labels")
        return cls(
            slices=None if slices is None else tuple(sorted({int(z) for z in slices})),
            axis=int(data.get("axis", DEFAULT_AXIS)),
            labels=None if labels is None else tuple(sorted({int(v) for v in labels})),
            how=str(data.get("how", "")),
        )
