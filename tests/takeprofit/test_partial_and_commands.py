"""Partial take profit keeps hedge ratios; the command is built from the decision alone."""

from __future__ import annotations

import pytest

from services.common.contracts import CloseReason, HedgeGroup, InstrumentType, LegToClose
from services.takeprofit.rules import RulesEngine, Skip, build_command

from .factories import NOW, cfg, pos, snap


def hedged_book() -> list:
    """Long 1 BTC-PERPETUAL hedged by 10 short BTC calls, plus an unrelated ETH leg."""
    return [
        pos("BTC-PERPETUAL", 1.0),
        pos("BTC-27JUN25-100000-C", -10.0, instrument_type=InstrumentType.OPTION, expiry_ts=NOW + 90 * 86400),
        pos("ETH-PERPETUAL", -2.0, underlying="ETHUSD"),
    ]


def test_partial_fires_once_per_epoch_keeps_hedge_ratios_and_fires_again_next_epoch() -> None:
    engine = RulesEngine(cfg(partial_close_fraction=0.25))
    decision = engine.on_snapshot(snap(1, 0.7, positions=hedged_book()), NOW)
    assert decision is not None and decision.reason is CloseReason.PARTIAL_TAKE_PROFIT
    assert decision.positions == (  # each carries the exit price and mark it was valued at (the factory's)
        LegToClose("BTC-PERPETUAL", 0.25, 100.0, 100.0, None),
        LegToClose("BTC-27JUN25-100000-C", -2.5, 100.0, 100.0, None),
        LegToClose("ETH-PERPETUAL", -0.5, 100.0, 100.0, None),
    )
    assert decision.groups == (
        HedgeGroup(underlying="BTCUSD", instruments=["BTC-PERPETUAL", "BTC-27JUN25-100000-C"]),
    )
    command = build_command(decision, NOW, 30.0)
    assert command.fraction == 0.25 and command.groups == list(decision.groups)

    engine.on_closure_finished(decision.command_id, completed=True, now=NOW)
    assert engine.on_snapshot(snap(2, 0.8, positions=hedged_book()), NOW + 60) is None
    assert engine.last_skip is Skip.NO_BARRIER, "once per epoch, even after it completed"
    again = engine.on_snapshot(snap(3, 0.8, epoch=2, positions=hedged_book()), NOW + 60)
    assert again is not None and again.reason is CloseReason.PARTIAL_TAKE_PROFIT
    assert again.command_id == "e2-partial_take_profit-s3-n1"


def test_a_full_closure_lists_every_position_signed_like_the_position() -> None:
    decision = RulesEngine(cfg()).on_snapshot(snap(7, 1.1, positions=hedged_book()), NOW)
    command = build_command(decision, NOW + 1, 30.0)
    assert command.reason is CloseReason.TAKE_PROFIT and command.fraction == 1.0
    assert [(p.instrument, p.amount) for p in command.closing().rows()] == [
        ("BTC-PERPETUAL", 1.0),
        ("BTC-27JUN25-100000-C", -10.0),
        ("ETH-PERPETUAL", -2.0),
    ]
    assert command.command_id == decision.command_id == "e1-take_profit-s7-n1"
    assert (command.snapshot_seq, command.net_pnl, command.threshold) == (7, 1.1, 1.1)
    assert (command.created_ts, command.deadline_ts) == (NOW + 1, NOW + 31)


def test_a_command_says_whether_the_decision_book_held_each_leg_whole() -> None:
    """The executor sends a hedged book's first wave from the command only when it did (issue 22)."""
    book = [p.model_copy(update={"exit_within_depth": p.instrument != "ETH-PERPETUAL"})
            for p in hedged_book()]
    decision = RulesEngine(cfg()).on_snapshot(snap(7, 1.1, positions=book), NOW)
    assert decision is not None
    assert [(p.instrument, p.exit_within_depth) for p in decision.positions] == [
        ("BTC-PERPETUAL", True), ("BTC-27JUN25-100000-C", True), ("ETH-PERPETUAL", False)]


def test_flat_positions_are_not_listed_and_a_flat_book_decides_nothing() -> None:
    decision = RulesEngine(cfg()).on_snapshot(snap(1, 2.0, positions=[pos(), pos("ETH-PERPETUAL", 0.0)]), NOW)
    assert [p.instrument for p in decision.positions] == ["BTC-PERPETUAL"]
    engine = RulesEngine(cfg())
    assert engine.on_snapshot(snap(1, -20.0, positions=[pos(position=0.0)]), NOW) is None
    assert engine.last_skip is Skip.NO_POSITIONS


