"""Worker processes for the weights-free transfer steps (``registration.py``, ``atlas.py``).

A step owns one ``WorkerPool``: started on first use, so building a preset costs nothing; shut down
by ``close()`` or when the step is garbage-collected or the interpreter exits. When the workers
stop (killed, out of memory, or never started), the jobs left run in the calling process, and so do later
calls: the pool is not restarted on every call.

Workers never outlive the process that started them: a process killed by a signal runs no exit
handlers (uvicorn re-raises SIGTERM after its graceful shutdown), so ``terminate_all()`` is called
from the server's and the CLI's signal handlers, and each worker also exits by itself within a
second of its parent's death (``kill -9`` included).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import spawn
from typing import Callable, Hashable, Iterator, Mapping

import SimpleITK as sitk

logger = logging.getLogger(__name__)

# A spawned worker first re-imports the parent's __main__ (multiprocessing.spawn.prepare). Under
# `python -m monailabel.main` or the `monailabel` script that is all of MONAI Label, MONAI and
# transformers: 10-20 s of CPU per worker before its first job, for nothing, since a worker runs only
# functions importable by name. The workers this module starts skip it; other processes are untouched.
_launching = threading.local()
_preparation_data = spawn.get_preparation_data


def _preparation_data_without_main(name):
    data = _preparation_data(name)
    if getattr(_launching, "without_main", False):
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    return data


spawn.get_preparation_data = _preparation_data_without_main  # looked up at each launch (popen_spawn_*)


@contextmanager
def _without_main() -> Iterator[None]:
    """Processes launched in this thread within the block do not re-import __main__ (ProcessPoolExecutor
    launches its workers in the thread that submits)."""
    _launching.without_main = True
    try:
        yield
    finally:
        _launching.without_main = False

PARENT_CHECK_SECONDS = 1.0
_POOLS: "weakref.WeakSet[WorkerPool]" = weakref.WeakSet()  # pools with live workers, for terminate_all


_stopping = threading.Event()  # set by terminate_all: the process is going away


class WorkersStopped(RuntimeError):
    """The process is stopping (a signal): the jobs left are not run here instead."""


def terminate_all() -> int:
    """Stop every worker process of this process's pools at once (signal handlers: no waiting for
    the jobs they run); a call that was using them raises ``WorkersStopped`` instead of running its
    jobs in this process. Returns how many were stopped."""
    _stopping.set()
    return sum(pool.terminate() for pool in list(_POOLS))


def _start_worker(parent: int, initializer: Callable[[int], None], threads: int) -> None:
    """Runs first in each worker: a thread that ends the worker once ``parent`` is gone, then the
    step's own initializer."""
    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="fewshot-parent-watch", daemon=True).start()
    initializer(threads)


