"""RFQs traded end to end from both sides through the official client; every message checked strictly
against api.yaml. The ``paper`` fixture pins BTC-PERPETUAL at 100000 (index 100000) with 1.0-lots one
tick apart; options keep the paper's default book (levels one tick, 5 USD, apart around the mark)."""

from __future__ import annotations

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, problems
from .official import Official

BUY, SELL = thalex.Direction.BUY, thalex.Direction.SELL
OPTION_FEE, PERP_TAKER, PERP_MAKER = 0.00025, 0.0005, 0.0001


async def _calls(client: Official) -> tuple[str, str]:
    """The BTC calls at 95000 and 100000 of the last option expiry."""
    calls = [
        i
        for i in await client.result("instruments")
        if i["type"] == "option" and i["option_type"] == "call" and i["underlying"] == "BTCUSD"
    ]
    last = max(i["expiration_timestamp"] for i in calls)
    by_strike = {i["strike_price"]: i["instrument_name"] for i in calls if i["expiration_timestamp"] == last}
    return by_strike[95000], by_strike[100000]


async def _touch(client: Official, name: str) -> tuple[float, float]:
    book = await client.result("book", name)
    return book["bids"][0][0], book["asks"][0][0]


@pytest.mark.asyncio
async def test_requester_trades_a_hedged_call_spread_with_the_simulated_market_makers(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client: Official = await official(keys["trader"])
    await client.result(
        "private_subscribe",
        [
            "account.rfqs",
            "account.rfq_history",
            "mm.rfq_quotes",
            "account.trade_history",
            "account.portfolio",
        ],
    )
    await client.result("public_subscribe", ["rfqs"])
    for snapshot in ("account.rfqs", "mm.rfq_quotes", "account.portfolio", "rfqs"):
        assert await client.notification(snapshot) == []
    low, high = await _calls(client)
    delta_low = (await client.result("ticker", low))["delta"]
    delta_high = (await client.result("ticker", high))["delta"]

    legs = [thalex.RfqLeg(1, low), thalex.RfqLeg(-1, high), thalex.RfqLeg(-0.5, PERP)]
    rfq = await client.result("create_rfq", legs, label="rfq-1")
    # gcd(1, 1, 0.5) = 0.5 -> quantities 2 / -2 / -1; tick lcm(0.01/2, 0.0001/1) = 0.005.
    assert (rfq["amount"], rfq["volume_tick_size"], rfq["label"]) == (0.5, 0.005, "rfq-1")
    assert [(leg["instrument_name"], leg["quantity"]) for leg in rfq["legs"]] == [
        (low, 2),
        (high, -2),
        (PERP, -1),
    ]
    # Fee quantities: the spread pays one leg (the 100000 call is free); the perpetual is free for the
    # options' net delta 2 * d_low - 2 * d_high of its 1 contract.
    hedge = min(1.0, 2 * delta_low - 2 * delta_high)
    fee_quantity = [leg["fee_quantity"] for leg in rfq["legs"]]
    assert fee_quantity == pytest.approx([2, 0, 1 - hedge])
    assert rfq["valid_until"] == pytest.approx(rfq["create_time"] + 300)

    # Simulated makers quote at the book: the ask buys the long legs at their asks and sells the short ones at
    # their bids, the bid the other way round.
    (low_bid, low_ask), (high_bid, high_ask), (perp_bid, perp_ask) = [
        await _touch(client, name) for name in (low, high, PERP)
    ]
    ask = 2 * low_ask - 2 * high_bid - perp_bid
    bid = 2 * low_bid - 2 * high_ask - perp_ask
    assert rfq["quoted_ask"] == {"price": pytest.approx(ask), "amount": 0.5}
    assert rfq["quoted_bid"] == {"price": pytest.approx(bid), "amount": 0.5}
    (created,) = await client.notification("account.rfqs")
    assert (created["event"], created["rfq_id"], created["insert_reason"]) == (
        "Created",
        rfq["rfq_id"],
        "client_request",
    )
    quotes = await client.notification("mm.rfq_quotes")
    assert sorted((q["direction"], q["event"]) for q in quotes) == [("buy", "Inserted"), ("sell", "Inserted")]
    assert [r["rfq_id"] for r in await client.result("open_rfqs")] == [rfq["rfq_id"]]

    assert await client.error("trade_rfq", rfq["rfq_id"], BUY, ask - 100) == 41
    traded = await client.result("trade_rfq", rfq["rfq_id"], BUY, ask)
    assert traded["price"] == pytest.approx(ask) and traded["amount"] == 0.5
    assert traded["legs"] == [
        {"instrument_name": low, "direction": "buy", "amount": 1.0},
        {"instrument_name": high, "direction": "sell", "amount": 1.0},
        {"instrument_name": PERP, "direction": "sell", "amount": 0.5},
    ]

    trades = await client.notification("account.trade_history")
    assert [(t["instrument_name"], t["direction"], t["amount"], t["leg_index"]) for t in trades] == [
        (low, "buy", 1.0, 0),
        (high, "sell", 1.0, 1),
        (PERP, "sell", 0.5, 2),
    ]
    assert all(
        (t["trade_type"], t["label"], t["order_id"], t["maker_taker"])
        == ("rfq", "rfq-1", rfq["rfq_id"], "taker")
        for t in trades
    )
    # The legs add up to the traded price per combination: 0.5 * (2 p_low - 2 p_high - p_perp) = 0.5 * ask.
    signed = sum((1 if t["direction"] == "buy" else -1) * t["amount"] * t["price"] for t in trades)
    assert signed == pytest.approx(0.5 * ask)
    # Fees on each leg's fee_quantity share:
    #   95000-call leg: share 2/2, 2.5 bps of index 100000 * 1.0 = 25 (capped at 12.5 % of the premium);
    #   100000-call leg: share 0/2 -> 0;  perpetual: share (1 - hedge)/1 of 5 bps * price * 0.5.
    fee = [t["fee"] for t in trades]
    assert fee[0] == pytest.approx(min(OPTION_FEE * 100000 * 1.0, 0.125 * trades[0]["price"] * 1.0))
    assert fee[1] == 0 and trades[1]["fee_rate"] == 0
    assert fee[2] == pytest.approx(PERP_TAKER * trades[2]["price"] * 0.5 * (1 - hedge))
    assert trades[2]["fee_rate"] == pytest.approx(PERP_TAKER * (1 - hedge))
    positions = {p["instrument_name"]: p["position"] for p in await client.result("portfolio")}
    assert positions == {low: 1.0, high: -1.0, PERP: -0.5}

    done = await client.notification("account.rfqs", lambda n: n[0]["event"] == "Traded")
    assert (done[0]["delete_reason"], done[0]["trade_amount"]) == ("filled", 0.5)
    (public,) = await client.notification("rfqs")  # the public feed of traded RFQs: no label
    assert (public["rfq_id"], public["trade_amount"], "label" in public) == (rfq["rfq_id"], 0.5, False)
    (history,) = await client.notification("account.rfq_history")
    assert history["trade_price"] == pytest.approx(ask)
    listed = (await client.result("rfq_history"))["rfqs"]
    assert [(r["rfq_id"], r["delete_reason"]) for r in listed] == [(rfq["rfq_id"], "filled")]
    assert await client.result("open_rfqs") == []

    # A second RFQ cancelled by its requester.
    second = await client.result("create_rfq", [thalex.RfqLeg(0.1, PERP)])
    assert await client.result("cancel_rfq", second["rfq_id"]) is None
    cancelled = await client.notification("account.rfqs", lambda n: n[0]["event"] == "Cancelled")
    assert cancelled[0]["delete_reason"] == "client_cancel"
    assert await client.error("trade_rfq", second["rfq_id"], BUY, 200000) == 1
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_market_maker_quotes_simulated_takers_rfqs_and_is_filled(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    mm: Official = await official(keys["trader"])
    await mm.result("private_subscribe", ["mm.rfqs", "mm.rfq_quotes", "account.trade_history"])
    assert await mm.notification("mm.rfqs") == [] and await mm.notification("mm.rfq_quotes") == []

    first = await paper.control("paper/create_rfq", {"legs": [{"instrument_name": PERP, "amount": 0.3}]})
    second = await paper.control(
        "paper/create_rfq",
        {
            "legs": [
                {"instrument_name": PERP, "amount": -0.2},
                {"instrument_name": PERP.replace("BTC", "ETH"), "amount": 3},
            ]
        },
    )
    seen = [r for n in [await mm.notification("mm.rfqs") for _ in range(2)] for r in n]
    assert [r["rfq_id"] for r in seen] == [first["rfq_id"], second["rfq_id"]]
    assert "label" not in seen[0] and [leg["quantity"] for leg in seen[0]["legs"]] == [1]
    assert [r["rfq_id"] for r in await mm.result("mm_rfqs")] == [first["rfq_id"], second["rfq_id"]]

    # Quotes away from the mark value (100000 per combination): the taker does not take them by itself.
    ask = await mm.result(
        "mm_rfq_insert_quote", SELL, 0.3, 100200, first["rfq_id"], client_order_id=7, label="mmq"
    )
    assert (ask["direction"], ask["price"], ask["amount"], ask["client_order_id"], ask["label"]) == (
        "sell",
        100200,
        0.3,
        7,
        "mmq",
    )
    bid = await mm.result("mm_rfq_insert_quote", BUY, 0.3, 99800, first["rfq_id"], label="mmq")
    other = await mm.result("mm_rfq_insert_quote", BUY, 0.2, -80000, second["rfq_id"])
    assert await mm.error("mm_rfq_insert_quote", BUY, 0.00005, 99800, first["rfq_id"]) == 14
    assert await mm.error("mm_rfq_insert_quote", BUY, 0.3, 99800, first["rfq_id"], client_order_id=7) == 2
    amended = await mm.result("mm_rfq_amend_quote", 0.3, 100150, client_order_id=7)
    assert (amended["order_id"], amended["price"]) == (ask["order_id"], 100150)
    assert sorted(q["order_id"] for q in await mm.result("mm_rfq_quotes")) == sorted(
        [ask["order_id"], bid["order_id"], other["order_id"]]
    )
    await mm.settle(0.2)

    # The simulated taker of the first RFQ buys at the best ask: the maker sells 0.3 at 100150.
    result = await paper.control("paper/rfq_trade", {"rfq_id": first["rfq_id"], "direction": "buy"})
    assert (result["price"], result["amount"]) == (100150, 0.3)
    (trade,) = await mm.notification("account.trade_history")
    assert (
        trade["direction"],
        trade["price"],
        trade["amount"],
        trade["trade_type"],
        trade["maker_taker"],
    ) == ("sell", 100150, 0.3, "rfq", "maker")
    assert (trade["order_id"], trade["label"], trade["leg_index"]) == (ask["order_id"], "mmq", 0)
    # maker fee 1 bp * 100150 * 0.3 = 3.0045 (the single leg pays fully)
    assert trade["fee"] == pytest.approx(3.0045)
    await mm.settle(0.2)
    events = [q for n in mm.of("mm.rfq_quotes") for q in n]
    filled = next(q for q in events if q["event"] == "Filled")
    assert (filled["order_id"], filled["trade_price"], filled["trade_amount"], filled["delete_reason"]) == (
        ask["order_id"],
        100150,
        0.3,
        "filled",
    )
    # Thalex's RFQ protection: the maker's quote on the other RFQ is cancelled right after the trade.
    protected = next(q for q in events if q["order_id"] == other["order_id"] and q["event"] == "Cancelled")
    assert protected["delete_reason"] == "mm_protection"
    assert await mm.result("mm_rfq_quotes") == []
    assert [r["rfq_id"] for r in await mm.result("mm_rfqs")] == [second["rfq_id"]]

    # A quote at the package's mark value is taken by the simulated taker on its own.
    third = await paper.control("paper/create_rfq", {"legs": [{"instrument_name": PERP, "amount": 0.1}]})
    await mm.result("mm_rfq_insert_quote", BUY, 0.1, 100000, third["rfq_id"], label="auto")
    trades = await mm.notification("account.trade_history", within=3)
    assert [(t["direction"], t["price"], t["amount"], t["label"]) for t in trades] == [
        ("buy", 100000, 0.1, "auto")
    ]
    assert await mm.error("mm_rfq_delete_quote", client_order_id=7) == 1
    await mm.settle()
    assert problems(mm) == []


@pytest.mark.asyncio
async def test_an_rfq_between_two_accounts_books_both_sides(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    taker: Official = await official(keys["trader"])
    maker: Official = await official(keys["other"])
    await taker.result("private_subscribe", ["mm.rfq_quotes", "account.trade_history"])
    await maker.result("private_subscribe", ["mm.rfqs", "account.trade_history"])
    await taker.notification("mm.rfq_quotes")
    await maker.notification("mm.rfqs")

    rfq = await taker.result("create_rfq", [thalex.RfqLeg(0.4, PERP)], label="block")
    (seen,) = await maker.notification("mm.rfqs")
    assert seen["rfq_id"] == rfq["rfq_id"] and "label" not in seen
    assert await taker.error("mm_rfq_insert_quote", SELL, 0.4, 99000, rfq["rfq_id"]) == 37
    # The simulated makers ask 100001 (the book's ask); the other account asks better.
    quote = await maker.result("mm_rfq_insert_quote", SELL, 0.4, 100000.5, rfq["rfq_id"], label="theirs")
    inserted = await taker.notification("mm.rfq_quotes", lambda n: n[0]["order_id"] == quote["order_id"])
    assert "label" not in inserted[0]  # the requester does not see the maker's label
    assert (await taker.result("open_rfqs"))[0]["quoted_ask"] == {"price": 100000.5, "amount": 0.4}

    await taker.result("trade_rfq", rfq["rfq_id"], BUY, 100001)
    (bought,) = await taker.notification("account.trade_history")
    (sold,) = await maker.notification("account.trade_history")
    assert (
        bought["direction"],
        bought["price"],
        bought["amount"],
        bought["label"],
        bought["maker_taker"],
    ) == ("buy", 100000.5, 0.4, "block", "taker")
    assert (sold["direction"], sold["price"], sold["amount"], sold["label"], sold["maker_taker"]) == (
        "sell",
        100000.5,
        0.4,
        "theirs",
        "maker",
    )
    # taker 5 bps and maker 1 bp of 100000.5 * 0.4 = 40000.2: 20.0001 and 4.00002
    assert (bought["fee"], sold["fee"]) == (pytest.approx(20.0001), pytest.approx(4.00002))

    # A quote of a cancel-on-disconnect session goes with it, and with its cancel_session.
    second = await taker.result("create_rfq", [thalex.RfqLeg(0.1, PERP)])
    await maker.notification("mm.rfqs", lambda n: n[0]["rfq_id"] == second["rfq_id"])
    await maker.result("set_cancel_on_disconnect", 5)
    quote = await maker.result("mm_rfq_insert_quote", BUY, 0.1, 99990, second["rfq_id"])
    assert await maker.result("cancel_session") is None
    gone = await taker.notification(
        "mm.rfq_quotes", lambda n: n[0]["order_id"] == quote["order_id"] and n[0]["event"] == "Cancelled"
    )
    assert gone[0]["delete_reason"] == "session_end"
    quote = await maker.result("mm_rfq_insert_quote", BUY, 0.1, 99990, second["rfq_id"])
    await maker.client.disconnect()
    gone = await taker.notification(
        "mm.rfq_quotes", lambda n: n[0]["order_id"] == quote["order_id"] and n[0]["event"] == "Cancelled"
    )
    assert gone[0]["delete_reason"] == "session_end"
    await taker.settle()
    assert problems(taker, maker) == []
