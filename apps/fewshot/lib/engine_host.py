"""One few-shot engine shared by the infer task, the ingestion worker and the strategy.

:attr:`EngineHost.lock` guards the bank's contents: a segmentation holds it from retrieval to the
last support slice it reads, and a change to the bank (commit of an ingestion, removal) takes it.
Encoding a label's slices for the bank, the expensive part of an ingestion, runs outside the lock,
so an inference asked for meanwhile does not wait for it (the networks run in inference mode and
their caches have their own locks). The bank statistics and label values shown in ``/info`` are a
snapshot refreshed after each change: ``/info`` is called by every client action and must never
wait for an encoder.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from fewshot import bank_holders, weights
from fewshot.annotation import Annotation
from fewshot.bank import SupportBank
from fewshot.config import ConfigError
from fewshot.coverage import Proposal, propose
from fewshot.config import settings_hash
from fewshot.engine import Engine
from fewshot.segmentation import IngestReport, SegmentOptions, Segmentation
from fewshot.presets import PresetError, resolve_device
from fewshot.volume import CANVAS_VERSION

from lib.app_config import AppConfig

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The app cannot start; the message says why and what to do."""


def missing_weights_message(config: AppConfig, exc: Exception) -> str:
    """One short message naming both ways forward: fetch the weights, or a weights-free preset."""
    missing = getattr(exc, "missing", None)
    if not missing:  # one weight: the engine's message names its file and source
        return f"preset {config.preset!r} cannot start: {exc}. Or start without weights: -c preset classic"
    where = getattr(exc, "models_dir", None) or config.models_dir
    flag = f" --models-dir {where}" if config.models_dir else ""
    return (
        f"preset {config.preset!r} needs weights that are not in {where} ({', '.join(missing)}). Either fetch them: "
        f"`python -m fewshot models download {' '.join(missing)}{flag}` (without internet, `python -m fewshot models "
        f"list{flag}` names the files to copy there), or start without weights: -c preset classic"
    )


@dataclass(frozen=True)
class InferOptions:
    """The user-facing knobs of one inference (the infer task's ``config`` in ``/info``)."""

    top_k: int
    matching: bool
    memories: int

    @classmethod
    def defaults(cls, engine: Engine) -> "InferOptions":
        return cls(top_k=engine.config.retrieval.top_k, matching=engine.matcher is not None,
                   memories=engine.config.selection.keep)


@dataclass(frozen=True)
class WeightsInUse:
    model: str
    path: str
    random: bool

    def __str__(self) -> str:
        return f"{self.model} ({'RANDOM weights, ' if self.random else ''}{self.path})"


# Tests only: "IMAGE_ID=SECONDS" pauses that image's ingestions between encoding and commit, so that
# a test can act (kill the server, run an inference) while an ingestion is certainly in flight; the
# pause ends early once the file named by TEST_RELEASE_ENV exists (a long pause costs a test nothing).
TEST_PAUSE_ENV = "FEWSHOT_APP_TEST_INGEST_PAUSE"
TEST_RELEASE_ENV = "FEWSHOT_APP_TEST_INGEST_RELEASE"


def _test_pause() -> tuple[str, float] | None:
    text = os.environ.get(TEST_PAUSE_ENV, "").strip()
    if not text:
        return None
    image_id, _, seconds = text.rpartition("=")
    return image_id, float(seconds)


# Tests only: seconds each inference step waits, so a test can watch the progress advance.
TEST_STEP_PAUSE_ENV = "FEWSHOT_APP_TEST_INFER_STEP_PAUSE"


def _paced(step):
    pause = float(os.environ.get(TEST_STEP_PAUSE_ENV, "0") or 0)
    if pause <= 0:
        return step

    def paced(done, total):
        step(done, total)
        time.sleep(pause)

    return paced


