"""Glitch-proof prices (issue 21, item 5): `PriceGuard` holds an implausible tick until confirmed.

Hand-worked cases with the arithmetic in the comments, then properties: a market that moves
plausibly is never held, one glitch between plausible ticks is never applied, and a held mark
re-sent by ingest with book changes (`with_book`) is never its own confirmation.
"""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from services.common.bus import Bus
from services.common.contracts import Fill, InstrumentInfo, InstrumentType, Snapshot, Tick
from services.common.service import Health
from services.common.streams import Names
from services.ingest.app import Ingest
from services.ingest.follow import Feed, book_channel, ticker_channel
from services.ingest.translate import Book, tick_from_ticker, with_book
from services.portfolio.app import build
from services.portfolio.prices import PriceGuard
from tests.support import eventually, in_process, read_stream, settings_for, xadd

PERP = "BTC-PERPETUAL"
CALL = "BTC-27DEC24-100000-C"


def tick(mark: float, ts: float, *, index: float | None = 60_000.0, instrument: str = PERP,
         bid: float | None = None, ask: float | None = None,
         bids: list[tuple[float, float]] | None = None) -> Tick:
    return Tick(instrument=instrument, mark=mark, index=index, exchange_ts=ts, ingest_ts=ts,
                best_bid=max(0.0, mark - 5) if bid is None else bid,
                best_ask=mark + 5 if ask is None else ask, bids=bids)


def guard() -> PriceGuard:
    g = PriceGuard(0.2)
    g.set_type(PERP, InstrumentType.PERPETUAL)
    g.set_type(CALL, InstrumentType.OPTION)
    return g


def test_the_forged_tick_of_the_probe_is_held_and_the_next_real_one_applied() -> None:
    g = guard()
    assert g.check(tick(60_000, 1)) is not None
    # mark 0 against an index of 60,000: |0 / 60,000 - 1| = 100 % > 20 %
    assert g.check(tick(0, 2, bid=0, ask=5, bids=[(0.0, 1.0)])) is None
    assert g.suspects == [PERP] and g.held[PERP].reason == "mark 0 is 100% from the index 60000"
    real = tick(60_010, 3)
    assert g.check(real) is real and g.suspects == []


def test_a_perpetual_marked_far_off_its_index_stays_held_however_often_it_is_repeated() -> None:
    g = guard()
    g.check(tick(60_000, 1))
    for ts in range(2, 6):  # the paper's mark pinned at 0.5: 0.5 / 60,000 - 1 = -100 %
        assert g.check(tick(0.5, ts, bid=0.4, ask=0.6)) is None
    # 75,000 against 60,000 is 25 % off: held; 71,000 is 18.3 % off (and +18.3 % from 60,000): fine
    assert g.check(tick(75_000, 6)) is None
    assert g.check(tick(71_000, 7)) is not None and g.suspects == []


def test_a_real_crash_moves_the_index_too_and_is_applied_at_once() -> None:
    g = guard()
    g.check(tick(60_000, 1))
    # both fall 30 %: mark 42,000 vs index 42,100 is 0.2 % apart; the index moved -29.8 % >= half of -30 %
    crash = tick(42_000, 2, index=42_100)
    assert g.check(crash) is crash


def test_an_option_jump_is_confirmed_by_the_next_tick_telling_the_same_story() -> None:
    g = guard()
    g.check(tick(1_000, 1, instrument=CALL, index=None))
    jump = tick(1_600, 2, instrument=CALL, index=None)  # +60 % > 20 %, no index to corroborate
    assert g.check(jump) is None and g.held[CALL].reason == "mark 1600 moved +60% from 1000"
    # the next tick within 20 % x 0.25 = 5 % of the held one (1,600 -> 1,630 is 1.8 %): confirmed
    confirmed = tick(1_630, 3, instrument=CALL, index=None)
    assert g.check(confirmed) is confirmed and g.suspects == []
    assert g.accepted[CALL] is confirmed


