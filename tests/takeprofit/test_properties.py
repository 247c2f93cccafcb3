"""Property tests: one full closure per epoch, the priority order, exact partial ratios."""

from __future__ import annotations

import math
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.contracts import CloseReason, Control, ControlAction, InstrumentType
from services.takeprofit.rules import External, RulesEngine, build_command

from .factories import NOW, cfg, pos, snap

money = st.one_of(
    st.sampled_from([-10.0, -1.0, 0.0, 0.3, 0.5, 0.7, 0.9, 1.1, 1.5]),
    st.floats(min_value=-11.0, max_value=3.0, allow_nan=False).map(lambda x: round(x, 4)),
)
"""Mostly the barrier values themselves, so sequences cross them often."""

configs = st.builds(
    cfg,
    profit_after_fees=st.booleans(),
    enable_portfolio_tp=st.booleans(),
    confirm_snapshots=st.integers(1, 3),
    cooldown_seconds=st.sampled_from([0.0, 5.0]),
    trailing_activation_usd=st.sampled_from([0.0, 0.3, 0.8]),
    trailing_retrace_usd=st.sampled_from([0.1, 0.25]),
    partial_close_fraction=st.sampled_from([0.0, 0.5]),
    max_position_age_hours=st.sampled_from([0.05, 24.0]),
)

SHELL_EVENTS = [
    "timer",
    "completed",
    "completed",
    "failed",
    "halt",
    "resume",
    "resume",
    "close_all",
    "restart",
]
snapshot_event = st.tuples(st.just("snapshot"), money, money, st.sampled_from([False, False, False, True]))
events = st.lists(
    st.one_of(
        snapshot_event,
        snapshot_event,
        snapshot_event,
        st.tuples(st.sampled_from(SHELL_EVENTS)),
    ),
    max_size=60,
)
"""Mostly snapshots (one in four with stale prices), interleaved with everything the shell feeds in."""


@settings(max_examples=300, deadline=None)
@given(config=configs, script=events)
def test_at_most_one_full_closure_per_epoch_unless_one_failed(config, script) -> None:
    """The shell holds the lease from a command until its report; a restart reloads the checkpoint.

    With only completed reports there is at most one full closure in the epoch;
    each failed full closure allows exactly one retry more.
    """
    engine = RulesEngine(config)
    lease: str | None = None
    fraction_in_flight = 0.0
    full, failed_full, seq, now = 0, 0, 0, NOW
    for event in script:
        kind = event[0]
        now += 7.0
        decision = None
        external = External(closure_in_flight=lease is not None)
        if kind == "snapshot":
            seq += 1
            _, net_after_close, net_pnl, stale = event
            s = snap(seq, net_after_close, net_pnl=net_pnl, ts=now, stale=["BTC-PERPETUAL"] if stale else [])
            decision = engine.on_snapshot(s, now, external)
        elif kind == "timer":
            decision = engine.on_timer(now, external)
        elif kind in ("completed", "failed") and lease is not None:
            assert engine.on_closure_finished(lease, completed=kind == "completed", now=now)
            failed_full += kind == "failed" and fraction_in_flight == 1.0
            lease = None
        elif kind in ("halt", "resume", "close_all"):
            decision = engine.on_control(
                Control(action=ControlAction(kind), by="prop", ts=now), now, external
            )
        elif kind == "restart":
            # as the shell restarts: the engine from its checkpoint, the rows read back from
            # `tp:snapshot:positions` (the checkpoint holds no rows; without them a decision lists none)
            view = engine.view
            engine = RulesEngine.from_state(config, engine.to_state())
            engine.view = view
        if decision is not None:
            assert lease is None, "a decision while a closure is in flight"
            lease, fraction_in_flight = decision.command_id, decision.fraction
            full += decision.fraction == 1.0
    assert full <= 1 + failed_full


positions_strategy = st.lists(
    st.tuples(
        st.sampled_from(["BTCUSD", "ETHUSD", "SOLUSD"]),
        st.floats(min_value=-50.0, max_value=50.0, allow_nan=False).filter(lambda x: abs(x) > 1e-6),
        st.sampled_from([InstrumentType.PERPETUAL, InstrumentType.FUTURE, InstrumentType.OPTION]),
    ),
    min_size=1,
    max_size=8,
)


def book(legs) -> list:
    return [
        pos(
            f"{underlying[:3]}-LEG{i}",
            amount,
            underlying=underlying,
            instrument_type=kind,
            expiry_ts=None if kind is InstrumentType.PERPETUAL else NOW + 30 * 86400,
        )
        for i, (underlying, amount, kind) in enumerate(legs)
    ]


