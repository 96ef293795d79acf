"""Presets and settings: YAML files under ``configs/``, merged with user overrides.

A preset file may name a parent with ``inherits: <preset>``; its keys are deep-merged over the
parent's, except that a section naming another step ``type`` than the parent's replaces it
whole. Overrides use dotted keys (``retrieval.top_k=8``), as MONAI Label's ``-c`` options and the
CLI's ``--set`` pass them.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

# configs/ sits at the project's top level, beside lib/; FEWSHOT_CONFIGS points elsewhere.
CONFIGS_DIR = Path(os.environ.get("FEWSHOT_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


class ConfigError(ValueError):
    """A preset or override that cannot be used; the message says which and why."""


class PresetError(ConfigError):
    """A preset whose steps cannot be built here (an unknown step type, a device this machine lacks)."""


def resolve_device(setting: str | None) -> str:
    """The ``device`` setting -> the torch device to use: ``auto`` (or none) picks CUDA when present."""
    import torch

    if setting in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(setting).startswith("cuda") and not torch.cuda.is_available():
        raise PresetError(f"device {setting!r} requested but CUDA is not available on this machine; use device cpu")
    return str(setting)


def settings_hash(*sections: Mapping) -> str:
    """A short digest of settings sections: what caches and bank fingerprints key on."""
    return hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:12]


def available_presets() -> list[str]:
    return sorted(p.stem for p in (CONFIGS_DIR / "presets").glob("*.yaml"))


def deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping, not {type(data).__name__}")
    return data


def load_preset(name: str, overrides: Mapping[str, Any] | None = None) -> dict:
    """The full settings of preset ``name`` with ``overrides`` (dotted keys) applied."""
    path = CONFIGS_DIR / "presets" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")
    cfg = _read_yaml(path)
    parent = cfg.pop("inherits", None)
    if parent:
        base = load_preset(parent)
        for section, value in cfg.items():
            # A step of another type takes none of the parent step's parameters: merged, classic would
            # carry foundation's `model: dinov2-vits14` into its settings, /info and metrics.
            if isinstance(value, Mapping) and isinstance(base.get(section), dict) \
                    and "type" in value and value["type"] != base[section].get("type"):
                base.pop(section)
        cfg = deep_merge(base, cfg)
    cfg["name"] = name
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    return cfg


def parse_value(text: str) -> Any:
    """'8' -> 8, 'true' -> True, '[1, 2]' -> [1, 2]; YAML rules, strings stay strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    if isinstance(value, str):
        value = parse_value(value)
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """['retrieval.top_k=8', ...] -> {'retrieval.top_k': 8}."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value.strip())
    return out


def _as_int(text) -> int | None:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def parse_label_map(text: str | Mapping | None) -> dict[str, int]:
    """'liver=1,spleen=4', '1=liver,4=spleen' or {'liver': 1} -> {'liver': 1, 'spleen': 4}.

    Each pair may be written name=value or value=name (issue 4 writes ``--labels 1=liver``): the
    side that is an integer is the value. Values must be positive; a pair of two integers or of two
    names is ambiguous and refused.
    """
    if not text:
        return {}
    if isinstance(text, Mapping):
        pairs = [(k, v, f"{k}: {v}") for k, v in text.items()]
    else:
        pairs = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"label {part.strip()!r} must look like name=value (or value=name)")
            left, right = (t.strip() for t in part.split("=", 1))
            pairs.append((left, right, part.strip()))
    out: dict[str, int] = {}
    for left, right, written in pairs:
        left_int, right_int = _as_int(left), _as_int(right)
        if left_int is not None and right_int is not None:
            raise ConfigError(f"label {written!r} has two integers: write name=value, e.g. liver=1")
        if left_int is None and right_int is None:
            raise ConfigError(f"label {written!r} has no integer value: write name=value, e.g. liver=1")
        name, v = (str(left), right_int) if right_int is not None else (str(right), left_int)
        if v <= 0:
            raise ConfigError(f"label {name!r} has value {v}; label values must be positive (0 is background)")
        if name in out and out[name] != v:
            raise ConfigError(f"label {name!r} is given two values, {out[name]} and {v}")
        out[name] = v
    return out
