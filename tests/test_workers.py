"""The registration steps' worker pool (``fewshot.transfer.workers``): jobs whose results queue
follow-up jobs (an atlas's 3D stages, then one job per slice shift), in real spawned processes, and
what is left to the caller when the workers stop: nothing lost, nothing run twice."""
from __future__ import annotations

import os
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import pytest

from fewshot.transfer.workers import Job, WorkerPool, run_inline


def _no_setup(threads: int) -> None:
    """A worker initializer (importable by name, as spawned workers need)."""


def _pid_after(value: int) -> tuple[int, int]:
    return value, os.getpid()


def _fail(value: int) -> int:
    raise ValueError(f"job {value} failed")


def _die(code: int) -> None:
    os._exit(code)  # as a worker killed by the OOM killer would


@pytest.fixture
def pool():
    p = WorkerPool(2, 1, "spawn", _no_setup, "test", "jobs")
    yield p
    p.close()


def test_follow_up_jobs_run_in_the_workers_each_once(pool):
    done, errors = [], []

    def on_done(key, result):
        done.append((key, result[0]))
        assert result[1] != os.getpid()  # a worker, not this process
        if key[0] == "first":  # each first stage queues three more, one of which fails
            return {("then", key[1], s): Job(_fail if s == 2 else _pid_after, (10 * key[1] + s,)) for s in range(3)}
        return None

    left = pool.run_jobs({("first", i): Job(_pid_after, (i,)) for i in range(3)}, on_done,
                         on_error=lambda key, exc: errors.append((key, str(exc))))
    assert left == {}
    assert sorted(done) == sorted([(("first", i), i) for i in range(3)]
                                  + [(("then", i, s), 10 * i + s) for i in range(3) for s in range(2)])
    assert sorted(errors) == [(("then", i, 2), f"job {10 * i + 2} failed") for i in range(3)]


def test_a_worker_dying_leaves_every_undone_job_to_the_caller(pool):
    """One follow-up kills its worker: the jobs not yet reported, follow-ups included, come back to
    the caller, which runs them here; together with those reported, every job once."""
    done = []

    def on_done(key, result):
        done.append(key)
        if key == ("first", 0):
            return {("then", s): Job(_die if s == 0 else _pid_after, (s,)) for s in range(4)}
        return None

    left = pool.run_jobs({("first", i): Job(_pid_after, (i,)) for i in range(4)}, on_done)
    assert ("then", 0) in left and pool.executor() is None  # the pool is given up, not restarted per call
    assert not set(done) & set(left)
    rest = {key: job for key, job in left.items() if key != ("then", 0)}
    run_inline(rest, on_done, on_error=pytest.fail)
    assert sorted(done) == sorted([("first", i) for i in range(4)] + [("then", s) for s in range(1, 4)])


def test_follow_ups_are_left_to_the_caller_when_the_pool_breaks_while_they_are_queued(pool, monkeypatch):
    """The pool can break between two submissions of one batch of follow-ups: none of them is lost."""

    class BreaksOnThirdSubmit:
        calls = 0

        def submit(self, function, *args):
            self.calls += 1
            if self.calls == 3:
                raise BrokenProcessPool("a worker died")
            future = Future()
            future.set_result(function(*args))
            return future

    monkeypatch.setattr(pool, "executor", BreaksOnThirdSubmit)
    left = pool.run_jobs({"first": Job(_pid_after, (0,))},
                         lambda key, result: {f"then-{s}": Job(_pid_after, (s,)) for s in range(3)})
    assert sorted(left) == ["then-0", "then-1", "then-2"]  # then-0 was submitted but never reported


def test_inline_jobs_run_their_follow_ups_in_order():
    order = []

    def on_done(key, result):
        order.append(key)
        return {key + "+": Job(_pid_after, (result[0] + 1,))} if len(key) < 3 else None

    run_inline({"a": Job(_pid_after, (0,)), "b": Job(_pid_after, (0,))}, on_done, on_error=pytest.fail)
    assert order == ["a", "b", "a+", "b+", "a++", "b++"]
