"""One Ray worker: an engine built once, over a bank pinned to the batch's generation.

The worker opens the bank read-only from the manifest bytes the driver read (``pinned``), checking
shard sizes only (the driver's read came from a bank whose writers verify it, and N workers each
hashing a bank larger than RAM would take minutes). It never writes the bank, and never picks up
a later commit: every case of the batch sees the same support slices and atlases.

Each case is its own try: whatever one input does (corrupt file, wrong dimensions, a bug it
triggers) comes back as a ``failed`` record and the worker goes on with the next case.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from fewshot import dicomweb
from fewshot.batch.inputs import Case, input_stamp

logger = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def batch_settings(settings: Mapping, threads: int, overrides: Mapping[str, Any] | None = None) -> dict:
    """A preset's settings as a batch worker runs them.

    A Ray worker is the unit of parallelism, so the engine's own process pools are folded into it
    (every ``workers`` key -> 1, ``threads_per_worker`` and ``threads`` -> the worker's CPUs): N
    workers on N cores then use N cores, not N x pool size. Per-query caches are off: a batch sees
    each volume once, and a cache would only grow the worker's memory. ``overrides`` (the user's
    ``--set``) are applied last and win.
    """
    from fewshot.config import set_dotted

    out = copy.deepcopy(dict(settings))

    def fold(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "workers" and isinstance(value, int):
                    node[key] = 1
                elif key in ("threads_per_worker", "threads") and isinstance(value, int):
                    node[key] = int(threads)
                else:
                    fold(value)

    fold(out)
    transfer = out.get("transfer", {})
    transfer["feature_cache"] = 0
    if "propagation_cache" in transfer:  # a batch segments each image once
        transfer["propagation_cache"] = 0
    if "cache_mb" in transfer:
        transfer["cache_mb"] = 0
    for key, value in (overrides or {}).items():
        set_dotted(out, key, value)
    return out


def thread_env(threads: int) -> dict[str, str]:
    """Environment for a worker process: BLAS, OpenMP and ITK read these when they load."""
    return {name: str(int(threads)) for name in THREAD_ENV}


@dataclass
class WorkerSpec:
    settings: dict
    bank_dir: str
    pinned: bytes  # the bank manifest the batch is pinned to
    models_dir: str | None = None
    label_names: dict[str, int] = field(default_factory=dict)
    only: Sequence[str | int] | None = None  # labels to segment (default: all in the bank)
    threads: int = 1
    monai_reader: bool = True  # some input needs MONAI's reader (not NIfTI): import it at start-up


class SegmentWorker:
    """Wrapped by ``ray.remote`` in the runner; usable in-process too (tests, one-machine tools).

    A Ray actor is created without a spec and given one by ``load``: a worker kept between batches
    (``WorkerPool``) keeps its imports (most of its start-up) and, while the spec stays the same,
    its engine. Ray restarts a crashed actor without a spec; its next case comes back ``unloaded``
    and the driver loads it again, so a restarted worker never segments against another bank."""

    def __init__(self, spec: WorkerSpec | None = None):
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.spec: WorkerSpec | None = None
        self.engine = None
        self.generation = ""
        self.problem = ""
        self.load_seconds = 0.0
        if spec is not None:
            self.load(spec)

    def load(self, spec: WorkerSpec) -> dict:
        """Segment with ``spec`` from now on; returns ``ready()``. The engine is rebuilt only when
        what it is built from (settings, bank and its pinned generation, models, labels, threads)
        changed."""
        started = time.perf_counter()
        if self.spec is None or _engine_inputs(spec) != _engine_inputs(self.spec):
            self.spec = self.engine = None  # freed before the next one loads; unloaded if the build fails
            self._build(spec)
        self.spec = spec
        if spec.monai_reader:
            _warm_readers()
        self.load_seconds = round(time.perf_counter() - started, 2)
        return self.ready()

    def warm(self, settings: Mapping, models_dir: str | None = None, threads: int = 1) -> str:
        """Load a preset's code and networks ahead of the first batch (``WorkerPool.start``): what
        is imported stays, the networks are dropped. Returns "" or why it could not (the batch's
        ``load`` then fails with the same reason, and says it)."""
        try:
            _threads(threads)
            from fewshot.presets import build_steps

            build_steps(settings, models_dir=models_dir)
        except Exception as exc:  # noqa: BLE001 - a warm-up is an optimisation, never an error of its own
            return _short_error(exc)
        return ""

    def _build(self, spec: WorkerSpec) -> None:
        _threads(spec.threads)
        from fewshot.engine import Engine

        self.engine, report = Engine.from_settings(
            spec.settings, bank_dir=spec.bank_dir, models_dir=spec.models_dir, label_names=spec.label_names,
            pinned=spec.pinned, verify="size",
        )
        self.generation = report.snapshot
        self.problem = ""
        if report.discarded_all:
            self.problem = f"the support bank cannot be used with these settings: {report.discarded_all}"
        elif report.dropped:
            self.problem = ("the pinned bank generation is no longer whole on disk (a writer replaced "
                            f"{sorted(report.dropped)[:5]}); run the batch again to pin the current one")
        elif not self.engine.bank.num_entries:
            self.problem = "the support bank is empty: label at least one image and build the bank"

    def ready(self) -> dict:
        """How this worker came up: the driver checks every worker before dispatching any case."""
        return {"worker": self.name, "bank_generation": self.generation, "problem": self.problem,
                "images": len(self.engine.bank.image_ids()), "entries": self.engine.bank.num_entries,
                "seconds": self.load_seconds, **memory()}

    def segment(self, case: Case, output: str) -> dict:
        """Segment one case into ``output`` (atomically, with its JSON sidecar): its manifest record."""
        record: dict[str, Any] = {"kind": "case", "case": case.case_id, "input": case.path,
                                  "worker": self.name, "bank_generation": self.generation}
        if self.spec is None:  # restarted by Ray after a crash: the driver loads it again, then resends the case
            return dict(record, status="unloaded", error="the worker has no batch loaded")
        if self.problem:
            return dict(record, status="fatal", error=self.problem)
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        try:
            with _local_input(case, record) as path:
                seg = self.engine.segment(path, labels=self.spec.only)
            t_write = time.perf_counter()
            sidecar = seg.save(output)
            _fsync(output, sidecar)
            record.update(
                status="done", output=output, labels=seg.labels,
                skipped=seg.skipped, shape=list(seg.volume.shape),
                timings={k: v for k, v in seg.timings.items() if k != "reused"},
                write_seconds=round(time.perf_counter() - t_write, 3),
            )
        except Exception as exc:  # one bad case must never stop the batch: record it, go on
            from fewshot.volume import VolumeError

            usable = not isinstance(exc, (VolumeError, FileNotFoundError))
            if usable:
                logger.error("case %s failed:\n%s", case.case_id, traceback.format_exc())
            record.update(status="failed", error=_short_error(exc),
                          retry=usable)  # an unusable input fails again until it changes
        record["seconds"] = round(time.perf_counter() - started, 3)
        # CPU time beside wall time: on a shared machine the gap between them is time spent waiting for a core.
        record["cpu_seconds"] = round(_cpu_seconds() - cpu_started, 3)
        record.update(memory())
        return record


def _warm_readers() -> None:
    """A reader's heavy imports belong to start-up, not to the first case's timings: MONAI's reader
    (~10 s of CPU) and, when ITK is installed (MONAI reads DICOM series and most non-NIfTI files
    with it), ITK's lazily loaded IO modules (~4 s more on the first series otherwise). NIfTI files
    are read by nibabel alone and need none of it."""
    importlib.import_module("monai.transforms")
    try:
        import itk
    except ImportError:
        return
    itk.GDCMSeriesFileNames, itk.ImageSeriesReader, itk.ImageFileReader  # noqa: B018 - loads the modules


def _threads(threads: int) -> None:
    for name, value in thread_env(threads).items():
        os.environ.setdefault(name, value)
    try:
        import torch

        torch.set_num_threads(int(threads))
    except ImportError:
        pass


def _engine_inputs(spec: WorkerSpec) -> tuple:
    """What a worker's engine is built from (``only`` and ``monai_reader`` are not)."""
    return (spec.settings, spec.bank_dir, spec.pinned, spec.models_dir, spec.label_names, spec.threads)


