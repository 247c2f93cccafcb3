"""The take-profit rules engine: when to close the portfolio, and how much — pure and explainable.

No Redis, no asyncio, no clock: every call takes `now`. The shell (`app.py`)
feeds the engine snapshots, timer ticks, operator controls and the executor's
outcome, publishes the `Command` built from each `Decision`, holds the closure
lease in Redis and checkpoints `to_state()` so that a restart never issues a
second command for the same trigger.

Barriers, in priority order (the first that holds decides; one decision per call)
----------------------------------------------------------------------------------
1. **Emergency stop** — the emergency figure `<= emergency_close_threshold`. Full close.
   The figure is `emergency_stop_basis`: `net_pnl` by default (the loss market moves and fees
   have caused), or `net_after_close` (that less the estimated exit cost). On `net_pnl`,
   opening a position never trips the stop by itself: its exit cost is not a loss yet; when
   that cost alone is wider than a barrier the engine warns instead (`exit_cost_warning`).
2. **Time limit** — the oldest position is at least `max_position_age_hours` old,
   or a dated instrument (future, option) is within `close_before_expiry_minutes`
   of its expiry (0 turns the expiry rule off). Full close, reason `max_age`.
   Dust (below) is no position for either: the portfolio leaves it out of
   `oldest_position_ts` and `next_expiry`.
3. **Take profit** — the profit figure `>= min_profit_usd`. The profit figure is
   `net_after_close`, or `net_pnl` when `profit_after_fees` is false. Full close.
4. **Trailing take profit** (`trailing_activation_usd > 0`) — arms once the
   profit figure reaches the activation, follows its peak, and closes everything
   when the figure falls to `peak - trailing_retrace_usd`. Take profit outranks
   it, so it guards profits that have not (yet) reached `min_profit_usd`. With
   `confirm_snapshots = N > 1` the peak (and the arming) follows the level the last
   N fresh snapshots all reached, so a one-snapshot spike cannot raise the stop.
5. **Partial take profit** (`partial_close_fraction > 0`) — the profit figure
   `>= partial_profit_threshold` closes `partial_close_fraction` of every
   position, once per epoch (the attempt counts, even if the executor fails).

Guards, checked in this order before any barrier
------------------------------------------------
* **Order** — a snapshot that is not newer than the last one seen (its
  `(epoch, seq)` not greater, or its `ts` earlier) is ignored and changes nothing:
  a redelivery must neither decide twice nor count twice towards confirmation.
* **Nothing to close** — no open position, no decision.
* **Only dust** — every open position is dust (`Snapshot.dust`: below the instrument's minimum
  order once rounded to its volume tick; no order can close it): no decision, not even the
  emergency stop or `close_all` — a command would close nothing and only wipe every quote on the
  account (the dust loop: after a closure that left dust, the time limit fired on it after every
  cool-down until the breaker opened). With closable positions beside it, dust is valued and
  closed with them like any position: the money barriers judge the whole book.
* **Epoch closed** — once a full closure of the epoch completed, that epoch's
  later snapshots only lag behind the executor; the portfolio opens the next one.
* **One closure in flight** — never bypassed, not by the emergency stop, not by
  `close_all`. The engine's own state *or* the shell's view of the Redis lease
  (`External.closure_in_flight`) is enough to refuse.
* **Cool-down** (`cooldown_seconds` after a closure finishes) — blocks every
  automatic barrier, the emergency stop included: it is the only brake between a
  closure the exchange keeps rejecting and a retry storm, and it is short.
  `close_all` ignores it (the operator asked).
* **Operator halt** — no automatic decision until `resume`, *except the emergency
  stop*: a halt pauses profit-taking, it must not silently remove the loss
  protection (pass `emergency_when_halted=False` to make a halt total). The
  decision says it overrode the halt. `close_all` still fires.
* **Stale prices** — no decision while any open position's instrument is in
  `snapshot.stale_instruments` or `snapshot.suspect_instruments` (a tick held as
  implausible by the portfolio until the exchange confirms it), except the emergency
  stop and `close_all`, which decide on the last known plausible prices and say so
  (`Decision.stale_instruments`). The snapshot never values a suspect tick, so an
  emergency stop never fires on one unconfirmed tick.
* **`enable_portfolio_tp = false`** — disables the three profit barriers. The
  emergency stop stays armed unless `emergency_stop_when_disabled = false`; the
  time limit is a risk barrier, not a profit barrier, and stays armed.
* **Confirmation** — a profit barrier must hold on `confirm_snapshots`
  consecutive fresh snapshots (hysteresis against a one-tick spike). A snapshot
  with stale prices breaks the run. While a higher-priority profit barrier is
  still confirming, lower ones wait: the higher one would supersede them.

Circuit breaker (`breaker.py`, issue 19)
----------------------------------------
An epoch whose first open position an order can close (dust does not count: it is what a closure
leaves, not what a rogue rebuilds) appeared during a cool-down, an operator halt or an open
breaker was *rebuilt* by something that ignores the halt. Closing it is a repeat closure:
`_decide` asks the breaker first, and past `breaker_max_repeat_closures` within
`breaker_window_seconds` the breaker opens and the decision becomes a cancel-only one (reason
`circuit_breaker`, no positions: the executor cancels, closes nothing; its end starts no cool-down
and ends no epoch). An emergency stop past the limit still goes ahead. While open, only the
emergency stop decides, on `net_pnl` whatever its basis; a change of the open positions sends
another cancel-only command (at most every `RECANCEL_MIN_SECONDS`); `tp:halt` holds reason
`circuit_breaker`; `resume` closes it. `close_all` is never counted nor stopped.

Timer ticks (`on_timer`) re-evaluate only the time limit on the last snapshot:
time passes without snapshots, money does not move without them.

Money comparisons allow `MONEY_EPSILON` (a billionth of a dollar) of float
noise, so a figure summed to 1.0999999999999999 meets a 1.10 target while
1.0999999 does not. Times compare exactly.

State machine (`GuardState`, see `RulesEngine.state`)
------------------------------------------------------
    IDLE ──barrier holds, unconfirmed──► CONFIRMING ──lapses──► IDLE
    IDLE / CONFIRMING ──decision──► CLOSURE_IN_FLIGHT
    CLOSURE_IN_FLIGHT ──on_closure_finished──► COOLDOWN ──now >= until──► IDLE
    any ──halt──► OPERATOR_HALT ──resume──► whichever of the above still applies

The state is derived from the data each state needs (the in-flight decision,
the cool-down deadline, the operator halt, the confirmation counts) with the
precedence OPERATOR_HALT > CLOSURE_IN_FLIGHT > COOLDOWN > CONFIRMING > IDLE, so
it can never disagree with that data.

Command ids are deterministic: `e{epoch}-{reason}-s{snapshot_seq}-n{n}`, `n`
counting the decisions of the epoch. A snapshot redelivered after a crash that
lost the checkpoint reproduces the same id (the executor is idempotent per id);
a retry after a failed closure gets a new `n`, so it is never taken for a
duplicate even when it is decided on the same snapshot (timer ticks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from services.common.config import EmergencyBasis, PortfolioTakeProfit
from services.common.contracts import (
    SNAPSHOT_VERSION,
    CloseReason,
    Command,
    Control,
    ControlAction,
    Halt,
    HedgeGroup,
    Legs,
    LegToClose,
    Snapshot,
    SnapshotPosition,
)
from services.common.exit_cost import ExitCostWarning, exit_cost_warning
from services.common.snapshots import SnapshotView
from services.takeprofit.breaker import BreakerState, CircuitBreaker
from services.takeprofit.legs import ClosingLegs, to_close

STATE_VERSION: Final = 1
MONEY_EPSILON = 1e-9
"""USD of float noise tolerated when comparing a money figure with its barrier."""
_TICK_EPSILON = 1e-9
"""Steps of float noise tolerated when rounding an amount down to the volume tick."""
OPERATOR_HALT_REASON = "operator_halt"
CIRCUIT_BREAKER_REASON = "circuit_breaker"
RECANCEL_MIN_SECONDS = 5.0
"""While the breaker is open, a cancel-only command is sent again when the open positions changed
(something rebuilt them), at most this often."""

_PROFIT_BARRIERS = (CloseReason.TAKE_PROFIT, CloseReason.TRAILING_STOP, CloseReason.PARTIAL_TAKE_PROFIT)
DECISION_PRICES_MAX_AGE_SECONDS = 1.0
"""A command carries the snapshot's exit prices (the executor's first wave is priced from them)
only when they are fresh: not stale, and the snapshot under a second old at the decision (a timer
or `close_all` may decide on an old one). Otherwise the executor reads the market first."""


class GuardState(StrEnum):
    """Where the engine stands between two decisions (see the module docstring)."""

    IDLE = "idle"
    CONFIRMING = "confirming"
    CLOSURE_IN_FLIGHT = "closure_in_flight"
    CIRCUIT_BREAKER = "circuit_breaker"
    COOLDOWN = "cooldown"
    OPERATOR_HALT = "operator_halt"


class Skip(StrEnum):
    """Why an evaluation produced no decision (for logs and a metrics label)."""

    OUT_OF_ORDER = "out_of_order"
    NO_SNAPSHOT = "no_snapshot"
    NO_POSITIONS = "no_positions"
    ONLY_DUST = "only_dust"
    """Every open position is dust: no order can close any of it."""
    EPOCH_CLOSED = "epoch_closed"
    CLOSURE_IN_FLIGHT = "closure_in_flight"
    COOLDOWN = "cooldown"
    OPERATOR_HALT = "operator_halt"
    STALE_PRICES = "stale_prices"
    CONFIRMING = "confirming"
    NO_BARRIER = "no_barrier"
    CIRCUIT_BREAKER = "circuit_breaker"
    """The circuit breaker is open: only the emergency stop (on `net_pnl`) decides."""
    CONTROL = "control"
    """A halt or resume was applied; those never decide anything by themselves."""


@dataclass(frozen=True, slots=True)
class External:
    """What the shell read from Redis just before asking; any of it is enough to refuse.

    The engine keeps its own state, but after a restart whose checkpoint was lost
    Redis is the only memory of a closure lease, an operator halt or a cool-down.
    """

    closure_in_flight: bool = False
    halted: bool = False
    cooldown_until: float = 0.0


NOTHING_EXTERNAL = External()


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Decision(_Model):
    """One decision to close, with everything needed to build and explain its command.

    Kept in the engine's state while in flight (and through the cool-down after it) without its
    positions and groups: the command written with the decision carries them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    command_id: str
    epoch: int
    reason: CloseReason
    fraction: float = Field(gt=0.0, le=1.0)
    snapshot_seq: int
    snapshot_ts: float
    decided_ts: float
    pnl: float
    """The P&L figure at the decision (USD): what goes into `Command.net_pnl`."""
    figure: float
    """The number compared with the barrier: USD, or seconds for the time limit."""
    threshold: float
    """The barrier's value in `unit` (0.0 for a manual close: there is no barrier)."""
    unit: Literal["usd", "seconds", "closures"]
    """`closures` for a cancel-only decision: `figure` repeat closures counted, `threshold` the limit."""
    positions: Annotated[tuple[LegToClose, ...], SkipValidation] = ()
    """Plain tuples, not validated here (1,000 legs per decision): the command's `Legs` validates
    them when it is built. Empty for a cancel-only decision (reason `circuit_breaker`): nothing is
    closed. Not checkpointed (`RulesEngine.to_state`): the command, written in the same transaction,
    carries them."""
    groups: tuple[HedgeGroup, ...] = ()
    stale_instruments: tuple[str, ...] = ()
    """Non-empty when the decision was taken on last known prices (emergency, manual)."""
    overrode_halt: bool = False
    sentence: str


