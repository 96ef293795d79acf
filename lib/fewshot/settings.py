"""The engine's own settings sections (``volume``, ``retrieval``, ``selection``, the entry-making half
of ``bank``) as typed values, checked once when an engine is built or a call changes them, so a bad
value is one clear ConfigError before any work, not a TypeError mid-inference; and ``typed_section``,
the one reader every step's own section goes through (``embedder``, ``matcher``, ``transfer``: each
step type has its dataclass beside it, e.g. ``fewshot.match.ncc.NccSettings``).

One source of values: the preset. Every preset inherits ``configs/presets/foundation.yaml``, which
sets each of these keys with the reason for its value, so no default is repeated here; a key missing
from a hand-made settings dict is named in the error. (The faiss index's part of ``bank`` is
``fewshot.bank_index.IndexSettings``.)
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Union

from fewshot.config import ConfigError

PRESET_WITH_EVERY_KEY = "configs/presets/foundation.yaml, which every preset inherits,"


def typed_section(cls, values: Mapping | None, section: str, source: str = PRESET_WITH_EVERY_KEY,
                  strict: bool = False):
    """``cls`` (a dataclass) from the settings section ``values`` (named ``section`` in messages).

    Every field without a dataclass default is required (``source`` says which preset sets it), and
    each value must be of its declared type: int (not a bool), float (an int is taken), str, bool,
    ``Literal[...]``, a union, ``tuple[X, ...]`` or ``tuple[X, Y]`` (from a YAML list), ``dict`` or
    ``dict[str, X]``, or a nested dataclass (its own section). ``strict``: a key that is no field (a
    typo) is an error too; ``type``, which picks the step, is always allowed."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"settings section {section!r} is missing or not a mapping ({source} has it)")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in names and k != "type")
    if strict and unknown:
        raise ConfigError(f"{section} has no setting {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            out[f.name] = _typed(values[f.name], hints[f.name], f"{section}.{f.name}", source, strict)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{section}.{f.name} is not set ({source} sets it)")
    return cls(**out)


def number_or_none(value, kind: type, where: str) -> float | int | None:
    """A setting that is a number (``kind``: float or int) or none (None, "none"). A bool is an error, not 0 or 1:
    YAML reads false / off / no as one, which float() would take as 0, the opposite of none. So are text that is no
    number and a fraction where a whole number is asked for; the ConfigError names ``where``."""
    wrong = ConfigError(f"{where} must be {'a whole number' if kind is int else 'a number'} or none, not {value!r}")
    if value is None or value == "none":
        return None
    if isinstance(value, bool):
        raise wrong
    try:
        number = kind(value)
        fraction = kind is int and number != float(value)
    except (TypeError, ValueError):
        raise wrong from None
    if fraction:
        raise wrong
    return number


def _typed(value, kind, where: str, source: str, strict: bool):
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return typed_section(kind, value, where, source, strict)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
    elif origin in (Union, types.UnionType):
        for option in args:
            try:
                return _typed(value, option, where, source, strict)
            except ConfigError:
                continue
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            each = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
            if len(each) == len(value):
                return tuple(_typed(v, k, f"{where}[{i}]", source, strict) for i, (v, k) in enumerate(zip(value, each)))
    elif kind is dict or origin is dict:
        if isinstance(value, Mapping):
            item = args[1] if args else None
            return {str(k): v if item is None else _typed(v, item, f"{where}.{k}", source, strict)
                    for k, v in value.items()}
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where} must be {_describe(kind)}, not {value!r}")


def _describe(kind) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if kind is dict or origin is dict:
        return "a mapping"
    return "a " + kind.__name__ + " section" if dataclasses.is_dataclass(kind) else kind.__name__


