"""The ``alpnet`` protocol: the few-shot literature's 1-way 1-shot protocol.

For each fold and organ, three support slices of the fold's support scan are encoded once (masks
binarised to that organ) and each query slice of the organ's z-extent is segmented with its chunk's
support, through the preset's transfer step directly (no retrieval: the protocol fixes the
supports). Each organ keeps its own binary prediction and is scored on it alone, on its extent's
slices (as SSL-ALPNet scores each 1-way run); Dice per scan, averaged over scans and folds. The CMR
folds are ADNet's (SSL-ALPNet's code has none), and settings 1 and 2 coincide for an engine that is
not trained (see ``protocols``, which holds the rules as data); metrics.json says both.

``pairing`` "all" offers every support slice of the organ to every query slice of its extent: the same
labels, not the protocol's pairing, so reported as its own row. ``support`` "propagated" uses the same
support slices and no other label, for methods that need a whole atlas: the slices are carried through
their own scan first (``propagated_label``), which is then segmented against as one atlas. "volume" uses
the support's whole label: not the protocol.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fewshot.eval import protocols
from fewshot.eval.datasets import DatasetConfig, slice_major
from fewshot.eval.results import CaseResult
from fewshot.eval.run import EvalRun, progress
from fewshot.meters import cpu_seconds

logger = logging.getLogger(__name__)

ALPNET_SUPPORTS = {
    "slices": "the protocol: one support slice per chunk of each organ's extent in the support scan",
    "volume": "NOT the protocol: the support scan's whole labelled volume is the bank (multi-atlas methods "
              "need it); same folds, same scoring, reported as its own row",
    "propagated": "the protocol's support slices and no other label: each organ's slices are carried through "
                  "the support scan's own unlabelled slices (the extent they imply) by the preset's slice "
                  "transfer, and that scan is then the bank's one atlas; the query's extent is not used",
}

ALPNET_PAIRINGS = {
    "chunk": "the protocol's pairing (SSL-ALPNet's, after Roy et al.): each query slice is segmented with the support "
             "slice of its own chunk",
    "all": "NOT the protocol's pairing, the same labels: every support slice of the organ (one per chunk) is offered "
           "to every query slice of its extent, and the preset's transfer weighs them (the query's chunks are not "
           "used; its extent still decides which slices are segmented, as the protocol grants); reported as its own row",
}

ALPNET_SETTINGS_NOTE = (
    "SSL-ALPNet's setting 1 and setting 2 differ only in the slices a model may be trained on (setting 2 "
    "removes every training slice holding a test organ). This engine is not trained on these scans, so for "
    "it the two settings coincide: its figures compare with either column."
)


def carrier(transfer):
    """The 2D registration that carries support slices through their own scan: ``classic``'s slice
    step, or ``classic-slices``' transfer itself."""
    from fewshot.transfer.registration import RegistrationTransfer

    registration = getattr(transfer, "slices", transfer)
    if not isinstance(registration, RegistrationTransfer):
        raise ValueError("--alpnet-support propagated carries the support slices by 2D registration: it needs "
                         "a registration preset (classic, classic-slices)")
    return registration


def offered_supports(organ_supports: Sequence[list], chunk: int, pairing: str) -> list:
    """The candidate Supports a query slice of ``chunk`` is offered: its chunk's (``pairing`` "chunk", the
    protocol's rule) or every chunk's ("all": at a chunk's ends another chunk's slice may show the query's level of
    the organ better, and a transfer that fuses several supports can weigh them)."""
    if pairing == "chunk":
        return organ_supports[chunk]
    if pairing == "all":
        return [c for candidates in organ_supports for c in candidates]
    raise ValueError(f"unknown alpnet pairing {pairing!r}; use one of {', '.join(ALPNET_PAIRINGS)}")


def given_masks_win(probabilities: np.ndarray, given: Sequence[Mapping[int, np.ndarray]]) -> np.ndarray:
    """probabilities (z, organ, y, x) of the organs carried through a support scan -> the same, where
    no organ keeps any probability on the voxels another organ's support slice gives (``given``: per
    organ, slice -> its boolean mask). A given mask is the protocol's label, a carried one a guess;
    both are exactly 1 there, and a tie would go to the lower label value (LV-MYO over the blood pool)."""
    out = probabilities.copy()
    for i, slices in enumerate(given):
        for z, mask in slices.items():
            others = [j for j in range(out.shape[1]) if j != i]
            out[z, others] *= ~mask
    return out


