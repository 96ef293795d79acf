"""Building a SAM 2 model from a config and a checkpoint: one path for real and random weights.

The config is SAM 2's own Hydra YAML (a ``model:`` node with ``_target_`` classes), either one
shipped inside the installed ``sam2`` package (``configs/sam2.1/sam2.1_hiera_t.yaml``) or one of
ours (``configs/sam2/sam2_random_tiny.yaml``). We read it with OmegaConf instead of Hydra's
``compose`` because ``compose`` only searches the sam2 package's config module.
Random weights are saved in the same ``{"model": state_dict}`` layout as Meta's checkpoints and
loaded back through :func:`build_sam2_model`, so tests exercise the loading code real weights use.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import sam2
from sam2.modeling.sam2_base import SAM2Base

from fewshot.config import CONFIGS_DIR
from fewshot.files import atomic_path

logger = logging.getLogger(__name__)

SAM2_PACKAGE_DIR = Path(sam2.__file__).resolve().parent

# The post-processing overrides sam2.build_sam.build_sam2 applies when apply_postprocessing=True
# (the default): fall back to the multimask output when the single mask is unstable.
EVAL_OVERRIDES = {
    "model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability": True,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta": 0.05,
    "model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh": 0.98,
    # ... and for the video predictor: a frame the user gave a mask is encoded into memory from the
    # binarised mask, exactly what the user sees (only calls with is_mask_from_pts: the supports).
    "model.binarize_mask_from_pts_for_mem_enc": True,
}

# Hiera's stride-32 stage must halve exactly into the FPN's stride-16 level, and the windowed
# positional embedding tiles the stride-4 grid by 8: both need image_size % 32 == 0.
IMAGE_SIZE_MULTIPLE = 32

# ``transfer.image_size: auto``. SAM 2.1 was trained at 1024: its mask logits come out at a quarter of
# the input, so at 512 a 256-px canvas gets 128² logits (2.5 mm cells at 1.25 mm pixels, 3-4 cells
# across an LV myocardium). 1024 gives 1.25 mm logits, the canvas's own resolution. On CPU 1024 is
# 7-11x slower per slice (docs/results.md), so a CPU server trades that detail for time.
AUTO_IMAGE_SIZE = {"cuda": 1024, "cpu": 512}


def resolve_image_size(setting, device: str) -> int:
    """``auto`` (or absent): 1024 on CUDA, 512 on CPU; a number; or a mapping {cuda: N, cpu: M}."""
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if setting in (None, "", "auto"):
        return AUTO_IMAGE_SIZE[kind]
    if isinstance(setting, dict):
        if kind not in setting:
            raise ValueError(f"transfer.image_size {setting} has no entry for device kind {kind!r}")
        setting = setting[kind]
    try:
        return int(setting)
    except (TypeError, ValueError):
        raise ValueError(f"transfer.image_size must be auto, a number or {{cuda: N, cpu: M}}; got {setting!r}") from None


class CheckpointMismatchError(RuntimeError):
    """A checkpoint whose state dict does not fit the configured architecture."""


def resolve_config(config_path: str | Path) -> Path:
    """An existing file as given, else relative to ``configs/``, else to the sam2 package."""
    path = Path(config_path)
    candidates = [path] if path.is_absolute() else [path, CONFIGS_DIR / path, SAM2_PACKAGE_DIR / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"SAM 2 config {str(config_path)!r} not found; looked at: " + ", ".join(str(c) for c in candidates)
    )


def load_sam2_config(config_path: str | Path, image_size: int | None = None) -> DictConfig:
    """The model config with SAM 2's eval overrides, and everything that follows ``image_size``."""
    cfg = OmegaConf.load(resolve_config(config_path))
    if "model" not in cfg or "_target_" not in cfg.model:
        raise ValueError(f"{config_path}: a SAM 2 config needs a `model` node with a `_target_`")
    for key, value in EVAL_OVERRIDES.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    if image_size is not None:
        for key, value in image_size_overrides(cfg, int(image_size)).items():
            OmegaConf.update(cfg, key, value, force_add=True)
    OmegaConf.resolve(cfg)
    return cfg


