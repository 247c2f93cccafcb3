"""The paper exchange's market: index random walk, funding, marks, collars and a synthetic book.

Pure code (no I/O, no clock): every function that depends on time takes ``now`` so the
engine and the tests can replay the market exactly from a seed. What is listed when is
:mod:`services.paper.instruments`; instruments expire here (:meth:`Market.expire`) at the
exchange delivery settlement price, Thalex's 30-minute time-weighted average of the index.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from services.paper.instruments import (
    MAX_COMBINATION_LEGS,
    UNDERLYINGS,
    Instrument,
    combination_name,
    listings,
    parse_combination,
)

__all__ = [
    "BookShape",
    "Instrument",
    "Mark",
    "Market",
    "align_down",
    "align_up",
    "black_scholes",
    "is_aligned",
]

SECONDS_PER_YEAR = 365.0 * 24 * 3600
FUNDING_INTERVAL = 24 * 3600.0
"""Thalex expresses the funding rate per 24 hours: one long contract pays ``rate * index`` a day
(a positive rate: the perpetual trades at a premium, longs pay, shorts earn)."""
EXPIRATION_WINDOW = 1800.0
"""The delivery price is the time-weighted average of the index over the 30 minutes before expiry."""
LEVEL_NOTIONAL = 20_000.0  # USD (of underlying) on the best level of a default synthetic book


def norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def black_scholes(
    forward: float, strike: float, years: float, vol: float, is_call: bool
) -> tuple[float, float]:
    """Undiscounted Black-76 price and delta on the forward (rates are zero on the paper exchange)."""
    if years <= 0 or vol <= 0:
        intrinsic = max(forward - strike, 0.0) if is_call else max(strike - forward, 0.0)
        itm = forward > strike if is_call else forward < strike
        return intrinsic, (1.0 if is_call else -1.0) if itm else 0.0
    sd = vol * math.sqrt(years)
    d1 = (math.log(forward / strike) + 0.5 * sd * sd) / sd
    d2 = d1 - sd
    if is_call:
        return forward * norm_cdf(d1) - strike * norm_cdf(d2), norm_cdf(d1)
    return strike * norm_cdf(-d2) - forward * norm_cdf(-d1), norm_cdf(d1) - 1.0


def align_down(value: float, tick: float) -> float:
    return round(math.floor(value / tick + 1e-9) * tick, 10)


def align_up(value: float, tick: float) -> float:
    return round(math.ceil(value / tick - 1e-9) * tick, 10)


def is_aligned(value: float, tick: float) -> bool:
    steps = value / tick
    return abs(steps - round(steps)) < 1e-6


@dataclass
class BookShape:
    """How deep the synthetic book is around the mark; set per instrument by ``paper/set_book``."""

    levels: int = 10
    level_amount: float | None = None  # default: LEVEL_NOTIONAL worth of the underlying
    spread_ticks: int = 1
    step_ticks: int = 1
    growth: float = 0.5  # each deeper level holds (1 + growth * depth) times the first
    bids: bool = True
    asks: bool = True


@dataclass
class Mark:
    """A mark with the pricing inputs the ticker and the portfolio publish."""

    price: float
    index: float
    delta: float
    iv: float | None = None
    forward: float | None = None
    funding_rate: float | None = None
    funding_mark: float | None = None


@dataclass
class Market:
    """All market state: instruments, index levels, pins, funding and book shapes; advanced by ``step``."""

    seed: int = 1
    now: float = 0.0
    volatility: float = 0.5
    index_vol: float = 0.6
    future_basis: float = 0.05
    perp_premium: float = 0.0001
    instruments: dict[str, Instrument] = field(default_factory=dict)
    """The active listed instruments."""
    expired: dict[str, Instrument] = field(default_factory=dict)
    settlements: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Expired instrument -> (settlement price, delivery index price)."""
    index: dict[str, float] = field(default_factory=dict)
    pinned_marks: dict[str, float] = field(default_factory=dict)
    funding_marks: dict[str, float] = field(default_factory=dict)
    funding_rates: dict[str, float] = field(default_factory=dict)
    books: dict[str, BookShape] = field(default_factory=dict)
    last_delivery: dict[str, float] = field(default_factory=dict)
    """Underlying -> its last delivery (settlement) price."""
    paused: bool = False
    version: int = 0
    """Moves on any change every market-data channel must show (a step, a trade, a listing...)."""
    touched: int = 0
    """Counts targeted changes (`touch`): one instrument's pinned mark or trade, one underlying's index."""
    touches: dict[str, int] = field(default_factory=dict)
    """Instrument or underlying -> `touched` at its last targeted change."""
    recently_touched: list[str] = field(default_factory=list)
    """What was touched since the fanout last published (it takes the list)."""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.combinations: dict[str, Instrument] = {}
        self.windows: dict[str, list[float]] = {}
        """Underlying -> [first seen, last seen, last index, integral of the index] of the current
        expiration window (a running time-weighted average)."""
        self.funding_paid: dict[str, float] = {}
        """Perpetual -> funding one long contract paid since the start (never reset: for the history)."""
        for spec in UNDERLYINGS:
            self.index.setdefault(spec.underlying, spec.start_price)
        if not self.instruments:
            self.instruments = {i.name: i for i in listings(self.now, self.index)}
        for inst in self.instruments.values():
            self._track(inst)

    # Instruments

    def get(self, name: str) -> Instrument | None:
        """An active instrument, or an ad-hoc combination ``[A:1,B:-1]`` of active ones."""
        inst = self.instruments.get(name) or self.combinations.get(name)
        if inst is None and name.startswith("["):
            legs = parse_combination(name)
            if legs is not None:
                try:
                    inst = self.combination(legs)
                except ValueError:
                    return None
        return inst

    def known(self, name: str) -> Instrument | None:
        """Active, ad-hoc combination, or expired."""
        return self.get(name) or self.expired.get(name)

    def combination(self, legs: tuple[tuple[str, int], ...]) -> Instrument:
        """The combination of ``legs`` (2 to 4 distinct active outrights of one underlying, integer
        non-zero quantities); raises ValueError naming the rule it breaks."""
        if not 2 <= len(legs) <= MAX_COMBINATION_LEGS:
            raise ValueError("a combination has 2 to 4 legs")
        names = [name for name, _ in legs]
        if len(set(names)) != len(names):
            raise ValueError("the legs of a combination must be distinct")
        insts = []
        for name, quantity in legs:
            inst = self.instruments.get(name)
            if inst is None or inst.is_combination:
                raise ValueError(f"unknown instrument {name}")
            if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity == 0:
                raise ValueError("leg quantities must be non-zero integers")
            insts.append(inst)
        if len({inst.underlying for inst in insts}) != 1:
            raise ValueError("the legs of a combination must share one underlying")
        name = combination_name(legs)
        cached = self.combinations.get(name)
        if cached is not None:
            return cached
        expiries = [inst.expiry_ts for inst in insts if inst.expiry_ts is not None]
        inst = Instrument(
            name,
            insts[0].product,
            "combination",
            insts[0].underlying,
            min(i.tick_size for i in insts),
            max(i.volume_tick_size for i in insts),
            max(i.volume_tick_size for i in insts),
            self.now,
            min(expiries) if expiries else None,
            legs=tuple(legs),
        )
        self.combinations[name] = inst
        return inst

    def leg_instruments(self, inst: Instrument) -> list[tuple[Instrument, int]]:
        return [(self.instruments[name], quantity) for name, quantity in inst.legs]

    def list_new(self, now: float) -> list[Instrument]:
        """List what Thalex's calendar has listed by ``now`` and is not known yet; returns them."""
        added = [
            inst
            for inst in listings(now, self.index)
            if inst.name not in self.instruments
            and inst.name not in self.expired
            and (inst.expiry_ts is None or inst.expiry_ts > now)
        ]
        for inst in added:
            self.instruments[inst.name] = inst
            self._track(inst)
        if added:
            self.version += 1
        return added

    def expire(self, now: float) -> list[Instrument]:
        """Deactivate every instrument expiring by ``now`` (and the combinations using one) at the
        delivery price; returns them, outrights first."""
        due = [
            i
            for i in self.instruments.values()
            if i.expiry_ts is not None and i.expiry_ts <= now and not i.is_combination
        ]
        if not due:
            return []
        delivery = {u: self.delivery_price(u) for u in {i.underlying for i in due}}
        gone = {i.name for i in due}
        combos = [i for i in self.instruments.values() if i.is_combination and gone & {n for n, _ in i.legs}]
        for inst in due:
            price = delivery[inst.underlying]
            self.settlements[inst.name] = (self._settlement_value(inst, price), price)
        for inst in combos:
            self.settlements[inst.name] = (
                sum(q * self.settlement_or_mark(name) for name, q in inst.legs),
                delivery[inst.underlying],
            )
        for inst in [*due, *combos]:
            self.expired[inst.name] = self.instruments.pop(inst.name)
            self.pinned_marks.pop(inst.name, None)
            self.books.pop(inst.name, None)
        self.combinations = {k: v for k, v in self.combinations.items() if not gone & {n for n, _ in v.legs}}
        self.last_delivery.update(delivery)
        for underlying in delivery:
            self.windows.pop(underlying, None)
        self.version += 1
        return [*due, *combos]

    def settlement_or_mark(self, name: str) -> float:
        if name in self.settlements:
            return self.settlements[name][0]
        return self.mark(name).price

    @staticmethod
    def _settlement_value(inst: Instrument, delivery: float) -> float:
        if inst.kind == "option":
            strike = inst.strike or 0.0
            return max(delivery - strike, 0.0) if inst.option_type == "call" else max(strike - delivery, 0.0)
        return delivery

    def _track(self, inst: Instrument) -> None:
        if inst.kind == "perpetual":
            self.funding_marks.setdefault(inst.name, 0.0)
            self.funding_rates.setdefault(inst.name, self.perp_premium)

    # Expiration window

    def next_expiry(self, underlying: str) -> int | None:
        expiries = [
            i.expiry_ts
            for i in self.instruments.values()
            if i.underlying == underlying and i.expiry_ts is not None and not i.is_combination
        ]
        return min(expiries) if expiries else None

    def sample_index(self, now: float) -> None:
        """Fold the index into the running average of an expiration window (for the delivery price)."""
        for underlying, price in self.index.items():
            expiry = self.next_expiry(underlying)
            if expiry is None or not expiry - EXPIRATION_WINDOW <= now < expiry:
                continue
            window = self.windows.get(underlying)
            if window is None:
                self.windows[underlying] = [now, now, price, 0.0]
            elif now > window[1]:
                window[3] += window[2] * (now - window[1])
                window[1], window[2] = now, price
            else:
                window[2] = price

    def _window_average(self, underlying: str, until: float) -> float | None:
        window = self.windows.get(underlying)
        if window is None:
            return None
        first, last, price, integral = window
        if until <= first:
            return price
        return (integral + price * (max(until, last) - last)) / (max(until, last) - first)

    def expiration(self, underlying: str, now: float) -> dict[str, Any] | None:
        """Thalex's expiration fields of the ``Index`` object while an expiration window runs."""
        expiry = self.next_expiry(underlying)
        if expiry is None or not expiry - EXPIRATION_WINDOW <= now < expiry:
            return None
        average = self._window_average(underlying, now)
        if average is None:
            return None
        progress = min(1.0, (now - (expiry - EXPIRATION_WINDOW)) / EXPIRATION_WINDOW)
        return {
            "expiration_print_average": average,
            "expiration_progress": progress,
            "expected_expiration_price": progress * average + (1.0 - progress) * self.index[underlying],
        }

    def delivery_price(self, underlying: str) -> float:
        """The time-weighted index of the expiration window (the current index when none was seen)."""
        average = self._window_average(underlying, self.now)
        return self.index[underlying] if average is None else average

    # Time

    def step(self, now: float, seconds: float, force: bool = False) -> bool:
        """One walk step worth ``seconds`` of market time, funding included; returns whether prices moved.

        The step size is given, not measured, so a seed and a number of steps fix the price path
        whatever the wall clock does; ``now`` only dates expiries and marks.
        """
        self.set_time(now)
        if self.paused and not force:
            return False
        self.walk(seconds)
        self.accrue_funding(seconds)
        return True

    def set_time(self, now: float) -> None:
        """The market's clock (dates expiries and marks); it never goes back."""
        self.now = max(self.now, now)

    def walk(self, seconds: float) -> None:
        """Move every index one random step worth ``seconds``."""
        years = seconds / SECONDS_PER_YEAR
        for underlying in sorted(self.index):
            shock = self.rng.gauss(0.0, 1.0) * self.index_vol * math.sqrt(years)
            self.index[underlying] *= math.exp(shock - 0.5 * self.index_vol**2 * years)
        self.version += 1

    def accrue_funding(self, seconds: float) -> None:
        """Each perpetual's funding mark (the funding value of one long contract) moves by
        ``-rate * index * seconds / 24 h``: with a positive rate a long pays."""
        for name, rate in self.funding_rates.items():
            inst = self.instruments.get(name)
            if inst is not None:
                paid = rate * self.index[inst.underlying] * seconds / FUNDING_INTERVAL
                self.funding_marks[name] -= paid
                self.funding_paid[name] = self.funding_paid.get(name, 0.0) + paid

    def set_index(self, underlying: str, price: float) -> None:
        """Every instrument of the underlying re-prices off the index: their channels, not the others'."""
        self.index[underlying] = price
        self.touch(underlying)

    def touch(self, name: str) -> None:
        """What one instrument (or underlying) shows changed (a pinned mark, a trade, an index): only the
        channels that show it go out again, as on Thalex, where a perpetual's new mark sends no
        option's ticker."""
        self.touched += 1
        self.touches[name] = self.touched
        self.recently_touched.append(name)

    def stamp(self) -> tuple[int, int]:
        """What a channel sent now has seen: (`version`, `touched`)."""
        return self.version, self.touched

    # Prices

    def mark(self, name: str) -> Mark:
        """Derive the mark from the index: perp near index, future with basis, options by Black-76,
        combinations as the quantity-weighted sum of their legs, expired at their settlement."""
        inst = self.get(name)
        if inst is None:
            expired = self.expired[name]
            return Mark(self.settlements[name][0], self.index[expired.underlying], 0.0)
        index = self.index[inst.underlying]
        pinned = self.pinned_marks.get(name)
        if inst.is_combination:
            legs = [(self.mark(leg), quantity) for leg, quantity in inst.legs]
            price = sum(m.price * q for m, q in legs)
            return Mark(pinned if pinned is not None else price, index, sum(m.delta * q for m, q in legs))
        if inst.kind == "perpetual":
            price = pinned if pinned is not None else index * (1.0 + self.funding_rates[name])
            return Mark(
                price,
                index,
                1.0,
                funding_rate=self.funding_rates[name],
                funding_mark=self.funding_marks[name],
            )
        years = max(0.0, (inst.expiry_ts or 0) - self.now) / SECONDS_PER_YEAR
        forward = index * math.exp(self.future_basis * years)
        if inst.kind == "future":
            window = self.expiration(inst.underlying, self.now)
            if window is not None and self.next_expiry(inst.underlying) == inst.expiry_ts:
                forward = window["expected_expiration_price"]  # as Thalex marks an expiring future
            return Mark(pinned if pinned is not None else forward, index, 1.0)
        price, delta = black_scholes(
            forward, inst.strike or 0.0, years, self.volatility, inst.option_type == "call"
        )
        return Mark(
            pinned if pinned is not None else price, index, delta, iv=self.volatility, forward=forward
        )

    def collar(self, name: str, mark: float) -> tuple[float, float]:
        """Price collar (low checks new asks, high checks new bids): 2 % for futures, wider for options,
        for a combination the quantity-weighted sum of its legs' collars."""
        inst = self.get(name)
        assert inst is not None
        if inst.is_combination:
            low = high = 0.0
            for leg, quantity in inst.legs:
                leg_low, leg_high = self.collar(leg, self.mark(leg).price)
                low += quantity * (leg_low if quantity > 0 else leg_high)
                high += quantity * (leg_high if quantity > 0 else leg_low)
            return round(low, 10), round(high, 10)
        width = 0.5 * mark + 20 * inst.tick_size if inst.kind == "option" else 0.02 * mark
        return max(inst.tick_size, align_up(mark - width, inst.tick_size)), align_down(
            mark + width, inst.tick_size
        )

    def book(self, name: str, mark: float | None = None) -> tuple[list[list[float]], list[list[float]]]:
        """Synthetic levels ``[[price, amount], ...]`` around the mark, best first."""
        inst = self.get(name)
        assert inst is not None
        if inst.is_combination and name not in self.books:
            return self._combination_book(inst)
        shape = self.books.get(name) or BookShape()
        mark = self.mark(name).price if mark is None else mark
        base = shape.level_amount
        if base is None:
            base = max(
                inst.min_order_amount,
                align_down(LEVEL_NOTIONAL / self.index[inst.underlying], inst.volume_tick_size),
            )
        tick = inst.tick_size
        best_bid = align_down(mark - (shape.spread_ticks - 1) * tick, tick)
        if best_bid >= mark:
            best_bid = round(best_bid - tick, 10)
        best_ask = align_up(mark + (shape.spread_ticks - 1) * tick, tick)
        if best_ask <= mark:
            best_ask = round(best_ask + tick, 10)
        bids: list[list[float]] = []
        asks: list[list[float]] = []
        for depth in range(shape.levels):
            amount = align_down(base * (1.0 + shape.growth * depth), inst.volume_tick_size)
            if amount <= 0:
                continue
            bid = round(best_bid - depth * shape.step_ticks * tick, 10)
            if shape.bids and (bid > 0 or inst.is_combination):
                bids.append([bid, amount])
            if shape.asks:
                asks.append([round(best_ask + depth * shape.step_ticks * tick, 10), amount])
        return bids, asks

    def _combination_book(self, inst: Instrument) -> tuple[list[list[float]], list[list[float]]]:
        """The virtual book of a combination: level k of each leg combined (Thalex's implied book:
        buying one unit buys the long legs at their asks and sells the short legs at their bids)."""
        books = [(self.book(leg), quantity) for leg, quantity in inst.legs]
        sides: list[list[list[float]]] = []
        for buying in (False, True):
            levels: list[list[float]] = []
            depth = 0
            while True:
                price, amount = 0.0, math.inf
                for (bids, asks), quantity in books:
                    side = asks if (quantity > 0) == buying else bids
                    if depth >= len(side):
                        amount = 0.0
                        break
                    price += quantity * side[depth][0]
                    amount = min(amount, side[depth][1] / abs(quantity))
                if amount <= 0 or amount == math.inf:
                    break
                amount = align_down(amount, inst.volume_tick_size)
                if amount > 0:
                    levels.append([round(price, 10), amount])
                depth += 1
            sides.append(levels)
        return sides[0], sides[1]