def test_a_glitch_that_is_not_repeated_is_never_applied() -> None:
    g = guard()
    g.check(tick(1_000, 1, instrument=CALL, index=None))
    assert g.check(tick(100, 2, instrument=CALL, index=None)) is None  # -90 %
    back = tick(1_010, 3, instrument=CALL, index=None)  # +1 % from the last accepted 1,000
    assert g.check(back) is back and g.suspects == []
    # a different jump does not confirm the first one: 100 then 2,000 (both held)
    assert g.check(tick(100, 4, instrument=CALL, index=None)) is None
    assert g.check(tick(2_000, 5, instrument=CALL, index=None)) is None


def option_ticker(mark: float, ts: float) -> dict[str, Any]:
    """A Thalex `Ticker` of the call: best bid 990 x 1, best ask 1,010 x 1, index 60,000."""
    return {"mark_price": mark, "mark_timestamp": ts, "index": 60_000, "best_bid_price": 990,
            "best_bid_amount": 1, "best_ask_price": 1_010, "best_ask_amount": 1}


def test_a_glitching_option_mark_resent_with_a_book_change_is_not_confirmed_by_it() -> None:
    """The review's scenario, through ingest's own translation: an option's ticker marks it +60 %
    with index and book unchanged; 20 ms later an unrelated book change arrives and ingest re-sends
    the last ticker's mark with the new book (`with_book`). That re-issue tells the held story again
    but it is the same mark, not the exchange's second word: it stays held. A later ticker telling
    the same story confirms it."""
    g = guard()
    book = Book()
    book.apply({"bid_changes": [[990, 1, 1]], "ask_changes": [[1_010, 1, 1]], "time": 1.0})
    real = tick_from_ticker(CALL, option_ticker(1_000, 1.0), 1.05, book, 5)
    assert g.check(real) is real
    glitch = tick_from_ticker(CALL, option_ticker(1_600, 2.0), 2.05, book, 5)  # +60 % > 20 %
    assert g.check(glitch) is None and g.held[CALL].reason == "mark 1600 moved +60% from 1000"
    book.apply({"bid_changes": [[985, 2, 2]], "time": 2.02})  # someone bids 985 under the best
    resent = with_book(glitch, book, 5, 2.02, 2.07)
    # mark, best bid and best ask all the held tick's, stamped later: before mark_ts, "confirmed"
    assert (resent.mark, resent.best_bid, resent.best_ask, resent.exchange_ts) == (1_600, 990, 1_010, 2.02)
    assert resent.mark_ts == 2.0
    assert g.check(resent) is None and g.suspects == [CALL]
    assert g.held[CALL].tick is resent and g.accepted[CALL] is real  # held with its newest book
    for ts in (2.04, 2.06, 2.08):  # however many book changes come, the mark stays held
        book.apply({"bid_changes": [[980, ts, ts]], "time": ts})
        resent = with_book(resent, book, 5, ts, ts + 0.01)
        assert g.check(resent) is None and g.accepted[CALL] is real
    # the next ticker (100 ms later) marks it 1,630: within 5 % of the held 1,600 (1.9 %), a newer mark
    confirmed = tick_from_ticker(CALL, option_ticker(1_630, 2.1), 2.15, book, 5)
    assert confirmed.mark_ts is None and g.check(confirmed) is confirmed and g.suspects == []
    # once accepted, a book change re-sending the mark is applied as before: its book prices the exit
    book.apply({"bid_changes": [[1_000, 1, 1]], "time": 2.2})
    later = with_book(confirmed, book, 5, 2.2, 2.25)
    assert later.mark_ts == 2.1 and g.check(later) is later and later.bids is not None
    assert later.bids[0] == (1_000, 1)


