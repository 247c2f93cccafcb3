"""Each barrier fires exactly at its threshold, not a hair before, in the documented priority."""

from __future__ import annotations

import pytest

from services.common.contracts import CloseReason, Control, ControlAction, InstrumentType
from services.takeprofit.rules import RulesEngine, Skip

from .factories import NOW, cfg, pos, snap

HOUR = 3600.0


def decide(engine: RulesEngine, *snapshots, now: float | None = None):
    """Feed snapshots; return the last call's result."""
    result = None
    for s in snapshots:
        result = engine.on_snapshot(s, s.ts if now is None else now)
    return result


@pytest.mark.parametrize(
    ("figure", "fires"),
    [(1.10, True), (1.1000001, True), (1.0999999999999999, True), (1.0999999, False), (1.09, False)],
)
def test_take_profit_fires_at_its_target_and_not_before(figure: float, fires: bool) -> None:
    engine = RulesEngine(cfg(partial_close_fraction=0.0))
    decision = decide(engine, snap(1, figure))
    if fires:
        assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT
        assert decision.fraction == 1.0 and decision.figure == figure and decision.threshold == 1.1
        assert "take profit" in decision.sentence
    else:
        assert decision is None and engine.last_skip is Skip.NO_BARRIER


def test_take_profit_on_net_pnl_when_profit_after_fees_is_false() -> None:
    after_fees = RulesEngine(cfg(partial_close_fraction=0.0))
    assert decide(after_fees, snap(1, 0.2, net_pnl=1.1)) is None
    before_fees = RulesEngine(cfg(partial_close_fraction=0.0, profit_after_fees=False))
    decision = decide(before_fees, snap(1, 0.2, net_pnl=1.1))
    assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT and decision.pnl == 1.1


@pytest.mark.parametrize(
    ("figure", "fires"), [(-10.0, True), (-10.5, True), (-9.9999999, False), (-9.99, False)]
)
def test_emergency_stop_fires_at_its_threshold_and_not_before(figure: float, fires: bool) -> None:
    engine = RulesEngine(cfg())
    decision = decide(engine, snap(1, figure))
    assert (decision is not None and decision.reason is CloseReason.EMERGENCY_STOP) is fires
    if fires:
        assert decision.threshold == -10.0 and decision.stale_instruments == ()


def test_emergency_stop_judges_its_basis_whatever_profit_after_fees_says() -> None:
    """Issue 19: `net_pnl` by default (net after close -10 with net P&L +5 is no loss yet);
    `emergency_stop_basis = "net_after_close"` judges the figure after the exit cost."""
    decision = decide(RulesEngine(cfg(profit_after_fees=False)), snap(1, -10.0, net_pnl=5.0))
    assert decision is None or decision.reason is not CloseReason.EMERGENCY_STOP
    engine = RulesEngine(cfg(profit_after_fees=False, emergency_stop_basis="net_after_close"))
    decision = decide(engine, snap(1, -10.0, net_pnl=5.0))
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP


@pytest.mark.parametrize(("figure", "fires"), [(0.5, True), (0.4999999, False), (0.49, False)])
def test_partial_take_profit_fires_at_its_threshold(figure: float, fires: bool) -> None:
    decision = decide(RulesEngine(cfg()), snap(1, figure))
    assert (decision is not None and decision.reason is CloseReason.PARTIAL_TAKE_PROFIT) is fires
    if fires:
        assert decision.fraction == 0.5


def test_partial_take_profit_is_off_at_fraction_zero() -> None:
    engine = RulesEngine(cfg(partial_close_fraction=0.0))
    assert decide(engine, snap(1, 0.9)) is None


def trailing_engine() -> RulesEngine:
    return RulesEngine(cfg(partial_close_fraction=0.0, trailing_activation_usd=0.6, trailing_retrace_usd=0.2))


