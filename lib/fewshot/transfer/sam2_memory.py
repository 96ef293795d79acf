"""SAM 2 label transfer: supports become SAM 2 memories once; queries attend to them slice by slice.

How SAM 2 is used here, and where it departs from its video predictor:

* A support slice with its mask is encoded exactly as SAM 2 encodes a frame that received a mask
  prompt (``SAM2Base.track_step`` with ``mask_inputs``: ``_use_mask_as_output`` then
  ``_encode_new_memory``), all labels of the slice batched as objects sharing one image-encoder
  call. A label absent from the slice is encoded from an empty mask, which SAM 2.1 marks with
  ``no_obj_embed_spatial`` and ``no_obj_ptr``: negative supports say "nothing here".
  The bank keeps the result, so a support is never re-encoded at query time.
* A query slice attends to the memories of its k supports, all treated like SAM 2 conditioning
  frames, plus the memories of already-predicted neighbouring slices (the video idea),
  propagating outwards from an anchor slice. Supports are not frames of the query video, so
  instead of SAM 2's dict-of-dicts ``inference_state`` we assemble the memory from small
  :class:`Memory` records (:meth:`Sam2Transfer._condition_on_memories` mirrors
  ``SAM2Base._prepare_memory_conditioned_features``).
* Supports sit where a video's conditioning frames would (``support_positions: video``): just
  before the volume, the best one nearest, so each object pointer has its own temporal distance,
  growing as the propagation moves away from the anchor. The last ``neighbours`` predicted slices
  lend spatial memories and the last ``pointers`` their object pointers (SAM 2: 6 and 15).
* A label runs on a slice when a chosen support holds it or when the slice before it in the
  propagation predicted it present; the object-score head then decides, as in SAM 2's tracker
  where every object runs on every frame. No memory is made up for a label a slice did not run.
* Output masks get SAM2VideoPredictor's hole filling (``fill_hole_area``) on the low-res logits,
  after the slice's memory was encoded from the unfilled ones, as there.

Payload convention (what ``Support.payload`` must hold when it reaches :meth:`segment_volume`):
arrays of ONE support entry, indexed by the ``labels`` argument of ``segment_volume`` (the
pipeline slices the bank's per-entry arrays to that order, see :func:`payload_for_labels`):
``maskmem_features`` (L, mem_dim, h, w) float16, ``obj_ptr`` (L, hidden) float32,
``object_present`` (L,) bool.

Rooms: ``sam2_parts`` (memory records, caches, hole filling, propagation order), ``sam2_networks``
(every call into the SAM 2 networks, support encoding included), this module (the propagation).
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base

from fewshot.transfer.sam2_model import build_sam2_model
from fewshot.transfer.sam2_networks import Sam2Networks, annotated_labels
from fewshot.transfer.sam2_parts import (  # noqa: F401  (the module's public names, re-exported)
    IMAGENET_MEAN, IMAGENET_STD, Memory, PropagationCache, PropagationRecord, QueryFeatureCache,
    SliceMemory, SliceRecord, fill_holes, propagation_order, slice_signature,
)
from fewshot.weights import checkpoint_fingerprint
from fewshot.types import SlicePlan, SliceResult, Support, SupportRef, VolumeResult

logger = logging.getLogger(__name__)

# Bumped whenever encode_supports would produce different arrays for the same weights.
ENCODING_VERSION = 1


class Sam2Transfer(Sam2Networks):
    """LabelTransfer with SAM 2 memories: supports encoded once, queries propagated slice by slice."""

    name = "sam2"

    def __init__(
        self,
        model: SAM2Base,
        settings: dict,
        model_id: str,
        checkpoint_path: Path | None = None,
    ):
        self.model = model.eval()
        self.model_id = model_id
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.image_size = int(settings.get("image_size", model.image_size))
        if self.image_size != model.image_size:
            raise ValueError(
                f"transfer.image_size is {self.image_size} but the model was built for {model.image_size}; "
                "build it with build_sam2_model(..., image_size=...)"
            )
        # SAM 2 has num_maskmem - 1 temporal slots for recent frames, and reads the object pointers of
        # up to max_obj_ptrs_in_encoder - 1 recent frames (pointers are a few tokens each: cheap).
        self.neighbours = max(0, min(int(settings.get("neighbours", 0)), model.num_maskmem - 1))
        self.pointers = max(self.neighbours, min(int(settings.get("pointers", self.neighbours)), model.max_obj_ptrs_in_encoder - 1))
        # Where supports sit in the video SAM 2 sees: "video" (supports are conditioning frames just
        # before the volume, best nearest, so pointer distances are distinct and grow along the
        # propagation, as in SAM2VideoPredictor) or "query" (all at distance 0, which SAM 2 never saw).
        self.support_positions = str(settings.get("support_positions", "video"))
        if self.support_positions not in ("video", "query"):
            raise ValueError(f"transfer.support_positions must be video or query, got {self.support_positions!r}")
        # SAM2VideoPredictor fills background holes up to this many low-res pixels in its output
        # masks (fill_hole_area, 8 by default); memories are encoded before, as there.
        self.fill_hole_area = max(0, int(settings.get("fill_hole_area", 0)))
        # How a support's memory is encoded: "video", as SAM2VideoPredictor does for a frame given
        # add_new_mask (the mask as stride-4 logits, holes filled, upsampled and binarised before the
        # memory encoder), or "training", from the full-resolution mask as SAM 2's training does.
        self.support_encoding = str(settings.get("support_encoding", "video"))
        if self.support_encoding not in ("video", "training"):
            raise ValueError(f"transfer.support_encoding must be video or training, got {self.support_encoding!r}")
        # Meta's tracker runs every object on every frame; by default a label runs only where a chosen
        # support holds it or the slice before predicted it present (a scan's labels mostly occupy
        # few slices, and each label run costs a memory-attention pass). True: SAM2VideoPredictor's way.
        self.track_all_labels = bool(settings.get("track_all_labels", False))
        # bfloat16 autocast, as Meta runs SAM 2 on a GPU: "auto" is on for CUDA and off on CPU, where
        # bfloat16 matmuls are slower; "bf16" or "off" force it. Outputs leave the slice loop as float32.
        precision = str(settings.get("autocast", "auto"))
        if precision not in ("auto", "bf16", "off"):
            raise ValueError(f"transfer.autocast must be auto, bf16 or off, got {precision!r}")
        self.autocast = precision == "bf16" or (precision == "auto" and model.device.type == "cuda")
        self.mask_threshold = float(settings.get("mask_threshold", 0.0))
        if model.pred_obj_scores and not model.fixed_no_obj_ptr:
            # SAM 2.1's configs all set it; the absent pointer of an empty support mask relies on it.
            raise ValueError("SAM 2 models with pred_obj_scores must have fixed_no_obj_ptr: true")
        self.feature_cache = QueryFeatureCache(int(settings.get("feature_cache", 0)))
        # Volumes whose last propagation is kept, so a run after a bank change re-runs only the slices
        # whose inputs changed (and those that read them). Each holds its slices' memories: kept few.
        self.propagation_cache = PropagationCache(int(settings.get("propagation_cache", 0)))
        self.device = model.device
        self._weights_digest: str | None = None
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=self.device)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=self.device)
        self._mean, self._std = mean[:, None, None], std[:, None, None]
        # Sine position encodings depend only on the feature map's shape (PositionEmbeddingSine
        # builds them from arange(H), arange(W)), so they are computed once per shape here and
        # never stored per slice or per bank entry.
        self._vision_pos_enc: dict[tuple, list[torch.Tensor]] = {}
        self._maskmem_pos_enc: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_settings(
        cls,
        settings: dict,
        checkpoint_path: Path,
        config_path: str | Path,
        device: str,
        model_id: str,
    ) -> "Sam2Transfer":
        model = build_sam2_model(config_path, checkpoint_path, device, int(settings["image_size"]))
        return cls(model, settings, model_id, checkpoint_path=checkpoint_path)

    # ---------------------------------------------------------------- identity

    def fingerprint(self) -> str:
        if self._weights_digest is None:
            if self.checkpoint_path is not None:
                # Cached by size and mtime in the models directory: not re-hashed at every start.
                self._weights_digest = checkpoint_fingerprint(self.checkpoint_path)
            else:  # a model handed in without its file: hash the weights themselves
                h = hashlib.sha256()
                for key, tensor in sorted(self.model.state_dict().items()):
                    h.update(key.encode())
                    h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
                self._weights_digest = h.hexdigest()
        # Support memories depend on how they are encoded (and, "video", on its hole filling).
        encoding = "training" if self.support_encoding == "training" else f"video-holes{self.fill_hole_area}"
        return f"sam2:{self.model_id}:sha256={self._weights_digest[:16]}:size={self.image_size}:{encoding}:v{ENCODING_VERSION}"

    @property
    def probability_threshold(self) -> float:
        """``mask_threshold`` (a logit) as a probability, for thresholding ``SliceResult.probabilities``."""
        return float(1.0 / (1.0 + np.exp(-self.mask_threshold)))

    # ---------------------------------------------------------------- query volumes

    def forget_caches(self) -> None:
        """Drop the cached query image features and propagations (``Engine.forget_caches``: timing
        runs start cold)."""
        self.feature_cache.clear()
        self.propagation_cache.clear()

    @torch.inference_mode()
    def segment_volume(
        self,
        query: np.ndarray,
        plans: list[SlicePlan],
        labels: Sequence[int],
        cache_key: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> VolumeResult:
        query = np.asarray(query, dtype=np.float32)
        labels = tuple(int(v) for v in labels)
        Z, S = query.shape[0], query.shape[-1]
        if query.ndim != 3 or query.shape[1] != S:
            raise ValueError(f"query must be (Z, S, S), got {query.shape}")
        if len(plans) != Z or any(p.slice_index != z for z, p in enumerate(plans)):
            raise ValueError("plans must hold one SlicePlan per query slice, in slice order")
        position = {v: i for i, v in enumerate(labels)}
        for plan in plans:
            unknown = [v for v in plan.labels if int(v) not in position]
            if unknown:
                raise ValueError(f"slice {plan.slice_index} allows labels {unknown} that are not in {labels}")
            if plan.labels and not plan.supports:
                raise ValueError(f"slice {plan.slice_index} allows labels {plan.labels} but has no supports")

        L = len(labels)
        hw = (self.image_size // self.model.backbone_stride,) * 2
        anchor, order = propagation_order(plans)
        results: list[SliceResult | None] = [None] * Z
        slice_memories: dict[int, SliceMemory] = {}
        totals = {"encode": 0.0, "attention_decode": 0.0, "memory_encode": 0.0}
        visited: set[int] = set()
        keep = max(len(p.supports) for p in plans) if plans else 0
        resident: dict = {}  # supports' memories on the device, for this volume
        num_frames = Z + keep if self.support_positions == "video" else Z

        # The last propagation of this volume with these labels: a slice whose own inputs (pixels,
        # supports, labels) are unchanged and none of whose read slices changed output is taken
        # from it, exactly; anything else is re-run. Same anchor and video length, or all re-run.
        run_key = None if cache_key is None else (cache_key, self.image_size, labels)
        before = self.propagation_cache.get(run_key)
        if before is not None and (before.anchor, before.num_frames, len(before.slices)) != (anchor, num_frames, Z):
            before = None
        record = PropagationRecord(anchor, num_frames, {})
        changed: set[int] = set()  # slices whose output differs from the last run's (or that had none)

        def readers(z: int, direction: int, span: int) -> set[int]:
            """Slices that will read slice z's memory within ``span`` slices: the next ones in its
            direction, and for slices just above the anchor also the first ones of the downward pass."""
            out = {z + direction * d for d in range(1, span + 1)}
            if direction > 0 and anchor is not None:
                out |= {anchor - d for d in range(1, span + 1) if z - anchor + d <= span}
            return {r for r in out if 0 <= r < Z}

        for done, (z, direction) in enumerate(order, start=1):
            visited.add(z)
            plan = plans[z]
            signature = slice_signature(query[z], plan) if run_key is not None else None
            old = before.slices.get(z) if before is not None else None
            reads = {z - direction * d for d in range(1, self.pointers + 1)}
            if old is not None and signature is not None and old.signature == signature and not reads & changed:
                results[z] = replace(old.result, seconds={stage: 0.0 for stage in totals}, reused=True)
                memory = old.memory()
                if memory is not None and readers(z, direction, self.pointers):
                    slice_memories[z] = memory
                record.slices[z] = old
                self._forget_unread(slice_memories, visited, readers, anchor)
                if progress is not None:
                    progress(done, Z)
                continue
            run = set(range(L)) if self.track_all_labels and plan.supports else {position[int(v)] for v in plan.labels}
            # A label the previous slice predicted present runs here too, even when no chosen support
            # holds it: as in SAM 2's tracker, the object-score head decides whether it is still there.
            previous = slice_memories.get(z - direction)
            if previous is not None:
                run |= {i for i in previous.rows if results[z - direction].object_scores[i] > 0}
            allowed = np.array(sorted(run), dtype=np.int64)
            memory = None
            if len(allowed) == 0:
                results[z] = self._empty_slice(L, S)
            else:
                # Recent slices in the direction of travel, as SAM 2 takes the last num_maskmem - 1
                # frames' memories and the last max_obj_ptrs_in_encoder - 1 frames' pointers.
                recent = []
                for distance in range(1, self.pointers + 1):
                    mem = slice_memories.get(z - direction * distance)
                    if mem is not None:
                        recent.append((distance, mem))
                needs_memory = bool(readers(z, direction, self.neighbours))
                step = abs(z - anchor) if anchor is not None else 0
                with self._precision():
                    result, memory = self._segment_slice(
                        query[z], z, plan, allowed, labels, hw, recent, num_frames, step, cache_key, needs_memory, resident)
                results[z] = result
                if memory is not None and readers(z, direction, self.pointers):
                    slice_memories[z] = memory
            if old is None or not old.same_output(results[z], memory):
                changed.add(z)
            if signature is not None:
                record.slices[z] = SliceRecord(signature, results[z], None if memory is None else dict(memory.rows),
                                               None if memory is None else memory.obj_ptr,
                                               None if memory is None else memory.features)
            self._forget_unread(slice_memories, visited, readers, anchor)
            for stage in totals:
                totals[stage] += results[z].seconds.get(stage, 0.0)
            if progress is not None:
                progress(done, Z)
        if len(record.slices) == Z:
            self.propagation_cache.put(run_key, record)
        if before is not None:
            logger.info("SAM 2 propagation: %d of %d slices re-run after a change of their inputs",
                        sum(not r.reused for r in results), Z)
        return VolumeResult(labels=labels, slices=results, seconds=totals)

    def _forget_unread(self, slice_memories: dict, visited: set[int], readers, anchor: int | None) -> None:
        """Drop what no slice still to come will read: spatial features beyond `neighbours`, whole
        memories beyond `pointers`."""
        for z in list(slice_memories):
            direction = +1 if z >= (anchor or 0) else -1
            if not readers(z, direction, self.pointers) - visited:
                del slice_memories[z]
            elif not readers(z, direction, self.neighbours) - visited:
                slice_memories[z].features = None

    @staticmethod
    def _empty_slice(num_labels: int, S: int, encode_s: float = 0.0, cached: bool = True) -> SliceResult:
        """A slice no label ran on: zeros, every object score "absent"."""
        return SliceResult(
            probabilities=np.zeros((num_labels, S, S), np.float32),
            object_scores=np.full(num_labels, NO_OBJ_SCORE, np.float32),
            seconds={"encode": 0.0 if cached else encode_s, "attention_decode": 0.0, "memory_encode": 0.0},
            ran=(),
        )

    def _segment_slice(
        self, image, z, plan, allowed, labels, hw, recent, num_frames, step, cache_key, needs_memory, resident=None
    ) -> tuple[SliceResult, SliceMemory | None]:
        S = image.shape[-1]
        num_labels = len(labels)
        t0 = time.perf_counter()
        features, cached = self._query_features(image, z, cache_key)
        t1 = time.perf_counter()

        # Labels share one attention call when the same recent slices hold a memory of them (a
        # label that starts on this slice has none from the slices before) and the same supports
        # speak for them (a support whose annotator left a label out says nothing of it).
        speaks = np.stack([annotated_labels(s, num_labels) for s in plan.supports]) if plan.supports else np.zeros((0, num_labels), bool)
        groups: dict[tuple, list[int]] = {}
        for i in allowed.tolist():
            distances = tuple(d for d, mem in recent if i in mem.rows)
            ranks = tuple(np.flatnonzero(speaks[:, i]).tolist())
            if distances or ranks:  # with no memory at all SAM 2 has nothing to track: the label does not run
                groups.setdefault((distances, ranks), []).append(i)
        if not groups:
            return self._empty_slice(num_labels, S, t1 - t0, cached), None
        num_maskmem = self.model.num_maskmem
        order, outputs = [], []
        for (distances, ranks), group in groups.items():
            index = np.array(group, dtype=np.int64)
            memories = self._support_memories(plan.supports, index, num_labels, hw, step, resident, ranks)
            for distance, mem in recent:
                if distance not in distances:
                    continue
                rows = torch.as_tensor([mem.rows[i] for i in group], device=self.device)
                spatial = mem.features is not None and distance <= self.neighbours
                memories.append(
                    Memory(
                        features=mem.features[rows] if spatial else None,
                        obj_ptr=mem.obj_ptr[rows],
                        t_pos=num_maskmem - distance,  # SAM 2: the frame t_rel before has t_pos = num_maskmem - t_rel
                        ptr_tpos=distance,  # SAM 2: non-conditioning pointers carry their frame distance t_diff
                    )
                )
            vision_feats, vision_pos, feat_sizes = self._flatten_features(features.backbone_fpn, len(group))
            pix_feat = self._condition_on_memories(vision_feats, vision_pos, feat_sizes, memories, num_frames)
            outputs.append(self._decode(pix_feat, vision_feats, feat_sizes))
            order.extend(group)
        low_res, high_res, obj_ptr, scores = (torch.cat(parts) for parts in zip(*outputs))
        run = np.array(order, dtype=np.int64)
        present = scores[:, 0] > 0
        shown = fill_holes(low_res, self.fill_hole_area) if self.fill_hole_area else low_res
        # SAM2VideoPredictor._get_orig_video_res_output: low-res logits resized to the output grid.
        logits = F.interpolate(shown, size=(S, S), mode="bilinear", align_corners=False)[:, 0]
        probs = torch.where(present[:, None, None], torch.sigmoid(logits), torch.zeros_like(logits))
        probabilities = np.zeros((num_labels, S, S), np.float32)
        probabilities[run] = probs.float().cpu().numpy()
        object_scores = np.full(num_labels, NO_OBJ_SCORE, np.float32)
        object_scores[run] = scores[:, 0].float().cpu().numpy()
        t2 = time.perf_counter()

        memory = SliceMemory(rows={int(i): r for r, i in enumerate(run)}, obj_ptr=obj_ptr)
        if needs_memory:
            memory.features = self._encode_slice_memory(features.backbone_fpn, high_res, scores)
        t3 = time.perf_counter()
        seconds = {
            "encode": 0.0 if cached else t1 - t0,
            "attention_decode": t2 - t1,
            "memory_encode": t3 - t2 if needs_memory else 0.0,
        }
        ran = tuple(labels[i] for i in sorted(run.tolist()))
        return SliceResult(probabilities=probabilities, object_scores=object_scores, seconds=seconds, ran=ran), memory

    # ---------------------------------------------------------------- benchmark path

    @torch.inference_mode()
    def segment_slice_reencoding(
        self, query_slice: np.ndarray, support_images: np.ndarray, support_masks: np.ndarray, labels: Sequence[int]
    ) -> SliceResult:
        """One query slice from raw supports, re-encoding every support now (the seed paper's way).

        Same code paths as the cached route (encode_supports, then the attention path of
        segment_volume), so outputs match a bank-backed call and only the cost differs;
        ``seconds["encode"]`` includes the support encoding.
        """
        labels = tuple(int(v) for v in labels)
        t0 = time.perf_counter()
        payload = self.encode_supports(support_images, support_masks, labels)
        support_seconds = time.perf_counter() - t0
        supports = []
        for i in range(len(support_images)):
            present = tuple(v for v in labels if np.any(support_masks[i] == v))
            supports.append(
                Support(
                    ref=SupportRef(image_id="re-encoded", slice_index=i),
                    image=support_images[i],
                    mask=support_masks[i],
                    labels=present,
                    payload={k: v[i] for k, v in payload.items()},
                )
            )
        allowed = tuple(v for v in labels if any(v in s.labels for s in supports))
        plan = SlicePlan(slice_index=0, supports=supports, labels=allowed)
        result = self.segment_volume(np.asarray(query_slice, np.float32)[None], [plan], labels).slices[0]
        result.seconds["encode"] = result.seconds.get("encode", 0.0) + support_seconds
        return result
