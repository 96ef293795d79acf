"""One few-shot engine shared by the infer task, the ingestion worker and the strategy.

The engine's steps are not safe to call from several threads at once (SAM 2 feature caches,
torch modules), so every call that runs a network goes through :attr:`EngineHost.lock`. The bank
statistics shown in ``/info`` are a snapshot refreshed by the ingestion worker after each change:
``/info`` is called on every request by MONAI Label and must never wait for an encoder.
"""
from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fewshot import weights
from fewshot.config import ConfigError
from fewshot.pipeline import Engine, IngestReport, Segmentation, settings_hash
from fewshot.presets import PresetError, resolve_device

from lib.app_config import AppConfig

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The app cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class InferOptions:
    """The user-facing knobs of one inference (the infer task's ``config`` in ``/info``)."""

    top_k: int
    matching: bool
    memories: int

    @classmethod
    def defaults(cls, engine: Engine) -> "InferOptions":
        s = engine.settings
        return cls(
            top_k=int(s.get("retrieval", {}).get("top_k", 16)),
            matching=engine.matcher is not None,
            memories=int(s.get("selection", {}).get("keep", 4)),
        )


@dataclass(frozen=True)
class WeightsInUse:
    model: str
    path: str
    random: bool

    def __str__(self) -> str:
        return f"{self.model} ({'RANDOM weights, ' if self.random else ''}{self.path})"


class EngineHost:
    def __init__(self, config: AppConfig, engine: Engine, load_report, weights_in_use: list[WeightsInUse]):
        self.config = config
        self.engine = engine
        self.load_report = load_report
        self.weights = weights_in_use
        self.device = resolve_device(engine.settings.get("device"))
        self.defaults = InferOptions.defaults(engine)
        self.lock = threading.RLock()
        self._stats: dict = {}
        self._stats_lock = threading.Lock()
        self.refresh_stats()

    # ------------------------------------------------------------------ start-up

    @classmethod
    def open(cls, config: AppConfig) -> "EngineHost":
        settings = config.settings
        try:
            engine, report = Engine.from_settings(
                settings, bank_dir=config.bank_dir, models_dir=config.models_dir, label_names=config.labels
            )
            in_use = [
                WeightsInUse(name, str(weights.resolve(name, config.models_dir, random_weights=bool(settings.get("random_weights")))),
                             bool(settings.get("random_weights")) or weights.get_spec(name).random_only)
                for name in weights.preset_models(settings)
            ]
        except (weights.WeightsError, ConfigError, PresetError) as exc:
            raise StartupError(f"preset {config.preset!r} cannot start: {exc}") from None
        host = cls(config, engine, report, in_use)
        host._log_start()
        return host

    def _log_start(self) -> None:
        s = self.engine.settings
        logger.info("few-shot preset %r on %s: %s", self.config.preset, self.device, s.get("description", "").strip())
        for w in self.weights:
            logger.info("  weights: %s", w)
        if not self.weights:
            logger.info("  weights: none (weights-free preset)")
        logger.info("  labels: %s (%s)", self.config.labels or "{}", self.config.labels_source)
        r = self.load_report
        if r.discarded_all:
            logger.warning("support bank %s discarded (%s): it is rebuilt from the final labels", self.config.bank_dir, r.discarded_all)
        else:
            logger.info(
                "support bank reloaded from %s: %d images%s", self.config.bank_dir, len(r.loaded),
                f"; {len(r.dropped)} damaged, to rebuild: {sorted(r.dropped)}" if r.dropped else "",
            )

    def describe(self) -> str:
        s = self.engine.settings
        weights_text = "; ".join(str(w) for w in self.weights) or "none (weights-free)"
        return (
            f"Few-shot segmentation from the labelled images of this datastore. Preset {self.config.preset!r} "
            f"on {self.device}: {s.get('description', '').strip()} Weights: {weights_text}."
        )

    # ------------------------------------------------------------------ labels

    def label_map(self) -> dict[str, int]:
        """Configured names plus any value found in saved labels, ordered by value."""
        names = dict(self.config.labels)
        known = set(names.values())
        for value in self.engine.bank.label_values:
            if value not in known:
                names[str(value)] = int(value)
        return dict(sorted(names.items(), key=lambda kv: kv[1]))

    def allowed_values(self) -> list[int] | None:
        """Values an uploaded label may hold besides 0; None when no label map is configured."""
        return sorted(self.config.labels.values()) if self.config.labels else None

    # ------------------------------------------------------------------ engine calls (serialised)

    def _engine_for(self, options: InferOptions) -> Engine:
        """The shared engine, or a view of it sharing steps and bank with other retrieval knobs."""
        if options == self.defaults:
            return self.engine
        settings = copy.deepcopy(self.engine.settings)
        settings.setdefault("retrieval", {})["top_k"] = options.top_k
        settings.setdefault("selection", {})["keep"] = options.memories
        matcher = self.engine.matcher if options.matching else None
        return Engine(settings, self.engine.embedder, matcher, self.engine.transfer, self.engine.bank, self.engine.label_names)

    def segment(self, image_path: str, labels: Sequence[str | int] | None, options: InferOptions) -> Segmentation:
        with self.lock:
            return self._engine_for(options).segment(image_path, labels=labels or None)

    def ingest(self, image_id: str, image_path: str, label_path: str, source: Mapping) -> IngestReport:
        with self.lock:
            return self.engine.ingest(image_id, image_path, label_path, source=source)

    def remove(self, image_id: str) -> bool:
        with self.lock:
            return self.engine.remove(image_id)

    def stale_images(self, sources: Mapping[str, tuple[str, str]]) -> dict[str, str]:
        with self.lock:
            return self.engine.stale_images(sources)

    def bank_ids(self) -> list[str]:
        return self.engine.bank.image_ids()

    def embed_volume(self, image_path: str) -> np.ndarray:
        with self.lock:
            return np.asarray(self.engine.embed_volume(image_path), dtype=np.float32)

    def embedding_key(self) -> str:
        """Names what per-slice embeddings depend on, so cached ones are never reused by another embedder."""
        s = self.engine.settings
        return f"{self.engine.embedder.name}-{settings_hash(s.get('volume', {}), s.get('embedder', {}))}"

    # ------------------------------------------------------------------ /info snapshot

    def refresh_stats(self) -> dict:
        with self.lock:
            raw = self.engine.bank.stats()
        names = {v: n for n, v in self.label_map().items()}
        stats = {
            "images": raw["images"],
            "slices": raw["slices"],
            "per_label": {names.get(int(v), v): n for v, n in sorted(raw["per_label"].items(), key=lambda kv: int(kv[0]))},
            "negative_slices": raw.get("negative_slices", 0),
            "augmented_slices": raw.get("augmented_slices", 0),
            "index": raw.get("index"),
            "image_ids": self.bank_ids(),
        }
        with self._stats_lock:
            self._stats = stats
        return stats

    def stats(self) -> dict:
        with self._stats_lock:
            return copy.deepcopy(self._stats)

    @property
    def bank_dir(self) -> Path:
        return self.config.bank_dir
