"""Property: folding the v2 snapshots (changed rows only) reproduces the full snapshot exactly.

The ledger is driven by the same random scripts as `test_ledger_properties.py` (fills, ticks,
late trades, clock jumps across funding settlements, redeliveries, restarts), plus epoch advances,
and publishes at random points (`Ledger.publish`: full when due, else the rows changed since the
last one). A reader folds every published snapshot into a `SnapshotView`; after each one:

* the folded rows are exactly the rows of the full snapshot built at that moment
  (`Ledger.snapshot`, every position), and its header — totals, open count, next expiry,
  oldest opening, stale list — is exactly the full one's;
* the totals are, bit for bit, `math.fsum` over the folded rows (an independent recomputation:
  the ledger's running sums must be exact, not merely close);
* take-profit's engine fed the published (delta) form decides exactly what an engine fed the
  v1 full form decides: the same decision (command id, reason, fraction, figure, positions,
  groups) or the same reason for none.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.common.bus import encode_document, encode_document_bytes
from services.common.config import PortfolioTakeProfit
from services.common.contracts import Snapshot
from services.common.snapshots import Fold, SnapshotView, encode_snapshot
from services.portfolio.ledger import Ledger
from services.takeprofit.rules import RulesEngine
from tests.portfolio import factories
from tests.portfolio.factories import BTC_CALL, BTC_PERP, ETH_FUTURE, INFOS, config
from tests.portfolio.test_ledger_properties import (
    BUFFER,
    FEES,
    LateFill,
    Redeliver,
    Restart,
    Run,
    fills,
    passes,
    ticks,
)

STALE_AFTER = 3_600.0
"""Clock jumps of the scripts (5 s .. 50 h) make some prices stale and others not."""


@dataclass(frozen=True)
class Advance:
    """A full closure completed: the epoch advances (flat positions leave the book)."""


scripts = st.lists(
    st.tuples(st.one_of(fills, fills, ticks, ticks, ticks, st.builds(LateFill, fill=fills), passes,
                        st.builds(Redeliver, which=st.integers(min_value=0, max_value=1_000)),
                        st.just(Restart()), st.just(Advance())),
              st.booleans()),
    min_size=5,
    max_size=60,
)


def v1_form(full: Snapshot) -> Snapshot:
    """The same snapshot as an old (v1) portfolio wrote it: every row, derived figures left out."""
    doc = full.model_dump(mode="json", exclude_none=True,
                          exclude={"v", "full", "open_positions", "next_expiry"})
    return Snapshot.model_validate_json(json.dumps({**doc, "v": 1}), strict=True)


def assert_same(folded: Snapshot, full: Snapshot) -> None:
    assert {p.instrument: p for p in folded.positions} == {p.instrument: p for p in full.positions}
    assert folded.model_dump(exclude={"positions", "full"}) == full.model_dump(exclude={"positions", "full"})
    rows = folded.positions
    assert folded.realized_pnl == math.fsum(p.realized_pnl for p in rows)
    assert folded.unrealized_pnl == math.fsum(p.unrealized_pnl for p in rows)
    assert folded.funding_pnl == math.fsum(p.funding_pnl for p in rows)
    assert folded.fees_paid == math.fsum(p.fees_paid for p in rows)
    assert folded.est_close_fees == math.fsum(p.est_close_fee for p in rows)
    assert folded.est_slippage == math.fsum(p.est_slippage for p in rows)
    assert (folded.fees_estimated or 0.0) == math.fsum(p.fees_estimated or 0.0 for p in rows)
    assert folded.open_positions == sum(1 for p in rows if p.position != 0.0)


def decision_of(engine: RulesEngine, snap: Snapshot, now: float) -> object:
    decision = engine.on_snapshot(snap, now)
    if decision is None:
        return engine.last_skip
    engine.on_closure_finished(decision.command_id, completed=False, now=now)  # free for the next
    return decision.model_dump(exclude={"sentence"})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts, st.sampled_from([0.01, 1.0, 50.0]), st.sampled_from([-0.01, -5.0, -100.0]),
       st.integers(min_value=1, max_value=2))
def test_folding_the_published_snapshots_reproduces_the_full_snapshot(
        script: list[tuple[object, bool]], target: float, stop: float, confirm: int) -> None:
    cfg = config(fee_estimation_buffer=float(BUFFER), fees=FEES, drift_grace_seconds=0.0)
    run = Run(cfg, Ledger(cfg))
    for name in (BTC_PERP, ETH_FUTURE, BTC_CALL):
        run.ledger.set_instrument(name, INFOS[name])
    rules = PortfolioTakeProfit(min_profit_usd=target, emergency_close_threshold=stop,
                                confirm_snapshots=confirm, cooldown_seconds=0.0, max_position_age_hours=30.0,
                                partial_close_fraction=0.5, partial_profit_threshold=target / 2)
    on_delta, on_full = RulesEngine(rules), RulesEngine(rules)
    view = SnapshotView()
    seq = 0
    for n, (step, publish) in enumerate(script, start=1):
        if isinstance(step, Advance):
            run.ledger.advance_epoch(float(run.clock))
        else:
            run.play(n, step)
        if not publish:
            continue
        seq += 1
        now = float(run.clock)
        published = run.ledger.publish(seq, now, STALE_AFTER)
        full = run.ledger.snapshot(seq, now, STALE_AFTER)
        assert view.fold(published) is Fold.APPLIED
        assert_same(view.full_snapshot(published), full)
        assert encoded_from_rows(published) == encode_document(published)
        decided = decision_of(on_delta, published, now + 0.5)
        assert decided == decision_of(on_full, v1_form(full), now + 0.5)
        rows = len(published.positions)
        event("full" if published.full else f"delta of {rows if rows < 2 else 'more'} rows")
        event(f"decision: {decided['reason']}" if isinstance(decided, dict) else f"no decision: {decided}")


def encoded_from_rows(snapshot: Snapshot) -> str:
    """The entry as the portfolio writes it: its rows encoded once (for the rows' hash) and spliced in."""
    rows = [encode_document_bytes(p) for p in snapshot.positions]
    assert [row.decode() for row in rows] == [encode_document(p) for p in snapshot.positions]
    return encode_snapshot(snapshot, rows).decode()


def test_a_snapshot_spliced_from_its_encoded_rows_is_the_snapshot_encoded_whole() -> None:
    """Every field after `positions` too (the suspects the service adds), with no row and with several."""
    book = factories.ledger()
    book.apply_fill(factories.fill(BTC_PERP, "buy", 0.1, 100_000.0, ts=1_000.0))
    book.apply_fill(factories.fill(ETH_FUTURE, "sell", 1.0, 3_000.0, ts=1_000.0))
    full = book.publish(1, 1_001.0, STALE_AFTER).model_copy(update={"suspect_instruments": [BTC_PERP]})
    empty = book.publish(2, 1_002.0, STALE_AFTER)
    assert len(full.positions) == 2 and empty.positions == []
    for snapshot in (full, empty):
        assert encoded_from_rows(snapshot) == encode_document(snapshot)
        assert Snapshot.model_validate_json(encoded_from_rows(snapshot), strict=True) == snapshot


def test_a_ticker_re_sent_at_the_same_prices_leaves_its_row_out_of_the_delta() -> None:
    """An options book's tickers are re-sent many times a second at unchanged prices: a delta lists
    only rows whose figures moved, so a snapshot under that load stays small."""
    book = factories.ledger()
    book.apply_fill(factories.fill(BTC_PERP, "buy", 0.1, 100_000.0, ts=1_000.0))
    book.apply_fill(factories.fill(ETH_FUTURE, "sell", 1.0, 3_000.0, ts=1_000.0))
    book.apply_tick(factories.tick(BTC_PERP, 100_000.0, best_bid=99_990.0, best_ask=100_010.0, ts=1_001.0))
    book.apply_tick(factories.tick(ETH_FUTURE, 3_000.0, best_bid=2_999.0, best_ask=3_001.0, ts=1_001.0))
    first = book.publish(1, 1_001.0, STALE_AFTER)
    assert first.full and {p.instrument for p in first.positions} == {BTC_PERP, ETH_FUTURE}

    # the same prices again, a second later: both positions valued again, neither row differs
    book.apply_tick(factories.tick(BTC_PERP, 100_000.0, best_bid=99_990.0, best_ask=100_010.0, ts=1_002.0))
    book.apply_tick(factories.tick(ETH_FUTURE, 3_000.0, best_bid=2_999.0, best_ask=3_001.0, ts=1_002.0))
    same = book.publish(2, 1_002.0, STALE_AFTER)
    assert not same.full and same.positions == []
    assert same.net_after_close == first.net_after_close

    # the perpetual's mark moves by 10: its row only (unrealised 0.1 × 10 = 1.0 more)
    book.apply_tick(factories.tick(BTC_PERP, 100_010.0, best_bid=100_000.0, best_ask=100_020.0, ts=1_003.0))
    book.apply_tick(factories.tick(ETH_FUTURE, 3_000.0, best_bid=2_999.0, best_ask=3_001.0, ts=1_003.0))
    moved = book.publish(3, 1_003.0, STALE_AFTER)
    assert [p.instrument for p in moved.positions] == [BTC_PERP]
    assert moved.unrealized_pnl - first.unrealized_pnl == 0.1 * 10.0

    view = SnapshotView()
    for snap in (first, same, moved):
        assert view.fold(snap) is Fold.APPLIED
    assert_same(view.full_snapshot(moved), book.snapshot(3, 1_003.0, STALE_AFTER))
