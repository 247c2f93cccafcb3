"""Rounding to the tick: the float short cut gives exactly what the decimal path gives.

`plan.round_to_tick` and `plan.scaled_to_tick` answer in floats when `value / tick` lies clearly
between two whole numbers, and in decimal otherwise. The reference here is the decimal rule written
out again (not the module's own decimal function): the value as its shortest repr, divided by the
tick as its repr, rounded up or down to a whole number of ticks, times the tick.
"""

from __future__ import annotations

from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from hypothesis import example, given
from hypothesis import strategies as st

from services.common.contracts import Side
from services.executor.plan import close_price, index_bound, round_to_tick, scaled_to_tick

THALEX_TICKS = [0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 0.00001, 0.05, 0.25]
TICKS = st.one_of(
    st.sampled_from(THALEX_TICKS),
    st.builds(lambda digits, places: float(Decimal(digits).scaleb(-places)),
              st.integers(1, 999), st.integers(0, 8)),
    # no exchange lists such ticks, but the short cut must hand them over, not get them wrong
    st.builds(lambda digits, places: float(Decimal(digits).scaleb(-places)),
              st.integers(1, 10**10), st.integers(0, 12)),
)
VALUES = st.one_of(st.floats(min_value=0.0, max_value=1e7, allow_nan=False, allow_infinity=False),
                   st.floats(min_value=-1e15, max_value=1e15, allow_nan=False, allow_infinity=False))
NEAR = st.floats(min_value=-1e-6, max_value=1e-6, allow_nan=False)
"""How far off a multiple of the tick a value is made to lie: the cases the short cut must hand over."""


def decimal_rule(exact: Decimal, tick: float, up: bool) -> float:
    whole = (exact / Decimal(repr(tick))).to_integral_value(rounding=ROUND_CEILING if up else ROUND_FLOOR)
    return float(whole * Decimal(repr(tick)))


def test_hand_worked_examples() -> None:
    # 99,837.4 / 5 = 19,967.48 ticks: down 19,967 x 5 = 99,835; up 19,968 x 5 = 99,840 (the short cut)
    assert round_to_tick(99_837.4, 5.0, up=False) == 99_835.0
    assert round_to_tick(99_837.4, 5.0, up=True) == 99_840.0
    # 0.1 + 0.2 = 0.30000000000000004 is 3.0000000000000004 ticks of 0.1 (near a whole number: the
    # decimal path decides): down 3 x 0.1 = 0.3, up 4 x 0.1 = 0.4
    assert round_to_tick(0.1 + 0.2, 0.1, up=False) == 0.3
    assert round_to_tick(0.1 + 0.2, 0.1, up=True) == 0.4
    # an amount with the executor's EPS (1e-12): 0.100000000001 / 0.01 = 10.0000000001 ticks, clear
    # of 10 by 1e-10 > 1e-12 x 10: the short cut floors it to 10 x 0.01 = 0.1
    assert round_to_tick(0.1 + 1e-12, 0.01, up=False) == 0.1
    # a sell 0.5 % through a best bid of 1,234.5 on a 0.5 tick: 1,234.5 x 0.995 = 1,228.3275, i.e.
    # 2,456.655 ticks, up to 2,457 x 0.5 = 1,228.5
    assert scaled_to_tick(1_234.5, -0.005, 0.5, up=True) == 1_228.5
    assert close_price(Side.SELL, 1_234.5, 0.005, 0.5) == 1_228.5
    # a buy 10 % above an index of 3,333.3 on a 0.5 tick: 3,666.63 = 7,333.26 ticks, down to 3,666.5
    assert index_bound(Side.BUY, 9_999.0, 3_333.3, 0.1, 0.5) == 3_666.5


@given(value=VALUES, tick=TICKS, up=st.booleans())
@example(value=0.30000000000000004, tick=0.1, up=True)
@example(value=1e-300, tick=0.01, up=True)
@example(value=515627.8142439639, tick=0.1234567891, up=False)  # the exact multiple needs 54 bits
@example(value=304897.7997192625, tick=1.2345678901, up=False)
def test_any_value_rounds_as_the_decimal_rule(value: float, tick: float, up: bool) -> None:
    assert round_to_tick(value, tick, up=up) == decimal_rule(Decimal(repr(value)), tick, up)


@given(whole=st.integers(0, 10**9), off=NEAR, tick=TICKS, up=st.booleans())
def test_values_on_or_near_a_tick_round_as_the_decimal_rule(whole: int, off: float, tick: float,
                                                            up: bool) -> None:
    value = abs(whole * tick + off * tick)
    assert round_to_tick(value, tick, up=up) == decimal_rule(Decimal(repr(value)), tick, up)


@given(value=VALUES, change=st.floats(min_value=-1.0, max_value=1.0, allow_nan=False), tick=TICKS,
       up=st.booleans())
@example(value=1_234.5, change=-0.005, tick=0.5, up=True)
@example(value=1e10, change=-0.99999999, tick=1.0, up=True)  # 1 + change is far from exact in floats
def test_a_scaled_value_rounds_as_the_decimal_product(value: float, change: float, tick: float,
                                                      up: bool) -> None:
    exact = Decimal(repr(value)) * (1 + Decimal(repr(change)))
    assert scaled_to_tick(value, change, tick, up=up) == decimal_rule(exact, tick, up)


@given(whole=st.integers(1, 10**7), buffer=st.sampled_from([0.0, 0.001, 0.005, 0.01, 0.05, 0.1]),
       tick=TICKS, up=st.booleans())
def test_a_best_price_on_the_tick_scaled_by_a_round_buffer_rounds_as_the_decimal_product(
        whole: int, buffer: float, tick: float, up: bool) -> None:
    best = float(whole * Decimal(repr(tick)))  # a real best price is on the tick
    for change in (buffer, -buffer):
        exact = Decimal(repr(best)) * (1 + Decimal(repr(change)))
        assert scaled_to_tick(best, change, tick, up=up) == decimal_rule(exact, tick, up)