def test_trailing_take_profit_arms_follows_the_peak_and_fires_on_the_retrace() -> None:
    engine = trailing_engine()
    assert decide(engine, snap(1, 0.5), snap(2, 0.6), snap(3, 0.9), snap(4, 0.7000001)) is None
    assert engine.distances(NOW)["trailing_stop"] == pytest.approx(0.0000001)
    decision = decide(engine, snap(5, 0.7))
    assert decision is not None and decision.reason is CloseReason.TRAILING_STOP
    assert decision.threshold == pytest.approx(0.7) and decision.fraction == 1.0
    assert "peak $0.9000" in decision.sentence


def test_trailing_take_profit_does_nothing_before_it_arms() -> None:
    engine = trailing_engine()
    assert decide(engine, snap(1, 0.59), snap(2, 0.1), snap(3, -0.5)) is None
    assert engine.distances(NOW)["trailing_activation"] == pytest.approx(1.1)


def test_max_age_fires_on_a_timer_tick_exactly_at_the_limit() -> None:
    engine = RulesEngine(cfg(max_position_age_hours=2.0, partial_close_fraction=0.0))
    assert decide(engine, snap(1, 0.0, oldest=NOW)) is None
    assert engine.on_timer(NOW + 2 * HOUR - 1) is None
    assert engine.last_skip is Skip.NO_BARRIER
    decision = engine.on_timer(NOW + 2 * HOUR)
    assert decision is not None and decision.reason is CloseReason.MAX_AGE
    assert decision.unit == "seconds" and decision.figure == 2 * HOUR and decision.threshold == 2 * HOUR
    assert decision.snapshot_seq == 1 and "2.00 h old" in decision.sentence


def test_max_age_falls_back_to_the_positions_opened_ts() -> None:
    engine = RulesEngine(cfg(max_position_age_hours=1.0))
    s = snap(1, positions=[pos(opened_ts=NOW - HOUR)]).model_copy(update={"oldest_position_ts": None})
    decision = engine.on_snapshot(s, NOW)
    assert decision is not None and decision.reason is CloseReason.MAX_AGE


def expiring(expiry_ts: float, kind: InstrumentType = InstrumentType.OPTION) -> list:
    return [pos(), pos("BTC-OPT", -10.0, instrument_type=kind, expiry_ts=expiry_ts)]


def test_a_dated_position_is_closed_close_before_expiry_minutes_ahead() -> None:
    engine = RulesEngine(cfg(close_before_expiry_minutes=30.0))
    expiry = NOW + 3 * HOUR
    assert decide(engine, snap(1, positions=expiring(expiry)), now=NOW) is None
    assert engine.on_timer(expiry - 30 * 60 - 1) is None
    decision = engine.on_timer(expiry - 30 * 60)
    assert decision is not None and decision.reason is CloseReason.MAX_AGE
    assert "BTC-OPT expires in 30.0 min" in decision.sentence
    assert len(decision.positions) == 2, "a time limit closes the whole portfolio"


def test_the_expiry_rule_is_off_at_zero_minutes_and_ignores_perpetuals() -> None:
    off = RulesEngine(cfg(close_before_expiry_minutes=0.0))
    assert decide(off, snap(1, positions=expiring(NOW + 60)), now=NOW) is None
    perp = RulesEngine(cfg())
    assert decide(perp, snap(1, positions=expiring(NOW + 60, InstrumentType.PERPETUAL)), now=NOW) is None


def test_priority_emergency_then_time_then_take_profit_then_trailing_then_partial() -> None:
    old = NOW - 48 * HOUR
    cases = [
        (snap(1, -10.0, oldest=old), CloseReason.EMERGENCY_STOP),
        (snap(1, 5.0, oldest=old), CloseReason.MAX_AGE),
        (snap(1, 1.1), CloseReason.TAKE_PROFIT),
    ]
    for s, reason in cases:
        decision = RulesEngine(cfg(trailing_activation_usd=0.6)).on_snapshot(s, NOW)
        assert decision is not None and decision.reason is reason
    # Trailing armed at 0.6, peaked at 0.9 during an operator halt, retraced to 0.7 after the resume,
    # where the partial barrier (0.55) holds too: trailing outranks partial.
    engine = RulesEngine(
        cfg(trailing_activation_usd=0.6, trailing_retrace_usd=0.2, partial_profit_threshold=0.55)
    )
    engine.on_control(Control(action=ControlAction.HALT, by="ops", ts=NOW), NOW)
    assert decide(engine, snap(1, 0.6), snap(2, 0.9)) is None
    engine.on_control(Control(action=ControlAction.RESUME, by="ops", ts=NOW), NOW)
    decision = decide(engine, snap(3, 0.7))
    assert decision is not None and decision.reason is CloseReason.TRAILING_STOP


