"""Thalex's server-side bots on the paper's market, through the official client; every message checked
strictly against api.yaml (DHedge/DFollow bots allowed the bot_id/status/stop_reason api.yaml leaves out).

The ``paper`` fixture pins BTC-PERPETUAL's mark at 100000 with 1.0-lots one tick apart around it: a
resting bid fills (as maker, at its price) once the mark falls to it, an ask once the mark rises to it.
"""

from __future__ import annotations

import math
import time

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, problems
from .official import Official

CHANNELS = ["account.bots", "account.orders", "account.trade_history", "account.portfolio"]


async def _now(paper: PaperHandle) -> float:
    """The paper's clock (the fixture starts it on a fixed day: bots' end times count from it)."""
    return float((await paper.control("paper/status"))["time"])


async def _mark(paper: PaperHandle, price: float) -> None:
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": price})


async def _trader(official, keys: dict[str, KeyFiles]) -> Official:
    client: Official = await official(keys["trader"])
    await client.result("private_subscribe", CHANNELS)
    for snapshot in ("account.bots", "account.orders", "account.portfolio"):
        await client.notification(snapshot)
    return client


def _resting(client_orders: list[dict], bot_id: str) -> list[tuple[str, float]]:
    return sorted((o["direction"], o["price"]) for o in client_orders if o.get("bot_id") == bot_id)


