"""The guards: one closure in flight, stale prices, confirmation, cool-down, order, epochs, operator."""

from __future__ import annotations

from services.common.contracts import CloseReason, Control, ControlAction
from services.takeprofit.rules import External, GuardState, RulesEngine, Skip

from .factories import NOW, cfg, pos, snap

NO_PARTIAL = {"partial_close_fraction": 0.0}


def control(action: ControlAction) -> Control:
    return Control(action=action, by="alice", ts=NOW)


def test_a_thousand_snapshots_above_target_make_exactly_one_decision() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    lease_held = False
    decisions = []
    for seq in range(1, 1001):
        decision = engine.on_snapshot(snap(seq, 1.5), NOW + seq, External(closure_in_flight=lease_held))
        if decision is not None:
            decisions.append(decision)
            lease_held = True
    assert [d.command_id for d in decisions] == ["e1-take_profit-s1-n1"]
    assert engine.last_skip is Skip.CLOSURE_IN_FLIGHT


def test_the_engine_alone_refuses_a_second_closure_while_one_is_in_flight() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    assert engine.on_snapshot(snap(1, 1.5), NOW) is not None
    assert engine.on_snapshot(snap(2, -20.0), NOW) is None, "not even the emergency stop"
    assert engine.on_control(control(ControlAction.CLOSE_ALL), NOW) is None, "nor close_all"
    assert engine.last_skip is Skip.CLOSURE_IN_FLIGHT


def test_the_redis_lease_alone_is_enough_to_refuse() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    assert engine.on_snapshot(snap(1, -20.0), NOW, External(closure_in_flight=True)) is None
    assert engine.state(NOW, External(closure_in_flight=True)) is GuardState.CLOSURE_IN_FLIGHT


def test_stale_prices_block_the_profit_and_time_barriers() -> None:
    engine = RulesEngine(cfg(max_position_age_hours=1.0))
    assert engine.on_snapshot(snap(1, 5.0, stale=["BTC-PERPETUAL"], oldest=NOW - 7200), NOW) is None
    assert engine.last_skip is Skip.STALE_PRICES
    assert engine.on_timer(NOW + 60) is None and engine.last_skip is Skip.STALE_PRICES


def test_stale_prices_do_not_block_the_emergency_stop_which_says_so() -> None:
    engine = RulesEngine(cfg())
    decision = engine.on_snapshot(snap(1, -12.0, stale=["BTC-PERPETUAL"]), NOW)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    assert decision.stale_instruments == ("BTC-PERPETUAL",)
    assert "BTC-PERPETUAL are stale or suspect: decided on the last known plausible prices" in \
        decision.sentence
    # a stale exit price is not handed to the executor: it prices the first wave from a fresh read
    assert [(p.exit_price, p.mark) for p in decision.positions] == [(None, None)]


def test_a_suspect_price_is_treated_like_a_stale_one() -> None:
    """Issue 21, item 5: the portfolio holds an implausible tick and flags the instrument suspect
    (the snapshot values it at the last plausible prices): no profit barrier fires, the emergency
    stop decides on those prices and says so."""
    engine = RulesEngine(cfg())
    profit = snap(1, 5.0).model_copy(update={"suspect_instruments": ["BTC-PERPETUAL"]})
    assert engine.on_snapshot(profit, NOW) is None and engine.last_skip is Skip.STALE_PRICES
    loss = snap(2, -12.0).model_copy(update={"suspect_instruments": ["BTC-PERPETUAL"]})
    decision = engine.on_snapshot(loss, NOW)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    assert decision.stale_instruments == ("BTC-PERPETUAL",) and "stale or suspect" in decision.sentence


def test_prices_of_a_snapshot_over_a_second_old_are_not_handed_to_the_executor() -> None:
    """The time limit fires from the timer, on the last snapshot, however old it is."""
    engine = RulesEngine(cfg(max_position_age_hours=1.0))
    fresh = engine.on_snapshot(snap(1, 0.0, ts=NOW, oldest=NOW - 7200), NOW + 0.5)
    assert fresh is not None and [(p.exit_price, p.mark) for p in fresh.positions] == [(100.0, 100.0)]
    engine = RulesEngine(cfg(max_position_age_hours=1.0))
    old = engine.on_snapshot(snap(1, 0.0, ts=NOW, oldest=NOW - 7200), NOW + 1.5)
    assert old is not None and [(p.exit_price, p.mark) for p in old.positions] == [(None, None)]


