"""The engine's own settings sections (``retrieval``, ``selection``, the entry-making half of ``bank``)
as typed values, checked once when an engine is built or a call changes them, so a bad value is one
clear ConfigError before any work, not a TypeError mid-inference.

One source of values: the preset. Every preset inherits ``configs/presets/foundation.yaml``, which
sets each of these keys with the reason for its value, so no default is repeated here; a key missing
from a hand-made settings dict is named in the error. (The faiss index's part of ``bank`` is
``fewshot.bank_index.IndexSettings``; each step's own section is read by that step.)
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from fewshot.config import ConfigError

PRESET_WITH_EVERY_KEY = "configs/presets/foundation.yaml, which every preset inherits,"


def typed_section(cls, values: Mapping | None, section: str, source: str = PRESET_WITH_EVERY_KEY):
    """``cls`` (a dataclass of int, bool, float, str and dict fields) from the settings section
    ``values`` (named ``section`` in messages): every field required (``source`` says which preset
    sets it), each of its declared type (an int is not a bool; a float may be written 1)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"settings section {section!r} is missing or not a mapping ({source} has it)")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            raise ConfigError(f"{section}.{f.name} is not set ({source} sets it)")
        value, kind = values[f.name], hints[f.name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{section}.{f.name} must be {kind.__name__}, not {value!r}")
        out[f.name] = value
    return cls(**out)


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
    retrieval: RetrievalSettings
    selection: SelectionSettings
    entries: EntrySettings

    @classmethod
    def from_settings(cls, settings: Mapping) -> "EngineSettings":
        return cls(
            retrieval=typed_section(RetrievalSettings, settings.get("retrieval"), "retrieval"),
            selection=typed_section(SelectionSettings, settings.get("selection"), "selection"),
            entries=typed_section(EntrySettings, settings.get("bank"), "bank"),
        )
