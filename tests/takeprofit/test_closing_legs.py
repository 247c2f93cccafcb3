"""Each open position's full close kept ready (services/takeprofit/legs.py): a decision never uses a
leg built from an older row, and the command lists the decision's legs as columns."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.bus import encode_document
from services.common.contracts import Legs, LegToClose, Snapshot, SnapshotPosition
from services.common.signing import sign_command, signed_text
from services.common.snapshots import SnapshotView
from services.takeprofit.rules import RulesEngine, build_command
from tests.takeprofit.factories import NOW, cfg, pos, snap

KEY = b"k" * 32


def priced(row: SnapshotPosition, fraction: float = 1.0) -> LegToClose:
    """What a decision lists for a fresh row, written out independently of legs.py."""
    return LegToClose(instrument=row.instrument, amount=row.position * fraction,
                      exit_price=row.exit_price, mark=row.mark, exit_within_depth=row.exit_within_depth)


def delta(seq: int, net_after_close: float, rows: list[SnapshotPosition], open_positions: int) -> Snapshot:
    """A v2 delta: the changed rows only, the whole book's count in the header."""
    return snap(seq, net_after_close, positions=rows).model_copy(
        update={"full": False, "open_positions": open_positions})


def test_a_decision_closes_each_row_as_the_last_snapshot_left_it() -> None:
    """Two legs; a delta moves one (1.0 → 0.5 at a new exit price 99): the decision lists 0.5 @ 99."""
    engine = RulesEngine(cfg())
    engine.on_snapshot(snap(1, 0.0, positions=[pos("A", 1.0), pos("B", -2.0)]), NOW)
    moved = pos("A", 0.5).model_copy(update={"exit_price": 99.0})
    decision = engine.on_snapshot(delta(2, 2.0, [moved], 2), NOW + 2)
    assert decision is not None
    assert list(decision.positions) == [priced(moved), priced(pos("B", -2.0))]
    assert decision.positions[0].amount == 0.5 and decision.positions[0].exit_price == 99.0


def test_a_stale_row_is_listed_without_prices_and_a_partial_close_is_not_the_ready_leg() -> None:
    engine = RulesEngine(cfg(confirm_snapshots=1, emergency_close_threshold=-10.0))
    engine.on_snapshot(snap(1, 0.0, positions=[pos("A", 1.0), pos("B", -2.0)]), NOW)
    stale_b = delta(2, -20.0, [], 2).model_copy(update={"stale_instruments": ["B"]})
    decision = engine.on_snapshot(stale_b, NOW + 2)
    assert decision is not None
    assert decision.positions[0] == priced(pos("A", 1.0))
    assert decision.positions[1] == LegToClose("B", -2.0, None, None, None)  # no exit price, no mark
    partial = RulesEngine(cfg(partial_profit_threshold=0.5, partial_close_fraction=0.5))
    partial.on_snapshot(snap(1, 0.0, positions=[pos("A", 1.0)]), NOW)
    half = partial.on_snapshot(delta(2, 0.7, [], 1), NOW + 2)
    assert half is not None and half.fraction == 0.5
    assert list(half.positions) == [priced(pos("A", 1.0), 0.5)]  # 1.0 × 0.5 = 0.5


def test_flat_rows_leave_and_a_full_snapshot_or_a_new_view_starts_over() -> None:
    engine = RulesEngine(cfg())
    engine.on_snapshot(snap(1, 0.0, positions=[pos("A", 1.0), pos("B", 1.0)]), NOW)
    assert len(engine.legs) == 2
    engine.on_snapshot(delta(2, 0.0, [pos("B", 0.0)], 1), NOW + 2)
    assert len(engine.legs) == 1
    engine.on_snapshot(snap(3, 0.0, positions=[pos("C", 1.0)]), NOW + 3)  # full: A is gone too
    assert len(engine.legs) == 1
    engine.view = SnapshotView([pos("D", 1.0), pos("E", 2.0), pos("F", 0.0)], seq=3)
    assert len(engine.legs) == 2


def test_a_full_close_uses_the_ready_legs_and_the_command_lists_them_as_columns() -> None:
    engine = RulesEngine(cfg())
    rows = [pos(f"BTC-OPT-{i}", -1.0 - i / 10) for i in range(50)]
    engine.on_snapshot(snap(1, 0.0, positions=rows), NOW)
    decision = engine.on_snapshot(delta(2, 2.0, [], 50), NOW + 2)
    assert decision is not None
    held = engine.view.rows
    assert all(leg is engine.legs.full_close(held[leg.instrument]) for leg in decision.positions)  # ready
    built = build_command(decision, NOW + 2, 30.0)
    assert built.legs == Legs.of(decision.positions) and built.positions is None
    assert built.closing().instrument == [f"BTC-OPT-{i}" for i in range(50)]
    signed, text = signed_text(built, KEY)
    assert signed == sign_command(built, KEY) and text == encode_document(signed).encode()


rows_of = st.lists(st.tuples(st.sampled_from("ABCDEF"), st.sampled_from([0.0, 1.0, -0.5, 2.0]),
                             st.floats(1.0, 1000.0)), max_size=4)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.tuples(st.booleans(), rows_of), min_size=1, max_size=12))
def test_whatever_the_snapshots_the_decision_lists_the_view_as_it_is_now(
        batches: list[tuple[bool, list[tuple[str, float, float]]]]) -> None:
    """Any sequence of full snapshots and deltas: a decision's legs equal the view's open rows priced
    from scratch (an independent recomputation), never a leg kept from a row since replaced."""
    engine = RulesEngine(cfg(confirm_snapshots=1))
    for seq, (full, changes) in enumerate(batches, start=1):
        rows = {name: pos(name, amount).model_copy(update={"exit_price": price})
                for name, amount, price in changes}
        snapshot = snap(seq, 0.0, positions=list(rows.values()))
        if not (full or seq == 1):
            snapshot = snapshot.model_copy(update={"full": False})
        engine.on_snapshot(snapshot, NOW + seq)
    view = engine.view
    decision = engine.on_snapshot(delta(len(batches) + 1, 5.0, [], len(view.open_positions())),
                                  NOW + len(batches) + 1)
    if not view.open_positions():
        return
    assert decision is not None
    assert list(decision.positions) == [priced(p) for p in view.open_positions()]
    assert len(engine.legs) == len(view.open_positions())