def test_a_stale_instrument_without_a_position_does_not_matter() -> None:
    decision = RulesEngine(cfg(**NO_PARTIAL)).on_snapshot(snap(1, 1.2, stale=["ETH-PERPETUAL"]), NOW)
    assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT


def test_confirm_snapshots_is_hysteresis_against_a_one_tick_spike() -> None:
    engine = RulesEngine(cfg(confirm_snapshots=3, **NO_PARTIAL))
    assert engine.on_snapshot(snap(1, 1.2), NOW) is None
    assert engine.state(NOW) is GuardState.CONFIRMING and engine.last_skip is Skip.CONFIRMING
    assert engine.on_snapshot(snap(2, 1.3), NOW) is None
    assert engine.on_snapshot(snap(3, 1.0), NOW) is None, "the spike lapsed"
    assert engine.state(NOW) is GuardState.IDLE
    assert engine.on_snapshot(snap(4, 1.2), NOW) is None
    assert engine.on_snapshot(snap(5, 1.2, stale=["BTC-PERPETUAL"]), NOW) is None, "stale breaks the run"
    assert engine.on_snapshot(snap(6, 1.2), NOW) is None
    assert engine.on_snapshot(snap(7, 1.2), NOW) is None
    decision = engine.on_snapshot(snap(8, 1.15), NOW)
    assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT
    assert "held 3 snapshots" in decision.sentence


def test_a_confirming_higher_barrier_holds_back_a_confirmed_lower_one() -> None:
    engine = RulesEngine(cfg(confirm_snapshots=2))
    assert engine.on_snapshot(snap(1, 0.6), NOW) is None  # partial 1/2
    assert engine.on_snapshot(snap(2, 1.2), NOW) is None  # partial 2/2, take profit 1/2: wait
    decision = engine.on_snapshot(snap(3, 1.2), NOW)
    assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT


def test_the_emergency_stop_needs_no_confirmation() -> None:
    decision = RulesEngine(cfg(confirm_snapshots=5)).on_snapshot(snap(1, -10.0), NOW)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP


def test_cool_down_after_a_closure_then_a_retry_with_a_new_command_id() -> None:
    engine = RulesEngine(cfg(cooldown_seconds=30.0, **NO_PARTIAL))
    first = engine.on_snapshot(snap(1, 1.5), NOW)
    assert first is not None and engine.state(NOW) is GuardState.CLOSURE_IN_FLIGHT
    assert engine.on_closure_finished(first.command_id, completed=False, now=NOW + 5)
    assert engine.state(NOW + 5) is GuardState.COOLDOWN
    assert engine.on_snapshot(snap(2, 1.5), NOW + 34.9) is None and engine.last_skip is Skip.COOLDOWN
    assert engine.on_snapshot(snap(3, -15.0), NOW + 34.9) is None, (
        "the cool-down brakes the emergency stop too"
    )
    retry = engine.on_snapshot(snap(4, 1.5), NOW + 35)
    assert retry is not None and retry.command_id == "e1-take_profit-s4-n2"
    assert engine.state(NOW + 35) is GuardState.CLOSURE_IN_FLIGHT


def test_a_cool_down_known_only_to_redis_is_respected() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    assert engine.on_snapshot(snap(1, 1.5), NOW, External(cooldown_until=NOW + 1)) is None
    assert engine.last_skip is Skip.COOLDOWN
    assert engine.on_snapshot(snap(2, 1.5), NOW + 1, External(cooldown_until=NOW + 1)) is not None


def test_a_report_for_another_command_changes_nothing() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    decision = engine.on_snapshot(snap(1, 1.5), NOW)
    assert not engine.on_closure_finished("e0-take_profit-s9-n1", completed=True, now=NOW)
    assert engine.in_flight == decision


