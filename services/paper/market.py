"""The paper exchange's market: instruments, index random walk, marks and a synthetic book.

Pure code (no I/O, no clock): every function that depends on time takes ``now`` so the
engine and the tests can replay the market exactly from a seed.
"""

from __future__ import annotations

import calendar
import datetime as dt
import math
import random
from dataclasses import dataclass, field

SECONDS_PER_YEAR = 365.0 * 24 * 3600
FUNDING_INTERVAL = 8 * 3600.0
LEVEL_NOTIONAL = 20_000.0  # USD (of underlying) on the best level of a default synthetic book
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


@dataclass(frozen=True)
class Instrument:
    """Static description of a tradable instrument, as published by ``public/instruments``."""

    name: str
    product: str
    kind: str  # perpetual | future | option
    underlying: str
    tick_size: float
    volume_tick_size: float
    min_order_amount: float
    create_time: float
    expiry_ts: int | None = None
    option_type: str | None = None  # call | put
    strike: float | None = None

    def to_wire(self) -> dict:
        """The ``Instrument`` object of api.yaml."""
        wire: dict = {
            "instrument_name": self.name,
            "product": self.product,
            "tick_size": self.tick_size,
            "volume_tick_size": self.volume_tick_size,
            "min_order_amount": self.min_order_amount,
            "underlying": self.underlying,
            "type": self.kind,
            "base_currency": "USD",
            "create_time": self.create_time,
        }
        if self.expiry_ts is not None:
            wire["expiry_date"] = dt.datetime.fromtimestamp(self.expiry_ts, dt.UTC).strftime("%Y-%m-%d")
            wire["expiration_timestamp"] = self.expiry_ts
        if self.kind == "option":
            wire["option_type"] = self.option_type
            wire["strike_price"] = self.strike
        return wire


@dataclass(frozen=True)
class UnderlyingSpec:
    """How one underlying's instruments look (sizes like Thalex's) and how its index starts."""

    underlying: str
    coin: str
    start_price: float
    future_tick: float
    future_volume_tick: float
    option_tick: float
    option_volume_tick: float
    strike_step: float


UNDERLYINGS: tuple[UnderlyingSpec, ...] = (
    UnderlyingSpec("BTCUSD", "BTC", 95000.0, 1.0, 0.0001, 5.0, 0.01, 5000.0),
    UnderlyingSpec("ETHUSD", "ETH", 3500.0, 0.1, 0.001, 0.5, 0.1, 250.0),
)


def _expiry_code(ts: int) -> str:
    """Thalex's date code, e.g. ``27DEC24``."""
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    return f"{d.day}{MONTHS[d.month - 1]}{d.year % 100:02d}"


def _next_friday_8utc(now: float, min_days: float) -> int:
    """The first Friday 08:00 UTC at least ``min_days`` after ``now`` (Thalex expiries are 08:00 UTC)."""
    start = dt.datetime.fromtimestamp(now + min_days * 86400, dt.UTC)
    day = start.replace(hour=8, minute=0, second=0, microsecond=0)
    while day.weekday() != 4 or day.timestamp() < now + min_days * 86400:
        day += dt.timedelta(days=1)
    return int(day.timestamp())


def _last_friday_of_month_8utc(now: float, min_days: float) -> int:
    """The monthly expiry (last Friday 08:00 UTC) at least ``min_days`` after ``now``."""
    probe = dt.datetime.fromtimestamp(now + min_days * 86400, dt.UTC)
    year, month = probe.year, probe.month
    while True:
        last_day = calendar.monthrange(year, month)[1]
        day = dt.datetime(year, month, last_day, 8, tzinfo=dt.UTC)
        while day.weekday() != 4:
            day -= dt.timedelta(days=1)
        if day.timestamp() >= now + min_days * 86400:
            return int(day.timestamp())
        month += 1
        if month == 13:
            year, month = year + 1, 1


