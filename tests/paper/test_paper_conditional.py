"""Conditional orders through the official client: stop, stop-limit, bracket and trailing stop, triggered
on the mark, the index and the last trade; every message checked strictly against api.yaml.

The ``paper`` fixture pins BTC-PERPETUAL's mark at 100000 (index 100000) with a book of 1.0-lots one
tick apart around the mark. The official client sends ``target`` as given: pass the string.
"""

from __future__ import annotations

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, problems
from .official import Official

BUY, SELL = thalex.Direction.BUY, thalex.Direction.SELL


async def _mark(paper: PaperHandle, price: float) -> None:
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": price})


async def _trader(official, keys: dict[str, KeyFiles]) -> Official:
    client: Official = await official(keys["trader"])
    await client.result(
        "private_subscribe", ["account.conditional_orders", "account.orders", "account.trade_history"]
    )
    assert await client.notification("account.conditional_orders") == []
    assert await client.notification("account.orders") == []
    return client


def _status(listing: list[dict], order_id: str) -> dict:
    return next((o for o in listing if o["order_id"] == order_id), {})


@pytest.mark.asyncio
async def test_stop_on_the_mark_becomes_a_reduce_only_market_order_with_its_label(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    await client.result("buy", PERP, 1.0, order_type=thalex.OrderType.MARKET)
    await client.notification("account.trade_history")
    await client.notification("account.orders")

    created = await client.result(
        "create_conditional_order", SELL, PERP, 2.0, 99500, target="mark", reduce_only=True, label="stop-1"
    )
    assert (created["status"], created["target"], created["reject_reason"], created["reduce_only"]) == (
        "created",
        "mark",
        "",
        True,
    )
    assert (
        _status(await client.notification("account.conditional_orders"), created["order_id"])["status"]
        == "active"
    )
    await _mark(paper, 99600)  # above the stop: nothing happens
    await client.settle(0.2)
    assert (await client.result("conditional_orders"))[0]["status"] == "active"

    # The mark at the stop: a market sell, cut to the 1.0 held (reduce-only as for orders), bids 99399...
    await _mark(paper, 99400)
    (order,) = await client.notification("account.orders")
    assert (order["insert_reason"], order["conditional_order_id"], order["label"]) == (
        "conditional_order",
        created["order_id"],
        "stop-1",
    )
    assert (order["order_type"], order["reduce_only"], order["amount"], order["status"]) == (
        "market",
        True,
        1.0,
        "filled",
    )
    (trade,) = await client.notification("account.trade_history")
    assert (trade["price"], trade["amount"], trade["label"], trade["position_after"]) == (
        99399,
        1.0,
        "stop-1",
        0,
    )
    converted = _status(await client.notification("account.conditional_orders"), created["order_id"])
    assert (converted["status"], converted["converted_order_id"]) == ("converted", order["order_id"])
    assert "convert_time" in converted

    # Flat now: a reduce-only stop cannot become an order; it is rejected with the reason.
    second = await client.result(
        "create_conditional_order", SELL, PERP, 1.0, 99500, target="mark", reduce_only=True
    )
    await _mark(paper, 99300)
    rejected = _status(
        await client.notification(
            "account.conditional_orders", lambda n: _status(n, second["order_id"]).get("status") == "rejected"
        ),
        second["order_id"],
    )
    assert "reduce" in rejected["reject_reason"]
    assert [o["status"] for o in await client.result("conditional_orders")] == ["converted", "rejected"]
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_stops_trigger_on_the_index_and_on_the_last_trade_not_on_other_prices(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    on_index = await client.result(
        "create_conditional_order", BUY, PERP, 0.1, 101000, target="index", label="idx"
    )
    on_last = await client.result(
        "create_conditional_order", BUY, PERP, 0.2, 100500, target="last", label="lst"
    )

    # The mark (pinned) moves above both stops: neither is the price they watch.
    await _mark(paper, 101500)
    await client.settle(0.2)
    assert [o["status"] for o in await client.result("conditional_orders")] == ["active", "active"]
    await _mark(paper, 100000)

    # The index at 101500 (the perpetual's mark stays pinned at 100000): the index stop fires.
    await paper.control("paper/set_index", {"underlying": "BTCUSD", "price": 101500})
    (order,) = await client.notification("account.orders")
    assert (order["conditional_order_id"], order["label"], order["fills"][0]["price"]) == (
        on_index["order_id"],
        "idx",
        100001,
    )

    # An aggressive trade of another account at 100600: the last-price stop fires.
    await paper.control(
        "paper/trade",
        {"key_id": "other", "instrument_name": PERP, "direction": "buy", "amount": 0.1, "price": 100600},
    )
    (order,) = await client.notification(
        "account.orders", lambda n: n[0]["conditional_order_id"] == on_last["order_id"]
    )
    assert (order["label"], order["amount"], order["status"]) == ("lst", 0.2, "filled")
    assert [o["status"] for o in await client.result("conditional_orders")] == ["converted", "converted"]

    instruments = await client.result("instruments")
    option = next(i["instrument_name"] for i in instruments if i["type"] == "option")
    assert await client.error("create_conditional_order", BUY, option, 0.1, 1000, target="index") == 6
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_stop_limit_rests_bracket_takes_profit_trailing_stop_follows_then_fires(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    stop_limit = await client.result("create_conditional_order", BUY, PERP, 0.1, 100500, limit_price=100400)
    await _mark(paper, 100600)
    (resting,) = await client.notification("account.orders")
    assert (resting["order_type"], resting["time_in_force"], resting["price"], resting["status"]) == (
        "limit",
        "good_till_cancelled",
        100400,
        "open",
    )
    assert resting["conditional_order_id"] == stop_limit["order_id"]
    assert [o["order_id"] for o in await client.result("open_orders")] == [resting["order_id"]]
    await client.result("cancel_all")
    await client.notification("account.orders")

    # Bracket: a sell that stops below 99000 or takes profit at or above 101000.
    await _mark(paper, 100000)
    assert await client.error("create_conditional_order", SELL, PERP, 0.1, 99000, bracket_price=98000) == 6
    assert (
        await client.error(
            "create_conditional_order", SELL, PERP, 0.1, 99000, limit_price=98000, bracket_price=101000
        )
        == 6
    )
    bracket = await client.result("create_conditional_order", SELL, PERP, 0.1, 99000, bracket_price=101000)
    await _mark(paper, 101100)
    (order,) = await client.notification(
        "account.orders", lambda n: n[0].get("conditional_order_id") == bracket["order_id"]
    )
    assert (order["direction"], order["fills"][0]["price"]) == ("sell", 101099)

    # Trailing stop 1 %: the stop follows the mark up (mark * 0.99, to the tick) and fires on the way down.
    trailing = await client.result(
        "create_conditional_order", SELL, PERP, 0.1, 95000, trailing_stop_callback_rate=0.01
    )
    oid = trailing["order_id"]
    listing = await client.notification(
        "account.conditional_orders", lambda n: _status(n, oid).get("stop_price") == 100089
    )
    assert _status(listing, oid)["trailing_stop_callback_rate"] == 0.01  # 101100 * 0.99 = 100089
    await _mark(paper, 102000)
    await client.notification(
        "account.conditional_orders", lambda n: _status(n, oid).get("stop_price") == 100980
    )
    await _mark(paper, 101500)  # 101500 * 0.99 = 100485 < 100980: the stop stays
    await client.settle(0.2)
    assert _status(await client.result("conditional_orders"), oid)["stop_price"] == 100980
    await _mark(paper, 100900)
    fired = await client.notification(
        "account.conditional_orders", lambda n: _status(n, oid).get("status") == "converted"
    )
    assert _status(fired, oid)["update_time"] >= _status(fired, oid)["create_time"]
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_cancel_one_cancel_all_and_the_list_keeps_past_orders(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client = await _trader(official, keys)
    first = await client.result("create_conditional_order", BUY, PERP, 0.1, 101000)
    second = await client.result("create_conditional_order", SELL, PERP, 0.1, 99000)
    third = await client.result("create_conditional_order", SELL, PERP, 0.1, 98000)
    assert await client.result("cancel_conditional_order", order_id=first["order_id"]) is None
    assert await client.error("cancel_conditional_order", order_id=first["order_id"]) == 37
    assert await client.error("cancel_conditional_order", order_id="00C0FFEE00000000") == 1
    assert await client.result("cancel_all_conditional_orders") is None
    listing = await client.result("conditional_orders")
    assert [(o["order_id"], o["status"]) for o in listing] == [
        (first["order_id"], "cancelled"),
        (second["order_id"], "cancelled"),
        (third["order_id"], "cancelled"),
    ]
    assert await client.notification(
        "account.conditional_orders", lambda n: len(n) == 3 and n[2]["status"] == "cancelled"
    )
    reader: Official = await official(keys["reader"])
    assert await reader.error("create_conditional_order", BUY, PERP, 0.1, 101000) == 28
    assert await reader.error("cancel_all_conditional_orders") == 28
    await client.settle()
    assert problems(client, reader) == []
