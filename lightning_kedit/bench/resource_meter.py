"""Peak memory and CPU time of a block of code, for benchmarks on shared machines.

:class:`ResourceMeter` samples the resident set size (RSS) of the process every ``interval`` seconds with
psutil when it is installed, else reads the process's lifetime ``ru_maxrss`` at the end (an upper bound); on
a GPU it also reads ``torch.cuda.max_memory_allocated``. CPU seconds are summed over all threads.

Example:
    >>> with ResourceMeter() as meter:
    ...     _ = sum(range(1000))
    >>> meter.source in ("psutil", "ru_maxrss")
    True
"""

from __future__ import annotations

import sys
import threading
import time

import torch

__all__ = ["ResourceMeter"]


class ResourceMeter:
    """The peak resident memory (and CUDA memory) and the CPU time of the process while the ``with`` block runs.

    CPU seconds (all threads, :func:`time.process_time`) do not depend on how busy a shared machine is, unlike
    wall seconds: they are what projections of larger runs are made from.

    Example:
        >>> with ResourceMeter() as meter:
        ...     _ = bytearray(10_000_000)
        >>> meter.peak_mb > 0 and meter.cpu_seconds >= 0
        True
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.cuda_mb: float | None = None
        self.cpu_seconds = 0.0
        self.source = "psutil"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ResourceMeter:
        """Start the CPU clock and the memory sampling (and reset CUDA's peak)."""
        self._cpu_start = time.process_time()
        try:
            import psutil

            process = psutil.Process()
            self.peak_mb = process.memory_info().rss / 2**20

            def sample() -> None:
                while not self._stop.wait(self.interval):
                    self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        except ImportError:
            self.source = "ru_maxrss"
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop sampling and read the CPU seconds and the peak memory."""
        self.cpu_seconds = time.process_time() - self._cpu_start
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        else:
            import resource

            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        if torch.cuda.is_available():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20
