"""Settling a wave, verifying flat, failing a command (pure: no I/O, no clock — `now` is passed in).

After a wave's orders are answered, `settle_wave` counts what filled (each trade once, with its
fee when `account.trade_history` has told it, unknown otherwise: the report's `fee` is then
absent), applies what each refusal means (`plan.action_for`:
back off, widen the buffer, check the position, or stop the leg) and says how long to pause
before the next wave. `next_step` says what comes after a wave; `verify_flat` checks the
exchange's positions once every leg looks closed; `fail` writes the `failed` outcome, naming
every leg left open. `count_trades` counts the command's trades found by label after a
restart or a lost answer.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from services.common.contracts import ExchangeError, InstrumentInfo, Report, ReportStatus
from services.common.dust import dust_words
from services.common.thalex.models import ThalexClosingTrade, ThalexOrderStatus
from services.executor.plan import (
    EPS,
    INSUFFICIENT_LIQUIDITY,
    THROTTLE_EXCEEDED,
    ErrorAction,
    Leg,
    LegFill,
    LegState,
    Progress,
    Stage,
    action_for,
    fee_total,
    widened,
)
from services.executor.waves import DUST_CODE, Buffers, Order

RETRY_PAUSE = 0.05
"""Pause before re-sending an unfilled remainder (or after a lost answer), so the book can refill."""
BACKOFF_START, BACKOFF_MAX = 0.05, 1.0
"""A busy exchange (throttle, temporary failure): 50 ms doubling per order of the leg, 1 s at most."""


@dataclass(slots=True)
class Outcome:
    """What became of one order: the exchange's answer, its refusal, or nothing (the answer was lost)."""

    order: Order
    result: ThalexOrderStatus | None = None
    error: ExchangeError | None = None
    lost: bool = False
    """The connection ended before the answer: the order may have traded (found by label)."""


@dataclass(slots=True)
class Settlement:
    """A settled wave: its reports, the pause before the next wave, and what to count in the metrics."""

    reports: list[Report] = field(default_factory=list)
    pause: float = 0.0
    retries: list[str] = field(default_factory=list)
    """Why orders will be sent again: `throttle`, `temporary`, `widen`."""
    filled_orders: int = 0


class Step(StrEnum):
    """What comes after a wave."""

    WAVE = "wave"
    """Another wave (after the pause)."""
    VERIFY = "verify"
    """Every leg looks closed: verify against a fresh portfolio."""
    FAIL = "fail"
    """The deadline passed with legs open."""


class Verdict(StrEnum):
    """What verifying flat found."""

    COMPLETED = "completed"
    CLOSE_AGAIN = "close_again"
    """A leg is not closed after all and there is time left: back to closing."""
    FAILED = "failed"


def settle_wave(progress: Progress, outcomes: Sequence[Outcome], fees: Mapping[str, float],
                buffers: Buffers, now: float, from_decision: bool = False) -> Settlement:
    """Count the fills of a wave and apply the error rules; see the module docstring.

    `fees`: trade id → fee, as `account.trade_history` told them. `from_decision`: the wave was
    sized and priced from the command, not the exchange. A reduce-only rejection then says the
    position is not what the decision saw (it shrank to flat or changed sign), and a miss that
    the market moved: the next wave reads both afresh, with the base buffer, instead of
    stopping the leg or widening.
    """
    settled = Settlement()
    for outcome in outcomes:
        leg = progress.legs[outcome.order.instrument]
        if outcome.error is not None:
            _refused(progress, leg, outcome, buffers, now, from_decision, settled)
        elif outcome.result is not None:
            _answered(progress, leg, outcome, outcome.result, fees, buffers, now, from_decision, settled)
    return settled


