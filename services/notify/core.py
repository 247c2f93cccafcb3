"""What the trader is told, and when: the notify service's pure core (no Redis, no HTTP, no clock).

The shell (`app.py`) feeds it the guardian's streams (snapshots, commands, reports) and the
services' health, and puts every `Notification` it returns in each target's outbox, in the same
transaction as the ack of the input and the checkpoint of this core's state (`to_state`). So a
restart neither loses nor repeats a notification: an input is either handled with its effects or
not at all, and every notification has an id derived from what caused it.

Notifications
-------------
* `decision` — a `tp:commands` entry: reason, the figure that triggered, the threshold.
* `closure_completed` — the executor's `completed`: the closing cost estimated at the decision
  against the closing cost realised, and the P&L banked. Held back (at most
  `closure_settle_seconds`) until the closed epoch's final snapshot, whose `net_pnl` is what was
  banked (the ledger's figure: the exchange's own fill prices and fees).
* `closure_failed` — the executor's `failed`, with its error and what was filled.
* `drift_adopted` — a `Drift` record that was not in the previous snapshot.
* `near_take_profit` / `near_emergency_stop` — once per approach: the profit figure reached
  `near_barrier_share` of the take-profit target, or the emergency stop's figure (its
  `emergency_stop_basis`: `net_pnl` by default) that share of the emergency stop, without the
  barrier itself being reached; given again only after the figure fell back below `rearm_share`
  of the way, or in a new epoch.
* `service_unhealthy` / `service_recovered` — a watched service's /health failed (or did not
  answer) for `unhealthy_after_seconds`, and later answered healthy again.

Closing cost (one sign convention everywhere: a cost is "+ = the trader pays")
------------------------------------------------------------------------------
* estimated = the decision snapshot's `est_close_fees * fee_estimation_buffer + est_slippage`
  (`net_pnl - net_after_close`); a partial closure is estimated pro rata (`x fraction`);
* realised = the fees the executor reported (when a fill's fee was not reported, the report has no
  `fee` and the text says "before fees (fees unknown)") + for every filled leg
  `(mark_at_decision - avg_price) * filled * sign(position)`, the mark being the command's (legs
  whose command carried no mark are not counted, and the text says so) — the same measure the
  portfolio exports as `tp_portfolio_close_cost_actual_usd`.

Adding a kind (e.g. halt violations, circuit-breaker trips): a `NotificationKind` member, a
method here that returns its `Notification`s (with an id derived from its cause), and a line in
`app.py` routing its input to it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from services.common.config import EmergencyBasis, Notify, PortfolioTakeProfit
from services.common.contracts import (
    CloseReason,
    Command,
    Notification,
    NotificationKind,
    Report,
    ReportStatus,
    Severity,
    Snapshot,
    cancel_only,
)

RECENT_SNAPSHOTS = 64
"""Snapshots whose estimate is remembered, to find a command's decision snapshot by `seq`."""
FINAL_EPOCHS = 16
"""Closed epochs whose final `net_pnl` is remembered."""
HALTS_REMEMBERED = 64
"""Halts whose violation was told, remembered so a halt broken a thousand times is told once."""

REASON_WORDS = {
    CloseReason.TAKE_PROFIT: "Take profit",
    CloseReason.PARTIAL_TAKE_PROFIT: "Partial take profit",
    CloseReason.EMERGENCY_STOP: "EMERGENCY STOP",
    CloseReason.MAX_AGE: "Time limit",
    CloseReason.TRAILING_STOP: "Trailing stop",
    CloseReason.MANUAL: "Manual close-all",
    CloseReason.CIRCUIT_BREAKER: "CIRCUIT BREAKER OPEN",
}


def usd(value: float) -> str:
    return f"{value:+,.2f} USD"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SnapshotFigures(_Model):
    """What is remembered of one snapshot."""

    seq: int
    epoch: int
    net_pnl: float
    estimated_cost: float


class Leg(_Model):
    instrument: str
    filled: float
    avg_price: float


class Closure(_Model):
    """A closure being followed from its command to its outcome."""

    command_id: str
    reason: CloseReason
    fraction: float
    epoch: int
    snapshot_seq: int
    """-1: notify did not see the command (it started later); only the reports are known."""
    figure: float
    threshold: float
    marks: dict[str, float] = Field(default_factory=dict)
    signs: dict[str, float] = Field(default_factory=dict)
    estimated_cost: float | None = None
    legs: list[Leg] = Field(default_factory=list)
    fees: float | None = None
    completed_ts: float | None = None


