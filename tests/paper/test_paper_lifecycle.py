"""Instruments that live and die, worked out by hand: combinations booked on their legs, expiry with
settlement trades and the final-settlement fee, the daily settlement of funding and P&L, listings —
the clock moved with ``paper/advance_clock``. Every message validates strictly against api.yaml.

The ``paper`` fixture pins BTC-PERPETUAL's mark at 100000 (funding 0) with a book of five 1.0-lots a
side one tick apart: asks 100001, 100002, ...; bids 99999, 99998, ...
"""

from __future__ import annotations

import asyncio

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP
from .official import Official
from .test_paper_subscriptions import by_kind

pytestmark = pytest.mark.asyncio
MARKET = thalex.OrderType.MARKET
ONE_LOT_BOOK = {"levels": 5, "level_amount": 1.0, "growth": 0.0, "spread_ticks": 1, "step_ticks": 1}


async def _pin(paper: PaperHandle, name: str, mark: float) -> None:
    await paper.control("paper/set_mark", {"instrument_name": name, "price": mark})
    await paper.control("paper/set_book", {"instrument_name": name, **ONE_LOT_BOOK})


async def _to_next_settlement(paper: PaperHandle, after: float = 1.0) -> dict:
    status = await paper.control("paper/status")
    return await paper.control(
        "paper/advance_clock", {"seconds": status["next_settlement"] - status["time"] + after}
    )