class _EpochState(_Model):
    """What one epoch remembers; a new epoch starts from scratch."""

    epoch: int
    decisions: int = 0
    closed: bool = False
    partial_fired: bool = False
    trailing_peak: float | None = None
    """None while the trailing take profit is not armed."""
    recent_figures: list[float] = Field(default_factory=list)
    """The profit figures of the last `confirm_snapshots` fresh snapshots: the trailing peak follows
    the level they all held (their minimum), so one spike cannot raise it."""
    confirmations: dict[CloseReason, int] = Field(default_factory=dict)
    seen_open: bool = False
    """A snapshot of this epoch had an open position."""
    rebuilt: bool = False
    """The epoch's positions first appeared while a halt or cool-down was in force: closing them is
    a repeat closure, counted by the circuit breaker."""


class _OperatorHalt(_Model):
    by: str
    since: float


class _State(_Model):
    """The engine's whole memory; `to_state`/`from_state` are its JSON form."""

    version: Literal[1] = STATE_VERSION
    last_snapshot: Snapshot | None = None
    epoch: _EpochState | None = None
    halt: _OperatorHalt | None = None
    in_flight: Decision | None = None
    finished: Decision | None = None
    """The last closure that finished: what the cool-down is about."""
    cooldown_until: float = 0.0
    breaker: BreakerState = Field(default_factory=BreakerState)


