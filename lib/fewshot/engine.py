"""The engine: a preset's embedder, matcher and transfer step composed around a SupportBank.

``Engine.ingest`` turns a labelled volume into bank entries (slices, augmented copies, embeddings,
cached transfer payloads, and for scan-level transfers the whole canvas volume: the atlas).
``Engine.segment`` runs retrieve -> match -> transfer on a new volume and returns a label with the
input's exact geometry, plus provenance and timings. A scan-level transfer (``scope = "scan"``,
multi-atlas) is handed whole labelled scans instead of per-slice supports: the engine offers it the
atlases its descriptor index finds closest to the query (``selection.candidates``), and the
transfer keeps the ``selection.keep`` best after aligning them.

What a call takes and returns lives in ``fewshot.segmentation``, provenance in ``fewshot.provenance``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import numpy as np

from fewshot.annotation import Annotation
from fewshot.atlas_offer import choice_atlases, offered_atlases
from fewshot.bank import SupportBank
from fewshot.bank_index import IndexSettings
from fewshot.bank_shards import SliceBatch
from fewshot.config import settings_hash
from fewshot.decision import LabelDecision
from fewshot.files import file_stamp, same_content
from fewshot.provenance import atlas_provenance, slice_provenance
from fewshot.segmentation import (
    IngestReport,
    PreparedVolume,
    SegmentOptions,
    Segmentation,
    partition,
    within_wall,
)
from fewshot.settings import EngineSettings
from fewshot.types import Atlas, Embedder, LabelTransfer, Matcher, Progress, SlicePlan
from fewshot.volume import (
    CANVAS_VERSION,
    Volume,
    VolumeError,
    canvas_to_label,
    label_to_canvas,
    read_label,
    read_volume,
    volume_to_canvas,
)

logger = logging.getLogger(__name__)


def _evenly_spaced(items: Sequence[int], count: int) -> list[int]:
    if count < 0 or count >= len(items):
        return list(items)
    if count == 0:
        return []
    picks = np.linspace(0, len(items) - 1, count).round().astype(int)
    return [items[i] for i in sorted(set(picks.tolist()))]


class Engine:
    def __init__(
        self,
        settings: Mapping,
        embedder: Embedder,
        matcher: Matcher | None,
        transfer: LabelTransfer,
        bank: SupportBank,
        label_names: Mapping[str, int] | None = None,
    ):
        self.settings = dict(settings)
        self.embedder = embedder
        self.matcher = matcher
        self.transfer = transfer
        self.bank = bank
        self.label_names = dict(label_names or {})
        self.config = EngineSettings.from_settings(self.settings)  # checked once, before any work
        self._prepared: OrderedDict[str, tuple[PreparedVolume, np.ndarray]] = OrderedDict()
        self._prepared_lock = threading.Lock()
        # Finished segmentations keyed by (volume, bank generation, labels, settings): asking again for the same
        # image against an unchanged bank (a viewer re-running inference) costs nothing.
        self._results: OrderedDict[tuple, Segmentation] = OrderedDict()

    # ------------------------------------------------------------------ construction

    @staticmethod
    def bank_fingerprint(settings: Mapping, embedder: Embedder, transfer: LabelTransfer) -> str:
        """What bank entries depend on: a change to any of these makes old entries meaningless."""
        bank = settings.get("bank", {})
        shaped = settings_hash(
            {"canvas_version": CANVAS_VERSION},
            settings.get("volume", {}),
            {k: bank.get(k) for k in ("negatives_per_image", "augmentations_per_slice", "augmentation")},
            settings.get("embedder", {}),
        )
        return f"{embedder.name}+{transfer.fingerprint()}+{shaped}"

    @classmethod
    def from_settings(
        cls,
        settings: Mapping,
        bank_dir: str | os.PathLike | Callable[[str], str | os.PathLike] | None = None,
        models_dir: str | os.PathLike | None = None,
        label_names: Mapping[str, int] | None = None,
        read_only: bool = False,
        pinned: bytes | None = None,
        verify: str = "sha256",
    ) -> tuple["Engine", object]:
        """Build the preset's steps and open (or create) its bank. Returns (engine, bank LoadReport).

        ``read_only``: the bank is only looked at (a mismatched or damaged bank is reported, not discarded).
        ``pinned``, ``verify``: a reader of one committed bank state (see ``SupportBank``), for batches."""
        from fewshot.presets import build_steps

        embedder, matcher, transfer = build_steps(settings, models_dir=models_dir)
        index = IndexSettings.from_settings(settings.get("bank", {}))
        fingerprint = cls.bank_fingerprint(settings, embedder, transfer)
        if callable(bank_dir):  # chosen from the fingerprint (the CLI: the shared bank, or one of its own)
            bank_dir = bank_dir(fingerprint)
        bank, report = SupportBank.open(
            bank_dir,
            fingerprint,
            index_transform=embedder.index_transform,
            approximate_above=index.approximate_above,
            hnsw_m=index.hnsw_m,
            hnsw_ef_search=index.hnsw_ef_search,
            read_only=read_only,
            pinned=pinned,
            verify=verify,
        )
        return cls(settings, embedder, matcher, transfer, bank, label_names), report

    def _call_settings(self, options: SegmentOptions | None) -> tuple[Mapping, EngineSettings]:
        """The settings one call runs with, as the preset gives them and typed."""
        if options is None:
            return self.settings, self.config
        settings = options.applied_to(self.settings)
        return settings, EngineSettings.from_settings(settings)

    # ------------------------------------------------------------------ labels

    def label_values(self, extra: Sequence[int] = ()) -> list[int]:
        return sorted(set(self.label_names.values()) | set(self.bank.label_values) | {int(v) for v in extra})

    def name_of(self, value: int) -> str:
        for name, v in self.label_names.items():
            if v == value:
                return name
        return str(value)

    # ------------------------------------------------------------------ volumes

    def prepare(self, image: str | os.PathLike | Volume) -> PreparedVolume:
        volume = image if isinstance(image, Volume) else read_volume(image)
        canvas, geometry = volume_to_canvas(volume, self.config.volume)
        if len(canvas) < 1:
            raise VolumeError(f"{volume.path}: no slices along the slicing axis")
        key = f"{volume.content_hash()}-{settings_hash(self.settings.get('volume', {}))}"
        return PreparedVolume(volume, canvas, geometry, key)

    def _prepared_with_embeddings(self, image) -> tuple[PreparedVolume, np.ndarray]:
        """Canvas slices and their embeddings, cached per volume content for interactive reuse."""
        prepared = self.prepare(image)
        with self._prepared_lock:
            hit = self._prepared.get(prepared.key)
            if hit is not None:
                self._prepared.move_to_end(prepared.key)
                return prepared, hit[1]
        embeddings = self.embedder.embed(prepared.canvas)
        with self._prepared_lock:
            self._prepared[prepared.key] = (prepared, embeddings)
            while len(self._prepared) > int(self.settings.get("transfer", {}).get("feature_cache", 4)):
                self._prepared.popitem(last=False)
        return prepared, embeddings

    def forget_caches(self) -> None:
        """Drop every per-volume cache (prepared volumes and their embeddings, finished segmentations,
        the transfer step's image features), so that the next call runs cold, as timing runs need."""
        with self._prepared_lock:
            self._prepared.clear()
        self.forget_results()
        forget = getattr(self.transfer, "forget_caches", None)
        if forget is not None:
            forget()

    def warm(self) -> dict[str, float]:
        """Start now what the first segmentation would otherwise start on its own clock (the transfer
        step's worker processes and compiled loops). -> seconds of each part; {} when the step has none."""
        warm = getattr(self.transfer, "warm", None)
        return warm() if warm is not None else {}

    def forget_results(self) -> None:
        """Drop the finished segmentations only: the next call redoes the transfer on cached features."""
        with self._prepared_lock:
            self._results.clear()

    def embed_volume(self, image) -> np.ndarray:
        """Per-slice embeddings of a volume (Z, D), e.g. for active learning."""
        return self._prepared_with_embeddings(image)[1]

    # ------------------------------------------------------------------ growing the bank

    def support_batch(self, image_id: str, prepared: PreparedVolume, masks: np.ndarray, label_values: Sequence[int],
                      annotated: set[int] | None = None, negatives: bool = True,
                      annotated_labels: Sequence[int] | None = None) -> SliceBatch:
        """Canvas slices + masks -> bank entries: positives, sampled negatives, augmented copies, embeddings, payloads.
        ``annotated``: the canvas slices a person annotated (None: all); the others never become entries.
        ``negatives``: False when some labels were not annotated (an empty slice may hold them).
        ``annotated_labels``: the label values a person annotated (None: all). A payload then says,
        per entry and label, whether the entry speaks for that label (``label_annotated``)."""
        from fewshot.bank_augment import augment_support

        entries = self.config.entries
        canvas = prepared.canvas
        slices = [z for z in range(len(masks)) if annotated is None or z in annotated]
        positive = [z for z in slices if masks[z].any()]
        negative = [z for z in slices if not masks[z].any()] if negatives else []
        negative = _evenly_spaced(negative, entries.negatives_per_image)
        images, out_masks, index, augmentation = [], [], [], []
        # Entries record the file's own slice number, so provenance names a slice a user can open.
        file_slice = prepared.geometry.file_slice
        for z in sorted(positive + negative):
            images.append(canvas[z])
            out_masks.append(masks[z])
            index.append(file_slice(z))
            augmentation.append("")
        n_aug = entries.augmentations_per_slice
        aug_params = entries.augmentation
        seed = int(aug_params.get("seed", 0))
        for z in positive if n_aug > 0 else []:
            # Seeded by image and slice: re-ingesting the same label gives the same bank.
            digest = hashlib.sha256(f"{seed}:{image_id}:{z}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            for aug in augment_support(canvas[z], masks[z], n_aug, aug_params, rng):
                images.append(aug.image)
                out_masks.append(aug.mask)
                index.append(file_slice(z))
                augmentation.append(aug.description)
        images_arr = np.stack(images).astype(np.float32)
        masks_arr = np.stack(out_masks).astype(np.uint16)
        embeddings = self.embedder.embed(images_arr)
        payload = self.transfer.encode_supports(images_arr, masks_arr, list(label_values))
        if payload:
            # A label left unannotated is empty on a slice that may hold it: its memory there would say
            # "absent" for nobody's reason. What a mask holds was painted, so it speaks either way.
            known = None if annotated_labels is None else {int(v) for v in annotated_labels}
            payload["label_annotated"] = np.array(
                [[known is None or int(v) in known or bool((m == v).any()) for v in label_values] for m in masks_arr],
                dtype=bool).reshape(len(masks_arr), len(label_values))
        return SliceBatch(
            images=images_arr, masks=masks_arr, embeddings=embeddings,
            slice_index=np.asarray(index, np.int32), augmentation=augmentation,
            payload=payload, payload_labels=tuple(int(v) for v in label_values),
            atlas=self.atlas_of(image_id, prepared, masks) if self.scan_level else None,
        )

    @property
    def scan_level(self) -> bool:
        """True when the transfer registers whole labelled scans (multi-atlas), not slices."""
        return getattr(self.transfer, "scope", "slice") == "scan"

    @staticmethod
    def atlas_of(image_id: str, prepared: PreparedVolume, masks: np.ndarray) -> Atlas:
        """The whole labelled scan as the bank caches it: what does not depend on any query."""
        from fewshot.transfer.pieces import count_pieces

        image = np.asarray(prepared.canvas, np.float16)  # the bank stores float16: in memory too, so both agree
        mask = np.ascontiguousarray(masks, np.uint16)
        geometry = prepared.geometry
        key = hashlib.sha256(image.tobytes() + mask.tobytes() + repr((geometry.spacing, geometry.directions)).encode()).hexdigest()[:24]
        return Atlas(image_id=image_id, image=image, mask=mask, spacing=geometry.spacing,
                     components=count_pieces(mask), key=key, axis=int(geometry.axis), directions=geometry.directions)

    def ingest(
        self,
        image_id: str,
        image_path: str | os.PathLike,
        label_path: str | os.PathLike,
        allowed_labels: Sequence[int] | None = None,
        source: Mapping | None = None,
        annotation: Annotation | None = None,
    ) -> IngestReport:
        """Add (or replace) all slices of one labelled image. Validates before touching the bank.
        ``annotation``: the part a person annotated, for a partial label (only those slices enter)."""
        start = time.perf_counter()
        # Stamped before reading: a file changed during ingestion then looks stale, never fresh.
        src = {"image": str(image_path), "label": str(label_path)}
        for path, prefix in ((image_path, "image"), (label_path, "label")):
            if not os.path.exists(path):
                raise VolumeError(f"{path}: no such file")
            try:
                src.update(file_stamp(path, prefix))
            except OSError as exc:
                raise VolumeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        volume = read_volume(image_path)
        label = read_label(label_path, volume, allowed_labels)
        present = sorted(int(v) for v in np.unique(label) if v)
        prepared = self.prepare(volume)
        masks = label_to_canvas(label, prepared.geometry)
        label_values = self.label_values(present)
        annotated = None
        if annotation is not None and annotation.partial:
            geometry = prepared.geometry
            in_file = annotation.check(label.shape).file_slices(label.shape, geometry.file_axis)
            annotated = None if in_file is None else {z for z in range(len(masks)) if geometry.file_slice(z) in in_file}
            if annotated is not None and not annotated:
                raise VolumeError(f"{label_path}: no slice along the engine's slicing axis (file axis {geometry.file_axis}) was "
                                  f"wholly annotated (annotated slices along axis {annotation.axis}: {len(annotation.slices)})")
            src["annotation"] = annotation.as_dict()
        # Labels left unannotated may lie on any slice: then no slice is known to be organ-free.
        negatives = annotation is None or annotation.labels is None
        batch = self.support_batch(image_id, prepared, masks, label_values, annotated, negatives,
                                   None if annotation is None else annotation.labels)
        src["slice_axis"] = prepared.geometry.file_axis  # the file array axis entries' slice numbers run along
        src.update(source or {})
        self.bank.put(image_id, batch, src)
        n_pos = sum(1 for a, m in zip(batch.augmentation, batch.masks) if not a and m.any())
        n_aug = sum(1 for a in batch.augmentation if a)
        report = IngestReport(
            image_id=image_id, slices=len(batch.images), positive_slices=n_pos,
            negative_slices=len(batch.images) - n_pos - n_aug, augmented_slices=n_aug,
            labels=present, seconds=round(time.perf_counter() - start, 3),
        )
        logger.info(
            "ingested %r: %d slices (%d labelled, %d negative, %d augmented) in %.1f s",
            image_id, report.slices, report.positive_slices, report.negative_slices, n_aug, report.seconds,
        )
        return report

    def remove(self, image_id: str) -> bool:
        return self.bank.remove(image_id)

    def stale_images(self, sources: Mapping[str, tuple[str, str]],
                     annotation_of: Callable[[str], Annotation] | None = None) -> dict[str, str]:
        """Images whose bank entries do not reflect their current image and label: id -> reason.
        ``annotation_of``: the annotated part of each image's label as its datastore records it; an
        entry made for another part (say, as complete, before the save was known to be partial) is stale."""
        self.bank.refresh()
        stale = {}
        # Memories are needed for labels some image actually holds; a configured name with no
        # example anywhere (yet) must not make the whole bank stale.
        wanted = set(self.bank.label_values)
        for image_id, (image_path, label_path) in sources.items():
            if image_id not in self.bank:
                stale[image_id] = "not in the bank"
                continue
            record = self.bank.record(image_id)
            try:
                if not same_content(record["source"], "label", label_path):
                    stale[image_id] = "label changed since it was ingested"
                elif not same_content(record["source"], "image", image_path):
                    stale[image_id] = "image changed since it was ingested"
                elif record["payload"] and not wanted <= set(record["payload_labels"]):
                    stale[image_id] = f"no cached memories for labels {sorted(wanted - set(record['payload_labels']))}"
                elif self.scan_level and not record.get("atlas"):
                    stale[image_id] = "no atlas volume cached"
                elif self.scan_level and not record["atlas"].get("directions"):
                    stale[image_id] = "no slice directions recorded with its atlas (ingested before 3 December 2026)"
            except OSError as exc:
                stale[image_id] = f"cannot be read ({exc})"
            if image_id not in stale and annotation_of is not None:
                recorded = Annotation.from_dict(record["source"].get("annotation"))
                current = annotation_of(image_id)
                if (recorded.slices, recorded.axis, recorded.labels) != (current.slices, current.axis, current.labels):
                    stale[image_id] = "annotated part of its label changed since it was ingested"
        return stale

    def reconcile(self, sources: Mapping[str, tuple[str, str]], progress: Progress | None = None,
                  annotation_of: Callable[[str], Annotation] | None = None) -> dict:
        """Make the bank match ``sources`` (image id -> (image path, final label path)).

        Entries of images without a final label are removed; missing or stale ones are (re)ingested.
        ``annotation_of``: the annotated part of each label (complete when not given); a partial
        label enters with only its annotated slices and labels, as when the app ingests a save.
        One bad file is reported and skipped; it never stops the others.
        """
        annotation_of = annotation_of or (lambda image_id: Annotation())
        removed = [i for i in self.bank.image_ids() if i not in sources]
        for image_id in removed:
            self.bank.remove(image_id)
        stale = self.stale_images(sources, annotation_of)
        done, failed = [], {}
        todo = sorted(stale.items())
        for n, (image_id, reason) in enumerate(todo, 1):
            logger.info("reconcile %d/%d: ingesting %r (%s)", n, len(todo), image_id, reason)
            image_path, label_path = sources[image_id]
            labels_before = set(self.bank.label_values)
            try:
                self.ingest(image_id, image_path, label_path, annotation=annotation_of(image_id))
                done.append(image_id)
            except Exception as exc:  # one bad file (or a bug it triggers) must not stop the others
                failed[image_id] = str(exc) or type(exc).__name__
                logger.error("reconcile: %r skipped: %s", image_id, failed[image_id],
                             exc_info=not isinstance(exc, (VolumeError, OSError)))
            if set(self.bank.label_values) - labels_before:
                # A label value new to the bank: images ingested before it need its (absent) memories.
                again = {i: r for i, r in self.stale_images({i: sources[i] for i in done}, annotation_of).items()
                         if i != image_id}
                todo.extend(sorted(again.items()))
            if progress:
                progress(n, len(todo))
        done = sorted(set(done))
        return {"removed": removed, "ingested": done, "failed": failed, "kept": sorted(set(sources) - set(stale) - set(failed))}

    # ------------------------------------------------------------------ segmenting

    def plan(self, prepared: PreparedVolume, embeddings: np.ndarray, labels: Sequence[int],
             options: SegmentOptions | None = None) -> tuple[list[SlicePlan], dict]:
        """Retrieve top-K per slice, re-rank with the matcher, keep k: one SlicePlan per slice.

        Candidates are ranked on their ids and images only; payloads (SAM 2 memories, MBs each)
        are read for the k kept supports alone.
        """
        _, config = self._call_settings(options)
        matcher = self.matcher if options is None or options.matching else None
        keep = config.selection.keep
        # One support per source slice: the best-matching of a slice and its augmented copies.
        distinct = config.selection.distinct_sources
        top_k = max(config.retrieval.top_k, keep)
        timings = {"retrieve": 0.0, "match": 0.0}
        t0 = time.perf_counter()
        scores, rows = self.bank.search(embeddings, top_k)
        timings["retrieve"] = time.perf_counter() - t0
        wanted = [int(v) for v in labels]
        covered = {image_id: self.bank.payload_covers(image_id, wanted) for image_id in {r[0] for line in rows for r in line}}
        if not all(covered.values()):
            logger.warning("some bank entries lack cached memories for labels %s: reconcile the bank", wanted)
        plans: list[SlicePlan] = []
        for z in range(len(prepared.canvas)):
            ranked = [(row, float(s)) for s, row in zip(scores[z], rows[z]) if covered[row[0]]]
            distances: list[float | None] = [None] * len(ranked)
            if matcher is not None and len(ranked) > keep:
                t0 = time.perf_counter()
                dist = matcher.distances(prepared.canvas[z], self.bank.images([row for row, _ in ranked]))
                timings["match"] += time.perf_counter() - t0
                order = np.argsort(dist, kind="stable")
                ranked = [ranked[i] for i in order]
                distances = [float(dist[i]) for i in order]
            chosen, sources = [], set()
            for (row, score), distance in zip(ranked, distances):
                if len(chosen) == keep:
                    break
                if distinct and (source := self.bank.source_slice(row)) in sources:
                    continue  # a slice's augmented copies must not crowd out other examples
                if distinct:
                    sources.add(source)
                support = self.bank.support(row, score, wanted)
                support.match_distance = distance
                chosen.append(support)
            allowed = tuple(v for v in wanted if any(v in c.labels for c in chosen))
            plans.append(SlicePlan(slice_index=z, supports=chosen, labels=allowed))
        return plans, timings

    def resolve_labels(self, requested: Sequence[str | int] | None) -> tuple[dict[str, int], dict[str, str]]:
        """Requested label names/values -> ({name: value} to segment, {name: why skipped})."""
        in_bank = set(self.bank.label_values)
        if requested:
            pairs = {}
            for item in requested:
                if isinstance(item, int) or str(item).isdigit():
                    pairs[self.name_of(int(item))] = int(item)
                elif item in self.label_names:
                    pairs[item] = self.label_names[item]
                else:
                    raise ValueError(f"unknown label {item!r}; known: {sorted(self.label_names) or sorted(in_bank)}")
        else:
            pairs = {self.name_of(v): v for v in self.label_values()}
        chosen = {n: v for n, v in pairs.items() if v in in_bank}
        skipped = {n: "no labelled example in the support bank yet" for n, v in pairs.items() if v not in in_bank}
        return chosen, skipped

    def segment(
        self,
        image: str | os.PathLike | Volume,
        labels: Sequence[str | int] | None = None,
        progress: Progress | None = None,
        options: SegmentOptions | None = None,
    ) -> Segmentation:
        """``options``: this call's retrieval knobs (default: the preset's)."""
        t_start = time.perf_counter()
        settings, config = self._call_settings(options)
        matching = self.matcher is not None and (options is None or options.matching)
        self.bank.refresh()  # another process may have changed the bank: its generation keys the result cache
        chosen, skipped = self.resolve_labels(labels)
        for name, why in skipped.items():
            logger.info("label %r skipped: %s", name, why)
        t0 = time.perf_counter()
        prepared, embeddings = self._prepared_with_embeddings(image)
        timings = {"prepare_and_embed": time.perf_counter() - t0}
        values = list(chosen.values())
        result_key = (prepared.key, self.bank.generation, tuple(values), settings_hash(settings), self.label_decision,
                      matching)
        with self._prepared_lock:
            cached = self._results.get(result_key)
        if cached is not None:
            logger.info("segmentation of %s reused: same volume, same bank, same labels", prepared.volume.path)
            timings = partition(timings, time.perf_counter() - t_start)
            timings.update(slices=cached.timings.get("slices", 0), reused=True)
            return Segmentation(cached.label.copy(), prepared.volume, dict(cached.labels), cached.provenance,
                                timings, dict(skipped))
        if not values:
            label = np.zeros(prepared.volume.shape, np.uint16)
            return Segmentation(label, prepared.volume, {}, {}, partition(timings, time.perf_counter() - t_start), skipped)
        t_transfer = time.perf_counter()
        if self.scan_level:
            plans = None
            t0 = time.perf_counter()
            atlases = self.atlases_for(embeddings, values, axis=prepared.geometry.axis)
            timings["retrieve"] = time.perf_counter() - t0
            t_transfer = time.perf_counter()
            result = self.transfer.segment_with_atlases(
                prepared.canvas, prepared.geometry.spacing, atlases, values,
                keep=config.selection.keep,
                cache_key=prepared.key, progress=progress, directions=prepared.geometry.directions,
                **({"choice_atlases": self.choice_atlases(values, atlases)}
                   if getattr(self.transfer, "chooses_by_bank", False) else {}),
            )
        else:
            plans, plan_timings = self.plan(prepared, embeddings, values, options)
            timings.update(plan_timings)
            t_transfer = time.perf_counter()
            result = self.transfer.segment_volume(prepared.canvas, plans, values, cache_key=prepared.key, progress=progress)
        for stage, seconds in within_wall(result.seconds, time.perf_counter() - t_transfer).items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        t0 = time.perf_counter()
        probs = np.stack([s.probabilities for s in result.slices]) if result.slices else np.zeros((0, len(values)))
        decision = self.label_decision
        label = canvas_to_label(probs, result.labels, prepared.geometry, decision)
        timings["postprocess"] = time.perf_counter() - t0
        provenance = (atlas_provenance(self.bank, result, chosen, prepared.geometry, decision) if plans is None
                      else slice_provenance(self.bank, plans, result, chosen, prepared.geometry, decision))
        timings = partition(timings, time.perf_counter() - t_start)
        timings["slices"] = len(prepared.canvas)
        segmentation = Segmentation(label, prepared.volume, chosen, provenance, timings, skipped,
                                    busy={k: float(v) for k, v in result.seconds.items()},
                                    computed_slices=sum(not getattr(s, "reused", False) for s in result.slices))
        with self._prepared_lock:
            self._results[result_key] = segmentation
            while len(self._results) > int(self.settings.get("transfer", {}).get("feature_cache", 4)):
                self._results.popitem(last=False)
        return segmentation

    @property
    def keep(self) -> int:
        """Supports kept per query slice, or atlases per query scan for a scan-level transfer."""
        return self.config.selection.keep

    def atlases_for(self, embeddings: np.ndarray, labels: Sequence[int] = (), axis: int | None = None) -> list[Atlas]:
        """The bank's atlases offered to a scan-level transfer for one query (atlas_offer.offered_atlases)."""
        return offered_atlases(self.bank, embeddings, labels, axis, self.config.selection.candidates)

    def choice_atlases(self, labels: Sequence[int], loaded: Sequence[Atlas] = ()) -> list[Atlas]:
        """The atlases a bank's choices are made by (atlas_offer.choice_atlases)."""
        return choice_atlases(self.bank, labels, self.config.selection.keep, loaded)

    def prepare_bank(self) -> dict[str, float]:
        """Work that depends on the bank and on no query, done ahead of the next query (the app's bank worker
        runs it after each change): ``classic``'s fusion measure, with ``fusion.correlation: bank``. -> seconds."""
        prepare = getattr(self.transfer, "prepare_bank", None)
        if prepare is None or not getattr(self.transfer, "chooses_by_bank", False):
            return {}
        values = sorted(self.resolve_labels(None)[0].values())
        return prepare(self.choice_atlases(values), values, self.config.selection.keep)

    @property
    def label_decision(self) -> LabelDecision:
        """How the transfer step's probabilities become labels: its own rule where it has one (label
        fusion's votes are one distribution), else the most probable label above its threshold (SAM 2
        derives that from ``transfer.mask_threshold``; 0.5 for steps that do not say)."""
        own = getattr(self.transfer, "label_decision", None)
        return own if own is not None else LabelDecision(float(getattr(self.transfer, "probability_threshold", 0.5)))