async def _quotes(client: Official, bot_id: str, expected: list[tuple[str, float]]) -> None:
    """Wait until the bot's open orders are ``expected`` (direction, price)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _resting(await client.result("open_orders"), bot_id) == sorted(expected):
            return
        await client.settle(0.05)
    assert _resting(await client.result("open_orders"), bot_id) == sorted(expected)


async def _position(client: Official, instrument: str = PERP) -> float:
    return next(
        (p["position"] for p in await client.result("portfolio") if p["instrument_name"] == instrument), 0.0
    )


async def _stopped(client: Official, bot_id: str) -> dict:
    listing = await client.notification(
        "account.bots", lambda n: any(b["bot_id"] == bot_id and b["status"] == "stopped" for b in n)
    )
    return next(b for b in listing if b["bot_id"] == bot_id)


@pytest.mark.asyncio
async def test_grid_bot_buys_low_sells_high_on_a_moving_market_and_exits_at_its_downside_price(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    grid = [99850, 99900, 99950, 100050, 100100, 100150]
    bot = await client.result(
        "create_grid_bot",
        await _now(paper) + 3600,
        PERP,
        grid,
        0.01,
        upside_exit_price=100300,
        downside_exit_price=99700,
        label="grid",
    )
    assert (bot["strategy"], bot["status"], bot["base_position"], bot["label"]) == (
        "grid",
        "active",
        0,
        "grid",
    )
    bot_id = bot["bot_id"]
    assert (await client.notification("account.bots"))[0]["bot_id"] == bot_id
    # At the base position: bids below the mean (the mark, 100000), asks above.
    await _quotes(
        client,
        bot_id,
        [("buy", 99850), ("buy", 99900), ("buy", 99950), *[("sell", p) for p in (100050, 100100, 100150)]],
    )

    # The mark falls to 99940: the 99950 bid is bought (maker), that level stays empty, the asks stay.
    await _mark(paper, 99940)
    (trade,) = await client.notification("account.trade_history")
    assert (trade["price"], trade["amount"], trade["maker_taker"], trade["bot_id"], trade["label"]) == (
        99950,
        0.01,
        "maker",
        bot_id,
        "grid",
    )
    await _quotes(
        client, bot_id, [("buy", 99850), ("buy", 99900), ("sell", 100050), ("sell", 100100), ("sell", 100150)]
    )

    # Up to 100060: the 100050 ask sells the step back; the 99950 bid returns (100050 waits while crossed).
    await _mark(paper, 100060)
    (trade,) = await client.notification("account.trade_history")
    assert (trade["direction"], trade["price"], trade["position_after"]) == ("sell", 100050, 0)
    await _quotes(
        client, bot_id, [("buy", 99850), ("buy", 99900), ("buy", 99950), ("sell", 100100), ("sell", 100150)]
    )

    # Down through every bid and below the downside exit (99700): it buys 0.03, then sells it back and stops.
    await _mark(paper, 99690)
    stopped = await _stopped(client, bot_id)
    assert stopped["stop_reason"] == "strategy"
    assert await _position(client) == 0
    trades = (await client.result("trade_history", sort=thalex.Sort.ASC))["trades"]
    assert sorted((t["direction"], t["price"], t["maker_taker"]) for t in trades[2:5]) == [
        ("buy", 99850, "maker"),
        ("buy", 99900, "maker"),
        ("buy", 99950, "maker"),
    ]
    assert (trades[5]["direction"], trades[5]["amount"], trades[5]["price"], trades[5]["maker_taker"]) == (
        "sell",
        0.03,
        99689,
        "taker",
    )
    assert all(t["bot_id"] == bot_id and t["label"] == "grid" for t in trades)
    assert _resting(await client.result("open_orders"), bot_id) == []
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_levels_bot_sells_its_ask_levels_then_exits_at_its_upside_price(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    bot = await client.result(
        "create_levels_bot",
        await _now(paper) + 3600,
        PERP,
        [99900, 99950],
        [100050, 100100],
        0.01,
        upside_exit_price=100250,
        downside_exit_price=99750,
        label="levels",
    )
    bot_id = bot["bot_id"]
    assert (bot["bids"], bot["asks"], bot["base_position"]) == ([99900, 99950], [100050, 100100], 0)
    await _quotes(client, bot_id, [("buy", 99900), ("buy", 99950), ("sell", 100050), ("sell", 100100)])

    await _mark(paper, 100060)  # the 100050 ask sells: one step short, that level is used up
    await client.notification("account.trade_history")
    await _quotes(client, bot_id, [("buy", 99900), ("buy", 99950), ("sell", 100100)])
    await _mark(paper, 100120)  # the 100100 ask sells: two steps short, no ask left
    await client.notification("account.trade_history")
    await _quotes(client, bot_id, [("buy", 99900), ("buy", 99950)])
    assert await _position(client) == -0.02

    await _mark(paper, 100300)  # above the upside exit: back to the base position (0) and stop
    stopped = await _stopped(client, bot_id)
    assert stopped["stop_reason"] == "strategy"
    assert await _position(client) == 0
    (last,) = (await client.result("trade_history", limit=1))["trades"]
    assert (last["direction"], last["amount"], last["price"], last["maker_taker"]) == (
        "buy",
        0.02,
        100301,
        "taker",
    )
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_bots_requote_after_cancel_all_and_cancel_all_bots_stops_every_bot(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    end = await _now(paper) + 3600
    grid = await client.result(
        "create_grid_bot",
        end,
        PERP,
        [99900, 99950, 100050, 100100],
        0.01,
        upside_exit_price=100300,
        downside_exit_price=99700,
    )
    levels = await client.result(
        "create_levels_bot",
        end,
        PERP,
        [99800],
        [100200],
        0.01,
        upside_exit_price=100300,
        downside_exit_price=99700,
    )
    sgsl = await client.result(
        "create_sgsl_bot", end, PERP, thalex.Target.MARK, 100100, 0.02, 99900, 0, label="sgsl"
    )
    await _quotes(
        client, grid["bot_id"], [("buy", 99900), ("buy", 99950), ("sell", 100050), ("sell", 100100)]
    )
    await _quotes(client, levels["bot_id"], [("buy", 99800), ("sell", 100200)])  # both bots quoting first

    # A client's cancel_all deletes the bots' orders; the bots quote again at once (they do not listen).
    assert await client.result("cancel_all") == 6
    await _quotes(
        client, grid["bot_id"], [("buy", 99900), ("buy", 99950), ("sell", 100050), ("sell", 100100)]
    )
    await _quotes(client, levels["bot_id"], [("buy", 99800), ("sell", 100200)])

    assert await client.result("cancel_bot", grid["bot_id"]) is None
    assert (await _stopped(client, grid["bot_id"]))["stop_reason"] == "client_cancel"
    assert await client.result("cancel_all_bots") is None
    listing = await client.notification("account.bots", lambda n: all(b["status"] == "stopped" for b in n))
    assert {b["bot_id"]: b["stop_reason"] for b in listing} == {
        grid["bot_id"]: "client_cancel",
        levels["bot_id"]: "client_bulk_cancel",
        sgsl["bot_id"]: "client_bulk_cancel",
    }
    assert await client.result("open_orders") == []
    assert [b["status"] for b in await client.result("bots")] == ["stopped"] * 3
    assert await client.error("cancel_bot", "00B0DEAD00000000") == 1
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_sgsl_holds_its_target_above_entry_reopens_after_a_close_and_exits_below_exit(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    bot = await client.result(
        "create_sgsl_bot",
        await _now(paper) + 3600,
        PERP,
        thalex.Target.MARK,
        100100,
        0.02,
        99900,
        0,
        label="sgsl",
    )
    assert (
        bot["signal"],
        bot["entry_price"],
        bot["target_position"],
        bot["exit_price"],
        bot["exit_position"],
    ) == ("mark", 100100, 0.02, 99900, 0)
    await client.settle(0.2)
    assert await _position(client) == 0  # between exit and entry: nothing decided yet

    await _mark(paper, 100200)
    (trade,) = await client.notification("account.trade_history")
    assert (trade["direction"], trade["amount"], trade["bot_id"], trade["label"]) == (
        "buy",
        0.02,
        bot["bot_id"],
        "sgsl",
    )

    # A client closes the position: the bot buys it back (at most one aggressive order a second).
    await client.result("sell", PERP, 0.02, order_type=thalex.OrderType.MARKET, label="close")
    await client.notification("account.trade_history")
    (trade,) = await client.notification("account.trade_history", within=3)
    assert (trade["direction"], trade["amount"], trade["bot_id"]) == ("buy", 0.02, bot["bot_id"])

    await _mark(paper, 99800)
    (trade,) = await client.notification("account.trade_history", within=3)
    assert (trade["direction"], trade["amount"], trade["position_after"]) == ("sell", 0.02, 0)
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_ocq_quotes_around_the_signal_within_its_position_bounds_and_stops_at_end_time(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    bot = await client.result(
        "create_ocq_bot",
        await _now(paper) + 2.0,
        PERP,
        thalex.Target.MARK,
        -50,
        50,
        0.01,
        -0.01,
        0.02,
        label="ocq",
    )
    bot_id = bot["bot_id"]
    await _quotes(client, bot_id, [("buy", 99950), ("sell", 100050)])
    await _mark(paper, 99940)  # the bid fills; quotes follow the mark: 99890 / 99990
    await client.notification("account.trade_history")
    await _quotes(client, bot_id, [("buy", 99890), ("sell", 99990)])
    await _mark(paper, 99880)  # the bid fills again: at max_position 0.02 only the ask is left
    await client.notification("account.trade_history")
    await _quotes(client, bot_id, [("sell", 99930)])
    orders = [o for o in await client.result("open_orders") if o.get("bot_id") == bot_id]
    assert [(o["amount"], o["label"]) for o in orders] == [(0.01, "ocq")]

    stopped = await _stopped(client, bot_id)
    assert (stopped["stop_reason"], stopped["end_time"]) == ("end_time", bot["end_time"])
    assert await client.result("open_orders") == []
    assert await _position(client) == 0.02  # end_time leaves positions as they are
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_delta_hedger_and_delta_follower_trade_the_perpetual_after_their_period(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    instruments = await client.result("instruments")
    call = next(
        i["instrument_name"]
        for i in instruments
        if i["type"] == "option" and i["option_type"] == "call" and i["strike_price"] == 100000
    )
    await paper.control(
        "paper/trade", {"key_id": "trader", "instrument_name": call, "direction": "buy", "amount": 1.0}
    )
    delta = (await client.result("ticker", call))["delta"]
    assert 0.3 < delta < 0.8

    hedger = await client.result("create_delta_hedger_bot", None, PERP, 1, threshold=0.05, label="dh")
    assert (hedger["strategy"], hedger["target_delta"], hedger["threshold"], hedger["period"]) == (
        "dhedge",
        0,
        0.05,
        1,
    )
    trade = await client.notification(
        "account.trade_history", lambda n: n[0].get("bot_id") == hedger["bot_id"], within=4
    )
    # Hedge the call's delta with the perpetual (delta 1): sell delta, to the volume tick 0.0001.
    assert trade[0]["direction"] == "sell"
    assert trade[0]["amount"] == pytest.approx(round(delta, 4), abs=0.0001)
    assert await client.result("cancel_bot", hedger["bot_id"]) is None

    other: Official = await official(keys["other"])
    await other.result("private_subscribe", ["account.trade_history", "account.bots"])
    follower = await other.result(
        "create_delta_follower_bot", await _now(paper) + 600, PERP, call, 2.0, 1, threshold=0.01
    )
    assert (follower["target_instrument"], follower["target_amount"]) == (call, 2.0)
    trades = await other.notification("account.trade_history", within=4)
    # Follow 2 calls' delta with the perpetual: buy 2 * delta (through two 1.0 levels of the book).
    assert {t["direction"] for t in trades} == {"buy"}
    assert sum(t["amount"] for t in trades) == pytest.approx(2 * delta, abs=0.0002)
    await other.result("cancel_all_bots")
    for c in (client, other):
        await c.settle()
    assert problems(client, other) == []


@pytest.mark.asyncio
async def test_bots_stop_on_margin_breach_and_refuse_what_api_yaml_forbids(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    end = await _now(paper) + 3600
    bot = await client.result(
        "create_levels_bot",
        end,
        PERP,
        [99800],
        [100200],
        0.01,
        upside_exit_price=100300,
        downside_exit_price=99700,
    )
    # 250 BTC at 100000: required margin 10 % of 25M = 2.5M, above the 1M of cash.
    await paper.control(
        "paper/trade",
        {"key_id": "trader", "instrument_name": PERP, "direction": "buy", "amount": 250, "price": 100000},
    )
    assert (await _stopped(client, bot["bot_id"]))["stop_reason"] == "margin_breach"

    bad = [
        (
            "create_grid_bot",
            (end, PERP, [99990, 99993], 0.01),
            {"upside_exit_price": 100100, "downside_exit_price": 99900},
        ),
        (
            "create_grid_bot",
            (end, PERP, [99900, 100000], 0.02),
            {"upside_exit_price": 100100, "downside_exit_price": 99800},
        ),
        (
            "create_grid_bot",
            (await _now(paper) + 8 * 86400, PERP, [99900, 100000], 0.01),
            {"upside_exit_price": 100100, "downside_exit_price": 99800},
        ),
        (
            "create_grid_bot",
            (end, PERP, [99900, 100000], 0.01),
            {"upside_exit_price": 100300, "downside_exit_price": 99800},
        ),
        (
            "create_levels_bot",
            (end, PERP, [99980], [100000], 0.01),
            {"upside_exit_price": 100100, "downside_exit_price": 99900},
        ),
        ("create_sgsl_bot", (end, PERP, thalex.Target.MARK, 100002, 0.01, 100000, 0), {}),
        ("create_ocq_bot", (end, PERP, thalex.Target.MARK, 50, -50, 0.01, -0.01, 0.01), {}),
    ]
    for name, args, kwargs in bad:
        assert await client.error(name, *args, **kwargs) == 6, name
    reader: Official = await official(keys["reader"])
    assert await reader.error("cancel_all_bots") == 28
    await client.settle()
    assert problems(client, reader) == []
    assert {"private/create_bot", "private/subscribe"} <= client.methods_answered()


@pytest.mark.asyncio
async def test_a_bot_and_a_conditional_order_on_a_future_stop_when_it_expires(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    await client.result("private_subscribe", ["account.conditional_orders"])
    await client.notification("account.conditional_orders")
    status = await paper.control("paper/status")
    futures = [
        i for i in await client.result("instruments") if i["type"] == "future" and i["underlying"] == "BTCUSD"
    ]
    daily = min(futures, key=lambda i: i["expiration_timestamp"])
    assert daily["expiration_timestamp"] == status["next_settlement"]
    name = daily["instrument_name"]
    bot = await client.result(
        "create_ocq_bot", await _now(paper) + 3600, name, thalex.Target.MARK, -50, 50, 0.01, -0.01, 0.01
    )
    stop = await client.result("create_conditional_order", thalex.Direction.BUY, name, 0.01, 200000)
    await _quotes(
        client,
        bot["bot_id"],
        [
            ("buy", _off(await client.result("ticker", name), -50)),
            ("sell", _off(await client.result("ticker", name), 50)),
        ],
    )

    await paper.control("paper/advance_clock", {"seconds": status["next_settlement"] - status["time"] + 1})
    assert (await _stopped(client, bot["bot_id"]))["stop_reason"] == "instrument_deactivated"
    listing = await client.notification(
        "account.conditional_orders", lambda n: n and n[0]["status"] == "cancelled"
    )
    assert (listing[0]["order_id"], listing[0]["reject_reason"]) == (
        stop["order_id"],
        "instrument_deactivated",
    )
    assert await client.result("open_orders") == []
    await client.settle()
    assert problems(client) == []


def _off(ticker: dict, offset: float) -> float:
    """The OCQ's quote price at ``offset`` from the mark, on the 1-USD tick, away from the mark."""
    price = ticker["mark_price"] + offset
    return float(math.floor(price)) if offset < 0 else float(math.ceil(price))
