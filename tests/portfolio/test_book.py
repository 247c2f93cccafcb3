"""Walking the book levels a tick carries to price a close."""

from __future__ import annotations

import pytest

from services.common.contracts import ExitPriceSource
from services.portfolio.book import exit_quote, walk_levels

BIDS = [(100.0, 1.0), (99.0, 1.0), (98.0, 5.0)]
ASKS = [(101.0, 1.0), (102.0, 2.0)]


def test_deep_book_long_sells_into_the_bids() -> None:
    quote = exit_quote(2.5, 100.5, 100.0, 101.0, BIDS, ASKS)
    # 1 @ 100 + 1 @ 99 + 0.5 @ 98 = 248 -> 248 / 2.5 = 99.2
    assert quote.price == pytest.approx(99.2)
    assert quote.source is ExitPriceSource.BOOK
    assert not quote.beyond_depth


def test_deep_book_short_buys_from_the_asks() -> None:
    quote = exit_quote(-2.0, 100.5, 100.0, 101.0, BIDS, ASKS)
    # 1 @ 101 + 1 @ 102 = 203 -> 101.5
    assert quote.price == pytest.approx(101.5)
    assert not quote.beyond_depth


def test_thin_book_prices_the_rest_at_the_worst_carried_level_and_flags_it() -> None:
    quote = exit_quote(-5.0, 100.5, None, None, BIDS, ASKS)
    # 1 @ 101 + 2 @ 102 = 305, the 2 beyond the carried depth @ 102 = 204 -> 509 / 5 = 101.8
    assert quote.price == pytest.approx(101.8)
    assert quote.source is ExitPriceSource.BOOK
    assert quote.beyond_depth


def test_exactly_the_carried_depth_is_not_beyond_it() -> None:
    assert walk_levels(ASKS, 3.0) == (pytest.approx(305 / 3), False)


def test_top_of_book_when_no_depth_is_known() -> None:
    long = exit_quote(3.0, 100.5, 100.0, 101.0, None, None)
    short = exit_quote(-3.0, 100.5, 100.0, 101.0, None, None)
    assert (long.price, long.source) == (100.0, ExitPriceSource.TOP_OF_BOOK)
    assert (short.price, short.source) == (101.0, ExitPriceSource.TOP_OF_BOOK)


def test_empty_side_is_valued_at_mark_and_flagged() -> None:
    assert exit_quote(1.0, 100.5, None, 101.0, [], ASKS).source is ExitPriceSource.MARK
    quote = exit_quote(-1.0, 100.5, 100.0, None, BIDS, None)
    assert (quote.price, quote.source) == (100.5, ExitPriceSource.MARK)


def test_flat_position_exits_at_mark() -> None:
    assert exit_quote(0.0, 100.5, 100.0, 101.0, BIDS, ASKS).price == 100.5
