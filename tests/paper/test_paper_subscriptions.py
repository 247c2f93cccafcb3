"""Subscriptions as api.yaml documents them, and every channel it lists, through the official client.

api.yaml (public/subscribe, private/subscribe, unsubscribe): "List of successfully subscribed
channels. Note that this method returns successfully even if no channels were valid; check the
return value." Every notification received here validates strictly against api.yaml.
"""

from __future__ import annotations

import datetime as dt

import pytest

from services.paper.keys import KeyFiles
from services.paper.testing import ControlError, PaperHandle

from .conftest import PERP
from .official import Official

pytestmark = pytest.mark.asyncio


def by_kind(paper: PaperHandle, kind: str, underlying: str = "BTCUSD") -> list[str]:
    """Instruments of a kind, earliest expiry first."""
    insts = [
        i for i in paper.exchange.market.instruments.values() if i.kind == kind and i.underlying == underlying
    ]
    return [i.name for i in sorted(insts, key=lambda i: (i.expiry_ts or 0, i.name))]


async def test_a_subscribe_mixing_valid_unknown_and_malformed_channels_subscribes_the_valid_ones(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        asked = [
            f"ticker.{PERP}.raw",
            "ticker.BTC-NOPE.raw",  # unknown instrument
            f"ticker.{PERP}",  # no delay
            f"ticker.{PERP}.7ms",  # no such delay
            f"book.{PERP}.0.5.5.raw",  # grouping not a multiple of the tick
            f"book.{PERP}.none.5.100ms",
            "price_index.BTCUSD",
            "price_index.XYZUSD",  # unknown underlying
            "no_such_channel",
            "",
            "account.orders",  # private: not on public/subscribe
            f"lwt.{PERP}.raw",
            f"lwt.{PERP}.raw",  # twice: listed once
        ]
        subscribed = await bot.result("public_subscribe", asked)
        assert subscribed == [
            f"ticker.{PERP}.raw",
            f"book.{PERP}.none.5.100ms",
            "price_index.BTCUSD",
            f"lwt.{PERP}.raw",
        ]
        private = await bot.result(
            "private_subscribe",
            [
                "account.portfolio",
                "account.nonsense",
                "session.orders",
                "ticker.BTC-NOPE.100ms",
                "instruments",
                "account.conditional_orders",
                "mm.rfqs",
                "account.summary.extra",
            ],
        )
        assert private == [
            "account.portfolio",
            "session.orders",
            "instruments",
            "account.conditional_orders",
            "mm.rfqs",
        ]
        # the valid ones deliver: snapshots at once, then changes
        for channel in (*subscribed, *private):
            await bot.notification(channel)
        await bot.result("buy", PERP, 0.5, order_type=__import__("thalex").OrderType.MARKET)
        await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 100500})
        assert (await bot.notification(f"ticker.{PERP}.raw", lambda t: t["mark_price"] == 100500))[
            "index"
        ] > 0
        assert (await bot.notification(f"lwt.{PERP}.raw", lambda t: t["m"] == 100500))["l"] == 100001
        assert (await bot.notification("account.portfolio", lambda lines: bool(lines)))[0]["position"] == 0.5
        assert await bot.notification("session.orders", lambda orders: bool(orders))
        await bot.settle()
        assert not [m for m in bot.notifications if "NOPE" in m["channel_name"] or "XYZ" in m["channel_name"]]
        # unsubscribe answers what it removed; the rest is left out the same way
        removed = await bot.result(
            "unsubscribe", [f"lwt.{PERP}.raw", "ticker.BTC-NOPE.raw", "account.portfolio", "never_subscribed"]
        )
        assert removed == [f"lwt.{PERP}.raw", "account.portfolio"]
        before = len(bot.of(f"lwt.{PERP}.raw"))
        await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 100600})
        await bot.notification(f"ticker.{PERP}.raw", lambda t: t["mark_price"] == 100600)
        await bot.settle()
        assert len(bot.of(f"lwt.{PERP}.raw")) == before
        # channels must be a list: the only way to fail the call
        assert await bot.error("public_subscribe", f"ticker.{PERP}.raw") == 6
        assert bot.problems() == []


