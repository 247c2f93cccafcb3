"""The executor's pure core: how to price, size and order closing orders, and where a command stands.

No I/O, no clock (every time is passed in), no randomness, so every rule here is unit- and
property-tested:

* pricing through the book (`close_price`) and tick rounding in the safe direction;
* amount rounding that never exceeds the position, and the minimum order amount;
* hedge-aware sizing of the legs of one underlying (`hedge_wave`);
* the label that lets a restarted executor find its own orders and trades (`command_label`);
* the per-command progress, an explicit state machine serialised to JSON in Redis (`Progress`).

Amounts in a `Leg` are signed like the position they close (closing a 0.5 long: +0.5);
order amounts are always positive with the side giving the direction.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.common.contracts import (
    Command,
    ExchangeError,
    HedgeGroup,
    InstrumentInfo,
    InstrumentType,
    PlannedOrder,
    Report,
    ReportStatus,
    Side,
)

MAX_LABEL_BYTES = 32
LABEL_PREFIX = "tp-"
EPS = 1e-12

# Thalex error codes (shared/thalex-api/NOTES.md) and what the executor does about each.
TOO_MANY_PENDING = 3
THROTTLE_EXCEEDED = 4
PARTITION_UNAVAILABLE = 10
TEMPORARY_FAILURE = 20
INVALID_STATE = 37
INSUFFICIENT_LIQUIDITY = 41
COLLAR_BREACH = 43
REDUCE_ONLY_MODE = 57
BACK_OFF_CODES = frozenset({TOO_MANY_PENDING, THROTTLE_EXCEEDED, PARTITION_UNAVAILABLE, TEMPORARY_FAILURE})
"""The exchange is busy: wait and send the same order again."""
WIDEN_CODES = frozenset({INSUFFICIENT_LIQUIDITY, COLLAR_BREACH})
"""The price did not reach liquidity: price further through the book and send again."""
REDUCE_ONLY_REJECTED = frozenset({INVALID_STATE, REDUCE_ONLY_MODE})
"""A reduce-only order that would not reduce: done if the position is already flat."""


class ErrorAction(StrEnum):
    BACK_OFF = "back_off"
    WIDEN = "widen"
    CHECK_FLAT = "check_flat"
    STOP_LEG = "stop_leg"


def action_for(code: int) -> ErrorAction:
    """What to do about a rejected closing order, by Thalex error code."""
    if code in BACK_OFF_CODES:
        return ErrorAction.BACK_OFF
    if code in WIDEN_CODES:
        return ErrorAction.WIDEN
    if code in REDUCE_ONLY_REJECTED:
        return ErrorAction.CHECK_FLAT
    return ErrorAction.STOP_LEG


# Labels


def command_label(command_id: str) -> str:
    """The label every order of one command carries: `tp-` + 26 base32 chars of sha256(command_id).

    Thalex's `client_order_id` dies with the session; a label survives on orders and trades, so
    a restarted executor finds what it already did. A digest (not the id itself) keeps the label
    within Thalex's 32 bytes whatever the command id looks like; 130 bits never collide in practice.
    """
    digest = base64.b32encode(hashlib.sha256(command_id.encode()).digest()).decode().lower()
    label = LABEL_PREFIX + digest[:26]
    assert len(label.encode()) <= MAX_LABEL_BYTES
    return label


# Prices and amounts


def _dec(value: float) -> Decimal:
    return Decimal(repr(value))


NEAR_A_TICK = 1e-12
"""How close (relative) `value / tick` may come to a whole number before the decimal path decides.

