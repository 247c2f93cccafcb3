"""Planning a wave of closing orders (pure: no I/O, no clock — `now` is passed in).

A wave is one round of closing orders, at most one per leg, sent back to back. Before it, each
open leg is sorted (`sort_legs`): closed already, stopped by a rejection, dust below the minimum
order, or still to close by how much. The legs still to close are sized and priced together
(`plan_wave`): per underlying, hedge-aware (`plan.hedge_wave`: the net delta after the wave
never exceeds its value at the decision, if every order fills what the book shows), each limit
`buffer` through the best opposite price, the side carrying the net delta first. `wave_sent`
writes the wave into the progress before it leaves.

The first wave of a fresh full closure can be planned from the command alone: checked whole on
bounds (`wave_refusal`), its head priced for the first order and the rest after it
(`DecisionWave`); a dry run prices what the first wave would send (`dry_run_orders`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.common.contracts import (
    Command,
    ExchangeError,
    HedgeGroup,
    InstrumentInfo,
    InstrumentType,
    LegToClose,
    PlannedOrder,
    Report,
    ReportStatus,
    Side,
)
from services.executor.plan import (
    EPS,
    INDEX_BOUNDED,
    MAX_INDEX_DEVIATION,
    REDUCE_ONLY_REJECTED,
    HedgeLeg,
    LegState,
    Progress,
    SentOrder,
    Stage,
    book_depth,
    close_price,
    close_side,
    decision_order,
    group_legs,
    hedge_wave,
    index_bound,
    lead_first,
    order_amount,
    reference_price,
)

DUST_CODE = 14
"""Thalex's "invalid quantity": what a remainder below `min_order_amount` would be refused with."""


@dataclass(frozen=True, slots=True)
class Buffers:
    """How far through the book a close is priced: `base` first and per widening, `ceiling` at most."""

    base: float
    ceiling: float


@dataclass(slots=True)
class Quote:
    """What a wave needs of the market for one instrument (the book only for a hedged leg)."""

    mark: float
    best_bid: float | None
    best_ask: float | None
    delta: float
    """Per unit of the instrument: 1 for perpetuals and futures, the ticker's for an option."""
    bids: list[list[float]] | None = None
    asks: list[list[float]] | None = None
    index: float | None = None
    """The underlying's index as the ticker gave it (the bound of a perpetual's or future's close)."""


@dataclass(frozen=True, slots=True)
class Order:
    """One closing order: reduce-only, immediate-or-cancel, the command's label."""

    instrument: str
    side: Side
    amount: float
    """Positive; the side gives the direction."""
    price: float


def hedged(instruments: Sequence[str], infos: Mapping[str, InstrumentInfo],
           groups: Sequence[HedgeGroup]) -> set[str]:
    """The instruments sharing an underlying with another one (their book depth is needed)."""
    grouped = group_legs(instruments, groups, {n: i.underlying for n, i in infos.items()})
    return {name for members in grouped.values() if len(members) > 1 for name in members}


# The first wave, from the command


def not_fresh_full(command: Command, now: float, max_age: float) -> str | None:
    """Why the command is not a full closure decided at most `max_age` seconds ago whose deadline is
    still ahead; None when it is. (A command past its deadline is not acted on at all: `plan.too_late`;
    it must not get the clearing round sent with the claim.)"""
    if now >= command.deadline_ts:
        return f"its deadline passed {now - command.deadline_ts:.3f} s ago"
    if command.fraction < 1.0:
        return f"a partial closure ({command.fraction:g})"
    if now - command.created_ts > max_age:
        return f"decided {now - command.created_ts:.3f} s ago (over {max_age:g} s)"
    return None


def wave_from_command(command: Command, infos: Mapping[str, InstrumentInfo], buffers: Buffers,
                      now: float, max_age: float) -> list[Order] | str:
    """The first wave priced from the command itself, or why it cannot be (the usual path then).

    Only for a full closure at most `max_age` seconds after its decision, every leg with the
    portfolio's exit price and mark, every limit within `buffers.ceiling` of its mark (no deeper
    through the book than the usual waves may go), an option's plus one tick: a price is on the
    tick, so a cheap option's best bid may sit a whole tick under its mark (40 for a put marked at
    44.23 on a 5 USD tick, where the usual path sells too). Not a perpetual's or future's: this
    wave has no index to bound it (`plan.index_bound`), so the ceiling around the mark is all
    that keeps a mark gone wild (0.5 for BTC) from selling at one tick. Legs hedged against each other (one
    underlying) go too when the book at the decision held each of them whole
    (`exit_within_depth`): every leg is then sent in full, so if every order fills what that book
    showed the underlying is flat after the wave, within any hedge bound (what `plan.hedge_wave`
    promises of a wave sized from a fresh read). Otherwise a hedged unwind is sized against the
    book's depth, read fresh. The reason names the first leg that stops it (the executor logs it:
    a book that keeps taking the usual path says why).
    """
    refusal = _command_refusal(command, infos, now, max_age)
    if refusal is not None:
        return refusal
    wave = []
    for p in command.closing().rows():
        order = _priced_from_command(p, infos[p.instrument], buffers)
        if isinstance(order, str):
            return order
        wave.append(order)
    return wave


