"""Property: the ledger equals a straightforward recomputation from the full fill list.

The reference below keeps every fill and replays them with exact `Fraction`
arithmetic, and is written differently from the ledger:

* amounts and prices are the exact decimals the exchange meant (k/1000 BTC,
  c/100 USD), not their float images;
* the position is carried as an exact cost basis (the signed entry value
  `V = avg_entry * q`, and likewise the funding entry value): an increase adds
  `price * s`, a partial reduction scales the basis by the share that remains,
  a flip restarts it at the fill price — the average entry is only derived at
  the end (`V / q`), instead of a running average updated fill by fill;
* realised P&L is not accumulated at all: it is the identity
  `realised = avg_entry * q - sum(price_i * s_i)` (cash spent plus what the
  position is carried at), and funding likewise
  `funding = funding_mark_now * q - sum(fm_i * s_i)`;
* funding is valued on a cumulative funding index instead of Thalex's daily
  frames: `C = (sum of the marks settled so far) + funding mark`, and
  `funding = C_now * q - sum(C_i * s_i)` over the whole epoch; the ledger's
  settlements (realise, reset E and the mark every day at 08:00 UTC) must come
  to the same. The clock jumps across settlements (`Pass`);
* an option's index is the newest over the latest ticks of its underlying,
  found by a scan of every tick kept;
* late trades: a `LateFill` is held back while the exchange's report (the
  reference's own exact position, average price and funding entry value) is
  adopted, then delivered; afterwards the ledger must equal the recomputation
  in which the trade was never late (the reference simply books it in order);
* the book is walked level by level in exact arithmetic.

"Within 1e-9 relative" is relative to the money involved: the ledger computes
in floats, so a P&L that is a small difference of large notionals carries
float error proportional to those notionals, not to the difference. The scale
of each comparison is therefore max(|expected|, the notional traded and held).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.config import FeeRates, TradingFees
from services.common.contracts import ExchangePosition, Fill, InstrumentType, Liquidity, Positions, Side, Tick
from services.portfolio.fees import rates_for
from services.portfolio.ledger import FillOutcome, Ledger, LedgerConfig
from tests.portfolio.factories import BTC_CALL, BTC_PERP, ETH_FUTURE, INFOS, config

UNKNOWN = "SOL-PERPETUAL"
"""Never registered: default rates, no type."""
INDEX_FEED = "BTCUSD"
"""Ticks of the underlying's own index (`price_index.BTCUSD`): an index source for the BTC option."""
INSTRUMENTS = [BTC_PERP, ETH_FUTURE, BTC_CALL, UNKNOWN]
BUFFER = Fraction(11, 10)
REL = 1e-9
FEES = TradingFees(products={
    **TradingFees().products,
    InstrumentType.OPTION: FeeRates(maker_fee_rate=0.00025, taker_fee_rate=0.00025, premium_cap=0.125),
})
START = 1_704_095_990
"""2024-01-01 07:59:50 UTC: ten seconds before a daily settlement."""
DAY = 86_400
SETTLEMENT = 8 * 3_600


def exact(x: float) -> Fraction:
    return Fraction(x)


def as_exact(x: float | None) -> Fraction | None:
    return None if x is None else Fraction(x)


def period(ts: Fraction) -> int:
    """Thalex's daily funding period (settlement at 08:00 UTC), computed on exact time."""
    return math.floor((ts - SETTLEMENT) / DAY)


def underlying_of(name: str) -> str:
    info = INFOS.get(name) if name != UNKNOWN else None
    return info.underlying if info is not None else name


# ------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class FillEvent:
    instrument: str
    buy: bool
    milli_amount: int
    cent_price: int
    fee_cents: int | None
    """None: not reported."""
    liquidity: Liquidity | None
    funding_bp: int


@dataclass(frozen=True)
class LateFill:
    """A trade in flight: the exchange's report (with it) is adopted first, then it arrives."""

    fill: FillEvent


@dataclass(frozen=True)
class TickEvent:
    instrument: str
    cent_mark: int
    bids: tuple[tuple[int, int], ...]
    asks: tuple[tuple[int, int], ...]
    best_bid_offset: int | None
    best_ask_offset: int | None
    index_cents: int | None
    funding_bp: int