def test_a_glitch_that_the_next_ticker_contradicts_is_dropped_whatever_book_changes_resent_it() -> None:
    g = guard()
    book = Book()
    assert g.check(tick_from_ticker(CALL, option_ticker(1_000, 1.0), 1.05, book, 5)) is not None
    held = tick_from_ticker(CALL, option_ticker(1_600, 2.0), 2.05, book, 5)
    assert g.check(held) is None
    book.apply({"bid_changes": [[985, 2, 2]], "time": 2.02})
    assert g.check(with_book(held, book, 5, 2.02, 2.07)) is None
    back = tick_from_ticker(CALL, option_ticker(1_010, 2.1), 2.15, book, 5)  # +1 % from 1,000
    assert g.check(back) is back and g.suspects == [] and g.accepted[CALL].mark == 1_010


def test_a_book_priced_at_zero_resent_with_the_next_book_change_waits_for_a_ticker() -> None:
    """A book is kept as changes: a level at 0 stays in it through unrelated changes, so the next
    book change re-sends it. Only a newer ticker telling the same story confirms it."""
    g = guard()
    book = Book()
    book.apply({"bid_changes": [[59_990, 1, 1]], "ask_changes": [[60_010, 1, 1]], "time": 1.0})
    ticker = {"mark_price": 60_000, "mark_timestamp": 1.0, "index": 60_000, "best_bid_price": 59_990,
              "best_bid_amount": 1, "best_ask_price": 60_010, "best_ask_amount": 1}
    first = tick_from_ticker(PERP, ticker, 1.05, book, 5)
    assert g.check(first) is first
    book.apply({"bid_changes": [[0, 5, 5]], "time": 1.5})
    zero = with_book(first, book, 5, 1.5, 1.55)
    assert g.check(zero) is None and g.held[PERP].reason == "a bid level priced at 0"
    book.apply({"ask_changes": [[60_020, 1, 1]], "time": 1.6})
    assert g.check(with_book(zero, book, 5, 1.6, 1.65)) is None  # the same mark: no confirmation
    again = tick_from_ticker(PERP, {**ticker, "mark_price": 60_005, "mark_timestamp": 1.7}, 1.75, book, 5)
    assert again.bids is not None and again.bids[-1] == (0, 5)
    assert g.check(again) is again and g.suspects == []


def test_a_tick_of_an_older_ingest_still_confirms_with_a_later_time() -> None:
    """Ticks written before `mark_ts` existed (or still in the stream from an older ingest) cannot
    tell a book change's re-issue from a new ticker: each counts as a new mark, as before."""
    g = guard()
    g.check(tick(1_000, 1, instrument=CALL, index=None))
    held = tick(1_600, 2, instrument=CALL, index=None)
    assert g.check(held) is None
    old_reissue = held.model_copy(update={"exchange_ts": 2.02, "ingest_ts": 2.07, "bids": [(985.0, 2.0)]})
    assert old_reissue.mark_ts is None and g.check(old_reissue) is old_reissue  # as before mark_ts


def test_a_book_priced_at_zero_or_far_off_the_mark_is_held_until_repeated() -> None:
    g = guard()
    g.check(tick(60_000, 1))
    assert g.check(tick(60_000, 2, bids=[(60_000.0, 1.0), (0.0, 5.0)])) is None
    assert g.held[PERP].reason == "a bid level priced at 0"
    # best bid 45,000 vs mark 60,000: 25 % below
    assert g.check(tick(60_000, 3, bid=45_000)) is None and "best bid 45000 is 25%" in g.held[PERP].reason
    repeated = tick(60_010, 4, bid=45_100)  # mark +0.02 %, bid +0.2 %: the same story
    assert g.check(repeated) is repeated


def test_an_older_tick_passes_and_a_trusted_checkpoint_is_the_reference() -> None:
    g = guard()
    g.trust(tick(60_000, 10))
    old = tick(10, 5)
    assert g.check(old) is old  # the ledger ignores it (older than what it holds)
    assert g.check(tick(90_000, 11, index=90_100)) is not None  # moved with its index


moves = st.floats(min_value=-0.09, max_value=0.09)


