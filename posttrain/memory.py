"""Peak memory of a region of code, the one reader behind the learner's `memory/learner_peak_gib` and
bench/memory_bench.py.

On CUDA it is the allocator's peak (`max_memory_allocated`, reset on entry). On the CPU it is the
process's peak resident set: Linux keeps a high-water mark (VmHWM) that writing "5" to
/proc/self/clear_refs resets to the current RSS, so the mark read on exit is exact. Where that file is not
writable (some sandboxes and container runtimes) a thread samples the RSS instead, which can miss a spike
shorter than its interval.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

GIB = 2**30
SAMPLE_S = 0.002
"""The fallback sampler's interval: short against a learner step's large allocations (the loss path's
[tokens, vocab] tensors live for tens of milliseconds at least), cheap against its compute."""
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")
STATM = Path("/proc/self/statm")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """`with PeakMemory(device) as m: ...`, then `m.start_bytes` (in use on entry) and `m.peak_bytes` (the
    most in use inside, entry included): allocator bytes on CUDA, resident bytes of the process on CPU."""

    def __init__(self, device: str, sample_s: float = SAMPLE_S) -> None:
        self.cuda = device == "cuda"
        self.sample_s = sample_s
        self.start_bytes = self.peak_bytes = 0
        self._sampler: _RSSSampler | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self._sampler = None if reset_high_water_mark() else _RSSSampler(self.sample_s)
        self.start_bytes = in_use_bytes("cuda" if self.cuda else "cpu")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.cuda:
            import torch

            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            self.peak_bytes = max(self.start_bytes, self._sampler.stop())
        else:
            self.peak_bytes = _status_kib("VmHWM") * 1024

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


def in_use_bytes(device: str) -> int:
    """What PeakMemory reads now: allocated bytes on CUDA, the process's resident set on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated()
    return rss_bytes()


def reset_high_water_mark() -> bool:
    """Resets this process's VmHWM to its current RSS; False where /proc/self/clear_refs is not writable."""
    try:
        with CLEAR_REFS.open("w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rss_bytes() -> int:
    """The process's resident set now."""
    return int(STATM.read_text().split()[1]) * PAGE_BYTES


def _status_kib(field: str) -> int:
    line = next(x for x in STATUS.read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1])


class _RSSSampler:
    """The most RSS seen by a daemon thread reading it every `interval` seconds until `stop()`."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.peak = rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, rss_bytes())
