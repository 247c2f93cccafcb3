"""Fills, fees and average-cost accounting, checked against numbers worked out by hand.

The ``paper`` fixture pins BTC-PERPETUAL's mark at 100000 with a book of five 1.0-lots per side,
one tick apart: asks 100001, 100002, ...; bids 99999, 99998, ... (the book moves with the mark).
"""

from __future__ import annotations

import pytest

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, RawClient


async def _set_mark(paper: PaperHandle, price: float) -> None:
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": price})


@pytest.mark.asyncio
async def test_trade_sequence_positions_average_price_realised_pnl_and_fees(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/subscribe", {"channels": ["account.trade_history", "account.portfolio"]})

    # 1) Market buy 1.5: 1.0 @ 100001 + 0.5 @ 100002 (taker, 5 bps of price * amount).
    #    fees 0.0005 * 100001 * 1.0 = 50.0005 and 0.0005 * 100002 * 0.5 = 25.0005
    #    average = (100001 * 1.0 + 100002 * 0.5) / 1.5 = 150002 / 1.5 = 100001.3333...
    order = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 1.5, "order_type": "market"}
    )
    assert [(f["price"], f["amount"], f["maker_taker"]) for f in order["fills"]] == [
        (100001, 1.0, "taker"),
        (100002, 0.5, "taker"),
    ]
    trades = await client.wait_for("account.trade_history")
    assert [(t["fee"], t["fee_rate"], t["position_after"]) for t in trades] == [
        (pytest.approx(50.0005), 0.0005, 1.0),
        (pytest.approx(25.0005), 0.0005, 1.5),
    ]
    line = (await client.wait_for("account.portfolio", bool))[0]
    assert line["position"] == 1.5
    assert line["average_price"] == pytest.approx(150002 / 1.5)

    # 2) Mark to 101000 (bids 100999, 100998, ...). Market sell 2.0 closes 1.5 and opens 0.5 short:
    #    1.0 @ 100999 realises 1.0 * (100999 - 100001.3333) = 997.6667
    #    1.0 @ 100998: 0.5 closes, realising 0.5 * (100998 - 100001.3333) = 498.3333; 0.5 opens short @ 100998
    #    realised so far 997.6667 + 498.3333 = 1496.0
    await _set_mark(paper, 101000)
    await client.result("private/sell", {"instrument_name": PERP, "amount": 2.0, "order_type": "market"})
    trades = await client.wait_for("account.trade_history")
    assert [t["position_pnl"] for t in trades] == [pytest.approx(997.6666667), pytest.approx(498.3333333)]
    assert trades[-1]["session_realised_after"] == pytest.approx(1496.0)
    portfolio = await client.result("private/portfolio")
    assert portfolio[0]["position"] == -0.5 and portfolio[0]["average_price"] == 100998
    # unrealised = (mark - start) * position = (101000 - 100998) * -0.5 = -1.0
    assert portfolio[0]["unrealised_pnl"] == pytest.approx(-1.0)

    # 3) Mark to 100500 (asks 100501, ...). Limit buy 0.5 @ 100600 takes 0.5 @ 100501:
    #    realises 0.5 * (100998 - 100501) = 248.5 -> total realised 1496.0 + 248.5 = 1744.5, flat.
    await _set_mark(paper, 100500)
    order = await client.result("private/buy", {"instrument_name": PERP, "amount": 0.5, "price": 100600})
    assert order["status"] == "filled" and order["fills"][0]["price"] == 100501
    (line,) = await client.result("private/portfolio")
    assert line["position"] == 0 and line["realised_pnl"] == pytest.approx(1744.5)

    # Fees: 50.0005 + 25.0005 + 0.0005 * (100999 + 100998) + 0.0005 * 100501 * 0.5
    #     = 75.001 + 100.9985 + 25.12525 = 201.12475. As on Thalex they are part of the session's
    #     unsettled P&L until the daily settlement pays it into the balance:
    #     session realised = 1744.5 - 201.12475 = 1543.37525; balance still 1,000,000.
    history = (await client.result("private/trade_history", {"sort": "ascending"}))["trades"]
    assert sum(t["fee"] for t in history) == pytest.approx(201.12475)
    summary = await client.result("private/account_summary")
    assert summary["cash"][0]["balance"] == pytest.approx(1_000_000)
    assert summary["session_realised_pnl"] == pytest.approx(1543.37525)
    assert summary["margin"] == pytest.approx(1_000_000 + 1543.37525)


