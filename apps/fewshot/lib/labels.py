"""Label values as MONAI Label's viewer plugins read and write them (see README, "Clients").

3D Slicer's plugin imports an infer result by name order, not by value: it sorts the result's
``label_names`` by value, drops ``background``, and the i-th remaining name receives the voxels of
value i+1. Its "Submit Label" exports the segments (without ``background``) as values 1..K in
segment order and sends ``label_info = [{"name": ..., "idx": ...}, ...]`` in that same order.

So a result's ``label_names`` lists every value from 1 to the largest, with a placeholder for any
unused value (Slicer finds no segment by that name and skips it), and a saved label that carries
Slicer's ``label_info`` is translated back from segment order to the configured values.

OHIF's panel creates its segments from the ``/info`` label list (background dropped), segment i
painting voxel value i, and its "Submit Label" sends ``label_info = [{"name", "segmentIndex",
...}, ...]``: the same translation applies, keyed by ``segmentIndex``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from fastapi import HTTPException

BACKGROUND = "background"
MAX_PLACEHOLDERS = 4096  # beyond this the gap-filling list would dwarf the result JSON


def with_background(label_map: Mapping[str, int]) -> dict[str, int]:
    """MONAI Label's convention (its deepedit apps, OHIF's panel drop the first /info label)."""
    return {BACKGROUND: 0, **{n: v for n, v in label_map.items() if n != BACKGROUND}}


def result_label_names(label_map: Mapping[str, int]) -> dict[str, int]:
    """``label_names`` for an infer result: background, then one name per value 1..max."""
    by_value = {int(v): n for n, v in label_map.items() if n != BACKGROUND}
    top = max(by_value, default=0)
    if top > MAX_PLACEHOLDERS:
        return with_background(dict(sorted(label_map.items(), key=lambda kv: kv[1])))
    out = {BACKGROUND: 0}
    for value in range(1, top + 1):
        name = by_value.get(value)
        if name is None:
            name = f"unused_{value}"
            while name in label_map:
                name += "_"
        out[name] = value
    return out


def slicer_label_info(params: Mapping[str, Any]) -> list[str] | None:
    """Segment names in export order when ``params`` carries Slicer's ``label_info``; else None."""
    info = params.get("label_info")
    if not isinstance(info, list) or not info:
        return None
    if not all(_is_slicer(e) for e in info):
        return None
    return [e["name"] for e in info]


def ohif_label_info(params: Mapping[str, Any]) -> dict[int, str] | None:
    """Painted voxel value -> segment name when ``params`` carries OHIF's ``label_info``; else None."""
    info = params.get("label_info")
    if not isinstance(info, list) or not info:
        return None
    if not _all_ohif(info):
        return None
    out: dict[int, str] = {}
    for e in info:
        value, name = e["segmentIndex"], e["name"]
        if value <= 0:
            continue
        if out.get(value, name) != name:
            raise HTTPException(422, f"label_info names two segments for value {value}: {out[value]!r} and {name!r}")
        out[value] = name
    return out or None


Segments = Sequence[str] | Mapping[int, str]  # names in export order (Slicer) or by painted value (OHIF)


def client_segments(params: Mapping[str, Any]) -> Segments | None:
    """The segment names a client sent with a label, if it numbered the segments its own way.

    A ``label_info`` that is neither Slicer's nor OHIF's list of segments is refused (422): the
    label's values cannot then be read unambiguously, and storing it as it is would guess."""
    info = params.get("label_info")
    if info is None:
        return None
    if not isinstance(info, list):
        raise HTTPException(422, f"label_info must be a list of segments ({LABEL_INFO_FORMS}), not {type(info).__name__}")
    if not info:
        return None
    segments = slicer_label_info(params) or ohif_label_info(params)
    if segments is None and not _all_ohif(info):  # OHIF's list may hold only background: nothing to map
        bad = next((n, e) for n, e in enumerate(info) if not (_is_slicer(e) or _is_ohif(e)))
        shown = repr(bad[1]) if len(repr(bad[1])) <= 80 else repr(bad[1])[:77] + "..."
        raise HTTPException(422, f"label_info entry {bad[0]} is not a segment ({LABEL_INFO_FORMS}): {shown}")
    return segments


LABEL_INFO_FORMS = '3D Slicer sends {"name": ..., "idx": ...}, OHIF {"name": ..., "segmentIndex": ...}'


def _is_slicer(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str) and "idx" in entry


def _is_ohif(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str) and type(entry.get("segmentIndex")) is int


def _all_ohif(info: list) -> bool:
    return all(_is_ohif(e) for e in info)


def segment_value_map(names: Segments, label_map: Mapping[str, int], configured: bool) -> tuple[dict[int, int], dict[int, str]]:
    """Exported value -> datastore value, and exported values whose name has no value. ``names``:
    a list for values 1..K in order, or a mapping from value to name.

    Without a configured label map, a name that is not known keeps its exported value."""
    lut, unknown = {}, {}
    pairs = names.items() if isinstance(names, Mapping) else enumerate(names, start=1)
    for position, name in pairs:
        if name == BACKGROUND:
            lut[position] = 0
        elif name in label_map:
            lut[position] = int(label_map[name])
        elif name.isdigit():
            lut[position] = int(name)
        elif not configured:
            lut[position] = position
        else:
            unknown[position] = name
    return lut, unknown


def value_table(values: np.ndarray, names: Segments, label_map: Mapping[str, int], configured: bool, what: str) -> np.ndarray | None:
    """Lookup table from Slicer's exported values to the datastore's (``table[v]``); None when
    nothing changes. 422 if a painted segment cannot be mapped."""
    lut, unknown = segment_value_map(names, label_map, configured)
    present = [int(v) for v in np.unique(values) if v]
    beyond = [v for v in present if v not in lut and v not in unknown]
    if beyond:
        raise HTTPException(422, f"{what}: values {beyond} have no entry in label_info (it names {len(names)} segments)")
    painted = {v: unknown[v] for v in present if v in unknown}
    if painted:
        known = ", ".join(n for n in label_map if n != BACKGROUND) or "none configured"
        raise HTTPException(
            422, f"{what}: segments {sorted(painted.values())} are not labels of this app ({known}); "
            "rename them to one of these names, or add them to the label map (-c labels / labels.yaml)",
        )
    if all(lut[v] == v for v in present):
        return None
    table = np.arange(max(max(present, default=0), max(lut, default=0)) + 1, dtype=np.int64)
    for exported, value in lut.items():
        table[exported] = value
    return table
