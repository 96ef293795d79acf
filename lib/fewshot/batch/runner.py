"""Run a batch on Ray: pin the bank, plan from the manifest, keep every worker busy, record each case.

The driver (this process) never segments: it reads the bank's committed manifest once (the pinned
generation), decides from the manifest which cases to do, starts ``workers`` Ray actors (one
engine each, built once; CPUs and GPUs requested per actor) or takes them warm from a
``WorkerPool`` kept between batches, loads the batch into them, checks that every one loaded the
same generation, then hands each worker one case at a time and appends each result to the
manifest as it arrives. Workers write the labels themselves (inputs, bank and output must be on a
file system every node sees, e.g. NFS, when the cluster has several machines).

Ctrl-C (or any stop) ends the run between two manifest lines: cases in flight are not recorded and
are done again next time. A worker that dies takes only its current case down (recorded, retried
next run); Ray restarts it up to ``max_restarts`` times, and the driver loads the batch into it
again. A case still running after ``case_timeout`` seconds is recorded as failed and its worker
is killed (``ray.cancel`` does not interrupt a running actor task, and a stuck case may sit in a
kernel read) and replaced by another (an idle pool worker, else a new one), which loads the same
pinned bank generation while the other workers go on.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from fewshot.bank import SupportBank, manifest_snapshot
from fewshot.batch.inputs import Case
from fewshot.batch.manifest import Manifest, now
from fewshot.batch.pool import WorkerPool, worker_shape
from fewshot.batch.worker import WorkerSpec
from fewshot.config import settings_hash
from fewshot.volume import needs_monai_reader

logger = logging.getLogger(__name__)

# Cases handed to a worker at once. One: a case queued behind a busy worker could wait while another
# worker sits idle at the end of the batch, and Ray's round trip (about a millisecond) is nothing
# beside a case (seconds to minutes).
QUEUE_DEPTH = 1
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # the batch passes paths and small records, never volumes
INLINE_ARG_BYTES = 64 << 10  # below Ray's max_direct_call_object_size (100 KB): sent with the call


class BatchError(RuntimeError):
    """The batch cannot start or go on; the message says why and what to do."""


@dataclass
class RayOptions:
    address: str | None = None  # an existing cluster ("auto", "ray://head:10001", ...); None: a local Ray
    workers: int | None = None  # default: the cluster's CPUs // cpus_per_worker
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_restarts: int = 1  # per worker, after a crash (OOM kill, segfault)
    case_timeout: float | None = None  # seconds a case may run before its worker is killed and replaced
    verbose: bool = False  # workers' logs on this terminal (always in Ray's session logs)


@dataclass
class BatchSpec:
    settings: dict  # as the workers run them (worker.batch_settings)
    bank_dir: str
    output_dir: str
    models_dir: str | None = None
    label_names: dict[str, int] = field(default_factory=dict)
    only: Sequence[str | int] | None = None
    keep_older_bank: bool = False
    retry_failed: bool = False

    def settings_key(self) -> str:
        """What a finished case depends on besides its input and the bank."""
        return settings_hash(self.settings, {"labels": self.label_names, "only": list(self.only or [])})


@dataclass
class BatchReport:
    manifest: str
    bank_generation: str
    cases: int
    skipped: int
    done: int = 0
    failed: int = 0
    interrupted: bool = False
    error: str = ""
    workers: list[dict] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why cases were segmented, by count
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # the whole run, Ray start-up included
    segment_seconds: float = 0.0  # from the first case handed out to the last result
    cases_per_hour: float = 0.0  # finished cases (done or failed) per hour of segment_seconds

    def as_dict(self) -> dict:
        return asdict(self)


def pin_bank(bank_dir: str | os.PathLike) -> tuple[bytes, dict]:
    """The bank's committed manifest (what the batch pins to) and its parsed contents."""
    raw = SupportBank.read_manifest(bank_dir)
    if raw is None:
        raise BatchError(f"no support bank at {bank_dir}: build it first (python -m fewshot bank build "
                         "--datastore DATASTORE --preset PRESET, or batch --build-bank)")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BatchError(f"{bank_dir}/manifest.json is unreadable ({exc}): rebuild the bank") from None
    if not manifest.get("images"):
        raise BatchError(f"the support bank at {bank_dir} has no labelled image: label one and build the bank")
    return raw, manifest


