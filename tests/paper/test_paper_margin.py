"""The margin model, worked by hand: error 24 for an order that would breach it, ``margin_call``
notifications, liquidation with its fee — and a bot that quotes until error 24, then reduces.

The ``paper`` fixture pins BTC-PERPETUAL's mark at 100000 with 1.0-lots: asks 100001, ...; bids 99999,
... The requirement of a perpetual position is its loss if the index falls or rises 20 %
(``services/paper/margin.py``); maintenance is 70 % of it.
"""

from __future__ import annotations

import asyncio

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP
from .official import Official

pytestmark = pytest.mark.asyncio
MARKET = thalex.OrderType.MARKET


async def _mark(paper: PaperHandle, price: float) -> None:
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": price})


async def test_error_24_margin_calls_and_liquidation(paper: PaperHandle, keys: dict[str, KeyFiles]) -> None:
    await paper.control("paper/set_balance", {"key_id": "trader", "balance": 25_000})
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        await bot.result(
            "private_subscribe", ["user.inbox_notifications", "account.orders", "account.trade_history"]
        )
        # Long 1 @ 100001 (fee 50.0005). Required: 0.2 * 100000 = 20000.
        # Margin: 25000 + (100000 - 100001) - 50.0005 = 24948.9995.
        await bot.result("buy", PERP, 1.0, order_type=MARKET)
        summary = await bot.result("account_summary")
        assert summary["required_margin"] == pytest.approx(20_000)
        assert summary["margin"] == pytest.approx(24_948.9995)
        # Another 0.5 would need 1.5 * 20000 = 30000 > 24948.9995: error 24, nothing happens.
        assert await bot.error("buy", PERP, 0.5, order_type=MARKET) == 24
        assert await bot.error("buy", PERP, 0.5, price=99_000) == 24
        # A small bid is fine: filled at 90000 in the -20 % scenario it loses 0.1 * (80000 - 90000):
        # 20000 + 1000 = 21000 <= 24948.9995. A sell lowers the requirement: always accepted.
        bid = await bot.result("buy", PERP, 0.1, price=90_000)
        ask = await bot.result("sell", PERP, 0.5, price=110_000)
        assert (await bot.result("account_summary"))["required_margin"] == pytest.approx(21_000)

        # Mark 93000: margin 24948.9995 - 7000 = 17948.9995 < required 0.2 * 93000 = 18600, above
        # maintenance 13020: initial margin breach. A margin_call, and the bid (it raises the
        # requirement: 18600 + 0.1 * (90000 - 74400) = 20160) is cancelled; the ask stays.
        await _mark(paper, 93_000)
        call = await bot.notification("user.inbox_notifications")
        (note,) = call["notifications"]
        assert (note["category"], note["display_type"]) == ("margin_call", "warning")
        assert "initial margin" in note["message"]
        cancelled = await bot.notification(
            "account.orders", lambda o: bool(o) and o[0].get("delete_reason") == "margin_breach"
        )
        assert [(o["order_id"], o["delete_reason"]) for o in cancelled] == [
            (bid["order_id"], "margin_breach")
        ]
        assert [o["order_id"] for o in await bot.result("open_orders")] == [ask["order_id"]]

        # Mark 87000: margin 24948.9995 - 13000 = 11948.9995 < maintenance 0.7 * 17400 = 12180: the
        # open orders go, and the position is liquidated at the mark: a liquidation trade selling 1 @ 87000,
        # taker fee 0.0005 * 87000 = 43.5, liquidation fee 0.005 * 87000 = 435.
        await _mark(paper, 87_000)
        call = await bot.notification("user.inbox_notifications")
        assert call["notifications"][0]["display_type"] == "critical"
        (trade,) = await bot.notification(
            "account.trade_history", lambda ts: ts[0]["trade_type"] == "liquidation"
        )
        assert (trade["direction"], trade["amount"], trade["price"]) == ("sell", 1.0, 87_000)
        assert (trade["fee"], trade["liquidation_fee"]) == (pytest.approx(43.5), pytest.approx(435.0))
        assert trade["position_pnl"] == pytest.approx(87_000 - 100_001)
        orders = [o for batch in bot.of("account.orders") for o in batch]
        liquidation = next(o for o in orders if o["order_id"] == trade["order_id"])
        assert liquidation["insert_reason"] == "liquidation"
        assert (
            next(o for o in orders if o["order_id"] == ask["order_id"] and "delete_reason" in o)[
                "delete_reason"
            ]
            == "margin_breach"
        )
        assert await bot.result("portfolio") == [] or all(
            p["position"] == 0 for p in await bot.result("portfolio")
        )
        breakdown = await bot.result("account_breakdown")
        # fees of the session: 50.0005 + 43.5 + 435
        assert breakdown["session_fees"] == pytest.approx(528.5005)
        inbox = (await bot.result("notifications_inbox"))["notifications"]
        assert [n["display_type"] for n in inbox] == ["critical", "warning"]
        assert bot.problems() == []


class QuotingBot:
    """A market maker on the official client: bids 0.25 one level lower each time until the exchange
    refuses a quote for margin (error 24); then it reduces — cancels its two lowest bids — and quotes
    again at half the size."""

    def __init__(self, client: Official) -> None:
        self.client = client
        self.quotes: list[str] = []
        self.refusal: dict | None = None

    async def quote_until_refused(self, start: float, size: float, limit: int = 200) -> None:
        await self.client.result("set_cancel_on_disconnect", 10)  # quotes die with the bot; 50 messages/s
        price = start
        for _ in range(limit):
            answer = await self.client.request("buy", PERP, size, price=price, post_only=True, label="mm")
            if answer.get("error", {}).get("code") == 4:  # throttled: slow down and try again
                await asyncio.sleep(0.2)
                continue
            if "error" in answer:
                self.refusal = answer["error"]
                return
            self.quotes.append(answer["result"]["order_id"])
            price -= 10

    async def reduce(self) -> None:
        for order_id in self.quotes[-2:]:
            await self.client.result("cancel", order_id=order_id)
        del self.quotes[-2:]


async def test_a_bot_quotes_until_error_24_then_reduces(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    await paper.control("paper/set_balance", {"key_id": "trader", "balance": 50_000})
    async with Official(paper.url) as client:
        await client.login(keys["trader"])
        bot = QuotingBot(client)
        await bot.quote_until_refused(99_990, 0.25)
        assert bot.refusal is not None and bot.refusal["code"] == 24, bot.refusal
        assert "insufficient margin" in bot.refusal["message"]
        # bid k (k = 0, 1, ...) of 0.25 at 99990 - 10k loses 0.25 * (19990 - 10k) when the index falls
        # 20 %: ten bids need 0.25 * (10 * 19990 - 10 * (0 + 1 + ... + 9)) = 0.25 * (199900 - 450) = 49862.5
        # <= 50000; an eleventh would need 0.25 * (219890 - 550) = 54835.
        assert len(bot.quotes) == 10
        summary = await client.result("account_summary")
        assert summary["required_margin"] <= summary["margin"]
        await bot.reduce()
        smaller = await client.result("buy", PERP, 0.125, price=99_000, post_only=True, label="mm")
        assert smaller["status"] == "open"
        assert len(await client.result("open_orders")) == 9
        summary = await client.result("account_summary")
        assert summary["required_margin"] <= summary["margin"]
        assert client.problems() == []