_NOT_CHECKPOINTED: Final = {"in_flight": {"positions", "groups"}, "finished": {"positions", "groups"}}
"""What a decision's checkpoint leaves out: the engine needs none of it once the command is written."""


class RulesEngine:
    """Evaluates the barriers and guards; see the module docstring for the rules."""

    def __init__(
        self,
        config: PortfolioTakeProfit,
        *,
        emergency_when_halted: bool = True,
    ) -> None:
        self.config = config
        self.emergency_when_halted = emergency_when_halted
        self._s = _State()
        self._view = SnapshotView()
        self.legs = ClosingLegs()
        """Each open row's full close, built as its row changes (`legs.py`): a decision picks them up."""
        self.last_skip: Skip | None = None
        """Why the last call produced no decision; None after a decision."""

    @property
    def view(self) -> SnapshotView:
        """Every position, folded from the snapshots (v2 carry only the changed ones): read only
        when a command is built. Not checkpointed: the shell restores it from the portfolio's
        rows hash, and re-reads it when a snapshot does not follow the one folded last."""
        return self._view

    @view.setter
    def view(self, view: SnapshotView) -> None:
        self._view = view
        self.legs = ClosingLegs(view.rows.values())

    # --- persistence -------------------------------------------------------------------

    def to_state(self) -> str:
        """The engine's memory as JSON text (checkpoint it after every call that changed it).

        It holds the last snapshot's totals and figures without its positions (those are the
        view's), and the closure in flight (and the last one finished) without the positions it
        closes (those are its command's), so its size does not grow with the positions held: it is
        written with every batch of snapshots, also while a 1,000-leg closure runs.
        """
        return self._s.model_dump_json(exclude=_NOT_CHECKPOINTED)

    @classmethod
    def from_state(
        cls, config: PortfolioTakeProfit, state: str | bytes, *, emergency_when_halted: bool = True
    ) -> RulesEngine:
        """Rebuild an engine from `to_state()`; the config comes from the current file, not the checkpoint."""
        engine = cls(config, emergency_when_halted=emergency_when_halted)
        engine._s = _State.model_validate_json(state)
        return engine

    # --- read-only views ---------------------------------------------------------------

    @property
    def in_flight(self) -> Decision | None:
        """The decision whose closure runs; republish its command after a restart."""
        return self._s.in_flight

    @property
    def last_snapshot(self) -> Snapshot | None:
        return self._s.last_snapshot

    @property
    def breaker(self) -> CircuitBreaker:
        """The circuit breaker over the engine's state (changes to it are checkpointed with the engine)."""
        cfg = self.config
        return CircuitBreaker(cfg.breaker_max_repeat_closures, cfg.breaker_window_seconds, self._s.breaker)

    def exit_cost_warning(self) -> ExitCostWarning | None:
        """On the last snapshot: the exit cost alone is wider than the emergency stop or the target."""
        snap = self._s.last_snapshot
        return None if snap is None else exit_cost_warning(snap, self.config)

    def state(self, now: float, external: External = NOTHING_EXTERNAL) -> GuardState:
        """The guard state at `now`, by precedence (module docstring)."""
        if self._halted(external):
            return GuardState.OPERATOR_HALT
        if self._closing(external):
            return GuardState.CLOSURE_IN_FLIGHT
        if self.breaker.is_open:
            return GuardState.CIRCUIT_BREAKER
        if self._cooling(now, external):
            return GuardState.COOLDOWN
        epoch = self._s.epoch
        if epoch is not None and any(epoch.confirmations.values()):
            return GuardState.CONFIRMING
        return GuardState.IDLE

    def halt_document(self, now: float) -> Halt | None:
        """What `tp:halt` should hold now (quoters stand down while it exists), or None to delete it."""
        if self._s.halt is not None:
            return Halt(reason=OPERATOR_HALT_REASON, since=self._s.halt.since)
        if self._s.in_flight is not None:
            d = self._s.in_flight
            return Halt(reason=d.reason, command_id=d.command_id, since=d.decided_ts)
        opened = self._s.breaker.opened_ts
        if opened is not None:
            return Halt(reason=CIRCUIT_BREAKER_REASON, since=opened)
        if self._cooling(now, NOTHING_EXTERNAL) and self._s.finished is not None:
            d = self._s.finished
            return Halt(
                reason=d.reason, command_id=d.command_id, since=d.decided_ts, until=self._s.cooldown_until
            )
        return None

    def distances(self, now: float) -> dict[str, float]:
        """How far each armed barrier is from firing on the last snapshot; <= 0 means it holds.

        USD for money barriers, seconds for `max_age_seconds` / `expiry_seconds`.
        `trailing_activation` is reported until the trailing stop arms, then `trailing_stop`.
        """
        snap = self._s.last_snapshot
        if snap is None:
            return {}
        cfg = self.config
        figure = self._profit_figure(snap)
        out: dict[str, float] = {}
        if self._emergency_armed():
            out["emergency_stop"] = self._emergency_figure(snap) - cfg.emergency_close_threshold
        oldest = self._oldest_ts(snap)
        if oldest is not None:
            out["max_age_seconds"] = cfg.max_position_age_hours * 3600.0 - (now - oldest)
        expiry = _soonest_expiry(snap)
        if expiry is not None and cfg.close_before_expiry_minutes > 0:
            out["expiry_seconds"] = expiry[1] - now - cfg.close_before_expiry_minutes * 60.0
        if cfg.enable_portfolio_tp:
            out["take_profit"] = cfg.min_profit_usd - figure
            epoch = self._s.epoch
            if cfg.trailing_activation_usd > 0:
                peak = epoch.trailing_peak if epoch else None
                if peak is None:
                    out["trailing_activation"] = cfg.trailing_activation_usd - figure
                else:
                    out["trailing_stop"] = figure - (peak - cfg.trailing_retrace_usd)
            if cfg.partial_close_fraction > 0 and not (epoch and epoch.partial_fired):
                out["partial_take_profit"] = cfg.partial_profit_threshold - figure
        return out

    # --- inputs ------------------------------------------------------------------------

    def on_snapshot(
        self, snapshot: Snapshot, now: float, external: External = NOTHING_EXTERNAL
    ) -> Decision | None:
        """Evaluate every barrier on a new snapshot; a returned decision is already in flight."""
        last = self._s.last_snapshot
        if last is not None and (
            (snapshot.epoch, snapshot.seq) <= (last.epoch, last.seq) or snapshot.ts < last.ts
        ):
            return self._skip(Skip.OUT_OF_ORDER)
        if self._s.epoch is None or snapshot.epoch > self._s.epoch.epoch:
            self._s.epoch = _EpochState(epoch=snapshot.epoch)
        self.view.fold(snapshot)
        rows = self.view.rows
        if snapshot.full:
            self.legs = ClosingLegs(rows.values())
        else:  # only rows the view took (a re-read view may already hold newer ones)
            self.legs.refresh(p for p in snapshot.positions if rows.get(p.instrument) is p)
        if snapshot.positions:  # the rows are the view's; the engine decides on the totals
            snapshot = snapshot.model_copy(update={"v": SNAPSHOT_VERSION, "full": False, "positions": []})
        self._s.last_snapshot = snapshot
        self._note_rebuild(snapshot, now, external)
        stale = _stale_positions(snapshot, self.view)
        self._track(snapshot, fresh=not stale)
        return self._evaluate(snapshot, now, external, stale, timer=False)

    def on_timer(self, now: float, external: External = NOTHING_EXTERNAL) -> Decision | None:
        """Every `check_interval_seconds` without a snapshot: re-evaluate the time limit at `now`."""
        snap = self._s.last_snapshot
        if snap is None:
            return self._skip(Skip.NO_SNAPSHOT)
        return self._evaluate(snap, now, external, _stale_positions(snap, self.view), timer=True)

    def on_control(
        self, control: Control, now: float, external: External = NOTHING_EXTERNAL
    ) -> Decision | None:
        """Apply an operator action; only `close_all` can return a decision (reason `manual`).

        `close_all` fires regardless of the barriers, the cool-down, an operator
        halt and stale prices, but never while a closure is in flight, on a closed
        epoch, or with nothing to close: it is refused (see `last_skip`), not queued.
        """
        if control.action is ControlAction.HALT:
            if self._s.halt is None:
                self._s.halt = _OperatorHalt(by=control.by, since=now)
            return self._skip(Skip.CONTROL)
        if control.action is ControlAction.RESUME:
            self._s.halt = None
            self._s.breaker = BreakerState()  # the operator looked: the breaker closes, repeats forgotten
            return self._skip(Skip.CONTROL)
        snap = self._s.last_snapshot
        if snap is None:
            return self._skip(Skip.NO_SNAPSHOT)
        refusal = self._hard_refusal(snap, external)
        if refusal is not None:
            return self._skip(refusal)
        pnl = self._profit_figure(snap)
        stale = _stale_positions(snap, self.view)
        sentence = f"manual close_all by {control.by}: closing every position at P&L {_usd(pnl)}"
        return self._decide(
            snap,
            now,
            CloseReason.MANUAL,
            1.0,
            pnl=pnl,
            figure=pnl,
            threshold=0.0,
            unit="usd",
            sentence=sentence,
            stale=stale,
        )

    def on_closure_finished(self, command_id: str, *, completed: bool, now: float) -> bool:
        """The executor reported `completed` or `failed` (or the shell gave up on the lease).

        Starts the cool-down. A completed full closure ends the epoch: nothing more
        is decided on its snapshots. Returns False (and changes nothing) when
        `command_id` is not the closure in flight — a stale or foreign report.
        """
        decision = self._s.in_flight
        if decision is None or decision.command_id != command_id:
            return False
        self._s.in_flight = None
        if decision.reason is CloseReason.CIRCUIT_BREAKER:
            return True  # a cancel-only command closed nothing: no cool-down, the epoch goes on
        self._s.finished = decision
        self._s.cooldown_until = now + self.config.cooldown_seconds
        epoch = self._s.epoch
        if completed and decision.fraction == 1.0 and epoch is not None and epoch.epoch == decision.epoch:
            epoch.closed = True
        return True

    def on_decision_dropped(self, command_id: str) -> bool:
        """The shell could not build the decision's command (a partial close that rounds to nothing).

        Nothing reached the executor, so nothing starts: no cool-down (it would hold every barrier,
        the emergency stop's included, and raise a halt for a closure that never was) and no epoch
        end. A dropped partial take profit stays fired for its epoch: it would round to nothing again.
        Returns False when `command_id` is not the decision in flight.
        """
        decision = self._s.in_flight
        if decision is None or decision.command_id != command_id:
            return False
        self._s.in_flight = None
        return True

    # --- the rules ---------------------------------------------------------------------

    def _evaluate(
        self, snap: Snapshot, now: float, external: External, stale: tuple[str, ...], *, timer: bool
    ) -> Decision | None:
        cfg = self.config
        refusal = self._hard_refusal(snap, external)
        if refusal is not None:
            return self._skip(refusal)
        if self._cooling(now, external):
            return self._skip(Skip.COOLDOWN)
        halted = self._halted(external)
        if (
            not timer
            and self._emergency_armed()
            and _at_or_below(self._emergency_figure(snap), cfg.emergency_close_threshold)
        ):
            if halted and not self.emergency_when_halted:
                return self._skip(Skip.OPERATOR_HALT)
            figure = self._emergency_figure(snap)
            label = "net P&L" if self._emergency_on_pnl() else "net after close"
            sentence = (f"emergency stop: {label} {_usd(figure)} is at or below "
                        f"{_usd(cfg.emergency_close_threshold)}")
            if self.breaker.is_open:
                sentence += " (circuit breaker open: judged on net P&L)"
            return self._decide(
                snap,
                now,
                CloseReason.EMERGENCY_STOP,
                1.0,
                pnl=figure,
                figure=figure,
                threshold=cfg.emergency_close_threshold,
                unit="usd",
                sentence=sentence,
                stale=stale,
                overrode_halt=halted,
            )
        if self.breaker.is_open:
            return self._cancel_again(snap, now)
        if halted:
            return self._skip(Skip.OPERATOR_HALT)
        if stale:
            return self._skip(Skip.STALE_PRICES)
        time_limit = self._time_limit(snap, now)
        if time_limit is not None:
            figure, threshold, why = time_limit
            return self._decide(
                snap,
                now,
                CloseReason.MAX_AGE,
                1.0,
                pnl=self._profit_figure(snap),
                figure=figure,
                threshold=threshold,
                unit="seconds",
                sentence=why,
            )
        if timer or not cfg.enable_portfolio_tp:
            return self._skip(Skip.NO_BARRIER)
        return self._profit_decision(snap, now)

    def _hard_refusal(self, snap: Snapshot, external: External) -> Skip | None:
        """The guards nothing bypasses, not even the emergency stop or `close_all`."""
        if not snap.open_positions:
            return Skip.NO_POSITIONS
        if self._s.epoch is not None and self._s.epoch.closed and self._s.epoch.epoch == snap.epoch:
            return Skip.EPOCH_CLOSED
        if self._closing(external):
            return Skip.CLOSURE_IN_FLIGHT
        if not snap.closable_positions:
            return Skip.ONLY_DUST
        return None

    def _time_limit(self, snap: Snapshot, now: float) -> tuple[float, float, str] | None:
        """(figure, threshold, sentence) of the time limit if it holds: age first, then expiry."""
        cfg = self.config
        oldest = self._oldest_ts(snap)
        limit = cfg.max_position_age_hours * 3600.0
        if oldest is not None and now - oldest >= limit:
            age = now - oldest
            return (
                age,
                limit,
                (
                    f"time limit: oldest position is {age / 3600.0:.2f} h old, "
                    f"limit {cfg.max_position_age_hours:g} h"
                ),
            )
        window = cfg.close_before_expiry_minutes * 60.0
        expiry = _soonest_expiry(snap)
        if window > 0 and expiry is not None and expiry[1] - now <= window:
            instrument, expiry_ts = expiry
            remaining = expiry_ts - now
            return (
                remaining,
                window,
                (
                    f"time limit: {instrument} expires in {remaining / 60.0:.1f} min, "
                    f"closing {cfg.close_before_expiry_minutes:g} min before expiry"
                ),
            )
        return None

    def _track(self, snap: Snapshot, *, fresh: bool) -> None:
        """Update the trailing peak and the confirmation runs; stale prices prove nothing."""
        epoch = self._s.epoch
        assert epoch is not None
        if not fresh:
            epoch.confirmations.clear()
            epoch.recent_figures.clear()
            return
        cfg = self.config
        figure = self._profit_figure(snap)
        if cfg.trailing_activation_usd > 0 and cfg.enable_portfolio_tp:
            epoch.recent_figures = [*epoch.recent_figures, figure][-cfg.confirm_snapshots:]
            if len(epoch.recent_figures) == cfg.confirm_snapshots:
                held = min(epoch.recent_figures)  # the level every one of the last N snapshots reached
                if epoch.trailing_peak is not None:
                    epoch.trailing_peak = max(epoch.trailing_peak, held)
                elif _at_or_above(held, cfg.trailing_activation_usd):
                    epoch.trailing_peak = held
        for reason in _PROFIT_BARRIERS:
            held = self._profit_barrier(reason, figure) is not None
            epoch.confirmations[reason] = epoch.confirmations.get(reason, 0) + 1 if held else 0
        epoch.confirmations = {r: n for r, n in epoch.confirmations.items() if n}

    def _profit_barrier(self, reason: CloseReason, figure: float) -> float | None:
        """The threshold of a profit barrier if it holds at `figure`, else None."""
        cfg = self.config
        epoch = self._s.epoch
        if not cfg.enable_portfolio_tp or epoch is None:
            return None
        if reason is CloseReason.TAKE_PROFIT:
            return cfg.min_profit_usd if _at_or_above(figure, cfg.min_profit_usd) else None
        if reason is CloseReason.TRAILING_STOP:
            if epoch.trailing_peak is None:
                return None
            stop = epoch.trailing_peak - cfg.trailing_retrace_usd
            return stop if _at_or_below(figure, stop) else None
        if cfg.partial_close_fraction == 0 or epoch.partial_fired:
            return None
        return cfg.partial_profit_threshold if _at_or_above(figure, cfg.partial_profit_threshold) else None

    def _profit_decision(self, snap: Snapshot, now: float) -> Decision | None:
        epoch = self._s.epoch
        assert epoch is not None
        figure = self._profit_figure(snap)
        label = "net after close" if self.config.profit_after_fees else "net P&L"
        for reason in _PROFIT_BARRIERS:
            threshold = self._profit_barrier(reason, figure)
            if threshold is None:
                continue
            run = epoch.confirmations.get(reason, 0)
            if run < self.config.confirm_snapshots:
                return self._skip(Skip.CONFIRMING)
            confirmed = f" (held {run} snapshots)" if self.config.confirm_snapshots > 1 else ""
            if reason is CloseReason.TAKE_PROFIT:
                sentence = (
                    f"take profit: {label} {_usd(figure)} reached the target {_usd(threshold)}{confirmed}"
                )
                fraction = 1.0
            elif reason is CloseReason.TRAILING_STOP:
                sentence = (
                    f"trailing take profit: {label} {_usd(figure)} fell back to {_usd(threshold)} "
                    f"(peak {_usd(threshold + self.config.trailing_retrace_usd)} less "
                    f"{_usd(self.config.trailing_retrace_usd)}){confirmed}"
                )
                fraction = 1.0
            else:
                fraction = self.config.partial_close_fraction
                sentence = (
                    f"partial take profit: {label} {_usd(figure)} reached {_usd(threshold)} "
                    f"(once per epoch){confirmed}"
                )
                epoch.partial_fired = True
            return self._decide(
                snap,
                now,
                reason,
                fraction,
                pnl=figure,
                figure=figure,
                threshold=threshold,
                unit="usd",
                sentence=sentence,
            )
        return self._skip(Skip.NO_BARRIER)

    def _decide(
        self,
        snap: Snapshot,
        now: float,
        reason: CloseReason,
        fraction: float,
        *,
        pnl: float,
        figure: float,
        threshold: float,
        unit: Literal["usd", "seconds", "closures"],
        sentence: str,
        stale: tuple[str, ...] = (),
        overrode_halt: bool = False,
    ) -> Decision:
        """Record a decision: it is in flight from now on, and confirmation starts over.

        A repeat closure (of positions rebuilt during a halt or cool-down) asks the circuit breaker
        first; past its limit the breaker opens and the decision is a cancel-only one instead
        (an emergency stop still goes ahead: losses are cut).
        """
        epoch = self._s.epoch
        assert epoch is not None
        breaker = self.breaker
        emergency = reason is CloseReason.EMERGENCY_STOP
        repeat = reason is not CloseReason.MANUAL and epoch.rebuilt
        if repeat and not breaker.repeat(now, emergency=emergency):
            return self._cancel_only(snap, now, f"{sentence}, but that would be repeat closure "
                                     f"{breaker.state.repeats_when_opened + 1} of positions rebuilt during a "
                                     f"halt within {self.config.breaker_window_seconds:g} s")
        if emergency:
            breaker.emergency_stop()
        epoch.decisions += 1
        epoch.confirmations.clear()
        positions = self.view.open_positions()
        fresh = now - snap.ts <= DECISION_PRICES_MAX_AGE_SECONDS
        what = "every position" if fraction == 1.0 else f"{fraction:.0%} of every position"
        notes = [
            f"{sentence}; closing {what} ({len(positions)}) on snapshot {snap.seq} of epoch {snap.epoch}"
        ]
        if stale:
            notes.append(f"prices of {', '.join(stale)} are stale or suspect: decided on the last known "
                         "plausible prices")
        if overrode_halt:
            notes.append("overriding the operator halt: the emergency stop stays armed during a halt")
        decision = Decision(
            command_id=f"e{snap.epoch}-{reason}-s{snap.seq}-n{epoch.decisions}",
            epoch=snap.epoch,
            reason=reason,
            fraction=fraction,
            snapshot_seq=snap.seq,
            snapshot_ts=snap.ts,
            decided_ts=now,
            pnl=pnl,
            figure=figure,
            threshold=threshold,
            unit=unit,
            positions=tuple(
                self.legs.full_close(p) if fraction == 1.0 and fresh and p.instrument not in stale
                else to_close(p, fraction, priced=p.instrument not in stale and fresh) for p in positions
            ),
            groups=_hedge_groups(positions) if self.config.position_correlation_check else (),
            stale_instruments=stale,
            overrode_halt=overrode_halt,
            sentence="; ".join(notes),
        )
        self._s.in_flight = decision
        self.last_skip = None
        return decision

    def _note_rebuild(self, snap: Snapshot, now: float, external: External) -> None:
        """Mark the epoch `rebuilt` when its first position an order can close appears during a halt or
        cool-down. Dust does not count: a closure's leftover is in the next epoch from its first
        snapshot, in the cool-down, and was rebuilt by nobody."""
        epoch = self._s.epoch
        if epoch is None or epoch.seen_open or not snap.closable_positions:  # the header: no scan of the rows
            return
        epoch.seen_open = True
        epoch.rebuilt = self._halted(external) or self.breaker.is_open or self._cooling(now, external)

    def _cancel_again(self, snap: Snapshot, now: float) -> Decision | None:
        """Breaker open: a cancel-only command when the positions changed since the last one, else nothing."""
        held = {p.instrument: p.position for p in self.view.open_positions()}
        if not self.breaker.cancel_due(held, now, RECANCEL_MIN_SECONDS):
            return self._skip(Skip.CIRCUIT_BREAKER)
        return self._cancel_only(snap, now, "positions changed while the circuit breaker is open")

    def _cancel_only(self, snap: Snapshot, now: float, why: str) -> Decision:
        """A decision that closes nothing: the executor removes the orders and quotes that rebuild."""
        epoch = self._s.epoch
        assert epoch is not None
        breaker = self.breaker
        breaker.cancelled({p.instrument: p.position for p in self.view.open_positions()}, now)
        epoch.decisions += 1
        epoch.confirmations.clear()
        state = breaker.state
        sentence = (f"circuit breaker open: {why}; cancelling orders and quotes again, closing nothing "
                    f"automatically except an emergency stop on net P&L until `thalex-tp resume`")
        decision = Decision(
            command_id=f"e{snap.epoch}-{CloseReason.CIRCUIT_BREAKER}-s{snap.seq}-n{epoch.decisions}",
            epoch=snap.epoch, reason=CloseReason.CIRCUIT_BREAKER, fraction=1.0, snapshot_seq=snap.seq,
            snapshot_ts=snap.ts, decided_ts=now, pnl=snap.net_pnl, figure=float(state.repeats_when_opened),
            threshold=float(breaker.max_repeats), unit="closures", positions=(), sentence=sentence)
        self._s.in_flight = decision
        self.last_skip = None
        return decision

    # --- small helpers -----------------------------------------------------------------

    def _skip(self, why: Skip) -> Decision | None:
        """Note why nothing was decided; no decision."""
        self.last_skip = why
        return None

    def _oldest_ts(self, snap: Snapshot) -> float | None:
        """The oldest opening of a position an order can close: the header's (the portfolio leaves
        dust out), else the rows' less the dust; None while only dust is open."""
        if not snap.closable_positions:
            return None
        if snap.oldest_position_ts is not None:
            return snap.oldest_position_ts
        dust = set(snap.dust or ())
        opened = [p.opened_ts for p in self.view.open_positions()
                  if p.opened_ts is not None and p.instrument not in dust]
        return min(opened) if opened else None

    def _profit_figure(self, snap: Snapshot) -> float:
        return snap.net_after_close if self.config.profit_after_fees else snap.net_pnl

    def _emergency_figure(self, snap: Snapshot) -> float:
        return snap.net_pnl if self._emergency_on_pnl() else snap.net_after_close

    def _emergency_on_pnl(self) -> bool:
        """The emergency stop judges `net_pnl` by its basis, and always while the breaker is open."""
        on_pnl = self.config.emergency_stop_basis is EmergencyBasis.NET_PNL
        return on_pnl or self._s.breaker.opened_ts is not None

    def _emergency_armed(self) -> bool:
        return self.config.enable_portfolio_tp or self.config.emergency_stop_when_disabled

    def _halted(self, external: External) -> bool:
        return self._s.halt is not None or external.halted

    def _closing(self, external: External) -> bool:
        return self._s.in_flight is not None or external.closure_in_flight

    def _cooling(self, now: float, external: External) -> bool:
        return now < max(self._s.cooldown_until, external.cooldown_until)