class Watched(_Model):
    """One watched service's health as notify saw it."""

    unhealthy_since: float | None = None
    notified: bool = False
    detail: str = ""


class NotifierState(_Model):
    """Everything the core remembers (checkpointed with every ack)."""

    recent: list[SnapshotFigures] = Field(default_factory=list)
    final_net_pnl: dict[int, float] = Field(default_factory=dict)
    """Closed epoch -> the `net_pnl` of its last snapshot: what was banked."""
    closures: dict[str, Closure] = Field(default_factory=dict)
    drift_keys: list[str] = Field(default_factory=list)
    near_target_armed: bool = True
    near_stop_armed: bool = True
    services: dict[str, Watched] = Field(default_factory=dict)
    broken_halts: list[float] = Field(default_factory=list)
    """`since` of the halts whose first violation was told (newest last, the latest `HALTS_REMEMBERED`)."""


class Notifier:
    """Turns the guardian's inputs into notifications; see the module docstring."""

    def __init__(self, notify: Notify, barriers: PortfolioTakeProfit, fee_estimation_buffer: float) -> None:
        self.notify = notify
        self.barriers = barriers
        self.buffer = fee_estimation_buffer
        self.state = NotifierState()

    def to_state(self) -> str:
        return self.state.model_dump_json()

    def load_state(self, raw: str | bytes | None) -> None:
        self.state = NotifierState() if not raw else NotifierState.model_validate_json(raw)

    # --- snapshots ---------------------------------------------------------------------

    def on_snapshot(self, snap: Snapshot, now: float) -> list[Notification]:
        """Remember its figures; drift, approach warnings, and closures waiting for their epoch's end."""
        s = self.state
        last = s.recent[-1] if s.recent else None
        if last is not None and (snap.epoch, snap.seq) <= (last.epoch, last.seq):
            return []  # redelivered or out of order: already seen
        out: list[Notification] = []
        if last is not None and snap.epoch > last.epoch:
            s.final_net_pnl[last.epoch] = last.net_pnl
            for epoch in sorted(s.final_net_pnl)[:-FINAL_EPOCHS]:
                del s.final_net_pnl[epoch]
            s.near_target_armed = s.near_stop_armed = True
        figures = SnapshotFigures(seq=snap.seq, epoch=snap.epoch, net_pnl=snap.net_pnl,
                                  estimated_cost=snap.est_close_fees * self.buffer + snap.est_slippage)
        s.recent = [*s.recent[-(RECENT_SNAPSHOTS - 1):], figures]
        for closure in s.closures.values():
            if closure.estimated_cost is None and closure.snapshot_seq == snap.seq:
                closure.estimated_cost = figures.estimated_cost
        out += self._drift(snap, now)
        out += self._approach(snap, now)
        out += self._settled_closures(now, timed_out=False)
        return out

    def _drift(self, snap: Snapshot, now: float) -> list[Notification]:
        keys = [f"{d.instrument}@{d.since:.3f}" for d in snap.drift]
        known = set(self.state.drift_keys)
        self.state.drift_keys = keys
        return [Notification(
            id=f"drift_adopted:{key}", kind=NotificationKind.DRIFT_ADOPTED, severity=Severity.WARNING,
            title=f"Drift on {d.instrument}: the exchange's position adopted",
            text=(f"The ledger had {d.ledger_position:g}, the exchange says {d.exchange_position:g} "
                  f"(since {d.since:.0f}); the guardian now uses the exchange's position and average price. "
                  "A fill may have been missed: check the ingest log."),
            facts={"instrument": d.instrument, "ledger_position": d.ledger_position,
                   "exchange_position": d.exchange_position, "since": d.since, "epoch": snap.epoch},
            ts=snap.ts) for key, d in zip(keys, snap.drift, strict=True) if key not in known]

    def _approach(self, snap: Snapshot, now: float) -> list[Notification]:
        """A barrier being approached; not while only dust is open (`Snapshot.dust`): take-profit
        decides no closure on it, so "near" would announce one that never comes."""
        if not snap.closable_positions:
            return []
        b, s = self.barriers, self.state
        share, rearm = self.notify.near_barrier_share, self.notify.rearm_share
        out = []
        profit = snap.net_after_close if b.profit_after_fees else snap.net_pnl
        target = b.min_profit_usd
        if b.enable_portfolio_tp:
            if s.near_target_armed and share * target <= profit < target:
                s.near_target_armed = False
                out.append(self._near(NotificationKind.NEAR_TAKE_PROFIT, snap, profit, target, now))
            elif profit < rearm * target:
                s.near_target_armed = True
        stop = b.emergency_close_threshold
        loss = snap.net_pnl if b.emergency_stop_basis is EmergencyBasis.NET_PNL else snap.net_after_close
        if b.enable_portfolio_tp or b.emergency_stop_when_disabled:
            if s.near_stop_armed and stop < loss <= share * stop:
                s.near_stop_armed = False
                out.append(self._near(NotificationKind.NEAR_EMERGENCY_STOP, snap, loss, stop, now))
            elif loss > rearm * stop:
                s.near_stop_armed = True
        return out

    def _near(self, kind: NotificationKind, snap: Snapshot, figure: float, barrier: float,
              now: float) -> Notification:
        target = kind is NotificationKind.NEAR_TAKE_PROFIT
        name = "take-profit target" if target else "emergency stop"
        return Notification(
            id=f"{kind.value}:e{snap.epoch}:s{snap.seq}", kind=kind,
            severity=Severity.INFO if target else Severity.WARNING,
            title=f"Approaching the {name}: {usd(figure)} of {usd(barrier)}",
            text=(f"{'Net after close' if target else 'The emergency figure'} is {usd(figure)}, "
                  f"{figure / barrier:.0%} of the way to the {name} at "
                  f"{usd(barrier)} (epoch {snap.epoch}). "
                  + ("It closes everything when reached." if target else
                     "If it is reached, everything is closed at a loss.")),
            facts={"figure": figure, "threshold": barrier, "epoch": snap.epoch, "snapshot_seq": snap.seq},
            ts=snap.ts)

    # --- commands and reports -----------------------------------------------------------

    def on_command(self, command: Command, now: float) -> list[Notification]:
        """A decision: tell it, and follow the closure to its outcome."""
        if command.command_id in self.state.closures:
            return []
        if command.reason is CloseReason.CIRCUIT_BREAKER:
            return [self._breaker(command)]
        estimate = next((r.estimated_cost for r in self.state.recent if r.seq == command.snapshot_seq
                         and r.epoch == command.epoch), None)
        self.state.closures[command.command_id] = Closure(
            command_id=command.command_id, reason=command.reason, fraction=command.fraction,
            epoch=command.epoch, snapshot_seq=command.snapshot_seq, figure=command.net_pnl,
            threshold=command.threshold,
            marks={p.instrument: p.mark for p in command.closing().rows() if p.mark is not None},
            signs={p.instrument: math.copysign(1.0, p.amount) for p in command.closing().rows()},
            estimated_cost=estimate)
        return [self._decision(command, now)]

    def _breaker(self, command: Command) -> Notification:
        """A cancel-only command: the circuit breaker opened (or cancels what was rebuilt again)."""
        return Notification(
            id=f"decision:{command.command_id}", kind=NotificationKind.DECISION, severity=Severity.CRITICAL,
            title=f"Circuit breaker open: {command.threshold:g} repeat closures reached, orders cancelled",
            text=("Positions were rebuilt during a halt or cool-down and closed again "
                  f"{command.threshold:g} times: something on the account does not listen to the halt. "
                  "No profit, age or expiry closure is made until `thalex-tp resume`; the emergency stop "
                  "stays armed on net P&L; the halt stays and rebuilt orders and quotes are cancelled "
                  f"again (command {command.command_id}). Find the bot, stop it, then resume."),
            facts={"command_id": command.command_id, "reason": command.reason.value,
                   "threshold": command.threshold, "epoch": command.epoch},
            ts=command.created_ts)

    def _decision(self, command: Command, now: float) -> Notification:
        words = REASON_WORDS[command.reason]
        what = "everything" if command.fraction == 1.0 else f"{command.fraction:.0%} of every position"
        if command.reason is CloseReason.MAX_AGE:
            against = f"limit {command.threshold / 3600:g} h"
        elif command.reason is CloseReason.MANUAL:
            against = "asked by the operator"
        else:
            against = f"threshold {usd(command.threshold)}"
        return Notification(
            id=f"decision:{command.command_id}", kind=NotificationKind.DECISION,
            severity=Severity.CRITICAL if command.reason is CloseReason.EMERGENCY_STOP else Severity.INFO,
            title=f"{words}: closing {what} at {usd(command.net_pnl)}",
            text=(f"{words} decided at {usd(command.net_pnl)} ({against}), epoch {command.epoch}, "
                  f"{len(command.closing())} position(s). Quoters are halted until it is done. "
                  f"Command {command.command_id}."),
            facts={"command_id": command.command_id, "reason": command.reason.value,
                   "figure": command.net_pnl, "threshold": command.threshold, "fraction": command.fraction,
                   "positions": len(command.closing()), "epoch": command.epoch},
            ts=command.created_ts)

    def on_report(self, report: Report, now: float) -> list[Notification]:
        if report.status is ReportStatus.HALT_VIOLATION:
            return self._halt_violated(report)
        closure = self.state.closures.get(report.command_id)
        if report.status in (ReportStatus.FILLED, ReportStatus.PARTIALLY_FILLED):
            if closure is not None and report.instrument and report.filled and report.avg_price is not None:
                closure.legs.append(Leg(instrument=report.instrument, filled=report.filled,
                                        avg_price=report.avg_price))
            return []
        if report.status is ReportStatus.FAILED:
            self.state.closures.pop(report.command_id, None)
            return [self._failed(report, closure, now)]
        if report.status is ReportStatus.COMPLETED:
            if cancel_only(report.command_id):
                return []  # a cancel-only command closed nothing: no closure to tell
            if closure is None:  # followed from before notify started: what the report says
                closure = Closure(command_id=report.command_id, reason=CloseReason.MANUAL,
                                  fraction=report.fraction or 1.0, epoch=report.epoch or 0, snapshot_seq=-1,
                                  figure=0.0, threshold=0.0)
                self.state.closures[report.command_id] = closure
            if closure.completed_ts is None:
                closure.fees, closure.completed_ts = report.fee, now  # None: a fill's fee is unknown
            return self._settled_closures(now, timed_out=False)
        return []

    def on_timer(self, now: float) -> list[Notification]:
        """Completed closures whose epoch's final figures did not come within the settle time."""
        return self._settled_closures(now, timed_out=True)

    def _settled_closures(self, now: float, *, timed_out: bool) -> list[Notification]:
        out = []
        for command_id, closure in list(self.state.closures.items()):
            if closure.completed_ts is None:
                continue
            banked = self.state.final_net_pnl.get(closure.epoch) if closure.fraction == 1.0 else None
            waited = now - closure.completed_ts >= self.notify.closure_settle_seconds
            if banked is None and closure.fraction == 1.0 and not (timed_out and waited):
                continue
            del self.state.closures[command_id]
            out.append(self._completed(closure, banked, now))
        return out

    def _completed(self, closure: Closure, banked: float | None, now: float) -> Notification:
        realised, unmeasured = realised_cost(closure.fees or 0.0, closure.legs, closure.marks, closure.signs)
        estimated = None if closure.estimated_cost is None else closure.estimated_cost * closure.fraction
        lines = [f"Closing cost: estimated {usd(estimated) if estimated is not None else 'unknown'}"
                 + (" (pro rata)" if closure.fraction < 1.0 and estimated is not None else "")
                 + (f", realised {usd(realised)} (fees {usd(closure.fees)})." if closure.fees is not None
                    else f", realised {usd(realised)} before fees (fees unknown: a fill's fee was not "
                         "reported).")]
        if unmeasured:
            lines.append(f"Slippage not measured for {', '.join(unmeasured)}: no mark at the decision.")
        if closure.fraction < 1.0:
            lines.append(f"{closure.fraction:.0%} closed; the rest stays open.")
        elif banked is not None:
            lines.append(f"P&L banked in epoch {closure.epoch}: {usd(banked)} (after every fee).")
        else:
            lines.append("P&L banked: the epoch's final snapshot has not come yet (see `thalex-tp history`).")
        words = REASON_WORDS[closure.reason] if closure.snapshot_seq >= 0 else "Closure"
        title = f"{words} completed" + (f": {usd(banked)} banked" if banked is not None else "")
        return Notification(
            id=f"closure_completed:{closure.command_id}", kind=NotificationKind.CLOSURE_COMPLETED,
            severity=Severity.INFO, title=title, text=" ".join(lines) + f" Command {closure.command_id}.",
            facts={"command_id": closure.command_id, "reason": closure.reason.value,
                   "fraction": closure.fraction, "estimated_cost": estimated, "realised_cost": realised,
                   "fees": closure.fees, "pnl_banked": banked, "epoch": closure.epoch},
            ts=now)

    def _failed(self, report: Report, closure: Closure | None, now: float) -> Notification:
        error = report.error.message if report.error else "no reason given"
        filled = ", ".join(f"{leg.instrument} {leg.filled:g} @ {leg.avg_price:g}" for leg in closure.legs) \
            if closure and closure.legs else "nothing"
        return Notification(
            id=f"closure_failed:{report.command_id}", kind=NotificationKind.CLOSURE_FAILED,
            severity=Severity.CRITICAL, title=f"Closure FAILED: {error[:120]}",
            text=(f"Closure {report.command_id} failed: {error}. Filled: {filled}; "
                  f"fees {usd(report.fee) if report.fee is not None else 'unknown'}. Quoters stay halted "
                  "until you look and run `thalex-tp resume`; positions may still be open "
                  "(`thalex-tp status`)."),
            facts={"command_id": report.command_id, "error": error, "fees": report.fee,
                   "error_code": report.error.code if report.error else None},
            ts=report.ts)

    def _halt_violated(self, report: Report) -> list[Notification]:
        """The first violation of a halt is told; the rest are counted in `thalex-tp status`."""
        v = report.violation
        if v is None or v.halt_since in self.state.broken_halts:
            return []
        self.state.broken_halts = [*self.state.broken_halts, v.halt_since][-HALTS_REMEMBERED:]
        return [Notification(
            id=f"halt_violated:{v.halt_since:.6f}", kind=NotificationKind.HALT_VIOLATED,
            severity=Severity.WARNING, title=f"The halt was broken: {v.describe()[:120]}",
            text=(f"While tp:halt was set ({v.halt_reason} {v.halt_command_id or ''}), something that is not "
                  f"the guardian traded the account: {v.describe()}. It can re-open what the guardian "
                  "closes, at your fees. `thalex-tp status` names everything that broke this halt; make "
                  "that program read tp:halt, or stop it."),
            facts={"kind": v.kind.value, "label": v.label, "bot_id": v.bot_id, "order_id": v.order_id,
                   "trade_id": v.trade_id, "instrument": v.instrument, "halt_reason": v.halt_reason,
                   "halt_since": v.halt_since, "command_id": v.halt_command_id},
            ts=report.ts)]

    # --- health -------------------------------------------------------------------------

    def on_health(self, service: str, healthy: bool, detail: str, now: float) -> list[Notification]:
        """One /health answer (or its absence) of a watched service."""
        watched = self.state.services.setdefault(service, Watched())
        if healthy:
            since, notified = watched.unhealthy_since, watched.notified
            self.state.services[service] = Watched()
            if since is None or not notified:
                return []
            return [Notification(
                id=f"service_recovered:{service}:{since:.0f}", kind=NotificationKind.SERVICE_RECOVERED,
                severity=Severity.INFO, title=f"{service} is healthy again",
                text=f"{service} answers healthy again after {now - since:.0f} s.",
                facts={"service": service, "unhealthy_seconds": now - since}, ts=now)]
        if watched.unhealthy_since is None:
            watched.unhealthy_since = now
        watched.detail = detail
        if watched.notified or now - watched.unhealthy_since < self.notify.unhealthy_after_seconds:
            return []
        watched.notified = True
        since = watched.unhealthy_since
        return [Notification(
            id=f"service_unhealthy:{service}:{since:.0f}", kind=NotificationKind.SERVICE_UNHEALTHY,
            severity=Severity.CRITICAL, title=f"{service} unhealthy for {now - since:.0f} s",
            text=(f"{service}: {detail}. While it is unhealthy the account may not be guarded; check "
                  f"`thalex-tp status` and the {service} log."),
            facts={"service": service, "unhealthy_seconds": now - since, "detail": detail},
            ts=now)]


def realised_cost(fees: float, legs: Iterable[Leg], marks: dict[str, float],
                  signs: dict[str, float]) -> tuple[float, list[str]]:
    """Fees plus each filled leg's distance from the decision mark (+ = the trader paid).

    Returns the cost and the instruments whose slippage could not be measured (no mark).
    """
    cost = fees
    unmeasured: list[str] = []
    for leg in legs:
        mark = marks.get(leg.instrument)
        if mark is None:
            if leg.instrument not in unmeasured:
                unmeasured.append(leg.instrument)
            continue
        cost += (mark - leg.avg_price) * leg.filled * signs.get(leg.instrument, 1.0)
    return cost, unmeasured
