"""Issue 19, item 4: an emergency stop that means loss, and the exit-cost warning.

Hand-worked examples (the arithmetic in each test) and a hypothesis property against an independent
recomputation of the emergency figure and the warning.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.config import EmergencyBasis, PortfolioTakeProfit
from services.common.contracts import CloseReason, Snapshot
from services.common.exit_cost import exit_cost_warning
from services.takeprofit.rules import RulesEngine

from .factories import NOW, cfg, pos, snap


def opened_at_the_mark(seq: int, net_pnl: float, exit_cost: float, *, flat: bool = False) -> Snapshot:
    """A snapshot whose only numbers are the P&L and the exit cost (`net_after_close = net_pnl - cost`)."""
    return snap(seq, net_pnl - exit_cost, net_pnl=net_pnl, positions=[pos(position=0.0 if flat else 0.2)])


def test_a_large_position_at_the_mark_is_not_an_emergency_on_net_pnl() -> None:
    """0.2 BTC bought at the mark 95,000 as a taker: fee 0.2 x 95,000 x 0.0005 = 9.50 -> net_pnl -9.50.
    Exit cost: 9.50 x 1.1 (buffer) + 0.2 x 150 (best bid 150 under the mark) = 10.45 + 30 = 40.45,
    net_after_close = -9.50 - 40.45 = -49.95. Threshold -25: -9.50 > -25, no stop."""
    engine = RulesEngine(cfg(emergency_close_threshold=-25.0))
    assert engine.on_snapshot(opened_at_the_mark(1, -9.50, 40.45), NOW + 1) is None
    assert engine.distances(NOW + 1)["emergency_stop"] == pytest.approx(-9.50 + 25.0)  # 15.50 to go


def test_the_same_position_on_net_after_close_stops_at_once() -> None:
    """Same numbers, basis net_after_close: -49.95 <= -25 -> emergency stop at -49.95."""
    engine = RulesEngine(cfg(emergency_close_threshold=-25.0, emergency_stop_basis="net_after_close"))
    decision = engine.on_snapshot(opened_at_the_mark(1, -9.50, 40.45), NOW + 1)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    assert decision.figure == pytest.approx(-49.95) and "net after close -$49.9500" in decision.sentence


def test_an_adverse_move_beyond_the_threshold_stops_on_net_pnl() -> None:
    """The mark falls 200: unrealised 0.2 x -200 = -40, net_pnl = -9.50 - 40 = -49.50 <= -25 -> stop."""
    engine = RulesEngine(cfg(emergency_close_threshold=-25.0))
    assert engine.on_snapshot(opened_at_the_mark(1, -9.50, 40.45), NOW + 1) is None
    decision = engine.on_snapshot(opened_at_the_mark(2, -49.50, 40.45), NOW + 2)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    assert decision.figure == pytest.approx(-49.50) and decision.threshold == -25.0
    assert "emergency stop: net P&L -$49.5000 is at or below -$25.0000" in decision.sentence


def test_the_exit_cost_warning_says_what_closing_costs_and_what_the_target_needs() -> None:
    """Cost 40.45 > 25 (the stop's width) and > 1.10 (the target). The take profit judges net_after_close
    = -49.95, so it needs 1.10 - (-49.95) = 51.05."""
    tp = cfg(emergency_close_threshold=-25.0)
    warning = exit_cost_warning(opened_at_the_mark(1, -9.50, 40.45), tp)
    assert warning is not None
    assert warning.exit_cost == pytest.approx(40.45) and warning.move_needed == pytest.approx(51.05)
    assert warning.exceeds == ("emergency stop", "take-profit target")
    assert warning.sentence().startswith(
        "closing now costs 40.45 USD; the take profit needs a move of 51.05 USD")


def test_the_warning_on_the_target_alone_and_never_when_flat() -> None:
    """Cost 2.00: within the stop's 10.00 but over the 1.10 target; with profit_after_fees false the
    figure is net_pnl = 0.30, so the move is 1.10 - 0.30 = 0.80. Flat: no warning at any cost."""
    tp = cfg(profit_after_fees=False)
    warning = exit_cost_warning(opened_at_the_mark(1, 0.30, 2.00), tp)
    assert warning is not None and warning.exceeds == ("take-profit target",)
    assert warning.move_needed == pytest.approx(0.80)
    assert exit_cost_warning(opened_at_the_mark(1, 0.30, 1.00), tp) is None  # 1.00 <= 1.10 and <= 10
    assert exit_cost_warning(opened_at_the_mark(1, 0.30, 50.0, flat=True), tp) is None


def test_an_exit_cost_exactly_at_a_barrier_is_no_warning() -> None:
    """Cost 10.00 against a stop 10.00 wide and a target of 20.00 (partial 0.5): not wider, no warning."""
    tp = cfg(min_profit_usd=20.0)
    assert exit_cost_warning(opened_at_the_mark(1, 0.0, 10.0), tp) is None


def test_the_engine_reports_the_warning_on_its_last_snapshot() -> None:
    engine = RulesEngine(cfg())
    assert engine.exit_cost_warning() is None
    engine.on_snapshot(opened_at_the_mark(1, -1.20, 31.0), NOW + 1)  # the 0.6 BTC, cost 31
    warning = engine.exit_cost_warning()
    assert warning is not None and warning.exit_cost == pytest.approx(31.0)


money = st.floats(min_value=-60.0, max_value=20.0, allow_nan=False).map(lambda x: round(x, 4))
costs = st.floats(min_value=0.0, max_value=60.0, allow_nan=False).map(lambda x: round(x, 4))


@given(net_pnl=money, cost=costs, threshold=st.sampled_from([-5.0, -10.0, -25.0]),
       basis=st.sampled_from(list(EmergencyBasis)), after_fees=st.booleans())
def test_the_stop_and_the_warning_agree_with_a_recomputation(
    net_pnl: float, cost: float, threshold: float, basis: EmergencyBasis, after_fees: bool
) -> None:
    tp = PortfolioTakeProfit(emergency_close_threshold=threshold, emergency_stop_basis=basis,
                             profit_after_fees=after_fees, cooldown_seconds=0.0, partial_close_fraction=0.0)
    engine = RulesEngine(tp)
    s = opened_at_the_mark(1, net_pnl, cost)
    decision = engine.on_snapshot(s, NOW + 1)
    # independently: the figure is the one named by the basis; the stop holds at or below the threshold
    figure = net_pnl if basis == "net_pnl" else net_pnl - cost
    if figure <= threshold:
        assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    elif decision is not None:
        assert decision.reason is CloseReason.TAKE_PROFIT
    if basis == "net_pnl" and net_pnl > threshold:
        assert decision is None or decision.reason is not CloseReason.EMERGENCY_STOP  # cost alone never stops
    warning = exit_cost_warning(s, tp)
    exit_cost = s.net_pnl - s.net_after_close
    wider = exit_cost > -threshold + 1e-9 or exit_cost > tp.min_profit_usd + 1e-9
    assert (warning is not None) == wider
    if warning is not None:
        profit = s.net_after_close if after_fees else s.net_pnl
        assert warning.move_needed == pytest.approx(max(0.0, tp.min_profit_usd - profit))
