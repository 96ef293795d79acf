"""Measures of an atlas's label taken once per atlas content and kept for later queries.

The shape step's solidities and the extent step's area profiles depend only on an atlas's label
map, never on the query: each is measured the first time an atlas is used for a label and kept,
keyed by the atlas's content hash (``Atlas.key``), so a changed label is measured afresh.
"""
from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

from fewshot.types import Atlas

T = TypeVar("T")
MAX_ITEMS = 65536  # a few hundred thousand atlas-label pairs at most: oldest out first


class AtlasLabelCache(Generic[T]):
    """``measure(atlas, value)``, computed once per (atlas content, label value); thread-safe."""

    def __init__(self, measure: Callable[[Atlas, int], T]) -> None:
        self._measure = measure
        self._items: dict[tuple[str, int], T] = {}
        self._lock = threading.Lock()

    def of(self, atlas: Atlas, value: int) -> T:
        key = (atlas.key, int(value))
        with self._lock:
            if key in self._items:
                return self._items[key]
        found = self._measure(atlas, int(value))  # outside the lock: other atlases need not wait
        with self._lock:
            self._items[key] = found
            while len(self._items) > MAX_ITEMS:
                self._items.pop(next(iter(self._items)))
        return found
