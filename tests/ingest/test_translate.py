"""The pure translation of Thalex messages into wire documents, and its errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from services.ingest.translate import (
    BOOKING_FIELDS,
    Book,
    MalformedMessage,
    UnbookableTrade,
    fill_from_trade,
    instrument_info,
    position_from_entry,
    positions_from_portfolio,
    tick_from_index,
    tick_from_ticker,
    unrecognised,
    with_book,
)

TRADE = {  # api.yaml's example Trade, with the fields the paper exchange adds
    "order_id": "00011E570000004A", "trade_id": "0080000000000000169F22D05B785A2B",
    "instrument_name": "BTC-PERPETUAL", "direction": "sell", "price": 47280, "amount": 0.1,
    "label": "", "time": 1630059868.4145653, "position_after": -1.1, "trade_type": "normal",
    "session_realised_after": 25, "fee_rate": 0.00025, "index": 47200, "fee": 1.18,
    "funding_mark": 0.014, "leg_index": 0, "maker_taker": "maker", "client_order_id": 7,
}


def test_trade_becomes_a_fill_with_fee_liquidity_and_position() -> None:
    fill = fill_from_trade(TRADE, ingest_ts=1630059869.0)
    assert (fill.trade_id, fill.order_id, fill.instrument) == (
        TRADE["trade_id"],
        TRADE["order_id"],
        "BTC-PERPETUAL",
    )
    assert (fill.side, fill.price, fill.amount, fill.signed_amount) == ("sell", 47280, 0.1, -0.1)
    assert (fill.fee, fill.fee_rate, fill.liquidity) == (1.18, 0.00025, "maker")
    assert (fill.position_after, fill.funding_mark, fill.client_order_id) == (-1.1, 0.014, 7)
    assert fill.label is None  # Thalex sends "" for no label
    assert (fill.exchange_ts, fill.ingest_ts) == (TRADE["time"], 1630059869.0)


def test_a_rebate_is_a_negative_fee_and_optional_fields_may_be_absent() -> None:
    minimal = {k: TRADE[k] for k in ("trade_id", "order_id", "instrument_name", "direction", "price",
                                     "amount", "time")} | {"fee": -0.2}
    fill = fill_from_trade(minimal, 0.0)
    assert fill.fee == -0.2 and fill.liquidity is None and fill.position_after is None
    assert fill.trade_type == "normal"


@pytest.mark.parametrize(("change", "liquidity", "trade_type", "noted"), [
    ({"maker_taker": ""}, None, "normal", []),
    ({"maker_taker": None}, None, "normal", []),
    ({"maker_taker": "both"}, None, "normal", ["maker_taker 'both' (published without liquidity)"]),
    ({"maker_taker": "taker"}, "taker", "normal", []),
    ({"trade_type": "settlement"}, "maker", "normal", ["trade_type 'settlement' (published as normal)"]),
    ({"trade_type": ""}, "maker", "normal", []),
    ({"trade_type": None}, "maker", "normal", []),
    ({"trade_type": "liquidation"}, "maker", "liquidation", []),
    ({"trade_type": "expiration", "maker_taker": ""}, None, "expiration", []),
])
def test_a_word_the_guardian_does_not_know_never_costs_the_fill(
        change: dict, liquidity: str | None, trade_type: str, noted: list[str]) -> None:
    """`''` or an unknown `maker_taker` is no liquidity; a trade type Thalex adds later is read as
    `normal` (its amount and fee count): the fill is published either way, the shell warns."""
    trade = TRADE | change
    fill = fill_from_trade(trade, 0.0)
    assert (fill.amount, fill.fee, fill.side) == (0.1, 1.18, "sell")
    assert (fill.liquidity, fill.trade_type) == (liquidity, trade_type)
    assert unrecognised(trade) == noted


TRADE_FIELDS = {  # api.yaml `Trade.properties`, none of them required there
    "trade_type", "trade_id", "order_id", "instrument_name", "direction", "price", "amount", "label", "time",
    "position_after", "session_realised_after", "position_pnl", "perpetual_funding_pnl", "fee", "index",
    "fee_rate", "funding_mark", "liquidation_fee", "client_order_id", "maker_taker", "bot_id", "leg_index",
}
API_YAML = Path(__file__).resolve().parents[2] / ".." / "shared" / "thalex-api" / "api.yaml"


def test_the_field_list_is_api_yamls_trade() -> None:
    if not API_YAML.exists():
        pytest.skip(f"Thalex api.yaml not found at {API_YAML} (the shared folder is a sibling of the repo)")
    trade = yaml.safe_load(API_YAML.read_text())["components"]["schemas"]["Trade"]
    assert set(trade["properties"]) == TRADE_FIELDS
    assert "required" not in trade


FULL_TRADE = TRADE | {"position_pnl": -3.5, "perpetual_funding_pnl": 0.1, "liquidation_fee": 0.0,
                      "bot_id": "B1"}


@pytest.mark.parametrize("name", sorted(TRADE_FIELDS))
def test_a_trade_missing_any_field_is_kept_unless_it_cannot_be_booked(name: str) -> None:
    trade = {k: v for k, v in FULL_TRADE.items() if k != name}
    if name in BOOKING_FIELDS:
        with pytest.raises(UnbookableTrade, match=f"cannot be booked without {name}"):
            fill_from_trade(trade, 5.0)
        return
    fill = fill_from_trade(trade, 5.0)
    assert (fill.trade_id, fill.instrument, fill.side, fill.price, fill.amount) == (
        TRADE["trade_id"], "BTC-PERPETUAL", "sell", 47280, 0.1)
    expected_missing = {"fee": "fee", "order_id": "order_id", "index": "index", "fee_rate": "fee_rate",
                        "funding_mark": "funding_mark", "position_after": "position_after",
                        "maker_taker": "liquidity", "client_order_id": "client_order_id",
                        "liquidation_fee": "liquidation_fee"}
    if name in expected_missing:
        assert getattr(fill, expected_missing[name]) is None
    if name == "time":
        assert fill.exchange_ts == 5.0  # the receive time
    if name == "trade_type":
        assert fill.trade_type == "normal"


def test_a_trade_without_fee_keeps_its_fee_unknown_and_null_is_missing() -> None:
    for trade in ({k: v for k, v in TRADE.items() if k != "fee"}, TRADE | {"fee": None}):
        fill = fill_from_trade(trade, 0.0)
        assert fill.fee is None and fill.fee_rate == 0.00025 and fill.index == 47200
        assert "fee" not in json.loads(fill.model_dump_json(exclude_none=True))
    zero = fill_from_trade(TRADE | {"fee": 0}, 0.0)
    assert zero.fee == 0.0  # a fee of 0 is the exchange's figure


def test_an_expiration_and_a_liquidation_as_thalex_sends_them() -> None:
    expiry = {"trade_type": "expiration", "trade_id": "X1", "instrument_name": "BTC-27DEC24-100000-C",
              "direction": "sell", "price": 0, "amount": 10, "time": 1735286400, "fee": 0,
              "position_after": 0, "index": 95000}
    fill = fill_from_trade(expiry, 1.0)
    assert (fill.trade_type, fill.order_id, fill.price, fill.fee) == ("expiration", None, 0, 0)
    liquidation = TRADE | {"trade_type": "liquidation", "liquidation_fee": 23.64, "order_id": ""}
    fill = fill_from_trade(liquidation, 1.0)
    assert (fill.trade_type, fill.liquidation_fee, fill.fee) == ("liquidation", 23.64, 1.18)
    assert fill.order_id is None  # "" is no order


def test_a_trade_that_cannot_be_booked_names_every_missing_field() -> None:
    with pytest.raises(UnbookableTrade, match=r"^Trade: cannot be booked without trade_id, price, amount$"):
        fill_from_trade({"instrument_name": "X", "direction": "buy", "price": None}, 0.0)


@pytest.mark.parametrize(("change", "expected"), [
    ({"price": "47280"}, r"Trade: price: Input should be a valid number"),
    ({"direction": "up"}, r"Trade 0080.*side: Input should be 'buy' or 'sell'"),
    ({"amount": 0}, r"Trade 0080.*amount: Input should be greater than 0"),
    ({"maker_taker": 5}, r"Trade: maker_taker: Input should be a valid string"),
    ({"client_order_id": 1.5}, r"client_order_id 1.5 is not an integer"),
    ({"price": math.nan}, r"Trade: price: Input should be a finite number"),
])
def test_malformed_trades_say_which_field_and_why(change: dict, expected: str) -> None:
    trade = {k: v for k, v in (TRADE | change).items() if v is not None}
    with pytest.raises(MalformedMessage, match=expected):
        fill_from_trade(trade, 0.0)


def test_a_trade_that_is_not_an_object() -> None:
    with pytest.raises(MalformedMessage, match="Trade: expected an object, got list"):
        fill_from_trade([1, 2], 0.0)


TICKER = {"mark_price": 100000.5, "mark_timestamp": 1700000000.25, "best_bid_price": 99999,
          "best_bid_amount": 1, "best_ask_price": 100001, "best_ask_amount": 2, "index": 99990,
          "funding_mark": 0.5, "delta": 1, "volume_24h": 0}


def test_ticker_becomes_a_tick_without_book_levels_when_not_followed() -> None:
    tick = tick_from_ticker("BTC-PERPETUAL", TICKER, 1700000000.3)
    assert (tick.mark, tick.best_bid, tick.best_ask, tick.index, tick.funding_mark) == (
        100000.5, 99999, 100001, 99990, 0.5)
    assert tick.bids is None and tick.asks is None
    assert (tick.exchange_ts, tick.ingest_ts) == (1700000000.25, 1700000000.3)


def test_an_empty_book_side_is_null_and_a_missing_mark_time_is_the_receive_time() -> None:
    tick = tick_from_ticker("X", {"mark_price": 5, "best_bid_price": None}, 7.0)
    assert tick.best_bid is None and tick.best_ask is None and tick.exchange_ts == 7.0


def test_a_ticker_without_mark_is_malformed() -> None:
    with pytest.raises(MalformedMessage, match="Ticker X: mark_price: Field required"):
        tick_from_ticker("X", {"best_bid_price": 1}, 0.0)
    with pytest.raises(MalformedMessage, match="Ticker X does not fit the wire contract: mark"):
        tick_from_ticker("X", {"mark_price": -1}, 0.0)


def test_an_index_notification_is_the_underlyings_own_tick() -> None:
    tick = tick_from_index("BTCUSD", {"index_name": "BTCUSD", "price": 47389.1, "timestamp": 946684800}, 9.0)
    assert (tick.instrument, tick.mark, tick.index, tick.exchange_ts, tick.ingest_ts) == (
        "BTCUSD", 47389.1, 47389.1, 946684800, 9.0)
    with pytest.raises(MalformedMessage, match="Index BTCUSD: price: Field required"):
        tick_from_index("BTCUSD", {"index_name": "BTCUSD"}, 9.0)


def test_book_snapshot_then_changes_give_the_top_levels_best_first() -> None:
    book = Book()
    assert book.apply({"bid_changes": [[99, 1, 1], [98, 2, 2], [97, 3, 3]],
                       "ask_changes": [[101, 1, 1], [103, 3, 3], [102, 2, 2]], "time": 5.0}) == 5.0
    book.apply({"bid_changes": [[99, 0, 0], [100, 4, 4]], "ask_changes": [[101, 1.5, 1.5]]})
    assert book.top(2) == ([(100, 4), (98, 2)], [(101, 1.5), (102, 2)])
    tick = tick_from_ticker("X", {"mark_price": 100}, 6.0, book, 3)
    assert tick.bids == [(100, 4), (98, 2), (97, 3)] and tick.asks == [(101, 1.5), (102, 2), (103, 3)]


def test_a_book_change_reissues_the_last_tick_with_new_levels() -> None:
    book = Book()
    book.apply({"bid_changes": [[99, 1, 1]], "ask_changes": [[101, 1, 1]]})
    tick = tick_from_ticker("X", {"mark_price": 100, "mark_timestamp": 10.0}, 10.5, book, 5)
    book.apply({"ask_changes": [[101, 0, 0], [102, 5, 5]], "time": 11.0})
    again = with_book(tick, book, 5, 11.0, 11.2)
    assert (
        again.asks == [(102, 5)]
        and again.mark == 100
        and (again.exchange_ts, again.ingest_ts) == (11.0, 11.2)
    )


def test_a_reissued_mark_says_when_it_was_marked() -> None:
    """A book change re-sends the ticker's mark with the book's time; `mark_ts` keeps the mark's own,
    so the portfolio never takes the same mark sent again for a new word from the exchange."""
    book = Book()
    book.apply({"bid_changes": [[99, 1, 1]], "ask_changes": [[101, 1, 1]], "time": 9.0})
    tick = tick_from_ticker("X", {"mark_price": 100, "mark_timestamp": 10.0}, 10.5, book, 5)
    assert tick.mark_ts is None and tick.mark_time == 10.0  # a ticker's mark is as new as its tick
    late_book = with_book(tick, book, 5, 9.5, 10.6)  # stamped no later than the mark: nothing older
    assert (late_book.exchange_ts, late_book.mark_ts) == (10.0, None)
    book.apply({"bid_changes": [[98, 2, 2]], "time": 11.0})
    once = with_book(tick, book, 5, 11.0, 11.2)
    book.apply({"bid_changes": [[97, 3, 3]], "time": 12.0})
    twice = with_book(once, book, 5, 12.0, 12.1)  # ingest re-issues its last tick, itself a re-issue
    assert [(t.exchange_ts, t.mark_ts, t.mark_time) for t in (once, twice)] == [
        (11.0, 10.0, 10.0), (12.0, 10.0, 10.0)]
    unstamped = with_book(twice, book, 5, None, 12.3)  # a book without `time` keeps the tick's
    assert (unstamped.exchange_ts, unstamped.mark_ts) == (12.0, 10.0)
    # a ticker without `mark_timestamp` is marked when received: its re-issue says so
    quiet = tick_from_ticker("X", {"mark_price": 100}, 13.0, book, 5)
    book.apply({"bid_changes": [[96, 1, 1]], "time": 13.5})
    assert with_book(quiet, book, 5, 13.5, 13.6).mark_ts == 13.0
    # the next ticker is a new mark again
    assert tick_from_ticker("X", {"mark_price": 101, "mark_timestamp": 14.0}, 14.1, book, 5).mark_ts is None


def test_a_ticker_newer_than_the_book_tops_it_with_its_best_levels() -> None:
    """The ticker and the book of one move arrive as two messages; the first must not mix them."""
    book = Book()
    book.apply(
        {"bid_changes": [[99, 1, 1], [98, 2, 2]], "ask_changes": [[101, 1, 1], [102, 2, 2]], "time": 5.0}
    )
    # the price moved up: the ticker (time 6) has a best bid of 100.5 x 0.5 and a best ask of 101.5 x 3
    up = {"mark_price": 101, "mark_timestamp": 6.0, "best_bid_price": 100.5, "best_bid_amount": 0.5,
          "best_ask_price": 101.5, "best_ask_amount": 3}
    tick = tick_from_ticker("X", up, 6.1, book, 5)
    # bids: the new best on top, the book's (worse) 99 and 98 below it
    # asks: 101 is better than the new best ask 101.5, so it is gone; 102 stays below
    assert tick.bids == [(100.5, 0.5), (99, 1), (98, 2)] and tick.asks == [(101.5, 3), (102, 2)]
    assert tick.best_bid == tick.bids[0][0] and tick.best_ask == tick.asks[0][0]
    # the book of the same move (time 6) arrives: it is the whole truth again
    book.apply({"bid_changes": [[99, 0, 0], [98, 0, 0], [100.5, 0.7, 0.7]],
                "ask_changes": [[101, 0, 0], [101.5, 3, 3]], "time": 6.0})
    assert with_book(tick, book, 5, 6.0, 6.2).bids == [(100.5, 0.7)]


def test_a_ticker_moving_down_or_emptying_a_side_drops_the_levels_it_shows_gone() -> None:
    book = Book()
    book.apply(
        {"bid_changes": [[99, 1, 1], [98, 2, 2], [97, 3, 3]], "ask_changes": [[101, 1, 1]], "time": 5.0}
    )
    down = {"mark_price": 98, "mark_timestamp": 6.0, "best_bid_price": 98, "best_bid_amount": 0.4}
    tick = tick_from_ticker("X", down, 6.1, book, 5)
    assert tick.bids == [(98, 0.4), (97, 3)]  # 99 is gone; 98 is the ticker's amount, the newer one
    assert tick.asks == [] and tick.best_ask is None  # the newer ticker shows no ask at all
    older = {"mark_price": 98, "mark_timestamp": 4.0, "best_bid_price": 90, "best_bid_amount": 1}
    late = tick_from_ticker("X", older, 6.2, book, 5)  # the book (time 5) is newer: its levels and top
    assert late.bids == [(99, 1), (98, 2), (97, 3)] and (late.best_bid, late.best_ask) == (99, 101)
    # stamped like a book change (the book's time, the mark's own as `mark_ts`): stamped 4.0 it would
    # be older than the book's re-issue before it, and the portfolio would drop its newer mark
    assert (late.exchange_ts, late.mark_ts, late.mark_time) == (5.0, 4.0, 4.0)


def test_a_book_newer_than_the_ticker_gives_the_best_bid_and_ask() -> None:
    """The mirror case: the book of a move arrives first; its top is the newer best bid and ask."""
    book = Book()
    book.apply({"bid_changes": [[99, 1, 1]], "ask_changes": [[101, 1, 1]], "time": 5.0})
    tick = tick_from_ticker(
        "X",
        {
            "mark_price": 100,
            "mark_timestamp": 5.0,
            "best_bid_price": 99,
            "best_bid_amount": 1,
            "best_ask_price": 101,
            "best_ask_amount": 1,
        },
        5.1,
        book,
        5,
    )
    book.apply({"bid_changes": [[99, 0, 0], [100.5, 2, 2]], "ask_changes": [[101, 0, 0]], "time": 6.0})
    again = with_book(tick, book, 5, 6.0, 6.1)
    assert (again.best_bid, again.bids, again.best_ask, again.asks) == (100.5, [(100.5, 2)], None, [])
    assert again.mark == 100  # the mark is the ticker's alone


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 5)), max_size=30),
       st.one_of(st.none(), st.integers(1, 40)), st.one_of(st.none(), st.integers(0, 5)), st.integers(1, 10))
def test_levels_topped_by_a_newer_ticker_are_its_best_then_the_worse_book(
        levels: list[tuple[int, int]], best: int | None, amount: int | None, depth: int) -> None:
    book = Book()
    book.apply({"bid_changes": [[p, a, a] for p, a in levels], "time": 1.0})
    tick = tick_from_ticker("X", {"mark_price": 20, "mark_timestamp": 2.0, "best_bid_price": best,
                                  "best_bid_amount": amount}, 2.0, book, depth)
    plain = sorted({p: a for p, a in levels}.items(), reverse=True)
    if best is None:
        expected = []
    else:
        expected = ([(best, amount)] if amount else []) + [(p, a) for p, a in plain if p < best]
    assert tick.bids == expected[:depth]
    prices = [p for p, _ in tick.bids]
    assert prices == sorted(set(prices), reverse=True)  # best first, no price twice


@pytest.mark.parametrize(("update", "expected"), [
    ({"bid_changes": [[99]]}, "bid_changes: level \\[99\\] needs"),
    ({"ask_changes": [["a", 1]]}, "ask_changes: price 'a' is not a finite number"),
    ({"ask_changes": [[1, -1]]}, "negative price or amount"),
    ({"bid_changes": "none"}, "bid_changes: Input should be a valid list"),
    ([], "book update: expected an object"),
])
def test_malformed_book_updates(update: object, expected: str) -> None:
    with pytest.raises(MalformedMessage, match=expected):
        Book().apply(update)


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 5)), max_size=60))
def test_book_levels_stay_sorted_positive_and_match_the_last_change(changes: list[tuple[int, int]]) -> None:
    book = Book()
    for price, amount in changes:
        book.apply({"bid_changes": [[price, amount, amount]], "ask_changes": [[price + 100, amount, amount]]})
    bids, asks = book.top(50)
    latest = {p: a for p, a in changes}
    assert bids == sorted(((p, a) for p, a in latest.items() if a > 0), reverse=True)
    assert [p for p, _ in asks] == sorted(p + 100 for p, a in latest.items() if a > 0)


def test_portfolio_entry_and_the_whole_view() -> None:
    entry = {"instrument_name": "BTC-PERPETUAL", "position": -0.5, "mark_price": 100, "index": 99,
             "start_price": 90, "average_price": 95, "unrealised_pnl": -2.5, "realised_pnl": 1,
             "entry_value": -45, "perpetual_funding_entry_value": 0.2, "unrealised_perpetual_funding": 0.1}
    pos = position_from_entry(entry)
    assert (pos.instrument, pos.position, pos.average_price, pos.realised_pnl) == (
        "BTC-PERPETUAL",
        -0.5,
        95,
        1,
    )
    assert (pos.perpetual_funding_entry_value, pos.unrealised_perpetual_funding) == (0.2, 0.1)
    no_average = position_from_entry({k: v for k, v in entry.items() if k != "average_price"})
    assert no_average.average_price == 90
    other = position_from_entry({"instrument_name": "A", "position": 0, "mark_price": 1})
    view = positions_from_portfolio([pos, other], 5.0, 6.0)
    assert [p.instrument for p in view.positions] == ["A", "BTC-PERPETUAL"]
    with pytest.raises(MalformedMessage, match="PortfolioEntry: position: Field required"):
        position_from_entry({"instrument_name": "A", "mark_price": 1})


def test_a_portfolio_line_needs_only_its_instrument_position_and_a_price_to_value_it() -> None:
    """api.yaml's `PortfolioEntry` requires nothing; without a mark or P&L a line still says what is held
    — but an open position with no price at all is refused, never valued from 0 (a short call "sold
    at 0" is a loss of its whole mark, a long perpetual "bought at 0" a profit of its whole price)."""
    bare = position_from_entry({"instrument_name": "BTC-29DEC23-50000-C", "position": -1,
                                "average_price": 1_500.0, "mark_price": None, "realised_pnl": None})
    assert (bare.instrument, bare.position, bare.mark_price) == ("BTC-29DEC23-50000-C", -1, None)
    assert (bare.realised_pnl, bare.unrealised_pnl, bare.average_price) == (None, None, 1_500.0)
    started = position_from_entry({"instrument_name": "X", "position": 1, "start_price": 90.0,
                                   "mark_price": 95.0})
    assert started.average_price == 90.0
    marked = position_from_entry({"instrument_name": "X", "position": 1, "mark_price": 95.0})
    assert marked.average_price == 95.0  # its P&L counts from the mark, as with baseline mark_at_start
    assert position_from_entry({"instrument_name": "X", "position": 0}).average_price == 0.0  # flat
    with pytest.raises(MalformedMessage, match="no average_price, start_price or mark_price"):
        position_from_entry({"instrument_name": "BTC-29DEC23-50000-C", "position": -1})
    with pytest.raises(MalformedMessage, match="PortfolioEntry: instrument_name: Field required"):
        position_from_entry({"position": 1})


def test_instrument_metadata() -> None:
    option = {"instrument_name": "BTC-10SEP21-70000-C", "product": "OBTCUSD", "tick_size": 5,
              "volume_tick_size": 0.1, "min_order_amount": 0.1, "underlying": "BTCUSD", "type": "option",
              "option_type": "call", "expiry_date": "2021-09-10", "expiration_timestamp": 1631260800,
              "strike_price": 70000, "base_currency": "USD", "create_time": 1631250800.103645}
    name, info = instrument_info(option)
    assert name == "BTC-10SEP21-70000-C"
    assert (info.type, info.product, info.underlying, info.expiry_ts) == (
        "option",
        "OBTCUSD",
        "BTCUSD",
        1631260800,
    )
    assert (info.tick_size, info.volume_tick_size, info.min_order_amount) == (5, 0.1, 0.1)
    with pytest.raises(MalformedMessage, match="min_order_amount must be >= volume_tick_size"):
        instrument_info(option | {"min_order_amount": 0.01})
    with pytest.raises(MalformedMessage, match="type: Input should be"):
        instrument_info(option | {"type": "spot"})