async def test_private_channels_need_a_login(paper: PaperHandle, keys: dict[str, KeyFiles]) -> None:
    async with Official(paper.url) as bot:
        assert await bot.error("private_subscribe", ["account.orders"]) == 7
        assert await bot.result("public_subscribe", ["account.orders", "instruments"]) == ["instruments"]
        assert bot.problems() == []


async def test_leave_out_drops_valid_channels_from_the_answer_without_an_error_as_api_yaml_allows(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        book = f"book.{PERP}.none.5.raw"
        assert await paper.control("paper/leave_out", {"channels": ["account.portfolio"]}) == {
            "left_out": {"account.portfolio": None}}
        await paper.control("paper/leave_out", {"channels": [book], "count": 2})
        # left out: listed nowhere, no error, and not subscribed (no snapshot comes)
        assert await bot.result("private_subscribe", ["account.portfolio", "account.orders"]) == [
            "account.orders"]
        assert await bot.result("public_subscribe", [book, f"ticker.{PERP}.raw"]) == [f"ticker.{PERP}.raw"]
        assert await bot.result("public_subscribe", [book]) == []  # the second of its 2 answers
        await bot.settle()
        assert not bot.of("account.portfolio") and not bot.of(book)
        assert await bot.result("public_subscribe", [book]) == [book]  # its count used up
        assert await bot.result("private_subscribe", ["account.portfolio"]) == []  # until cleared
        assert await paper.control("paper/leave_out", {"channels": []}) == {"left_out": {}}
        assert await bot.result("private_subscribe", ["account.portfolio"]) == ["account.portfolio"]
        await bot.notification("account.portfolio")
        await bot.notification(book)
        with pytest.raises(ControlError):
            await paper.control("paper/leave_out", {"channels": "account.portfolio"})
        with pytest.raises(ControlError):
            await paper.control("paper/leave_out", {"channels": [book], "count": 0})
        assert bot.problems() == []


async def test_every_channel_of_api_yaml_delivers_notifications_that_validate(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    market = paper.exchange.market
    future = by_kind(paper, "future")[0]
    option = by_kind(paper, "option")[0]
    roll = next(n for n in by_kind(paper, "combination") if n.endswith("-PERPETUAL"))
    combination = f"[{PERP}:1,{future}:-1]"
    options_only_day = next(
        dt.datetime.fromtimestamp(market.instruments[n].expiry_ts or 0, dt.UTC).strftime("%Y-%m-%d")
        for n in by_kind(paper, "option")
        if not any(
            market.instruments[f].expiry_ts == market.instruments[n].expiry_ts
            for f in by_kind(paper, "future")
        )
    )
    future_day = dt.datetime.fromtimestamp(market.instruments[future].expiry_ts or 0, dt.UTC).strftime(
        "%Y-%m-%d"
    )
    public = [
        f"ticker.{PERP}.raw",
        f"ticker.{option}.100ms",
        f"ticker.{combination}.raw",
        f"ticker.{roll}.raw",
        f"lwt.{PERP}.raw",
        f"lwt.{option}.raw",
        f"lwt.{combination}.raw",
        f"book.{PERP}.none.5.raw",
        f"book.{roll}.none.all.raw",
        f"book.{PERP}.10.all.100ms",
        f"recent_trades.{PERP}.single",
        "recent_trades.BTCUSD.all",
        "recent_trades.BTCUSD.options",
        "recent_trades.BTCUSD.future_rolls",
        "price_index.BTCUSD",
        "underlying_statistics.BTCUSD",
        f"base_price.BTCUSD.{future_day}",
        f"base_price.BTCUSD.{options_only_day}",
        "index_components.ETHUSD",
        "instruments",
        "rfqs",
        "system",
        "banners",
    ]
    private = [
        "account.orders",
        "account.persistent_orders",
        "session.orders",
        "account.trade_history",
        "account.order_history",
        "account.portfolio",
        "account.summary",
        "account.conditional_orders",
        "account.bots",
        "account.rfqs",
        "account.rfq_history",
        "user.inbox_notifications",
        "session.mm_protection",
        "mm.rfqs",
        "mm.rfq_quotes",
    ]
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        assert await bot.result("public_subscribe", public) == public
        assert await bot.result("private_subscribe", private) == private
        await bot.result("set_cancel_on_disconnect", 10)
        import thalex

        await bot.result("buy", PERP, 0.3, order_type=thalex.OrderType.MARKET, label="lbl")
        await bot.result("buy", option, 0.1, order_type=thalex.OrderType.MARKET)
        await bot.result("buy", roll, 0.1, order_type=thalex.OrderType.MARKET)
        await bot.result("sell", PERP, 0.1, price=100900)  # rests (non-persistent)
        await paper.control("paper/notify", {"key_id": "trader", "message": "hello", "display_type": "info"})
        note = await bot.notification("user.inbox_notifications")
        await bot.result("mark_inbox_notification_as_read", note["notifications"][0]["id"])
        await bot.notification("user.inbox_notifications", lambda n: n["notifications"][0]["read"])
        await paper.control(
            "paper/set_banners", {"banners": [{"severity": "warning", "message": "maintenance"}]}
        )
        await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 100200})
        await paper.control("paper/move_index", {"underlying": "ETHUSD", "pct": 1})
        await paper.control("paper/reconnect_notice")
        # the expiration window and a day passing: price_index carries the expiration average,
        # instruments announces removals and additions
        status = await paper.control("paper/status")
        await paper.control(
            "paper/advance_clock", {"seconds": status["next_settlement"] - status["time"] - 600}
        )
        await paper.control("paper/step", {"count": 2, "dt": 1})
        await bot.notification("price_index.BTCUSD", lambda n: "expiration_progress" in n)
        await paper.control("paper/advance_clock", {"seconds": 700})
        await bot.notification("instruments", lambda items: any("removed" in i for i in items))
        await bot.settle(0.5)
        silent = {
            "account.rfq_history",
            "session.mm_protection",
        }  # no snapshot; nothing happens before issue 18
        seen = bot.channels_seen()
        expected = {
            c.split(".")[0]
            if c.split(".")[0]
            in (
                "ticker",
                "lwt",
                "book",
                "recent_trades",
                "price_index",
                "underlying_statistics",
                "base_price",
                "index_components",
            )
            else c
            for c in public + private
        } - silent
        assert expected <= seen, expected - seen
        assert bot.of("account.conditional_orders") == [[]] and bot.of("account.bots") == [[]]
        assert (
            bot.of("mm.rfqs") == [[]] and bot.of("mm.rfq_quotes") == [[]] and bot.of("account.rfqs") == [[]]
        )
        tape = [row[:3] for rows in bot.of(f"recent_trades.{PERP}.single") for row in rows]
        assert [100001, 0.3, "buy"] in tape and [99999, 0.1, "sell"] in tape  # the roll's perpetual leg too
        assert bot.problems() == []