def test_without_correlation_check_no_groups_are_listed() -> None:
    engine = RulesEngine(cfg(position_correlation_check=False))
    decision = engine.on_snapshot(snap(1, 0.6, positions=hedged_book()), NOW)
    assert decision.groups == () and build_command(decision, NOW, 30.0).groups is None


def test_volume_ticks_round_a_partial_toward_zero_and_never_leave_a_hedge_one_legged() -> None:
    book = [
        pos("BTC-PERPETUAL", 0.0123),
        pos("BTC-OPT", -0.01, instrument_type=InstrumentType.OPTION),
        pos("ETH-PERPETUAL", -2.0, underlying="ETHUSD"),
        pos("SOL-PERPETUAL", 3.3, underlying="SOLUSD"),
    ]
    ticks = {"BTC-PERPETUAL": 0.0001, "BTC-OPT": 0.01, "ETH-PERPETUAL": 0.001, "SOL-PERPETUAL": 0.1}
    decision = RulesEngine(cfg()).on_snapshot(snap(1, 0.6, positions=book), NOW)
    command = build_command(decision, NOW, 30.0, volume_ticks=ticks)
    # BTC-OPT: -0.005 rounds to zero, so its whole BTC group stays open.
    assert [(p.instrument, p.amount) for p in command.closing().rows()] == [
        ("ETH-PERPETUAL", -1.0),
        ("SOL-PERPETUAL", 1.6),
    ]
    assert command.groups is None

    loose = RulesEngine(cfg(position_correlation_check=False)).on_snapshot(snap(1, 0.6, positions=book), NOW)
    built = build_command(loose, NOW, 30.0, volume_ticks=ticks)
    amounts = dict(zip(built.closing().instrument, built.closing().amount, strict=True))
    assert amounts == {"BTC-PERPETUAL": 0.0061, "ETH-PERPETUAL": -1.0, "SOL-PERPETUAL": 1.6}


def test_a_full_close_is_never_rounded_and_nothing_left_is_an_error() -> None:
    full = RulesEngine(cfg()).on_snapshot(snap(1, 5.0, positions=[pos(position=0.01234)]), NOW)
    assert (
        build_command(full, NOW, 30.0, volume_ticks={"BTC-PERPETUAL": 0.001}).closing().amount[0] == 0.01234
    )
    tiny = RulesEngine(cfg()).on_snapshot(snap(1, 0.6, positions=[pos(position=0.001)]), NOW)
    with pytest.raises(ValueError, match="rounds to zero"):
        build_command(tiny, NOW, 30.0, volume_ticks={"BTC-PERPETUAL": 0.001})


def test_a_dropped_partial_starts_no_cool_down_and_the_emergency_stop_stays_armed() -> None:
    """A partial of a 0.1-lot book rounds every leg to nothing: no command goes out, so nothing may
    start — no cool-down holding the emergency stop, no halt telling the quoters to stand down."""
    engine = RulesEngine(cfg(cooldown_seconds=30.0))
    partial = engine.on_snapshot(snap(1, 0.6, positions=[pos(position=0.1)]), NOW)
    assert partial is not None and partial.reason is CloseReason.PARTIAL_TAKE_PROFIT
    with pytest.raises(ValueError, match="rounds to zero"):  # 0.05 at a volume tick of 0.1
        build_command(partial, NOW, 30.0, volume_ticks={"BTC-PERPETUAL": 0.1})
    assert engine.on_decision_dropped(partial.command_id)
    assert engine.in_flight is None and engine.halt_document(NOW + 1) is None
    book = [pos(position=0.1)]
    assert engine.on_snapshot(snap(2, 0.7, positions=book), NOW + 2) is None  # fired for this epoch
    emergency = engine.on_snapshot(snap(3, -50.0, positions=book), NOW + 4)  # 4 s later, not 30
    assert emergency is not None and emergency.reason is CloseReason.EMERGENCY_STOP
    assert not engine.on_decision_dropped("e1-partial_take_profit-s1-n1")  # not in flight: nothing


def test_a_closure_that_failed_still_starts_the_cool_down() -> None:
    """Unlike a dropped decision, a failed closure reached the exchange: its retry waits the cool-down."""
    engine = RulesEngine(cfg(cooldown_seconds=30.0))
    decision = engine.on_snapshot(snap(1, 5.0, positions=[pos(position=0.1)]), NOW)
    assert decision is not None and engine.on_closure_finished(decision.command_id, completed=False, now=NOW)
    assert engine.on_snapshot(snap(2, -50.0, positions=[pos(position=0.1)]), NOW + 4) is None
    assert engine.last_skip is Skip.COOLDOWN
