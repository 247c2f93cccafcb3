"""The official ``thalex`` client works against the paper exchange unchanged (only the URL differs)."""

from __future__ import annotations

import asyncio
import json
import types

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

PERP = "BTC-PERPETUAL"


async def _answer(client: thalex.Thalex, rid: int, seen: list[dict]) -> dict:
    while True:
        message = json.loads(await asyncio.wait_for(client.receive(), 5))
        seen.append(message)
        if message.get("id") == rid:
            return message


@pytest.mark.asyncio
async def test_official_client_logs_in_subscribes_trades_cancels_and_reads_history(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    client = thalex.Thalex(types.SimpleNamespace(value=paper.url))
    await client.connect()
    seen: list[dict] = []
    try:
        await client.login(keys["trader"].kid, keys["trader"].private_pem, id=1)
        assert (await _answer(client, 1, seen))["result"]["account_number"].startswith("A")
        await client.set_cancel_on_disconnect(timeout_secs=10, id=2)
        assert (await _answer(client, 2, seen))["result"] == {"message_rate": 50}
        await client.private_subscribe(["session.orders", "account.trade_history", "account.portfolio"], id=3)
        assert (await _answer(client, 3, seen))["result"] == [
            "session.orders",
            "account.trade_history",
            "account.portfolio",
        ]
        await client.public_subscribe([f"ticker.{PERP}.raw"], id=4)
        await _answer(client, 4, seen)

        await client.buy(
            PERP,
            0.5,
            order_type=thalex.OrderType.MARKET,
            label="tp-close",
            client_order_id=7,
            collar="clamp",
            id=5,
        )
        order = (await _answer(client, 5, seen))["result"]
        assert order["status"] == "filled" and order["fills"][0]["price"] == 100001
        assert order["label"] == "tp-close" and order["client_order_id"] == 7

        await client.sell(PERP, 0.25, price=100500, client_order_id=8, id=6)
        resting = (await _answer(client, 6, seen))["result"]
        assert resting["status"] == "open" and resting["persistent"] is False
        await client.amend(amount=0.3, price=100400, client_order_id=8, id=7)
        amended = (await _answer(client, 7, seen))["result"]
        assert (amended["price"], amended["amount"], amended["change_reason"]) == (100400, 0.3, "amend")
        await client.open_orders(id=8)
        assert [o["order_id"] for o in (await _answer(client, 8, seen))["result"]] == [resting["order_id"]]
        await client.cancel(order_id=resting["order_id"], id=9)
        cancelled = (await _answer(client, 9, seen))["result"]
        assert cancelled["status"] == "cancelled" and cancelled["delete_reason"] == "client_cancel"

        await client.trade_history(sort=thalex.Sort.ASC, id=10)
        trades = (await _answer(client, 10, seen))["result"]["trades"]
        assert [(t["price"], t["amount"], t["label"]) for t in trades] == [(100001, 0.5, "tp-close")]
        assert trades[0]["client_order_id"] == 7 and "funding_mark" in trades[0]
        await client.portfolio(id=11)
        (line,) = (await _answer(client, 11, seen))["result"]
        assert (line["instrument_name"], line["position"], line["average_price"]) == (PERP, 0.5, 100001)
        await client.account_summary(id=12)
        assert (await _answer(client, 12, seen))["result"]["cash"][0]["currency"] == "USDT"
        await client.cancel_all(id=13)
        assert (await _answer(client, 13, seen))["result"] == 0
        await client.unsubscribe([f"ticker.{PERP}.raw"], id=14)
        assert (await _answer(client, 14, seen))["result"] == [f"ticker.{PERP}.raw"]

        channels = {m["channel_name"] for m in seen if "channel_name" in m}
        assert {
            "session.orders",
            "account.trade_history",
            "account.portfolio",
            f"ticker.{PERP}.raw",
        } <= channels
    finally:
        await client.disconnect()
