"""Keeps the datastore's file watcher alive, and says so when it is not.

Stock MONAI Label starts a watchdog observer whose handlers reconcile the index with the files on
disk. An exception in a handler ends the observer's thread for good, silently: from then on deleted
images stay listed (a strategy proposed a deleted image 31 times in 40) and labels changed on disk
are ignored. Here every handler call is wrapped: an error is logged and counted, then the index is
reconciled once more, since the event that raised is lost. A supervisor thread restarts an
observer (or one of its emitter threads) that died anyway, and ``/info`` shows the state.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

logger = logging.getLogger(__name__)

HANDLER_CALLBACKS = ("on_created", "on_deleted", "on_modified", "on_moved")
CHECK_SECONDS = 5.0  # how soon a dead observer is noticed; a check is two is_alive calls


@dataclass
class WatcherStatus:
    state: str = "starting"  # running | restarting | failed | stopped
    errors: int = 0  # handler calls that raised (each followed by a full reconcile)
    restarts: int = 0  # observers restarted after they died
    last_error: str | None = None
    last_error_at: str | None = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class WatcherSupervisor:
    """For a LocalDatastore whose ``_observer`` watches ``_datastore_path`` with ``_handler``."""

    def __init__(self, datastore, reconcile: Callable[[], None], check_seconds: float = CHECK_SECONDS):
        self.datastore = datastore
        self.reconcile = reconcile  # what to run after an error: every lost event is covered by it
        self.check_seconds = check_seconds
        self._status = WatcherStatus()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        handler = datastore._handler
        for name in HANDLER_CALLBACKS:
            callback = getattr(handler, name, None)
            if callback is not None:
                setattr(handler, name, self._guarded(callback))
        self._thread = threading.Thread(target=self._run, name="fewshot-watcher-supervisor", daemon=True)

    def start(self) -> "WatcherSupervisor":
        self._set(state="running" if self._observer_alive() else "restarting")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._set(state="stopped")

    def status(self) -> dict:
        with self._lock:
            return asdict(self._status)

    def _set(self, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self._status, key, value)

    def _record_error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._status.errors += 1
            self._status.last_error = f"{what}: {type(exc).__name__}: {exc}"
            self._status.last_error_at = _now()

    # ------------------------------------------------------------------ handler calls

    def _guarded(self, callback):
        def call(event):
            try:
                callback(event)
            except Exception as exc:  # the observer's thread must outlive any one event
                logger.exception("datastore watcher: handling %s failed; reconciling the whole datastore", event)
                self._record_error(f"handling {type(event).__name__}", exc)
                self._reconcile_quietly()

        return call

    def _reconcile_quietly(self) -> None:
        try:
            self.reconcile()
        except Exception as exc:
            logger.exception("datastore watcher: reconciling failed; the next event or check tries again")
            self._record_error("reconciling", exc)

    # ------------------------------------------------------------------ supervision

    def _observer_alive(self) -> bool:
        observer = getattr(self.datastore, "_observer", None)
        return bool(observer is not None and observer.is_alive() and all(e.is_alive() for e in observer.emitters))

    def _run(self) -> None:
        while not self._stop.wait(self.check_seconds):
            if not self._observer_alive():
                self._restart()

    def _restart(self) -> None:
        old = self.datastore._observer
        logger.error("datastore watcher: the file watcher stopped; restarting it (files changed meanwhile are reconciled)")
        self._set(state="restarting")
        try:
            try:
                old.stop()  # its emitters too, if some are still running
            except Exception:
                pass
            observer = type(old)()
            observer.schedule(self.datastore._handler, recursive=True, path=self.datastore._datastore_path)
            observer.start()
        except Exception as exc:
            logger.exception("datastore watcher: restart failed; trying again in %.0f s", self.check_seconds)
            self._record_error("restarting", exc)
            self._set(state="failed")
            return
        self.datastore._observer = observer
        with self._lock:
            self._status.restarts += 1
            self._status.state = "running"
        self._reconcile_quietly()
