"""Every query method of the issue, through the official client, answering from the paper's real state;
every answer validates strictly against api.yaml. Paging as api.yaml documents it: ``limit``,
``bookmark`` (absent on the last page), ``sort``, ``time_low``/``time_high``, ``instrument_names``.
"""

from __future__ import annotations

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, RawClient
from .official import Official
from .test_paper_lifecycle import _to_next_settlement
from .test_paper_subscriptions import by_kind

pytestmark = pytest.mark.asyncio
MARKET = thalex.OrderType.MARKET


async def _pages(bot: Official, method: str, key: str, **params: object) -> list[list[dict]]:
    pages: list[list[dict]] = []
    bookmark = None
    while True:
        answer = await bot.result(method, bookmark=bookmark, **params)
        pages.append(answer[key])
        bookmark = answer.get("bookmark")
        if bookmark is None:
            return pages


async def test_order_and_trade_history_page_through_everything_once(
    paper: PaperHandle, keys: dict[str, KeyFiles], connect
) -> None:
    option = by_kind(paper, "option")[0]
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        ids = []
        for price in (90000, 90001, 90002, 90003, 90004):
            ids.append((await bot.result("buy", PERP, 0.1, price=price))["order_id"])
        await bot.result("cancel_all")
        ids.append((await bot.result("buy", PERP, 0.2, order_type=MARKET))["order_id"])
        ids.append((await bot.result("buy", option, 0.1, order_type=MARKET))["order_id"])
        # 7 closed orders, newest close first by default; pages of 3: 3 + 3 + 1
        pages = await _pages(bot, "order_history", "orders", limit=3)
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [o["order_id"] for p in pages for o in p] == list(reversed(ids))
        cancelled = [o for p in pages for o in p if o["status"] == "cancelled"]
        assert len(cancelled) == 5 and {o["delete_reason"] for o in cancelled} == {"client_bulk_cancel"}
        assert all("remaining_amount" not in o and "close_time" in o for p in pages for o in p)
        # the official client's order_history sends no sort or instrument_names: a raw request does
        raw: RawClient = await connect()
        await raw.login(keys["trader"])
        ascending, bookmark = [], None
        while True:
            page = await raw.result(
                "private/order_history",
                {"limit": 2, "sort": "ascending", **({"bookmark": bookmark} if bookmark else {})},
            )
            ascending += [o["order_id"] for o in page["orders"]]
            if "bookmark" not in page:
                break
            bookmark = page["bookmark"]
        assert ascending == ids
        only_option = (await raw.result("private/order_history", {"instrument_names": option}))["orders"]
        assert [o["order_id"] for o in only_option] == [ids[-1]]
        # trades: the 0.2 perpetual (one fill at 100001) and the option
        trades = await _pages(bot, "trade_history", "trades", limit=1)
        assert [len(p) for p in trades] == [1, 1]
        assert [t["instrument_name"] for p in trades for t in p] == [option, PERP]
        assert (await bot.result("trade_history", bot_ids="no-such-bot"))["trades"] == []
        late = (await paper.control("paper/status"))["time"] + 10**6
        assert (await bot.result("trade_history", time_low=late))["trades"] == []
        assert bot.problems() == []