@dataclass(frozen=True)
class Pass:
    """The clock moves on (across daily settlements)."""

    seconds: int


@dataclass(frozen=True)
class Redeliver:
    which: int


@dataclass(frozen=True)
class Restart:
    pass


cent_prices = st.integers(min_value=100, max_value=10_000_000)  # 1 .. 100000 USD
fills = st.builds(
    FillEvent,
    instrument=st.sampled_from([BTC_PERP, BTC_PERP, *INSTRUMENTS]),  # more history on one instrument
    buy=st.booleans(),
    # 0.001 .. 5, and round amounts that close positions exactly
    milli_amount=st.integers(min_value=1, max_value=5_000) | st.sampled_from([1, 10, 100, 1_000]),
    cent_price=cent_prices,
    fee_cents=st.none() | st.integers(min_value=-500, max_value=5_000),
    liquidity=st.sampled_from([None, Liquidity.MAKER, Liquidity.TAKER]),
    funding_bp=st.integers(min_value=-500, max_value=500),
)
levels = st.lists(
    st.tuples(st.integers(min_value=1, max_value=50_000), st.integers(min_value=1, max_value=3_000)),
    max_size=3,
).map(lambda xs: tuple(xs))
ticks = st.builds(
    TickEvent,
    instrument=st.sampled_from([*INSTRUMENTS, INDEX_FEED]),
    cent_mark=cent_prices,
    bids=levels,
    asks=levels,
    best_bid_offset=st.none() | st.integers(min_value=0, max_value=50_000),
    best_ask_offset=st.none() | st.integers(min_value=0, max_value=50_000),
    index_cents=st.none() | st.integers(min_value=100, max_value=10_000_000),
    funding_bp=st.integers(min_value=-500, max_value=500),
)
passes = st.builds(Pass, seconds=st.sampled_from([5, 600, 6 * 3_600, 20 * 3_600, DAY, 50 * 3_600]))
events = st.lists(
    st.one_of(
        fills,
        fills,
        fills,
        fills,
        ticks,
        ticks,
        st.builds(LateFill, fill=fills),
        passes,
        st.builds(Redeliver, which=st.integers(min_value=0, max_value=1_000)),
        st.just(Restart()),
    ),
    min_size=10,
    max_size=80,
)


# -------------------------------------------------------------- wire documents


def funding_of(instrument: str, bp: int) -> Fraction | None:
    return Fraction(bp, 10_000) if instrument in (BTC_PERP, UNKNOWN) else None


def as_float(x: Fraction | None) -> float | None:
    return None if x is None else float(x)


def to_fill(event: FillEvent, n: int, ts: int) -> Fill:
    return Fill(
        trade_id=f"T{n}",
        order_id="O",
        instrument=event.instrument,
        side=Side.BUY if event.buy else Side.SELL,
        price=event.cent_price / 100,
        amount=event.milli_amount / 1_000,
        fee=None if event.fee_cents is None else event.fee_cents / 100,
        liquidity=event.liquidity,
        funding_mark=as_float(funding_of(event.instrument, event.funding_bp)),
        exchange_ts=float(ts),
        ingest_ts=float(ts),
    )


def book_side(mark_cents: int, offsets: tuple[tuple[int, int], ...], sign: int) -> list[tuple[int, int]]:
    """Levels best first: bids below mark (sign -1), asks above (sign +1)."""
    prices = sorted({max(0, mark_cents + sign * off) for off, _ in offsets}, reverse=sign < 0)
    sizes = [size for _, size in offsets]
    return list(zip(prices, sizes[: len(prices)], strict=True))


def to_tick(event: TickEvent, ts: int) -> Tick:
    bids = book_side(event.cent_mark, event.bids, -1)
    asks = book_side(event.cent_mark, event.asks, +1)
    return Tick(
        instrument=event.instrument,
        mark=event.cent_mark / 100,
        best_bid=(
            None if event.best_bid_offset is None else max(0, event.cent_mark - event.best_bid_offset) / 100
        ),
        best_ask=None if event.best_ask_offset is None else (event.cent_mark + event.best_ask_offset) / 100,
        bids=[(p / 100, s / 1_000) for p, s in bids] or None,
        asks=[(p / 100, s / 1_000) for p, s in asks] or None,
        index=None if event.index_cents is None else event.index_cents / 100,
        funding_mark=as_float(funding_of(event.instrument, event.funding_bp)),
        exchange_ts=float(ts),
        ingest_ts=float(ts),
    )


