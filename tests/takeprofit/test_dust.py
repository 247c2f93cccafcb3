"""Dust and the rules engine: no closure is decided on positions no order can close.

The dust loop (found by review): a max-age closure of 0.1005 BTC (volume tick 0.0001, minimum order
0.001) filled 0.1 and left 0.0005; the executor reported `completed`; the new epoch held only the
dust, with its day-old opening; right after every cool-down the time limit fired again, each command
closed nothing but wiped every quote on the account, and — the dust counting as "rebuilt" during the
cool-down — the fourth opened the circuit breaker.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.contracts import (
    CloseReason,
    Control,
    ControlAction,
    InstrumentInfo,
    InstrumentType,
    Snapshot,
)
from services.executor.plan import order_amount
from services.portfolio.ledger import Ledger
from services.takeprofit.answers import answer_control
from services.takeprofit.rules import GuardState, RulesEngine, Skip, build_command, freshness_problem
from tests.portfolio.factories import INFOS, fill, ledger, tick
from tests.takeprofit.factories import NOW, cfg, pos, snap

PERP = "BTC-PERPETUAL"
DAY = 24 * 3600.0
FINE_PERP = InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                           tick_size=1.0, volume_tick_size=0.0001, min_order_amount=0.001)
"""Thalex's BTC perpetual sizes: amounts on a 0.0001 grid, an order of at least 0.001."""


def dust_snapshot(seq: int, t: float, *, epoch: int = 2, oldest: float | None = None,
                  net: float = 0.0) -> Snapshot:
    """The new epoch's snapshot: only the 0.0005 left, its opening a day old."""
    row = pos(PERP, 0.0005, opened_ts=NOW - 25 * 3600, volume_tick_size=0.0001)
    return snap(seq, net, epoch=epoch, ts=t, oldest=oldest, positions=[row], dust=[PERP])


def test_a_max_age_closure_that_leaves_dust_is_not_repeated_and_the_breaker_stays_closed() -> None:
    """The header even carries the dust's old opening (as it did before the fix): the engine decides
    nothing on dust alone, through hundreds of snapshots and timer ticks well past the cool-down."""
    engine = RulesEngine(cfg(cooldown_seconds=30.0, partial_close_fraction=0.0, max_position_age_hours=24))
    old = NOW - 25 * 3600
    first = engine.on_snapshot(snap(1, 0.0, epoch=1, ts=NOW, oldest=old), NOW)
    assert first is not None and first.reason is CloseReason.MAX_AGE
    assert engine.on_closure_finished(first.command_id, completed=True, now=NOW + 2)  # 0.0005 left
    t, seq = NOW + 3, 10
    for _ in range(300):  # 3,000 s: a hundred cool-downs
        assert engine.on_snapshot(dust_snapshot(seq, t, oldest=old), t) is None
        assert engine.last_skip is Skip.ONLY_DUST
        assert engine.on_timer(t + 5) is None and engine.last_skip is Skip.ONLY_DUST
        t, seq = t + 10, seq + 1
    assert not engine.breaker.is_open and engine.breaker.recent(t) == 0
    assert engine.state(t) is GuardState.IDLE and engine.halt_document(t) is None
    assert "max_age_seconds" not in engine.distances(t)  # nothing for the time limit to count down
    assert engine._s.epoch is not None and not engine._s.epoch.seen_open and not engine._s.epoch.rebuilt


