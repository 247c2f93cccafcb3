"""What the paper exchange lists, and when: instruments, their names, expiries and combinations.

Pure (no clock): every function takes the time it is asked about. Thalex's calendar
(thalex.com, contract specifications): everything lists, settles and expires at 08:00 UTC; daily
futures are introduced 48 hours before they expire, monthlies expire on the last Friday of the
month; roll instruments (``BTC-25DEC26-PERPETUAL``, ``BTC-25DEC26-27NOV26``) buy the later
maturity and sell the earlier one. The paper lists per underlying: the perpetual, the next two
daily futures, the monthly future at least 20 days ahead, calls and puts at three strikes around
the index for the weekly (next Friday at least 2 days ahead) and the monthly expiry, and a roll
for every pair of its futures and perpetual.
"""

from __future__ import annotations

import calendar
import datetime as dt
import itertools
from dataclasses import dataclass
from typing import Any

SECONDS_PER_DAY = 86_400
SETTLEMENT_HOUR = 8
"""Thalex settles daily, expires and lists at 08:00 UTC."""
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
MAX_COMBINATION_LEGS = 4


@dataclass(frozen=True)
class Instrument:
    """Static description of a tradable instrument, as published by ``public/instruments``.

    Combinations (rolls and ad-hoc ``[A:1,B:-1]`` combinations) carry ``legs``: (leg name,
    integer quantity) pairs; they trade on their legs.
    """

    name: str
    product: str
    kind: str  # perpetual | future | option | combination
    underlying: str
    tick_size: float
    volume_tick_size: float
    min_order_amount: float
    create_time: float
    expiry_ts: int | None = None
    option_type: str | None = None  # call | put
    strike: float | None = None
    legs: tuple[tuple[str, int], ...] = ()

    @property
    def is_combination(self) -> bool:
        return self.kind == "combination"

    @property
    def is_listed(self) -> bool:
        """Ad-hoc combinations (``[A:1,B:-1]``) are not instruments of ``public/instruments``."""
        return not self.name.startswith("[")

    def to_wire(self, settlement: tuple[float, float] | None = None) -> dict[str, Any]:
        """The ``Instrument`` object of api.yaml; ``settlement`` (price, index) for an expired one."""
        wire: dict[str, Any] = {
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
        if self.legs:
            wire["legs"] = [{"instrument_name": name, "quantity": quantity} for name, quantity in self.legs]
        if settlement is not None:
            wire["settlement_price"], wire["settlement_index_price"] = settlement
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
    roll_min_amount: float


UNDERLYINGS: tuple[UnderlyingSpec, ...] = (
    UnderlyingSpec("BTCUSD", "BTC", 95000.0, 1.0, 0.0001, 5.0, 0.01, 5000.0, 0.1),
    UnderlyingSpec("ETHUSD", "ETH", 3500.0, 0.1, 0.001, 0.5, 0.1, 250.0, 1.0),
)


def expiry_code(ts: int) -> str:
    """Thalex's date code, e.g. ``27DEC24``."""
    d = dt.datetime.fromtimestamp(ts, dt.UTC)
    return f"{d.day}{MONTHS[d.month - 1]}{d.year % 100:02d}"


def next_boundary(now: float) -> int:
    """The first 08:00 UTC strictly after ``now`` (when Thalex settles, expires and lists)."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).replace(
        hour=SETTLEMENT_HOUR, minute=0, second=0, microsecond=0
    )
    ts = int(day.timestamp())
    return ts if ts > now else ts + SECONDS_PER_DAY


def next_friday(now: float, min_days: float) -> int:
    """The first Friday 08:00 UTC at least ``min_days`` after ``now``."""
    earliest = now + min_days * SECONDS_PER_DAY
    day = dt.datetime.fromtimestamp(earliest, dt.UTC).replace(
        hour=SETTLEMENT_HOUR, minute=0, second=0, microsecond=0
    )
    while day.weekday() != 4 or day.timestamp() < earliest:
        day += dt.timedelta(days=1)
    return int(day.timestamp())


def last_friday_of_month(now: float, min_days: float) -> int:
    """The monthly expiry (last Friday 08:00 UTC) at least ``min_days`` after ``now``."""
    earliest = now + min_days * SECONDS_PER_DAY
    probe = dt.datetime.fromtimestamp(earliest, dt.UTC)
    year, month = probe.year, probe.month
    while True:
        last_day = calendar.monthrange(year, month)[1]
        day = dt.datetime(year, month, last_day, SETTLEMENT_HOUR, tzinfo=dt.UTC)
        while day.weekday() != 4:
            day -= dt.timedelta(days=1)
        if day.timestamp() >= earliest:
            return int(day.timestamp())
        month += 1
        if month == 13:
            year, month = year + 1, 1


def listings(now: float, index: dict[str, float] | None = None) -> list[Instrument]:
    """Every instrument that is listed at ``now`` (created ``now``), strikes around the current index."""
    out: list[Instrument] = []
    for spec in UNDERLYINGS:
        price = (index or {}).get(spec.underlying, spec.start_price)
        out.extend(_underlying_listings(spec, now, price))
    return out


def _underlying_listings(spec: UnderlyingSpec, now: float, price: float) -> list[Instrument]:
    fut_product, opt_product = f"F{spec.underlying}", f"O{spec.underlying}"
    sizes = (spec.future_tick, spec.future_volume_tick, spec.future_volume_tick, now)
    perp = Instrument(f"{spec.coin}-PERPETUAL", fut_product, "perpetual", spec.underlying, *sizes)
    first_daily = next_boundary(now)
    monthly = last_friday_of_month(now, 20)
    expiries = sorted({first_daily, first_daily + SECONDS_PER_DAY, monthly})
    futures = [
        Instrument(f"{spec.coin}-{expiry_code(e)}", fut_product, "future", spec.underlying, *sizes, e)
        for e in expiries
    ]
    out = [perp, *futures]
    atm = round(price / spec.strike_step) * spec.strike_step
    for expiry in sorted({next_friday(now, 2), monthly}):
        for strike in (atm - spec.strike_step, atm, atm + spec.strike_step):
            if strike <= 0:
                continue
            for option_type, letter in (("call", "C"), ("put", "P")):
                out.append(
                    Instrument(
                        f"{spec.coin}-{expiry_code(expiry)}-{int(strike)}-{letter}",
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
    dated = [perp, *futures]
    for earlier, later in itertools.combinations(dated, 2):
        out.append(roll(spec, later, earlier, now))
    return out


def roll(spec: UnderlyingSpec, later: Instrument, earlier: Instrument, now: float) -> Instrument:
    """The roll instrument: buying it buys ``later`` and sells ``earlier`` (Thalex's convention)."""
    earlier_code = "PERPETUAL" if earlier.kind == "perpetual" else expiry_code(earlier.expiry_ts or 0)
    return Instrument(
        f"{later.name}-{earlier_code}",
        later.product,
        "combination",
        spec.underlying,
        spec.future_tick,
        spec.future_volume_tick,
        spec.roll_min_amount,
        now,
        earlier.expiry_ts if earlier.expiry_ts is not None else later.expiry_ts,
        legs=((later.name, 1), (earlier.name, -1)),
    )


def parse_combination(name: str) -> tuple[tuple[str, int], ...] | None:
    """``[A:1,B:-1]`` -> (("A", 1), ("B", -1)); None when the name is not in that form."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    legs: list[tuple[str, int]] = []
    for part in name[1:-1].split(","):
        leg, _, quantity = part.partition(":")
        try:
            legs.append((leg, int(quantity)))
        except ValueError:
            return None
    return tuple(legs)


def combination_name(legs: tuple[tuple[str, int], ...]) -> str:
    return "[" + ",".join(f"{name}:{quantity}" for name, quantity in legs) + "]"
