"""Weights-free label transfer at scan level: multi-atlas registration and joint label fusion.

Every labelled scan in the bank is an *atlas*: its canvas volume and label map, cached when the
label was saved. For a query scan (``segment_with_atlases``):

1. **choose**: each atlas offered is aligned to the query by a global 3D affine; the ``keep`` whose
   aligned image correlates best with the query are kept (all of them while the bank holds fewer:
   every labelled scan is registered). The engine offers at most ``selection.candidates`` atlases, the
   ones whose slices its descriptor index finds closest to the query's.
2. **register** each kept atlas (``atlas_registration``: local affine and a 3D deformable stage,
   MIND-SSC by convexAdam or demons, on the region of its structures, plus in-plane 2D demons per
   slice for thick-slice stacks), in ``workers`` single-threaded processes: an atlas's 3D stages
   are one job, each slice shift of its in-plane step another, queued as its 3D stages end. Always
   in the workers, even for a lone atlas: ANTs' affine repeats exactly only single-threaded. Results
   are cached per (query, atlas, labels): a re-run after one new label registers only that atlas.
3. **screen** them (``screen``): with ``screen.margin`` set, an atlas whose registered intensities
   correlate with the query's within its structures more than that below the best atlas's is left
   out of the fusion, when at most ``screen.max_atlases`` were registered (with two atlases, one that
   failed to register is half of every vote);
4. **fuse** their labels by joint label fusion (``fusion``; with ``correlation: bank`` its search measure is
   the one the bank's own atlases, each left out in turn, segment best: ``fusion_choice``), and
5. **keep the pieces** the atlases say each label has (``pieces``): both kidneys under one label
   survive, specks elsewhere do not; labels every atlas draws convex in plane come out convex
   (``shape``); and, with ``extent.method: profile``, no label runs along the slices further than
   its atlases allow (``extent``: an atlas stretched along z draws the ventricles over the atria).

The step also segments from slice-level supports (``segment_volume``), for protocols that fix the
support slices (the alpnet protocol): those go to the 2D ``RegistrationTransfer`` configured under
``slices``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from fewshot.config import ConfigError
from fewshot.decision import LabelDecision
from fewshot.transfer import atlas_registration as reg
from fewshot.transfer.atlas_settings import _PRESET, AtlasSettings
from fewshot.transfer.atlas_start import warm_fusion, warm_worker
from fewshot.transfer.extent import AtlasProfiles, ProfileCache, limit_extent, relative_ends
from fewshot.transfer.fusion import FusionSettings, fuse, fusion_rule, measure_for, merge_variants
from fewshot.transfer.fusion_choice import FusionChoices
from fewshot.transfer.pieces import expected_pieces, keep_pieces
from fewshot.transfer.registration import RegistrationTransfer, object_scores
from fewshot.transfer.screen import registered_similarity, screened
from fewshot.transfer.shape import SolidityCache, make_convex
from fewshot.transfer.workers import Job, WorkerPool, pin_ants_threads, run_inline, sitk_threads
from fewshot.types import Atlas, AtlasUse, SlicePlan, SliceResult, VolumeResult

logger = logging.getLogger(__name__)

FINGERPRINT_VERSION = "atlas-v1"
MAX_ALIGNMENTS = 4096  # global affines kept (a few hundred bytes each) for re-runs on the same queries


def _init_worker(threads: int) -> None:
    pin_ants_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def registration_key(plan: reg.RegistrationPlan) -> str:
    """What decides an atlas's registration: the plan, less the settings of a deformable method it does not run."""
    used = asdict(plan)
    if plan.deformable.method != "mind":
        used.pop("mind")
    if plan.deformable.method != "demons":
        used["deformable"] = {"method": plan.deformable.method}
    return _digest(used)


def alignment_key(plan: reg.RegistrationPlan) -> str:
    """What decides an atlas's global affine and its scores, for a given slice order (``align_globally``; the
    margin widens the region its ``region_similarity`` is taken over)."""
    return _digest([asdict(plan.global_affine), plan.slice_order_margin, plan.margin_mm])