async def test_account_breakdown_and_histories_after_a_settlement(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    await paper.control("paper/set_funding", {"instrument_name": PERP, "funding_mark": 4.0})
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        # Long 1.5: 1.0 @ 100001 + 0.5 @ 100002, fees 50.0005 + 25.0005 = 75.001; funding entry 4 * 1.5 = 6.
        await bot.result("buy", PERP, 1.5, order_type=MARKET)
        await bot.result("sell", PERP, 0.3, price=101000)  # rests: open sell 0.3
        await paper.control("paper/set_funding", {"instrument_name": PERP, "funding_mark": 6.0})
        breakdown = await bot.result("account_breakdown")
        (line,) = breakdown["portfolio"]
        # unrealised positional (100000 - 100001.3333) * 1.5 = -2.0; perpetual 6 * 1.5 - 6 = 3.0
        assert line["unrealised_pnl_positional"] == pytest.approx(-2.0)
        assert line["unrealised_pnl_perpetual"] == pytest.approx(3.0)
        assert line["unrealised_pnl"] == pytest.approx(1.0)
        assert (line["open_buy_amount"], line["open_sell_amount"]) == (0.0, 0.3)
        assert line["session_fees"] == pytest.approx(75.001)
        assert line["session_realised_pnl"] == pytest.approx(-75.001)
        assert breakdown["session_fees"] == pytest.approx(75.001)
        assert breakdown["realised_perpetual_funding"] == 0.0
        # Sell 0.5 at the bid 99999: realises 0.5 * (99999 - 100001.3333) = -1.16667 and a third of the
        # funding: (1/3) * (6 * 1.5 - 6) = 1.0; fee 0.0005 * 99999 * 0.5 = 24.99975.
        await bot.result("sell", PERP, 0.5, order_type=MARKET)
        breakdown = await bot.result("account_breakdown")
        assert breakdown["realised_position_pnl"] == pytest.approx(-1.1666667)
        assert breakdown["realised_perpetual_funding"] == pytest.approx(1.0)
        assert breakdown["session_fees"] == pytest.approx(75.001 + 24.99975)
        assert breakdown["session_realised_pnl"] == pytest.approx(-1.1666667 + 1.0 - 100.00075)
        await _to_next_settlement(paper)
        marks = (await bot.result("daily_mark_history", limit=10))["daily_marks"]
        assert [(m["instrument_name"], m["position"]) for m in marks] == [(PERP, 1.0)]
        # the rest of the funding: 6 * 1.0 - 4 = 2.0 (entry value 6 - 2 released)
        assert marks[0]["realized_funding_pnl"] == pytest.approx(2.0)
        pages = await _pages(bot, "transaction_history", "transactions", limit=1)
        assert [len(p) for p in pages] == [1, 1, 1]
        kinds = [t["transaction_type"] for p in pages for t in p]
        assert kinds == ["perpetual funding", "session settlement", "deposit"]  # newest first
        breakdown = await bot.result("account_breakdown")
        assert breakdown["session_fees"] == 0.0 and breakdown["realised_perpetual_funding"] == 0.0
        assert (await bot.result("rfq_history"))["rfqs"] == []  # RFQs come with issue 18
        assert bot.problems() == []


async def test_margin_breakdowns_worked_by_hand(paper: PaperHandle, keys: dict[str, KeyFiles]) -> None:
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        await bot.result("buy", PERP, 1.0, order_type=MARKET)  # long 1 @ 100001, mark 100000
        breakdown = (await bot.result("required_margin_breakdown"))["portfolio"]
        # worst scenario: index -20 %: the perpetual loses 1 * 100000 * 0.2 = 20000; no contingencies
        assert breakdown["required_margin"] == pytest.approx(20000)
        (btc,) = breakdown["underlyings"]
        assert btc["underlying"] == "BTCUSD" and btc["loss_margin"] == pytest.approx(20000)
        worst = btc["scenarios"][btc["scenario_used"]]
        assert worst["underlying_change_pct"] == -20 and worst["highlight"] is True
        assert worst["positions"][0]["scenario_price"] == pytest.approx(80000)
        # a hypothetical 0.5 at 100000: buying adds 0.5 * 20000; selling halves the worst loss
        answer = await bot.result("required_margin_for_order", PERP, 100000, 0.5)
        assert answer["current"]["required_margin"] == pytest.approx(20000)
        assert answer["with_buy"]["required_margin"] == pytest.approx(30000)
        assert answer["with_sell"]["required_margin"] == pytest.approx(20000)  # the open order leaves the max
        # a roll is margined on its legs. Selling 1 roll = -1 future, +1 perpetual: with the long
        # perpetual that is +2 perpetual against -1 future, offsetting deltas in two maturities of
        # min(2, 1) = 1 contract: roll contingency 4 % * index 100000 * 1 = 4000. Buying it instead
        # nets the perpetual to 0 against +1 future: nothing offsets.
        future = by_kind(paper, "future")[0]
        roll = await bot.result("required_margin_for_order", f"{future}-PERPETUAL", 100, 1.0)
        assert roll["with_sell"]["underlying"]["roll_contingency_margin"] == pytest.approx(0.04 * 100000)
        assert roll["with_buy"]["underlying"]["roll_contingency_margin"] == 0.0
        summary = await bot.result("account_summary")
        assert summary["required_margin"] == pytest.approx(20000)
        assert summary["remaining_margin"] == pytest.approx(summary["margin"] - 20000)
        assert await bot.error("required_margin_for_order", "BTC-NOPE", 1, 1) == 5
        assert bot.problems() == []


async def test_inbox_system_info_instruments_and_price_history(
    paper: PaperHandle, keys: dict[str, KeyFiles], connect
) -> None:
    future = by_kind(paper, "future")[0]
    option = by_kind(paper, "option")[0]
    roll = f"{future}-PERPETUAL"
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        for message in ("one", "two", "three"):
            await paper.control("paper/notify", {"key_id": "trader", "message": message, "category": "info"})
        inbox = (await bot.result("notifications_inbox", 2))["notifications"]
        assert [n["message"] for n in inbox] == ["three", "two"]  # newest first, limited
        await bot.result("mark_inbox_notification_as_read", inbox[0]["id"])
        assert (await bot.result("notifications_inbox"))["notifications"][0]["read"] is True
        await bot.result("mark_inbox_notification_as_read", inbox[0]["id"], read=False)
        assert (await bot.result("notifications_inbox"))["notifications"][0]["read"] is False
        assert await bot.error("mark_inbox_notification_as_read", "0000000000000099") == 6

        await paper.control(
            "paper/set_banners", {"banners": [{"severity": "info", "message": "paper", "title": "t"}]}
        )
        info = await bot.result("system_info")
        assert info["environment"] == "testnet" and info["banners"][0]["message"] == "paper"

        listed = await bot.result("instruments")
        assert {i["type"] for i in listed} == {"perpetual", "future", "option", "combination"}
        assert {i["instrument_name"] for i in await bot.result("all_instruments")} == {
            i["instrument_name"] for i in listed
        }

        now = (await paper.control("paper/status"))["time"]
        for step in range(3):  # three minutes of marks: 100000, 100100, 100200
            await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 100000 + 100 * step})
            await paper.control("paper/advance_clock", {"seconds": 60})
        start = now - 60
        perp = await bot.result("mark_price_historical_data", PERP, start, now + 400, thalex.Resolution.M1)
        assert perp["instrument_type"] == "perpetual" and "no_data" not in perp
        assert all(len(point) == 7 for point in perp["mark"])
        assert perp["mark"][-1][6] is not None  # top of book on 1-minute points
        five = await bot.result("mark_price_historical_data", PERP, start, now + 400, thalex.Resolution.M5)
        assert five["mark"] and all(point[6] is None for point in five["mark"])
        assert max(p[2] for p in five["mark"]) >= 100200 and min(p[3] for p in five["mark"]) <= 100000
        for name, kind, width in ((future, "future", 6), (roll, "combination", 6), (option, "option", 10)):
            answer = await bot.result("mark_price_historical_data", name, start, now + 400, "1m")
            assert answer["instrument_type"] == kind and all(len(p) == width for p in answer["mark"]), answer
        index = await bot.result(
            "index_price_historical_data", "BTCUSD", start, now + 400, thalex.Resolution.H1
        )
        assert index["index"] and all(len(p) == 5 for p in index["index"])
        empty = await bot.result("index_price_historical_data", "ETHUSD", 0, 3600, "1h")
        assert empty == {"index": [], "no_data": True}
        assert await bot.error("mark_price_historical_data", "BTC-NOPE", start, now, "1m") == 5
        assert await bot.error("index_price_historical_data", "BTCUSD", start, now, "2m") == 6
        assert bot.problems() == []
    # the official client sends no time window for all_instruments; a raw request does
    raw: RawClient = await connect()
    assert await raw.error_code("public/all_instruments", {"time_low": 0, "time_high": 4 * 86400}) == 6
