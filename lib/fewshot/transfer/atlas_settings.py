"""The multi-atlas transfer's settings (``transfer`` of configs/presets/classic.yaml), read and checked."""
from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np

from fewshot.config import ConfigError
from fewshot.decision import LabelDecision
from fewshot.transfer import atlas_registration as reg
from fewshot.transfer.extent import LENGTHS as EXTENT_LENGTHS, METHODS as EXTENT_METHODS, ExtentSettings
from fewshot.transfer.fusion import FusionSettings, fusion_rule
from fewshot.transfer.mind import MindLevels
from fewshot.transfer.screen import ScreenSettings
from fewshot.transfer.shape import ShapeSettings

_PRESET = "configs/presets/classic.yaml"


@dataclass(frozen=True)
class AtlasSettings:
    workers: int  # processes registering atlases in parallel; 1 = in the calling process (see _run)
    threads_per_worker: int  # SimpleITK and ANTs threads inside each worker: 1 for registrations that repeat
    start_method: str  # multiprocessing start method ("spawn" is safe in threaded servers)
    cache_mb: int  # registered atlases kept for re-runs on the same query (LRU, by size)
    threshold: float  # probability above which a voxel takes its most probable label (rule threshold)
    registration: reg.RegistrationPlan
    fusion: FusionSettings
    shape: ShapeSettings
    extent: ExtentSettings
    # How fused probabilities become labels (fewshot.decision): "threshold", "distribution" (the
    # votes are one distribution, background their remainder) or "foreground" (sum, then argmax)
    decision: str
    # What selection ranks atlases by when the query is offered more than selection.keep (reg.RANKINGS):
    # the correlation after the global affine of the whole images, or within the region of the atlas's structures
    rank_by: str
    screen: ScreenSettings  # after registration: atlases that registered far worse than the best are not fused

    @classmethod
    def from_settings(cls, settings: Mapping) -> "AtlasSettings":
        def section(raw, kind, where: str):
            if not isinstance(raw, Mapping):
                raise ConfigError(f"transfer type atlas needs a {where!r} section ({_PRESET})")
            names = [f.name for f in fields(kind)]
            missing = [k for k in names if k not in raw and not _has_default(kind, k)]
            if missing:
                raise ConfigError(f"transfer.{where} needs settings {missing} ({_PRESET})")
            return kind(**{k: tuple(raw[k]) if isinstance(raw[k], (list, tuple)) else raw[k] for k in names if k in raw})

        top = ("workers", "threads_per_worker", "start_method", "cache_mb", "threshold", "decision", "margin_mm",
               "slice_order", "slice_order_margin", "rank_by")
        missing = [k for k in top if k not in settings]
        if missing:
            raise ConfigError(f"transfer type atlas needs settings {missing} ({_PRESET})")
        plan = reg.RegistrationPlan(
            global_affine=section(settings.get("global_affine"), reg.AffineLevels, "global_affine"),
            local_affine=section(settings.get("local_affine"), reg.AffineLevels, "local_affine"),
            deformable=section(settings.get("deformable"), reg.DemonsLevels, "deformable"),
            in_plane=section(settings.get("in_plane"), reg.InPlaneLevels, "in_plane"),
            mind=section(settings.get("mind"), MindLevels, "mind"),
            margin_mm=float(settings["margin_mm"]),
            slice_order=str(settings["slice_order"]),
            slice_order_margin=float(settings["slice_order_margin"]),
        )
        out = cls(
            workers=int(settings["workers"]), threads_per_worker=int(settings["threads_per_worker"]),
            start_method=str(settings["start_method"]), cache_mb=int(settings["cache_mb"]),
            threshold=float(settings["threshold"]), registration=plan,
            fusion=section(settings.get("fusion"), FusionSettings, "fusion"),
            shape=ShapeSettings.from_settings(settings.get("shape")),
            extent=ExtentSettings.from_settings(settings.get("extent")),
            decision=str(settings["decision"]), rank_by=str(settings["rank_by"]),
            screen=ScreenSettings.from_settings(settings.get("screen")),
        )
        out.validate()
        return out

    def validate(self) -> None:
        p, problems = self.registration, []
        if self.workers < 1 or self.threads_per_worker < 1:
            problems.append("workers and threads_per_worker must be >= 1")
        if self.start_method not in multiprocessing.get_all_start_methods():
            problems.append(f"start_method {self.start_method!r} is not available here")
        if p.slice_order not in ("header", "search", "geometry"):
            problems.append(f"slice_order {p.slice_order!r} must be header, search or geometry")
        for name in ("global_affine", "local_affine"):
            levels = getattr(p, name)
            if not levels.shrink_factors or min(levels.shrink_factors) < 1 or not 0 < levels.sampling <= 1:
                problems.append(f"{name}: shrink_factors must be >= 1 and sampling in (0, 1]")
        for name, methods in (("deformable", ("demons", "mind", "none")), ("in_plane", ("demons", "none"))):
            levels = getattr(p, name)
            if levels.method not in methods:
                problems.append(f"{name}.method {levels.method!r} must be {' or '.join(methods)}")
            if levels.method == "demons" and (len(levels.shrink_factors) != len(levels.iterations) or not levels.iterations):
                problems.append(f"{name}: shrink_factors and iterations need the same, non-zero length")
        m = p.mind
        if not (m.spacing_mm > 0 and m.grid >= 1 and m.search >= 1 and m.iterations >= 1 and m.adam_grid >= 1
                and m.smoothness >= 0 and m.max_voxels >= 1000):
            problems.append("mind: spacing_mm > 0, grid >= 1, search >= 1, iterations >= 1, adam_grid >= 1, smoothness >= 0 "
                            "and max_voxels >= 1000")
        if 0 not in p.in_plane.slice_shifts or len(set(p.in_plane.slice_shifts)) != len(p.in_plane.slice_shifts):
            problems.append("in_plane.slice_shifts must hold 0 (the registered result) and no repeats, e.g. [-1, 0, 1]")
        if p.in_plane.affine not in ("none", "rigid", "similarity"):
            problems.append(f"in_plane.affine {p.in_plane.affine!r} must be none, rigid or similarity")
        if self.fusion.shifted_votes not in ("joint", "local"):
            problems.append(f"fusion.shifted_votes {self.fusion.shifted_votes!r} must be joint or local")
        if self.fusion.method not in ("joint", "majority"):
            problems.append(f"fusion.method {self.fusion.method!r} must be joint or majority")
        if len(self.fusion.patch_radius) != 3 or min(self.fusion.patch_radius) < 0:
            problems.append("fusion.patch_radius needs three non-negative voxel counts (slice, row, column)")
        correlation, rule = self.fusion.correlation, fusion_rule(self.fusion.correlation)
        if not isinstance(self.fusion.nonnegative, bool) or not (  # 1 == True: types, not values, tell them apart
                isinstance(correlation, bool) or correlation == "bank" or (rule is not None and rule >= 2)):
            problems.append("fusion.nonnegative must be true or false, fusion.correlation true, false, bank or a "
                            "number of atlases >= 2 (correlation from that many fused atlases on)")
        if len(self.fusion.patch_radius) == 3 and int(np.prod([2 * int(r) + 1 for r in self.fusion.patch_radius])) < 3:
            problems.append("fusion.patch_radius needs a patch of at least 3 voxels (ANTs compares no smaller patch)")
        if self.fusion.implementation not in ("vectorised", "ants"):
            problems.append(f"fusion.implementation {self.fusion.implementation!r} must be vectorised or ants")
        elif self.fusion.implementation == "vectorised" and self.fusion.nonnegative is True:
            problems.append("fusion.nonnegative needs fusion.implementation: ants (the vectorised fusion solves "
                            "without the constraint)")
        if self.fusion.flat_atlas_patches not in ("centred", "ants"):
            problems.append(f"fusion.flat_atlas_patches {self.fusion.flat_atlas_patches!r} must be centred or ants")
        search = self.fusion.search_radius
        if (len(search) != 3 or min(search) < 0) if isinstance(search, tuple) else int(search) < 0:
            problems.append("fusion.search_radius needs one or three (slice, row, column) non-negative voxel counts")
        try:  # the rule and its threshold are checked where they are defined
            LabelDecision(self.threshold, self.decision)
        except ValueError as exc:
            problems.append(str(exc))
        if self.shape.min_solidity is not None and not 0 < self.shape.min_solidity <= 1:
            problems.append("shape.min_solidity must lie in (0, 1], or be none")
        if self.extent.method not in EXTENT_METHODS or self.extent.length not in EXTENT_LENGTHS or self.extent.slack < 0:
            problems.append(f"extent.method must be one of {list(EXTENT_METHODS)}, extent.length one of "
                            f"{list(EXTENT_LENGTHS)} and extent.slack >= 0")
        if not isinstance(self.extent.relative, bool):
            problems.append(f"extent.relative must be true or false, not {self.extent.relative!r}")
        if self.screen.margin is not None and not 0 <= self.screen.margin <= 2:
            problems.append(f"screen.margin must lie in [0, 2] (a correlation's range), or be none, not {self.screen.margin}")
        if self.screen.max_atlases is not None and self.screen.max_atlases < 2:
            problems.append("screen.max_atlases must be 2 or more (one atlas has none to compare with), or none")
        if self.rank_by not in reg.RANKINGS:
            problems.append(f"rank_by {self.rank_by!r} must be one of {', '.join(reg.RANKINGS)}")
        if problems:
            raise ConfigError("transfer atlas settings: " + "; ".join(problems))


def _has_default(kind, name: str) -> bool:
    from dataclasses import MISSING

    f = next(f for f in fields(kind) if f.name == name)
    return f.default is not MISSING
