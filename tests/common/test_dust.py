"""`services.common.dust`: the portfolio's dust is exactly what the executor would send no order for."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from services.common.contracts import InstrumentInfo, InstrumentType
from services.common.dust import closable, is_dust
from services.executor.plan import order_amount

SIZES = [(0.0001, 0.001), (0.001, 0.001), (0.001, 0.01), (0.01, 0.1), (0.1, 0.1), (1.0, 1.0),
         (0.0001, 0.0001), (0.00001, 0.003), (0.5, 2.0)]
"""(volume tick, minimum order) pairs: Thalex's BTC perpetual, equal ones, a minimum of many ticks."""
NOISE = [0.0, 1e-13, -1e-13, 0.3, 0.5, 0.999, -0.3, 1e-9, -1e-9]
"""Ticks off the grid: float noise of a sum of fills, and an RFQ fill well between two ticks."""


def info(volume_tick: float, minimum: float) -> InstrumentInfo:
    return InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                          tick_size=1.0, volume_tick_size=volume_tick, min_order_amount=minimum)


@given(sizes=st.sampled_from(SIZES), ticks=st.integers(0, 40), off=st.sampled_from(NOISE),
       sign=st.sampled_from([1.0, -1.0]))
@example(sizes=(0.0001, 0.001), ticks=5, off=0.0, sign=1.0)  # 0.0005: the dust loop's leftover
@example(sizes=(0.0001, 0.001), ticks=10, off=0.0, sign=-1.0)  # exactly the minimum: closable
def test_closable_agrees_with_the_executors_order_amount(
        sizes: tuple[float, float], ticks: int, off: float, sign: float) -> None:
    """Amounts on the volume-tick grid, a float's noise off it, and well off it (an RFQ fill), near the
    minimum order and far above it: dust iff the executor's `order_amount` sends nothing."""
    volume_tick, minimum = sizes
    spec = info(volume_tick, minimum)
    position = sign * max(0.0, (ticks + off) * volume_tick)
    sent = order_amount(position, position, spec) if position else 0.0
    assert closable(position, spec) is (sent > 0)
    assert is_dust(position, spec) is (position != 0.0 and sent == 0)


@given(amount=st.floats(min_value=1e-9, max_value=1e4, allow_nan=False), sizes=st.sampled_from(SIZES))
@example(amount=0.1005 - 0.1, sizes=(0.0001, 0.001))  # 0.0005000000000000004
@example(amount=0.003 - 0.002, sizes=(0.0001, 0.001))  # 0.0009999999999999998: one minimum order
@example(amount=0.0011 - 0.0001, sizes=(0.0001, 0.001))
def test_closable_agrees_with_the_executor_on_any_amount(amount: float, sizes: tuple[float, float]) -> None:
    spec = info(*sizes)
    assert closable(amount, spec) is (order_amount(amount, amount, spec) > 0)


def test_an_unknown_instrument_is_taken_as_closable_and_flat_is_never_dust() -> None:
    assert closable(0.0005, None) and not is_dust(0.0005, None)
    assert not closable(0.0, info(0.001, 0.001)) and not is_dust(0.0, info(0.001, 0.001))
