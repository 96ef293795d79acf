"""LPIPS re-ranking: perceptual distance between the query slice and each retrieved candidate.

The `lpips` package ships its calibrated linear heads; its AlexNet trunk would normally come
from torchvision's download cache. We build the trunk empty (``pnet_rand=True`` ->
``torchvision.models.alexnet(weights=None)``, no network access) and load the ImageNet weights
from the file the weights registry resolved, so real and random weights take the same path.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fewshot.config import ConfigError, resolve_device
from fewshot.settings import typed_section

logger = logging.getLogger(__name__)


class BackboneMismatchError(RuntimeError):
    """A backbone file that is not a torchvision AlexNet state dict."""


def load_alexnet_trunk(net: torch.nn.Module, backbone_path: Path) -> None:
    """Copy ``features.N.*`` of a torchvision AlexNet state dict into lpips' ``sliceK.N.*`` modules.

    lpips keeps torchvision's layer indices when it splits ``features`` into slices, so the
    index N is the key to the mapping; every trunk parameter must be found with its shape.
    """
    state = torch.load(backbone_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    target = net.state_dict()
    mapped, problems = {}, []
    for key, param in target.items():
        _slice, index, name = key.split(".")  # e.g. slice2.3.weight
        source = f"features.{index}.{name}"
        if source not in state:
            problems.append(f"{source} missing")
        elif tuple(state[source].shape) != tuple(param.shape):
            problems.append(f"{source} has shape {tuple(state[source].shape)}, expected {tuple(param.shape)}")
        else:
            mapped[key] = state[source]
    if problems:
        raise BackboneMismatchError(
            f"{backbone_path} is not a torchvision AlexNet state dict: " + "; ".join(problems[:4])
        )
    net.load_state_dict(mapped, strict=True)


@dataclass(frozen=True)
class LpipsSettings:
    """The ``matcher`` section of ``type: lpips`` (configs/presets/foundation.yaml)."""

    model: str  # the AlexNet trunk's name in configs/models.yaml
    size: int  # LPIPS compares slices resized to size x size (its cost is quadratic in it)

    @classmethod
    def from_settings(cls, settings: Mapping) -> "LpipsSettings":
        out = typed_section(cls, settings, "matcher", strict=True)
        if out.size < 32:
            raise ConfigError(f"matcher.size must be at least 32 pixels for AlexNet's strides, got {out.size}")
        return out


class LpipsMatcher:
    """distances(query (S, S), candidates (M, S, S)) -> (M,) LPIPS distances, lower = closer."""

    def __init__(self, backbone_path: Path, settings: Mapping, device: str = "cpu"):
        self.settings = LpipsSettings.from_settings(settings)  # checked before anything heavy loads
        import lpips  # heavy import, only when the step is built

        self.backbone_path = Path(backbone_path)
        self.device = resolve_device(device)
        self.size = self.settings.size
        with warnings.catch_warnings():
            # lpips passes torchvision's deprecated `pretrained=False`; harmless here
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
        load_alexnet_trunk(model.net, self.backbone_path)
        self.model = model.to(self.device).eval()
        self.name = f"lpips-alex-{self.size}"
        logger.info("LPIPS matcher: AlexNet trunk from %s, %d px, %s", self.backbone_path, self.size, self.device)

    def _prepare(self, images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)[:, None]
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return (x.clamp(0.0, 1.0) * 2.0 - 1.0).expand(-1, 3, -1, -1)  # LPIPS expects RGB in [-1, 1]

    def distances(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        candidates = np.asarray(candidates)
        if candidates.ndim != 3 or np.asarray(query).ndim != 2:
            raise ValueError(f"expected query (S, S) and candidates (M, S, S), got {np.shape(query)} and {candidates.shape}")
        if len(candidates) == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            # one batched call: the (1, ...) query features broadcast against all M candidates
            d = self.model(self._prepare(np.asarray(query)[None]), self._prepare(candidates))
        return d.reshape(-1).float().cpu().numpy()
