"""RFQ leg arithmetic: Thalex's minimisation example, the fee-quantity rule worked by hand, leg prices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.paper.rfq_legs import FeeLeg, LegError, fee_quantities, leg_prices, minimise


def test_minimise_reproduces_thalex_example() -> None:
    # thalex.com "Request-for-Quote": 10 / -10 calls and -3.6 perpetual -> 25 / -25 / -9 times 0.4,
    # quotable in 0.004 steps (option volume tick 0.1 then): per leg the size s with s * |q| a multiple of
    # the tick is a multiple of tick / |q|: 0.1 / 25 = 1/250 and 0.0001 / 9 = 1/90000; their least common
    # multiple is lcm(1, 1) / gcd(250, 90000) = 1/250 = 0.004.
    assert minimise([10, -10, -3.6], [0.1, 0.1, 0.0001]) == ([25, -25, -9], 0.4, 0.004)
    # With today's BTC option tick 0.01: 0.01 / 25 = 1/2500 -> 1 / gcd(2500, 90000) = 0.0004.
    assert minimise([10, -10, -3.6], [0.01, 0.01, 0.0001]) == ([25, -25, -9], 0.4, 0.0004)
    # A call spread hedged with half a perpetual: gcd(1, 1, 0.5) = 0.5 -> 2 / -2 / -1; 0.01 / 2 = 1/200 and
    # 0.0001 / 1 = 1/10000 -> 1 / gcd(200, 10000) = 0.005.
    assert minimise([1, -1, -0.5], [0.01, 0.01, 0.0001]) == ([2, -2, -1], 0.5, 0.005)
    assert minimise([0.3], [0.0001]) == ([1], 0.3, 0.0001)


def test_minimise_refuses_more_than_six_decimals_and_zero_legs() -> None:
    with pytest.raises(LegError):
        minimise([0.0000001], [0.0000001])
    with pytest.raises(LegError):
        minimise([1, 0], [0.01, 0.01])


def _option(quantity: int, delta: float, fee: float = 25.0, underlying: str = "BTCUSD") -> FeeLeg:
    return FeeLeg(underlying, True, quantity, delta, fee)


def _future(quantity: int, underlying: str = "BTCUSD") -> FeeLeg:
    return FeeLeg(underlying, False, quantity, 1.0, 50.0)


def test_fee_quantities_worked_by_hand() -> None:
    # Call spread +2 (delta .6) / -2 (delta .4) with -1 perpetual:
    #   spread: opposite options, .6 - .4 = .2 within [-1, 1] -> 2 matched, the later (equal fee) leg free;
    #   hedge: net option delta 2 * .6 - 2 * .4 = .4, the short perpetual is free for .4 of its 1 -> .6 pays.
    assert fee_quantities([_option(2, 0.6), _option(-2, 0.4), _future(-1)]) == [2.0, 0.0, 0.6]
    # Straddle (two long options): no discount.
    assert fee_quantities([_option(1, 0.5), _option(1, -0.5)]) == [1.0, 1.0]
    # Synthetic at one strike: long call .55, short put (-.45 -> +.45 short) sum 1.0 -> one leg pays.
    assert fee_quantities([_option(1, 0.55), _option(-1, -0.45)]) == [1.0, 0.0]
    # Both in the money (.8 and -.7 -> 1.5): no discount.
    assert fee_quantities([_option(1, 0.8), _option(-1, -0.7)]) == [1.0, 1.0]
    # Hedged call: free up to the call's delta .5; long call with a long future: nothing free.
    assert fee_quantities([_option(1, 0.5), _future(-1)]) == [1.0, 0.5]
    assert fee_quantities([_option(1, 0.5), _future(1)]) == [1.0, 1.0]
    # A roll (future against perpetual) pays one leg; legs of different underlyings never pair.
    assert fee_quantities([_future(1), _future(-1)]) == [1.0, 0.0]
    assert fee_quantities([_future(1), _future(-1, "ETHUSD")]) == [1.0, 1.0]
    # Of a spread the cheaper leg is the free one: 3 vs 1 contracts -> 1 matched on the cheap short leg.
    assert fee_quantities([_option(3, 0.6, fee=25.0), _option(-1, 0.2, fee=4.0)]) == [3.0, 0.0]


def test_leg_prices_share_the_difference_to_the_marks_by_notional() -> None:
    # Legs 2 x 5000, -2 x 2000, -1 x 100000: at the marks the package is 10000 - 4000 - 100000 = -94000.
    # Traded at -93000: R = 1000, N = 10000 + 4000 + 100000 = 114000, each leg moves by R / N = 0.877 % in its
    # favour: 5000 * 1.00877.. = 5043.86, 2000 * 0.99123.. = 1982.46, 100000 * 0.99123.. = 99122.81.
    prices = leg_prices([2, -2, -1], [5000, 2000, 100000], -93000)
    assert prices == pytest.approx([5043.8596491, 1982.4561404, 99122.8070175])
    assert 2 * prices[0] - 2 * prices[1] - prices[2] == pytest.approx(-93000)
    assert leg_prices([1, -1], [300.0, 100.0], 200.0) == [300.0, 100.0]


@settings(max_examples=200, deadline=None)
@given(
    legs=st.lists(
        st.tuples(st.integers(-30, 30).filter(bool), st.floats(1, 200_000, allow_nan=False)),
        min_size=1,
        max_size=4,
    ),
    shift=st.floats(-0.5, 0.5),
)
def test_leg_prices_always_add_up_to_the_combination_price(
    legs: list[tuple[int, float]], shift: float
) -> None:
    quantities, marks = [q for q, _ in legs], [m for _, m in legs]
    value = sum(q * m for q, m in legs)
    notional = sum(abs(q) * m for q, m in legs)
    price = value + shift * notional  # at most half the notional away: every leg stays positive
    prices = leg_prices(quantities, marks, price)
    assert sum(q * p for q, p in zip(quantities, prices, strict=True)) == pytest.approx(
        price, rel=1e-9, abs=1e-4
    )
    assert all(p > 0 for p in prices)