def build_instruments(now: float) -> list[Instrument]:
    """Per underlying: a perpetual, a monthly future and calls and puts of two expiries."""
    instruments: list[Instrument] = []
    for spec in UNDERLYINGS:
        fut_product, opt_product = f"F{spec.underlying}", f"O{spec.underlying}"
        instruments.append(
            Instrument(
                f"{spec.coin}-PERPETUAL",
                fut_product,
                "perpetual",
                spec.underlying,
                spec.future_tick,
                spec.future_volume_tick,
                spec.future_volume_tick,
                now,
            )
        )
        monthly = _last_friday_of_month_8utc(now, 20)
        instruments.append(
            Instrument(
                f"{spec.coin}-{_expiry_code(monthly)}",
                fut_product,
                "future",
                spec.underlying,
                spec.future_tick,
                spec.future_volume_tick,
                spec.future_volume_tick,
                now,
                monthly,
            )
        )
        atm = round(spec.start_price / spec.strike_step) * spec.strike_step
        for expiry in (_next_friday_8utc(now, 2), monthly):
            for strike in (atm - spec.strike_step, atm, atm + spec.strike_step):
                for option_type, letter in (("call", "C"), ("put", "P")):
                    instruments.append(
                        Instrument(
                            f"{spec.coin}-{_expiry_code(expiry)}-{int(strike)}-{letter}",
                            opt_product,
                            "option",
                            spec.underlying,
                            spec.option_tick,
                            spec.option_volume_tick,
                            spec.option_volume_tick,
                            now,
                            expiry,
                            option_type,
                            strike,
                        )
                    )
    return instruments


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
    """All market state: index levels, pins, funding and book shapes; advanced by ``step``."""

    seed: int = 1
    now: float = 0.0
    volatility: float = 0.5
    index_vol: float = 0.6
    future_basis: float = 0.05
    perp_premium: float = 0.0001
    instruments: dict[str, Instrument] = field(default_factory=dict)
    index: dict[str, float] = field(default_factory=dict)
    pinned_marks: dict[str, float] = field(default_factory=dict)
    funding_marks: dict[str, float] = field(default_factory=dict)
    funding_rates: dict[str, float] = field(default_factory=dict)
    books: dict[str, BookShape] = field(default_factory=dict)
    paused: bool = False
    version: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        if not self.instruments:
            self.instruments = {i.name: i for i in build_instruments(self.now)}
        for spec in UNDERLYINGS:
            self.index.setdefault(spec.underlying, spec.start_price)
        for inst in self.instruments.values():
            if inst.kind == "perpetual":
                self.funding_marks.setdefault(inst.name, 0.0)
                self.funding_rates.setdefault(inst.name, self.perp_premium)

    def step(self, now: float, seconds: float, force: bool = False) -> bool:
        """One walk step worth ``seconds`` of market time; returns whether prices moved.

        The step size is given, not measured, so a seed and a number of steps fix the price path
        whatever the wall clock does; ``now`` only dates expiries and marks.
        """
        self.now = max(self.now, now)
        if self.paused and not force:
            return False
        years = seconds / SECONDS_PER_YEAR
        for underlying in sorted(self.index):
            shock = self.rng.gauss(0.0, 1.0) * self.index_vol * math.sqrt(years)
            self.index[underlying] *= math.exp(shock - 0.5 * self.index_vol**2 * years)
        for name, rate in self.funding_rates.items():
            inst = self.instruments[name]
            self.funding_marks[name] += rate * self.index[inst.underlying] * seconds / FUNDING_INTERVAL
        self.version += 1
        return True

    def set_index(self, underlying: str, price: float) -> None:
        self.index[underlying] = price
        self.version += 1

    def mark(self, name: str) -> Mark:
        """Derive the mark from the index: perp near index, future with basis, options by Black-Scholes."""
        inst = self.instruments[name]
        index = self.index[inst.underlying]
        pinned = self.pinned_marks.get(name)
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
            return Mark(pinned if pinned is not None else forward, index, 1.0)
        price, delta = black_scholes(
            forward, inst.strike or 0.0, years, self.volatility, inst.option_type == "call"
        )
        return Mark(
            pinned if pinned is not None else price, index, delta, iv=self.volatility, forward=forward
        )

    def collar(self, name: str, mark: float) -> tuple[float, float]:
        """Price collar (low checks new asks, high checks new bids): 2 % for futures, wider for options."""
        inst = self.instruments[name]
        width = 0.5 * mark + 20 * inst.tick_size if inst.kind == "option" else 0.02 * mark
        return max(inst.tick_size, align_up(mark - width, inst.tick_size)), align_down(
            mark + width, inst.tick_size
        )

    def book(self, name: str, mark: float | None = None) -> tuple[list[list[float]], list[list[float]]]:
        """Synthetic levels ``[[price, amount], ...]`` around the mark, best first."""
        inst = self.instruments[name]
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
            if shape.bids and bid > 0:
                bids.append([bid, amount])
            if shape.asks:
                asks.append([round(best_ask + depth * shape.step_ticks * tick, 10), amount])
        return bids, asks