The float short cut's error is a few units in the last place (≈ 1e-15 relative: one division, one
product, the shortest repr); this margin is a thousand times that, so whenever the short cut
answers, no whole number lies between its quotient and the exact decimal one and both round alike
(proven against the decimal path by tests/executor/test_rounding.py).
"""
MAX_SHORT_CUT_DIGITS = 2.0**50
"""The short cut needs the exact multiple (ticks × the tick's digits as a whole number: 19,968 × 5, or
2 × 1234567891 for a tick of 0.1234567891) well within a double's 53 bits, so that rounding the
float product to the tick's decimals finds it; beyond, the decimal path decides."""
MAX_SHORT_CUT_DECIMALS = 10
MAX_SHORT_CUT_CHANGE = 0.5
"""`scaled_to_tick`'s `1 + change` in floats is exact enough only this close to 1 (buffers and the
index deviation are configured within 0.5); beyond, the decimal path decides."""


def round_to_tick(value: float, tick: float, *, up: bool) -> float:
    """`value` rounded to a multiple of `tick`, up or down, in decimal (0.1 + 0.2 is not
    0.30000000000000004).

    A value clearly between two ticks takes a float short cut with the same result (`NEAR_A_TICK`):
    a 1,000-leg first wave rounds 2,000 prices and amounts before its first order, 9 ms in decimal.
    """
    fast = _clear_of_a_tick(value, tick, up)
    return fast if fast is not None else _round_decimal(_dec(value), tick, up)


def scaled_to_tick(value: float, change: float, tick: float, *, up: bool) -> float:
    """`value × (1 + change)` rounded to the tick as `round_to_tick` does, the product in decimal."""
    near_one = abs(change) <= MAX_SHORT_CUT_CHANGE
    fast = _clear_of_a_tick(value * (1 + change), tick, up) if near_one else None
    return fast if fast is not None else _round_decimal(_dec(value) * (1 + _dec(change)), tick, up)


def _round_decimal(exact: Decimal, tick: float, up: bool) -> float:
    steps = (exact / _dec(tick)).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return float(steps * _dec(tick))


def _clear_of_a_tick(value: float, tick: float, up: bool) -> float | None:
    """The rounded value in floats, or None when `value / tick` is near a whole number (or too big)."""
    steps = value / tick
    places, digits = _tick_digits(tick)
    if not abs(steps) * digits < MAX_SHORT_CUT_DIGITS or places > MAX_SHORT_CUT_DECIMALS:
        return None
    if abs(steps - round(steps)) <= NEAR_A_TICK * max(1.0, abs(steps)):
        return None
    # the product is within a few units in the last place of the exact multiple, which has `places`
    # decimals: rounding to them gives the double nearest that multiple, as float(Decimal) does
    return round((math.ceil(steps) if up else math.floor(steps)) * tick, places)


@functools.lru_cache(maxsize=1024)
def _tick_digits(tick: float) -> tuple[int, int]:
    """(decimal places, the significant digits as a whole number) of a tick: 0.05 → (2, 5)."""
    _, digits, exponent = _dec(tick).normalize().as_tuple()
    assert isinstance(exponent, int)
    return max(0, -exponent), int("".join(map(str, digits)))


def close_side(signed_amount: float) -> Side:
    """Closing a long sells; closing a short buys."""
    return Side.SELL if signed_amount > 0 else Side.BUY


def reference_price(side: Side, best_bid: float | None, best_ask: float | None, mark: float) -> float:
    """The best price a close would hit (best bid for a sell, best ask for a buy); mark when that side
    is empty."""
    best = best_bid if side is Side.SELL else best_ask
    return best if best is not None and best > 0 else mark


def close_price(side: Side, reference: float, buffer: float, tick: float) -> float:
    """Limit price `buffer` through `reference`, rounded to the tick in the safe direction.

    Safe means never worse than the buffer allows: a sell rounds up, a buy rounds down. Because
    the best price is itself on the tick, the rounded price still reaches it. A buy never goes
    below one tick and a sell never below one tick (Thalex rejects non-positive prices).
    """
    if side is Side.SELL:
        return max(tick, scaled_to_tick(reference, -buffer, tick, up=True))
    return max(tick, scaled_to_tick(reference, buffer, tick, up=False))