def build_command(
    decision: Decision,
    now: float,
    deadline_seconds: float,
    volume_ticks: Mapping[str, float] | None = None,
) -> Command:
    """The `tp:commands` document for a decision (pure; `deadline_seconds` is `Executor.deadline_seconds`).

    Amounts are `fraction × position`, signed like the position. With
    `volume_ticks` (instrument → volume tick), a *partial* close rounds each leg
    toward zero, so it never closes more than the fraction; a leg that rounds to
    zero is dropped — and with hedge groups the whole group is kept open instead,
    so a hedge is never left one-legged. A full close is never rounded: it closes
    exactly the position. Raises ValueError when rounding leaves nothing to close
    (the shell then reports the decision finished, not completed).
    """
    positions = list(decision.positions)
    groups = list(decision.groups)  # of the decision's legs: all kept unless rounding drops some
    if volume_ticks is not None and decision.fraction < 1.0:
        positions = _round_legs(positions, decision.groups, volume_ticks)
        if not positions:
            raise ValueError(f"{decision.command_id}: every leg rounds to zero at the volume tick")
        kept = {p.instrument for p in positions}
        groups = [
            HedgeGroup(underlying=g.underlying, instruments=[i for i in g.instruments if i in kept])
            for g in decision.groups
            if any(i in kept for i in g.instruments)
        ]
    return Command(
        command_id=decision.command_id,
        epoch=decision.epoch,
        reason=decision.reason,
        fraction=decision.fraction,
        legs=Legs.of(positions),
        groups=groups or None,
        snapshot_seq=decision.snapshot_seq,
        net_pnl=decision.pnl,
        threshold=decision.threshold,
        created_ts=now,
        deadline_ts=now + deadline_seconds,
    )


