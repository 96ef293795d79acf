"""Worker processes for the weights-free transfer steps (``registration.py``, ``atlas.py``).

A step owns one ``WorkerPool``: started on first use, so building a preset costs nothing; shut down
by ``close()`` or when the step is garbage-collected or the interpreter exits. When the workers
stop (killed, out of memory, or never started: under ``spawn`` a calling script without an
``if __name__ == "__main__":`` guard), the jobs left run in the calling process, and so do later
calls: the pool is not restarted on every call.
"""
from __future__ import annotations

import logging
import multiprocessing
import threading
import weakref
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Mapping

import SimpleITK as sitk

logger = logging.getLogger(__name__)


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
                    initializer=self.initializer, initargs=(self.threads_per_worker,),
                )
                # Runs on garbage collection or at interpreter exit, whichever comes first.
                self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=True, cancel_futures=True)
            return self._pool

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            finalizer, self._finalizer, self._pool = self._finalizer, None, None
        if finalizer is not None:
            finalizer()  # shuts the pool down, once

    def run(self, function: Callable, jobs: Mapping[Hashable, tuple], on_done: Callable,
            on_error: Callable | None = None) -> dict:
        """``function(*args)`` for every job (key -> args) in the workers; ``on_done(key, result)`` in
        this thread as each finishes. A job's own exception goes to ``on_error(key, exc)``, or is raised
        when there is none. -> the jobs left undone (all of them when the pool cannot run)."""
        remaining = dict(jobs)
        pool = self.executor()
        if pool is None:
            return remaining
        try:
            pending = {pool.submit(function, *args): key for key, args in jobs.items()}
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
                    on_done(key, result)
        except BrokenProcessPool:
            self.close()
            self._failed = True
            logger.warning(
                "%s worker processes stopped (killed, out of memory, or never started: with the %s start method "
                "a calling script needs an `if __name__ == '__main__':` guard); the remaining %d %s run in this "
                "process, and later ones too. Set transfer.workers=1 to skip the pool.",
                self.name, self.start_method, len(remaining), self.unit,
            )
        return remaining


@contextmanager
def sitk_threads(threads: int) -> Iterator[None]:
    """SimpleITK's process-wide thread count set for the block, then restored."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
