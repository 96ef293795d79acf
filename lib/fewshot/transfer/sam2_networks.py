"""What Sam2Transfer asks of the SAM 2 networks: frames and masks prepared as SAM 2 prepares them, image
features, support memories (encode_supports) and memory attention, each mirroring the SAM2Base or
SAM2VideoPredictor code it names. Sam2Transfer (sam2_memory.py) holds the propagation."""
from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sam2.modeling.sam2_base import SAM2Base
from sam2.modeling.sam2_utils import get_1d_sine_pe

from fewshot.transfer.sam2_parts import (
    Memory, QueryFeatureCache, QueryFeatures, SupportMemories, fill_holes,
)
from fewshot.types import Support

logger = logging.getLogger(__name__)

SUPPORTS_PER_ENCODER_CALL = 4  # image-encoder batch during ingestion: bounded memory, fewer calls
LOG_EVERY_SLICES = 50


class Sam2Networks:
    """The network calls of :class:`~fewshot.transfer.sam2_memory.Sam2Transfer`, which sets the
    attributes below in its ``__init__``."""

    model: SAM2Base
    image_size: int
    device: torch.device
    support_positions: str
    support_encoding: str
    fill_hole_area: int
    autocast: bool
    feature_cache: QueryFeatureCache
    _mean: torch.Tensor
    _std: torch.Tensor
    _vision_pos_enc: dict
    _maskmem_pos_enc: dict

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
                          resident: dict | None = None, ranks: Sequence[int] | None = None) -> list[Memory]:
        """``step``: how many slices the propagation has gone from its anchor (0 at the anchor).
        ``ranks``: the supports (by rank) that speak for ``labels`` (default: all); each keeps its
        place in the video, as a frame an object got no prompt on stays where it is."""
        memories = []
        resident = {} if resident is None else resident
        index = torch.as_tensor(labels, device=self.device)
        for rank, support in enumerate(supports):
            if ranks is not None and rank not in ranks:
                continue
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


def annotated_labels(support: Support, num_labels: int) -> np.ndarray:
    """(L,) bool: the labels this support's memories speak for. A label the annotator left out
    (``label_annotated`` False, see ``Engine.support_batch``) has an empty mask on the slice that
    says nothing: its memory would tell SAM 2 "absent", so it is not used. Banks written before
    the flag existed hold complete labels only."""
    flags = support.payload.get("label_annotated")
    return np.ones(num_labels, bool) if flags is None else np.asarray(flags, bool).reshape(num_labels)