def test_a_snapshot_older_than_the_last_one_is_ignored() -> None:
    engine = RulesEngine(cfg(confirm_snapshots=2, **NO_PARTIAL))
    assert engine.on_snapshot(snap(10, 1.5, epoch=2), NOW) is None
    for older in (
        snap(10, 1.5, epoch=2),
        snap(9, 1.5, epoch=2),
        snap(11, 1.5, epoch=1),
        snap(12, 1.5, epoch=2, ts=1.0),
    ):
        assert engine.on_snapshot(older, NOW) is None and engine.last_skip is Skip.OUT_OF_ORDER
    assert engine.on_snapshot(snap(11, 1.5, epoch=2), NOW) is not None, (
        "redeliveries did not count as confirmations"
    )


def test_a_completed_full_closure_ends_the_epoch_and_the_next_epoch_starts_afresh() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    decision = engine.on_snapshot(snap(1, 1.5), NOW)
    engine.on_closure_finished(decision.command_id, completed=True, now=NOW)
    assert engine.on_snapshot(snap(2, 1.5), NOW + 60) is None and engine.last_skip is Skip.EPOCH_CLOSED
    assert engine.on_snapshot(snap(3, -11.0), NOW + 60) is None and engine.last_skip is Skip.EPOCH_CLOSED
    assert engine.on_snapshot(snap(4, 0.0, epoch=2, positions=[]), NOW + 60) is None
    assert engine.last_skip is Skip.NO_POSITIONS
    again = engine.on_snapshot(snap(5, 1.5, epoch=2), NOW + 60)
    assert again is not None and again.command_id == "e2-take_profit-s5-n1"


def test_operator_halt_stops_profit_taking_but_not_the_emergency_stop() -> None:
    engine = RulesEngine(cfg(**NO_PARTIAL))
    assert engine.on_control(control(ControlAction.HALT), NOW) is None
    assert engine.state(NOW) is GuardState.OPERATOR_HALT
    halt = engine.halt_document(NOW)
    assert halt is not None and halt.reason == "operator_halt" and halt.until is None
    assert engine.on_snapshot(snap(1, 5.0), NOW) is None and engine.last_skip is Skip.OPERATOR_HALT
    decision = engine.on_snapshot(snap(2, -10.0), NOW)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP and decision.overrode_halt
    assert "overriding the operator halt" in decision.sentence
    assert engine.state(NOW) is GuardState.OPERATOR_HALT, "the halt outranks the closure it let through"
    engine.on_closure_finished(decision.command_id, completed=False, now=NOW)
    engine.on_control(control(ControlAction.RESUME), NOW)
    assert engine.state(NOW) is GuardState.IDLE and engine.halt_document(NOW) is None
    resumed = engine.on_snapshot(snap(3, 5.0), NOW)
    assert resumed is not None and resumed.reason is CloseReason.TAKE_PROFIT


def test_a_total_halt_when_configured() -> None:
    engine = RulesEngine(cfg(), emergency_when_halted=False)
    engine.on_control(control(ControlAction.HALT), NOW)
    assert engine.on_snapshot(snap(1, -50.0), NOW) is None and engine.last_skip is Skip.OPERATOR_HALT
    assert engine.on_snapshot(snap(2, -50.0), NOW, External(halted=True)) is None


def test_close_all_fires_regardless_of_barriers_cool_down_halt_and_stale_prices() -> None:
    engine = RulesEngine(cfg(cooldown_seconds=30.0, **NO_PARTIAL))
    assert engine.on_control(control(ControlAction.CLOSE_ALL), NOW) is None
    assert engine.last_skip is Skip.NO_SNAPSHOT
    first = engine.on_snapshot(snap(1, 1.5), NOW)
    engine.on_closure_finished(first.command_id, completed=False, now=NOW)
    engine.on_control(control(ControlAction.HALT), NOW)
    engine.on_snapshot(snap(2, 0.0, stale=["BTC-PERPETUAL"]), NOW + 1)
    manual = engine.on_control(control(ControlAction.CLOSE_ALL), NOW + 2)
    assert manual is not None and manual.reason is CloseReason.MANUAL and manual.fraction == 1.0
    assert manual.command_id == "e1-manual-s2-n2" and manual.threshold == 0.0
    assert "manual close_all by alice" in manual.sentence and manual.stale_instruments == ("BTC-PERPETUAL",)
    assert engine.on_control(control(ControlAction.CLOSE_ALL), NOW + 3) is None
    assert engine.last_skip is Skip.CLOSURE_IN_FLIGHT


