"""Presets and settings: YAML files under ``configs/``, merged with user overrides.

A preset file may name a parent with ``inherits: <preset>``; its keys are deep-merged over the
parent's. Overrides use dotted keys (``retrieval.top_k=8``), as MONAI Label's ``-c`` options and
the CLI's ``--set`` pass them.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

# configs/ sits at the project's top level, beside lib/; FEWSHOT_CONFIGS points elsewhere.
CONFIGS_DIR = Path(os.environ.get("FEWSHOT_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


class ConfigError(ValueError):
    """A preset or override that cannot be used; the message says which and why."""


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
        cfg = deep_merge(load_preset(parent), cfg)
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


def parse_label_map(text: str | Mapping | None) -> dict[str, int]:
    """'liver=1,spleen=4' or {'liver': 1} -> {'liver': 1, 'spleen': 4}; values must be positive ints."""
    if not text:
        return {}
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ConfigError(f"label {part!r} must look like name=value")
            name, value = part.split("=", 1)
            items.append((name.strip(), value.strip()))
    out: dict[str, int] = {}
    for name, value in items:
        try:
            v = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"label {name!r} has value {value!r}, which is not an integer") from None
        if v <= 0:
            raise ConfigError(f"label {name!r} has value {v}; label values must be positive (0 is background)")
        out[str(name)] = v
    return out