@settings(max_examples=200, deadline=None)
@given(st.lists(moves, min_size=1, max_size=40))
def test_a_market_moving_plausibly_is_never_held(steps: list[float]) -> None:
    """Each tick moves mark and index together by under 9 %: nothing is ever held."""
    g = guard()
    mark = 60_000.0
    for i, step in enumerate(steps):
        mark *= 1 + step
        assert g.check(tick(mark, i + 1, index=mark * 1.001)) is not None


@settings(max_examples=200, deadline=None)
@given(st.lists(moves, min_size=2, max_size=30), st.integers(min_value=1, max_value=29),
       st.sampled_from([0.0, 0.3, 0.5, 1.6, 3.0]))
def test_one_glitch_between_plausible_ticks_is_never_applied(steps: list[float], at: int,
                                                           factor: float) -> None:
    g = guard()
    mark = 60_000.0
    at = min(at, len(steps) - 1)
    for i, step in enumerate(steps):
        mark *= 1 + step
        if i == at:  # the glitch: mark x factor (at least 50 % off), index unchanged
            assert g.check(tick(mark * factor, i + 0.5, index=mark)) is None
        applied = g.check(tick(mark, i + 1, index=mark))
        assert applied is not None and applied.mark == mark


@settings(max_examples=200, deadline=None)
@given(st.lists(moves, min_size=2, max_size=30), st.integers(min_value=1, max_value=29),
       st.sampled_from([0.3, 0.5, 1.6, 3.0]), st.integers(min_value=1, max_value=6), st.booleans())
def test_a_held_mark_resent_with_book_changes_waits_for_the_next_ticker(
        steps: list[float], at: int, factor: float, book_changes: int, real: bool) -> None:
    """An option marked at least 50 % off, then re-sent by ingest with any number of book changes
    (`with_book`): never applied until the next ticker, which either tells the same story (a real
    jump: applied, one ticker late) or the market's price (the glitch: never applied)."""
    g = guard()
    mark = 1_000.0
    at = min(at, len(steps) - 1)
    for i, step in enumerate(steps):
        mark *= 1 + step
        if i == at:
            held = tick(mark * factor, i + 0.1, instrument=CALL, index=None)
            assert g.check(held) is None
            for n in range(book_changes):
                held = with_book(held, Book(), 5, i + 0.2 + n / 100, i + 0.2 + n / 100)
                assert held.mark_ts == i + 0.1 and g.check(held) is None
            if real:
                mark *= factor
        applied = g.check(tick(mark, i + 1, instrument=CALL, index=None))
        assert applied is not None and applied.mark == mark


# --------------------------------------------------------------------------- the service

async def test_the_forged_tick_never_reaches_the_snapshot(redis_url: str, names: Names, redis: Redis) -> None:
    """A long 0.01 BTC at 60,000: a tick with mark 0 and bids at 0 would value it at -600 USD.
    The snapshot keeps the last plausible prices and flags the instrument suspect; the next real
    tick clears it."""
    now = time.time()
    await redis.hset(names.instruments, PERP, InstrumentInfo(
        type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD", tick_size=1.0,
        volume_tick_size=0.001, min_order_amount=0.001).model_dump_json())
    async with in_process(build, settings_for(redis_url, names), "portfolio"):
        await xadd(redis, names.fills, Fill(trade_id="T1", order_id="O1", instrument=PERP, side="buy",
                                            price=60_000.0, amount=0.01, fee=0.0, fee_rate=0.0,
                                            exchange_ts=now, ingest_ts=now))
        await xadd(redis, names.ticks, tick(60_000, now))
        await xadd(redis, names.ticks, tick(0, now + 0.1, bid=0, ask=5, bids=[(0.0, 1.0)]))

        async def flagged() -> bool:
            snaps = await read_stream(redis, names.snapshots, Snapshot)
            return bool(snaps) and snaps[-1].suspect_instruments == [PERP]

        await eventually(flagged)
        held = (await read_stream(redis, names.snapshots, Snapshot))[-1]
        assert held.positions[0].mark == 60_000.0 and held.unrealized_pnl == 0.0
        assert held.net_after_close > -1.0  # not the -600 the forged tick would give
        await xadd(redis, names.ticks, tick(60_100, now + 0.2))

        async def cleared() -> bool:
            snaps = await read_stream(redis, names.snapshots, Snapshot)
            return snaps[-1].suspect_instruments is None and snaps[-1].positions[0].mark == 60_100.0

        await eventually(cleared)


