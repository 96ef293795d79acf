"""Which of the bank's atlases a scan-level transfer (``classic``) is offered: for one query, and for choices
made per bank, ahead of any query."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from fewshot.bank import SupportBank
from fewshot.types import Atlas

logger = logging.getLogger(__name__)


def atlas_records(bank: SupportBank, labels: Sequence[int]) -> dict[str, dict]:
    """Bank records of the whole labelled scans holding any of ``labels`` (all when empty). A scan annotated on
    some slices only is no atlas: its other slices would vote "no organ"."""
    wanted = {int(v) for v in labels}
    records = {i: bank.record(i) for i in bank.atlas_ids()}
    return {i: r for i, r in records.items() if (r["source"].get("annotation") or {}).get("slices") is None
            and (not wanted or wanted & set(r["labels"]))}


def offered_atlases(bank: SupportBank, embeddings: np.ndarray, labels: Sequence[int], axis: int | None,
                    candidates: int) -> list[Atlas]:
    """The bank's atlases holding any of ``labels`` (all when empty), offered for one query: all of them up to
    ``candidates``; beyond, those whose slices are closest to the query's (``embeddings``) in the bank's own
    index (per atlas, the mean over query slices of its best entry's similarity). Filtered by label first, so
    a label only some scans hold is not crowded out by scans that lack it."""
    records = atlas_records(bank, labels)
    ids = list(records)
    if axis is not None:
        # Told, not filtered: headers of preprocessed data often name another RAS axis for the same
        # cut (half the CMR files here), and the global affine ranks a truly foreign atlas last.
        other = [i for i in ids if int(records[i]["atlas"].get("axis", -1)) not in (-1, int(axis))]
        if other:
            logger.info("atlases %s were sliced along another RAS axis than this scan (%d) by their headers",
                        other, axis)
    if len(ids) > candidates:
        depth = min(bank.num_entries, max(64, 8 * candidates))
        scores, rows = bank.search(embeddings, depth)
        floor = scores[:, -1:] if scores.shape[1] else np.zeros((len(embeddings), 1), np.float32)
        best = {i: floor[:, 0].copy() for i in ids}
        for z, line in enumerate(rows):
            for s, (image_id, _) in zip(scores[z], line):
                if image_id in best and s > best[image_id][z]:
                    best[image_id][z] = s
        ids = sorted(ids, key=lambda i: (-float(best[i].mean()), i))[:candidates]
        logger.info("atlas candidates by descriptor similarity: %s", ids)
    return [bank.atlas(i) for i in ids]


def choice_atlases(bank: SupportBank, labels: Sequence[int], keep: int, loaded: Sequence[Atlas] = ()) -> list[Atlas]:
    """The atlases a transfer that chooses by its bank (``classic``'s ``fusion.correlation: bank``) leaves out in
    turn: whole labelled scans holding any of ``labels``, the first ``keep`` by image id. The same for every
    query of a bank, so a choice made ahead (``Engine.prepare_bank``) is the one each query needs. Atlases in
    ``loaded`` (a query's offered ones) are not read again."""
    read = {a.image_id: a for a in loaded}
    return [read.get(i) or bank.atlas(i) for i in sorted(atlas_records(bank, labels))[:int(keep)]]