# ------------------------------------------------------------------- reference


@dataclass
class Traded:
    signed: Fraction
    price: Fraction
    funding: Fraction
    """The cumulative funding index C at the trade."""
    raw_funding_mark: Fraction
    """The funding mark as the exchange stamped it (its daily frame)."""
    period: int
    fee: Fraction
    estimated: Fraction


@dataclass
class FundingClock:
    """An instrument's funding on the cumulative index: `offset` = the marks settled so far."""

    period: int | None = None
    offset: Fraction = Fraction(0)
    mark: Fraction | None = None
    mark_ts: Fraction | None = None

    def observe(self, ts: Fraction, mark: Fraction | None) -> None:
        k = period(ts)
        if self.period is None:
            self.period = k
        elif k > self.period:
            if self.mark is not None:  # settled at the newest mark of the period that ended
                self.offset += self.mark
                self.mark, self.mark_ts = Fraction(0), Fraction(k * DAY + SETTLEMENT)
            self.period = k
        if mark is not None and k == self.period and (self.mark_ts is None or ts >= self.mark_ts):
            self.mark, self.mark_ts = mark, ts

    def now(self) -> Fraction:
        return self.offset + (self.mark if self.mark is not None else 0)


def cost_basis(steps: list[tuple[Fraction, Fraction]]) -> tuple[Fraction, Fraction]:
    """Replay `(signed amount, value)` as an exact cost basis: `(position, basis)`.

    Growing adds `value * s`; a partial reduction scales the basis by the share that remains;
    a flip restarts it at the value of the flipping step.
    """
    running = basis = Fraction(0)
    for signed, value in steps:
        after = running + signed
        if running == 0 or (running > 0) == (signed > 0):
            basis += value * signed
        elif after == 0:
            basis = Fraction(0)
        elif (after > 0) == (running > 0):
            basis = basis * after / running
        else:
            basis = value * after
        running = after
    return running, basis


