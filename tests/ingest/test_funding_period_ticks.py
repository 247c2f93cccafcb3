"""The day's last funding mark reaches the portfolio, however ingest's tick writer coalesces.

Seen in the guardian's end-to-end test (tests/paper/test_paper_guardian.py) under CPU load: the
paper jumped its clock over 08:00 UTC and sent, back to back, the ticker stamped just before the
settlement and the first one after it. Ingest's reader handed both to the tick writer before it
flushed (buffered messages are read without yielding), the newer replaced the older, and
`tp:ticks` went from a mark of before the jump straight to the new day: the portfolio settled the
day at that old mark and lost the funding accrued since (-29.87 USD booked, -32.38 USD on the
exchange). The ledger settles a day at the newest mark it saw of that day, so that mark must
never be coalesced away.
"""

from __future__ import annotations

import pytest

from services.common.bus import Bus, validate_entry
from services.common.contracts import Tick
from services.common.streams import Names
from services.ingest.app import TickWriter, ends_funding_period
from services.ingest.translate import Book, tick_from_ticker, with_book
from tests.portfolio.factories import BTC_PERP, fill, ledger, tick

SETTLEMENT = 1_704_096_000.0
"""2024-01-01 08:00:00 UTC."""
approx = pytest.approx


async def _written(bus: Bus) -> list[Tick]:
    return [validate_entry(Tick, fields) for _, fields in await bus.redis.xrange(bus.names.ticks)]


async def test_the_last_tick_before_the_settlement_is_written_even_when_a_newer_one_replaced_it(
        redis_url: str, names: Names) -> None:
    bus = Bus(redis_url, names, "ingest")
    writer = TickWriter(bus)
    try:
        # one burst, no flush in between: what the reader hands over from a full socket buffer
        writer.add(tick(BTC_PERP, 100_000, funding_mark=-1.0, ts=SETTLEMENT - 3_600))  # 07:00
        writer.add(tick(BTC_PERP, 100_000, funding_mark=-4.0, ts=SETTLEMENT - 0.001))  # 07:59:59.999
        writer.add(tick(BTC_PERP, 100_000, funding_mark=-0.0001, ts=SETTLEMENT + 0.05))  # the new day
        writer.add(tick(BTC_PERP, 100_000, funding_mark=-0.0002, ts=SETTLEMENT + 0.1))
        await writer.flush()
        written = await _written(bus)
    finally:
        await bus.redis.aclose()
    # within a day only the newest counts (07:00 and 08:00:00.05 coalesced); the day's last stays
    assert [(t.exchange_ts, t.funding_mark) for t in written] == [
        (SETTLEMENT - 0.001, -4.0), (SETTLEMENT + 0.1, -0.0002)]

    # what the portfolio books from them: long 0.01 bought at 07:00 at funding mark -1.0,
    # E = -1.0 x 0.01 = -0.01
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 0.01, 100_000, funding_mark=-1.0, ts=SETTLEMENT - 3_600))
    for written_tick in written:
        book.apply_tick(written_tick)
    (settled,) = book.take_settlements()
    # settled at the day's last mark: -4.0 x 0.01 - (-0.01) = -0.03 realised (the funding from 07:00
    # to 08:00, what Thalex's DailyMark.realized_funding_pnl says); had 07:59:59.999 been coalesced
    # away it would have settled at -1.0: -1.0 x 0.01 + 0.01 = 0, and the 0.03 USD were lost
    assert (settled.funding_mark, settled.realized) == (-4.0, approx(-0.03))
    # then the new day: -0.03 realised + (-0.0002 x 0.01 - 0) unrealised = -0.030002
    assert book.totals().funding_pnl == approx(-0.030002)


def test_only_a_funding_mark_replaced_by_a_later_day_ends_a_period() -> None:
    before = tick(BTC_PERP, 100_000, funding_mark=-4.0, ts=SETTLEMENT - 0.001)
    assert ends_funding_period(before, tick(BTC_PERP, 100_000, funding_mark=0.0, ts=SETTLEMENT))
    assert not ends_funding_period(before, tick(BTC_PERP, 100_000, funding_mark=-4.1, ts=SETTLEMENT - 0.0005))
    # no funding (a future, an option): nothing to settle, coalesced as usual
    assert not ends_funding_period(tick("BTC-27DEC24", 100_000, ts=SETTLEMENT - 0.001),
                                   tick("BTC-27DEC24", 100_000, ts=SETTLEMENT + 1))


def test_a_book_update_after_the_settlement_does_not_carry_the_day_befores_funding_mark() -> None:
    book = Book()
    book.apply({"bid_changes": [[99_999, 1, 1]], "ask_changes": [[100_001, 1, 1]],
                "time": SETTLEMENT - 0.002})
    last = tick_from_ticker(BTC_PERP, {"mark_price": 100_000, "mark_timestamp": SETTLEMENT - 0.001,
                                       "funding_mark": -4.0}, SETTLEMENT, book, 5)
    book.apply({"bid_changes": [[99_999, 2, 2]], "time": SETTLEMENT - 0.0005})
    assert with_book(last, book, 5, SETTLEMENT - 0.0005, SETTLEMENT).funding_mark == -4.0  # same day
    book.apply({"bid_changes": [[99_999, 3, 3]], "time": SETTLEMENT + 0.02})
    after = with_book(last, book, 5, SETTLEMENT + 0.02, SETTLEMENT + 0.03)
    # the new day's funding mark starts from 0 and is not known yet: -4.0 booked as today's would
    # count the day's funding twice (realised -4.0 x q - E at the settlement, and -4.0 x q again)
    assert (after.exchange_ts, after.funding_mark, after.bids) == (SETTLEMENT + 0.02, None, [(99_999, 3)])


def test_a_ticker_later_than_the_settlement_book_does_not_carry_the_day_befores_funding_mark() -> None:
    """A ticker marked before 08:00 that arrives after a book change stamped after it is stamped like
    that book change (the book's time, its own as `mark_ts`), so its funding mark is dropped too."""
    book = Book()
    book.apply({"bid_changes": [[99_999, 1, 1]], "ask_changes": [[100_001, 1, 1]],
                "time": SETTLEMENT + 0.02})
    late = tick_from_ticker(BTC_PERP, {"mark_price": 100_000, "mark_timestamp": SETTLEMENT - 0.001,
                                       "funding_mark": -4.0}, SETTLEMENT + 0.03, book, 5)
    assert (late.exchange_ts, late.mark_ts) == (SETTLEMENT + 0.02, SETTLEMENT - 0.001)
    assert late.funding_mark is None
