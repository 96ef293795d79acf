"""Clocks and meters for the measuring code (eval, bench, scripts): CPU time with worker processes,
time inside the networks, resident memory. Nothing here changes what it measures."""
from __future__ import annotations

import resource
import threading
import time


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its children, live (pool workers) or reaped."""
    try:
        import psutil
    except ImportError:  # only this process's own time then
        return time.process_time()
    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.Error:  # exited between listing and reading: reaped time is counted above
            pass
    return total


class NetworkClock:
    """Wall time spent inside nn.Module forward calls (outermost calls only): the networks' compute.

    Global module hooks see every network the engine runs (DINOv2, LPIPS, SAM 2's encoder,
    attention, decoder, memory encoder) without knowing them; what is left of a stage's time is
    the engine's own overhead (resampling, bank reads, bookkeeping, SAM 2's glue between modules).
    """

    def __init__(self, device: str = "cpu"):
        import torch

        self._sync = torch.cuda.synchronize if str(device).startswith("cuda") else None
        self.seconds = 0.0
        # Process CPU time inside those calls: torch's intra-op threads do the work, so the calling
        # thread's own CPU time would count only its share and make overhead look like half the total.
        self.cpu_seconds = 0.0
        self._depth = 0
        self._start = self._cpu_start = 0.0
        self._thread = None
        self._handles: list = []

    def _pre(self, module, args):
        if threading.get_ident() != self._thread:
            return
        if self._depth == 0:
            if self._sync:
                self._sync()
            self._start, self._cpu_start = time.perf_counter(), time.process_time()
        self._depth += 1

    def _post(self, module, args, output):
        if threading.get_ident() != self._thread or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            if self._sync:
                self._sync()
            self.seconds += time.perf_counter() - self._start
            self.cpu_seconds += time.process_time() - self._cpu_start

    def __enter__(self) -> "NetworkClock":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.seconds, self.cpu_seconds, self._depth, self._thread = 0.0, 0.0, 0, threading.get_ident()
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """The process's lifetime peak resident set (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakRss:
    """Peak resident set of this process while the block runs, sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> "PeakRss":
        self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)