@settings(max_examples=150, deadline=None)
@given(
    config=configs.filter(lambda c: c.enable_portfolio_tp or c.emergency_stop_when_disabled),
    prefix=st.lists(st.tuples(money, money, st.booleans()), max_size=8),
    legs=positions_strategy,
    net_pnl=st.floats(min_value=-1000.0, max_value=-10.0),
    exit_cost=st.floats(min_value=0.0, max_value=1000.0),
    basis=st.sampled_from(["net_pnl", "net_after_close"]),
    stale=st.booleans(),
    old=st.booleans(),
)
def test_the_emergency_stop_outranks_every_other_barrier(
    config, prefix, legs, net_pnl, exit_cost, basis, stale, old
) -> None:
    """Whatever happened before, a fresh snapshot at the emergency threshold closes as an emergency
    (on either basis: a loss of net_pnl <= -10 is at least as deep after the exit cost)."""
    net_after_close = net_pnl - exit_cost
    engine = RulesEngine(config.model_copy(update={"cooldown_seconds": 0.0, "emergency_stop_basis": basis}))
    now = NOW
    for seq, (a, p, s) in enumerate(prefix, start=1):
        decision = engine.on_snapshot(
            snap(seq, a, net_pnl=p, ts=now, stale=["BTC-PERPETUAL"] if s else []), now
        )
        if decision is not None:
            engine.on_closure_finished(decision.command_id, completed=False, now=now)
    positions = book(legs)
    final = snap(
        len(prefix) + 1,
        net_after_close,
        net_pnl=net_pnl,
        ts=now,
        positions=positions,
        oldest=NOW - 100 * 86400 if old else NOW,
        stale=[positions[0].instrument] if stale else [],
    )
    decision = engine.on_snapshot(final, now + 20 * 86400)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    assert decision.fraction == 1.0 and len(decision.positions) == len(positions)


@settings(max_examples=200, deadline=None)
@given(legs=positions_strategy, fraction=st.floats(min_value=0.01, max_value=0.99))
def test_partial_amounts_are_exactly_fraction_times_position_on_every_leg(legs, fraction) -> None:
    engine = RulesEngine(cfg(partial_close_fraction=fraction))
    positions = book(legs)
    decision = engine.on_snapshot(snap(1, 0.5, positions=positions), NOW)
    assert decision is not None and decision.reason is CloseReason.PARTIAL_TAKE_PROFIT
    command = build_command(decision, NOW, 30.0)
    assert [p.instrument for p in command.closing().rows()] == [p.instrument for p in positions]
    ratios: dict[str, list[float]] = defaultdict(list)
    for leg, close in zip(positions, command.closing().rows(), strict=True):
        assert close.amount == fraction * leg.position
        assert math.copysign(1.0, close.amount) == math.copysign(1.0, leg.position)
        ratios[leg.underlying].append(close.amount / leg.position)
    for same_underlying in ratios.values():
        assert all(math.isclose(r, fraction, rel_tol=1e-12) for r in same_underlying)
    grouped = {g.underlying: g.instruments for g in command.groups or []}
    for underlying in ratios:
        legs_of = [p.instrument for p in positions if p.underlying == underlying]
        assert grouped.get(underlying, legs_of if len(legs_of) == 1 else None) == legs_of


@settings(max_examples=300, deadline=None)
@given(
    activation=st.sampled_from([0.3, 0.6]),
    retrace=st.sampled_from([0.1, 0.25]),
    confirm=st.integers(1, 4),
    figures=st.lists(st.floats(min_value=-1.0, max_value=1.05).map(lambda x: round(x, 2)), max_size=40),
)
def test_the_trailing_stop_fires_where_an_independent_recomputation_says(
    activation: float, retrace: float, confirm: int, figures: list[float]
) -> None:
    """Recomputed apart: the peak follows the minimum of the last `confirm` figures (once there are
    that many), arming at the activation; the stop holds at figure <= peak - retrace, and fires on
    the `confirm`-th snapshot in a row it holds. Figures stay below the take profit (1.1)."""
    engine = RulesEngine(cfg(trailing_activation_usd=activation, trailing_retrace_usd=retrace,
                             confirm_snapshots=confirm, partial_close_fraction=0.0))
    expected: int | None = None
    window: list[float] = []
    peak: float | None = None
    run = 0
    for i, figure in enumerate(figures):
        window = [*window, figure][-confirm:]
        if len(window) == confirm:
            level = min(window)
            if peak is not None:
                peak = max(peak, level)
            elif level >= activation - 1e-9:
                peak = level
        run = run + 1 if peak is not None and figure <= peak - retrace + 1e-9 else 0
        if run >= confirm:
            expected = i
            break
    fired = None
    for i, figure in enumerate(figures):
        decision = engine.on_snapshot(snap(i + 1, figure), NOW + i + 1)
        if decision is not None:
            assert decision.reason is CloseReason.TRAILING_STOP
            fired = i
            break
    assert fired == expected