def _round_legs(
    positions: list[LegToClose], groups: Iterable[HedgeGroup], volume_ticks: Mapping[str, float]
) -> list[LegToClose]:
    rounded = {p.instrument: _toward_zero(p.amount, volume_ticks.get(p.instrument)) for p in positions}
    dropped = {instrument for instrument, amount in rounded.items() if amount == 0.0}
    for group in groups:
        if dropped.intersection(group.instruments):
            dropped.update(group.instruments)
    return [
        p._replace(amount=rounded[p.instrument])
        for p in positions
        if p.instrument not in dropped
    ]


def _toward_zero(amount: float, tick: float | None) -> float:
    if not tick:
        return amount
    steps = math.floor(abs(amount) / tick + _TICK_EPSILON)
    return math.copysign(round(steps * tick, 12), amount) if steps else 0.0


def _stale_positions(snap: Snapshot, view: SnapshotView | None = None) -> tuple[str, ...]:
    """The open positions whose prices the portfolio flagged as stale or suspect (flat ones do not matter).

    A suspect price (an implausible tick held until the exchange confirms it, issue 21) is treated
    like a stale one: the snapshot values it at the last plausible price, no profit barrier fires
    on it, and an emergency stop decides on those last plausible prices and says so.
    """
    flagged = set(snap.stale_instruments) | set(snap.suspect_instruments or ())
    if view is not None:  # a flagged instrument that is flat (or unknown) does not matter
        flagged = {n for n in flagged if (row := view.rows.get(n)) is not None and row.position != 0.0}
    return tuple(sorted(flagged))