def test_disabled_portfolio_tp_keeps_the_emergency_stop_and_the_time_limit() -> None:
    engine = RulesEngine(cfg(enable_portfolio_tp=False, trailing_activation_usd=0.6))
    assert decide(engine, snap(1, 0.9), snap(2, 5.0), snap(3, 0.2)) is None
    assert engine.last_skip is Skip.NO_BARRIER
    assert set(engine.distances(NOW)) == {"emergency_stop", "max_age_seconds"}
    decision = decide(engine, snap(4, -10.0))
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    timed = RulesEngine(cfg(enable_portfolio_tp=False, max_position_age_hours=1.0))
    decision = timed.on_snapshot(snap(1, 5.0, oldest=NOW - HOUR), NOW)
    assert decision is not None and decision.reason is CloseReason.MAX_AGE


def test_disabled_portfolio_tp_can_disarm_the_emergency_stop_explicitly() -> None:
    engine = RulesEngine(cfg(enable_portfolio_tp=False, emergency_stop_when_disabled=False))
    assert decide(engine, snap(1, -50.0)) is None
    assert "emergency_stop" not in engine.distances(NOW)


def test_distances_to_each_barrier() -> None:
    engine = RulesEngine(cfg(max_position_age_hours=1.0, close_before_expiry_minutes=10.0))
    decide(engine, snap(1, 0.3, oldest=NOW, positions=expiring(NOW + HOUR)), now=NOW)
    d = engine.distances(NOW + 60)
    assert d["take_profit"] == pytest.approx(0.8)
    assert d["emergency_stop"] == pytest.approx(10.3)
    assert d["partial_take_profit"] == pytest.approx(0.2)
    assert d["max_age_seconds"] == pytest.approx(HOUR - 60)
    assert d["expiry_seconds"] == pytest.approx(HOUR - 60 - 600)
    assert RulesEngine(cfg()).distances(NOW) == {}


def test_a_one_snapshot_spike_does_not_raise_the_trailing_peak_when_confirmation_is_asked() -> None:
    """Activation 0.6, retrace 0.25, confirm 3: figures 0.7 ×3 arm it at 0.7; a spike to 1.05 for one
    snapshot, then 0.8 ×3. The level the last 3 held goes 0.7, 0.7, 0.7, 0.8, 0.8: peak 0.8, stop
    0.8 - 0.25 = 0.55, and 0.8 is far above it — no close. (Before: peak 1.05, stop 0.80, closed.)"""
    engine = RulesEngine(cfg(trailing_activation_usd=0.6, trailing_retrace_usd=0.25, confirm_snapshots=3,
                             partial_close_fraction=0.0))
    for seq, figure in enumerate([0.7, 0.7, 0.7, 1.05, 0.8, 0.8, 0.8], start=1):
        assert engine.on_snapshot(snap(seq, figure), NOW + seq) is None, seq
    assert engine.distances(NOW + 8)["trailing_stop"] == pytest.approx(0.8 - 0.55)
    # a real fall to the stop, held 3 snapshots, still closes
    for seq in (8, 9):
        assert engine.on_snapshot(snap(seq, 0.55), NOW + seq) is None
    decision = engine.on_snapshot(snap(10, 0.55), NOW + 10)
    assert decision is not None and decision.reason is CloseReason.TRAILING_STOP
