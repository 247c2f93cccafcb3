"""Issue 19, item 3: the circuit breaker against a fee loop — the pure class, then in the rules engine."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.contracts import CloseReason, Control, ControlAction
from services.takeprofit.breaker import BreakerState, CircuitBreaker
from services.takeprofit.rules import Decision, GuardState, RulesEngine, Skip, build_command

from .factories import NOW, cfg, pos, snap

# --- the pure class ------------------------------------------------------------------------------


def test_three_repeats_within_the_window_go_ahead_the_fourth_opens_it() -> None:
    breaker = CircuitBreaker(3, 600.0)
    assert [breaker.repeat(NOW + t, emergency=False) for t in (0, 60, 120)] == [True, True, True]
    assert not breaker.is_open and breaker.recent(NOW + 120) == 3
    assert breaker.repeat(NOW + 180, emergency=False) is False
    assert breaker.is_open and breaker.state.opened_ts == NOW + 180 and breaker.state.repeats_when_opened == 3


def test_repeats_older_than_the_window_are_forgotten() -> None:
    """Repeats at 0, 60, 120; at 600 the first is 600 s old (not < 600): two in the window, it goes ahead."""
    breaker = CircuitBreaker(3, 600.0)
    for t in (0, 60, 120):
        breaker.repeat(NOW + t, emergency=False)
    assert breaker.repeat(NOW + 600, emergency=False) is True and not breaker.is_open
    assert breaker.recent(NOW + 600) == 3  # 60, 120, 600


def test_an_emergency_stop_past_the_limit_still_goes_ahead_and_opens_it() -> None:
    breaker = CircuitBreaker(1, 600.0)
    assert breaker.repeat(NOW, emergency=False) is True
    assert breaker.repeat(NOW + 1, emergency=True) is True and breaker.is_open
    assert breaker.repeat(NOW + 2, emergency=False) is False  # open: only emergency stops
    assert breaker.repeat(NOW + 3, emergency=True) is True


def test_cancel_again_only_when_the_positions_changed_and_not_too_often() -> None:
    breaker = CircuitBreaker(1, 600.0, BreakerState(opened_ts=NOW))
    held = {"BTC-PERPETUAL": 0.6}
    assert breaker.cancel_due(held, NOW, 5.0)  # none yet: cancel as it opens
    breaker.cancelled(held, NOW)
    assert not breaker.cancel_due(held, NOW + 60, 5.0)  # unchanged
    assert not breaker.cancel_due({"BTC-PERPETUAL": 1.2}, NOW + 4, 5.0)  # changed, but 4 s < 5 s
    assert breaker.cancel_due({"BTC-PERPETUAL": 1.2}, NOW + 5, 5.0)
    assert not CircuitBreaker(1, 600.0).cancel_due(held, NOW, 5.0)  # closed: never


def test_a_halt_violation_calls_for_a_cancel_though_nothing_was_rebuilt_yet() -> None:
    """A rogue's quotes resting unfilled change no position; ingest's violation report still
    brings the next cancel-only command (not more often than the interval), and only while open."""
    breaker = CircuitBreaker(1, 600.0, BreakerState(opened_ts=NOW))
    held = {"BTC-PERPETUAL": 0.0}
    breaker.cancelled(held, NOW)
    assert not breaker.cancel_due(held, NOW + 60, 5.0)
    breaker.violation_seen()
    assert not breaker.cancel_due(held, NOW + 3, 5.0)  # 3 s < 5 s
    assert breaker.cancel_due(held, NOW + 60, 5.0)
    breaker.cancelled(held, NOW + 60)  # the cancel answers the violation
    assert not breaker.cancel_due(held, NOW + 120, 5.0)
    closed = CircuitBreaker(1, 600.0)
    closed.violation_seen()  # a violation with the breaker closed is not the breaker's business
    assert closed.state.violations_since_cancel == 0 and not closed.cancel_due(held, NOW, 5.0)


def test_close_forgets_everything() -> None:
    breaker = CircuitBreaker(1, 600.0, BreakerState(repeats=[NOW], opened_ts=NOW, repeats_when_opened=1))
    assert breaker.close() is True and not breaker.is_open and breaker.state == BreakerState()
    assert breaker.close() is False


# --- in the rules engine -------------------------------------------------------------------------

AGE = 0.001
"""max_position_age_hours: 3.6 s, so every rebuilt position is closed by the time limit."""


def rogue_round(engine: RulesEngine, epoch: int, t: float) -> Decision | None:
    """A rogue's position rebuilt at `t` (in the cool-down), and 10 s later (cool-down over, age 10 s >
    3.6 s) the snapshot that decides."""
    opened = NOW + t
    engine.on_snapshot(snap(epoch * 10, 0.0, epoch=epoch, ts=opened, oldest=opened), opened)
    decides = snap(epoch * 10 + 1, 0.0, epoch=epoch, ts=opened + 10, oldest=opened)
    return engine.on_snapshot(decides, opened + 10)


def test_a_rogue_rebuilding_in_every_cool_down_opens_the_breaker_after_three_repeat_closures() -> None:
    """Closure 1 is of the first position (not a repeat). Each later position appears 1 s into the 10 s
    cool-down (closures finish 11 s after the rebuild, the next rebuild 1 s later): repeats 1, 2, 3
    close; the 4th opens the breaker with a cancel-only decision."""
    engine = RulesEngine(cfg(max_position_age_hours=AGE, cooldown_seconds=10.0))
    engine.on_snapshot(snap(1, 0.0, epoch=1, ts=NOW, oldest=NOW), NOW)
    first = engine.on_snapshot(snap(2, 0.0, epoch=1, ts=NOW + 4, oldest=NOW), NOW + 4)
    assert first is not None and first.reason is CloseReason.MAX_AGE
    engine.on_closure_finished(first.command_id, completed=True, now=NOW + 5)  # cool-down to NOW + 15
    reasons = []
    t = 6.0
    for epoch in range(2, 6):
        decision = rogue_round(engine, epoch, t)
        assert decision is not None
        reasons.append(decision.reason)
        if decision.positions:
            engine.on_closure_finished(decision.command_id, completed=True, now=NOW + t + 11)
        t += 12.0
    assert reasons == [CloseReason.MAX_AGE] * 3 + [CloseReason.CIRCUIT_BREAKER]
    assert engine.breaker.is_open and engine.state(NOW + t) is GuardState.CLOSURE_IN_FLIGHT


def open_breaker(engine: RulesEngine) -> None:
    """Open it the short way: one allowed repeat (limit 1), then a second."""
    engine._s.breaker = BreakerState(opened_ts=NOW, repeats_when_opened=1)


def test_while_open_no_profit_or_age_closure_but_the_emergency_stop_on_net_pnl() -> None:
    """Net after close -30 with net P&L +2 (exit cost 32): profit_after_fees false would take profit at +2,
    the age limit holds, and the net_after_close basis would stop — while open, none of them; net P&L
    -10.5 <= -10: the emergency stop, judged on net P&L."""
    engine = RulesEngine(cfg(max_position_age_hours=AGE, profit_after_fees=False,
                             emergency_stop_basis="net_after_close"))
    open_breaker(engine)
    engine._s.breaker.last_cancel_ts = NOW  # the cancel as it opened is done
    engine._s.breaker.last_cancel_positions = {"BTC-PERPETUAL": 1.0}
    assert engine.on_snapshot(snap(1, -30.0, net_pnl=2.0, oldest=NOW - 3600), NOW + 10) is None
    assert engine.last_skip is Skip.CIRCUIT_BREAKER
    decision = engine.on_snapshot(snap(2, -42.5, net_pnl=-10.5, oldest=NOW - 3600), NOW + 11)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    assert "net P&L -$10.5000" in decision.sentence and "circuit breaker open" in decision.sentence
    assert engine.breaker.state.emergency_stops_while_open == 1


def test_while_open_rebuilt_positions_are_cancelled_again_with_a_command_that_closes_nothing() -> None:
    engine = RulesEngine(cfg())
    open_breaker(engine)
    decision = engine.on_snapshot(snap(1, 0.0, positions=[pos(position=0.6)]), NOW + 1)
    assert decision is not None and decision.reason is CloseReason.CIRCUIT_BREAKER
    assert decision.positions == ()
    command = build_command(decision, NOW + 1, 30.0)
    assert len(command.closing()) == 0 and command.reason is CloseReason.CIRCUIT_BREAKER
    assert command.command_id == "e1-circuit_breaker-s1-n1"
    assert engine.on_closure_finished(decision.command_id, completed=True, now=NOW + 2)
    assert engine.state(NOW + 2) is GuardState.CIRCUIT_BREAKER  # no cool-down, the epoch goes on
    assert engine.on_snapshot(snap(2, 0.0, positions=[pos(position=0.6)]), NOW + 3) is None  # unchanged
    again = engine.on_snapshot(snap(3, 0.0, positions=[pos(position=1.2)]), NOW + 9)  # rebuilt more
    assert again is not None and again.reason is CloseReason.CIRCUIT_BREAKER


def test_the_halt_stays_while_open_and_resume_closes_the_breaker() -> None:
    engine = RulesEngine(cfg(max_position_age_hours=AGE))
    open_breaker(engine)
    halt = engine.halt_document(NOW + 100)
    assert halt is not None and halt.reason == "circuit_breaker" and halt.until is None
    engine.on_control(Control(action=ControlAction.RESUME, by="desk", ts=NOW + 100), NOW + 100)
    assert not engine.breaker.is_open and engine.halt_document(NOW + 100) is None
    decision = engine.on_snapshot(snap(1, 0.0, oldest=NOW), NOW + 101)  # the time limit works again
    assert decision is not None and decision.reason is CloseReason.MAX_AGE


def test_the_breaker_survives_a_restart_from_the_checkpoint() -> None:
    engine = RulesEngine(cfg())
    open_breaker(engine)
    restored = RulesEngine.from_state(cfg(), engine.to_state())
    assert restored.breaker.is_open and restored.breaker.state == engine.breaker.state


def test_positions_already_open_before_an_operator_halt_are_no_rebuild() -> None:
    """Open first, then the halt, then resume: the take profit that follows is no repeat closure."""
    engine = RulesEngine(cfg(breaker_max_repeat_closures=1))
    engine.on_snapshot(snap(1, 0.0), NOW + 1)
    engine.on_control(Control(action=ControlAction.HALT, by="desk", ts=NOW + 2), NOW + 2)
    engine.on_snapshot(snap(2, 0.2), NOW + 3)
    engine.on_control(Control(action=ControlAction.RESUME, by="desk", ts=NOW + 4), NOW + 4)
    decision = engine.on_snapshot(snap(3, 1.5), NOW + 5)
    assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT
    assert engine.breaker.recent(NOW + 5) == 0


def test_a_manual_close_all_is_never_counted_nor_stopped_by_the_breaker() -> None:
    engine = RulesEngine(cfg())
    open_breaker(engine)
    engine._s.breaker.last_cancel_ts = NOW
    engine._s.breaker.last_cancel_positions = {"BTC-PERPETUAL": 1.0}
    engine.on_snapshot(snap(1, 0.0), NOW + 1)
    decision = engine.on_control(Control(action=ControlAction.CLOSE_ALL, by="desk", ts=NOW + 2), NOW + 2)
    assert decision is not None and decision.reason is CloseReason.MANUAL


@given(gaps=st.lists(st.floats(min_value=0.0, max_value=400.0), min_size=1, max_size=30),
       limit=st.integers(1, 4), emergencies=st.lists(st.booleans(), min_size=30, max_size=30))
def test_never_more_than_the_limit_in_any_window_and_open_until_resume(
    gaps: list[float], limit: int, emergencies: list[bool]
) -> None:
    """Recomputed independently: the repeats that went ahead while closed number at most `limit` in any
    600 s window; once open it stays open, and then only emergency stops go ahead."""
    breaker = CircuitBreaker(limit, 600.0)
    now, allowed_closed, opened_at = NOW, [], None
    for gap, emergency in zip(gaps, emergencies, strict=False):
        now += gap
        was_open = breaker.is_open
        allowed = breaker.repeat(now, emergency=emergency)
        if was_open:
            assert breaker.is_open and allowed is emergency
        elif breaker.is_open:
            opened_at = now
            assert allowed is emergency
        else:
            assert allowed
            allowed_closed.append(now)
    for t in allowed_closed:
        assert sum(1 for u in allowed_closed if t <= u < t + 600.0) <= limit
    assert (opened_at is not None) == breaker.is_open
