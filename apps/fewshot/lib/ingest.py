"""The background worker that keeps the support bank in step with the datastore's final labels.

One thread does all bank writes, so they are serialised and an HTTP request never waits for an
encoder. Work comes in three kinds, in this priority:

1. per-image jobs from the datastore hooks (label saved: ingest; label deleted: remove). A job
   for an image that is already queued replaces it, so the latest save wins; a job always reads
   the label file as it is when the job runs.
2. resynchronisation (at start-up and when files change on disk): remove bank entries of images
   without a final label, re-ingest missing, stale or damaged ones. Between two images it lets
   queued jobs go first.
3. idle tasks (e.g. warming the strategy's embedding cache), one small step at a time.

The label is copied to a private snapshot before it is read, so the checksum the bank records is
that of the very bytes it ingested, even if the user saves again meanwhile. A crash (kill -9) at
any point leaves the bank's last committed state; the next start-up's resynchronisation repairs it.

When an image's current final label cannot be ingested (unreadable, not matching its image), its
previous entries are removed: they describe a label the datastore no longer holds. The failure is
reported in ``/info`` (``ingestion.failed``). An I/O error is retried a few times first, keeping
the entries meanwhile. When the bank itself cannot be written (a full or read-only disk), no job
is ever dropped: removals, ingestions and resynchronisations are retried (every
``-c storage_retry_seconds``, a minute by default) for as long as it takes, and ``/info`` says so
(``ingestion.storage_error``), until the disk recovers and the bank matches the datastore again.
"""
from __future__ import annotations

import errno
import logging
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from fewshot.annotation import Annotation
from fewshot.bank import BankError
from fewshot.volume import VolumeError

logger = logging.getLogger(__name__)

Sources = Callable[[], Mapping[str, tuple[str, str]]]  # image id -> (image path, final label path)
IdleTask = Callable[[], bool]  # does one step; returns True while there is more to do
BUSY_STATES = ("starting", "resyncing", "ingesting", "removing")  # the bank is about to change
RETRY_DELAYS = (2.0, 10.0)  # seconds before the first attempts after an I/O error; then storage_retry_seconds
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the disk, not the file, is at fault


@dataclass
class Job:
    image_id: str
    action: str  # "ingest" | "remove"
    reason: str
    queued: float = field(default_factory=time.time)


@dataclass
class WorkerStatus:
    state: str = "starting"  # starting | resyncing | ingesting | removing | idle | stopped
    current: str | None = None
    pending: list[str] = field(default_factory=list)
    resync_pending: bool = False
    progress: str = ""
    failed: dict[str, str] = field(default_factory=dict)  # image id -> why its label is not in the bank
    last: dict = field(default_factory=dict)
    completed: int = 0  # jobs and resync steps done since start-up
    storage_error: str | None = None  # the bank could not be written; cleared by the next write that succeeds

    def as_dict(self) -> dict:
        return {
            "state": self.state, "current": self.current, "pending": list(self.pending),
            "resync_pending": self.resync_pending, "progress": self.progress, "failed": dict(self.failed),
            "last": dict(self.last), "completed": self.completed, "storage_error": self.storage_error,
        }


