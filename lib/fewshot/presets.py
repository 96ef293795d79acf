"""Build a preset's three steps from its settings.

Each step's ``type`` names a builder below; parameters come from the preset's YAML. A new preset
that recombines or re-parameterises these steps is a new file in ``configs/presets/``, no code.
"""
from __future__ import annotations

import logging
from typing import Callable, Mapping

from fewshot import weights
from fewshot.config import PresetError, resolve_device
from fewshot.types import Embedder, LabelTransfer, Matcher

logger = logging.getLogger(__name__)




class _Context:
    def __init__(self, settings: Mapping, models_dir):
        self.random_weights = bool(settings.get("random_weights", False))
        self.models_dir = weights.models_dir(models_dir)
        self.device = resolve_device(settings.get("device"))

    def checkpoint(self, name: str):
        return weights.resolve(name, self.models_dir, random_weights=self.random_weights)


def _dinov2(section, ctx: _Context) -> Embedder:
    from fewshot.embed.dinov2 import Dinov2Embedder

    return Dinov2Embedder(ctx.checkpoint(section["model"]), section, ctx.device)


def _descriptor(section, ctx: _Context) -> Embedder:
    from fewshot.embed.descriptor import DescriptorEmbedder

    return DescriptorEmbedder(section)


def _lpips(section, ctx: _Context) -> Matcher:
    from fewshot.match.lpips_match import LpipsMatcher

    return LpipsMatcher(ctx.checkpoint(section["model"]), section, ctx.device)


def _ncc(section, ctx: _Context) -> Matcher:
    from fewshot.match.ncc import NccMatcher

    return NccMatcher(section)


def _sam2(section, ctx: _Context) -> LabelTransfer:
    from fewshot.transfer.sam2_memory import Sam2Transfer

    from fewshot.transfer.sam2_model import resolve_image_size

    name = section["model"]
    spec = weights.get_spec(name)
    size = resolve_image_size(section.get("image_size"), ctx.device)
    logger.info("SAM 2 input size %d on %s (transfer.image_size: %s)", size, ctx.device, section.get("image_size", "auto"))
    return Sam2Transfer.from_settings(
        dict(section, image_size=size),
        checkpoint_path=ctx.checkpoint(name),
        config_path=spec.sam2_config,
        device=ctx.device,
        model_id=name + ("-random" if ctx.random_weights and not spec.random_only else ""),
    )


def _registration(section, ctx: _Context) -> LabelTransfer:
    from fewshot.transfer.registration import RegistrationTransfer

    return RegistrationTransfer(section)


def _atlas(section, ctx: _Context) -> LabelTransfer:
    from fewshot.transfer.atlas import AtlasTransfer

    return AtlasTransfer(section)


EMBEDDERS: dict[str, Callable] = {"dinov2": _dinov2, "descriptor": _descriptor}
MATCHERS: dict[str, Callable] = {"lpips": _lpips, "ncc": _ncc}
TRANSFERS: dict[str, Callable] = {"sam2": _sam2, "registration": _registration, "atlas": _atlas}


def _pick(table: Mapping[str, Callable], section: Mapping, what: str) -> Callable:
    kind = section.get("type")
    if kind not in table:
        raise PresetError(f"{what} type {kind!r} is unknown; available: {', '.join(sorted(table))}")
    return table[kind]


def _check_weights_present(settings: Mapping, ctx: _Context) -> None:
    """Fail before loading anything, naming every missing weight at once (not one per attempt)."""
    if ctx.random_weights:
        return
    problems, missing = [], []
    for name in weights.preset_models(settings):
        try:
            weights.resolve(name, ctx.models_dir)
        except weights.MissingWeightsError as exc:
            problems.append(str(exc))
            missing.append(name)
    if len(problems) == 1:
        error = weights.MissingWeightsError(problems[0])
    elif problems:
        # One short message: the paths and sources of each file are in `models list`.
        dir_flag = "" if ctx.models_dir == weights.models_dir() else f" --models-dir {ctx.models_dir}"
        error = weights.MissingWeightsError(
            f"preset {settings.get('name')!r} needs weights that are not in {ctx.models_dir}: {', '.join(missing)}. "
            f"Fetch them with `python -m fewshot models download {' '.join(missing)}{dir_flag}` (without internet, "
            f"`python -m fewshot models list{dir_flag}` names each file to copy there)"
        )
    else:
        return
    error.missing, error.models_dir = missing, ctx.models_dir
    raise error


def build_steps(settings: Mapping, models_dir=None) -> tuple[Embedder, Matcher | None, LabelTransfer]:
    """-> (embedder, matcher or None when matching is off, transfer). Fails fast on missing weights."""
    ctx = _Context(settings, models_dir)
    _check_weights_present(settings, ctx)
    if ctx.random_weights:
        logger.warning(
            "preset %r uses RANDOM WEIGHTS: its masks are meaningless (for tests and timing only)",
            settings.get("name"),
        )
    matcher_section = settings.get("matcher", {}) or {}
    embedder = _pick(EMBEDDERS, settings.get("embedder", {}), "embedder")(settings["embedder"], ctx)
    matcher = None
    if matcher_section.get("type", "none") not in (None, "none", False):
        matcher = _pick(MATCHERS, matcher_section, "matcher")(matcher_section, ctx)
    transfer = _pick(TRANSFERS, settings.get("transfer", {}), "transfer")(settings["transfer"], ctx)
    logger.info(
        "preset %r on %s: embedder %s, matcher %s, transfer %s",
        settings.get("name"), ctx.device, embedder.name, getattr(matcher, "name", "off"), transfer.name,
    )
    return embedder, matcher, transfer
