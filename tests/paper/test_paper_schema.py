"""Every result and notification the paper exchange emits validates against Thalex's api.yaml.

Validation is strict: besides the schema itself, objects may carry no field that api.yaml does not
name (``additionalProperties: false`` is added to every plain object schema), so a typo in a field
name fails here.
"""

from __future__ import annotations

import pytest

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, RawClient
from .schema import channel_family, message_problems


@pytest.mark.asyncio
async def test_every_result_and_notification_matches_api_yaml(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/set_cancel_on_disconnect", {"timeout_secs": 10})
    instruments = await client.result("public/instruments")
    by_type = {i["type"]: i["instrument_name"] for i in instruments if i["underlying"] == "BTCUSD"}
    option, future = by_type["option"], by_type["future"]
    await client.result(
        "private/subscribe",
        {
            "channels": [
                "account.orders",
                "session.orders",
                "account.portfolio",
                "account.trade_history",
                "account.summary",
            ]
        },
    )
    await client.result(
        "public/subscribe",
        {
            "channels": [
                f"ticker.{PERP}.raw",
                f"ticker.{option}.100ms",
                f"ticker.{future}.200ms",
                f"book.{PERP}.none.5.raw",
                f"book.{PERP}.10.all.100ms",
                "price_index.BTCUSD",
                "price_index.ETHUSD",
            ]
        },
    )
    for name in (PERP, option, future):
        await client.result("public/instrument", {"instrument_name": name})
        await client.result("public/ticker", {"instrument_name": name})
        await client.result("public/book", {"instrument_name": name})
    await client.result("public/index", {"underlying": "ETHUSD"})
    await client.result(
        "private/insert",
        {
            "direction": "buy",
            "instrument_name": PERP,
            "amount": 1.5,
            "order_type": "market",
            "label": "schema",
            "client_order_id": 1,
        },
    )
    await client.result("private/buy", {"instrument_name": option, "amount": 0.5, "order_type": "market"})
    resting = await client.result(
        "private/sell", {"instrument_name": PERP, "amount": 1.0, "price": 100500, "client_order_id": 2}
    )
    await client.result("private/amend", {"client_order_id": 2, "price": 100400, "amount": 0.8})
    await paper.control("paper/fill_orders", {"order_id": resting["order_id"], "amount": 0.3})
    await client.result("private/cancel", {"order_id": resting["order_id"]})
    await client.result("private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 90000})
    await client.result("private/cancel_session")
    await client.result("private/buy", {"instrument_name": future, "amount": 0.1, "price": 90000})
    await client.result("private/cancel_all")
    await client.result(
        "private/sell", {"instrument_name": PERP, "amount": 3.0, "order_type": "market", "reduce_only": True}
    )
    await client.result("private/open_orders")
    await client.result("private/portfolio")
    await client.result("private/trade_history", {"limit": 2})
    await client.result("private/account_summary")
    await paper.control("paper/move_index", {"underlying": "BTCUSD", "pct": 2})
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 103000})
    await paper.control("paper/set_book", {"instrument_name": PERP, "bids": False})
    await client.drain(0.3)
    await client.result("unsubscribe", {"channels": ["price_index.ETHUSD"]})
    await client.error_code("private/insert", {"direction": "buy", "instrument_name": "NOPE", "amount": 1})
    await paper.control("paper/reconnect_notice")
    await client.wait_for("system")
    await client.drain(0.3)

    methods_seen: set[str] = set()
    channels_seen: set[str] = set()
    problems: list[str] = []
    for message in client.received:
        method = None if "channel_name" in message else client.sent.get(message.get("id"))
        problems += message_problems(message, method)
        if "channel_name" in message:
            channels_seen.add(channel_family(message["channel_name"]))
        elif "result" in message and method is not None:
            methods_seen.add(method)
    assert problems == []
    assert methods_seen >= {
        "public/login",
        "private/set_cancel_on_disconnect",
        "public/instruments",
        "public/instrument",
        "public/ticker",
        "public/index",
        "public/book",
        "public/subscribe",
        "private/subscribe",
        "unsubscribe",
        "private/insert",
        "private/buy",
        "private/sell",
        "private/amend",
        "private/cancel",
        "private/cancel_all",
        "private/cancel_session",
        "private/open_orders",
        "private/portfolio",
        "private/trade_history",
        "private/account_summary",
    }
    assert channels_seen >= {
        "account.orders",
        "session.orders",
        "account.portfolio",
        "account.trade_history",
        "account.summary",
        "ticker",
        "book",
        "price_index",
        "system",
    }
    trades = [
        t
        for m in client.received
        if m.get("channel_name") == "account.trade_history"
        for t in m["notification"]
    ]
    perp_trades = [t for t in trades if t["instrument_name"] == PERP]
    assert all("funding_mark" in t for t in perp_trades)
    assert {t["maker_taker"] for t in perp_trades} == {"maker", "taker"}
    assert any(t.get("label") == "schema" and t.get("client_order_id") == 1 for t in perp_trades)