def freshness_problem(snap: Snapshot | None, now: float, stale_after_seconds: float,
                      view: SnapshotView | None = None) -> tuple[str, str] | None:
    """(reason, detail) when the last snapshot cannot be decided on freshly; None when it can.

    Red when an open position's prices are stale, or when positions are open and no snapshot came
    for `2 × stale_after_seconds` (the portfolio publishes on every tick of a held instrument, and
    flags prices stale after `stale_after_seconds`: silence beyond that means it is not working).
    No snapshot at all is not a problem: nothing is known to be held; nor is dust alone: nothing
    the guardian could close.
    """
    if snap is None or not snap.closable_positions:
        return None
    stale = _stale_positions(snap, view)
    if stale:
        return "prices stale", (f"snapshot #{snap.seq} flags {', '.join(stale[:5])} (stale or suspect): "
                                "profit barriers wait")
    age = now - snap.ts
    if age > 2 * stale_after_seconds:
        return "no recent snapshot", (f"the last one (#{snap.seq}) is {age:.0f} s old with "
                                      f"{snap.open_positions} positions open")
    return None


def _soonest_expiry(snap: Snapshot) -> tuple[str, float] | None:
    """(instrument, expiry_ts) of the open dated position that expires first."""
    expiry = snap.next_expiry
    return None if expiry is None else (expiry.instrument, expiry.expiry_ts)


def _hedge_groups(positions: list[SnapshotPosition]) -> tuple[HedgeGroup, ...]:
    """Legs sharing an underlying (two or more of them); a position without one stands alone."""
    by_underlying: dict[str, list[str]] = {}
    for p in positions:
        if p.underlying is not None:
            by_underlying.setdefault(p.underlying, []).append(p.instrument)
    return tuple(
        HedgeGroup(underlying=u, instruments=legs)
        for u, legs in sorted(by_underlying.items())
        if len(legs) > 1
    )


def _at_or_above(figure: float, barrier: float) -> bool:
    return figure >= barrier - MONEY_EPSILON


def _at_or_below(figure: float, barrier: float) -> bool:
    return figure <= barrier + MONEY_EPSILON


def _usd(value: float) -> str:
    return f"${value:,.4f}" if value >= 0 else f"-${-value:,.4f}"


__all__ = [
    "MONEY_EPSILON",
    "NOTHING_EXTERNAL",
    "Decision",
    "External",
    "GuardState",
    "RulesEngine",
    "Skip",
    "build_command",
    "freshness_problem",
]
