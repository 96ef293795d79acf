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
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sam2.modeling.sam2_base import NO_OBJ_SCORE, SAM2Base
from sam2.modeling.sam2_utils import get_1d_sine_pe

from fewshot.transfer.sam2_model import build_sam2_model
from fewshot.weights import checkpoint_fingerprint
from fewshot.types import SlicePlan, SliceResult, Support, SupportRef, VolumeResult

logger = logging.getLogger(__name__)

# SAM 2 normalises frames with the ImageNet statistics (sam2.utils.misc.load_video_frames).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PAYLOAD_KEYS = ("maskmem_features", "obj_ptr", "object_present")
# Bumped whenever encode_supports would produce different arrays for the same weights.
ENCODING_VERSION = 1
SUPPORTS_PER_ENCODER_CALL = 4  # image-encoder batch during ingestion: bounded memory, fewer calls
LOG_EVERY_SLICES = 50


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


class Sam2Transfer:
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

    # ---------------------------------------------------------------- input preparation

    def prepare_images(self, images: np.ndarray) -> torch.Tensor:
        """(N, S, S) float32 in [0, 1] -> (N, 3, image_size, image_size), normalised like SAM 2 frames."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=self.device)[:, None]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            ).clamp_(0.0, 1.0)
        return (x.expand(-1, 3, -1, -1) - self._mean) / self._std

    def prepare_masks(self, mask: np.ndarray, labels: Sequence[int]) -> torch.Tensor:
        """(S, S) label map -> (L, 1, image_size, image_size) binary float, one channel per label.

        Resized like SAM2VideoPredictor.add_new_mask: bilinear with antialias, then >= 0.5.
        """
        m = torch.as_tensor(np.asarray(mask).astype(np.int64), device=self.device)
        values = torch.as_tensor([int(v) for v in labels], dtype=torch.int64, device=self.device)
        binary = (m[None] == values[:, None, None]).float()[:, None]
        if binary.shape[-1] != self.image_size or binary.shape[-2] != self.image_size:
            binary = F.interpolate(
                binary, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
            binary = (binary >= 0.5).float()
        return binary

    # ---------------------------------------------------------------- image features

    def _forward_image(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Image encoder on (N, 3, I, I); the levels SAM 2 uses, each (N, C_l, H_l, W_l)."""
        backbone_out = self.model.forward_image(images)
        levels = self.model.num_feature_levels
        fpn = backbone_out["backbone_fpn"][-levels:]
        key = tuple(tuple(f.shape[-2:]) for f in fpn)
        if key not in self._vision_pos_enc:
            self._vision_pos_enc[key] = [p[:1].clone() for p in backbone_out["vision_pos_enc"][-levels:]]
        return fpn

    def _flatten_features(self, fpn: list[torch.Tensor], batch: int):
        """Mirrors SAM2VideoPredictor._get_image_feature + SAM2Base._prepare_backbone_features:
        one image's features expanded (no copy) to ``batch`` objects, flattened to (HW, B, C)."""
        key = tuple(tuple(f.shape[-2:]) for f in fpn)
        pos = self._vision_pos_enc[key]
        feat_sizes = [tuple(f.shape[-2:]) for f in fpn]
        vision_feats = [f.expand(batch, -1, -1, -1).flatten(2).permute(2, 0, 1) for f in fpn]
        vision_pos = [p.expand(batch, -1, -1, -1).flatten(2).permute(2, 0, 1) for p in pos]
        return vision_feats, vision_pos, feat_sizes

    def _query_features(self, image: np.ndarray, z: int, cache_key: str | None) -> tuple[QueryFeatures, bool]:
        digest = hashlib.blake2b(np.ascontiguousarray(image, dtype=np.float32).tobytes(), digest_size=16).hexdigest()
        hit = self.feature_cache.get(cache_key, self.image_size, z, digest)
        if hit is not None:
            return hit, True
        fpn = self._forward_image(self.prepare_images(image[None]))
        features = QueryFeatures(backbone_fpn=fpn, digest=digest)
        self.feature_cache.put(cache_key, self.image_size, z, features)
        return features, False

    def _maskmem_pos(self, h: int, w: int) -> torch.Tensor:
        """The memory encoder's spatial encoding, (1, mem_dim, h, w): MemoryEncoder.forward returns
        ``position_encoding(x)``, a sine encoding of x's shape only, so one copy serves every memory."""
        if (h, w) not in self._maskmem_pos_enc:
            probe = torch.zeros(1, self.model.mem_dim, h, w, device=self.device)
            self._maskmem_pos_enc[(h, w)] = self.model.memory_encoder.position_encoding(probe)
        return self._maskmem_pos_enc[(h, w)]

    # ---------------------------------------------------------------- supports

    def _encode_support_tensors(self, images: np.ndarray, masks: np.ndarray, labels: Sequence[int]) -> SupportMemories:
        model = self.model
        n, L = len(images), len(labels)
        out_feats, out_ptrs, out_present = [], [], []
        for start in range(0, n, SUPPORTS_PER_ENCODER_CALL):
            stop = min(n, start + SUPPORTS_PER_ENCODER_CALL)
            fpn_batch = self._forward_image(self.prepare_images(images[start:stop]))
            for i in range(stop - start):
                fpn = [f[i : i + 1] for f in fpn_batch]
                vision_feats, vision_pos, feat_sizes = self._flatten_features(fpn, L)
                mask_inputs = self.prepare_masks(masks[start + i], labels)
                # A support slice is a frame with a mask prompt: track_step routes it through
                # _use_mask_as_output (object pointer from the mask, "absent" for an empty mask).
                training = self.support_encoding == "training"
                out = model.track_step(
                    frame_idx=0,
                    is_init_cond_frame=True,
                    current_vision_feats=vision_feats,
                    current_vision_pos_embeds=vision_pos,
                    feat_sizes=feat_sizes,
                    point_inputs=None,
                    mask_inputs=mask_inputs,
                    output_dict={"cond_frame_outputs": {}, "non_cond_frame_outputs": {}},
                    num_frames=1,
                    run_mem_encoder=training,  # SAM 2 training: _encode_new_memory on the full-resolution mask
                )
                if not training:
                    out["maskmem_features"] = self._encode_prompted_frame(fpn, out["pred_masks"], out["object_score_logits"])
                out_feats.append(out["maskmem_features"])
                out_ptrs.append(out["obj_ptr"])
                out_present.append(out["object_score_logits"][:, 0] > 0)
            if stop // LOG_EVERY_SLICES > start // LOG_EVERY_SLICES or stop == n and n >= LOG_EVERY_SLICES:
                logger.info("SAM 2 support memories: %d/%d slices encoded", stop, n)
        return SupportMemories(
            maskmem_features=torch.stack(out_feats),
            obj_ptr=torch.stack(out_ptrs),
            object_present=torch.stack(out_present),
        )

    def _precision(self):
        """The context the networks run in: bfloat16 autocast on the model's device, or nothing."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _encode_prompted_frame(self, fpn, low_res_masks: torch.Tensor, object_score_logits: torch.Tensor) -> torch.Tensor:
        """SAM2VideoPredictor's memory of a frame given add_new_mask: its stride-4 mask logits (holes
        filled, _run_single_frame_inference), upsampled bilinearly and encoded as a user's input
        (propagate_in_video_preflight: is_mask_from_pts, so binarised at 0 before the encoder)."""
        if self.fill_hole_area:
            low_res_masks = fill_holes(low_res_masks, self.fill_hole_area)
        high_res = F.interpolate(low_res_masks, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self._encode_slice_memory(fpn, high_res, object_score_logits, is_mask_from_pts=True)

    @torch.inference_mode()
    def encode_supports(self, images: np.ndarray, masks: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
        """(E, S, S) images + (E, S, S) label maps -> per-entry memories for every label in ``labels``.

        ``maskmem_features`` (E, L, mem_dim, h, w) float16 (SAM 2 itself stores them in bfloat16),
        ``obj_ptr`` (E, L, hidden) float32, ``object_present`` (E, L) bool.
        """
        images = np.asarray(images, dtype=np.float32)
        masks = np.asarray(masks)
        if images.ndim != 3 or masks.shape != images.shape:
            raise ValueError(f"images {images.shape} and masks {masks.shape} must both be (E, S, S)")
        if len(labels) == 0:
            raise ValueError("encode_supports needs at least one label value")
        if len(images) == 0:
            h = self.image_size // self.model.backbone_stride
            return {
                "maskmem_features": np.zeros((0, len(labels), self.model.mem_dim, h, h), np.float16),
                "obj_ptr": np.zeros((0, len(labels), self.model.hidden_dim), np.float32),
                "object_present": np.zeros((0, len(labels)), bool),
            }
        with self._precision():
            mem = self._encode_support_tensors(images, masks, labels)
        features = mem.maskmem_features.float().cpu().numpy()
        if not np.isfinite(features.astype(np.float16)).all():
            raise FloatingPointError("SAM 2 memory features overflow float16; these weights need a float32 bank")
        return {
            "maskmem_features": features.astype(np.float16),
            "obj_ptr": mem.obj_ptr.float().cpu().numpy(),
            "object_present": mem.object_present.cpu().numpy(),
        }

    # ---------------------------------------------------------------- memory attention

    def _condition_on_memories(
        self, vision_feats: list[torch.Tensor], vision_pos: list[torch.Tensor], feat_sizes, memories: list[Memory], num_frames: int
    ) -> torch.Tensor:
        """Query features (B objects) fused with ``memories`` -> (B, C, H, W).

        Mirrors the ``not is_init_cond_frame`` branch of SAM2Base._prepare_memory_conditioned_features:
        spatial memories with spatial + temporal position encodings first, then object pointers with a
        sine encoding of their temporal distance, split into mem_dim-sized tokens (excluded from RoPE).
        """
        model = self.model
        B = vision_feats[-1].size(1)
        C = model.hidden_dim
        H, W = feat_sizes[-1]
        to_cat_memory, to_cat_memory_pos = [], []
        for mem in memories:
            if mem.features is None:  # a frame beyond `neighbours`: its pointer only, as in SAM 2
                continue
            to_cat_memory.append(mem.features.flatten(2).permute(2, 0, 1))
            pos = self._maskmem_pos(*mem.features.shape[-2:]).flatten(2).permute(2, 0, 1)  # (hw, 1, mem_dim)
            pos = pos + model.maskmem_tpos_enc[model.num_maskmem - mem.t_pos - 1]
            to_cat_memory_pos.append(pos.expand(-1, B, -1))

        num_obj_ptr_tokens = 0
        if model.use_obj_ptrs_in_encoder and memories:
            obj_ptrs = torch.stack([m.obj_ptr for m in memories], dim=0)  # (n, B, C)
            if model.add_tpos_enc_to_obj_ptrs:
                # SAM 2 normalises by (min(num_frames, max_obj_ptrs_in_encoder) - 1); at least 1 here
                # because a one-slice query still has support pointers (SAM 2 would divide by zero).
                t_diff_max = max(1, min(num_frames, model.max_obj_ptrs_in_encoder) - 1)
                tpos_dim = C if model.proj_tpos_enc_in_obj_ptrs else model.mem_dim
                obj_pos = torch.tensor([m.ptr_tpos for m in memories], device=self.device, dtype=torch.float32)
                obj_pos = model.obj_ptr_tpos_proj(get_1d_sine_pe(obj_pos / t_diff_max, dim=tpos_dim))
                obj_pos = obj_pos.unsqueeze(1).expand(-1, B, model.mem_dim)
            else:
                obj_pos = obj_ptrs.new_zeros(len(memories), B, model.mem_dim)
            if model.mem_dim < C:
                obj_ptrs = obj_ptrs.reshape(-1, B, C // model.mem_dim, model.mem_dim)
                obj_ptrs = obj_ptrs.permute(0, 2, 1, 3).flatten(0, 1)
                obj_pos = obj_pos.repeat_interleave(C // model.mem_dim, dim=0)
            to_cat_memory.append(obj_ptrs)
            to_cat_memory_pos.append(obj_pos)
            num_obj_ptr_tokens = obj_ptrs.shape[0]

        pix_feat_with_mem = model.memory_attention(
            curr=vision_feats[-1:],
            curr_pos=vision_pos[-1:],
            memory=torch.cat(to_cat_memory, dim=0),
            memory_pos=torch.cat(to_cat_memory_pos, dim=0),
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )
        return pix_feat_with_mem.permute(1, 2, 0).reshape(B, C, H, W)

    def _decode(self, pix_feat_with_mem: torch.Tensor, vision_feats, feat_sizes):
        """SAM heads on the conditioned features, as SAM2Base._track_step does for a tracked frame."""
        model = self.model
        B = pix_feat_with_mem.size(0)
        high_res_features = None
        if len(vision_feats) > 1:
            high_res_features = [
                x.permute(1, 2, 0).reshape(B, x.size(2), *s) for x, s in zip(vision_feats[:-1], feat_sizes[:-1])
            ]
        multimask = model._use_multimask(is_init_cond_frame=False, point_inputs=None)
        _, _, _, low_res_masks, high_res_masks, obj_ptr, object_score_logits = model._forward_sam_heads(
            backbone_features=pix_feat_with_mem,
            point_inputs=None,
            mask_inputs=None,
            high_res_features=high_res_features,
            multimask_output=multimask,
        )
        return low_res_masks, high_res_masks, obj_ptr, object_score_logits

    def _encode_slice_memory(self, fpn, high_res_masks: torch.Tensor, object_score_logits: torch.Tensor,
                             is_mask_from_pts: bool = False) -> torch.Tensor:
        """SAM2Base._encode_new_memory on a slice's mask logits, one row per label run on it
        (``is_mask_from_pts``: a user's mask, binarised before the encoder)."""
        vision_feats, _, feat_sizes = self._flatten_features(fpn, high_res_masks.size(0))
        features, _ = self.model._encode_new_memory(
            current_vision_feats=vision_feats,
            feat_sizes=feat_sizes,
            pred_masks_high_res=high_res_masks,
            object_score_logits=object_score_logits,
            is_mask_from_pts=is_mask_from_pts,
        )
        return features

    def _on_device(self, support: Support, num_labels: int, hw: tuple[int, int], resident: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A support's cached memory on the model's device, moved once per volume (``resident``), not
        once per slice that uses it: no host-to-device copy inside the slice loop after the first."""
        key = id(support.payload)
        if key not in resident:
            payload = support.payload
            missing = [k for k in ("maskmem_features", "obj_ptr") if k not in payload]
            if missing:
                raise KeyError(f"support {support.ref.as_dict()} has no SAM 2 payload {missing}; was the bank built by this transfer?")
            feats = np.asarray(payload["maskmem_features"])
            if feats.shape[0] != num_labels or tuple(feats.shape[-2:]) != tuple(hw) or feats.shape[1] != self.model.mem_dim:
                raise ValueError(
                    f"support {support.ref.as_dict()}: maskmem_features {feats.shape} do not fit "
                    f"(L={num_labels}, {self.model.mem_dim}, {hw[0]}, {hw[1]}): payload must be sliced to the "
                    "`labels` order and encoded at this image size"
                )
            resident[key] = (torch.as_tensor(feats, device=self.device).float(),
                             torch.as_tensor(np.asarray(payload["obj_ptr"]), device=self.device).float())
        return resident[key]

    def _support_memories(self, supports: list[Support], labels: np.ndarray, num_labels: int, hw: tuple[int, int], step: int,
                          resident: dict | None = None) -> list[Memory]:
        """``step``: how many slices the propagation has gone from its anchor (0 at the anchor)."""
        memories = []
        resident = {} if resident is None else resident
        index = torch.as_tensor(labels, device=self.device)
        for rank, support in enumerate(supports):
            features, obj_ptr = self._on_device(support, num_labels, hw, resident)
            memories.append(
                Memory(
                    features=features[index],
                    obj_ptr=obj_ptr[index],
                    t_pos=0,  # every support is a conditioning frame
                    # "video": supports are frames just before the volume (the best one nearest), so
                    # the query slice `step` slices from the anchor is step + rank + 1 frames after it.
                    ptr_tpos=step + rank + 1 if self.support_positions == "video" else 0,
                )
            )
        return memories

    # ---------------------------------------------------------------- query volumes

    def forget_caches(self) -> None:
        """Drop the cached query image features (``Engine.forget_caches``: timing runs start cold)."""
        self.feature_cache.clear()

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
            run = set(range(L)) if self.track_all_labels and plan.supports else {position[int(v)] for v in plan.labels}
            # A label the previous slice predicted present runs here too, even when no chosen support
            # holds it: as in SAM 2's tracker, the object-score head decides whether it is still there.
            previous = slice_memories.get(z - direction)
            if previous is not None:
                run |= {i for i in previous.rows if results[z - direction].object_scores[i] > 0}
            allowed = np.array(sorted(run), dtype=np.int64)
            if len(allowed) == 0:
                results[z] = SliceResult(
                    probabilities=np.zeros((L, S, S), np.float32),
                    object_scores=np.full(L, NO_OBJ_SCORE, np.float32),
                    seconds={"encode": 0.0, "attention_decode": 0.0, "memory_encode": 0.0},
                    ran=(),
                )
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
            # Drop what no slice still to come will read: spatial features beyond `neighbours`,
            # whole memories beyond `pointers`.
            for old in list(slice_memories):
                old_direction = +1 if old >= (anchor or 0) else -1
                if not readers(old, old_direction, self.pointers) - visited:
                    del slice_memories[old]
                elif not readers(old, old_direction, self.neighbours) - visited:
                    slice_memories[old].features = None
            for stage in totals:
                totals[stage] += results[z].seconds.get(stage, 0.0)
            if progress is not None:
                progress(done, Z)
        return VolumeResult(labels=labels, slices=results, seconds=totals)

    def _segment_slice(
        self, image, z, plan, allowed, labels, hw, recent, num_frames, step, cache_key, needs_memory, resident=None
    ) -> tuple[SliceResult, SliceMemory | None]:
        S = image.shape[-1]
        num_labels = len(labels)
        t0 = time.perf_counter()
        features, cached = self._query_features(image, z, cache_key)
        t1 = time.perf_counter()

        # Labels share one attention call when the same recent slices hold a memory of them (a
        # label that starts on this slice has none from the slices before).
        groups: dict[tuple, list[int]] = {}
        for i in allowed.tolist():
            groups.setdefault(tuple(d for d, mem in recent if i in mem.rows), []).append(i)
        num_maskmem = self.model.num_maskmem
        order, outputs = [], []
        for distances, group in groups.items():
            index = np.array(group, dtype=np.int64)
            memories = self._support_memories(plan.supports, index, num_labels, hw, step, resident)
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