class _CommitLockedBank:
    """The engine's bank as its ``ingest`` sees it: everything passes through, except that the
    commit (``put``) waits for the host's lock. Lets ``Engine.ingest`` encode without the lock."""

    def __init__(self, bank: SupportBank, lock: threading.RLock, pause: tuple[str, float] | None = None):
        self._bank, self._lock, self._pause = bank, lock, pause

    def put(self, image_id, batch, source=None):
        if self._pause and self._pause[0] == image_id:
            logger.warning("test hook (%s): ingestion of %r paused %.1f s before its commit", TEST_PAUSE_ENV, image_id, self._pause[1])
            release, until = os.environ.get(TEST_RELEASE_ENV, ""), time.monotonic() + self._pause[1]
            while time.monotonic() < until and not (release and os.path.exists(release)):
                time.sleep(0.1)
        with self._lock:
            return self._bank.put(image_id, batch, source)

    def __getattr__(self, name):
        return getattr(self._bank, name)

    def __contains__(self, image_id):
        return image_id in self._bank


class EngineHost:
    def __init__(self, config: AppConfig, engine: Engine, load_report, weights_in_use: list[WeightsInUse], read_only: bool = False):
        self.config = config
        self.engine = engine
        self.load_report = load_report
        self.weights = weights_in_use
        self.read_only = read_only
        self.device = resolve_device(engine.settings.get("device"))
        self.defaults = InferOptions.defaults(engine)
        self.lock = threading.RLock()
        self._ingest_engine = Engine(
            engine.settings, engine.embedder, engine.matcher, engine.transfer,
            _CommitLockedBank(engine.bank, self.lock, _test_pause()), engine.label_names,
        )
        self._stats: dict = {}
        self._label_values: list[int] = []
        self._stats_lock = threading.Lock()
        self._manifest_seen: tuple = ((), None)  # (manifest stamp, bank_replaced's answer for it)
        self.refresh_stats()

    # ------------------------------------------------------------------ start-up

    @classmethod
    def open(cls, config: AppConfig, read_only: bool = False) -> "EngineHost":
        """``read_only``: for MONAI Label's background-task process, which must never write the
        bank the live server owns."""
        settings = config.settings
        # Held for this process's life: a CLI run with other settings then builds its own bank
        # beside it instead of replacing it (fewshot.bank_holders).
        bank_holders.hold(config.bank_dir)
        try:
            engine, report = Engine.from_settings(
                settings, bank_dir=lambda fingerprint: cls._bank_dir(config, fingerprint, read_only),
                models_dir=config.models_dir, label_names=config.labels, read_only=read_only,
            )
            in_use = [
                WeightsInUse(name, str(weights.resolve(name, config.models_dir, random_weights=bool(settings.get("random_weights")))),
                             bool(settings.get("random_weights")) or weights.get_spec(name).random_only)
                for name in weights.preset_models(settings)
            ]
        except weights.MissingWeightsError as exc:
            raise StartupError(missing_weights_message(config, exc)) from None
        except (weights.WeightsError, ConfigError, PresetError) as exc:
            raise StartupError(f"preset {config.preset!r} cannot start: {exc}") from None
        host = cls(config, engine, report, in_use, read_only=read_only)
        host._log_start()
        return host

    @staticmethod
    def _bank_dir(config: AppConfig, fingerprint: str, read_only: bool) -> Path:
        """The bank directory, unless opening it would replace a bank built with other settings that
        another process (a CLI run, a batch) is using: then start-up stops and says so."""
        recorded = bank_holders.recorded_fingerprint(config.bank_dir)
        if not read_only and recorded and recorded != fingerprint and bank_holders.used_elsewhere(config.bank_dir):
            raise StartupError(
                f"support bank {config.bank_dir} was built with other settings ({recorded}) and another process (a "
                f"`python -m fewshot` run?) is using it; this server needs {fingerprint}. Wait for that process to "
                "end (or stop it), then start the server again"
            )
        return config.bank_dir

    def bank_replaced(self) -> str | None:
        """Why the bank on disk is no longer this server's (another process replaced it with a bank
        built with other settings, or removed it), or None. One ``stat`` when nothing changed."""
        path = self.config.bank_dir / "manifest.json"
        try:
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._stats_lock:
            had_images = bool(self._stats.get("images"))
            if (stamp, had_images) == self._manifest_seen[0]:
                return self._manifest_seen[1]
        if stamp is None:
            reason = "its folder or manifest was removed" if had_images else None
        else:
            recorded = bank_holders.recorded_fingerprint(self.config.bank_dir)
            reason = None if recorded == self.engine.bank.fingerprint else (
                f"it now holds a bank built with other settings ({recorded})" if recorded else "its manifest is unreadable")
        with self._stats_lock:
            self._manifest_seen = ((stamp, had_images), reason)
        return reason

    def _log_start(self) -> None:
        s = self.engine.settings
        logger.info("few-shot preset %r on %s: %s", self.config.preset, self.device, s.get("description", "").strip())
        for w in self.weights:
            logger.info("  weights: %s", w)
        if not self.weights:
            logger.info("  weights: none (weights-free preset)")
        logger.info("  labels: %s (%s)", self.config.labels or "{}", self.config.labels_source)
        r = self.load_report
        if self.read_only:
            logger.info("support bank %s opened read-only: %d images", self.config.bank_dir, len(self.engine.bank.image_ids()))
        elif r.discarded_all:
            logger.warning("support bank %s discarded (%s): it is rebuilt from the final labels", self.config.bank_dir, r.discarded_all)
        else:
            logger.info(
                "support bank reloaded from %s: %d images%s", self.config.bank_dir, len(r.loaded),
                f"; {len(r.dropped)} damaged, to rebuild: {sorted(r.dropped)}" if r.dropped else "",
            )

    def warm(self) -> None:
        """The engine's start (registration workers, compiled loops), run in the background at start-up so
        that the first Run does not wait for it. A failure is only logged: the first Run starts them then."""
        try:
            seconds = self.engine.warm()
        except Exception:  # noqa: BLE001 - an optimisation, never an error of its own
            logger.exception("engine warm-up failed; the first segmentation starts what it needs")
            return
        if seconds:
            logger.info("engine started in %.1f s (%s): the first segmentation need not", sum(seconds.values()),
                        ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))

    def prepare_bank(self) -> bool:
        """An idle task of the bank worker, after each change: what the engine can do for the bank ahead of the
        next Run (``classic``'s fusion measure with ``fusion.correlation: bank``), so that no Run waits for it.
        Not under the lock: Runs go on meanwhile (one that needs the choice waits for it rather than redo it).
        -> False: nothing more until the next change."""
        try:
            seconds = self.engine.prepare_bank()
        except Exception:  # noqa: BLE001 - an optimisation: the next Run does it itself
            logger.exception("preparing the bank ahead of the next Run failed; the next Run does it")
            return False
        if sum(seconds.values()) > 0:
            logger.info("bank prepared for the next Run in %.1f s (%s)", sum(seconds.values()),
                        ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
        return False

    def transfer_summary(self) -> dict:
        """The transfer step as it runs on this device (e.g. SAM 2's input size, resolved from ``auto``)."""
        transfer = self.engine.transfer
        summary = {"type": transfer.name}
        if getattr(transfer, "image_size", None):
            summary["image_size"] = int(transfer.image_size)
        return summary

    def describe(self) -> str:
        s = self.engine.settings
        weights_text = "; ".join(str(w) for w in self.weights) or "none (weights-free)"
        return (
            f"Few-shot segmentation from the labelled images of this datastore. Preset {self.config.preset!r} "
            f"on {self.device}: {s.get('description', '').strip()} Weights: {weights_text}."
        )

    # ------------------------------------------------------------------ labels

    def label_map(self) -> dict[str, int]:
        """Configured names plus any value found in saved labels (as of the last bank change),
        ordered by value."""
        names = dict(self.config.labels)
        known = set(names.values())
        with self._stats_lock:
            found = list(self._label_values)
        for value in found:
            if value not in known:
                names[str(value)] = int(value)
        return dict(sorted(names.items(), key=lambda kv: kv[1]))

    def allowed_values(self) -> list[int] | None:
        """Values an uploaded label may hold besides 0: every label ``/info`` lists (configured, or
        found in a saved label, which the datastore already holds); None when no label map is
        configured."""
        return sorted(self.label_map().values()) if self.config.labels else None

    # ------------------------------------------------------------------ engine calls (serialised)

    def _segment_options(self, options: InferOptions) -> SegmentOptions | None:
        """A request's retrieval knobs as per-call options: one engine, and its caches, serve every request."""
        if options == self.defaults:
            return None
        return SegmentOptions(top_k=options.top_k, keep=options.memories, matching=options.matching)

    def segment(self, image_path: str, labels: Sequence[str | int] | None, options: InferOptions,
                progress=None) -> Segmentation:
        """``progress``: an ``InferenceProgress`` (lib.progress), told when the lock is held and fed
        the engine's per-step callback."""
        with self.lock:  # retrieval and the support slices it names must come from one bank state
            if progress is None:
                return self.engine.segment(image_path, labels=labels or None, options=self._segment_options(options))
            progress.stage_to("preparing")
            return self.engine.segment(image_path, labels=labels or None, progress=_paced(progress.step),
                                      options=self._segment_options(options))

    def ingest(self, image_id: str, image_path: str, label_path: str, source: Mapping,
               annotation: Annotation | None = None) -> IngestReport:
        """Encodes without the lock; only the commit takes it (see _CommitLockedBank)."""
        self._writable()
        return self._ingest_engine.ingest(image_id, image_path, label_path, source=source, annotation=annotation)

    def remove(self, image_id: str) -> bool:
        self._writable()
        with self.lock:
            return self.engine.remove(image_id)

    def _writable(self) -> None:
        if self.read_only:
            raise RuntimeError("the support bank is read-only in this process (a MONAI Label background task)")

    def stale_images(self, sources: Mapping[str, tuple[str, str]],
                     annotation_of: Callable[[str], Annotation] | None = None) -> dict[str, str]:
        """The engine's stale images, those whose entries were made for another annotated part of the
        label than the datastore now records included (e.g. a bank built before a partial save)."""
        with self.lock:
            return self.engine.stale_images(sources, annotation_of)

    def bank_ids(self) -> list[str]:
        with self.lock:
            return self.engine.bank.image_ids()

    def propose(self, embeddings: Mapping[str, np.ndarray]) -> Proposal:
        with self.lock:
            return propose(self.engine.bank, embeddings)

    def embed_volume(self, image_path: str) -> np.ndarray:
        # No bank access: runs beside inferences and commits.
        return np.asarray(self.engine.embed_volume(image_path), dtype=np.float32)

    def embedding_key(self) -> str:
        """Names what per-slice embeddings depend on, so cached ones are never reused by another embedder."""
        s = self.engine.settings
        return f"{self.engine.embedder.name}-{settings_hash({'canvas_version': CANVAS_VERSION}, s.get('volume', {}), s.get('embedder', {}))}"

    # ------------------------------------------------------------------ /info snapshot

    def refresh_stats(self) -> dict:
        with self.lock:
            raw = self.engine.bank.stats()
            values = list(self.engine.bank.label_values)
            ids = self.engine.bank.image_ids()
            partial = {}
            for image_id in ids:
                annotation = self.engine.bank.record(image_id)["source"].get("annotation")
                if annotation and annotation.get("partial"):
                    partial[image_id] = annotation
        with self._stats_lock:
            self._label_values = values
        names = {v: n for n, v in self.label_map().items()}
        stats = {
            "images": raw["images"],
            "slices": raw["slices"],
            "per_label": {names.get(int(v), v): n for v, n in sorted(raw["per_label"].items(), key=lambda kv: int(kv[0]))},
            "negative_slices": raw.get("negative_slices", 0),
            "augmented_slices": raw.get("augmented_slices", 0),
            "index": raw.get("index"),
            "payload_bytes_per_entry": raw.get("payload_bytes_per_entry", 0),
            "image_ids": ids,
            # Final labels that cover only some slices or labels: only their annotated slices are entries.
            "partial_annotations": partial,
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