def test_halt_document_follows_the_closure_and_its_cool_down() -> None:
    engine = RulesEngine(cfg(cooldown_seconds=30.0, **NO_PARTIAL))
    assert engine.halt_document(NOW) is None
    decision = engine.on_snapshot(snap(1, 1.5), NOW)
    halt = engine.halt_document(NOW)
    assert halt.command_id == decision.command_id and halt.reason == "take_profit" and halt.until is None
    engine.on_closure_finished(decision.command_id, completed=True, now=NOW + 10)
    assert engine.halt_document(NOW + 10).until == NOW + 40
    assert engine.halt_document(NOW + 40) is None


def test_state_round_trips_through_json_and_a_restart_never_decides_twice() -> None:
    config = cfg(trailing_activation_usd=0.2, trailing_retrace_usd=0.1, confirm_snapshots=2)
    engine = RulesEngine(config)
    engine.on_control(control(ControlAction.HALT), NOW)
    engine.on_snapshot(snap(1, 0.3, positions=[pos(), pos("BTC-OPT", -10.0)]), NOW)
    engine.on_control(control(ControlAction.RESUME), NOW)
    engine.on_snapshot(snap(2, 0.6, positions=[pos(), pos("BTC-OPT", -10.0)]), NOW)
    partial = engine.on_snapshot(snap(3, 0.6, positions=[pos(), pos("BTC-OPT", -10.0)]), NOW)
    assert partial is not None and partial.reason is CloseReason.PARTIAL_TAKE_PROFIT
    checkpoint = engine.to_state()

    restarted = RulesEngine.from_state(config, checkpoint)
    assert restarted.to_state() == engine.to_state()
    assert restarted.in_flight == partial.model_copy(update={"positions": (), "groups": ()}), \
        "the closure in flight survives the restart, without the positions its command carries"
    assert restarted.on_snapshot(snap(3, 0.6), NOW) is None and restarted.last_skip is Skip.OUT_OF_ORDER
    assert restarted.on_snapshot(snap(4, 0.6), NOW) is None and restarted.last_skip is Skip.CLOSURE_IN_FLIGHT
    restarted.on_closure_finished(partial.command_id, completed=True, now=NOW)
    assert restarted.on_snapshot(snap(5, 0.6), NOW) is None, "partial fired already this epoch"
    assert restarted.last_skip is Skip.NO_BARRIER


def test_a_restart_from_an_older_checkpoint_reproduces_the_same_command_id() -> None:
    config = cfg(**NO_PARTIAL)
    engine = RulesEngine(config)
    engine.on_snapshot(snap(1, 0.5), NOW)
    checkpoint = engine.to_state()
    first = engine.on_snapshot(snap(2, 1.5), NOW)
    replayed = RulesEngine.from_state(config, checkpoint).on_snapshot(snap(2, 1.5), NOW + 30)
    assert replayed is not None and replayed.command_id == first.command_id


def test_a_checkpoint_does_not_grow_with_the_positions_a_closure_closes() -> None:
    """Written with every batch of snapshots while a closure runs: 1,000 legs cost what one does."""
    sizes = {}
    for legs in (1, 1_000):
        engine = RulesEngine(cfg())
        positions = [pos(f"BTC-OPT-{i}", -1.0) for i in range(legs)]
        decision = engine.on_snapshot(snap(1, -20.0, positions=positions), NOW)
        assert decision is not None and len(decision.positions) == legs
        sizes[legs] = len(engine.to_state())
        engine.on_closure_finished(decision.command_id, completed=True, now=NOW)
        assert len(engine.to_state()) < sizes[legs] + 1_000, "the finished closure (cool-down) neither"
    assert sizes[1_000] - sizes[1] < 20, sizes  # the count in the decision's sentence: "(1)" / "(1000)"