class WorkerPool:
    def __init__(self, workers: int, threads_per_worker: int, start_method: str,
                 initializer: Callable[[int], None], name: str, unit: str):
        self.workers = workers
        self.threads_per_worker = threads_per_worker
        self.start_method = start_method
        self.initializer = initializer  # called with threads_per_worker in each worker (importable by name)
        self.name, self.unit = name, unit  # for the log: "registration" worker processes, "slices"
        self._pool: ProcessPoolExecutor | None = None
        self._failed = False  # the workers stopped once: do not try again on every call
        self._lock = threading.Lock()  # one pool even when a threaded server segments concurrently
        self._finalizer: weakref.finalize | None = None

    def executor(self) -> ProcessPoolExecutor | None:
        """The pool, started on first use; None once its workers have stopped."""
        with self._lock:
            if self._pool is None and not self._failed:
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context(self.start_method),
                    initializer=_start_worker, initargs=(os.getpid(), self.initializer, self.threads_per_worker),
                )
                # Runs on garbage collection or at interpreter exit, whichever comes first.
                self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=True, cancel_futures=True)
                _POOLS.add(self)
            return self._pool

    def warm(self, function: Callable, args: tuple = ()) -> set[int]:
        """Start every worker process now and run ``function(*args)`` there (the imports its jobs need), so
        that the first real call does not pay for spawning and importing (a few seconds per worker).
        ``function`` returns its process id. The pool spawns a process for each job submitted while none
        is idle, so ``workers`` jobs submitted at once start them all. -> the ids that answered (empty
        when the pool cannot start: the first call then finds out, as without a warm-up)."""
        pool = self.executor()
        if pool is None:
            return set()
        try:
            with _without_main():
                futures = [pool.submit(function, *args) for _ in range(self.workers)]
            return {future.result() for future in futures}
        except BrokenProcessPool:
            return set()

    def processes(self) -> set[int]:
        """Ids of the worker processes running now."""
        pool = self._pool
        return {p.pid for p in (getattr(pool, "_processes", None) or {}).values() if p.is_alive()} if pool else set()

    def terminate(self) -> int:
        """Kill the worker processes now (SIGTERM), without waiting for their jobs; a later call
        starts new ones. Returns how many were running. Safe in a signal handler."""
        pool, finalizer = self._pool, self._finalizer
        if pool is None:
            return 0
        self._pool, self._finalizer = None, None
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            try:
                process.terminate()
            except (OSError, ValueError, AttributeError):
                pass
        if finalizer is not None:
            finalizer.detach()  # a shutdown(wait=True) at exit would wait on the dead pool's queue
        _POOLS.discard(self)
        return len(processes)

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            finalizer, self._finalizer, self._pool = self._finalizer, None, None
        _POOLS.discard(self)
        if finalizer is not None:
            finalizer()  # shuts the pool down, once

    def run(self, function: Callable, jobs: Mapping[Hashable, tuple], on_done: Callable,
            on_error: Callable | None = None) -> dict:
        """``function(*args)`` for every job (key -> args) in the workers; ``on_done(key, result)`` in
        this thread as each finishes. A job's own exception goes to ``on_error(key, exc)``, or is raised
        when there is none. -> the jobs left undone (all of them when the pool cannot run)."""
        def done(key, result) -> None:  # no follow-ups here, whatever on_done returns
            on_done(key, result)

        left = self.run_jobs({key: Job(function, tuple(args)) for key, args in jobs.items()}, done, on_error)
        return {key: job.args for key, job in left.items()}

    def run_jobs(self, jobs: Mapping[Hashable, "Job"], on_done: Callable, on_error: Callable | None = None) -> dict:
        """As ``run``, for jobs of different functions; ``on_done`` may return more jobs (key -> Job),
        which join the queue behind those already submitted: a task's later stages can start as soon
        as its first one ends, in whichever worker is free. -> the jobs left undone, follow-ups included."""
        remaining = dict(jobs)
        pool = self.executor()
        if pool is None:
            return remaining
        pending = {}

        def submit(more: Mapping[Hashable, Job]) -> None:
            assert not set(more) & set(pending.values()), "a follow-up job reuses the key of a pending one"
            remaining.update(more)  # all of them first: a pool breaking mid-submission leaves them to the caller
            with _without_main():
                for key, job in more.items():
                    pending[pool.submit(job.function, *job.args)] = key

        try:
            submit(jobs)
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    key = pending.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        raise
                    except Exception as exc:  # noqa: BLE001 - the caller decides (on_error)
                        if on_error is None:
                            raise
                        remaining.pop(key)
                        on_error(key, exc)
                        continue
                    remaining.pop(key)
                    submit(on_done(key, result) or {})
        except BaseException as exc:
            for future in pending:  # whatever ends the call early, its queued jobs must not run on
                future.cancel()
            if not isinstance(exc, BrokenProcessPool):
                raise
            if _stopping.is_set():
                raise WorkersStopped(f"{self.name} worker processes stopped: this process is shutting down") from None
            self.close()
            self._failed = True
            logger.warning(
                "%s worker processes stopped (killed, out of memory, or never started with the %s start method); "
                "the remaining %d %s run in this process, and later ones too. Set transfer.workers=1 to skip the pool.",
                self.name, self.start_method, len(remaining), self.unit,
            )
        return remaining


@dataclass(frozen=True)
class Job:
    """One call for a worker: ``function`` must be importable by name (workers are spawned)."""

    function: Callable
    args: tuple

    def __call__(self):
        return self.function(*self.args)


def run_inline(jobs: Mapping[Hashable, Job], on_done: Callable, on_error: Callable) -> None:
    """``run_jobs`` in the calling process, in order, follow-ups last: for one worker, or the jobs a
    stopped pool left."""
    queue = deque(jobs.items())
    while queue:
        key, job = queue.popleft()
        try:
            result = job()
        except Exception as exc:  # noqa: BLE001 - the caller decides (on_error)
            on_error(key, exc)
            continue
        queue.extend((on_done(key, result) or {}).items())


@contextmanager
def sitk_threads(threads: int) -> Iterator[None]:
    """SimpleITK's process-wide thread count set for the block, then restored."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


# ANTs' ITK reads ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS once, when ANTs first runs a filter in the process
# (not when it is imported), and keeps that count: the count pinned here by the first call, if any.
_ants_threads: int | None = None
_ants_warned = False
_ants_lock = threading.Lock()


def pin_ants_threads(threads: int) -> int:
    """Have ANTs run with ``threads`` ITK threads in this process, if nothing has pinned a count yet; call
    it before any ANTs call. ANTs' Mattes affine and antsJointFusion repeat exactly only with one thread
    (measured: with two, the same affine differs from run to run), so a caller asking for one thread when
    another count was pinned first is warned that its results will not repeat. -> the count in force."""
    global _ants_threads, _ants_warned
    with _ants_lock:
        if _ants_threads is None:
            os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))
            _ants_threads = int(threads)
        elif _ants_threads != threads and threads == 1 and not _ants_warned:
            _ants_warned = True
            logger.warning("ANTs already runs with %d ITK threads in this process, not 1: its registrations and "
                           "fusions here will not repeat exactly from run to run", _ants_threads)
        return _ants_threads