def wave_refusal(command: Command, infos: Mapping[str, InstrumentInfo], buffers: Buffers,
                 now: float, max_age: float) -> str | None:
    """What `wave_from_command` would refuse the wave with (the same text), or None when it would
    price it — without pricing every leg, so the first order need not wait for all of them.

    A limit is the exit price `buffers.base` through, rounded to the tick: it lands within a tick
    of the unrounded figure. A leg whose unrounded limit is within the ceiling by more than a tick
    is therefore priced within it, whichever way the rounding goes; and a listed amount on the
    volume tick (a position is) and at least the minimum order is sent whole (`_sent_whole`).
    Such a leg passes on these bounds; only the others are priced here (1,000 legs checked in
    1.85 ms of CPU, 8.0 ms priced: `bench/command_costs.py`). tests/executor/test_waves.py checks
    the answer against `wave_from_command`'s for any legs.
    """
    refusal = _command_refusal(command, infos, now, max_age)
    if refusal is not None:
        return refusal
    legs = command.closing()
    if not legs:
        return None
    assert legs.exit_price is not None and legs.mark is not None  # `_command_refusal`: every leg priced
    selling, buying, ceiling = 1.0 - buffers.base, 1.0 + buffers.base, buffers.ceiling
    perpetual, future = InstrumentType.PERPETUAL, InstrumentType.FUTURE  # INDEX_BOUNDED, without hashing
    # 1,000 legs on the way to the first order: the columns zipped, kept to plain arithmetic
    for instrument, amount, exit_price, mark in zip(legs.instrument, legs.amount, legs.exit_price, legs.mark,
                                                    strict=True):
        info = infos[instrument]
        tick, kind, marked = info.tick_size, info.type, mark or 0.0  # never None nor 0 here: checked above
        limit = (exit_price or 0.0) * (selling if amount > 0 else buying)
        slack = 0.0 if kind is perpetual or kind is future else tick
        if abs(limit - marked) + tick + BOUNDS_MARGIN * (limit + marked) <= ceiling * marked + slack \
                and _sent_whole(amount, info):
            continue
        order = _priced_from_command(LegToClose(instrument, amount, exit_price, mark, None), info, buffers)
        if isinstance(order, str):
            return order
    return None


BOUNDS_MARGIN = 1e-9
"""Relative room for the float arithmetic of `wave_refusal`'s bounds (errors of ≈ 1e-16)."""


def _sent_whole(listed: float, info: InstrumentInfo) -> bool:
    """Whether `plan.order_amount` surely sends the listed amount whole: within `EPS / 4` of a whole
    number of volume ticks, which is at least the minimum order.

    `order_amount` rounds `|listed| + EPS` down to the tick: from within `EPS / 4` of `lots` ticks
    that lands on `lots` ticks (`EPS` is far below any tick), so the order is `lots` ticks, at least
    the minimum. Anything else (off the tick, under the minimum) is priced exactly.
    """
    size, lot = abs(listed), info.volume_tick_size
    lots = round(size / lot)
    return lots >= 1 and abs(size - lots * lot) <= EPS / 4 and lots * lot >= info.min_order_amount \
        and lot > 8 * EPS


def _command_refusal(command: Command, infos: Mapping[str, InstrumentInfo], now: float,
                     max_age: float) -> str | None:
    """Why the command as a whole cannot give the first wave (before any leg is priced)."""
    stale = not_fresh_full(command, now, max_age)
    if stale is not None:
        return stale
    legs = command.closing()
    names = legs.instrument
    if legs.exit_price is None or legs.mark is None:  # a column is left out when no leg has one
        unpriced = names[0] if names else None
    else:
        priced = zip(names, legs.exit_price, legs.mark, strict=True)
        unpriced = next((name for name, exit_price, mark in priced if not (exit_price and mark)), None)
    if unpriced is not None:
        return f"{unpriced} has no exit price and mark in the command (stale at the decision)"
    together = hedged(names, infos, command.groups or [])
    depths = zip(names, legs.exit_within_depth or [None] * len(names), strict=True)
    thin = next((name for name, whole in depths if name in together and whole is not True), None)
    if thin is not None:
        return f"{thin} is hedged and the decision's book did not hold it whole (exit_within_depth)"
    return None