def test_dust_in_a_cool_down_is_no_rebuild_but_a_position_traded_in_it_is() -> None:
    """The dust is in the new epoch from its first snapshot, inside the cool-down: not rebuilt. A
    position an order can close appearing in a later cool-down would be (the control case)."""
    engine = RulesEngine(cfg(cooldown_seconds=30.0, partial_close_fraction=0.0,
                             breaker_max_repeat_closures=1))
    first = engine.on_snapshot(snap(1, 1.5, epoch=1, ts=NOW, oldest=NOW), NOW)
    assert first is not None and first.reason is CloseReason.TAKE_PROFIT
    engine.on_closure_finished(first.command_id, completed=True, now=NOW + 1)
    engine.on_snapshot(dust_snapshot(2, NOW + 2), NOW + 2)
    assert engine._s.epoch is not None and not engine._s.epoch.rebuilt
    grown = [pos(PERP, 0.0105, opened_ts=NOW + 40)]  # the trader traded the dust up, after the cool-down
    traded = snap(3, 1.5, epoch=2, ts=NOW + 40, oldest=NOW + 40, positions=grown)
    decision = engine.on_snapshot(traded, NOW + 40)
    assert decision is not None and decision.reason is CloseReason.TAKE_PROFIT  # no repeat: no breaker
    assert engine.breaker.recent(NOW + 40) == 0 and not engine._s.epoch.rebuilt
    engine.on_closure_finished(decision.command_id, completed=True, now=NOW + 41)
    rebuilt = snap(4, 1.5, epoch=3, ts=NOW + 42, oldest=NOW + 42, positions=[pos(PERP, 0.5)])
    engine.on_snapshot(rebuilt, NOW + 42)
    assert engine._s.epoch is not None and engine._s.epoch.rebuilt


def test_only_dust_fires_no_emergency_stop_and_refuses_close_all() -> None:
    engine = RulesEngine(cfg())
    assert engine.on_snapshot(dust_snapshot(1, NOW, net=-50.0), NOW) is None
    assert engine.last_skip is Skip.ONLY_DUST
    close_all = Control(action=ControlAction.CLOSE_ALL, by="desk", ts=NOW + 1)
    assert engine.on_control(close_all, NOW + 1) is None and engine.last_skip is Skip.ONLY_DUST
    answer = answer_control(close_all, "1-0", NOW + 1, refusal=str(engine.last_skip))
    assert answer.reason == "only_dust" and "no order can close" in answer.detail


def test_beside_a_closable_position_dust_is_valued_and_closed_with_it() -> None:
    """The money barriers judge the whole book, dust included, and the command lists the dust leg too
    (the executor reports what it could not close)."""
    rows = [pos(PERP, 0.0005, volume_tick_size=0.0001), pos("ETH-PERPETUAL", 1.0, underlying="ETHUSD")]
    engine = RulesEngine(cfg(partial_close_fraction=0.0))
    decision = engine.on_snapshot(snap(1, -10.5, positions=rows, dust=[PERP]), NOW + 1)
    assert decision is not None and decision.reason is CloseReason.EMERGENCY_STOP
    command = build_command(decision, NOW + 1, 30.0)
    assert sorted(command.closing().instrument) == ["BTC-PERPETUAL", "ETH-PERPETUAL"]


def test_stale_prices_of_dust_alone_are_no_freshness_problem() -> None:
    stale = snap(1, 0.0, positions=[pos(PERP, 0.0005)], dust=[PERP], stale=[PERP])
    assert freshness_problem(stale, NOW + 1, 10.0) is None
    assert freshness_problem(stale.model_copy(update={"dust": None}), NOW + 1, 10.0) is not None


# --- the portfolio's snapshots, into the engine --------------------------------------------------


def closed_leaving(book: Ledger, name: str, amount: float, kept: float, opened: float, now: float) -> None:
    """Open `amount` at `opened`, close all but `kept` (a closure's partial fill), end the epoch."""
    book.apply_fill(fill(name, "buy", amount, 100.0, ts=opened))
    book.apply_tick(tick(name, 100.0, ts=now - 1))
    book.apply_fill(fill(name, "sell", round(amount - kept, 10), 100.0, ts=now - 1))
    assert book.advance_epoch(now, completed_epoch=0)