MAX_INDEX_DEVIATION = 0.1
"""Default of `[executor] max_index_deviation`: how far from its index a perpetual's or future's close
may be priced (10 %: wider than any basis or the widest buffer, far narrower than a glitch)."""
INDEX_BOUNDED = frozenset({InstrumentType.PERPETUAL, InstrumentType.FUTURE})
"""Instruments priced like their underlying: the index is a sane reference for them (not for options)."""


def index_bound(side: Side, price: float, index: float | None, max_deviation: float, tick: float) -> float:
    """The close price kept within `max_deviation` of the index (issue 21, item 5).

    A sell is never priced below `index × (1 − max_deviation)` (rounded up to the tick), a buy never
    above `index × (1 + max_deviation)` (rounded down, at least one tick): a mark or a book gone wild
    (the paper's mark pinned at 0.5 for BTC at 100,000) cannot make the executor sell at 1 USD. An
    IOC priced at the bound finds no liquidity and the leg ends `failed` at the deadline, which
    says the guardian could not close — the truth — rather than closing at any price. No index
    (`None`, or not positive): the price is left as it is.
    """
    if index is None or index <= 0:
        return price
    if side is Side.SELL:
        return max(price, scaled_to_tick(index, -max_deviation, tick, up=True))
    return min(price, max(tick, scaled_to_tick(index, max_deviation, tick, up=False)))


def decision_order(listed: float, exit_price: float, buffer: float,
                   info: InstrumentInfo) -> tuple[Side, float, float] | None:
    """A fresh full closure's first order for one leg, from the command alone.

    The listed amount on the volume tick, priced `buffer` through the exit price the
    portfolio valued the position at when take-profit decided (the book walked for the
    whole size). Returns `(side, amount, price)`, or None when the amount is below
    `min_order_amount` (the usual waves deal with such a leg). The order is reduce-only:
    if the position shrank meanwhile, Thalex cuts it to what is left; what it leaves, the
    next wave closes from the exchange's own figures.
    """
    amount = order_amount(listed, listed, info)
    if amount == 0.0 or exit_price <= 0:
        return None
    side = close_side(listed)
    return side, amount, close_price(side, exit_price, buffer, info.tick_size)


def widened(buffer: float, base: float, ceiling: float) -> float:
    """The next retry's buffer: one more `base` each time, never past `ceiling`."""
    return min(ceiling, buffer + base)


def order_amount(remaining: float, position: float, info: InstrumentInfo) -> float:
    """The amount of the next closing order: the remainder, never more than the position, on the volume tick.

    `remaining` and `position` are signed; a closing order only makes sense when both have the
    same sign. Returns 0.0 when nothing closable is left or when it is below `min_order_amount`
    (a remainder that small is reported, not looped on).
    """
    if remaining * position <= 0:
        return 0.0
    # + EPS: a remainder computed from fills (0.66 - 0.6500000000000001) must not lose its last lot
    amount = round_to_tick(min(abs(remaining), abs(position)) + EPS, info.volume_tick_size, up=False)
    return amount if amount >= info.min_order_amount - EPS else 0.0


def book_depth(levels: Iterable[Sequence[float]], side: Side, limit: float) -> float:
    """How much the opposite book side holds at prices a close limited at `limit` would take."""
    total = 0.0
    for price, amount, *_ in levels:
        if (side is Side.SELL and price >= limit) or (side is Side.BUY and price <= limit):
            total += amount
        else:
            break
    return total


# Hedge-aware sizing


@dataclass(frozen=True, slots=True)
class HedgeLeg:
    """One leg of an underlying as the hedge planner sees it."""

    instrument: str
    remaining: float
    """Signed like the position still to close."""
    delta: float
    """Delta per unit of the instrument (1 for perpetuals and futures)."""
    fillable: float | None = None
    """What the book can absorb now at the leg's limit price; None = assume everything."""
    volume_tick: float = 0.0

    @property
    def exposure(self) -> float:
        """The delta this leg still carries; closing it removes exactly this much."""
        return self.remaining * self.delta

    @property
    def capacity(self) -> float:
        """The most delta (absolute) one wave can remove from this leg."""
        amount = abs(self.remaining) if self.fillable is None else min(abs(self.remaining), self.fillable)
        return amount * abs(self.delta)