class IngestionWorker:
    def __init__(
        self, host, sources: Sources, scratch_dir: Path | None = None, on_change: Callable[[], None] | None = None,
        storage_retry_seconds: float = 60.0, annotation_of: Callable[[str], Annotation] | None = None,
        after_ingest: Callable[[str, str, Path, Annotation], None] | None = None,
    ):
        """``scratch_dir``: where label snapshots are made; emptied at start (a killed ingestion leaves one).
        ``storage_retry_seconds``: the wait between attempts once the first quick retries failed.
        ``after_ingest(image id, label path, snapshot, annotation)``: told of each label ingested, while its
        snapshot (the bytes the bank took) still exists; what it raises is logged, never the ingestion's failure."""
        self.host = host
        self.retry_delays = (*RETRY_DELAYS, storage_retry_seconds)
        self.scratch_dir = Path(scratch_dir) if scratch_dir else None
        self.sources = sources
        # What part of an image's final label was annotated (lib.annotations): only that enters the bank.
        self.annotation_of = annotation_of or (lambda image_id: Annotation())
        self.on_change = on_change or (lambda: None)
        self.after_ingest = after_ingest
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._resync_reason: str | None = None
        self._resync_after = 0.0  # not before this time (file events come in bursts while a file is written)
        self._idle_tasks: list[IdleTask] = []
        self._idle_done: set[int] = set()
        self._retries: dict[str, tuple[float, int, str]] = {}  # image id -> (when, attempts so far, action)
        self._cond = threading.Condition()
        self._status = WorkerStatus()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="fewshot-ingest", daemon=True)

    # ------------------------------------------------------------------ requests (any thread)

    def start(self) -> None:
        if self.scratch_dir is not None:
            shutil.rmtree(self.scratch_dir, ignore_errors=True)
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def ingest(self, image_id: str, reason: str = "final label saved") -> None:
        self._enqueue(Job(image_id, "ingest", reason))

    def remove(self, image_id: str, reason: str = "final label deleted") -> None:
        self._enqueue(Job(image_id, "remove", reason))

    def _enqueue(self, job: Job) -> None:
        with self._cond:
            self._jobs.pop(job.image_id, None)  # the latest request for an image wins
            self._retries.pop(job.image_id, None)  # a new request starts the attempts afresh (retries never come here)
            self._jobs[job.image_id] = job
            self._status.pending = list(self._jobs)
            self._cond.notify_all()
        logger.info("bank: %s of %r queued (%s)", job.action, job.image_id, job.reason)

    def resync(self, reason: str, delay: float = 0.0) -> None:
        """``delay``: wait until no new request came for that long (a file still being written)."""
        with self._cond:
            self._resync_after = max(self._resync_after, time.time() + delay)
            self._resync_reason = self._resync_reason or reason
            self._status.resync_pending = True
            self._idle_done.clear()  # the datastore changed: idle tasks may have new work
            self._cond.notify_all()

    def _resync_ready(self) -> bool:
        return self._resync_reason is not None and time.time() >= self._resync_after

    def add_idle_task(self, task: IdleTask) -> None:
        with self._cond:
            self._idle_tasks.append(task)
            self._cond.notify_all()

    def status(self) -> dict:
        with self._cond:
            return dict(self._status.as_dict(), retrying=sorted(self._retries))

    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self._resync_reason is not None or self._status.state in BUSY_STATES

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (tests, shutdown)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.busy():
                return True
            time.sleep(0.05)
        return False

    # ------------------------------------------------------------------ the thread

    def _set(self, **changes) -> None:
        with self._cond:
            for k, v in changes.items():
                setattr(self._status, k, v)
            self._status.pending = list(self._jobs)

    def _next_job(self) -> Job | None:
        with self._cond:
            if not self._jobs:
                return None
            _, job = self._jobs.popitem(last=False)
            # Marked busy in the same critical section, so no observer sees "idle, nothing pending"
            # while a job is in hand.
            self._status.state, self._status.current = ("ingesting" if job.action == "ingest" else "removing"), job.image_id
            self._status.pending = list(self._jobs)
            return job

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self._jobs or self._resync_ready() or self._has_idle_work()):
                    self._status.state, self._status.current, self._status.progress = "idle", None, ""
                    self._queue_due_retries()
                    if not self._jobs:
                        wakes = [when for when, _, _ in self._retries.values()]
                        if self._resync_reason is not None:
                            wakes.append(self._resync_after)
                        self._cond.wait(max(0.0, min(wakes) - time.time()) if wakes else None)
                if self._stop:
                    self._status.state = "stopped"
                    return
            try:
                if self._drain_jobs():
                    continue
                with self._cond:
                    reason = None
                    if self._resync_ready():
                        reason, self._resync_reason = self._resync_reason, None
                        self._status.resync_pending = False
                    if reason:
                        self._status.state, self._status.current, self._status.progress = "resyncing", None, "checking"
                if reason:
                    try:
                        self._resync(reason)
                    except OSError as exc:  # the bank cannot be read or written: try the whole check again later
                        self._storage_failed(f"resynchronising ({reason})", exc)
                        self.resync(reason, delay=self.retry_delays[-1])
                    continue
                self._run_idle_step()
            except Exception:  # the worker must outlive any one bad job
                logger.exception("bank worker: unexpected error; continuing")

    def _drain_jobs(self) -> bool:
        ran = False
        while (job := self._next_job()) is not None:
            self._run_job(job)
            ran = True
        return ran

    def _run_job(self, job: Job) -> None:
        sources = self.sources()
        if job.action == "ingest" and job.image_id not in sources:
            job = Job(job.image_id, "remove", "its final label is gone")
        if job.action == "remove":
            self._set(state="removing", current=job.image_id)
            self._remove(job.image_id)
            return
        self._set(state="ingesting", current=job.image_id)
        self._ingest(job.image_id, *sources[job.image_id], job.reason)

    def _queue_due_retries(self) -> None:
        """Under the condition's lock: turn retries whose time has come into jobs."""
        now = time.time()
        for image_id, (when, attempts, action) in list(self._retries.items()):
            if when <= now and image_id not in self._jobs:
                self._jobs[image_id] = Job(image_id, action, f"retry {attempts + 1} after an I/O error")
                self._status.pending = list(self._jobs)

    def _retry_later(self, image_id: str, action: str, message: str, delay: float | None = None) -> None:
        with self._cond:
            attempts = self._retries.get(image_id, (0.0, 0, action))[1]
            delay = self.retry_delays[min(attempts, len(self.retry_delays) - 1)] if delay is None else delay
            self._retries[image_id] = (time.time() + delay, attempts + 1, action)
            self._status.failed[image_id] = f"{message} (I/O error; attempt {attempts + 1}, retrying in {delay:.0f} s)"
            self._cond.notify_all()

    def _storage_failed(self, what: str, exc: OSError) -> None:
        message = f"the bank could not be written while {what}: {exc}"
        logger.error("bank: %s; retrying every %.0f s until it can", message, self.retry_delays[-1])
        with self._cond:
            self._status.storage_error = f"{message} (since {time.strftime('%Y-%m-%dT%H:%M:%S')})"

    def _drop_entries(self, image_id: str, reason: str | None = None) -> bool | None:
        """Remove the image's bank entries: True if there were some, None if the bank cannot be written."""
        try:
            removed = self.host.remove(image_id)
        except OSError as exc:
            self._storage_failed(f"removing {image_id!r}", exc)
            return None
        if removed:
            self._changed(dict({"image": image_id, "action": "removed"}, **({"reason": reason} if reason else {})))
        return removed

    def _remove(self, image_id: str) -> None:
        """A removal job. If the bank cannot be written, it is retried until it can: entries of a
        deleted label must never stay behind unreported."""
        if self._drop_entries(image_id) is None:
            self._retry_later(image_id, "remove", "its entries could not be removed from the bank", self.retry_delays[-1])
            return
        with self._cond:
            self._retries.pop(image_id, None)
        self._forget_failure(image_id)

    def _failed(self, image_id: str, exc: Exception, message: str) -> None:
        """The current label could not be ingested. An I/O error is retried for as long as it lasts
        (the disk or the file may recover); after a few attempts the image's old entries go, since
        they no longer describe its label. Any other error drops them at once."""
        with self._cond:
            attempts = self._retries.get(image_id, (0.0, 0, "ingest"))[1]
        if isinstance(exc, OSError):
            if exc.errno in STORAGE_ERRNOS:
                self._storage_failed(f"ingesting {image_id!r}", exc)
            if attempts >= len(self.retry_delays):
                self._drop_entries(image_id, reason=message)
            self._retry_later(image_id, "ingest", message)
            return
        with self._cond:
            self._retries.pop(image_id, None)
        removed = self._drop_entries(image_id, reason=message)
        if removed is None:  # the bank cannot even drop them: the ingestion, tried again, would fix both
            self._retry_later(image_id, "ingest", message, self.retry_delays[-1])
            return
        note = "; its previous bank entries were removed" if removed else "; it has no entries in the bank"
        with self._cond:
            self._status.failed[image_id] = message + note
        if removed:
            logger.warning("bank: %r removed from the bank: its current final label cannot be used", image_id)

    def _ingest(self, image_id: str, image_path: str, label_path: str, reason: str) -> bool:
        values_before = set(self.host.engine.bank.label_values)
        logger.info("bank: ingesting %r (%s)", image_id, reason)
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="snapshot-", dir=self.scratch_dir)
        snapshot = Path(tmp) / Path(label_path).name
        try:
            annotation = self.annotation_of(image_id)
            shutil.copyfile(label_path, snapshot)
            report = self.host.ingest(image_id, image_path, str(snapshot), source={"label": label_path},
                                      annotation=annotation)
            if self.after_ingest is not None:
                try:
                    self.after_ingest(image_id, label_path, snapshot, annotation)
                except Exception:
                    logger.exception("bank: %r ingested; what follows an ingestion failed", image_id)
        except Exception as exc:  # one bad label must not stop the others
            message = str(exc).replace(str(snapshot), label_path)
            if isinstance(exc, (VolumeError, BankError, OSError)):
                logger.error("bank: %r not ingested: %s", image_id, message)
            else:
                logger.exception("bank: %r not ingested", image_id)
            self._failed(image_id, exc, message)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        with self._cond:
            self._retries.pop(image_id, None)
        self._forget_failure(image_id)
        seconds = round(time.perf_counter() - start, 3)
        self._changed({"image": image_id, "action": "ingested", "slices": report.slices, "seconds": seconds})
        new_values = set(report.labels) - values_before
        if values_before and new_values:
            # Cached SAM 2 memories are per label: older entries need memories for the new value.
            self.resync(f"new label values {sorted(new_values)}")
        return True

    def _forget_failure(self, image_id: str) -> None:
        with self._cond:
            self._status.failed.pop(image_id, None)

    def _changed(self, last: dict) -> None:
        self.host.refresh_stats()
        with self._cond:
            self._status.storage_error = None  # the bank was just written
            self._status.last = dict(last, at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._status.completed += 1
            self._idle_done.clear()  # e.g. an image without a label now needs its embeddings
        self.on_change()

    def _resync(self, reason: str) -> None:
        self._set(state="resyncing", current=None, progress="checking")
        sources = dict(self.sources())
        orphans = [i for i in self.host.bank_ids() if i not in sources]
        for image_id in orphans:
            self._remove(image_id)
        with self._cond:  # a failure reported for a final label deleted since (on disk) is over
            for image_id in [i for i in self._status.failed if i not in sources and i not in self._retries]:
                del self._status.failed[image_id]
        stale = self.host.stale_images(sources, self.annotation_of)
        if not stale and not orphans:
            logger.info("bank: in step with the datastore (%d labelled images; %s)", len(sources), reason)
            self.host.refresh_stats()
            return
        logger.info(
            "bank: resynchronising with the datastore (%s): %d to ingest, %d removed",
            reason, len(stale), len(orphans),
        )
        for n, (image_id, why) in enumerate(sorted(stale.items()), 1):
            self._drain_jobs()  # a user's save goes before the background rebuild
            current = self.sources()
            if image_id not in current:
                continue
            self._set(state="resyncing", current=image_id, progress=f"{n}/{len(stale)}")
            logger.info("bank: resync %d/%d", n, len(stale))
            self._ingest(image_id, *current[image_id], why)
        logger.info("bank: resynchronisation done (%d images in the bank)", len(self.host.bank_ids()))

    # ------------------------------------------------------------------ idle tasks

    def _has_idle_work(self) -> bool:
        return any(i not in self._idle_done for i in range(len(self._idle_tasks)))

    def _run_idle_step(self) -> None:
        for i, task in enumerate(list(self._idle_tasks)):
            if i in self._idle_done:
                continue
            self._set(state="warming", current=None)
            try:
                more = task()
            except Exception:
                logger.exception("bank worker: idle task failed; it will run again after the next change")
                more = False
            if not more:
                with self._cond:
                    self._idle_done.add(i)
            return
