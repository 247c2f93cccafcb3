"""Property tests of the pure engine: average-cost accounting conserves money."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.paper.engine import Engine
from services.paper.market import Market

PERP = "BTC-PERPETUAL"
fills = st.lists(
    st.tuples(st.sampled_from(["buy", "sell"]), st.integers(1, 30), st.integers(90_000, 110_000)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(fills=fills, mark=st.integers(90_000, 110_000))
def test_realised_plus_unrealised_equals_cash_flows(fills: list[tuple[str, int, int]], mark: int) -> None:
    market = Market(seed=1, now=1_700_000_000.0)
    market.pinned_marks[PERP] = float(mark)
    engine = Engine(market)
    position = 0.0
    cash_flow = 0.0
    for direction, lots, price in fills:
        amount = lots / 10
        engine.direct_trade("k", PERP, direction, amount, float(price), 1_700_000_000.0)
        signed = amount if direction == "buy" else -amount
        position += signed
        cash_flow -= signed * price
    (entry,) = engine.portfolio(engine.accounts["k"])
    # Money identity: what was paid and received plus the position valued at mark is the total P&L.
    assert entry["position"] == pytest.approx(position, abs=1e-9)
    total = entry["realised_pnl"] + entry["unrealised_pnl"]
    assert total == pytest.approx(cash_flow + position * mark, abs=1e-4)
    # Realised P&L never depends on the mark: only closed amounts are realised.
    if abs(position) < 1e-9:
        assert entry["unrealised_pnl"] == 0


@settings(max_examples=100, deadline=None)
@given(fills=fills)
def test_taker_fees_are_five_bps_of_notional(fills: list[tuple[str, int, int]]) -> None:
    market = Market(seed=1, now=1_700_000_000.0)
    engine = Engine(market)
    for direction, lots, price in fills:
        trades, _ = engine.direct_trade("k", PERP, direction, lots / 10, float(price), 1_700_000_000.0)
        (trade,) = trades
        assert trade["fee"] == pytest.approx(0.0005 * price * lots / 10)
        assert trade["maker_taker"] == "taker"
