"""The paper's clock: real time, moved forward on request and optionally running faster.

Every timestamp the paper exchange reports (trades, marks, orders, settlements) is this clock's.
``advance(seconds)`` jumps it forward and ``set_speed(factor)`` makes it run ``factor`` times as
fast as real time, so a test crosses an expiry or a daily settlement in seconds. It never goes
back. Login tokens are still checked against real time (clients sign with it).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PaperClock:
    def __init__(self, wall: Callable[[], float] = time.time, start: float | None = None) -> None:
        self.wall = wall
        self._wall_anchor = wall()
        self._paper_anchor = self._wall_anchor if start is None else start
        self.speed = 1.0

    def __call__(self) -> float:
        return self._paper_anchor + (self.wall() - self._wall_anchor) * self.speed

    @property
    def offset(self) -> float:
        """How far the paper's time is ahead of real time (seconds)."""
        return self() - self.wall()

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the paper's clock never goes back")
        self._paper_anchor += seconds

    def set_speed(self, speed: float) -> None:
        if speed < 0:
            raise ValueError("the clock's speed is >= 0")
        now = self()
        self._wall_anchor, self._paper_anchor = self.wall(), now
        self.speed = speed