@pytest.mark.asyncio
async def test_perpetual_funding_follows_thalex_definition(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await paper.control("paper/set_funding", {"instrument_name": PERP, "funding_mark": 10.0})
    order = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 2.0, "order_type": "market"}
    )
    assert order["filled_amount"] == 2.0
    # entry value = funding_mark * position = 10 * 2 = 20
    await paper.control("paper/set_funding", {"instrument_name": PERP, "funding_mark": 25.0})
    (line,) = await client.result("private/portfolio")
    assert line["perpetual_funding_entry_value"] == pytest.approx(20.0)
    # unrealised funding = 25 * 2 - 20 = 30
    assert line["unrealised_perpetual_funding"] == pytest.approx(30.0)
    # The buy took 1.0 @ 100001 + 1.0 @ 100002: average 100001.5.
    # Selling half realises half the funding: 0.5 * (25 * 2 - 20) = 15;
    # position pnl (99999 - 100001.5) * 1 = -2.5
    await client.result("private/sell", {"instrument_name": PERP, "amount": 1.0, "order_type": "market"})
    trades = (await client.result("private/trade_history", {"sort": "descending", "limit": 1}))["trades"]
    assert trades[0]["funding_mark"] == 25.0
    assert trades[0]["perpetual_funding_pnl"] == pytest.approx(15.0)
    assert trades[0]["position_pnl"] == pytest.approx(-2.5)
    (line,) = await client.result("private/portfolio")
    assert line["perpetual_funding_entry_value"] == pytest.approx(10.0)
    assert line["unrealised_perpetual_funding"] == pytest.approx(15.0)
    # realised = position pnl + funding pnl = -2.5 + 15 = 12.5
    assert line["realised_pnl"] == pytest.approx(12.5)


@pytest.mark.asyncio
async def test_option_fee_is_index_notional_capped_at_premium_share(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    options = [
        i
        for i in await client.result("public/instruments")
        if i["type"] == "option" and i["underlying"] == "BTCUSD"
    ]
    name = options[0]["instrument_name"]
    await paper.control("paper/set_mark", {"instrument_name": name, "price": 3000})
    await paper.control("paper/set_book", {"instrument_name": name, "level_amount": 1.0, "growth": 0.0})
    order = await client.result(
        "private/buy", {"instrument_name": name, "amount": 1.0, "order_type": "market"}
    )
    (trade,) = (await client.result("private/trade_history"))["trades"]
    # asks start one tick (5) above 3000; fee = 2.5 bps * index 100000 * 1.0 = 25 (< 12.5 % of 3005)
    assert order["fills"][0]["price"] == 3005
    assert trade["fee"] == pytest.approx(25.0) and trade["fee_rate"] == 0.00025
    assert "funding_mark" not in trade
    await paper.control("paper/set_mark", {"instrument_name": name, "price": 100})
    await client.result("private/sell", {"instrument_name": name, "amount": 1.0, "order_type": "market"})
    trade = (await client.result("private/trade_history", {"limit": 1}))["trades"][0]
    # bid 95: 2.5 bps * 100000 = 25 > 12.5 % * 95 = 11.875 -> capped
    assert trade["price"] == 95 and trade["fee"] == pytest.approx(11.875)


@pytest.mark.asyncio
async def test_large_ioc_partially_fills_against_depth(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await paper.control("paper/set_book", {"instrument_name": PERP, "levels": 3})
    order = await client.result(
        "private/buy",
        {"instrument_name": PERP, "amount": 5.0, "price": 101000, "time_in_force": "immediate_or_cancel"},
    )
    assert [(f["price"], f["amount"]) for f in order["fills"]] == [
        (100001, 1.0),
        (100002, 1.0),
        (100003, 1.0),
    ]
    assert (order["status"], order["filled_amount"], order["remaining_amount"], order["delete_reason"]) == (
        "cancelled_partially_filled",
        3.0,
        0,
        "immediate_cancel",
    )
    # A limit IOC only walks the book up to its price: 2 levels.
    order = await client.result(
        "private/sell",
        {"instrument_name": PERP, "amount": 5.0, "price": 99998, "time_in_force": "immediate_or_cancel"},
    )
    assert [f["price"] for f in order["fills"]] == [99999, 99998]
    # An empty ask side: a market buy fills nothing.
    await paper.control("paper/set_book", {"instrument_name": PERP, "asks": False})
    order = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 1.0, "order_type": "market"}
    )
    assert order["status"] == "cancelled" and order["fills"] == []
    ticker = await client.result("public/ticker", {"instrument_name": PERP})
    assert "best_ask_price" not in ticker and ticker["best_bid_price"] == 99999


