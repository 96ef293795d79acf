"""How far each inference is, for ``GET /fewshot/progress/{id}`` (a client polls it while its
``POST /infer`` is in flight: a ``classic`` inference takes minutes).

An inference is filed under the client's ``request_id`` (infer params), else the image id it
names. The engine's own progress callback (``progress(done, total)`` per slice, or per
registration step) moves it on; the app marks the stages around it. Only the latest
``KEEP`` inferences are kept, in memory: this is a status, not a record.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

KEEP = 100
PROGRESS_KEY = "fewshot_progress"  # the request key naming an inference's tracker (set by the app, not clients)
# state: waiting (another inference holds the bank) | running | done | failed
# stage: waiting | preparing | segmenting | writing | done | failed


def _stamp(t: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) if t else None


@dataclass
class InferenceProgress:
    id: str
    image: str
    model: str
    state: str = "waiting"
    stage: str = "waiting"
    done: int = 0
    total: int = 0
    message: str = ""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    segmenting_since: float | None = None  # when the first step began: the eta's clock
    fraction: float = 0.0
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # this very inference, whatever its id
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------------ called by the app and the engine

    def stage_to(self, stage: str) -> None:
        with self._lock:
            if self.finished is None:
                self.stage, self.state = stage, "waiting" if stage == "waiting" else "running"
                if stage == "segmenting" and self.segmenting_since is None:
                    self.segmenting_since = time.time()

    def step(self, done: int, total: int) -> None:
        """The engine's ``progress(done, total)`` callback."""
        with self._lock:
            if self.finished is not None:
                return
            if self.segmenting_since is None:
                self.segmenting_since = time.time()
            self.state, self.stage = "running", "segmenting"
            # Steps may report out of order (registration workers): neither count goes back.
            self.done = max(int(done), self.done) if int(total) == self.total else int(done)
            self.total = int(total)
            if total > 0:
                self.fraction = max(self.fraction, min(1.0, done / total))

    def finish(self) -> None:
        with self._lock:
            self.state = self.stage = "done"
            self.fraction, self.finished = 1.0, time.time()
            if self.total:
                self.done = self.total

    def fail(self, message: str) -> None:
        with self._lock:
            self.state = self.stage = "failed"
            self.message, self.finished = message, time.time()

    # ------------------------------------------------------------------ read by the route

    def as_dict(self) -> dict:
        with self._lock:
            now = self.finished or time.time()
            eta = None
            if self.finished is None and self.segmenting_since and self.total and 0 < self.done < self.total:
                eta = round((now - self.segmenting_since) / self.done * (self.total - self.done), 1)
            elif self.finished is not None:
                eta = 0.0
            return {
                "id": self.id, "image": self.image, "model": self.model, "state": self.state, "stage": self.stage,
                "done": self.done, "total": self.total, "fraction": round(self.fraction, 4),
                "elapsed": round(now - self.started, 2), "eta": eta, "started_at": _stamp(self.started),
                "finished_at": _stamp(self.finished), "message": self.message,
            }


class ProgressBoard:
    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._items: OrderedDict[str, InferenceProgress] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, key: str, image: str, model: str) -> InferenceProgress:
        item = InferenceProgress(key, image, model)
        with self._lock:
            self._items.pop(key, None)  # the latest inference under an id wins
            self._items[key] = item
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return item

    def get(self, key: str) -> InferenceProgress | None:
        with self._lock:
            return self._items.get(key)

    def by_token(self, token) -> InferenceProgress | None:
        with self._lock:
            return next((i for i in self._items.values() if i.token == token), None)

    def all(self) -> list[dict]:
        with self._lock:
            items = list(self._items.values())
        return [i.as_dict() for i in reversed(items)]
