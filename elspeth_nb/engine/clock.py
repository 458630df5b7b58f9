"""Clocks: the engine reads time only through one of these, so tests can fake it.

``now()`` is monotonic seconds (durations, timeouts, arrival offsets); ``wall(t)`` turns such a
reading into epoch seconds for the audit timestamps, so timestamps and durations always agree.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    #: ``wall(t) == t + offset``: what turns an engine reading into epoch seconds.
    offset: float

    def now(self) -> float: ...

    def wall(self, t: float) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class SystemClock:
    """Real time: ``time.monotonic`` anchored to ``time.time`` once, at construction."""

    def __init__(self) -> None:
        mono0 = time.monotonic()
        self.offset = time.time() - mono0
        self.now = time.monotonic  # bound once: the engine calls it for every node visit

    def wall(self, t: float) -> float:
        return t + self.offset

    def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)


class FakeClock:
    """Virtual time that only moves when the engine waits: runs are exact and instant.

    >>> clock = FakeClock()
    >>> clock.sleep_until(2.5); clock.now()
    2.5
    """

    #: 2026-01-01T00:00:00Z, so timestamps in tests are recognisable.
    EPOCH = 1_767_225_600.0

    def __init__(self, start: float = 0.0, epoch: float = EPOCH) -> None:
        self._t = start
        self.offset = epoch

    def now(self) -> float:
        return self._t

    def wall(self, t: float) -> float:
        return self.offset + t

    def sleep_until(self, t: float) -> None:
        self._t = max(self._t, t)

    def advance(self, seconds: float) -> None:
        self._t += seconds
