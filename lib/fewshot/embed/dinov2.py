"""DINOv2 slice embeddings for retrieval (transformers' Dinov2Model, real or random weights alike).

The vector is the CLS token concatenated with the mean of the patch tokens, each half
L2-normalised before the whole is normalised again. Why both: the CLS token summarises the
slice globally (which anatomy, roughly where in the body), while the mean patch token keeps
the local appearance of the structures visible on the slice (DINOv2's linear evaluation uses
the same concatenation as its image representation). Normalising the halves first
gives them equal weight, so the final inner product is the mean of the two cosine similarities.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.config import ConfigError, resolve_device
from fewshot.settings import typed_section
from fewshot.weights import checkpoint_fingerprint

logger = logging.getLogger(__name__)

# DINOv2 was trained on ImageNet-normalised RGB.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dinov2Settings:
    """The ``embedder`` section of ``type: dinov2`` (configs/presets/foundation.yaml)."""

    model: str  # the weights' name in configs/models.yaml
    input_size: int  # slices are resized to this side; a multiple of the model's patch size (14)
    batch_size: int = 32  # slices per forward pass: memory, never results (no preset sets it)

    @classmethod
    def from_settings(cls, settings: Mapping) -> "Dinov2Settings":
        out = typed_section(cls, settings, "embedder", strict=True)
        if out.input_size <= 0 or out.batch_size < 1:
            raise ConfigError(f"embedder.input_size and embedder.batch_size must be positive: {out}")
        return out


class Dinov2Embedder:
    """Canvas slices (N, S, S) in [0, 1] -> (N, 2 * hidden_size) unit vectors."""

    index_transform = ""  # already L2-normalised: inner product = cosine similarity

    def __init__(self, model_path: Path, settings: Mapping, device: str = "cpu"):
        self.settings = Dinov2Settings.from_settings(settings)  # checked before anything heavy loads
        from transformers import Dinov2Model  # heavy import, only when the step is built

        self.model_path = Path(model_path)
        self.device = resolve_device(device)
        self.model = Dinov2Model.from_pretrained(self.model_path, dtype=torch.float32).to(self.device).eval()
        patch = self.model.config.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        self.input_size = self.settings.input_size
        if self.input_size <= 0 or self.input_size % patch:
            raise ConfigError(
                f"embedder.input_size must be a positive multiple of the DINOv2 patch size {patch}, got {self.input_size}"
            )
        self.batch_size = self.settings.batch_size
        self.dim = 2 * int(self.model.config.hidden_size)
        # The weights' fingerprint is part of the name, so vectors made by other weights (or by
        # random weights) are never mixed with these in one bank.
        self.name = f"dinov2-{self.input_size}-{checkpoint_fingerprint(self.model_path)[:12]}"
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        logger.info("DINOv2 embedder from %s: dim %d, input %d px, %s", self.model_path, self.dim, self.input_size, self.device)

    def _prepare(self, batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)[:, None]
        if x.shape[-2:] != (self.input_size, self.input_size):
            # antialias: canvases are usually larger than the input, plain bilinear would alias
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0).expand(-1, 3, -1, -1)  # grey -> the 3 channels the network expects
        return (x - self._mean) / self._std

    def embed(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 3:
            raise ValueError(f"expected (N, S, S) slices, got shape {images.shape}")
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                tokens = self.model(pixel_values=self._prepare(images[start : start + self.batch_size])).last_hidden_state
                cls = F.normalize(tokens[:, 0], dim=-1)
                patches = F.normalize(tokens[:, 1:].mean(dim=1), dim=-1)
                vec = F.normalize(torch.cat([cls, patches], dim=-1), dim=-1)
                out[start : start + len(vec)] = vec.float().cpu().numpy()
        return out