@pytest.mark.parametrize(("info", "amount", "kept"), [
    (FINE_PERP, 0.1005, 0.0005),  # below the minimum order
    (INFOS[PERP], 1.0005, 0.0005),  # below one volume tick (0.001): an RFQ fill off the tick
], ids=["below-min-order", "below-one-volume-tick"])
def test_the_portfolios_dust_triggers_no_time_limit_and_is_no_rebuild(
        info: InstrumentInfo, amount: float, kept: float) -> None:
    book = ledger()
    book.set_instrument(PERP, info)
    now = 10 * DAY
    closed_leaving(book, PERP, amount, kept, opened=0.0, now=now)
    engine = RulesEngine(cfg(cooldown_seconds=30.0, partial_close_fraction=0.0))
    engine._s.cooldown_until = now + 30.0  # the closure just finished
    first = book.snapshot(1, now + 1, 1e9)
    assert first.dust == [PERP] and first.oldest_position_ts is None
    assert engine.on_snapshot(first, now + 1) is None
    assert engine._s.epoch is not None and not engine._s.epoch.rebuilt
    for k in range(2, 50):
        assert engine.on_snapshot(book.snapshot(k, now + 10 * k, 1e9), now + 10 * k) is None
        assert engine.on_timer(now + 10 * k + 5) is None
    assert engine.last_skip is Skip.ONLY_DUST and not engine.breaker.is_open


def test_a_dust_option_near_its_expiry_does_not_fire_the_expiry_rule() -> None:
    """A dated position below its minimum order (an option RFQ leg of 0.005 with a 0.01 minimum) a
    few minutes from expiry, beside a young perpetual: no `max_age`; a closable option does fire it."""
    option = "BTC-27DEC24-100000-C"
    expiry = INFOS[option].expiry_ts
    assert expiry is not None
    now = expiry - 600  # 10 min to go, inside the default 30 min window
    for amount, fires in ((0.005, False), (0.05, True)):
        book = ledger()
        book.apply_fill(fill(option, "buy", amount, 3000.0, ts=now - 60))
        book.apply_fill(fill(PERP, "buy", 0.5, 100_000.0, ts=now - 60))
        book.apply_tick(tick(option, 3000.0, ts=now - 1))
        book.apply_tick(tick(PERP, 100_000.0, ts=now - 1))
        decision = RulesEngine(cfg(partial_close_fraction=0.0)).on_snapshot(book.snapshot(1, now, 60), now)
        assert (decision is not None and decision.reason is CloseReason.MAX_AGE) is fires


positions = st.lists(st.tuples(
    st.integers(0, 3000),  # ten-thousandths
    st.sampled_from([(0.0001, 0.001), (0.001, 0.001), (0.001, 0.01), (0.01, 0.1), (0.1, 0.1), (1.0, 1.0)]),
), min_size=1, max_size=5)


@given(held=positions)
def test_the_time_limit_fires_iff_some_position_is_closable(
        held: list[tuple[int, tuple[float, float]]]) -> None:
    """Every position a day old: the engine closes on age exactly when the executor would send an order
    for at least one of them (`executor.plan.order_amount`, the independent oracle)."""
    book, now = ledger(), 2 * DAY
    sendable = []
    for n, (units, (volume_tick, minimum)) in enumerate(held):
        amount = round(units * 0.0001, 4)
        if amount == 0:
            continue
        name = f"X{n}-PERPETUAL"
        info = FINE_PERP.model_copy(update={"volume_tick_size": volume_tick, "min_order_amount": minimum})
        book.set_instrument(name, info)
        book.apply_fill(fill(name, "buy", amount, 100.0, ts=1.0))
        book.apply_tick(tick(name, 100.0, ts=now - 1))
        sendable.append(order_amount(amount, amount, info) > 0)
    engine = RulesEngine(cfg(partial_close_fraction=0.0, max_position_age_hours=24))
    decision = engine.on_snapshot(book.snapshot(1, now, 60), now)
    assert (decision is not None and decision.reason is CloseReason.MAX_AGE) is any(sendable)
    if decision is None:
        assert engine.last_skip is (Skip.ONLY_DUST if sendable else Skip.NO_POSITIONS)