@contextlib.contextmanager
def _local_input(case: Case, record: dict):
    """The case's input as a local path, its stamp and sha256 in ``record`` before it is read: a file
    or folder as it is; a DICOMweb series downloaded into a temporary folder (removed afterwards)."""
    from fewshot.files import content_sha256

    if not dicomweb.is_url(case.path):
        # Stamped before reading: an input changed while it is read looks changed next time, never done.
        record["input_stamp"] = input_stamp(case.path)
        record["input_sha256"] = content_sha256(case.path)
        yield case.path
        return
    with tempfile.TemporaryDirectory(prefix="fewshot-series-") as folder:
        t0 = time.perf_counter()
        record["input_stamp"] = dicomweb.download(case.path, folder)  # what was downloaded is what is segmented
        record["input_sha256"] = content_sha256(folder)
        record["download_seconds"] = round(time.perf_counter() - t0, 3)
        yield folder


def _cpu_seconds() -> float:
    """CPU seconds of this worker and of the processes it waited for (all threads)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _short_error(exc: BaseException, limit: int = 500) -> str:
    """One line for the manifest (readers wrap whole tracebacks into their messages; the log has it all)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fsync(*paths) -> None:
    """The output is on disk before its manifest line says so."""
    for path in paths:
        if path is None:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def memory() -> dict[str, int]:
    """This worker's memory: resident now and at its peak, and its proportional share (PSS: pages
    shared with other processes, e.g. the same bank shards mapped by another worker, count once in all)."""
    import resource

    out = {"peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}
    try:
        import psutil

        info = psutil.Process().memory_full_info()
        out.update(rss_bytes=int(info.rss), pss_bytes=int(getattr(info, "pss", 0)), uss_bytes=int(info.uss))
    except Exception:  # noqa: BLE001 - memory figures are informative, never a reason to fail a case
        pass
    return out