@dataclass(frozen=True)
class IntensitySettings:
    """How a volume's intensities become [0, 1] (``volume.normalise_intensity``)."""

    modality: Literal["auto", "mr", "ct"]  # auto: CT when the volume has values below -500
    mr_percentiles: tuple[float, float]  # MR: clipped to these percentiles, then stretched
    ct_window: str | tuple[float, float]  # CT: a name from ct_windows, or [center, width] in HU
    ct_windows: dict[str, tuple[float, float]]  # named [center, width] windows

    def __post_init__(self):
        lo, hi = self.mr_percentiles
        if not 0 <= lo < hi <= 100:
            raise ConfigError(f"volume.intensity.mr_percentiles must be 0 <= low < high <= 100, not {list(self.mr_percentiles)}")
        if isinstance(self.ct_window, str) and self.ct_window not in self.ct_windows:
            raise ConfigError(f"volume.intensity.ct_window {self.ct_window!r} is not one of ct_windows: {sorted(self.ct_windows)}")
        windows = dict(self.ct_windows, **({} if isinstance(self.ct_window, str) else {"ct_window": self.ct_window}))
        for name, (_, width) in windows.items():
            if width <= 0:
                raise ConfigError(f"volume.intensity: window {name!r} needs a positive width, not {width}")

    def window(self) -> tuple[float, float]:
        """The CT window as (center, width)."""
        return self.ct_windows[self.ct_window] if isinstance(self.ct_window, str) else self.ct_window


@dataclass(frozen=True)
class VolumeSettings:
    """How a volume becomes canvas slices (``volume.volume_to_canvas``)."""

    slicing_axis: Literal["auto"] | int  # auto: the coarsest axis; or 0, 1, 2 (array axes after RAS orientation)
    pixel_spacing_mm: float  # every slice is resampled in plane to this spacing
    canvas: int  # slices are centred on a canvas of canvas x canvas pixels
    intensity: IntensitySettings

    def __post_init__(self):
        if self.slicing_axis not in ("auto", 0, 1, 2):
            raise ConfigError(f"volume.slicing_axis must be auto, 0, 1 or 2, not {self.slicing_axis!r}")
        if self.pixel_spacing_mm <= 0 or self.canvas < 8:
            raise ConfigError(f"volume.pixel_spacing_mm must be positive and volume.canvas at least 8, not "
                              f"{self.pixel_spacing_mm} and {self.canvas}")

    @classmethod
    def from_settings(cls, volume: Mapping | None) -> "VolumeSettings":
        return typed_section(cls, volume, "volume", strict=True)


@dataclass(frozen=True)
class RetrievalSettings:
    top_k: int  # candidates fetched from the bank's index per query slice

    def __post_init__(self):
        if self.top_k < 1:
            raise ConfigError(f"retrieval.top_k must be at least 1, not {self.top_k}")


@dataclass(frozen=True)
class SelectionSettings:
    keep: int  # supports kept per query slice (atlases per scan for a scan-level transfer)
    distinct_sources: bool  # at most one support per labelled slice (it or one of its augmented copies)
    candidates: int  # atlases offered to a scan-level transfer (the closest by the descriptor index)

    def __post_init__(self):
        for name in ("keep", "candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"selection.{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class EntrySettings:
    """What a labelled scan becomes in the bank (the ``bank`` section's entry-making keys)."""

    negatives_per_image: int  # organ-free slices kept per image, evenly spaced; -1 keeps them all
    augmentations_per_slice: int  # augmented copies of each labelled slice
    augmentation: dict  # the draws' ranges and seed (fewshot.bank_augment)

    def __post_init__(self):
        if self.negatives_per_image < -1 or self.augmentations_per_slice < 0:
            raise ConfigError("bank.negatives_per_image must be -1 or more and bank.augmentations_per_slice 0 or more, "
                              f"not {self.negatives_per_image} and {self.augmentations_per_slice}")


@dataclass(frozen=True)
class EngineSettings:
    volume: VolumeSettings
    retrieval: RetrievalSettings
    selection: SelectionSettings
    entries: EntrySettings

    @classmethod
    def from_settings(cls, settings: Mapping) -> "EngineSettings":
        return cls(
            volume=VolumeSettings.from_settings(settings.get("volume")),
            retrieval=typed_section(RetrievalSettings, settings.get("retrieval"), "retrieval"),
            selection=typed_section(SelectionSettings, settings.get("selection"), "selection"),
            entries=typed_section(EntrySettings, settings.get("bank"), "bank"),
        )
