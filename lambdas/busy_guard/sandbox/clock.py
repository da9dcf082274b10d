"""Injectable clocks for the sandbox: ``Callable[[], float]`` returning epoch seconds.

``ManualClock`` only moves when told to (tests); ``ScaledClock`` runs ``factor`` times faster than
the wall clock (the demo: a 15-minute heartbeat timeout in a few real seconds).
"""

from __future__ import annotations

import threading
import time


class ManualClock:
    """A clock that moves only through :meth:`advance` / :meth:`set`. Thread-safe."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    @property
    def now(self) -> float:
        return self()

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        with self._lock:
            if now < self._now:
                raise ValueError("a clock does not go backwards")
            self._now = float(now)


class ScaledClock:
    """Epoch seconds that pass ``factor`` times faster than real time, starting at ``start``."""

    def __init__(self, factor: float, start: float | None = None) -> None:
        if factor <= 0:
            raise ValueError("factor must be positive")
        self.factor = factor
        self._start = time.time() if start is None else float(start)
        self._t0 = time.monotonic()

    def __call__(self) -> float:
        return self._start + (time.monotonic() - self._t0) * self.factor