@dataclass
class Reference:
    trades: dict[str, list[Traded]] = field(default_factory=dict)
    last_tick: dict[str, Tick] = field(default_factory=dict)
    funding: dict[str, FundingClock] = field(default_factory=dict)
    notional: Fraction = Fraction(0)

    def tick(self, t: Tick) -> None:
        self.last_tick[t.instrument] = t
        clock = self.funding.get(t.instrument)
        if clock is not None:
            clock.observe(exact(t.exchange_ts), as_exact(t.funding_mark))

    def index(self, underlying: str) -> Fraction | None:
        """The newest index over the latest ticks of the underlying's instruments and index feed."""
        held = [(t.exchange_ts, name, t.index) for name, t in self.last_tick.items()
                if underlying_of(name) == underlying and t.index is not None]
        return exact(max(held)[2]) if held else None

    def fill(self, f: Fill) -> None:
        amount = Fraction(round(f.amount * 1_000), 1_000)
        price = Fraction(round(f.price * 100), 100)
        signed = amount if f.side is Side.BUY else -amount
        ts = exact(f.exchange_ts)
        clock = self.funding.get(f.instrument)
        if clock is None:  # a new position starts from the instrument's latest tick
            clock = self.funding[f.instrument] = FundingClock()
            last = self.last_tick.get(f.instrument)
            if last is not None:
                clock.observe(exact(last.exchange_ts), as_exact(last.funding_mark))
        raw = as_exact(f.funding_mark)
        clock.observe(ts, raw)
        cumulative = clock.offset + raw if raw is not None else clock.now()
        fee, estimated = self.fee(f, amount, price)
        stamped = raw if raw is not None else Fraction(0)
        self.trades.setdefault(f.instrument, []).append(
            Traded(signed, price, cumulative, stamped, period(ts), fee, estimated))
        self.notional += amount * price

    def fee(self, f: Fill, amount: Fraction, price: Fraction) -> tuple[Fraction, Fraction]:
        if f.fee is not None:
            return exact(f.fee), Fraction(0)
        info = INFOS.get(f.instrument) if f.instrument != UNKNOWN else None
        kind = info.type if info else None
        rates = rates_for(FEES, f.instrument, kind)
        rate = exact(rates.maker_fee_rate if f.liquidity is Liquidity.MAKER else rates.taker_fee_rate)
        base = amount * price
        fee = base * rate
        if kind is InstrumentType.OPTION:
            index = self.index(underlying_of(f.instrument))
            fee = (amount * index if index is not None else base) * rate
            fee = min(fee, exact(rates.premium_cap) * amount * price)
        fee = max(fee, exact(FEES.minimum_fee_usd))
        return fee, fee

    def exchange_view(self, name: str, at: Fraction) -> tuple[Fraction, Fraction, Fraction]:
        """What the exchange reports at `at`: position, average price, funding entry value.

        Its funding entry value is of its daily frame: the position held at the last settlement
        counts at funding mark 0, the trades since at the marks they were stamped with.
        """
        trades = self.trades[name]
        q, basis = cost_basis([(t.signed, t.price) for t in trades])
        now = period(at)
        held = sum((t.signed for t in trades if t.period < now), Fraction(0))
        _, entry = cost_basis([(held, Fraction(0))]
                              + [(t.signed, t.raw_funding_mark) for t in trades if t.period == now])
        return q, (basis / q if q != 0 else Fraction(0)), entry

    def position(self, name: str) -> dict[str, Fraction]:
        trades = self.trades[name]
        q, basis = cost_basis([(t.signed, t.price) for t in trades])
        avg = basis / q if q != 0 else Fraction(0)
        # realised is the identity: cash spent plus what the position is carried at
        realized = avg * q - sum((t.price * t.signed for t in trades), Fraction(0))
        clock = self.funding[name]
        funding = clock.now() * q - sum((t.funding * t.signed for t in trades), Fraction(0))

        tick = self.last_tick.get(name)
        mark = exact(tick.mark) if tick else avg
        unrealized = (mark - avg) * q
        exit_price = self.exit_price(q, mark, tick)
        info = INFOS.get(name) if name != UNKNOWN else None
        rates = rates_for(FEES, name, info.type if info else None)
        if q == 0:
            close_fee = Fraction(0)
        elif info is not None and info.type is InstrumentType.OPTION:
            index = exact(tick.index) if tick and tick.index is not None else self.index(info.underlying)
            fee = abs(q) * (index if index is not None else mark) * exact(rates.taker_fee_rate)
            fee = min(fee, exact(rates.premium_cap) * abs(q) * exit_price)
            close_fee = max(fee, exact(FEES.minimum_fee_usd))
        else:
            close_fee = max(abs(q) * exit_price * exact(rates.taker_fee_rate), exact(FEES.minimum_fee_usd))
        self.notional += abs(q) * (mark + exit_price)
        return {
            "position": q,
            "avg_entry": avg,
            "realized_pnl": realized,
            "unrealized_pnl": unrealized,
            "funding_pnl": funding,
            "fees_paid": sum((t.fee for t in trades), Fraction(0)),
            "fees_estimated": sum((t.estimated for t in trades), Fraction(0)),
            "est_close_fee": close_fee,
            "est_slippage": (mark - exit_price) * q,
        }

    @staticmethod
    def exit_price(q: Fraction, mark: Fraction, tick: Tick | None) -> Fraction:
        if q == 0 or tick is None:
            return mark
        levels, best = (tick.bids, tick.best_bid) if q > 0 else (tick.asks, tick.best_ask)
        if not levels:
            return exact(best) if best is not None else mark
        want, cost = abs(q), Fraction(0)
        for price, size in levels:
            take = min(exact(size), want)
            cost += take * exact(price)
            want -= take
        cost += want * exact(levels[-1][0])  # beyond the carried depth: the worst carried level
        return cost / abs(q)


def close(actual: float, expected: Fraction, scale: Fraction) -> bool:
    return abs(exact(actual) - expected) <= REL * max(abs(expected), scale, Fraction(1))


# -------------------------------------------------------------------- property