def _refused(progress: Progress, leg: Leg, outcome: Outcome, buffers: Buffers, now: float,
             from_decision: bool, settled: Settlement) -> None:
    error = outcome.error
    assert error is not None
    action = action_for(error.code)
    if action is ErrorAction.BACK_OFF:
        settled.retries.append("throttle" if error.code == THROTTLE_EXCEEDED else "temporary")
        settled.pause = max(settled.pause, min(BACKOFF_MAX, BACKOFF_START * 2 ** min(leg.orders_sent, 5)))
    elif action is ErrorAction.WIDEN:
        leg.buffer = widened(leg.buffer, buffers.base, buffers.ceiling)
        settled.retries.append("widen")
    elif action is ErrorAction.CHECK_FLAT:
        if not from_decision:
            leg.error = error  # the next wave's portfolio says whether it is done
    else:
        leg.state, leg.error = LegState.STOPPED, error
        settled.reports.append(progress.report(
            ReportStatus.PARTIALLY_FILLED, now, instrument=leg.instrument, label=progress.label,
            amount=outcome.order.amount, filled=0.0, error=error))


def _answered(progress: Progress, leg: Leg, outcome: Outcome, result: ThalexOrderStatus,
              fees: Mapping[str, float], buffers: Buffers, now: float, from_decision: bool,
              settled: Settlement) -> None:
    filled = result.filled_amount
    for fill in result.fills:
        progress.record_fill(leg.instrument, fill.trade_id, LegFill(
            order_id=result.order_id, price=fill.price, amount=fill.amount, fee=fees.get(fill.trade_id)))
    fee = fee_total(fees.get(f.trade_id) for f in result.fills)  # None: a fee not seen in time
    avg = sum(f.price * f.amount for f in result.fills) / filled if filled > 0 and result.fills else None
    if filled > 0:
        settled.filled_orders += 1
    complete = filled >= outcome.order.amount - EPS
    if not complete:
        if not from_decision:
            leg.buffer = widened(leg.buffer, buffers.base, buffers.ceiling)
        settled.pause = max(settled.pause, RETRY_PAUSE)
    settled.reports.append(progress.report(
        ReportStatus.FILLED if complete else ReportStatus.PARTIALLY_FILLED, now, instrument=leg.instrument,
        order_id=result.order_id, label=progress.label, amount=outcome.order.amount, filled=filled,
        avg_price=avg, fee=fee if filled > 0 else None))


def next_step(progress: Progress, now: float) -> Step:
    """After a wave: verify when no leg is open (moving the progress to `verifying`), fail at the
    deadline, else another wave."""
    if not progress.open_legs():
        progress.to(Stage.VERIFYING)
        return Step.VERIFY
    if now >= progress.deadline_ts:
        return Step.FAIL
    return Step.WAVE


def verify_flat(progress: Progress, positions: Mapping[str, float], infos: Mapping[str, InstrumentInfo],
                now: float) -> tuple[Verdict, list[str], list[Report]]:
    """Verify flat against the exchange's portfolio; reopen a leg that is not.

    Returns the verdict, the instruments reopened, and the reports (`completed` or `failed`).
    A `completed` that leaves dust open says so in its `error` (code 14, `left_as_dust`).
    """
    reopened = []
    for leg in progress.legs.values():
        position = positions.get(leg.instrument, 0.0)
        if leg.state is LegState.CLOSED and not _done(leg, position, progress.full, infos):
            leg.state = LegState.OPEN
            reopened.append(leg.instrument)
    if reopened and now < progress.deadline_ts:
        progress.to(Stage.CLOSING)
        return Verdict.CLOSE_AGAIN, reopened, []
    if reopened or any(leg.state is LegState.STOPPED for leg in progress.legs.values()):
        return Verdict.FAILED, reopened, fail(progress, positions, infos, now)
    progress.to(Stage.COMPLETED)
    dust = left_as_dust(progress, positions, infos)
    return Verdict.COMPLETED, [], [progress.report(ReportStatus.COMPLETED, now, fee=progress.total_fee(),
                                                   error=dust)]