def net_exposure(legs: Iterable[HedgeLeg]) -> float:
    return sum(leg.exposure for leg in legs)


def hedge_wave(legs: Sequence[HedgeLeg], bound: float) -> dict[str, float]:
    """Amounts (positive) to send for each leg of one underlying in this wave.

    If every order fills what the book shows, the legs' net delta afterwards stays within
    `bound` (the exposure at the decision) — or, when it already is outside, moves towards it
    as far as liquidity allows. Among such plans it closes as much as possible. When the book
    can take everything, everything is sent at once; when it cannot, the larger side is reduced
    first and the other side only as far as the hedge allows.
    """
    movers = [leg for leg in legs if abs(leg.delta) > EPS and leg.remaining != 0]
    amounts: dict[str, float] = {
        leg.instrument: abs(leg.remaining) if leg.fillable is None else min(abs(leg.remaining), leg.fillable)
        for leg in legs
        if leg not in movers and leg.remaining != 0
    }
    plus = [leg for leg in movers if leg.exposure > 0]
    minus = [leg for leg in movers if leg.exposure < 0]
    exposure = net_exposure(movers)
    cap_plus = sum(leg.capacity for leg in plus)
    cap_minus = sum(leg.capacity for leg in minus)
    # d = delta removed from the plus side minus delta removed from the minus side.
    low, high = exposure - bound, exposure + bound
    if high < -cap_minus:
        d = -cap_minus
    elif low > cap_plus:
        d = cap_plus
    else:
        d = min(max(cap_plus - cap_minus, low, -cap_minus), high, cap_plus)
    take_minus = min(cap_minus, cap_plus - d)
    take_minus = max(take_minus, -d, 0.0)
    take_plus = d + take_minus
    amounts.update(_share(plus, take_plus))
    amounts.update(_share(minus, take_minus))
    return {name: amount for name, amount in amounts.items() if amount > 0}


def _share(side: Sequence[HedgeLeg], delta_to_remove: float) -> dict[str, float]:
    """Spread `delta_to_remove` over one side's legs, largest exposure first, rounded down to lots."""
    out: dict[str, float] = {}
    left = delta_to_remove
    for leg in sorted(side, key=lambda leg: (-abs(leg.exposure), leg.instrument)):
        if left <= EPS:
            break
        take = min(leg.capacity, left)
        amount = take / abs(leg.delta)
        if leg.volume_tick > 0:
            amount = round_to_tick(amount + EPS, leg.volume_tick, up=False)
        amount = min(amount, abs(leg.remaining))
        if amount > 0:
            out[leg.instrument] = amount
            left -= amount * abs(leg.delta)
    return out


def lead_first(legs: Sequence[HedgeLeg]) -> list[str]:
    """Send order within an underlying: the side that carries the net delta first."""
    exposure = net_exposure(legs)
    return [
        leg.instrument
        for leg in sorted(legs, key=lambda leg: (not (leg.exposure * exposure > 0), -abs(leg.exposure)))
    ]


def group_legs(instruments: Sequence[str], groups: Sequence[HedgeGroup],
               underlying_of: Mapping[str, str]) -> dict[str, list[str]]:
    """Instruments by underlying: the command's hedge groups first, else each instrument's underlying."""
    out: dict[str, list[str]] = {}
    placed: set[str] = set()
    listed = set(instruments)  # a 1,000-leg book: one set, not 1,000 scans of the list
    for group in groups:
        members = [name for name in group.instruments if name in listed and name not in placed]
        if members:
            out.setdefault(group.underlying, []).extend(members)
            placed.update(members)
    for name in instruments:
        if name not in placed:
            out.setdefault(underlying_of.get(name, name), []).append(name)
            placed.add(name)
    return out