def late_report(ledger: Ledger, reference: Reference, late: Fill, at: float) -> Positions:
    """The exchange's portfolio with the trade the ledger has not seen; the rest as the ledger has it."""
    q, average, entry = reference.exchange_view(late.instrument, exact(at))
    tick = reference.last_tick.get(late.instrument)
    lines = [ExchangePosition(instrument=late.instrument, position=float(q), average_price=float(average),
                              mark_price=tick.mark if tick else float(average),
                              perpetual_funding_entry_value=float(entry))]
    for name in reference.trades:
        if name != late.instrument and ledger.position(name) != 0.0:
            lines.append(ExchangePosition(instrument=name, position=ledger.position(name), average_price=0.0,
                                          mark_price=0.0))
    return Positions(positions=lines, exchange_ts=at, ingest_ts=at)


@dataclass
class Run:
    """The ledger under test and the reference, fed the same script."""

    cfg: LedgerConfig
    ledger: Ledger
    reference: Reference = field(default_factory=Reference)
    sent: list[Fill] = field(default_factory=list)
    clock: int = START

    def play(self, n: int, event: object) -> None:
        self.clock += 1
        ledger = self.ledger
        if isinstance(event, FillEvent):
            f = to_fill(event, n, self.clock)
            assert ledger.apply_fill(f) is FillOutcome.APPLIED
            self.reference.fill(f)
            self.sent.append(f)
        elif isinstance(event, LateFill):
            f = to_fill(event.fill, n, self.clock)
            self.reference.fill(f)
            at = self.clock + 0.5
            ledger.reconcile(late_report(ledger, self.reference, f, at), now=at)
            assert ledger.apply_fill(f) is FillOutcome.APPLIED
            self.sent.append(f)
        elif isinstance(event, TickEvent):
            t = to_tick(event, self.clock)
            ledger.apply_tick(t)
            self.reference.tick(t)
        elif isinstance(event, Pass):
            self.clock += event.seconds
        elif isinstance(event, Redeliver) and self.sent:
            assert ledger.apply_fill(self.sent[event.which % len(self.sent)]) is FillOutcome.DUPLICATE
        elif isinstance(event, Restart):
            before = ledger.snapshot(0, 0.0, 1.0)
            self.ledger = Ledger.from_state(json.loads(json.dumps(ledger.to_state())), self.cfg)
            assert self.ledger.snapshot(0, 0.0, 1.0) == before


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_ledger_equals_a_recomputation_from_the_full_fill_list(script: list) -> None:
    cfg = config(fee_estimation_buffer=float(BUFFER), fees=FEES, drift_grace_seconds=0.0)
    run = Run(cfg, Ledger(cfg))
    for name in (BTC_PERP, ETH_FUTURE, BTC_CALL):
        run.ledger.set_instrument(name, INFOS[name])
    for n, event in enumerate(script, start=1):
        run.play(n, event)
    ledger, reference, clock = run.ledger, run.reference, run.clock

    snap = ledger.snapshot(1, float(clock + 1), 1e9)
    expected = {name: reference.position(name) for name in reference.trades}
    scale = reference.notional
    assert {p.instrument for p in snap.positions} == set(expected)
    for row in snap.positions:
        want = expected[row.instrument]
        for key, value in want.items():
            got = getattr(row, key)
            if key == "fees_estimated" and got is None:
                got = 0.0
            assert close(got, value, scale), (row.instrument, key, got, float(value))

    sums = {key: sum((e[key] for e in expected.values()), Fraction(0)) for key in
            ("realized_pnl", "unrealized_pnl", "funding_pnl", "fees_paid", "est_close_fee", "est_slippage")}
    gross = sums["realized_pnl"] + sums["unrealized_pnl"] + sums["funding_pnl"]
    net = gross - sums["fees_paid"]
    after_close = net - sums["est_close_fee"] * BUFFER - sums["est_slippage"]
    totals = ledger.totals()
    for figures in (snap, totals):
        assert close(figures.gross_pnl, gross, scale)
        assert close(figures.net_pnl, net, scale)
        assert close(figures.fees_paid, sums["fees_paid"], scale)
        assert close(figures.est_close_fees, sums["est_close_fee"], scale)
        assert close(figures.est_slippage, sums["est_slippage"], scale)
        assert close(figures.net_after_close, after_close, scale)