async def test_a_price_set_from_outside_sends_only_the_channels_that_show_it(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    """As on Thalex, one instrument's new mark (or trade) sends its ticker and book, not every
    instrument's; an index move sends every instrument of that underlying; a walk step sends everything."""
    option = by_kind(paper, "option")[0]
    eth = by_kind(paper, "perpetual", "ETHUSD")[0]
    future = by_kind(paper, "future")[0]
    expiry = dt.datetime.fromtimestamp(paper.exchange.market.instruments[future].expiry_ts or 0, dt.UTC)
    channels = [
        f"ticker.{PERP}.raw",
        f"ticker.{PERP}.100ms",  # sent by the market loop once its delay has passed
        f"book.{PERP}.none.5.raw",
        f"ticker.{option}.raw",
        f"book.{option}.none.5.raw",
        f"ticker.[{PERP}:1,{future}:-1].raw",
        f"ticker.{eth}.raw",
        "price_index.BTCUSD",
        "price_index.ETHUSD",
        f"base_price.BTCUSD.{expiry:%Y-%m-%d}",
    ]
    async with Official(paper.url) as bot:
        assert await bot.result("public_subscribe", channels) == channels
        await bot.settle()

        async def sent_by(control: str, params: dict) -> set[str]:
            before = {name: len(bot.of(name)) for name in channels}
            await paper.control(control, params)
            await bot.settle()
            return {name for name in channels if len(bot.of(name)) > before[name]}

        assert await sent_by("paper/set_mark", {"instrument_name": PERP, "price": 100_250}) == {
            f"ticker.{PERP}.raw",
            f"ticker.{PERP}.100ms",
            f"book.{PERP}.none.5.raw",
            f"ticker.[{PERP}:1,{future}:-1].raw",  # a leg's mark moved
        }
        assert await sent_by("paper/set_mark", {"instrument_name": future, "price": 101_000}) == {
            f"ticker.[{PERP}:1,{future}:-1].raw",
            f"base_price.BTCUSD.{expiry:%Y-%m-%d}",  # the future's mark
        }
        assert await sent_by("paper/set_index", {"underlying": "ETHUSD", "price": 3_100}) == {
            f"ticker.{eth}.raw",
            "price_index.ETHUSD",
        }
        # the same level again: nothing moved, the market data goes out again all the same
        assert await sent_by("paper/set_index", {"underlying": "ETHUSD", "price": 3_100}) == {
            f"ticker.{eth}.raw",
            "price_index.ETHUSD",
        }
        # a benchmark's tick load: market data of the named instruments again, nothing moved
        assert await sent_by("paper/resend_market_data", {"instruments": [option, eth]}) == {
            f"ticker.{option}.raw",
            f"book.{option}.none.5.raw",
            f"ticker.{eth}.raw",
        }
        # a trade changes its instrument's ticker (last price, volume, open interest), no other
        perpetual = {f"ticker.{PERP}.raw", f"ticker.{PERP}.100ms", f"book.{PERP}.none.5.raw"}
        assert await sent_by("paper/trade", {"key_id": "trader", "instrument_name": PERP, "direction": "buy",
                                             "amount": 0.01, "price": 100_250}) == {
            *perpetual, f"ticker.[{PERP}:1,{future}:-1].raw"}
        for bad in ([], ["BTC-NOPE"], "BTC-PERPETUAL"):
            with pytest.raises(ControlError, match="instrument"):
                await paper.control("paper/resend_market_data", {"instruments": bad})
        btc = set(channels) - {f"ticker.{eth}.raw", "price_index.ETHUSD"}
        assert await sent_by("paper/move_index", {"underlying": "BTCUSD", "delta": 10}) == btc
        assert await sent_by("paper/step", {"count": 1}) == set(channels)


async def test_resending_market_data_skips_an_instrument_that_expired_meanwhile(paper: PaperHandle) -> None:
    """A benchmark's tick load outlives the day's 08:00: the future that expired has nothing to send."""
    future = by_kind(paper, "future")[0]
    status = await paper.control("paper/status")
    await paper.control("paper/advance_clock", {"seconds": status["next_settlement"] - status["time"] + 1})
    assert future in paper.exchange.market.expired
    sent = await paper.control("paper/resend_market_data", {"instruments": [future, PERP]})
    assert sent == {"instruments": 1}
    with pytest.raises(ControlError, match="unknown instrument BTC-NOPE"):
        await paper.control("paper/resend_market_data", {"instruments": [future, "BTC-NOPE"]})
