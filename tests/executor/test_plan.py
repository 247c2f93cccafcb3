"""The executor's pure core: prices, amounts, hedge sizing, labels, the progress state machine and
when a command is too late to act on."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from services.common.contracts import InstrumentInfo, InstrumentType, ReportStatus, Side
from services.executor.plan import (
    MAX_LABEL_BYTES,
    ErrorAction,
    HedgeLeg,
    IllegalTransition,
    LegFill,
    Progress,
    Stage,
    action_for,
    book_depth,
    close_price,
    command_label,
    decision_order,
    hedge_wave,
    lead_first,
    net_exposure,
    order_amount,
    reference_price,
    round_to_tick,
    too_late,
)
from tests.executor.conftest import make_command

TICKS = st.sampled_from([0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0])
PRICES = st.floats(min_value=0.01, max_value=200_000, allow_nan=False)
BUFFERS = st.floats(min_value=0.0, max_value=0.5)


def info(tick: float = 1.0, lot: float = 0.001, minimum: float | None = None) -> InstrumentInfo:
    return InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                          tick_size=tick, volume_tick_size=lot, min_order_amount=minimum or lot)


def on_tick(value: float, tick: float) -> bool:
    return abs(value / tick - round(value / tick)) < 1e-6


def test_close_price_goes_through_the_book_by_the_buffer() -> None:
    assert close_price(Side.SELL, 100_000, 0.005, 1.0) == 99_500
    assert close_price(Side.BUY, 100_000, 0.005, 1.0) == 100_500
    assert close_price(Side.SELL, 100.3, 0.0, 0.5) == 100.5  # never below what the buffer allows
    assert close_price(Side.BUY, 0.2, 0.005, 5.0) == 5.0  # a price is at least one tick


def test_reference_is_the_best_opposite_price_or_mark_when_that_side_is_empty() -> None:
    assert reference_price(Side.SELL, 99.0, 101.0, 100.0) == 99.0
    assert reference_price(Side.BUY, 99.0, 101.0, 100.0) == 101.0
    assert reference_price(Side.SELL, None, 101.0, 100.0) == 100.0


@given(reference=PRICES, buffer=BUFFERS, tick=TICKS)
def test_a_sell_is_never_priced_below_what_the_buffer_allows(
    reference: float, buffer: float, tick: float
) -> None:
    price = close_price(Side.SELL, reference, buffer, tick)
    assert on_tick(price, tick)
    assert price >= reference * (1 - buffer) - 1e-9 * reference
    assert price >= tick
    best = round_to_tick(reference, tick, up=False)  # a real best bid is on the tick
    if best >= tick:
        assert close_price(Side.SELL, best, buffer, tick) <= best  # still reaches the best bid


@given(reference=PRICES, buffer=BUFFERS, tick=TICKS)
def test_a_buy_is_never_priced_above_what_the_buffer_allows(
    reference: float, buffer: float, tick: float
) -> None:
    price = close_price(Side.BUY, reference, buffer, tick)
    assert on_tick(price, tick)
    assert price <= max(tick, reference * (1 + buffer) + 1e-9 * reference)
    best = round_to_tick(reference, tick, up=True)
    assert close_price(Side.BUY, best, buffer, tick) >= best


@given(
    remaining=st.floats(-50, 50),
    position=st.floats(-50, 50),
    lot=st.sampled_from([0.0001, 0.001, 0.01, 0.1]),
    minimum_lots=st.integers(1, 10),
)
def test_an_order_never_exceeds_the_position_nor_the_remainder(remaining: float, position: float, lot: float,
                                                                  minimum_lots: int) -> None:
    spec = info(lot=lot, minimum=lot * minimum_lots)
    amount = order_amount(remaining, position, spec)
    assert amount >= 0
    assert amount <= abs(position) + 1e-12 and amount <= abs(remaining) + 1e-12
    if amount:
        assert remaining * position > 0 and on_tick(amount, lot) and amount >= spec.min_order_amount - 1e-12


def test_a_remainder_below_the_minimum_is_not_sent() -> None:
    assert order_amount(0.00005, 0.00005, info(lot=0.0001)) == 0.0
    assert order_amount(0.3, 1.0, info(lot=0.1, minimum=0.5)) == 0.0
    assert order_amount(0.30000000000000004, 1.0, info(lot=0.1)) == 0.3
    assert order_amount(-0.5, 0.5, info()) == 0.0  # the position flipped: nothing to reduce


def test_a_decision_order_is_the_listed_amount_priced_through_the_decisions_exit() -> None:
    # long 0.5053 on a 0.001 lot: sell 0.505 (down to the lot); exit 99,990.4 with a 0.5 % buffer:
    # 99,990.4 x 0.995 = 99,490.448, a sell rounds up to the 1.0 tick: 99,491
    assert decision_order(0.5053, 99_990.4, 0.005, info()) == (Side.SELL, 0.505, 99_491.0)
    # short 2 at an exit of 1,234: buy 2 at 1,234 x 1.005 = 1,240.17, a buy rounds down: 1,240
    assert decision_order(-2.0, 1_234.0, 0.005, info()) == (Side.BUY, 2.0, 1_240.0)
    # below the minimum or without a price: not decided here (the usual waves handle the leg)
    assert decision_order(0.0004, 100.0, 0.005, info()) is None
    assert decision_order(1.0, 0.0, 0.005, info()) is None


def test_book_depth_counts_levels_a_limit_reaches() -> None:
    bids = [[100.0, 1.0], [99.0, 2.0], [98.0, 3.0]]
    assert book_depth(bids, Side.SELL, 99.0) == 3.0
    assert book_depth([[101.0, 1.0], [102.0, 2.0]], Side.BUY, 101.5) == 1.0


def test_labels_fit_thalex_and_differ_per_command() -> None:
    label = command_label("x" * 500)
    assert len(label.encode()) <= MAX_LABEL_BYTES and label.startswith("tp-")
    assert command_label("a") != command_label("b") and command_label("a") == command_label("a")


def test_error_codes_map_to_actions() -> None:
    assert action_for(4) is action_for(20) is ErrorAction.BACK_OFF
    assert action_for(41) is action_for(43) is ErrorAction.WIDEN
    assert action_for(37) is ErrorAction.CHECK_FLAT
    assert action_for(24) is action_for(28) is ErrorAction.STOP_LEG


def test_hedge_wave_closes_everything_when_the_book_can_take_it() -> None:
    legs = [HedgeLeg("PERP", 1.0, 1.0, None, 0.0001), HedgeLeg("FUT", -0.9, 1.0, None, 0.0001)]
    assert hedge_wave(legs, 0.1) == {"PERP": 1.0, "FUT": 0.9}
    assert lead_first(legs) == ["PERP", "FUT"]


def test_hedge_wave_reduces_the_larger_side_first_when_liquidity_is_short() -> None:
    legs = [HedgeLeg("PERP", 1.0, 1.0, 0.3, 0.0001), HedgeLeg("FUT", -0.4, 1.0, 1.0, 0.0001)]
    amounts = hedge_wave(legs, 0.6)
    assert amounts["PERP"] == pytest.approx(0.3) and amounts["FUT"] == pytest.approx(0.3)
    legs = [HedgeLeg("PERP", 1.0, 1.0, 1.0, 0.0001), HedgeLeg("FUT", -0.9, 1.0, 0.2, 0.0001)]
    assert hedge_wave(legs, 0.1) == {"PERP": pytest.approx(0.4), "FUT": pytest.approx(0.2)}


LEG = st.tuples(st.floats(-5, 5).filter(lambda x: abs(x) > 1e-3), st.floats(-1, 1),
                st.one_of(st.none(), st.floats(0, 5)))


@settings(max_examples=300)
@given(legs=st.lists(LEG, min_size=1, max_size=6), slack=st.floats(0, 1))
def test_hedge_wave_never_increases_net_delta_past_the_decision(legs: list[tuple[float, float, float | None]],
                                                                slack: float) -> None:
    hedge = [HedgeLeg(f"I{n}", r, d, f, 0.0) for n, (r, d, f) in enumerate(legs)]
    exposure = net_exposure(hedge)
    bound = abs(exposure) + slack
    amounts = hedge_wave(hedge, bound)
    after = exposure
    for leg in hedge:
        amount = amounts.get(leg.instrument, 0.0)
        assert 0 <= amount <= abs(leg.remaining) + 1e-9
        if leg.fillable is not None:
            assert amount <= leg.fillable + 1e-9
        after -= math.copysign(amount, leg.remaining) * leg.delta
    assert abs(after) <= bound + 1e-9
    if all(leg.fillable is None for leg in hedge):
        assume(any(abs(leg.delta) > 1e-9 for leg in hedge))
        assert abs(after) <= 1e-9  # everything can go at once: it all goes


def test_progress_state_machine_and_json_round_trip() -> None:
    command = make_command({"BTC-PERPETUAL": 0.5, "BTC-FUT": -0.2}, fraction=0.5)
    progress = Progress.start(command, command.created_ts, 0.005, 30.0)
    assert progress.stage is Stage.RECEIVED and progress.deadline_ts <= command.deadline_ts
    with pytest.raises(IllegalTransition):
        progress.to(Stage.COMPLETED)
    progress.to(Stage.ORDERS_CANCELLED)
    progress.to(Stage.CLOSING)
    assert progress.record_fill("BTC-PERPETUAL", "t1", LegFill(order_id="o1", price=100.0, amount=0.2))
    assert not progress.record_fill("BTC-PERPETUAL", "t1", LegFill(order_id="o1", price=100.0, amount=0.2,
                                                                     fee=0.01))
    leg = progress.legs["BTC-PERPETUAL"]
    assert leg.closed == 0.2 and leg.fee == 0.01 and leg.avg_price == 100.0
    leg.position_before = 1.0
    assert leg.remaining(0.8, full=False) == pytest.approx(0.3)  # never re-sends what was filled
    assert leg.remaining(0.5, full=False) == 0.0
    assert leg.remaining(0.1, full=False) == 0.0
    assert leg.remaining(0.8, full=True) == 0.8
    again = Progress.model_validate_json(progress.model_dump_json())
    assert again == progress and again.report(ReportStatus.FILLED, 1.0).epoch == 3
    progress.to(Stage.VERIFYING)
    progress.to(Stage.COMPLETED)
    assert progress.terminal


def test_a_command_read_after_its_deadline_is_too_late_to_act_on_and_the_reason_says_how_late() -> None:
    """Read an hour after its decision: the deadline is the command's (capping it at the start by
    `deadline_seconds` cannot move it later), long past. Not a step may start."""
    command = make_command({"BTC-PERPETUAL": 0.5}, age=3600.0, deadline=-3540.0)
    read = command.deadline_ts + 3540.0
    progress = Progress.start(command, read, 0.005, 30.0)
    assert progress.deadline_ts == command.deadline_ts and progress.past_deadline(read)
    assert too_late(progress, read, resumed=False) == (
        "deadline passed before it was handled, 3540.0 s late: nothing was sent to the exchange")
    # in time, to the deadline itself (which counts as passed, as for `settle.next_step`)
    in_time = Progress.start(command.model_copy(update={"deadline_ts": read + 10.0}), read, 0.005, 30.0)
    assert too_late(in_time, read + 9.99, resumed=False) is None and not in_time.past_deadline(read + 9.99)
    assert too_late(in_time, read + 10.0, resumed=False) is not None and in_time.past_deadline(read + 10.0)


def test_a_command_resumed_after_its_deadline_goes_no_further_whatever_its_stage() -> None:
    """Resumed after a restart: what its earlier waves did stays done (the shell still reads what that
    was, and verifies a closure they had closed), nothing new is sent."""
    command = make_command({"BTC-PERPETUAL": 0.5})
    progress = Progress.start(command, command.created_ts, 0.005, 20.0)  # deadline: 15 s after it
    later = progress.deadline_ts + 12.0
    assert too_late(progress, progress.deadline_ts - 1.0, resumed=True) is None
    for stage in (Stage.RECEIVED, Stage.CLOSING, Stage.VERIFYING):
        progress.to(stage)
        assert too_late(progress, later, resumed=True) == (
            "deadline passed before it was resumed, 12.0 s late: no further clearing round or order was sent")