class _CandidateCache:
    """Registered atlases by (query, atlas key, labels, plan), least recently used first out, bounded in bytes."""

    def __init__(self, limit_mb: int):
        self.limit = int(limit_mb) * 2**20
        self._items: OrderedDict[tuple, reg.Candidate | None] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def grow_to(self, limit_mb: int) -> None:
        with self._lock:
            self.limit = max(self.limit, int(limit_mb) * 2**20)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def get(self, key: tuple):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return True, self._items[key]
        return False, None

    def put(self, key: tuple, candidate: reg.Candidate | None) -> None:
        size = candidate.nbytes if candidate is not None else 0
        if size > self.limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes -= old.nbytes if old is not None else 0
            self._items[key] = candidate
            self._bytes += size
            while self._bytes > self.limit and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.nbytes if dropped is not None else 0


# Registrations and global affines are shared by every AtlasTransfer in the process. Their keys name
# the query, the atlas's content and the registration plan, so engines that differ only after
# registration (fusion, shape, threshold: the points of an eval's --select grid) register a pair once.
_REGISTERED = _CandidateCache(0)  # bounded by the largest transfer.cache_mb asked for
_ALIGNED: dict[tuple, reg.GlobalAlignment] = {}


class AtlasTransfer:
    """LabelTransfer by multi-atlas segmentation of whole scans (``scope = "scan"``)."""

    name = "atlas"
    scope = "scan"

    def __init__(self, settings: Mapping):
        self.settings = AtlasSettings.from_settings(settings)
        if not isinstance(settings.get("slices"), Mapping):
            raise ConfigError(f"transfer type atlas needs a 'slices' section: the 2D registration for slice supports ({_PRESET})")
        self.slices = RegistrationTransfer(settings["slices"])
        self._plan_key = registration_key(self.settings.registration)
        self._alignment_key = alignment_key(self.settings.registration)
        _REGISTERED.grow_to(self.settings.cache_mb)
        self._cache = _REGISTERED
        self._alignments = _ALIGNED
        self._solidities = SolidityCache()
        self._profiles = ProfileCache()
        self._choices = FusionChoices()  # fusion.correlation: bank
        self._choice_key = _digest(asdict(replace(self.settings, fusion=replace(self.settings.fusion, correlation=None))))
        s = self.settings
        if s.threads_per_worker > 1:  # valid (faster per atlas), but a choice a user should make knowingly
            logger.warning("transfer.threads_per_worker %d: ANTs' affine and joint fusion do not repeat exactly on more "
                           "than one thread, so the same scan can come out differently from run to run", s.threads_per_worker)
        self.pool = WorkerPool(s.workers, s.threads_per_worker, s.start_method, _init_worker, "atlas registration",
                               "registration jobs")
        self._inline_lock = threading.Lock()  # SimpleITK's thread count is process-wide

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """What this step makes the bank store: nothing of its own (the atlases are the engine's
        canvas volumes and masks), so registration and fusion settings are not part of it."""
        return f"{FINGERPRINT_VERSION}+{self.slices.fingerprint()}"

    def encode_supports(self, images: np.ndarray, masks: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
        return {}  # atlases are the bank's canvas volumes themselves (SliceBatch.atlas)

    @property
    def label_decision(self) -> LabelDecision:
        return LabelDecision(self.settings.threshold, self.settings.decision)

    # ------------------------------------------------------------------ slice supports (alpnet protocol)

    def segment_volume(self, query, plans: list[SlicePlan], labels, cache_key=None, progress=None) -> VolumeResult:
        return self.slices.segment_volume(query, plans, labels, cache_key=cache_key, progress=progress)

    # ------------------------------------------------------------------ worker processes

    def forget_caches(self) -> None:
        """Forget every registration and global affine (the process's, see ``_REGISTERED``): the
        next query registers its atlases cold, as timing runs need."""
        self._cache.clear()
        self._alignments.clear()
        self._choices.clear()

    def warm(self) -> dict[str, float]:
        """Start now what a first segmentation would otherwise start on its own clock: the worker processes
        and their imports, and joint fusion's compiled loops. The server calls it at start-up, ``eval``
        before its first scan. -> seconds of each part."""
        seconds = {}
        clock = time.perf_counter()
        if self.settings.workers > 1:  # with one, registrations run here and load ANTs when they first need it
            self.pool.warm(warm_worker, (self.settings.registration.deformable.method,))
            seconds["workers"] = time.perf_counter() - clock
        clock = time.perf_counter()
        fusion = self.settings.fusion
        if fusion.method == "joint" and fusion.implementation == "vectorised":
            both = fusion.correlation == "bank" or fusion_rule(fusion.correlation) is not None
            for measure in (False, True) if both else (fusion.correlation,):
                warm_fusion(replace(fusion, correlation=measure))
            seconds["fusion"] = time.perf_counter() - clock
        return seconds

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones); the slice transfer's too."""
        self.pool.close()
        self.slices.close()

    def _run(self, jobs: Mapping[Hashable, Job], on_done: Callable, on_error: Callable) -> None:
        """Every job and the follow-ups ``on_done`` returns, in the worker processes, however few:
        ANTs' affine (Mattes mutual information) repeats exactly only when it runs single-threaded,
        and ITK fixes a process's thread count when ANTs first runs there, so an atlas registered
        in this process with its cores would come out differently from run to run (a lone atlas
        did, until 2 December). With ``workers: 1``, or jobs a stopped pool left, they run here,
        with ANTs pinned to ``threads_per_worker`` threads first (``pin_ants_threads``): unpinned,
        a hippocampus query's Dice moved from 0.69 to 0.20 between two machines (5 December)."""
        remaining = dict(jobs)
        if self.settings.workers > 1 and jobs:
            remaining = self.pool.run_jobs(jobs, on_done, on_error=on_error)
        if remaining:
            pin_ants_threads(self.settings.threads_per_worker)
            with self._inline_lock, sitk_threads(self.settings.threads_per_worker):
                run_inline(remaining, on_done, on_error)

    # ------------------------------------------------------------------ scan level

    def segment_with_atlases(
        self,
        query: np.ndarray,
        spacing: tuple[float, float, float],
        atlases: Sequence[Atlas],
        labels: Sequence[int],
        keep: int,
        cache_key: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        directions: tuple[tuple[float, float, float], ...] = (),
        fusion: FusionSettings | None = None,
        choice_atlases: Sequence[Atlas] | None = None,
    ) -> VolumeResult:
        """``fusion``: this segmentation's (default: the preset's, ``correlation: bank`` resolved by
        ``choice_atlases``, the bank's atlases left out in turn, and a number by how many atlases are fused;
        by ``atlases`` when not given)."""
        labels = tuple(int(v) for v in labels)
        query = np.asarray(query, np.float32)
        spacing = tuple(float(s) for s in spacing)
        plan = self.settings.registration
        query_key = cache_key or _digest([query.shape, spacing, directions, hashlib.sha256(query.tobytes()).hexdigest()])
        atlases = [a for a in atlases if set(a.labels) & set(labels)]
        orders = {a.image_id: reg.slice_orders(plan, directions, a.directions) for a in atlases}
        unread = [a for a in atlases if plan.slice_order == "geometry" and len(orders[a.image_id]) > 1]
        if unread:
            logger.warning("slice order not read from the headers, both tried: %s", "the query has no recorded directions"
                           if not len(directions) else "; ".join(
                               f"atlas {a.image_id}: " + ("no directions recorded (a bank from before 3 December 2026: "
                                                          "re-ingest it)" if not len(a.directions) else
                                                          "its axes do not line up with the query's") for a in unread))

        def aligned_key(a: Atlas) -> tuple:  # what an atlas's global affine depends on
            return (query_key, a.key, self._alignment_key, orders[a.image_id])

        def registered_key(a: Atlas) -> tuple:  # what its whole registration depends on
            return (query_key, a.key, self._plan_key, orders[a.image_id], labels)

        def remember(a: Atlas, alignment: reg.GlobalAlignment) -> None:
            self._alignments[aligned_key(a)] = alignment
            while len(self._alignments) > MAX_ALIGNMENTS:  # oldest first: dicts keep insertion order
                self._alignments.pop(next(iter(self._alignments)))

        seconds = {"select": 0.0, "register": 0.0, "fuse": 0.0, "pieces": 0.0, "shape": 0.0, "extent": 0.0}
        if fusion is None:
            fusion, seconds["choose_fusion"] = self._fusion_for(atlases if choice_atlases is None else choice_atlases,
                                                                labels, keep)
        steps = len(atlases) + min(keep, len(atlases)) if len(atlases) > keep else len(atlases)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress:
                progress(done, steps + 1)

        # 1. choose: global affines rank the atlases when there are more than `keep`.
        t0 = time.perf_counter()
        chosen = list(atlases)
        if len(atlases) > keep:
            todo = {a.image_id: (query, spacing, a, plan, orders[a.image_id]) for a in atlases
                    if aligned_key(a) not in self._alignments}
            by_id = {a.image_id: a for a in atlases}

            def aligned(image_id, alignment):
                if alignment is not None:
                    remember(by_id[image_id], alignment)
                tick()

            def not_aligned(image_id, exc: BaseException) -> None:
                logger.warning("atlas %s: %s(%s); left out of this segmentation", image_id, type(exc).__name__, exc)
                aligned(image_id, None)

            self._run({i: Job(reg.align_globally, args) for i, args in todo.items()}, aligned, not_aligned)
            for a in atlases:
                if a.image_id not in todo:
                    tick()
            by = self.settings.rank_by
            ranked = sorted((a for a in atlases if aligned_key(a) in self._alignments),
                            key=lambda a: -self._alignments[aligned_key(a)].rank(by))
            chosen = ranked[:keep]
            logger.info("atlas selection: kept %s of %d atlases (correlation after the global affine, %s: %s)",
                        [a.image_id for a in chosen], len(atlases), "whole images" if by == "image" else
                        "the region of their structures", [round(self._alignments[aligned_key(a)].rank(by), 3) for a in chosen])
        seconds["select"] = time.perf_counter() - t0

        # 2. register the chosen atlases (cached per query, atlas, labels and plan).
        t0 = time.perf_counter()
        candidates: dict[str, reg.Candidate | None] = {}
        todo, reused = {}, set()
        for a in chosen:
            key = registered_key(a)
            hit, candidate = self._cache.get(key)
            if hit:
                candidates[a.image_id] = candidate
                reused.add(a.image_id)
                tick()
            else:
                todo[a.image_id] = (query, spacing, a, labels, plan, self._alignments.get(aligned_key(a)), orders[a.image_id])
        logger.info("atlas transfer: %d atlas(es) to register, %d reused, %d worker(s); query %s at %s mm",
                    len(todo), len(reused), self.settings.workers, query.shape, tuple(round(s, 2) for s in spacing))
        keys = {a.image_id: registered_key(a) for a in chosen}
        chosen_by_id = {a.image_id: a for a in chosen}

        def registered(image_id, candidate, why: str = "none of its labels reaches this scan"):
            candidates[image_id] = candidate
            if candidate is not None:  # a failure is retried next time (and "reaches nothing" is cheap to redo)
                try:
                    candidate.similarity = registered_similarity(query[candidate.box], candidate.image,
                                                                 candidate.probabilities, spacing)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: unscored (kept), not the scan lost
                    logger.warning("atlas %s: no registered similarity (%s: %s); it is fused unscreened",
                                   image_id, type(exc).__name__, exc)
                self._cache.put(keys[image_id], candidate)
                # Its global affine too: an engine that registers differently after it (another deformable or
                # in-plane setting, as the points of an eval --select grid) starts from it.
                remember(chosen_by_id[image_id], candidate.alignment)
            tick()
            if candidate is None:
                logger.info("atlas %s left out (%d/%d): %s", image_id, done, steps, why)
                return
            logger.info("atlas %s registered in %.1f s of work (%d/%d)%s (%s)", image_id, candidate.seconds, done, steps,
                        ", slices reversed" if candidate.alignment.reversed_slices else "",
                        ", ".join(f"{k} {v:.1f} s" for k, v in candidate.stages.items()))

        # Each atlas is two kinds of job: its 3D stages, then one per slice shift of the in-plane
        # step, queued as the 3D stages end, so that both workers stay busy to the last shift (a
        # lone atlas's shifts run side by side) rather than one atlas's whole chain per worker.
        placed: dict[str, tuple[reg.Placed, dict]] = {}

        def stage_done(key, result):
            stage, image_id = key[0], key[1]
            if stage == "place":
                if result is None or not result.shifts:
                    registered(image_id, None if result is None else reg.finish_atlas(result, {}))
                    return None
                placed[image_id] = (result, {})
                return {("refine", image_id, shift): Job(reg.refine_shift, args)
                        for shift, args in result.refinements(query, plan.in_plane).items()}
            if image_id not in placed:  # another of its shifts failed: the atlas is already left out
                return None
            atlas_placed, refined = placed[image_id]
            refined[key[2]] = result
            if len(refined) == len(atlas_placed.shifts):
                del placed[image_id]
                try:
                    candidate = reg.finish_atlas(atlas_placed, refined)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this atlas only, not the scan
                    stage_failed(("finish", image_id), exc)
                    return None
                registered(image_id, candidate)
            return None

        def stage_failed(key, exc: BaseException) -> None:
            stage = {"place": "3D", "refine": "in-plane"}.get(key[0], "final")
            logger.warning("atlas %s: %s(%s) in its %s stage; left out of this segmentation",
                           key[1], type(exc).__name__, exc, stage)
            if key[0] != "refine" or placed.pop(key[1], None) is not None:
                registered(key[1], None, f"its {stage} stage failed")

        self._run({("place", i): Job(reg.place_atlas, args) for i, args in todo.items()}, stage_done, stage_failed)
        for image_id in list(placed):  # cannot happen unless a job went missing: say so rather than drop it silently
            stage_failed(("refine", image_id), RuntimeError("its in-plane jobs did not all come back"))
        seconds["register"] = time.perf_counter() - t0

        # 3. screen: an atlas that registered far worse than the best is left out (transfer/screen.py).
        registered_atlases = [a for a in chosen if candidates.get(a.image_id) is not None]
        left_out = screened({a.image_id: candidates[a.image_id].similarity for a in registered_atlases},
                            {a.image_id: {v for v in labels if v in a.components} for a in registered_atlases},
                            self.settings.screen)
        if left_out:
            logger.info("atlas screen: left %s out of the fusion (correlation within their structures after registration "
                        "%s, more than %.3g below the best, %.3f)", sorted(left_out),
                        [round(candidates[i].similarity, 3) for i in sorted(left_out)], self.settings.screen.margin,
                        max(c.similarity for c in candidates.values() if c is not None and c.similarity is not None))
        holders = [a for a in registered_atlases if a.image_id not in left_out]
        used = [candidates[a.image_id] for a in holders]

        # 4. fuse, 5. keep the atlases' pieces.
        probs = np.zeros((len(labels),) + query.shape, np.float32)
        for v in labels:
            if not any(v in a.components for a in holders):
                logger.warning("label %s: none of the atlases used holds it, so it is not segmented", v)
        if used:
            t0 = time.perf_counter()
            box = tuple(slice(min(c.box[d].start for c in used), max(c.box[d].stop for c in used)) for d in range(3))
            fused = self._fuse(query, spacing, box, used, holders, labels, fusion)
            seconds["fuse"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            counts = [a.components for a in holders]
            expected = {v: expected_pieces(counts, v) for v in labels}
            kept = keep_pieces(fused, labels, expected, self.label_decision)
            seconds["pieces"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            convex = self._solidities.convex_labels(holders, labels, self.settings.shape.min_solidity)
            if convex:
                logger.info("labels %s are convex in plane in the atlases: made convex per slice", convex)
            shaped = make_convex(kept, labels, convex, self.label_decision, float(spacing[1] * spacing[2]))
            seconds["shape"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            probs[(slice(None),) + box] = self._limit_extent(shaped, labels, holders, candidates, float(spacing[0]), box[0].start)
            seconds["extent"] = time.perf_counter() - t0
        tick()
        uses = []
        for a in chosen:
            c = candidates.get(a.image_id)
            alignment = c.alignment if c is not None else self._alignments.get(aligned_key(a))
            score = alignment.rank(self.settings.rank_by) if alignment else None
            # None, not -inf, for an atlas whose structures missed the query: the provenance sidecar is strict JSON
            uses.append(AtlasUse(image_id=a.image_id, similarity=score if score is not None and np.isfinite(score) else None,
                                 reversed_slices=bool(alignment and alignment.reversed_slices),
                                 seconds=0.0 if a.image_id in reused or c is None else c.seconds, reused=a.image_id in reused,
                                 registered_similarity=None if c is None else c.similarity,
                                 fused=c is not None and a.image_id not in left_out))
        slices = [SliceResult(probabilities=probs[:, z], object_scores=object_scores(probs[:, z])) for z in range(len(query))]
        return VolumeResult(labels=labels, slices=slices, seconds=seconds, atlases=uses)

    def _limit_extent(self, probabilities: np.ndarray, labels: Sequence[int], holders: Sequence[Atlas],
                      candidates: Mapping[str, "reg.Candidate | None"], query_slice_mm: float, first_slice: int) -> np.ndarray:
        """Each label cut to the extent its atlases allow (transfer/extent.py), when the step is on
        (``probabilities``: the fused box, whose first slice is the query's ``first_slice``)."""
        if self.settings.extent.method == "none":
            return probabilities
        profiles = {int(v): [(self._profiles.of(a, v), candidates[a.image_id].alignment.reversed_slices)
                             for a in holders if v in a.components] for v in labels}
        out, cut = limit_extent(probabilities, labels, profiles, query_slice_mm, self.label_decision,
                                self.settings.extent.slack, self.settings.extent.length)
        for value, (first, last) in cut.items():
            logger.info("label %s ran past the extent its atlases allow: kept to slices %d-%d",
                        value, first + first_slice, last + first_slice)
        if self.settings.extent.relative:
            atlases = [AtlasProfiles({int(v): self._profiles.of(a, v) for v in labels if v in a.components},
                                     candidates[a.image_id].alignment.reversed_slices) for a in holders]
            out, cut = relative_ends(out, labels, atlases, query_slice_mm, self.label_decision)
            for value, (first, last) in cut.items():
                logger.info("label %s ran past where its atlases end it against the other labels: kept to slices %d-%d",
                            value, first + first_slice, last + first_slice)
        return out

    @property
    def chooses_by_bank(self) -> bool:
        return self.settings.fusion.correlation == "bank"

    def prepare_bank(self, atlases: Sequence[Atlas], labels: Sequence[int], keep: int) -> dict[str, float]:
        """The fusion measure of this bank chosen ahead of its next query (``Engine.prepare_bank``). -> seconds."""
        labels = tuple(int(v) for v in labels)
        return {"choose_fusion": self._fusion_for(atlases, labels, keep)[1]}

    def _fusion_for(self, atlases: Sequence[Atlas], labels: tuple[int, ...], keep: int) -> tuple[FusionSettings, float]:
        """The preset's fusion, its search measure chosen by those of these atlases that hold any of ``labels``
        when it says ``bank`` (transfer/fusion_choice.py). -> (fusion, seconds the choice took)."""
        preset = self.settings.fusion
        if fusion_rule(preset.correlation) is not None:  # a number: correlation from that many atlases fused on
            holding = sum(1 for a in atlases if set(a.labels) & set(labels))
            return replace(preset, correlation=measure_for(preset.correlation, min(keep, holding))), 0.0
        if preset.correlation != "bank":
            return preset, 0.0
        if preset.method != "joint":
            return replace(preset, correlation=False), 0.0

        def segment(atlas: Atlas, others: list[Atlas], correlation: bool) -> np.ndarray:
            result = self.segment_with_atlases(atlas.image, atlas.spacing, others, labels, keep, f"atlas-{atlas.key}",
                                               directions=atlas.directions, fusion=replace(preset, correlation=correlation))
            values = np.asarray((0,) + tuple(result.labels), np.int64)
            return values[self.label_decision.decide(np.stack([s.probabilities for s in result.slices], axis=1)) + 1]

        holding = [a for a in atlases if set(a.labels) & set(labels)]
        choice = self._choices.choose(holding, labels, self._choice_key, keep, segment)
        return replace(preset, correlation=choice.correlation), choice.seconds

    def _merged(self, query: np.ndarray, c: reg.Candidate, fusion: FusionSettings) -> tuple[np.ndarray, np.ndarray]:
        votes = c.votes()
        return merge_variants(query[c.box], np.stack([i for i, _ in votes]), np.stack([p for _, p in votes]),
                              fusion.patch_radius, fusion.beta)

    def _fuse(self, query: np.ndarray, spacing, box, used: Sequence[reg.Candidate], holders: Sequence[Atlas],
              labels: tuple[int, ...], fusion: FusionSettings | None = None) -> np.ndarray:
        """(L, box) fused probabilities. Each label is fused over the atlases that hold it (an atlas
        without a label abstains on it rather than voting background), labels held by the same atlases
        together; where some atlas's registered region does not reach, the atlases that do reach it
        vote by their mean (joint fusion needs every atlas's patch, and a missing one cannot be faked)."""
        fusion = fusion or self.settings.fusion
        shape = tuple(s.stop - s.start for s in box)
        # Every vote: an atlas's registered result and its slice-shifted variants (in_plane.slice_shifts),
        # or with fusion.shifted_votes local one vote per atlas, its variants merged first.
        if fusion.shifted_votes == "local":
            entries = [(c, *self._merged(query, c, fusion), atlas) for c, atlas in zip(used, holders)]
        else:
            entries = [(c, image, p, atlas) for c, atlas in zip(used, holders) for image, p in c.votes()]
        holders = [atlas for *_, atlas in entries]
        images = np.zeros((len(entries),) + shape, np.float32)
        votes = np.zeros((len(entries), len(labels)) + shape, np.float32)
        covered = np.zeros((len(entries),) + shape, bool)
        for i, (c, image, p, _) in enumerate(entries):
            inner = tuple(slice(c.box[d].start - box[d].start, c.box[d].stop - box[d].start) for d in range(3))
            images[(i,) + inner] = image
            votes[(i, slice(None)) + inner] = p
            covered[(i,) + inner] = True
        out = np.zeros((len(labels),) + shape, np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for channel, v in enumerate(labels):
            who = tuple(i for i, a in enumerate(holders) if v in a.components)
            if who:
                groups.setdefault(who, []).append(channel)
        everywhere = covered.all(axis=0)
        for who, channels in groups.items():
            index = np.asarray(who)
            every = len(who) == len(entries)  # no copies of the (large) votes then: the usual case
            mine = votes if every and len(channels) == len(labels) else votes[np.ix_(index, channels)]
            reach = covered if every else covered[index]
            fused = fuse(query[box], images if every else images[index], mine, spacing, fusion)
            outside = ~reach.all(axis=0)
            if outside.any():  # the mean of the atlases that reach there
                count = reach[:, outside].sum(axis=0)
                fused[:, outside] = np.where(count > 0, mine[:, :, outside].sum(axis=0) / np.maximum(count, 1), 0.0)
            out[channels] = fused
        if not everywhere.all():
            logger.debug("fusion: %.1f%% of the union box is outside some atlas's region (mean vote there)",
                         100 * (1 - everywhere.mean()))
        return out