@pytest.mark.asyncio
async def test_reduce_only_is_cut_to_the_position_and_collar_clamps(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/buy", {"instrument_name": PERP, "amount": 1.0, "order_type": "market"})
    code = await client.error_code(
        "private/buy", {"instrument_name": PERP, "amount": 0.5, "order_type": "market", "reduce_only": True}
    )
    assert code == 37  # would grow the long
    order = await client.result(
        "private/sell",
        {
            "instrument_name": PERP,
            "amount": 3.0,
            "order_type": "market",
            "reduce_only": True,
            "collar": "clamp",
        },
    )
    assert order["amount"] == 1.0 and order["filled_amount"] == 1.0 and order["reduce_only"] is True
    assert (await client.result("private/portfolio"))[0]["position"] == 0

    # Clamp: a bid at 105000 is moved to the collar high, 100000 * 1.02 = 102000, and rests there
    # only after taking the 5 ask levels 100001..100005 (5.0); an empty book beyond keeps 1.0 resting.
    order = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 6.0, "price": 105000, "collar": "clamp"}
    )
    assert (
        order["price"] == 102000 and order["filled_amount"] == 5.0 and order["status"] == "partially_filled"
    )
    # Ignore keeps the price as sent.
    await client.result("private/cancel_all")
    await paper.control("paper/set_book", {"instrument_name": PERP, "asks": False})
    order = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 105000, "collar": "ignore"}
    )
    assert order["price"] == 105000 and order["status"] == "open"

    # A resting reduce-only order shrinks with the position: long 5.0 -> 2.0, sell 2.0 reduce-only rests,
    # then the position drops to 0.5 by other means and the order is cut to 0.5.
    await client.result("private/cancel_all")
    await paper.control("paper/set_book", {"instrument_name": PERP, "reset": True})
    await paper.control(
        "paper/trade",
        {"key_id": "trader", "instrument_name": PERP, "direction": "sell", "amount": 3.0, "price": 100000},
    )
    resting = await client.result(
        "private/sell", {"instrument_name": PERP, "amount": 2.0, "price": 101000, "reduce_only": True}
    )
    await paper.control(
        "paper/trade",
        {"key_id": "trader", "instrument_name": PERP, "direction": "sell", "amount": 1.5, "price": 100000},
    )
    (left,) = await client.result("private/open_orders")
    assert left["order_id"] == resting["order_id"] and left["remaining_amount"] == 0.5