@dataclass(frozen=True)
class AlpnetProtocol:
    """``chunks`` of each organ's extent, whose folds (``convention``: SSL-ALPNet's or ADNet's rule),
    and which ``support``: "slices" (the protocol: one support slice per chunk of each organ),
    "propagated" (those slices carried through their own scan, which is then one atlas) or "volume"
    (the support scan's whole labelled volume, for methods that need it; reported apart). With "slices",
    ``pairing``: "chunk" (the protocol's rule) or "all" (every support slice offered to every query slice;
    reported apart)."""

    chunks: int = 3
    convention: str = "alpnet"
    support: str = "slices"
    pairing: str = "chunk"

    name = "alpnet"
    default_folds = 5
    fold_column = "support_slices"
    fold_note = "support slices: canvas slice indices per organ, one per chunk (SSL-ALPNet's get_support)"
    selection_groups_note = "the protocol's cross-validation folds"

    def check(self, case_ids: Sequence[str], n_folds: int, selecting: bool) -> None:
        """Fails at once on an impossible split, before any network loads."""
        protocols.alpnet_folds(list(case_ids), n_folds, self.convention)
        if selecting and n_folds < 2:
            raise ValueError("--select needs at least 2 folds (it selects on the other folds)")

    def info(self, n_folds: int, dataset: DatasetConfig | None) -> dict:
        """metrics.json's ``protocol_settings``."""
        return {"folds": n_folds, "chunks": self.chunks, "fold_convention": self.convention,
                "support": self.support, "support_note": ALPNET_SUPPORTS[self.support],
                "pairing": self.pairing, "pairing_note": ALPNET_PAIRINGS[self.pairing],
                "fold_source": (dataset.folds if dataset and dataset.folds else
                                "SSL-ALPNet's rule over the numerically sorted scans (protocols.alpnet_folds)"),
                "settings_1_and_2": ALPNET_SETTINGS_NOTE,
                "scored": "each organ on the slices of its reference z-extent, 1-way (its own binary "
                          "prediction), Dice per scan"}

    @staticmethod
    def selection_groups(results: Sequence[CaseResult]) -> dict[tuple[int, str], int]:
        """(fold, case id) -> selection group: its cross-validation fold."""
        return {(r.fold, r.case_id): r.fold for r in results}

    def supports(self, run: EvalRun, support_id: str) -> tuple[dict[int, list[list]], dict[int, list[int]]]:
        """organ -> per chunk, the candidate Supports of its one slice (encoded once, mask binarised to
        the organ), and their slices. The preset's own path: with ``bank.augmentations_per_slice`` the
        candidates are the slice and its augmented copies (affine on image and mask, colour jitter on
        the image), among which the matcher picks per query slice, as the bank does for a clinical run."""
        from fewshot.bank_augment import augment_support
        from fewshot.types import Support, SupportRef
        from fewshot.volume import label_to_canvas, read_label

        n_aug = run.engine.config.entries.augmentations_per_slice
        aug_params = run.engine.config.entries.augmentation

        case = run.cases[support_id]
        prepared = run.engine.prepare(case.image)
        masks = label_to_canvas(read_label(case.label, prepared.volume), prepared.geometry)
        supports, slices = {}, {}
        for organ in run.values:
            # Canvas presence: a support slice must hold the organ after resampling to the canvas.
            presence = (masks == organ).any(axis=(1, 2))
            if not presence.any():
                logger.warning("support scan %s has no %s: that organ is not evaluated in this fold",
                               support_id, run.name_of[organ])
                continue
            zs = protocols.support_slice_per_chunk(protocols.organ_chunks(presence, self.chunks))
            images, binary, refs, chunk_of = [], [], [], []
            for chunk, z in enumerate(zs):
                mask = np.where(masks[z] == organ, organ, 0).astype(np.uint16)
                copies = [(prepared.canvas[z], mask, "")]
                digest = hashlib.sha256(f"{aug_params.get('seed', 0)}:{support_id}:{organ}:{z}".encode()).digest()
                rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))  # the same copies every run
                copies += [(a.image, a.mask, a.description) for a in augment_support(prepared.canvas[z], mask, n_aug, aug_params, rng)]
                for image, copy_mask, description in copies:
                    images.append(image)
                    binary.append(copy_mask)
                    refs.append(SupportRef(support_id, int(z), augmentation=description))
                    chunk_of.append(chunk)
            payload = run.engine.transfer.encode_supports(np.stack(images), np.stack(binary), [organ])
            supports[organ] = [[] for _ in zs]
            for e, (ref, chunk) in enumerate(zip(refs, chunk_of)):
                supports[organ][chunk].append(
                    Support(ref=ref, image=images[e], mask=binary[e], labels=(organ,) if binary[e].any() else (),
                            payload={k: v[e] for k, v in payload.items()}))
            slices[organ] = [int(z) for z in zs]
        return supports, slices

    def propagated_label(self, run: EvalRun, support_id: str, scratch: Path) -> tuple[Path, dict[int, list[int]]]:
        """The support scan's label as far as the protocol's support slices tell it, written under
        ``scratch`` for the engine to ingest; and each organ's support slices. On each organ's support
        slices, their masks; on the other slices of the extent those slices imply
        (``protocols.implied_extent``), the masks of the nearest support slice on either side
        registered within the scan and fused locally (``RegistrationTransfer.carry``: a few slices of
        one patient apart, where the protocol's pairing registers another patient's slice). No other
        voxel of the support's label is read (but the slices' positions are the protocol's, which it
        chose from the support's whole extent: ``implied_extent`` recovers that extent when the organ
        has no gaps). Where a support slice gives an organ, that mask stands (``given_masks_win``);
        elsewhere, where organs' carried masks overlap, the more probable wins."""
        from fewshot.volume import canvas_to_label, write_label

        registration = carrier(run.engine.transfer)
        start = time.perf_counter()
        supports, slices = self.supports(run, support_id)
        prepared = run.engine.prepare(run.cases[support_id].image)
        organs = sorted(supports)
        probs = np.zeros((len(prepared.canvas), len(organs)) + prepared.canvas.shape[1:], np.float32)
        given_by_organ = []
        for i, organ in enumerate(organs):
            # The slice itself, not its augmented copies: within one scan nothing needs augmenting.
            given = {z: next(c for c in candidates if not c.ref.augmentation).mask
                     for z, candidates in zip(slices[organ], supports[organ])}
            span = protocols.implied_extent(list(given), len(prepared.canvas))
            probs[:, i] = registration.carry(prepared.canvas, given, organ, span)
            given_by_organ.append({z: m == organ for z, m in given.items()})
        label = canvas_to_label(given_masks_win(probs, given_by_organ), organs, prepared.geometry)
        path = scratch / f"label_{support_id}_propagated.nii.gz"
        write_label(path, label, prepared.volume)
        logger.info("support scan %s: its %d support slices carried through the scan in %.1f s", support_id,
                    sum(len(set(z)) for z in slices.values()), time.perf_counter() - start)
        return path, slices

    def chosen(self, run: EvalRun, query_slice: np.ndarray, candidates: list) -> list:
        """The chunk's candidates this query slice attends to: the matcher's ``selection.keep`` best
        (LPIPS over the augmented copies for the SAM 2 presets), or all of them without a matcher."""
        keep = run.engine.config.selection.keep
        if run.engine.matcher is None or len(candidates) <= keep:
            return candidates
        distances = run.engine.matcher.distances(query_slice, np.stack([c.image for c in candidates]))
        return [candidates[i] for i in np.argsort(distances, kind="stable")[:keep]]

    def query(self, run: EvalRun, fold: int, support_id: str, query_id: str,
              supports: Mapping[int, list]) -> CaseResult:
        from fewshot.types import SlicePlan
        from fewshot.volume import canvas_to_label

        start, cpu_start = time.perf_counter(), cpu_seconds()
        prepared = run.engine.prepare(run.cases[query_id].image)
        ref = run.reference(query_id, prepared)
        n = len(prepared.canvas)
        # One binary prediction per organ, as SSL-ALPNet scores 1-way runs: a shared label map would let
        # a later organ overwrite an earlier one's true positives where they overlap (LV-BP vs LV-MYO).
        predictions: dict[int, np.ndarray] = {}
        extents, stages = {}, {}
        evaluated = []
        for organ, organ_supports in supports.items():
            presence = protocols.label_presence(ref.label, organ, axis=0)
            if not presence.any():
                logger.info("case %s has no %s: not scored for it", query_id, run.name_of[organ])
                continue
            # The query's own reference extent decides the chunks (an oracle the protocol grants).
            chunk_of = protocols.query_chunk_assignment(presence, self.chunks)
            offered = {chunk: offered_supports(organ_supports, chunk, self.pairing) for chunk in set(chunk_of.values())}
            plans = [SlicePlan(z, self.chosen(run, prepared.canvas[z], offered[chunk_of[z]]), (organ,))
                     if z in chunk_of else SlicePlan(z, [], ()) for z in range(n)]
            result = run.engine.transfer.segment_volume(prepared.canvas, plans, [organ], cache_key=prepared.key)
            probs = np.stack([s.probabilities for s in result.slices])
            native = canvas_to_label(probs, [organ], prepared.geometry)
            organ_pred, _ = slice_major(native, prepared.volume.affine, prepared.geometry.axis)
            predictions[organ] = organ_pred == organ
            extents[organ] = protocols.organ_extent(presence)
            evaluated.append(organ)
            for stage, sec in result.seconds.items():
                stages[stage] = stages.get(stage, 0.0) + sec
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        query_slices = len(set().union(*map(set, extents.values()))) if extents else 0
        organ_slices = sum(len(zs) for zs in extents.values())
        # 1-way: each organ is scored against its own prediction only, on its own extent.
        return run.score(query_id, fold, (support_id,), ref, predictions, evaluated, extents, 1.0,
                           seconds, query_slices, organ_slices, stages, cpu)

    def query_volume(self, run: EvalRun, fold: int, support_id: str, query_id: str) -> CaseResult:
        """The same folds and scoring as ``query``, but the query segmented whole by the engine's own
        path from the support scan in the bank (its whole labelled volume, or its propagated label).
        Each organ is still scored on its own reference extent."""
        whole = run.segment_whole(query_id)
        ref, prediction = whole.reference, whole.prediction
        extents = {}
        for organ in run.values:
            presence = protocols.label_presence(ref.label, organ, axis=0)
            if presence.any() and organ in run.engine.bank.label_values:
                extents[organ] = protocols.organ_extent(presence)
        query_slices = len(set().union(*map(set, extents.values()))) if extents else 0
        return run.score(query_id, fold, (support_id,), ref, {v: prediction == v for v in extents}, list(extents),
                           extents, 1.0, whole.seconds, query_slices, sum(len(z) for z in extents.values()), whole.stages,
                           whole.cpu, display=prediction)

    def run(self, run: EvalRun, n_folds: int) -> tuple[list[CaseResult], list[dict]]:
        """Every fold's queries, scored; and the fold table's rows."""
        folds = protocols.alpnet_folds(list(run.cases), n_folds, self.convention)
        results, fold_info = [], []
        jobs = sum(len(run.queries(f.query_ids)) for f in folds)
        with progress(jobs, "alpnet queries") as bar:
            for fold in folds:
                logger.info("fold %d: support scan %s, queries %s", fold.index, fold.support_id, list(fold.query_ids))
                queries = run.queries(fold.query_ids)
                if self.support in ("volume", "propagated"):
                    run.clear_bank()
                    case = run.cases[fold.support_id]
                    with tempfile.TemporaryDirectory(prefix="fewshot-alpnet-") as scratch:
                        if self.support == "volume":
                            label, used = case.label, {run.name_of[v]: "whole volume" for v in run.values}
                        else:
                            label, slices = self.propagated_label(run, fold.support_id, Path(scratch))
                            used = {run.name_of[o]: z for o, z in slices.items()}
                        run.engine.ingest(fold.support_id, case.image, label)
                    for query_id in queries:
                        results.append(self.query_volume(run, fold.index, fold.support_id, query_id))
                        bar.update(1)
                    fold_info.append({"index": fold.index, "support_ids": [fold.support_id], "query_ids": queries,
                                      "support_slices": used})
                    continue
                supports, slices = self.supports(run, fold.support_id)
                for query_id in queries:
                    results.append(self.query(run, fold.index, fold.support_id, query_id, supports))
                    bar.update(1)
                fold_info.append({
                    "index": fold.index, "support_ids": [fold.support_id], "query_ids": queries,
                    "support_slices": {run.name_of[o]: z for o, z in slices.items()},
                })
        if self.support != "slices":
            run.clear_bank()
        return results, fold_info