def _priced_from_command(p: LegToClose, info: InstrumentInfo, buffers: Buffers) -> Order | str:
    """One leg's order of the first wave, or why it cannot be priced from the command."""
    assert p.exit_price is not None and p.mark is not None
    order = decision_order(p.amount, p.exit_price, buffers.base, info)
    if order is None:
        return f"{p.instrument}: {abs(p.amount):g} is below the minimum order"
    slack = 0.0 if info.type in INDEX_BOUNDED else info.tick_size
    if abs(order[2] - p.mark) > buffers.ceiling * p.mark + slack:
        return (f"{p.instrument}: a limit of {order[2]:g} is over {buffers.ceiling:.1%}"
                f"{' and a tick' if slack else ''} from the mark {p.mark:g}")
    return Order(p.instrument, *order)


@dataclass(frozen=True, slots=True)
class DecisionWave:
    """A first wave `wave_refusal` passed: its head priced for the first order, the rest after it."""

    command: Command
    infos: Mapping[str, InstrumentInfo]
    buffers: Buffers
    priced_ts: float
    """When it was checked: the compact claim's `priced_ts` (a resumed command prices it again)."""

    def head(self) -> Order | None:
        """The wave's first order (None for a command with no legs: a cancel-only one)."""
        return next(map(self._priced, self.command.closing().rows()), None)

    def orders(self) -> list[Order]:
        """Every order of the wave, `head()` first: what `wave_from_command` prices, without its
        checks again (`wave_refusal` has shown none refuses)."""
        return [self._priced(p) for p in self.command.closing().rows()]

    def _priced(self, p: LegToClose) -> Order:
        order = _priced_from_command(p, self.infos[p.instrument], self.buffers)
        assert isinstance(order, Order), order
        return order


def expand_claim(progress: Progress, command: Command, wave: list[Order] | str) -> None:
    """Complete a claim's compact form (`Progress.claimed`) from its command: the legs as
    `Progress.start` writes them, `received` in the outbox, and the first wave — `wave`, priced from
    the command with the claim's `command_wave` — as `plan_decision_wave` writes it.

    A wave priced again after a restart is the same as the one that left (same command, buffers and
    time). Should it not be (`wave` a reason: the instrument data changed in between), every leg is
    counted as sent without its `order_sent` report; the resumed command counts what its orders did
    by label, as for any crash.
    """
    uncompact_claim(progress, command)
    if isinstance(wave, str):
        for leg in progress.legs.values():
            leg.position_before, leg.orders_sent = leg.listed, 1
        progress.first_order_ts = progress.started_ts
        return
    plan_decision_wave(progress, wave, progress.started_ts)


def uncompact_claim(progress: Progress, command: Command) -> None:
    """A compact claim as the full progress `Progress.start` writes: the legs, and `received` in the
    outbox. For a claim whose first wave, checked while the claim was on its way, is not priced from
    the command after all (the usual path follows), and as the first step of `expand_claim`."""
    claim = progress.command_wave
    assert claim is not None, "not a compact claim"
    progress.list_legs(command, claim.buffer)
    progress.outbox.insert(0, progress.report(ReportStatus.RECEIVED, progress.started_ts))
    progress.command_wave = None


def plan_decision_wave(progress: Progress, wave: Iterable[Order], now: float) -> None:
    """Write the first wave into a new progress; its `order_sent` reports are published by the next
    save (`Progress.unreported`)."""
    for order in wave:
        leg = progress.legs[order.instrument]
        leg.position_before = leg.listed  # what the decision saw; a full closure closes what is there
        leg.orders_sent = 1
        progress.unreported.append(
            SentOrder(instrument=order.instrument, side=order.side, amount=order.amount, price=order.price))
    progress.first_order_ts = now


# The usual waves, from the exchange's figures


def sort_legs(progress: Progress, positions: Mapping[str, float], infos: Mapping[str, InstrumentInfo],
              now: float) -> tuple[dict[str, float], list[Report]]:
    """Before a wave: each open leg becomes closed, stopped or dust, or stays open with its remainder.

    Returns the signed remainder of each leg still to close, and the reports of legs found to
    be dust (what is left is below `min_order_amount`: reported once, not looped on). The first
    time a leg is seen here, the exchange's position is kept as its `position_before`.
    """
    remaining: dict[str, float] = {}
    reports: list[Report] = []
    for leg in progress.open_legs():
        position = positions.get(leg.instrument, 0.0)
        info = infos[leg.instrument]
        if leg.position_before is None:
            leg.position_before = position
        if leg.is_done(position, progress.full, info):
            leg.state = LegState.CLOSED
            continue
        if leg.error is not None and leg.error.code in REDUCE_ONLY_REJECTED:
            leg.state = LegState.STOPPED  # rejected as not reducing, yet the position is there
            continue
        left = leg.remaining(position, progress.full)
        if order_amount(left, position, info) == 0:
            leg.state = LegState.DUST
            reports.append(progress.report(
                ReportStatus.PARTIALLY_FILLED, now, instrument=leg.instrument, label=progress.label,
                amount=abs(left), filled=0.0, error=ExchangeError(
                    code=DUST_CODE, message=f"remainder {abs(left):g} below min_order_amount "
                                            f"{info.min_order_amount:g}; not sent")))
            continue
        remaining[leg.instrument] = left
    return remaining, reports