@contextlib.contextmanager
def ray_session(options: RayOptions):
    """Ray for the run: the caller's if already initialised, a cluster's at ``address``, else a
    local one on this machine's loopback (shut down at the end)."""
    if options.address is None:
        # Read when Ray is imported: a local Ray then listens on 127.0.0.1 only, not on the network.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        yield ray
        return
    if options.address is None:
        ray.init(include_dashboard=False, log_to_driver=options.verbose, logging_level=logging.WARNING,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    else:
        ray.init(address=options.address, log_to_driver=options.verbose, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def _worker_count(ray, options: RayOptions, todo: int) -> int:
    if options.workers is not None:
        wanted = int(options.workers)
    else:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        wanted = int(cpus // max(options.cpus_per_worker, 1e-9)) or 1
    if wanted < 1:
        raise BatchError("--workers must be at least 1")
    return max(1, min(wanted, todo))


class _Progress:
    """A bar of cases: done, failed and the rate per hour."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="segmenting", unit="case", file=sys.stderr, dynamic_ncols=True)
        self.done = self.failed = 0
        self.started = time.perf_counter()

    def update(self, status: str) -> None:
        self.done += status == "done"
        self.failed += status == "failed"
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            rate = 3600.0 * (self.done + self.failed) / elapsed
            self.bar.set_postfix(done=self.done, failed=self.failed, per_hour=f"{rate:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(
    cases: Sequence[Case],
    spec: BatchSpec,
    options: RayOptions | None = None,
    progress: bool = True,
    on_record: Callable[[dict], None] | None = None,
    pool: WorkerPool | None = None,
) -> BatchReport:
    """Segment ``cases`` into ``spec.output_dir``; returns what happened (also in the manifest).

    ``on_record`` is called with each case's manifest record once it is on disk (the MONAI Label
    adapter saves labels from it; a test may stop the run from it). ``pool``: workers kept between
    batches (see ``WorkerPool``); without one, the run starts its own and stops them at its end."""
    options = options or RayOptions()
    if options.case_timeout is not None and not options.case_timeout > 0:
        raise BatchError(f"the per-case timeout must be a positive number of seconds, not {options.case_timeout}")
    started = time.perf_counter()
    pinned, bank_manifest = pin_bank(spec.bank_dir)
    generation = manifest_snapshot(pinned)
    settings_key = spec.settings_key()
    with Manifest(spec.output_dir) as manifest:
        plan = manifest.plan(cases, generation, settings_key, spec.keep_older_bank, spec.retry_failed)
        report = BatchReport(manifest=str(manifest.path), bank_generation=generation, cases=len(cases),
                             skipped=len(plan.skipped), reasons=plan.counts())
        logger.info("batch: %d cases, %d finished before and skipped, %d to segment %s against bank generation "
                    "%s (%d labelled images)", len(cases), len(plan.skipped), len(plan.todo), plan.counts() or "",
                    generation, len(bank_manifest["images"]))
        if plan.todo:
            _run(plan.todo, spec, options, manifest, pinned, generation, settings_key, report, progress, on_record,
                 pool)
    report.seconds = round(time.perf_counter() - started, 2)
    return report


def _run(todo, spec, options, manifest, pinned, generation, settings_key, report, progress, on_record, pool) -> None:
    run = {"kind": "run", "event": "start", "started": now(), "bank_generation": generation,
           "settings": settings_key, "preset": spec.settings.get("name"), "cases": report.cases,
           "skipped": report.skipped, "todo": len(todo), "reasons": report.reasons,
           "case_timeout": options.case_timeout}
    bar = None
    with ray_session(options) as ray:
        owned = pool is None
        crew = None
        inflight: dict[Any, _Inflight] = {}
        try:
            if owned:
                pool = WorkerPool(options)
            elif pool.shape != worker_shape(options):
                raise BatchError(f"the worker pool's workers have (CPUs, GPUs, restarts) {pool.shape}, "
                                 f"this batch asks for {worker_shape(options)}")
            n = _worker_count(ray, options, len(todo))
            # Paths, settings and the bank manifest the batch is pinned to.
            worker_spec = (WorkerSpec(settings=spec.settings, bank_dir=str(Path(spec.bank_dir).resolve()),
                                      pinned=pinned, models_dir=spec.models_dir, label_names=dict(spec.label_names),
                                      only=list(spec.only) if spec.only else None, threads=pool.threads,
                                      monai_reader=any(needs_monai_reader(c.path) for c in todo)))
            # Ray sends a small argument with the call, a large one (a big bank's manifest) through its object
            # store, from which a worker loaded again (a replacement, one restarted after a crash) reads it
            # again: that copy is put once and held for the whole run (ray-project/ray#53727; Ray still logs
            # a warning about it).
            arg = worker_spec if len(pickle.dumps(worker_spec)) < INLINE_ARG_BYTES else ray.put(worker_spec)
            crew = _Crew(ray, pool, arg, generation, report)
            logger.info("batch: %d workers (%s CPU, %s GPU each), %d of them warm from the pool", n,
                        options.cpus_per_worker, options.gpus_per_worker, min(n, len(pool.idle)))
            crew.start(n)
            manifest.append(dict(run, workers=[w["worker"] for w in report.workers]))
            bar = _Progress(len(todo), progress)
            _dispatch(ray, crew, todo, inflight, manifest, settings_key, report, bar, on_record, options)
        except KeyboardInterrupt:
            report.interrupted = True
            logger.warning("batch interrupted: %d cases recorded; the others are done on the next run",
                           report.done + report.failed)
        except BatchError as exc:
            report.error = str(exc)
        finally:
            if bar is not None:
                bar.close()
            if crew is not None:
                # Cases in flight are stopped with their workers: they were not recorded, so they are redone.
                crew.finish(busy={id(job.actor) for job in inflight.values()}, replenish=not owned)
            if owned and pool is not None:
                pool.close()
            with contextlib.suppress(Exception):
                manifest.append({"kind": "run", "event": "end", "ended": now(), "bank_generation": generation,
                                 "done": report.done, "failed": report.failed, "interrupted": report.interrupted,
                                 "error": report.error, "cases_per_hour": report.cases_per_hour})


class _Crew:
    """A batch's workers, taken from the pool (warm ones first) and loaded with the batch's spec:
    checked before any case, one replaced on its own (after a timeout) or loaded again (after Ray
    restarted it) while the others go on segmenting, and given back to the pool at the end."""

    def __init__(self, ray, pool: WorkerPool, arg, generation: str, report: BatchReport):
        self.ray, self.pool, self.arg, self.generation, self.report = ray, pool, arg, generation, report
        self.alive: list = []  # ready to take cases
        self.starting: dict[Any, Any] = {}  # load() ref -> a worker still loading
        self.names: dict[int, str] = {}
        self.dead: list = []  # killed, or died more often than Ray restarts them

    def _accept(self, actor, info: dict) -> None:
        if info["problem"]:  # the batch's (its bank's), not the worker's: it goes back to the pool
            self.pool.give_back([actor])
            raise BatchError(f"worker {info['worker']}: {info['problem']}")
        if info["bank_generation"] != self.generation:  # cannot happen with a pinned manifest: checked anyway
            self.pool.give_back([actor])
            raise BatchError(f"worker {info['worker']} loaded bank generation {info['bank_generation']}, "
                             f"not {self.generation}")
        self.names[id(actor)] = info["worker"]
        if not any(w["worker"] == info["worker"] for w in self.report.workers):
            self.report.workers.append(info)
        self.alive.append(actor)

    def start(self, n: int) -> None:
        taken = [self.pool.take() for _ in range(n)]
        refs = [actor.load.remote(self.arg) for actor, _ in taken]
        try:
            self._start(taken, refs)
        except BatchError:  # the others go back to the pool (run_batch closes it when it is the run's own)
            self.pool.give_back([a for a, _ in taken if a not in self.alive and a not in self.dead])
            raise

    def _start(self, taken, refs) -> None:
        for (actor, warm), ref in zip(taken, refs):
            try:
                info = self.ray.get(ref)
            except self.ray.exceptions.RayActorError:
                if not warm:
                    raise BatchError("a worker died while starting (see Ray's logs, e.g. out of memory)") from None
                self.dead.append(actor)  # a pool worker that died while idle: a new one instead
                actor = self.pool.take()[0]
                info = self._get_starting(actor.load.remote(self.arg))
            except self.ray.exceptions.RayError as exc:  # e.g. missing weights: the engine's own message
                raise BatchError(f"the workers could not start: {_last_line(exc)}") from None
            self._accept(actor, info)

    def _get_starting(self, ref) -> dict:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            raise BatchError(f"the workers could not start: {_last_line(exc)}") from None

    def replace(self, actor) -> None:
        """Kill ``actor`` (whatever it is doing) and load another in its place (an idle pool worker,
        else a new one) in the background."""
        if actor in self.alive:
            self.alive.remove(actor)
        self.pool.kill(actor)
        self.dead.append(actor)
        fresh, _ = self.pool.take()
        self.starting[fresh.load.remote(self.arg)] = fresh

    def reload(self, actor) -> None:
        """Ray restarted ``actor`` after a crash, without the batch: load it again (in the background)."""
        if actor in self.alive:
            self.alive.remove(actor)
        self.starting[actor.load.remote(self.arg)] = actor

    def drop(self, actor) -> None:
        """``actor`` died more often than Ray restarts it."""
        if actor in self.alive:
            self.alive.remove(actor)
        self.dead.append(actor)

    def started(self, ref) -> None:
        """A worker's load() came back: it joins the batch, or the run says why it could not."""
        actor = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            logger.error("batch: a replacement worker could not start: %s", _last_line(exc))
            self.dead.append(actor)
            return
        self._accept(actor, info)

    def finish(self, busy: set[int], replenish: bool) -> None:
        """Workers still segmenting a case are killed; the others go back to the pool (a worker still
        loading finishes that first), which with ``replenish`` starts new ones for those killed."""
        keep = []
        for actor in self.alive + list(self.starting.values()):
            if id(actor) in busy and actor not in self.dead:
                self.dead.append(actor)
            elif actor not in self.dead:
                keep.append(actor)
        for actor in self.dead:
            self.pool.kill(actor)
        self.pool.give_back(keep)
        if replenish and self.dead:
            self.pool.replenish(len(self.dead), self.arg)


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


@dataclass
class _Inflight:
    case: Case
    actor: Any
    started: float  # perf_counter when handed out (a worker holds one case at a time: when it starts)


def _failed(case: Case, error: str, **extra) -> dict:
    return {"kind": "case", "case": case.case_id, "input": case.path, "status": "failed", "error": error,
            "retry": True, **extra}


def _dispatch(ray, crew: _Crew, todo, inflight: dict, manifest, settings_key, report, bar, on_record,
              options: RayOptions) -> None:
    from ray.exceptions import RayActorError, RayTaskError

    queue = deque(todo)
    deaths: dict[int, int] = {}
    timeout = options.case_timeout

    def feed() -> None:
        """Next cases to the least busy workers: an idle worker gets one before a busy one gets its
        second (with a few cases left, a queue behind one worker would leave another idle)."""
        while queue and crew.alive:
            load = {id(a): 0 for a in crew.alive}
            for job in inflight.values():
                if id(job.actor) in load:
                    load[id(job.actor)] += 1
            actor = min(crew.alive, key=lambda a: load[id(a)])
            if load[id(actor)] >= QUEUE_DEPTH:
                return
            case = queue.popleft()
            ref = actor.segment.remote(case, str(manifest.output_path(case)))
            inflight[ref] = _Inflight(case, actor, time.perf_counter())

    def record_case(case: Case, record: dict) -> None:
        if record.get("output"):
            record["output"] = os.path.relpath(record["output"], manifest.output_dir)
        record.update(settings=settings_key, finished=now())
        manifest.append(record)
        if record["status"] == "done":
            report.done += 1
        else:
            report.failed += 1
            report.failures[case.case_id] = record.get("error", "")
        elapsed = time.perf_counter() - t0
        report.segment_seconds = round(elapsed, 2)
        report.cases_per_hour = round(3600.0 * (report.done + report.failed) / max(elapsed, 1e-9), 1)
        bar.update(record["status"])
        if on_record is not None:
            on_record(record)

    def expire() -> None:
        """Cases over the timeout: recorded as failed, their workers killed and replaced."""
        clock = time.perf_counter()
        for ref, job in list(inflight.items()):
            ran = clock - job.started
            if ran < timeout:
                continue
            del inflight[ref]  # its result, if any ever comes, is not waited for
            name = crew.names.get(id(job.actor), "")
            logger.warning("batch: case %s still running after %.0f s: stopping worker %s and starting another",
                           job.case.case_id, ran, name)
            crew.replace(job.actor)
            record_case(job.case, _failed(
                job.case, f"timed out: still running after {timeout:g} s (the per-case timeout); "
                          "its worker was stopped and replaced", worker=name, seconds=round(ran, 3),
                timed_out=True))

    t0 = time.perf_counter()
    feed()
    while inflight or (queue and crew.starting):
        wait_for = None
        if timeout is not None and inflight:
            wait_for = max(0.0, min(job.started for job in inflight.values()) + timeout - time.perf_counter())
        ready, _ = ray.wait(list(inflight) + list(crew.starting), num_returns=1, timeout=wait_for)
        for ref in ready:
            if ref in crew.starting:
                crew.started(ref)
                continue
            job = inflight.pop(ref)
            case, actor = job.case, job.actor
            try:
                record = ray.get(ref)
            except RayActorError as exc:
                deaths[id(actor)] = deaths.get(id(actor), 0) + 1
                if deaths[id(actor)] > options.max_restarts:
                    crew.drop(actor)
                record = _failed(case, f"the worker died while segmenting this case ({type(exc).__name__})")
            except RayTaskError as exc:
                record = _failed(case, f"{type(exc.cause).__name__}: {exc.cause}")
            if record.get("status") == "unloaded":  # restarted by Ray after a crash: load it, resend the case
                queue.appendleft(case)
                crew.reload(actor)
                continue
            if record.get("status") == "fatal":
                queue.appendleft(case)
                raise BatchError(f"worker {record.get('worker')}: {record['error']}")
            record_case(case, record)
        if timeout is not None:
            expire()
        feed()
        if queue and not crew.alive and not crew.starting:
            raise BatchError("every worker died (see Ray's logs, e.g. out of memory); the finished cases are recorded")
