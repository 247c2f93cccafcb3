"""The index bound on a close's price (issue 21, item 5): by hand, as a property, and on the paper.

Seen before the fix: with the paper's BTC-PERPETUAL mark pinned at 0.5 (index 100,000), the
executor sent ~100 IOC sells priced at 1.0 USD in 6 s — it priced through whatever the ticker and
book said, with nothing sane to compare them with.
"""

from __future__ import annotations

import math
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from services.common.contracts import InstrumentInfo, InstrumentType, ReportStatus, Side
from services.common.streams import Names
from services.executor.plan import index_bound
from services.executor.waves import Quote, wave_price
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    PERP,
    TRADER,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    send,
    wait_outcome,
)


def info(kind: InstrumentType, tick: float = 1.0) -> InstrumentInfo:
    return InstrumentInfo(type=kind, product="FBTCUSD", underlying="BTCUSD", tick_size=tick,
                          volume_tick_size=0.001, min_order_amount=0.001)


def test_a_sell_is_never_below_the_index_less_the_deviation_by_hand() -> None:
    # the probe: best bid 1.0 (mark pinned at 0.5), index 100,000, d = 0.1
    # floor = 100,000 × (1 − 0.1) = 90,000 (on the 1.0 tick already) > 1.0 → 90,000
    assert index_bound(Side.SELL, 1.0, 100_000, 0.1, 1.0) == 90_000
    # a sane sell, 99,500 (0.5 % through a 100,000 bid), is above the floor: unchanged
    assert index_bound(Side.SELL, 99_500, 100_000, 0.1, 1.0) == 99_500
    # ETH, tick 0.5: 3,333.3 × 0.9 = 2,999.97 → rounded UP to the tick: 3,000.0 (never below the floor)
    assert index_bound(Side.SELL, 100.0, 3_333.3, 0.1, 0.5) == 3_000.0


def test_a_buy_is_never_above_the_index_plus_the_deviation_by_hand() -> None:
    # a mark pinned at 200,000: cap = 100,000 × 1.1 = 110,000 < 200,000 → 110,000
    assert index_bound(Side.BUY, 200_000, 100_000, 0.1, 1.0) == 110_000
    assert index_bound(Side.BUY, 100_500, 100_000, 0.1, 1.0) == 100_500
    # 3,333.3 × 1.1 = 3,666.63 → rounded DOWN to the 0.5 tick: 3,666.5 (never above the cap)
    assert index_bound(Side.BUY, 9_999.0, 3_333.3, 0.1, 0.5) == 3_666.5
    # an index so small the cap rounds to 0: still one tick (Thalex refuses a price of 0)
    assert index_bound(Side.BUY, 5.0, 0.2, 0.1, 1.0) == 1.0


def test_without_an_index_the_price_is_left_alone() -> None:
    assert index_bound(Side.SELL, 1.0, None, 0.1, 1.0) == 1.0
    assert index_bound(Side.BUY, 1.0, 0.0, 0.1, 1.0) == 1.0


def test_only_perpetuals_and_futures_are_bounded_by_the_index() -> None:
    # best bid 1.0, buffer 0.005: 1.0 × 0.995 = 0.995 → rounded up to the tick: 1.0
    glitch = Quote(mark=0.5, best_bid=1.0, best_ask=2.0, delta=1.0, index=100_000)
    assert wave_price(Side.SELL, glitch, info(InstrumentType.PERPETUAL), 0.005, 0.1) == 90_000
    assert wave_price(Side.SELL, glitch, info(InstrumentType.FUTURE), 0.005, 0.1) == 90_000
    # an option's ticker carries the underlying's index, which is not the option's price
    option = Quote(mark=0.5, best_bid=1.0, best_ask=2.0, delta=0.3, index=100_000)
    assert wave_price(Side.SELL, option, info(InstrumentType.OPTION), 0.005, 0.1) == 1.0


PRICES = st.floats(min_value=0.5, max_value=500_000, allow_nan=False)


@given(side=st.sampled_from(Side), price=PRICES, index=PRICES, deviation=st.floats(0.001, 0.5),
       tick=st.sampled_from([0.0001, 0.01, 0.5, 1.0, 5.0]))
def test_the_bound_against_an_independent_recomputation(side: Side, price: float, index: float,
                                                        deviation: float, tick: float) -> None:
    got = index_bound(side, price, index, deviation, tick)
    # recomputed in exact fractions from the decimal text of each figure
    p, i, d, t = (Fraction(repr(x)) for x in (price, index, deviation, tick))
    if side is Side.SELL:
        floor = math.ceil(i * (1 - d) / t) * t
        expected = max(p, floor)
        assert got >= float(i * (1 - d)) * (1 - 1e-12)  # never below the floor
    else:
        cap = max(t, math.floor(i * (1 + d) / t) * t)
        expected = min(p, cap)
        assert got <= max(float(i * (1 + d)), float(t)) * (1 + 1e-12)  # never above the cap
    assert math.isclose(got, float(expected), rel_tol=1e-12)


async def test_a_mark_pinned_absurdly_never_sells_at_a_dollar(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.01})
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 0.5})
    await paper.control("paper/set_book", {"instrument_name": PERP, "levels": 5, "level_amount": 1.0,
                                           "growth": 0.0})  # the book follows the glitching mark
    command = make_command({PERP: 0.01}, deadline=2.0)
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, within=10)
    rows = (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"]
    prices = [row["params"]["price"] for row in rows if row["method"] == "private/insert"]
    assert prices, "the executor sent nothing at all"
    assert min(prices) >= 90_000, prices  # 100,000 × (1 − 0.1)
    assert got[-1].status is ReportStatus.FAILED, got[-1]
    assert account_positions(paper)[PERP] == 0.01  # not given away