async def test_a_roll_and_a_combination_trade_on_their_legs(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    future = by_kind(paper, "future")[0]
    roll = f"{future}-PERPETUAL"
    await _pin(paper, future, 100100)  # asks 100101, 100102 ...; bids 100099, ...
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        await bot.result("private_subscribe", ["account.trade_history"])
        instrument = await bot.result("instrument", roll)
        assert instrument["type"] == "combination"
        assert instrument["legs"] == [
            {"instrument_name": future, "quantity": 1},
            {"instrument_name": PERP, "quantity": -1},
        ]
        # The roll's implied book: ask = future ask - perp bid = 100101 - 99999 = 102;
        #                         bid = future bid - perp ask = 100099 - 100001 = 98
        ticker = await bot.result("ticker", roll)
        assert (ticker["best_bid_price"], ticker["best_ask_price"], ticker["mark_price"]) == (98, 102, 100)
        # Buying 0.5 roll buys 0.5 future at 100101 and sells 0.5 perpetual at 99999 (roll price 102);
        # the fee is charged once: half the taker rate on each leg,
        #   0.00025 * 100101 * 0.5 = 12.512625 and 0.00025 * 99999 * 0.5 = 12.499875
        order = await bot.result("buy", roll, 0.5, order_type=MARKET, label="roll")
        assert order["instrument_name"] == roll and order["filled_amount"] == 0.5
        trades = await bot.notification("account.trade_history")
        assert [
            (t["instrument_name"], t["direction"], t["price"], t["amount"], t["leg_index"], t["trade_type"])
            for t in trades
        ] == [(future, "buy", 100101, 0.5, 0, "combo"), (PERP, "sell", 99999, 0.5, 1, "combo")]
        assert [t["fee"] for t in trades] == [pytest.approx(12.512625), pytest.approx(12.499875)]
        assert {t["fee_rate"] for t in trades} == {0.00025} and {t["label"] for t in trades} == {"roll"}
        assert {t["order_id"] for t in trades} == {order["order_id"]}
        # A combination order by legs (immediate-or-cancel only): sell 0.2 of [future:1, perp:-1]
        # = sell 0.2 future at its bid 100099, buy 0.2 perpetual at its ask 100001; full fees.
        combo = await bot.result(
            "insert_combo",
            thalex.Direction.SELL,
            [{"instrument_name": future, "quantity": 1}, {"instrument_name": PERP, "quantity": -1}],
            0.2,
            order_type=MARKET,
        )
        assert "instrument_name" not in combo
        assert combo["legs"] == [
            {"instrument_name": future, "quantity": 1, "filled_amount": 0.2, "remaining_amount": 0.0},
            {"instrument_name": PERP, "quantity": -1, "filled_amount": 0.2, "remaining_amount": 0.0},
        ]
        trades = await bot.notification("account.trade_history")
        assert [(t["instrument_name"], t["direction"], t["price"], t["fee_rate"]) for t in trades] == [
            (future, "sell", 100099, 0.0005),
            (PERP, "buy", 100001, 0.0005),
        ]
        positions = {p["instrument_name"]: p["position"] for p in await bot.result("portfolio")}
        assert positions == {future: pytest.approx(0.3), PERP: pytest.approx(-0.3)}
        assert not [p for p in positions if p == roll]  # positions are on the legs only
        # combinations cannot rest, and have no reduce-only
        legs = [{"instrument_name": future, "quantity": 1}, {"instrument_name": PERP, "quantity": -1}]
        assert (
            await bot.error(
                "insert_combo",
                thalex.Direction.BUY,
                legs,
                0.1,
                price=100,
                time_in_force=thalex.TimeInForce.GTC,
            )
            == 25
        )
        assert (
            await bot.error(
                "insert_combo",
                thalex.Direction.BUY,
                [{"instrument_name": "BTC-NOPE", "quantity": 1}, legs[1]],
                0.1,
                order_type=MARKET,
            )
            == 5
        )
        assert await bot.error("insert_combo", thalex.Direction.BUY, [legs[0]], 0.1, order_type=MARKET) == 6
        assert bot.problems() == []


async def test_crossing_a_settlement_expires_the_daily_future_and_settles_funding(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    future = by_kind(paper, "future")[0]
    await _pin(paper, future, 100100)
    await paper.control("paper/set_funding", {"instrument_name": PERP, "funding_mark": 10.0})
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        await bot.result(
            "private_subscribe", ["account.trade_history", "account.orders", "account.portfolio"]
        )
        await bot.result("public_subscribe", ["instruments"])
        await bot.notification("instruments")
        # Long 2 perpetuals: 1.0 @ 100001 + 1.0 @ 100002, start 100001.5, fees 0.0005 * 200003 = 100.0015;
        # funding entry value 10 * 2 = 20.
        await bot.result("buy", PERP, 2.0, order_type=MARKET)
        # Long 0.5 of the daily future @ 100101, fee 0.0005 * 100101 * 0.5 = 25.02525; and a resting bid.
        await bot.result("buy", future, 0.5, order_type=MARKET)
        resting = await bot.result("buy", future, 0.1, price=99000)
        await paper.control("paper/set_funding", {"instrument_name": PERP, "funding_mark": 25.0})
        await paper.control("paper/set_index", {"underlying": "BTCUSD", "price": 100000})
        crossed = await _to_next_settlement(paper)
        assert crossed["settlements"] == 1

        # Expiry: the resting bid goes (instrument_deactivated); the position closes at the delivery
        # price, the index 100000 (nothing moved in the expiration window): an expiration trade,
        # position P&L 0.5 * (100000 - 100101) = -50.5, final settlement fee 0.0001 * 100000 * 0.5 = 5.
        cancelled = await bot.notification(
            "account.orders",
            lambda o: bool(o) and o[0]["order_id"] == resting["order_id"] and "delete_reason" in o[0],
        )
        assert cancelled[0]["delete_reason"] == "instrument_deactivated"
        (expiry,) = await bot.notification(
            "account.trade_history", lambda ts: ts[0]["trade_type"] == "expiration"
        )
        assert (expiry["instrument_name"], expiry["direction"], expiry["price"], expiry["amount"]) == (
            future,
            "sell",
            100000,
            0.5,
        )
        assert (expiry["fee"], expiry["fee_rate"], expiry["position_after"]) == (5.0, 0.0001, 0.0)
        assert expiry["position_pnl"] == pytest.approx(-50.5)
        assert "order_id" not in expiry and "maker_taker" not in expiry
        changes = await bot.notification("instruments", lambda items: any("removed" in i for i in items))
        gone = {i["removed"]["instrument_name"]: i["removed"] for i in changes if "removed" in i}
        assert gone[future]["settlement_price"] == 100000 and gone[future]["settlement_index_price"] == 100000
        assert f"{future}-PERPETUAL" in gone  # its rolls expire with it
        added = [i["added"] for i in changes if "added" in i]
        assert [i["type"] for i in added if i["underlying"] == "BTCUSD"].count("future") == 1  # a new daily
        assert (await bot.result("instrument", future))["settlement_price"] == 100000
        assert await bot.error("ticker", future) == 5

        # Daily settlement of the perpetual (mark 100000): position P&L 2 * (100000 - 100001.5) = -3.0,
        # funding 25 * 2 - 20 = 30; start price reset to the mark, average kept, funding entry value 0.
        (mark,) = (await bot.result("daily_mark_history"))["daily_marks"]
        assert mark["instrument_name"] == PERP and mark["position"] == 2.0 and mark["mark_price"] == 100000
        assert mark["realized_position_pnl"] == pytest.approx(-3.0)
        assert mark["realized_funding_pnl"] == pytest.approx(30.0)
        (line,) = await bot.result("portfolio")
        assert (line["start_price"], line["average_price"], line["realised_pnl"]) == (100000, 100001.5, 0.0)
        assert "perpetual_funding_entry_value" not in line and line["unrealised_perpetual_funding"] == 0.0
        assert (await bot.result("ticker", PERP))["funding_mark"] == 0.0
        # Into the balance: perpetual -3.0 - 100.0015 = -103.0015 (session settlement) and +30 (funding);
        # the future -50.5 - 25.02525 - 5 = -80.52525. Balance 1,000,000 - 103.0015 + 30 - 80.52525.
        transactions = (await bot.result("transaction_history"))["transactions"]
        by_type = {(t["transaction_type"], t.get("instrument_name")): t["amount"] for t in transactions}
        assert by_type[("session settlement", PERP)] == pytest.approx(-103.0015)
        assert by_type[("perpetual funding", PERP)] == pytest.approx(30.0)
        assert by_type[("session settlement", future)] == pytest.approx(-80.52525)
        assert by_type[("deposit", None)] == 1_000_000
        summary = await bot.result("account_summary")
        assert summary["cash"][0]["balance"] == pytest.approx(1_000_000 - 103.0015 + 30 - 80.52525)
        assert summary["session_realised_pnl"] == 0.0
        assert bot.problems() == []


async def test_options_expire_at_their_value_and_worthless_ones_pay_no_fee(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    market = paper.exchange.market
    weekly = min(market.instruments[n].expiry_ts or 0 for n in by_kind(paper, "option"))
    series = [
        n
        for n in by_kind(paper, "option")
        if market.instruments[n].expiry_ts == weekly and market.instruments[n].strike == 95000
    ]
    call = next(n for n in series if n.endswith("-C"))
    put = next(n for n in series if n.endswith("-P"))
    strike = market.instruments[call].strike
    assert strike == market.instruments[put].strike == 95000
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        await paper.control(
            "paper/trade",
            {"key_id": "trader", "instrument_name": call, "direction": "buy", "amount": 2.0, "price": 5000},
        )
        await paper.control(
            "paper/trade",
            {"key_id": "trader", "instrument_name": put, "direction": "sell", "amount": 1.0, "price": 200},
        )
        await paper.control("paper/set_index", {"underlying": "BTCUSD", "price": 100000})
        status = await paper.control("paper/status")
        days = await paper.control("paper/advance_clock", {"seconds": weekly - status["time"] + 1})
        assert days["settlements"] >= 2  # every 08:00 UTC on the way settled in turn
        trades = (await bot.result("trade_history", instrument_names=f"{call},{put}"))["trades"]
        expired = {t["instrument_name"]: t for t in trades if t["trade_type"] == "expiration"}
        # The call is worth 100000 - 95000 = 5000 at delivery; the final settlement fee is 1 bps of
        # the amount settled: 0.0001 * 5000 * 2 = 1.0. The put expires worthless: price 0, fee 0.
        call_trade = expired[call]
        assert (call_trade["direction"], call_trade["price"], call_trade["fee"]) == ("sell", 5000, 1.0)
        assert expired[call]["position_pnl"] == pytest.approx(0.0)
        assert (expired[put]["direction"], expired[put]["price"], expired[put]["fee"]) == ("buy", 0.0, 0.0)
        assert expired[put]["position_pnl"] == pytest.approx(200.0)  # -1 * (0 - 200)
        assert {p["instrument_name"] for p in await bot.result("portfolio")}.isdisjoint({call, put})
        assert bot.problems() == []


async def test_new_instruments_are_listed_as_time_passes_and_all_instruments_remembers_the_expired(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    async with Official(paper.url) as bot:
        before = {i["instrument_name"] for i in await bot.result("instruments")}
        await _to_next_settlement(paper)
        after = {i["instrument_name"] for i in await bot.result("instruments")}
        assert after - before and before - after  # one daily future (and its rolls) out, a new one in
        everything = await bot.result("all_instruments")
        assert {i["instrument_name"] for i in everything} >= before | after
        expired = [i for i in everything if i["instrument_name"] in before - after]
        assert expired and all("settlement_price" in i for i in expired)
        assert bot.problems() == []


async def test_a_faster_clock_crosses_a_settlement_by_itself(
    paper: PaperHandle, keys: dict[str, KeyFiles]
) -> None:
    async with Official(paper.url) as bot:
        await bot.login(keys["trader"])
        await bot.result("buy", PERP, 0.1, order_type=MARKET)
        status = await paper.control("paper/status")
        await paper.control(
            "paper/advance_clock", {"seconds": status["next_settlement"] - status["time"] - 5}
        )
        await paper.control("paper/set_clock_speed", {"speed": 50})  # 5 s of paper time in 0.1 s
        for _ in range(100):
            if (await bot.result("daily_mark_history"))["daily_marks"]:
                break
            await asyncio.sleep(0.05)
        (mark,) = (await bot.result("daily_mark_history"))["daily_marks"]
        assert mark["time"] == status["next_settlement"] and mark["position"] == 0.1
        assert (await paper.control("paper/set_clock_speed", {"speed": 1}))["clock_speed"] == 1
        assert bot.problems() == []