def wave_price(side: Side, quote: Quote, info: InstrumentInfo, buffer: float, max_deviation: float) -> float:
    """A leg's limit: `buffer` through the best opposite price (mark if that side is empty), and for a
    perpetual or future never beyond `max_deviation` of the index (`plan.index_bound`)."""
    price = close_price(side, reference_price(side, quote.best_bid, quote.best_ask, quote.mark), buffer,
                        info.tick_size)
    index = quote.index if info.type in INDEX_BOUNDED else None
    return index_bound(side, price, index, max_deviation, info.tick_size)


def plan_wave(progress: Progress, remaining: Mapping[str, float], positions: Mapping[str, float],
              quotes: Mapping[str, Quote], infos: Mapping[str, InstrumentInfo],
              max_deviation: float = MAX_INDEX_DEVIATION) -> list[Order]:
    """Size (hedge-aware) and price this wave's orders, the lead side of each underlying first.

    `quotes` must hold every leg of `remaining`, with the book for the legs `hedged` names.
    The first wave of an underlying fixes its hedge bound (the net delta at the decision; at
    least one minimum order's delta) in the progress.
    """
    names = list(remaining)
    grouped = group_legs(names, progress.groups, {n: i.underlying for n, i in infos.items()})
    orders: list[Order] = []
    for underlying, members in grouped.items():
        if not members:
            continue
        legs = []
        prices: dict[str, tuple[Side, float]] = {}
        signs = {remaining[n] * quotes[n].delta > 0 for n in members if abs(quotes[n].delta) > 0}
        several = len(signs) > 1
        for name in members:
            leg, quote, info = progress.legs[name], quotes[name], infos[name]
            side = close_side(remaining[name])
            price = wave_price(side, quote, info, leg.buffer, max_deviation)
            prices[name] = (side, price)
            fillable = None
            if several:
                levels = quote.bids if side is Side.SELL else quote.asks
                fillable = book_depth(levels or [], side, price)
            legs.append(HedgeLeg(name, remaining[name], quote.delta, fillable, info.volume_tick_size))
        if underlying not in progress.hedge_bounds:
            progress.hedge_bounds[underlying] = abs(sum(leg.exposure for leg in legs))
        quantum = max(infos[leg.instrument].min_order_amount * abs(leg.delta) for leg in legs)
        amounts = hedge_wave(legs, max(progress.hedge_bounds[underlying], quantum))
        for name in lead_first(legs):
            amount = order_amount(math.copysign(amounts.get(name, 0.0), remaining[name]),
                                  positions.get(name, 0.0), infos[name])
            if amount > 0:
                side, price = prices[name]
                orders.append(Order(name, side, amount, price))
    return orders


def wave_sent(progress: Progress, orders: Iterable[Order], now: float) -> list[Report]:
    """Count the wave's orders on their legs (and the command's first order); their `order_sent` reports.

    Saved before the orders leave, so a crash after this point finds them by label.
    """
    reports = []
    for order in orders:
        progress.legs[order.instrument].orders_sent += 1
        reports.append(_order_sent(progress, order, now))
    if progress.first_order_ts is None:
        progress.first_order_ts = now
    return reports


def _order_sent(progress: Progress, order: Order, now: float) -> Report:
    return progress.report(
        ReportStatus.ORDER_SENT, now, instrument=order.instrument, label=progress.label, amount=order.amount,
        orders=[progress.planned(order.instrument, order.side, order.amount, order.price)])


def dry_run_orders(progress: Progress, quotes: Mapping[str, Quote], infos: Mapping[str, InstrumentInfo],
                   now: float, max_deviation: float = MAX_INDEX_DEVIATION) -> list[Report]:
    """Price every listed position as a first wave would; the `dry_run` outcome listing those orders."""
    orders: list[PlannedOrder] = []
    for leg in progress.legs.values():
        info, quote = infos[leg.instrument], quotes[leg.instrument]
        side = close_side(leg.listed)
        amount = order_amount(leg.listed, leg.listed, info)
        if amount > 0:
            price = wave_price(side, quote, info, leg.buffer, max_deviation)
            orders.append(progress.planned(leg.instrument, side, amount, price))
    progress.to(Stage.DRY_RUN)
    return [progress.report(ReportStatus.DRY_RUN, now, orders=orders)]
