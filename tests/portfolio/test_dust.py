"""Dust in the ledger: positions no order can close are listed, valued, and kept out of the time limit.

The dust loop this guards against: a max-age closure of 0.1005 BTC fills 0.1 and leaves 0.0005 (volume
tick 0.0001, minimum order 0.001); the new epoch kept the dust with its old `opened_ts`, so the
header's `oldest_position_ts` fired the time limit again after every cool-down.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.contracts import InstrumentInfo, InstrumentType
from services.common.dust import closable
from tests.portfolio.factories import (
    BTC_FUTURE,
    BTC_PERP,
    INFOS,
    exchange_position,
    fill,
    ledger,
    positions,
    tick,
)

approx = pytest.approx

FINE_PERP = InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                           tick_size=1.0, volume_tick_size=0.0001, min_order_amount=0.001)
"""Thalex's BTC perpetual sizes: an amount on a 0.0001 grid, an order of at least 0.001."""


def fine_book():  # type: ignore[no-untyped-def]
    book = ledger()
    book.set_instrument(BTC_PERP, FINE_PERP)
    return book


def test_a_closures_remainder_below_the_minimum_order_is_dust_valued_but_not_aged() -> None:
    book = fine_book()
    book.apply_fill(fill(BTC_PERP, "buy", 0.1005, 50_000, ts=1))
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, ts=50))
    book.apply_tick(tick(BTC_PERP, 50_100, ts=60))
    book.apply_tick(tick(BTC_FUTURE, 50_000, ts=60))
    assert book.snapshot(1, 61, 10).oldest_position_ts == 1 and book.dust() == ()
    book.apply_fill(fill(BTC_PERP, "sell", 0.1, 50_100, ts=70))  # the closure filled 0.1 of 0.1005
    snap = book.snapshot(2, 71, 10)
    assert snap.dust == [BTC_PERP] and snap.open_positions == 2 and snap.closable_positions == 1
    assert snap.oldest_position_ts == 50  # the future's: the dust's age is not the time limit's business
    row = next(p for p in snap.positions if p.instrument == BTC_PERP)
    assert row.position == approx(0.0005) and row.opened_ts == 1  # still shown, with its real age
    assert row.unrealized_pnl == approx(100 * 0.0005)  # and valued: (50100 - 50000) x 0.0005
    assert book.dust_words(BTC_PERP) == "BTC-PERPETUAL 0.0005 (minimum order 0.001, volume tick 0.0001)"


def test_dust_alone_in_the_new_epoch_gives_no_oldest_position_and_no_expiry() -> None:
    """The scenario: the epoch after the closure holds only the dust, its `opened_ts` a day old."""
    book = ledger()
    book.set_instrument(BTC_PERP, FINE_PERP)
    book.set_instrument(BTC_FUTURE, INFOS[BTC_FUTURE].model_copy(update={"volume_tick_size": 0.0001}))
    book.apply_fill(fill(BTC_PERP, "buy", 0.1005, 50_000, ts=1))
    book.apply_fill(fill(BTC_FUTURE, "sell", 0.0004, 50_000, ts=2))  # an RFQ leg below the minimum
    book.apply_fill(fill(BTC_PERP, "sell", 0.1, 50_000, ts=86_401))
    assert book.advance_epoch(now=86_402, completed_epoch=0)
    snap = book.snapshot(1, 86_403, 10)
    assert snap.epoch == 1 and snap.open_positions == 2 and snap.dust == sorted([BTC_PERP, BTC_FUTURE])
    assert snap.oldest_position_ts is None and snap.next_expiry is None and snap.closable_positions == 0


def test_below_one_volume_tick_is_dust() -> None:
    """An RFQ fill off the tick: 1.0005 closed by 1.0 leaves 0.0005 of a 0.001 tick."""
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 1.0005, 50_000, ts=1))
    book.apply_fill(fill(BTC_PERP, "sell", 1.0, 50_000, ts=2))
    snap = book.snapshot(1, 3, 10)
    assert snap.dust == [BTC_PERP] and snap.oldest_position_ts is None


def test_dust_grown_by_a_fill_into_a_closable_position_is_dated_from_that_fill() -> None:
    """The exposure the time limit is about starts with the fill that made it closable; dust staying
    dust keeps its date."""
    book = fine_book()
    book.apply_fill(fill(BTC_PERP, "buy", 0.0003, 50_000, ts=1))
    book.apply_fill(fill(BTC_PERP, "buy", 0.0002, 50_000, ts=5))  # still dust
    assert book.snapshot(1, 6, 10).positions[0].opened_ts == 1
    book.apply_fill(fill(BTC_PERP, "buy", 0.01, 50_000, ts=100_000))
    snap = book.snapshot(2, 100_001, 10)
    assert snap.dust is None and snap.oldest_position_ts == 100_000
    assert snap.positions[0].position == approx(0.0105)


def test_dust_grown_by_an_adopted_exchange_position_is_dated_from_the_adoption() -> None:
    book = fine_book()
    book.apply_fill(fill(BTC_PERP, "buy", 0.0005, 50_000, ts=1))
    report = positions(500, exchange_position(BTC_PERP, 0.0505, 50_000, 50_000))
    book.reconcile(report, now=500)
    book.reconcile(report, now=510)  # past the 5 s grace: adopted
    snap = book.snapshot(1, 511, 10)
    assert snap.dust is None and snap.oldest_position_ts == 510


def test_instrument_data_arriving_late_makes_a_known_position_dust() -> None:
    """Unknown sizes: taken as closable (nothing is known to stop an order); once known, dust."""
    book = ledger()
    book.apply_fill(fill("BTC-NEW-PERPETUAL", "buy", 0.0005, 50_000, ts=1))
    assert book.snapshot(1, 2, 10).dust is None
    book.set_instrument("BTC-NEW-PERPETUAL", FINE_PERP)
    assert book.snapshot(2, 3, 10).dust == ["BTC-NEW-PERPETUAL"]


sizes = st.sampled_from([(0.0001, 0.001), (0.001, 0.001), (0.01, 0.1), (0.1, 0.1), (1.0, 1.0), (0.001, 0.01)])


@given(books=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 10_000), sizes), min_size=1, max_size=6))
def test_oldest_position_is_the_oldest_closable_one_and_dust_is_the_rest(
        books: list[tuple[int, int, tuple[float, float]]]) -> None:
    """For any positions (in volume ticks of a ten-thousandth, some below the minimum order) and
    instrument sizes: the header's oldest opening is the minimum over the closable positions only, and
    `dust` lists exactly the others."""
    book = ledger()
    expected_dust, opened = [], []
    for n, (units, ts, (tick_size, minimum)) in enumerate(books):
        name = f"X{n}-PERPETUAL"
        info = FINE_PERP.model_copy(update={"volume_tick_size": tick_size, "min_order_amount": minimum})
        book.set_instrument(name, info)
        amount = round(units * 0.0001, 4)
        if amount == 0:
            continue
        book.apply_fill(fill(name, "buy", amount, 100.0, ts=float(ts)))
        if closable(amount, info):
            opened.append(float(ts))
        else:
            expected_dust.append(name)
    snap = book.snapshot(1, 20_000, 1e9)
    assert snap.dust == (sorted(expected_dust) or None)
    assert snap.oldest_position_ts == (min(opened) if opened else None)
    assert snap.closable_positions == len(opened)
