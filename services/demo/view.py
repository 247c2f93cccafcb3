"""What the demo shows: a pure function from the guardian's state to lines of text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.common.config import PortfolioTakeProfit
from services.common.contracts import Command, Halt, HaltAck, HaltViolation, Notification, Report, Snapshot
from services.common.exit_cost import exit_cost_warning

BAR_WIDTH = 41


@dataclass
class DemoState:
    """Everything the live view needs, read from Redis by the demo."""

    snapshot: Snapshot | None = None
    halt: Halt | None = None
    acks: dict[str, HaltAck] = field(default_factory=dict)
    commands: list[Command] = field(default_factory=list)
    reports: dict[str, list[Report]] = field(default_factory=dict)
    processes: dict[str, str] = field(default_factory=dict)
    """name -> "running" / "exited N"."""
    violations: list[HaltViolation] = field(default_factory=list)
    """Who broke a halt (ingest's `halt_violation` reports among the latest), oldest first."""
    notifications: list[Notification] = field(default_factory=list)
    """The latest notifications notify produced (oldest first)."""
    config: str = ""
    """This demo's config file: the operator commands take `--config` with it."""
    breaker: dict[str, Any] | None = None
    """Take-profit's circuit breaker (`<ns>:takeprofit:breaker`), as JSON."""


def operator_hint(config: str) -> str:
    """How to talk to this demo from another terminal."""
    return (f"talk to it from another terminal: thalex-tp status --config {config}   "
            "(also halt, resume, close-all --yes, history)")


def barrier_bar(value: float, low: float, high: float) -> str:
    """`emergency |-----*-----| take profit`: where net after close stands between the barriers."""
    span = high - low
    position = 0 if span <= 0 else round((min(max(value, low), high) - low) / span * (BAR_WIDTH - 1))
    cells = ["-"] * BAR_WIDTH
    zero = round((0 - low) / span * (BAR_WIDTH - 1)) if span > 0 and low < 0 < high else None
    if zero is not None:
        cells[zero] = "0"
    cells[position] = "*"
    return f"{low:+.2f} |{''.join(cells)}| {high:+.2f}"


def violation_lines(state: DemoState) -> list[str]:
    """Who broke the halt in force, or the last one: what the exchange's account channels showed."""
    if not state.violations:
        return []
    since = state.halt.since if state.halt is not None else state.violations[-1].halt_since
    these = [v for v in state.violations if v.halt_since == since]
    if not these:
        return []
    which = "this halt" if state.halt is not None else "the last halt"
    return [f"  {which} BROKEN {len(these)}x by orders/bots/trades that are not the guardian's; "
            f"latest: {these[-1].describe()}"]


def render(state: DemoState, tp: PortfolioTakeProfit, buffer: float, now: float | None = None) -> list[str]:
    """The screen, top to bottom."""
    now = time.time() if now is None else now
    lines = ["thalex-tp demo — paper exchange, the services, one quoter   (Ctrl-C to stop)"]
    if state.config:
        lines.append(operator_hint(state.config))
    lines.append("")
    snap = state.snapshot
    if snap is None:
        lines.append("waiting for the first snapshot ...")
    else:
        lines.append(
            f"epoch {snap.epoch}   snapshot #{snap.seq}   net after close {snap.net_after_close:+.4f} USD"
        )
        lines.append("  " + barrier_bar(snap.net_after_close, tp.emergency_close_threshold, tp.min_profit_usd)
                     + "   emergency stop … take profit")
        lines.append(f"  gross {snap.gross_pnl:+.4f}   fees paid {snap.fees_paid:.4f}   est. close fees "
                     f"{snap.est_close_fees * buffer:.4f}   est. slippage {snap.est_slippage:+.4f}")
        warning = exit_cost_warning(snap, tp)
        if warning is not None:
            lines.append(f"  EXIT COST WARNING: {warning.sentence()}")
        lines.append("")
        lines.append(f"  {'instrument':<22}{'position':>10}{'entry':>12}{'mark':>12}{'P&L':>10}{'fees':>9}")
        open_positions = [p for p in snap.positions if p.position != 0]
        for p in open_positions:
            pnl = p.realized_pnl + p.unrealized_pnl + p.funding_pnl
            lines.append(f"  {p.instrument:<22}{p.position:>10.4f}{p.avg_entry:>12.2f}{p.mark:>12.2f}"
                         f"{pnl:>10.4f}{p.fees_paid:>9.4f}")
        if not open_positions:
            lines.append("  (flat)")
    lines.append("")
    if state.halt is None:
        lines.append("halt: none — quoters may trade")
    else:
        left = (
            ""
            if state.halt.until is None
            else f", {max(0.0, state.halt.until - now):.0f} s of cool-down left"
        )
        acked = [n for n, a in state.acks.items() if a.command_id == state.halt.command_id]
        lines.append(f"HALT: {state.halt.reason} {state.halt.command_id or ''}{left}; "
                     f"acknowledged by {', '.join(acked) or 'nobody yet'}")
    lines.extend(violation_lines(state))
    if state.breaker and state.breaker.get("opened_ts") is not None:
        repeats = state.breaker.get("repeats_when_opened", 0)
        lines.append(f"CIRCUIT BREAKER OPEN: {repeats} repeat closures of positions rebuilt"
                     " during a halt; nothing closes automatically but the emergency stop "
                     "(on net P&L) until `thalex-tp resume`")
    lines.append("")
    lines.append("last decisions:")
    if not state.commands:
        lines.append("  none yet")
    for command in state.commands[-5:]:
        steps = state.reports.get(command.command_id, [])
        outcome = steps[-1].status.value if steps else "sent"
        fees = sum(r.fee or 0.0 for r in steps if r.status in ("filled", "partially_filled"))
        when = time.strftime("%H:%M:%S", time.localtime(command.created_ts))
        lines.append(
            f"  {when} {command.reason.value:<20} at {command.net_pnl:+.4f} "
            f"(barrier {command.threshold:+.2f})"
            f"  {len(command.closing())} position(s) -> {outcome}, closing fees {fees:.4f}"
        )
    lines.append("")
    lines.append("notifications (sent to no one until [notify] targets are configured, README):")
    if not state.notifications:
        lines.append("  none yet")
    for note in state.notifications[-3:]:
        lines.append(f"  {time.strftime('%H:%M:%S', time.localtime(note.ts))} {note.title}")
    lines.append("")
    lines.append("processes: " + "  ".join(f"{name} {status}" for name, status in state.processes.items()))
    return lines