# The per-command progress


class Stage(StrEnum):
    """Where a command stands; only the transitions in `TRANSITIONS` are legal."""

    RECEIVED = "received"
    ORDERS_CANCELLED = "orders_cancelled"
    CLOSING = "closing"
    VERIFYING = "verifying"
    COMPLETED = "completed"
    FAILED = "failed"
    DRY_RUN = "dry_run"


TERMINAL = frozenset({Stage.COMPLETED, Stage.FAILED, Stage.DRY_RUN})
TRANSITIONS: dict[Stage, frozenset[Stage]] = {
    Stage.RECEIVED: frozenset({Stage.ORDERS_CANCELLED, Stage.CLOSING, Stage.FAILED, Stage.DRY_RUN}),
    Stage.ORDERS_CANCELLED: frozenset({Stage.CLOSING, Stage.FAILED}),
    Stage.CLOSING: frozenset({Stage.VERIFYING, Stage.FAILED}),
    Stage.VERIFYING: frozenset({Stage.CLOSING, Stage.COMPLETED, Stage.FAILED}),
    Stage.COMPLETED: frozenset(),
    Stage.FAILED: frozenset(),
    Stage.DRY_RUN: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A bug: the executor tried to move a command along an edge the state machine does not have."""


class LegState(StrEnum):
    OPEN = "open"
    """Still closing (or not started)."""
    CLOSED = "closed"
    """The listed amount is closed (or the position is flat)."""
    DUST = "dust"
    """What is left is below `min_order_amount`: reported, not looped on."""
    STOPPED = "stopped"
    """An error the executor must not retry; the command will fail."""


class LegFill(BaseModel):
    """One trade of this command on this leg (found by label or in an insert answer)."""

    model_config = ConfigDict(extra="forbid")

    order_id: str | None = None
    """None: a trade found by label whose `private/trade_history` row named no order (api.yaml allows it)."""
    price: float
    amount: float
    fee: float | None = None
    """None: not known (yet); a later sighting may add it (`Progress.record_fill`)."""


def fee_total(fees: Iterable[float | None]) -> float | None:
    """What these fills cost; None (unknown) when any fee is unknown: a sum without it would read as
    the whole fee paid, and the closing cost compared with the estimate would look cheaper than it was."""
    total = 0.0
    for fee in fees:
        if fee is None:
            return None
        total += fee
    return total


class Leg(BaseModel):
    """One listed position and what has been done about it."""

    model_config = ConfigDict(extra="forbid")

    instrument: str
    listed: float
    """The command's amount, signed like the position."""
    position_before: float | None = None
    """The exchange's position when the first order was about to go out (set once, before it)."""
    state: LegState = LegState.OPEN
    buffer: float
    orders_sent: int = 0
    fills: dict[str, LegFill] = Field(default_factory=dict)
    """By trade id: each trade counted once, whichever way it was learnt."""
    error: ExchangeError | None = None

    @property
    def closed(self) -> float:
        """What this command's trades closed, signed like the position."""
        total = sum(f.amount for f in self.fills.values())
        return math.copysign(total, self.listed)

    @property
    def fee(self) -> float | None:
        """The leg's fees; None when a fill's fee is unknown (`fee_total`)."""
        return fee_total(f.fee for f in self.fills.values())

    @property
    def avg_price(self) -> float | None:
        amount = sum(f.amount for f in self.fills.values())
        return sum(f.price * f.amount for f in self.fills.values()) / amount if amount > 0 else None

    def remaining(self, position: float, full: bool) -> float:
        """What is still to close given the exchange's position now (signed like the position).

        A full closure closes whatever is left of the position. A partial one closes the listed
        amount: what the position already fell by since the start, or what our trades closed,
        whichever is more, is not sent again; and never more than the position holds.
        """
        if full:
            return position
        before = self.position_before if self.position_before is not None else position
        done = max((before - position) * _sign(self.listed), abs(self.closed), 0.0)
        left = max(abs(self.listed) - done, 0.0)
        if position * self.listed <= 0:
            return 0.0
        return math.copysign(min(left, abs(position)), self.listed)

    def is_done(self, position: float, full: bool, info: InstrumentInfo) -> bool:
        """Verify flat: nothing closable is left (within the volume tick)."""
        return abs(self.remaining(position, full)) < info.volume_tick_size - EPS


def _sign(value: float) -> float:
    return 1.0 if value > 0 else -1.0 if value < 0 else 0.0


class SentOrder(BaseModel):
    """A closing order that left (or is leaving) and whose `order_sent` is not published yet."""

    model_config = ConfigDict(extra="forbid")

    instrument: str
    side: Side
    amount: float
    price: float


class CommandWave(BaseModel):
    """A claim's promise that the first wave is priced from the command (`waves.wave_from_command`),
    with what pricing it again needs: the same orders follow from the command and these."""

    model_config = ConfigDict(extra="forbid")

    priced_ts: float
    """The `now` the wave was priced at (the command's age is judged against it)."""
    buffer: float
    ceiling: float


class Progress(BaseModel):
    """Everything the executor knows about one command; lives in Redis as JSON.

    A redelivered or restarted command resumes from here: the stage says which steps are done,
    `position_before` what the position was before any order, `fills` which trades were counted.
    """

    model_config = ConfigDict(extra="forbid")

    command_id: str
    epoch: int
    fraction: float
    label: str
    stage: Stage = Stage.RECEIVED
    started_ts: float
    deadline_ts: float
    legs: dict[str, Leg]
    groups: list[HedgeGroup] = Field(default_factory=list)
    """The command's hedge groups (legs of one underlying unwound together)."""
    hedge_bounds: dict[str, float] = Field(default_factory=dict)
    """Per underlying: the net delta of the listed legs at the decision; never exceeded."""
    first_order_ts: float | None = None
    error: ExchangeError | None = None
    outbox: list[Report] = Field(default_factory=list)
    """Reports saved with this progress but not published yet; the next save publishes them.
    (The first wave's `received` waits here until its orders have left, so the services reading
    `tp:reports` do not wake on the way to the first order.)"""
    unreported: list[SentOrder] = Field(default_factory=list)
    """The first wave's orders; the next save publishes their `order_sent` reports, after the
    outbox. Kept this compact (not as reports): a 1,000-leg book's are ≈ 600 KB of JSON."""
    command_wave: CommandWave | None = None
    """Set in the claim's compact form only (`Progress.claimed`): the legs, the first wave and
    `received` are not written yet, they follow from the command (`waves.expand_claim`). The claim is
    on the way to the first order; a 1,000-leg book's full progress is ≈ 250 KB of JSON."""

    @classmethod
    def start(cls, command: Command, now: float, buffer: float, max_seconds: float) -> Progress:
        progress = cls._opened(command, now, max_seconds, legs={})
        progress.list_legs(command, buffer)
        return progress

    @classmethod
    def claimed(cls, command: Command, now: float, max_seconds: float, wave: CommandWave) -> Progress:
        """The claim of a closure whose first wave is priced from the command: what `start` holds but
        the legs (a few hundred bytes whatever the legs); `waves.expand_claim` completes it."""
        return cls._opened(command, now, max_seconds, legs={}, command_wave=wave)

    @classmethod
    def _opened(cls, command: Command, now: float, max_seconds: float, **rest: Any) -> Progress:
        return cls(command_id=command.command_id, epoch=command.epoch, fraction=command.fraction,
                   label=command_label(command.command_id), started_ts=now,
                   deadline_ts=min(command.deadline_ts, now + max_seconds), **rest)

    def list_legs(self, command: Command, buffer: float) -> None:
        """One open leg per listed position, and the command's hedge groups."""
        self.legs = {p.instrument: Leg(instrument=p.instrument, listed=p.amount, buffer=buffer)
                     for p in command.closing().rows()}
        self.groups = list(command.groups or [])

    @property
    def full(self) -> bool:
        """A full closure: every listed position goes to flat."""
        return self.fraction >= 1.0

    @property
    def terminal(self) -> bool:
        return self.stage in TERMINAL

    def to(self, stage: Stage) -> None:
        if stage is self.stage:
            return
        if stage not in TRANSITIONS[self.stage]:
            raise IllegalTransition(f"{self.command_id}: {self.stage} -> {stage}")
        self.stage = stage

    def open_legs(self) -> list[Leg]:
        return [leg for leg in self.legs.values() if leg.state is LegState.OPEN]

    def past_deadline(self, now: float) -> bool:
        """Whether the command's deadline (as capped when it started) has come: no new step that acts on
        the exchange may start — not a clearing round, not a wave. Checked before each, never after:
        take-profit gives up on a command once its deadline is past, and what is sent later acts on an
        account the trader may have taken back."""
        return now >= self.deadline_ts

    def record_fill(self, instrument: str, trade_id: str, fill: LegFill) -> bool:
        """Count a trade once; a later sighting may only add the fee. Returns True if it is new."""
        leg = self.legs[instrument]
        known = leg.fills.get(trade_id)
        if known is None:
            leg.fills[trade_id] = fill
            return True
        if known.fee is None and fill.fee is not None:
            known.fee = fill.fee
        return False

    def total_fee(self) -> float | None:
        """The command's fees; None when a fill's fee is unknown (`fee_total`)."""
        return fee_total(f.fee for leg in self.legs.values() for f in leg.fills.values())

    def take_unpublished(self) -> list[Report]:
        """The reports saved but not published yet, in order (the outbox, then the first wave's
        `order_sent`); both are empty afterwards."""
        sent_ts = self.first_order_ts or self.started_ts
        reports = [*self.outbox, *(
            self.report(ReportStatus.ORDER_SENT, sent_ts, instrument=o.instrument, label=self.label,
                        amount=o.amount, orders=[self.planned(o.instrument, o.side, o.amount, o.price)])
            for o in self.unreported)]
        self.outbox, self.unreported = [], []
        return reports

    def report(self, status: ReportStatus, now: float, **fields: object) -> Report:
        """A report of this command: every report copies the command's epoch and fraction."""
        return Report(command_id=self.command_id, status=status, epoch=self.epoch, fraction=self.fraction,
                      ts=now, **fields)  # type: ignore[arg-type]

    def planned(self, instrument: str, side: Side, amount: float, price: float) -> PlannedOrder:
        return PlannedOrder(instrument=instrument, side=side, amount=amount, price=price, label=self.label)


# Too late


def too_late(progress: Progress, now: float, *, resumed: bool) -> str | None:
    """Why the executor must not act on the command any more, its deadline having passed before it got
    to it; None while it may start (or go on). The reason is the `failed` report's error.

    Such a command was decided long ago (the executor was down, its entry waited in `tp:commands`);
    take-profit gave up on it after its deadline and halted, and the trader may have resumed and opened
    new positions since: a clearing round would cancel their orders, quotes and bots, and a full
    closure would close whatever is open now. `resumed`: the progress was there before this claim
    (a restart, a crashed replica): what earlier waves did stays done, nothing new is sent.
    """
    if not progress.past_deadline(now):
        return None
    late = now - progress.deadline_ts
    if resumed:
        return (f"deadline passed before it was resumed, {late:.1f} s late: "
                "no further clearing round or order was sent")
    return f"deadline passed before it was handled, {late:.1f} s late: nothing was sent to the exchange"