def image_size_overrides(cfg: DictConfig, image_size: int) -> dict[str, object]:
    """Config fields that must follow ``model.image_size``.

    Weight shapes do not depend on the input size (Hiera's positional embedding is interpolated,
    the prompt encoder's Fourier features are size-free), so a checkpoint trained at 1024 loads
    at 512. What does depend on it: the RoPE tables of memory attention (built for
    image_size / 16 tokens a side; RoPEAttention would rebuild them on the first call, we build them
    right), and the CUDA warm-up cache of the sine position encodings.
    """
    if image_size <= 0 or image_size % IMAGE_SIZE_MULTIPLE:
        raise ValueError(f"SAM 2 image_size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}, got {image_size}")
    stride = int(cfg.model.get("backbone_stride", 16))
    side = image_size // stride
    out: dict[str, object] = {"model.image_size": image_size}
    layer = cfg.model.memory_attention.layer
    for name in ("self_attention", "cross_attention"):
        if "feat_sizes" in layer.get(name, {}):
            out[f"model.memory_attention.layer.{name}.feat_sizes"] = [side, side]
    for node in ("image_encoder.neck.position_encoding", "memory_encoder.position_encoding"):
        target = OmegaConf.select(cfg.model, node + "._target_")
        if target and target.endswith("PositionEmbeddingSine"):
            out[f"model.{node}.image_size"] = image_size
    return out


def instantiate_sam2(cfg: DictConfig) -> SAM2Base:
    model = instantiate(cfg.model, _recursive_=True)
    if not isinstance(model, SAM2Base):
        raise TypeError(f"config builds {type(model).__name__}, expected a SAM2Base")
    return model


def load_sam2_checkpoint(model: SAM2Base, checkpoint: Path) -> None:
    """Mirrors sam2.build_sam._load_checkpoint (state dict under "model"), with errors that say why."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointMismatchError(f"{checkpoint}: not a SAM 2 checkpoint (no 'model' state dict)")
    expected = model.state_dict()
    given = state["model"]
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong_shape = sorted(
        k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape)
    )
    if missing or unexpected or wrong_shape:
        def few(keys):
            return ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} keys with other shapes: {few(wrong_shape)}")
        raise CheckpointMismatchError(
            f"{checkpoint} does not fit this SAM 2 config ({'; '.join(parts)}); "
            "is it the checkpoint of another model size?"
        )
    model.load_state_dict(given, strict=True)


def build_sam2_model(
    config_path: str | Path,
    checkpoint: Path | None,
    device: str = "cpu",
    image_size: int | None = None,
) -> SAM2Base:
    """Instantiate the config's SAM2Base, load ``checkpoint`` (None keeps the random init), eval mode."""
    cfg = load_sam2_config(config_path, image_size)
    model = instantiate_sam2(cfg)
    if checkpoint is not None:
        load_sam2_checkpoint(model, Path(checkpoint))
        logger.info("loaded SAM 2 %s from %s at image size %d", Path(str(config_path)).stem, checkpoint, model.image_size)
    model = model.to(device)
    model.eval()
    return model


def save_random_checkpoint(
    config_path: str | Path, path: Path, seed: int = 0, object_score_bias: float | None = None
) -> Path:
    """Randomly initialised weights of the config's architecture, saved like Meta's checkpoints.

    ``object_score_bias``: sets the bias of the object-score head's last layer. Random weights put
    the object score just below 0, so every object reads "absent" and nothing downstream of the
    decoder would ever run in tests; a positive bias makes the test networks emit (meaningless)
    masks so the whole path is exercised.

    Written to a temporary file beside ``path`` and moved into place, so a crash never leaves a
    half-written checkpoint under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(seed)
        model = instantiate_sam2(load_sam2_config(config_path))
    if object_score_bias is not None:
        head = model.sam_mask_decoder.pred_obj_score_head
        last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.bias.fill_(float(object_score_bias))
    with atomic_path(path, ".tmp") as tmp:
        torch.save({"model": model.state_dict()}, tmp)
    logger.info("saved random SAM 2 weights (%s, seed %d) to %s", Path(str(config_path)).stem, seed, path)
    return path
