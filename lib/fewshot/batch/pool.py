"""Ray workers that outlive one batch.

Most of a worker's start-up is importing torch and the preset's networks (10-20 s on a busy CPU),
far more than a small batch's cases. ``run_batch`` starts workers for its run and stops them at the
end; a driver that runs batch after batch (a notebook, a service, a test module) can instead keep a
``WorkerPool`` open and pass it to each ``run_batch``. Each batch then loads its spec into warm
workers: the bank generation it pinned and its settings (a new engine in a warm process, or the
same engine when nothing changed), and starts new workers only for what the pool lacks.

A batch gives its workers back when it ends, except those still segmenting a case (stopped by
Ctrl-C or an error): those are killed, as the case they hold is not recorded and is done again.
A worker killed after a per-case timeout is replaced by an idle pool worker when there is one.
The pool starts new workers in place of the killed ones at the batch's end, loading its spec.
Idle workers keep what they asked Ray for (CPUs, GPUs): close the pool to give them back, or a
batch run without it on the same Ray waits for resources.

    with ray_session(options) as ray, WorkerPool(options) as pool:
        pool.start(2, settings)  # optional: the workers load while the driver does other work
        run_batch(cases, spec, options, pool=pool)
        run_batch(more_cases, spec, options, pool=pool)
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Protocol

from fewshot.batch.worker import SegmentWorker, thread_env


class WorkerRequest(Protocol):
    """What a worker asks Ray for (``runner.RayOptions`` has these; the runner imports this module)."""

    cpus_per_worker: float
    gpus_per_worker: float
    max_restarts: int


class WorkerPool:
    """Idle ``SegmentWorker`` actors with one shape (CPUs, GPUs, threads, restarts); needs Ray
    initialised (``ray_session``). Not thread-safe: one batch uses it at a time."""

    def __init__(self, options: WorkerRequest):
        import ray

        self.ray = ray
        self.shape = worker_shape(options)
        cpus, gpus, restarts = self.shape
        self.threads = max(1, int(cpus))
        self.remote = ray.remote(SegmentWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=restarts, max_task_retries=0,
            runtime_env={"env_vars": thread_env(self.threads)},
        )
        self.idle: list[Any] = []
        self.started = 0  # actors created over the pool's life (a warm pool starts none for a batch)

    def start(self, n: int, settings: Mapping | None = None, models_dir: str | None = None) -> None:
        """Start ``n`` more workers now, without waiting for them, so that the first batch finds
        them warm. With ``settings`` (as ``batch_settings`` gives them) each also loads the
        preset's code and networks."""
        for _ in range(n):
            actor = self.remote.remote()
            self.started += 1
            if settings is not None:
                actor.warm.remote(dict(settings), models_dir, self.threads)
            self.idle.append(actor)

    def replenish(self, n: int, spec) -> None:
        """Start ``n`` workers in place of those a batch had to kill, loading that batch's spec in
        the background: the next batch (often the same one resumed) finds them ready."""
        for _ in range(n):
            actor = self.remote.remote()
            self.started += 1
            actor.load.remote(spec)
            self.idle.append(actor)

    def take(self) -> tuple[Any, bool]:
        """An actor for a batch, and whether it is a warm one from the pool (else just created)."""
        if self.idle:
            return self.idle.pop(0), True
        self.started += 1
        return self.remote.remote(), False

    def give_back(self, actors) -> None:
        self.idle.extend(a for a in actors if a not in self.idle)

    def kill(self, actor) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor, no_restart=True)

    def close(self) -> None:
        for actor in self.idle:
            self.kill(actor)
        self.idle.clear()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def worker_shape(options: WorkerRequest) -> tuple[float, float, int]:
    """What a worker is started with: a pool serves batches that ask for the same."""
    return (float(options.cpus_per_worker), float(options.gpus_per_worker), int(options.max_restarts))
