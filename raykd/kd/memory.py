"""Peak memory of a training worker and timing that waits for the GPU (the worker and the benchmarks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch


class PeakMemory:
    """Peak memory while training, above a baseline taken by `reset()`.

    GPU: the CUDA caching allocator's exact peak of allocated bytes. CPU (torch keeps no CPU allocator
    statistics): the kernel's resident-set high-water mark, reset by `echo 5 > /proc/self/clear_refs`, read
    as VmHWM (Linux >= 4.0); where that cannot be written, a thread samples the resident set every `interval`
    seconds. Freed memory leaves the resident set at once only for mmap-backed blocks: run with a fixed
    MALLOC_MMAP_THRESHOLD_ (the benchmarks do) for numbers that follow the live tensors.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device, self.interval = device, interval
        self._peak = self._base = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM after clear_refs=5"

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")

    def reset(self) -> None:
        """Baseline = what the process holds now (weights, optimizer state); peaks are measured from here."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif not _clear_refs():
            self.method = f"resident set sampled every {self.interval * 1000:g} ms"
            if self._thread is None:
                self._thread = threading.Thread(target=self._sample, daemon=True)
                self._thread.start()
        self._base = self._peak = self.current()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.current())

    def peak(self) -> int:
        """Highest memory since reset(), in bytes (absolute)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self._thread is None:
            return _status_bytes("VmHWM")
        return max(self._peak, self.current())

    def above_baseline(self) -> int:
        return max(self.peak() - self._base, 0)

    def close(self) -> None:
        self._stop.set()


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status in bytes (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _clear_refs() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current resident set."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds), waiting for the GPU to finish."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start
