"""Wall-clock seconds per phase of an edit (statistics, keys, targets, solve, apply): :class:`PhaseTimer`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Wall-clock seconds per named phase, summed over repeated entries.

    Example:
        >>> timer = PhaseTimer()
        >>> with timer.phase("keys"):
        ...     pass
        >>> list(timer.seconds)
        ['keys']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def add_to(self, timings: dict[str, float] | None) -> None:
        """Add these phases' seconds to ``timings`` (a caller's earlier time for a phase is kept, not replaced)."""
        if timings is not None:
            for name, seconds in self.seconds.items():
                timings[name] = timings.get(name, 0.0) + seconds
