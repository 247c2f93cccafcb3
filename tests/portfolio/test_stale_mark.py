"""A moving book does not make an old mark fresh (review of the `mark_ts` change, issue 21 item 9).

Ingest re-issues the last ticker's mark with every book change, stamped with the book's time
(`exchange_ts`) and the mark's own (`mark_ts`). The ledger judged staleness on `exchange_ts`: with
the ticker slowed or silent and the book of a held instrument moving, the snapshot listed nothing
stale while `net_pnl` stood on a frozen mark. Stale is about the mark (what the position is valued
at); the book refreshes only the exit price. The ticks here come from ingest's own translation
(`Book`, `tick_from_ticker`, `with_book`), so the stamps are the ones ingest writes.
"""

from __future__ import annotations

import pytest

from services.common.config import PortfolioTakeProfit
from services.common.contracts import Tick
from services.ingest.translate import Book, tick_from_ticker, with_book
from services.portfolio.ledger import Ledger
from services.takeprofit.rules import RulesEngine, Skip
from tests.portfolio.factories import BTC_PERP, fill, ledger

T0 = 1_700_000_000.0
STALE_AFTER = 10.0


def ticker(mark: float, marked: float) -> dict[str, float]:
    return {"mark_price": mark, "mark_timestamp": marked, "best_bid_price": mark - 10,
            "best_bid_amount": 1.0, "best_ask_price": mark + 10, "best_ask_amount": 1.0}


def long_in_profit() -> tuple[Ledger, Book, Tick]:
    """0.1 BTC-PERPETUAL bought at 100,000, marked 100,500 at T0 (≈ +50 USD: above min profit)."""
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 0.1, 100_000, ts=T0 - 60))
    levels = Book()
    levels.apply({"bid_changes": [[100_490, 1, 1]], "ask_changes": [[100_510, 1, 1]], "time": T0 - 0.5})
    first = tick_from_ticker(BTC_PERP, ticker(100_500, T0), T0 + 0.01, levels, 5)
    assert book.apply_tick(first)
    return book, levels, first


def book_moves_for(book: Ledger, levels: Book, last: Tick, seconds: int) -> Tick:
    """The ticker says nothing for `seconds`; the book moves every second (ingest re-issues the mark)."""
    for s in range(1, seconds + 1):
        levels.apply({"bid_changes": [[100_490 + s, 1, 1]], "time": T0 + s})
        last = with_book(last, levels, 5, T0 + s, T0 + s + 0.01)
        assert book.apply_tick(last)
    return last


def test_a_mark_24_s_old_behind_a_live_book_is_stale_and_the_profit_barriers_wait() -> None:
    book, levels, first = long_in_profit()
    last = book_moves_for(book, levels, first, 24)
    assert (last.exchange_ts, last.mark_ts, last.mark) == (T0 + 24, T0, 100_500)  # the book is 0.2 s old
    snap = book.snapshot(1, now=T0 + 24.2, stale_after_seconds=STALE_AFTER)
    assert snap.stale_instruments == [BTC_PERP]  # the mark is 24.2 s old
    (row,) = snap.positions
    assert row.mark == 100_500 and row.exit_price == pytest.approx(100_514)  # the book moves the exit price
    engine = RulesEngine(PortfolioTakeProfit(cooldown_seconds=0.0, partial_close_fraction=0.0))
    assert snap.net_after_close > 1.1  # above min profit: only the stale mark holds it back
    assert engine.on_snapshot(snap, T0 + 24.2) is None and engine.last_skip is Skip.STALE_PRICES
    # the published deltas (the running heap of price ages) say the same as the full scan
    assert book.publish(2, now=T0 + 24.3, stale_after_seconds=STALE_AFTER).stale_instruments == [BTC_PERP]


def test_a_fresh_ticker_after_it_clears_the_stale_mark() -> None:
    book, levels, first = long_in_profit()
    book_moves_for(book, levels, first, 24)
    assert book.stale_instruments(T0 + 24.2, STALE_AFTER) == [BTC_PERP]
    fresh = tick_from_ticker(BTC_PERP, ticker(100_520, T0 + 24.1), T0 + 24.15, levels, 5)
    assert fresh.mark_ts is None and book.apply_tick(fresh)
    assert book.stale_instruments(T0 + 24.2, STALE_AFTER) == []
    engine = RulesEngine(PortfolioTakeProfit(cooldown_seconds=0.0, partial_close_fraction=0.0))
    decision = engine.on_snapshot(book.snapshot(1, now=T0 + 24.2, stale_after_seconds=STALE_AFTER), T0 + 24.2)
    assert decision is not None and decision.stale_instruments == ()


def test_a_ticker_marked_before_the_last_book_change_still_moves_the_mark() -> None:
    """The ticker and the book are two messages: a ticker can arrive after a newer book change.
    Stamped with its own (older) time it was dropped as older than the book's re-issue, and the
    ledger kept the older mark — now a stale one. Ingest stamps it like a book change."""
    book, levels, first = long_in_profit()
    book_moves_for(book, levels, first, 8)  # the last re-issue is stamped T0 + 8
    late = tick_from_ticker(BTC_PERP, ticker(100_530, T0 + 7.9), T0 + 8.05, levels, 5)
    assert (late.exchange_ts, late.mark_ts) == (T0 + 8, T0 + 7.9)
    assert book.apply_tick(late)
    assert book.snapshot(1, now=T0 + 15, stale_after_seconds=STALE_AFTER).positions[0].mark == 100_530
    assert book.stale_instruments(T0 + 15, STALE_AFTER) == []  # marked 7.1 s ago


def test_a_tick_without_mark_ts_is_judged_on_its_exchange_time_as_before() -> None:
    """An ingest older than `mark_ts` writes re-issues without it: each is as new as its time."""
    book, levels, first = long_in_profit()
    last = book_moves_for(book, levels, first, 24).model_copy(update={"mark_ts": None})
    assert book.apply_tick(last)
    assert book.stale_instruments(T0 + 24.2, STALE_AFTER) == []
    assert book.stale_instruments(T0 + 34.5, STALE_AFTER) == [BTC_PERP]