async def test_a_glitch_ingest_resends_with_a_book_change_never_reaches_the_snapshot(
        redis_url: str, names: Names, redis: Redis) -> None:
    """Ingest and the portfolio together: a long call at 1,000, its ticker marks it 1,600 (+60 %,
    index and book unchanged), 20 ms later an unrelated book change reaches ingest, which re-sends
    that mark with the new book (`Ingest.on_notification`, written by its `TickWriter`). The
    portfolio keeps valuing the call at 1,000 and flags it suspect; the next ticker telling the
    same story confirms it."""
    now = time.time()
    await redis.hset(names.instruments, CALL, InstrumentInfo(
        type=InstrumentType.OPTION, product="OBTCUSD", underlying="BTCUSD", tick_size=5.0,
        volume_tick_size=0.01, min_order_amount=0.01, expiry_ts=now + 30 * 86_400).model_dump_json())
    settings_ = settings_for(redis_url, names)
    bus = Bus(redis_url, names, "ingest")
    ingest = Ingest(settings_, bus, Health("ingest"))
    ticker_at = ticker_channel(CALL, settings_.ingest.ticker_delay)
    book_at = book_channel(CALL, ingest.levels, settings_.ingest.ticker_delay)
    ingest.channels = {ticker_at: (Feed.TICKER, CALL), book_at: (Feed.BOOK, CALL)}

    async def exchange_says(channel: str, notification: dict[str, Any], received: float) -> None:
        ingest.on_notification(channel, notification, json.dumps(notification), received)
        await ingest.ticks.flush()

    async def last_snapshot() -> Snapshot | None:
        snaps = await read_stream(redis, names.snapshots, Snapshot)
        return snaps[-1] if snaps else None

    try:
        async with in_process(build, settings_, "portfolio") as portfolio:
            await xadd(redis, names.fills, Fill(trade_id="T1", order_id="O1", instrument=CALL, side="buy",
                                                price=1_000.0, amount=1.0, fee=0.0, fee_rate=0.0,
                                                exchange_ts=now, ingest_ts=now))
            await exchange_says(book_at, {"bid_changes": [[990, 1, 1]], "ask_changes": [[1_010, 1, 1]],
                                          "time": now}, now)
            await exchange_says(ticker_at, option_ticker(1_000, now + 0.01), now + 0.01)

            async def valued() -> bool:
                snap = await last_snapshot()
                return snap is not None and bool(snap.positions) and snap.positions[0].mark == 1_000.0

            await eventually(valued)
            await exchange_says(ticker_at, option_ticker(1_600, now + 1), now + 1)

            async def flagged() -> bool:
                snap = await last_snapshot()
                return snap is not None and snap.suspect_instruments == [CALL]

            await eventually(flagged)
            await exchange_says(book_at, {"bid_changes": [[985, 2, 2]], "time": now + 1.02}, now + 1.02)

            async def resent_and_held() -> bool:  # the portfolio has read the re-sent mark
                held = portfolio.prices.held.get(CALL)
                return held is not None and held.tick.exchange_ts == now + 1.02

            await eventually(resent_and_held)
            assert portfolio.prices.held[CALL].tick.mark_ts == now + 1
            snap = await last_snapshot()
            assert snap is not None and snap.suspect_instruments == [CALL]
            assert snap.positions[0].mark == 1_000.0 and snap.unrealized_pnl == 0.0

            await exchange_says(ticker_at, option_ticker(1_630, now + 1.1), now + 1.1)

            async def confirmed() -> bool:
                snap = await last_snapshot()
                return (snap is not None and snap.suspect_instruments is None
                        and snap.positions[0].mark == 1_630.0)

            await eventually(confirmed)
    finally:
        await bus.redis.aclose()
