"""Peak resident memory of a code block in this process, without tracemalloc.

Linux lets a process reset its own high-water mark (``/proc/self/clear_refs`` ← 5, then ``VmHWM``);
where that is refused a psutil sampling thread (every few milliseconds) supplies the peak instead.
Both run, and the larger peak is reported.
"""

from __future__ import annotations

import threading
from types import TracebackType

import psutil


def _hwm_bytes() -> int | None:
    """VmHWM (peak RSS since the last reset) in bytes, or None where /proc is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager: ``baseline``, ``peak`` and ``delta`` (bytes) of RSS while the block ran."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.process = psutil.Process()
        self.baseline = self.peak = 0
        self.source = "psutil sampling"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._hwm_reset = False

    def _sample(self) -> None:
        """Thread body: record the largest RSS seen until stopped."""
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        """Take the baseline, reset the kernel's high-water mark and start sampling."""
        self.baseline = self.peak = self.process.memory_info().rss
        self._hwm_reset = _reset_hwm()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop sampling and settle the peak from the samples and VmHWM."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        hwm = _hwm_bytes() if self._hwm_reset else None
        if hwm is not None and hwm >= self.peak:
            self.peak, self.source = hwm, "VmHWM after clear_refs"

    @property
    def delta(self) -> int:
        """Peak minus the RSS at entry: the memory the block added at its worst moment."""
        return self.peak - self.baseline
