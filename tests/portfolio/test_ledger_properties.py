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
* the book is walked level by level in exact arithmetic.

"Within 1e-9 relative" is relative to the money involved: the ledger computes
in floats, so a P&L that is a small difference of large notionals carries
float error proportional to those notionals, not to the difference. The scale
of each comparison is therefore max(|expected|, the notional traded and held).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.config import TradingFees
from services.common.contracts import Fill, InstrumentType, Liquidity, Side, Tick
from services.portfolio.fees import rates_for
from services.portfolio.ledger import FillOutcome, Ledger
from tests.portfolio.factories import BTC_CALL, BTC_PERP, ETH_FUTURE, INFOS, config

UNKNOWN = "SOL-PERPETUAL"
"""Never registered: default rates, no type."""
INSTRUMENTS = [BTC_PERP, ETH_FUTURE, BTC_CALL, UNKNOWN]
BUFFER = Fraction(11, 10)
REL = 1e-9
FEES = TradingFees()


def exact(x: float) -> Fraction:
    return Fraction(x)


# ------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class FillEvent:
    instrument: str
    buy: bool
    milli_amount: int
    cent_price: int
    fee_cents: int | None
    """None: not reported (fee 0, no fee_rate)."""
    liquidity: Liquidity | None
    funding_bp: int


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
    instrument=st.sampled_from(INSTRUMENTS),
    cent_mark=cent_prices,
    bids=levels,
    asks=levels,
    best_bid_offset=st.none() | st.integers(min_value=0, max_value=50_000),
    best_ask_offset=st.none() | st.integers(min_value=0, max_value=50_000),
    index_cents=st.none() | st.integers(min_value=100, max_value=10_000_000),
    funding_bp=st.integers(min_value=-500, max_value=500),
)
events = st.lists(
    st.one_of(
        fills,
        fills,
        fills,
        fills,
        ticks,
        ticks,
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


def to_fill(event: FillEvent, n: int) -> Fill:
    return Fill(
        trade_id=f"T{n}",
        order_id="O",
        instrument=event.instrument,
        side=Side.BUY if event.buy else Side.SELL,
        price=event.cent_price / 100,
        amount=event.milli_amount / 1_000,
        fee=0.0 if event.fee_cents is None else event.fee_cents / 100,
        fee_rate=None if event.fee_cents is None else 0.0005,
        liquidity=event.liquidity,
        funding_mark=as_float(funding_of(event.instrument, event.funding_bp)),
        exchange_ts=float(n),
        ingest_ts=float(n),
    )


def book_side(mark_cents: int, offsets: tuple[tuple[int, int], ...], sign: int) -> list[tuple[int, int]]:
    """Levels best first: bids below mark (sign -1), asks above (sign +1)."""
    prices = sorted({max(0, mark_cents + sign * off) for off, _ in offsets}, reverse=sign < 0)
    sizes = [size for _, size in offsets]
    return list(zip(prices, sizes[: len(prices)], strict=True))


def to_tick(event: TickEvent, n: int) -> Tick:
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
        exchange_ts=float(n),
        ingest_ts=float(n),
    )


# ------------------------------------------------------------------- reference


@dataclass
class Traded:
    signed: Fraction
    price: Fraction
    funding_mark: Fraction
    fee: Fraction


@dataclass
class Reference:
    trades: dict[str, list[Traded]] = field(default_factory=dict)
    last_tick: dict[str, Tick] = field(default_factory=dict)
    notional: Fraction = Fraction(0)

    def fill(self, f: Fill) -> None:
        amount = Fraction(round(f.amount * 1_000), 1_000)
        price = Fraction(round(f.price * 100), 100)
        signed = amount if f.side is Side.BUY else -amount
        last = self.last_tick.get(f.instrument)
        if f.funding_mark is not None:
            fm = exact(f.funding_mark)
        elif last is not None and last.funding_mark is not None:
            fm = exact(last.funding_mark)
        else:
            fm = Fraction(0)
        self.trades.setdefault(f.instrument, []).append(Traded(signed, price, fm, self.fee(f, amount, price)))
        self.notional += amount * price

    def fee(self, f: Fill, amount: Fraction, price: Fraction) -> Fraction:
        if f.fee_rate is not None:
            return exact(f.fee)
        info = INFOS.get(f.instrument)
        kind = info.type if info else None
        rates = rates_for(FEES, f.instrument, kind)
        rate = exact(rates.maker_fee_rate if f.liquidity is Liquidity.MAKER else rates.taker_fee_rate)
        last = self.last_tick.get(f.instrument)
        base = amount * price
        if kind is InstrumentType.OPTION and last is not None and last.index is not None:
            base = amount * exact(last.index)
        return max(base * rate, exact(FEES.minimum_fee_usd))

    def position(self, name: str) -> dict[str, Fraction]:
        trades = self.trades[name]
        q = sum((t.signed for t in trades), Fraction(0))
        # exact cost basis V (= avg_entry * q) and funding basis F (= E), replayed over the fills
        running = basis = funding_basis = Fraction(0)
        for t in trades:
            after = running + t.signed
            if running == 0 or (running > 0) == (t.signed > 0):
                basis += t.price * t.signed
                funding_basis += t.funding_mark * t.signed
            elif after == 0:
                basis = funding_basis = Fraction(0)
            elif (after > 0) == (running > 0):
                basis, funding_basis = basis * after / running, funding_basis * after / running
            else:
                basis, funding_basis = t.price * after, t.funding_mark * after
            running = after
        avg = basis / q if q != 0 else Fraction(0)
        funding_entry = funding_basis
        realized = avg * q - sum((t.price * t.signed for t in trades), Fraction(0))
        funding_realized = funding_entry - sum((t.funding_mark * t.signed for t in trades), Fraction(0))

        tick = self.last_tick.get(name)
        mark = exact(tick.mark) if tick else avg
        unrealized = (mark - avg) * q
        fm_now = tick.funding_mark if tick else None
        funding = funding_realized + (exact(fm_now) * q - funding_entry if fm_now is not None else 0)
        exit_price = self.exit_price(q, mark, tick)
        info = INFOS.get(name)
        rates = rates_for(FEES, name, info.type if info else None)
        if q == 0:
            close_fee = Fraction(0)
        else:
            if info is not None and info.type is InstrumentType.OPTION:
                base = abs(q) * (exact(tick.index) if tick and tick.index is not None else mark)
            else:
                base = abs(q) * exit_price
            close_fee = max(base * exact(rates.taker_fee_rate), exact(FEES.minimum_fee_usd))
        self.notional += abs(q) * (mark + exit_price)
        return {
            "position": q,
            "avg_entry": avg,
            "realized_pnl": realized,
            "unrealized_pnl": unrealized,
            "funding_pnl": funding,
            "fees_paid": sum((t.fee for t in trades), Fraction(0)),
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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_ledger_equals_a_recomputation_from_the_full_fill_list(script: list) -> None:
    cfg = config(fee_estimation_buffer=float(BUFFER))
    ledger = Ledger(cfg)
    for name in (BTC_PERP, ETH_FUTURE, BTC_CALL):
        ledger.set_instrument(name, INFOS[name])
    reference = Reference()
    sent: list[Fill] = []
    for n, event in enumerate(script, start=1):
        if isinstance(event, FillEvent):
            f = to_fill(event, n)
            assert ledger.apply_fill(f) is FillOutcome.APPLIED
            reference.fill(f)
            sent.append(f)
        elif isinstance(event, TickEvent):
            t = to_tick(event, n)
            ledger.apply_tick(t)
            reference.last_tick[t.instrument] = t
        elif isinstance(event, Redeliver) and sent:
            assert ledger.apply_fill(sent[event.which % len(sent)]) is FillOutcome.DUPLICATE
        elif isinstance(event, Restart):
            before = ledger.snapshot(0, 0.0, 1.0)
            ledger = Ledger.from_state(json.loads(json.dumps(ledger.to_state())), cfg)
            assert ledger.snapshot(0, 0.0, 1.0) == before

    snap = ledger.snapshot(1, float(len(script) + 1), 1e9)
    expected = {name: reference.position(name) for name in reference.trades}
    scale = reference.notional
    assert {p.instrument for p in snap.positions} == set(expected)
    for row in snap.positions:
        want = expected[row.instrument]
        for key, value in want.items():
            got = getattr(row, key)
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
