"""Evaluation protocols of the few-shot medical segmentation literature, as plain data.

Nothing here runs a network: these functions decide which scans are supports and which are
queries, which support slice serves which query slice, and which slices are scored.

The SSL-ALPNet protocol (Ouyang et al., ECCV 2020) mirrored here is the one of its public code,
https://github.com/cheng-01037/Self-supervised-Fewshot-Medical-Image-Segmentation :

* ``dataloaders/ManualAnnoDatasetv2.py``: scan ids are sorted numerically into a *circular*
  list; ``get_scanids`` takes fold ``f`` as ``img_pids[_SEP[f] : _SEP[f+1] + nsup]`` with
  ``_SEP = [0, 4, 8, 12, 16, 20]`` for CHAOS-T2, and ``examples/test_ssl_abdominal_mri.sh`` sets
  ``SUPP_ID='[4]'`` ("the fifth scan in the validation set"), i.e. the scan just after the fold's
  group (scan 0 for the last fold). ``validation.py`` skips the support and queries the other four.
* ``get_support``: the organ's slices in the support scan (``_zlist``, slices with >= 1 organ
  pixel) give one support slice per chunk, ``_zlist[int(pct * len(_zlist))]`` with
  ``pct = 1/(2n) + k * (1 - 1/n)/(n - 1)``, i.e. the 1/6, 1/2, 5/6 points for n = 3.
* ``dataloaders/common.py`` ``ValidationDataset.__getitem__``: a query slice z goes to chunk
  ``int((z - z_min) // ((z_max - z_min) / n))`` clipped to [0, n-1], where [z_min, z_max] is the
  organ's extent in the *query's* reference label (an oracle the protocol grants), and 0 when the
  organ has a single slice.
* ``validation.py`` with ``z_margin = 0``: only slices inside that extent are scored, and
  ``util/metric.py`` accumulates TP/FP/FN over them into one 3D Dice per scan and organ.

ADNet (Hansen et al., MedIA 2022, https://github.com/sha168/ADNet) reuses this protocol for
CHAOS-T2 and defines CMR folds in ``dataloading/dataset_specifics.py`` ``get_folds`` (groups of 7
of the 35 scans); its ``datasets.py`` takes the *last of the sorted fold indices* as support,
which differs from SSL-ALPNet only in the last fold (``convention="adnet"``).

CMR: SSL-ALPNet's paper reports CMR but its public code defines folds for CHAOS-T2 and SABS only,
so the CMR split here is ADNet's grouping (7 scans per fold) with SSL-ALPNet's support rule by
default (``configs/datasets/cmr-bssfp.yaml`` records this in metrics.json).

Settings 1 and 2 of SSL-ALPNet differ only in which slices a model may be *trained* on (setting 2
drops every training slice that holds a test organ). Nothing here is trained on the evaluated
scans, so for this engine the two settings coincide and one run answers both.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

# Labelled-scan counts of a growth curve; the benchmark caps them by the scans it has.
GROWTH_STEPS: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class Fold:
    index: int
    support_id: str
    query_ids: tuple[str, ...]


@dataclass(frozen=True)
class GrowthSplit:
    """One point of a growth curve: label ``n_labelled`` scans, score the fixed query set."""

    n_labelled: int
    support_ids: tuple[str, ...]
    query_ids: tuple[str, ...]


def scan_sort_key(case_id: str) -> tuple:
    """Sort ids by their last integer ("image_10" after "image_2"), as SSL-ALPNet and ADNet do."""
    numbers = re.findall(r"\d+", case_id)
    return (0, int(numbers[-1]), case_id) if numbers else (1, 0, case_id)


def _group_bounds(n_scans: int, n_folds: int) -> list[int]:
    """Fold boundaries like SSL-ALPNet's ``_SEP`` ([0, 4, ..., 20] for 20 scans in 5 folds).

    Their boundaries are hand-written for divisible counts; for other counts the first groups
    take one scan more (np.array_split's rule).
    """
    sizes = [len(part) for part in np.array_split(np.arange(n_scans), n_folds)]
    return [0] + np.cumsum(sizes).tolist()


def alpnet_folds(case_ids: Sequence[str], n_folds: int = 5, convention: str = "alpnet") -> list[Fold]:
    """The 1-shot cross-validation folds of SSL-ALPNet.

    Scans sorted numerically form ``n_folds`` contiguous groups; fold f's queries are its group and
    its support is the scan right after the group (circularly, so the last fold's support is the
    first scan). Every scan is then a query exactly once and a support exactly once, and never
    both in one fold. With one fold the group is every scan, so its support (the first scan) is
    left out of the queries: a support is never scored against itself.

    ``convention="adnet"`` mirrors ADNet's ``TestDataset``: the fold's scans (group plus the next
    scan) are sorted by index and the last is the support, which for the last fold makes the last
    scan the support and queries the first scan (so one scan is queried twice, one never).
    """
    if convention not in ("alpnet", "adnet"):
        raise ValueError(f"unknown fold convention {convention!r}; use 'alpnet' or 'adnet'")
    ids = sorted(case_ids, key=scan_sort_key)
    if len(set(ids)) != len(ids):
        raise ValueError("case ids must be unique")
    if n_folds < 1 or len(ids) < n_folds + 1:
        raise ValueError(f"{len(ids)} scans cannot make {n_folds} folds with a separate support each")
    bounds = _group_bounds(len(ids), n_folds)
    folds = []
    for f in range(n_folds):
        group = list(range(bounds[f], bounds[f + 1]))
        after = bounds[f + 1] % len(ids)
        if convention == "alpnet":
            support, queries = after, [i for i in group if i != after]
        else:
            members = sorted(set(group) | {after})
            support, queries = members[-1], members[:-1]
        folds.append(Fold(index=f, support_id=ids[support], query_ids=tuple(ids[i] for i in queries)))
    return folds


def organ_slices(presence: Sequence[bool] | Sequence[int] | np.ndarray) -> list[int]:
    """Slice indices holding the organ, from a boolean mask over z or a list of indices."""
    arr = np.asarray(presence)
    if arr.dtype == bool:
        return np.flatnonzero(arr).tolist()
    return sorted(int(z) for z in np.unique(arr))


def label_presence(labelmap: np.ndarray, label: int, axis: int = 0) -> np.ndarray:
    """Boolean mask over ``axis``: which slices hold at least one voxel of ``label``."""
    mask = np.asarray(labelmap) == label
    other = tuple(a for a in range(mask.ndim) if a != axis % mask.ndim)
    return mask.any(axis=other)


def organ_extent(presence: Sequence[bool] | Sequence[int] | np.ndarray, margin: int = 0,
                 n_slices: int | None = None) -> list[int]:
    """The slices SSL-ALPNet scores for one organ: z_min - margin .. z_max + margin (its ``z_margin``).

    Gaps inside the extent are included. Empty when the organ is absent.
    """
    zs = organ_slices(presence)
    if not zs:
        return []
    if n_slices is None and np.asarray(presence).dtype == bool:
        n_slices = len(presence)
    hi = zs[-1] + margin
    if n_slices is not None:
        hi = min(hi, n_slices - 1)
    return list(range(max(zs[0] - margin, 0), hi + 1))


def _part_of(z: int, z_min: int, z_max: int, n_chunks: int) -> int:
    """SSL-ALPNet's ``part_assign`` (common.py), with its float arithmetic kept as is."""
    if z_max == z_min:  # their ZeroDivisionError branch: a one-slice organ is all chunk 0
        return 0
    part = int((z - z_min) // ((z_max - z_min) / n_chunks))
    return min(max(part, 0), n_chunks - 1)


def organ_chunks(presence: Sequence[bool] | Sequence[int] | np.ndarray, n_chunks: int = 3) -> list[list[int]]:
    """The organ's slices split into ``n_chunks`` chunks of its z-extent, SSL-ALPNet's way.

    The split is by position in the extent [z_min, z_max] (the rule their code applies to query
    slices), not by slice count, so a chunk can be empty when the organ has gaps in z.
    """
    zs = organ_slices(presence)
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    if zs:
        for z in zs:
            chunks[_part_of(z, zs[0], zs[-1], n_chunks)].append(z)
    return chunks


def support_fractions(n_chunks: int) -> list[float]:
    """Where in the organ's slice list each chunk's support slice sits (``get_support``'s ``pcts``)."""
    if n_chunks < 1:
        raise ValueError("n_chunks must be >= 1")
    if n_chunks == 1:
        return [0.5]
    half_part = 1 / (n_chunks * 2)
    part_interval = (1.0 - 1.0 / n_chunks) / (n_chunks - 1)
    return [half_part + part_interval * k for k in range(n_chunks)]


def support_slice_per_chunk(chunks: Sequence[Sequence[int]]) -> list[int]:
    """One support slice per chunk: ``zlist[int(pct * len(zlist))]`` over all the organ's slices.

    For an organ without gaps this is the centre of each chunk (the 1/6, 1/2 and 5/6 points for
    three chunks); SSL-ALPNet indexes the whole slice list rather than each chunk, and so does this.
    """
    zlist = sorted(z for chunk in chunks for z in chunk)
    if not zlist:
        raise ValueError("the support scan does not contain the organ")
    return [zlist[int(pct * len(zlist))] for pct in support_fractions(len(chunks))]


def implied_extent(support_slices: Sequence[int], n_slices: int) -> tuple[int, int]:
    """The organ extent (first, last slice) that one support slice per chunk implies: the inverse of
    ``support_slice_per_chunk`` for an organ without gaps. Every extent inside the scan that the rule
    maps onto exactly these slices is a candidate (usually one to three, a slice apart); the middle one
    is returned, which on synthetic extents is exact 70 % of the time for three chunks and off by 0.3
    slices on average (the linear estimate, about 1/(2n) of the spread beyond each end, is exact 44 %
    of the time and a slice too long on average). Slices that no gap-free extent yields (an organ with
    gaps) fall back to that estimate. Only the slices are read, never the label; a single slice
    implies only itself."""
    zs = sorted(int(z) for z in support_slices)
    if not zs:
        raise ValueError("no support slices")
    n = len(zs)
    if n == 1:
        return zs[0], zs[0]
    candidates = []
    for length in range(1, n_slices + 1):
        # The rule itself, on an organ of this length starting at slice 0: its slices' offsets.
        offsets = support_slice_per_chunk(organ_chunks(np.ones(length, bool), n))
        first = zs[0] - offsets[0]
        if first >= 0 and first + length <= n_slices and [first + o for o in offsets] == zs:
            candidates.append((first, first + length - 1))
    if candidates:
        return candidates[len(candidates) // 2]
    half_chunk = (zs[-1] - zs[0]) * n / (n - 1) / (2 * n)
    return max(0, int(round(zs[0] - half_chunk))), min(n_slices - 1, int(round(zs[-1] + half_chunk)))


def query_chunk_assignment(query_organ_slices: Sequence[bool] | Sequence[int] | np.ndarray,
                           n_chunks: int = 3, n_slices: int | None = None) -> dict[int, int]:
    """Query slice -> chunk index (whose support slice segments it), from the query's own organ extent.

    Without ``n_slices`` only the slices of the extent [z_min, z_max] (the scored ones) are
    assigned; with it every slice 0..n_slices-1 is, slices outside the extent clipping to the
    first or last chunk as in SSL-ALPNet. Empty when the organ is absent.
    """
    zs = organ_slices(query_organ_slices)
    if not zs:
        return {}
    z_min, z_max = zs[0], zs[-1]
    span = range(n_slices) if n_slices is not None else range(z_min, z_max + 1)
    return {z: _part_of(z, z_min, z_max, n_chunks) for z in span}


def clinical_split(case_ids: Sequence[str], shots: int, seed: int) -> tuple[list[str], list[str]]:
    """``shots`` randomly drawn support scans and the remaining query scans (seeded, reproducible).

    Supports keep their draw order; queries are sorted.
    """
    ids = sorted(case_ids, key=scan_sort_key)
    if not 1 <= shots < len(ids):
        raise ValueError(f"need 1 <= shots < {len(ids)} scans so that at least one query remains; got {shots}")
    order = np.random.default_rng(seed).permutation(len(ids))
    support = [ids[i] for i in order[:shots]]
    queries = sorted((ids[i] for i in order[shots:]), key=scan_sort_key)
    return support, queries


def growth_steps(n_available: int, steps: Sequence[int] = GROWTH_STEPS) -> list[int]:
    """The labelled-scan counts of ``steps`` that ``n_available`` support candidates allow."""
    return [int(s) for s in steps if 1 <= s <= n_available]


def growth_splits(case_ids: Sequence[str], seed: int, steps: Sequence[int] = GROWTH_STEPS,
                  n_queries: int | None = None) -> list[GrowthSplit]:
    """Nested support sets with one fixed query set, so a growth curve shows the effect of labelling.

    One seeded permutation: its last ``n_queries`` scans are the queries at every step, and the
    support set of size n is the permutation's first n scans (each step adds to the previous).
    By default half the scans are queries, and fewer when that would leave the candidate pool smaller
    than the largest step: a pool larger than the largest step leaves an active-learning strategy a
    real choice at every step (with a pool of exactly 8, every order ends with the same 8 scans).
    """
    ids = sorted(case_ids, key=scan_sort_key)
    if len(ids) < 2:
        raise ValueError("a growth curve needs at least two scans (one support, one query)")
    if n_queries is None:
        n_queries = max(1, min(len(ids) // 2, len(ids) - max(steps)))
    if not 1 <= n_queries < len(ids):
        raise ValueError(f"n_queries must be in [1, {len(ids) - 1}]; got {n_queries}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    queries = tuple(sorted(order[len(ids) - n_queries:], key=scan_sort_key))
    pool = order[: len(ids) - n_queries]
    usable = growth_steps(len(pool), steps)
    if len(usable) < len(steps):
        logger.info("growth curve stops at %s labelled scans: %d scans remain besides the %d queries",
                    usable[-1] if usable else 0, len(pool), n_queries)
    return [GrowthSplit(n_labelled=n, support_ids=tuple(pool[:n]), query_ids=queries) for n in usable]
