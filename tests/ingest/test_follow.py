"""What ingest follows: positions, fresh fills, the watch list, flat-since timers."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.ingest.follow import Feed, Follow, book_channel, ticker_channel

T, B = ticker_channel, book_channel


def follow(watch: tuple[str, ...] = ()) -> Follow:
    return Follow(watch, flat_after_seconds=60, ticker_delay="100ms", book_levels=10)


def test_watch_list_gets_tickers_only() -> None:
    f = follow(("ETH-PERPETUAL",))
    assert f.wanted(0) == {"ticker.ETH-PERPETUAL.100ms": (Feed.TICKER, "ETH-PERPETUAL")}


def test_a_position_gets_ticker_and_book() -> None:
    f = follow()
    f.on_portfolio([("BTC-PERPETUAL", 0.5)], now=0, complete=True)
    assert f.plan(0, []).subscribe == ["book.BTC-PERPETUAL.none.10.100ms", "ticker.BTC-PERPETUAL.100ms"]


def test_a_fill_in_a_new_instrument_is_followed_at_once_even_without_position() -> None:
    f = follow()
    f.on_fill("BTC-27DEC24", None, now=5)
    assert set(f.wanted(5)) == {T("BTC-27DEC24", "100ms"), B("BTC-27DEC24", 10, "100ms")}
    f.on_fill("ETH-PERPETUAL", 1.0, now=5)
    assert "ETH-PERPETUAL" in f.positions


def test_an_option_held_brings_the_index_of_its_underlying_once() -> None:
    f = follow(("BTC-27DEC24-90000-C",))
    for option in ("BTC-27DEC24-100000-C", "BTC-27DEC24-90000-C"):
        f.note_option(option, "BTCUSD")
    assert "price_index.BTCUSD" not in f.wanted(0)  # a watched option is not held
    f.on_portfolio([("BTC-27DEC24-100000-C", -1.0), ("BTC-27DEC24-90000-C", 2.0)], now=0, complete=True)
    wanted = f.wanted(0)
    assert wanted["price_index.BTCUSD"] == (Feed.INDEX, "BTCUSD")
    assert sum(1 for feed, _ in wanted.values() if feed is Feed.INDEX) == 1
    f.on_portfolio([], now=1, complete=True)
    assert "price_index.BTCUSD" not in f.wanted(61)  # both flat for long enough: dropped with them


def test_flat_instruments_are_dropped_after_the_configured_time() -> None:
    f = follow()
    f.on_portfolio([("BTC-PERPETUAL", 1.0)], now=0, complete=True)
    held = list(f.wanted(0))
    f.on_fill("BTC-PERPETUAL", 0.0, now=100)
    assert not f.plan(159.9, held)  # still followed: a quoter may be back in a moment
    plan = f.plan(160, held)
    assert plan.subscribe == [] and plan.unsubscribe == sorted(held)


def test_going_flat_and_back_resets_the_timer() -> None:
    f = follow()
    f.on_portfolio([("X", 1.0)], 0, complete=True)
    f.on_portfolio([("X", 0.0)], 10, complete=False)
    f.on_portfolio([("X", -1.0)], 50, complete=False)
    f.on_portfolio([("X", 0.0)], 60, complete=False)
    assert "X" in f.instruments(119) and "X" not in f.instruments(120)


def test_a_complete_portfolio_without_a_line_means_flat_there() -> None:
    f = follow()
    f.on_portfolio([("X", 1.0), ("Y", 2.0)], 0, complete=True)
    f.on_portfolio([("Y", 2.0)], 10, complete=True)
    assert set(f.positions) == {"Y"} and f.flat_since == {"X": 10}
    f.on_portfolio([("Z", 1.0)], 20, complete=False)  # a partial update says nothing about Y
    assert set(f.positions) == {"Y", "Z"}


def test_a_repeated_flat_line_does_not_restart_the_timer() -> None:
    f = follow()
    f.on_portfolio([("X", 0.0)], 0, complete=True)
    f.on_portfolio([("X", 0.0)], 30, complete=True)
    assert f.flat_since == {"X": 0}


def test_a_watched_instrument_is_never_unsubscribed() -> None:
    f = follow(("X",))
    f.on_portfolio([("X", 1.0)], 0, complete=True)
    f.on_portfolio([("X", 0.0)], 1, complete=True)
    assert f.plan(1000, f.wanted(0)).unsubscribe == [B("X", 10, "100ms")]


@given(st.lists(st.tuples(st.sampled_from("ABC"), st.sampled_from([-1.0, 0.0, 2.0]),
                          st.floats(0, 10)), max_size=30))
def test_plans_converge(events: list[tuple[str, float, float]]) -> None:
    f, now, held = follow(("W",)), 0.0, set[str]()
    for name, position, dt in events:
        now += dt
        f.on_fill(name, position, now)
        plan = f.plan(now, held)
        held = (held | set(plan.subscribe)) - set(plan.unsubscribe)
        assert held == set(f.wanted(now)) and not f.plan(now, held)
        assert T("W", "100ms") in held
        for instrument, pos in f.positions.items():
            assert pos != 0 and B(instrument, 10, "100ms") in held
