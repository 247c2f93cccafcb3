"""The circuit breaker against a fee loop: pure, no I/O, every call takes `now`.

A bot that does not listen to `tp:halt` rebuilds a position as soon as the guardian closed it; each
closure costs a taker fee, and without a brake the guardian would pay it again and again (issue 19:
ten closures in 170 s, 238 USD of fees). The rules engine calls `repeat()` before it decides a
closure of positions that were rebuilt while a halt or a cool-down was in force (a *repeat
closure*). Up to `max_repeats` of them within `window_seconds` go ahead; the next one opens the
breaker instead. While it is open:

* no automatic profit, age or expiry closure is decided;
* the emergency stop stays armed — judged on `net_pnl`, whatever `emergency_stop_basis` says, so
  the exit cost of a rebuilt position can never fire it, only a loss that has happened
  (`emergency_allowed`); a repeat closure that is an emergency stop still goes ahead as the breaker
  opens;
* the halt stays (`tp:halt` reason `circuit_breaker`) and the quotes and orders rebuilt are
  cancelled again (a cancel-only command, see rules.py);
* only the operator's `resume` closes it (`close`), and forgets the repeats counted.

The total closing fees a rogue bot can make the guardian pay are therefore bounded: docs/operations.md,
"The circuit breaker", has the formula and a worked example.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BreakerState(BaseModel):
    """What the breaker remembers; checkpointed with the engine (and mirrored for `thalex-tp status`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    repeats: list[float] = Field(default_factory=list)
    """When each repeat closure within the window was decided (oldest first)."""
    opened_ts: float | None = None
    """When the breaker opened; None while closed."""
    repeats_when_opened: int = 0
    emergency_stops_while_open: int = 0
    cancels_while_open: int = 0
    """Cancel-only commands sent since it opened (the first one as it opened)."""
    last_cancel_ts: float | None = None
    last_cancel_positions: dict[str, float] = Field(default_factory=dict)
    """The open positions when the last cancel-only command was decided: a change means a rebuild."""
    violations_since_cancel: int = 0
    """Halt violations ingest reported since the last cancel-only command: orders, quotes or bots
    that rebuild nothing yet (resting, unfilled) but will; they call for a cancel as a rebuild does."""


class CircuitBreaker:
    """Counts repeat closures in a sliding window and opens past the limit (module docstring)."""

    def __init__(self, max_repeats: int, window_seconds: float, state: BreakerState | None = None) -> None:
        self.max_repeats = max_repeats
        self.window_seconds = window_seconds
        self.state = state if state is not None else BreakerState()

    @property
    def is_open(self) -> bool:
        return self.state.opened_ts is not None

    def recent(self, now: float) -> int:
        """Repeat closures decided within the window before `now`."""
        return sum(1 for ts in self.state.repeats if now - ts < self.window_seconds)

    def repeat(self, now: float, *, emergency: bool) -> bool:
        """A repeat closure is about to be decided: True if it may go ahead.

        Past the limit the breaker opens instead; an emergency stop still goes ahead (losses are
        cut), anything else does not.
        """
        self.state.repeats = [ts for ts in self.state.repeats if now - ts < self.window_seconds]
        if self.is_open:
            return emergency
        if len(self.state.repeats) >= self.max_repeats:
            self.state.opened_ts = now
            self.state.repeats_when_opened = len(self.state.repeats)
            return emergency
        self.state.repeats.append(now)
        return True

    def emergency_stop(self) -> None:
        """An emergency stop was decided while open (counted for the operator)."""
        if self.is_open:
            self.state.emergency_stops_while_open += 1

    def cancel_due(self, positions: dict[str, float], now: float, min_interval: float) -> bool:
        """While open: a cancel-only command is due when the open positions changed since the last
        one (something rebuilt them) or a halt violation was seen (something will), at most once
        per `min_interval` seconds."""
        if not self.is_open:
            return False
        last = self.state.last_cancel_ts
        if last is not None and now - last < min_interval:
            return False
        return (last is None or positions != self.state.last_cancel_positions
                or self.state.violations_since_cancel > 0)

    def violation_seen(self) -> None:
        """Ingest saw an order, quote, bot or trade that is not the guardian's during the halt."""
        if self.is_open:
            self.state.violations_since_cancel += 1

    def cancelled(self, positions: dict[str, float], now: float) -> None:
        """A cancel-only command was decided with these open positions."""
        self.state.last_cancel_ts = now
        self.state.last_cancel_positions = dict(positions)
        self.state.cancels_while_open += 1
        self.state.violations_since_cancel = 0

    def close(self) -> bool:
        """The operator's `resume`: closed, repeats forgotten. True if it was open."""
        was_open = self.is_open
        self.state = BreakerState()
        return was_open