@pytest.mark.asyncio
async def test_resting_orders_fill_as_makers_when_flow_crosses(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/subscribe", {"channels": ["account.orders"]})
    bid = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 1.0, "price": 99000, "label": "mm"}
    )
    ask = await client.result(
        "private/sell", {"instrument_name": PERP, "amount": 1.0, "price": 101000, "post_only": True}
    )
    # Control fill: 0.4 of the bid at its limit price, maker fee 1 bps = 0.0001 * 99000 * 0.4 = 3.96
    result = await paper.control("paper/fill_orders", {"order_id": bid["order_id"], "amount": 0.4})
    (trade,) = result["trades"]
    assert (trade["price"], trade["amount"], trade["maker_taker"], trade["label"]) == (
        99000,
        0.4,
        "maker",
        "mm",
    )
    assert trade["fee"] == pytest.approx(3.96) and trade["fee_rate"] == 0.0001
    update = await client.wait_for("account.orders", lambda n: bool(n) and n[0]["change_reason"] == "fill")
    assert update[0]["status"] == "partially_filled" and update[0]["remaining_amount"] == 0.6
    # The market falls through the bid: the book's best ask reaches 99000 and the rest fills as maker.
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 98900})
    update = await client.wait_for("account.orders", lambda n: bool(n) and n[0]["status"] == "filled")
    assert update[0]["order_id"] == bid["order_id"] and update[0]["fills"][0]["maker_taker"] == "maker"
    (still,) = await client.result("private/open_orders")
    assert still["order_id"] == ask["order_id"]
    # post_only re-prices a crossing order one tick behind the touch: mark 98900, best ask 98901 -> 98900.
    moved = await client.result(
        "private/buy", {"instrument_name": PERP, "amount": 1.0, "price": 100500, "post_only": True}
    )
    assert moved["price"] == 98900 and moved["status"] == "open" and moved["fills"] == []
    # reject_post_only cancels instead.
    refused = await client.result(
        "private/buy",
        {
            "instrument_name": PERP,
            "amount": 1.0,
            "price": 100500,
            "post_only": True,
            "reject_post_only": True,
        },
    )
    assert refused["status"] == "cancelled" and refused["delete_reason"] == "immediate_cancel"


@pytest.mark.asyncio
async def test_accounts_are_isolated(paper: PaperHandle, connect, keys: dict[str, KeyFiles]) -> None:
    trader: RawClient = await connect()
    other: RawClient = await connect()
    assert (await trader.login(keys["trader"]))["account_number"] != (await other.login(keys["other"]))[
        "account_number"
    ]
    await other.result("private/subscribe", {"channels": ["account.orders", "account.trade_history"]})
    await trader.result("private/buy", {"instrument_name": PERP, "amount": 1.0, "order_type": "market"})
    await trader.result(
        "private/sell", {"instrument_name": PERP, "amount": 1.0, "price": 105000, "collar": "ignore"}
    )
    assert await other.result("private/portfolio") == []
    assert await other.result("private/open_orders") == []
    assert (await other.result("private/trade_history"))["trades"] == []
    assert await other.result("private/cancel_all") == 0
    assert len(await trader.result("private/open_orders")) == 1
    await other.drain(0.2)
    assert [
        n for n in other.notifications if n["channel_name"] != "account.orders" or n["notification"]
    ] == []


@pytest.mark.asyncio
async def test_trade_history_pages_with_time_and_bookmark(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    for _ in range(5):
        await paper.control(
            "paper/trade",
            {"key_id": "trader", "instrument_name": PERP, "direction": "buy", "amount": 0.1, "price": 100000},
        )
    everything = (await client.result("private/trade_history", {"sort": "ascending"}))["trades"]
    ids = [t["trade_id"] for t in everything]
    assert len(ids) == 5
    page = await client.result("private/trade_history", {"sort": "ascending", "limit": 2})
    collected = [t["trade_id"] for t in page["trades"]]
    while "bookmark" in page:
        page = await client.result(
            "private/trade_history", {"sort": "ascending", "limit": 2, "bookmark": page["bookmark"]}
        )
        collected += [t["trade_id"] for t in page["trades"]]
    assert collected == ids
    newest = await client.result("private/trade_history", {"sort": "descending", "limit": 2})
    assert [t["trade_id"] for t in newest["trades"]] == ids[::-1][:2]
    window = await client.result(
        "private/trade_history",
        {"time_low": everything[1]["time"], "time_high": everything[3]["time"], "sort": "ascending"},
    )
    assert [t["trade_id"] for t in window["trades"]] == ids[1:4]
    assert (await client.result("private/trade_history", {"time_low": everything[-1]["time"] + 1}))[
        "trades"
    ] == []
