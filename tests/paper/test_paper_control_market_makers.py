"""The control API creates market makers' things on an account from outside, and runs a rogue bot that
re-opens a position after it is closed; the account sees everything through the official client,
checked strictly against api.yaml."""

from __future__ import annotations

import pytest
import thalex

from services.ingest.translate import fill_from_trade, position_from_entry
from services.paper.keys import KeyFiles
from services.paper.testing import ControlClient, ControlError, PaperHandle

from .conftest import PERP, problems
from .official import Official
from .test_paper_subscriptions import by_kind


async def _now(paper: PaperHandle) -> float:
    """The paper's clock (the fixture starts it on a fixed day: bots' end times count from it)."""
    return float((await paper.control("paper/status"))["time"])


async def _position(client: Official) -> float:
    return next(
        (p["position"] for p in await client.result("portfolio") if p["instrument_name"] == PERP), 0.0
    )


@pytest.mark.asyncio
async def test_control_api_leaves_mass_quotes_bots_and_conditional_orders_on_an_account(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client: Official = await official(keys["trader"])
    await client.result("private_subscribe", ["account.orders", "account.bots", "account.conditional_orders"])
    for snapshot in ("account.orders", "account.bots", "account.conditional_orders"):
        assert await client.notification(snapshot) == []

    # Mass quotes from a second session of the account: the client's cancel_all leaves them,
    # its cancel_mass_quote (all sessions) removes them.
    quotes = [{"i": PERP, "b": [[99900, 0.1]], "a": [[100100, 0.1]]}]
    result = await paper.control(
        "paper/mass_quote", {"key_id": "trader", "quotes": quotes, "label": "second"}
    )
    assert result == {"n_success": 2, "n_fail": 0, "errors": []}
    placed = await client.notification("account.orders")
    assert [(o["direction"], o["price"], o["label"], o["persistent"]) for o in placed] == [
        ("buy", 99900, "second", True),
        ("sell", 100100, "second", True),
    ]
    assert await client.result("cancel_all") == 0
    await client.result("cancel_mass_quote")
    gone = await client.notification("account.orders")
    assert [o["delete_reason"] for o in gone] == ["client_bulk_cancel"] * 2

    # A grid bot and a conditional order started from outside.
    bot = await paper.control(
        "paper/create_bot",
        {
            "key_id": "trader",
            "strategy": "grid",
            "instrument_name": PERP,
            "grid": [99900, 99950, 100050, 100100],
            "step_size": 0.01,
            "upside_exit_price": 100300,
            "downside_exit_price": 99700,
            "end_time": await _now(paper) + 600,
            "label": "outside",
        },
    )
    listing = await client.notification("account.bots")
    assert [(b["bot_id"], b["status"], b["label"]) for b in listing] == [(bot["bot_id"], "active", "outside")]
    conditional = await paper.control(
        "paper/create_conditional_order",
        {
            "key_id": "trader",
            "direction": "sell",
            "instrument_name": PERP,
            "amount": 0.1,
            "stop_price": 95000,
        },
    )
    listing = await client.notification("account.conditional_orders")
    assert [(o["order_id"], o["status"]) for o in listing] == [(conditional["order_id"], "active")]

    # Any of Thalex's stop reasons on demand (here: conflict).
    assert await paper.control("paper/stop_bots", {"key_id": "trader", "reason": "conflict"}) == {
        "stopped": 1
    }
    listing = await client.notification("account.bots", lambda n: n[0]["status"] == "stopped")
    assert listing[0]["stop_reason"] == "conflict"
    with pytest.raises(ControlError) as error:
        await paper.control("paper/create_bot", {"key_id": "nobody", "strategy": "grid"})
    assert error.value.code == 6
    await client.settle()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_rogue_bot_reopens_a_closed_position_with_orders_mass_quotes_and_a_grid_bot(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client: Official = await official(keys["trader"])
    await client.result("private_subscribe", ["account.trade_history", "account.bots", "account.orders"])
    await client.notification("account.bots")
    control = ControlClient(paper.url)
    try:
        rogue = await control.start_rogue_bot("trader", PERP, 0.02, delay=0.2)
        assert (rogue["position"], rogue["modes"], rogue["active"]) == (
            0.02,
            ["orders", "mass_quotes", "grid"],
            True,
        )
        (grid,) = await client.notification("account.bots")
        assert (grid["bot_id"], grid["strategy"], grid["base_position"], grid["label"]) == (
            rogue["grid_bot_id"],
            "grid",
            0.02,
            "rogue",
        )

        # Flat at the start: it opens 0.02 with a plain market order.
        (trade,) = await client.notification("account.trade_history", lambda n: n[0]["label"] == "rogue")
        assert (trade["direction"], trade["amount"], trade["maker_taker"], trade.get("bot_id")) == (
            "buy",
            0.02,
            "taker",
            None,
        )

        # Closed: it comes back through a quote of its own session, filled by simulated flow (maker).
        await client.result("sell", PERP, 0.02, order_type=thalex.OrderType.MARKET, label="close")
        trades = await client.notification(
            "account.trade_history", lambda n: n[0]["label"] == "rogue", within=3
        )
        assert [(t["direction"], t["amount"], t["maker_taker"]) for t in trades] == [("buy", 0.02, "maker")]
        quote_orders = await client.notification(
            "account.orders", lambda n: trades[0]["order_id"] in [o["order_id"] for o in n]
        )
        assert {o["label"] for o in quote_orders if o["order_id"] == trades[0]["order_id"]} == {"rogue"}

        # Closed again: the grid bot's bids are filled by simulated flow (the grid bot's trades).
        await client.result("sell", PERP, 0.02, order_type=thalex.OrderType.MARKET, label="close")
        trades = await client.notification(
            "account.trade_history", lambda n: any(t.get("bot_id") == grid["bot_id"] for t in n), within=3
        )
        assert {(t["direction"], t["maker_taker"], t["label"]) for t in trades} == {("buy", "maker", "rogue")}
        assert 0.0 < await _position(client) <= 0.02

        # It does not listen: cancel_all_bots stops the grid, the rogue starts a new one.
        await client.result("cancel_all_bots")
        listing = await client.notification(
            "account.bots",
            lambda n: any(b["status"] == "active" and b["bot_id"] != grid["bot_id"] for b in n),
        )
        assert {b["bot_id"]: b["status"] for b in listing}[grid["bot_id"]] == "stopped"
        rows = await control.call("paper/rogue_bots")
        reopened = rows["rogue_bots"][0]["reopened"]
        assert reopened["orders"] >= 1 and reopened["mass_quotes"] == 1 and reopened["grid"] == 1

        stopped = await control.stop_rogue_bot(rogue["rogue_id"])
        assert stopped["active"] is False
        await client.result("sell", PERP, await _position(client), order_type=thalex.OrderType.MARKET)
        await client.settle(0.6)
        assert await _position(client) == 0
        assert all(b["status"] == "stopped" for b in await client.result("bots"))
    finally:
        await control.close()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_every_kind_of_market_maker_fill_reaches_the_guardian_as_a_fill_and_a_position(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    """What the guardian's ingest makes of the account's trades and portfolio (its own parser)."""
    client: Official = await official(keys["trader"])
    await client.result("private_subscribe", ["account.trade_history"])
    # A mass quote of a second session filled by flow; a grid bot's bid filled by the market; a stop
    # activated on the mark; an RFQ traded with the simulated makers; a rogue bot's market order.
    result = await paper.control(
        "paper/mass_quote", {"key_id": "trader", "quotes": [{"i": PERP, "b": [[99990, 0.1]]}], "label": "mq"}
    )
    assert result["n_success"] == 1
    await paper.control("paper/fill_orders", {"key_id": "trader"})
    grid = {
        "key_id": "trader",
        "strategy": "grid",
        "instrument_name": PERP,
        "grid": [99900, 99950, 100050, 100100],
        "step_size": 0.01,
        "upside_exit_price": 100300,
        "downside_exit_price": 99700,
        "end_time": await _now(paper) + 600,
        "label": "gb",
    }
    bot = await paper.control("paper/create_bot", grid)
    await client.settle(0.2)
    await paper.control(
        "paper/create_conditional_order",
        {
            "key_id": "trader",
            "direction": "sell",
            "instrument_name": PERP,
            "amount": 0.02,
            "stop_price": 99945,
            "label": "cs",
        },
    )
    await paper.control(
        "paper/set_mark", {"instrument_name": PERP, "price": 99940}
    )  # grid bid 99950, then the stop
    rfq = await client.result("create_rfq", [thalex.RfqLeg(0.05, PERP)], label="rq")
    await client.result("trade_rfq", rfq["rfq_id"], thalex.Direction.BUY, 200000)
    control = ControlClient(paper.url)
    rogue = await control.start_rogue_bot("trader", PERP, 1.0, modes=("orders",), delay=0.0, label="rg")
    await client.notification("account.trade_history", lambda n: any(t.get("label") == "rg" for t in n))

    trades = (await client.result("trade_history", sort=thalex.Sort.ASC))["trades"]
    fills = [fill_from_trade(t, 0.0) for t in trades]
    kinds = {(f.label, f.trade_type.value, f.liquidity.value if f.liquidity else None) for f in fills}
    assert kinds == {
        ("mq", "normal", "maker"),
        ("gb", "normal", "maker"),
        ("cs", "normal", "taker"),
        ("rq", "rfq", "taker"),
        ("rg", "normal", "taker"),
    }
    assert next(t for t in trades if t.get("label") == "gb")["bot_id"] == bot["bot_id"]
    assert len({f.trade_id for f in fills}) == len(fills)
    # The guardian's positions agree with the fills it was given.
    (line,) = [position_from_entry(p) for p in await client.result("portfolio")]
    assert line.position == pytest.approx(sum(f.signed_amount for f in fills))
    await control.stop_rogue_bot(rogue["rogue_id"])
    await control.close()
    assert problems(client) == []


@pytest.mark.asyncio
async def test_trades_books_a_batch_with_every_trade_notified_and_the_portfolio_once(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    client: Official = await official(keys["trader"])
    channels = ["account.trade_history", "account.portfolio", "account.summary"]
    await client.result("private_subscribe", channels)
    assert await client.notification("account.portfolio") == []
    await client.notification("account.summary")
    market = paper.exchange.market
    names = [PERP, *(n for n in by_kind(paper, "option")[:4]), by_kind(paper, "future")[0]]
    smallest = {n: market.instruments[n].min_order_amount for n in names}
    batch = [
        {"instrument_name": n, "direction": side, "amount": lots * smallest[n], "price": market.mark(n).price}
        for side, lots in (("buy", 3), ("sell", 1))
        for n in names[1:]
    ]
    batch += [{"instrument_name": PERP, "direction": "buy", "amount": 0.1} for _ in range(3)]  # off the book
    result = await paper.control("paper/trades", {"key_id": "trader", "trades": batch})

    held = {p["instrument_name"]: p["position"] for p in await client.result("portfolio")}
    assert held == pytest.approx({PERP: 0.3, **{n: 2 * smallest[n] for n in names[1:]}})
    line = await client.notification("account.portfolio")
    assert {p["instrument_name"]: p["position"] for p in line} == pytest.approx(held)
    await client.settle()
    notified = [t["trade_id"] for n in client.of("account.trade_history") for t in n]
    assert sorted(notified) == sorted(t["trade_id"] for t in result["trades"])
    assert len(notified) == len(batch)
    assert len(client.of("account.portfolio")) == 2  # the subscription's snapshot, then the batch's one
    assert len(client.of("account.summary")) == 2

    # One bad item refuses the whole call: nothing booked, nothing sent.
    good = {"instrument_name": PERP, "direction": "buy", "amount": 0.1}
    for bad, code in (
        ({"instrument_name": "BTC-NOPE", "direction": "buy", "amount": 0.1}, 5),
        ({"instrument_name": PERP, "direction": "hold", "amount": 0.1}, 6),
        ({"instrument_name": PERP, "direction": "buy", "amount": -1}, 6),
        ({"instrument_name": PERP, "direction": "buy", "amount": 0.00005}, 14),
    ):
        with pytest.raises(ControlError) as error:
            await paper.control("paper/trades", {"key_id": "trader", "trades": [good, good, bad]})
        assert error.value.code == code and error.value.message.startswith("trades[2]: ")
    with pytest.raises(ControlError) as error:
        await paper.control("paper/trades", {"key_id": "nobody", "trades": [good]})
    assert error.value.code == 6
    await client.settle()
    assert {p["instrument_name"]: p["position"] for p in await client.result("portfolio")} == held
    assert len((await client.result("trade_history"))["trades"]) == len(batch)
    assert len(client.of("account.trade_history")) == len(batch)
    assert problems(client) == []