def left_as_dust(progress: Progress, positions: Mapping[str, float],
                 infos: Mapping[str, InstrumentInfo]) -> ExchangeError | None:
    """What a completed closure leaves that no order can close, as the `completed` report's `error`.

    A leg is done when what is left is dust: below `min_order_amount` (state `dust`, reported once
    as it was found) or below one volume tick (closed). The closure is complete — nothing more can
    be sent — but the position is not flat, and the trader reading `completed` must not think it
    is (the portfolio lists it in `Snapshot.dust`; take-profit decides nothing on it alone). Code 14
    is Thalex's "invalid quantity", what an order for it would be refused with. None when flat.
    """
    left = []
    for leg in progress.legs.values():
        if leg.state not in (LegState.DUST, LegState.CLOSED):
            continue
        amount = abs(leg.remaining(positions.get(leg.instrument, 0.0), progress.full))
        if amount <= EPS:
            continue
        left.append(dust_words(leg.instrument, amount, infos.get(leg.instrument)))
    if not left:
        return None
    return ExchangeError(code=DUST_CODE, message="completed; left open as dust, below what an order may "
                                                 f"close: {'; '.join(left)}")


def fail(progress: Progress, positions: Mapping[str, float], infos: Mapping[str, InstrumentInfo],
         now: float) -> list[Report]:
    """The `failed` outcome: the first error (the command's, else the first leg's), naming every leg left.

    Needs nothing from the exchange: `positions` may be empty (unknown: each leg's position before
    the first order, else its listed amount, is assumed), and a leg whose instrument data is
    unknown counts as done only when nothing at all is left.
    """
    problems = []
    error = progress.error
    for leg in progress.legs.values():
        if leg.state is LegState.DUST:
            continue
        position = positions.get(leg.instrument, leg.position_before or leg.listed)
        if leg.state is not LegState.STOPPED and _done(leg, position, progress.full, infos):
            continue
        leg_error = leg.error or progress.error or ExchangeError(
            code=INSUFFICIENT_LIQUIDITY, message="no liquidity within the price buffer before the deadline")
        error = error or leg_error
        left = leg.remaining(position, progress.full)
        problems.append(f"{leg.instrument}: {abs(left):g} left ({leg_error.code} {leg_error.message})")
    error = error or ExchangeError(code=INSUFFICIENT_LIQUIDITY, message="not flat at the deadline")
    progress.error = ExchangeError(code=error.code, message="; ".join(problems) or error.message)
    progress.to(Stage.FAILED)
    return [progress.report(ReportStatus.FAILED, now, error=progress.error, fee=progress.total_fee())]


def _done(leg: Leg, position: float, full: bool, infos: Mapping[str, InstrumentInfo]) -> bool:
    info = infos.get(leg.instrument)
    if info is None:
        return abs(leg.remaining(position, full)) <= EPS
    return leg.is_done(position, full, info)


def count_trades(progress: Progress, trades: Iterable[ThalexClosingTrade], now: float) -> list[Report]:
    """The command's trades found by label: each counted once; a `filled` report per order newly found.

    A trade without `fee` is counted with its fee unknown: the report's `fee` is then absent, not a
    sum that leaves it out. One without `order_id` is reported with the others that name none.
    """
    new: dict[str | None, list[ThalexClosingTrade]] = defaultdict(list)
    for trade in trades:
        if trade.label != progress.label or trade.instrument_name not in progress.legs:
            continue
        if progress.record_fill(trade.instrument_name, trade.trade_id, LegFill(
                order_id=trade.order_id, price=trade.price, amount=trade.amount, fee=trade.fee)):
            new[trade.order_id].append(trade)
    reports = []
    for order_id, found in new.items():
        filled = sum(t.amount for t in found)
        reports.append(progress.report(
            ReportStatus.FILLED, now, instrument=found[0].instrument_name, order_id=order_id,
            label=progress.label, amount=filled, filled=filled,
            avg_price=sum(t.price * t.amount for t in found) / filled, fee=fee_total(t.fee for t in found)))
    return reports
