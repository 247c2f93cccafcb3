"""The executor against the paper exchange and a real Redis: closing, retrying, errors, dry run, deadline."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import thalex
from redis.asyncio import Redis

from services.common.contracts import ReportStatus
from services.common.streams import Names
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    NO_CLEARING,
    PERP,
    TRADER,
    account_positions,
    instruments,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    send,
    trades,
    wait_outcome,
)


async def _resting_order(paper: PaperHandle, trader: KeyFiles) -> thalex.Thalex:
    """A quoter's resting bid on the account (a persistent order from another session)."""
    client = thalex.Thalex(types.SimpleNamespace(value=paper.url))
    await client.connect()
    await client.login(trader.kid, trader.private_pem, id=1)
    await client.buy(PERP, 0.1, price=90000, id=2)
    while True:
        message = json.loads(await client.receive())
        if message.get("id") == 2:
            assert message["result"]["status"] == "open"
            return client


async def test_perpetual_long_future_short_and_option_closed_flat_after_cancelling_orders(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    future = instruments(paper, "future", "BTCUSD")[0]
    option = instruments(paper, "option", "BTCUSD")[0]
    held = {PERP: 0.5, future: -0.3, option: 2.0}
    await open_positions(paper, held)
    quoter = await _resting_order(paper, trader)
    settings = make_settings(redis_url, names, paper, trader)
    command = make_command(held)
    async with running_executor(settings):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    await quoter.disconnect()
    statuses = [r.status for r in got]
    assert statuses[0] is ReportStatus.RECEIVED and statuses[1] is ReportStatus.ORDERS_CANCELLED
    assert statuses[-1] is ReportStatus.COMPLETED, got[-1]
    assert all(p == 0 for p in account_positions(paper).values())
    assert not paper.exchange.engine.accounts[TRADER].orders
    log = (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"]
    methods = [row["method"] for row in log]
    assert methods.index("private/cancel_all") < methods.index("private/insert")
    inserts = [row["params"] for row in log if row["method"] == "private/insert"]
    assert all(p["reduce_only"] and p["collar"] == "clamp" and p["time_in_force"] == "immediate_or_cancel"
               for p in inserts)
    assert {p["label"] for p in inserts} == {got[0].command_id and inserts[0]["label"]}
    filled = [r for r in got if r.status is ReportStatus.FILLED]
    assert {r.instrument for r in filled} == set(held)
    assert all(r.fee is not None and r.fee > 0 and r.avg_price and r.epoch == 3 and r.fraction == 1.0
               for r in filled)
    assert all(r.epoch == 3 and r.fraction == 1.0 for r in got)


async def test_thin_book_partial_fill_is_retried_until_flat(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.35})
    await paper.control("paper/set_book", {"instrument_name": PERP, "levels": 1, "level_amount": 0.1,
                                           "growth": 0.0})
    command = make_command({PERP: 0.35})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    fills = [r for r in got if r.status in (ReportStatus.FILLED, ReportStatus.PARTIALLY_FILLED)]
    assert fills[0].status is ReportStatus.PARTIALLY_FILLED and fills[0].filled == 0.1
    assert abs(sum(r.filled or 0 for r in fills) - 0.35) < 1e-9
    assert account_positions(paper)[PERP] == 0
    assert all(t["position_after"] >= 0 for t in trades(paper))


async def test_injected_throttle_and_temporary_failures_are_backed_off(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    future = instruments(paper, "future", "BTCUSD")[0]
    await open_positions(paper, {PERP: 0.2, future: -0.2})
    await paper.control("paper/fail_next", {"code": 4, "count": 3, "methods": ["private/insert"],
                                            "key_id": TRADER, "message": "throttle exceeded"})
    await paper.control("paper/fail_next", {"code": 20, "count": 1, "methods": ["private/insert"],
                                            "key_id": TRADER, "message": "temporary failure"})
    command = make_command({PERP: 0.2, future: -0.2})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    log = (await paper.control("paper/order_log", {"key_id": TRADER, "method": "private/insert"}))["orders"]
    codes = [row["outcome"].get("error", {}).get("code") for row in log]
    assert codes.count(4) == 3 and codes.count(20) == 1
    assert all(p == 0 for p in account_positions(paper).values())


async def test_dry_run_sends_nothing_and_needs_no_key(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.5})
    command = make_command({PERP: 0.5})
    async with running_executor(make_settings(redis_url, names, paper, None, dry_run=True)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert [r.status for r in got] == [ReportStatus.RECEIVED, ReportStatus.DRY_RUN]
    (order,) = got[-1].orders or []
    assert (order.instrument, order.side, order.amount, order.reduce_only) == (PERP, "sell", 0.5, True)
    assert order.price < paper.exchange.market.mark(PERP).price
    assert (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"] == []
    assert account_positions(paper)[PERP] == 0.5


async def test_deadline_with_liquidity_gone_fails_with_the_reason(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.5})
    await paper.control("paper/set_book", {"instrument_name": PERP, "bids": False})
    command = make_command({PERP: 0.5}, deadline=1.0)
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    outcome = got[-1]
    assert outcome.status is ReportStatus.FAILED and outcome.error is not None
    assert outcome.error.code == 41 and PERP in outcome.error.message
    assert (outcome.epoch, outcome.fraction, outcome.instrument) == (3, 1.0, None)
    assert account_positions(paper)[PERP] == 0.5


async def test_partial_command_closes_exactly_the_listed_amounts(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    future = instruments(paper, "future", "BTCUSD")[0]
    await open_positions(paper, {PERP: 1.0, future: -0.6})
    command = make_command({PERP: 0.5, future: -0.3}, fraction=0.5)
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED and got[-1].fraction == 0.5
    assert account_positions(paper) == {PERP: 0.5, future: -0.3}


async def test_hedged_legs_never_leave_more_net_delta_than_at_the_decision(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    future = instruments(paper, "future", "BTCUSD")[0]
    await open_positions(paper, {PERP: 1.0, future: -0.9})
    for name in (PERP, future):  # thin books: neither side can close at once
        await paper.control("paper/set_book", {"instrument_name": name, "levels": 2, "level_amount": 0.15,
                                               "growth": 0.0})
    command = make_command({PERP: 1.0, future: -0.9})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    # A wave sends at most one order per leg, back to back, lead side first: a wave ends where an
    # instrument repeats. After every wave the net delta is within what it was at the decision.
    held = {PERP: 1.0, future: -0.9}
    log = (await paper.control("paper/order_log", {"key_id": TRADER, "method": "private/insert"}))["orders"]
    waves, in_wave = 0, set()
    for row in log:
        name = row["params"]["instrument_name"]
        if name in in_wave:
            waves += 1
            assert abs(held[PERP] + held[future]) <= 0.1 + 1e-9, held
            in_wave = set()
        in_wave.add(name)
        result = row["outcome"]["result"]
        sign = 1 if result["direction"] == "buy" else -1
        held[name] = round(held[name] + sign * result["filled_amount"], 10)
    assert abs(held[PERP] + held[future]) <= 0.1 + 1e-9, held
    assert waves >= 3 and held == {PERP: 0, future: 0}


async def test_already_flat_position_is_done_without_an_order(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    command = make_command({PERP: 0.5})
    async with running_executor(make_settings(redis_url, names, paper, trader, **NO_CLEARING)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert [r.status for r in got] == [ReportStatus.RECEIVED, ReportStatus.COMPLETED]
    assert (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"] == []


async def test_a_closure_that_leaves_dust_completes_and_names_it(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The dust loop's first step, on the paper exchange with Thalex's BTC sizes (volume tick 0.0001,
    minimum order 0.001): 0.1005 BTC against a book of 0.1 fills 0.1; the 0.0005 left cannot be
    ordered. The closure completes — nothing more can be sent — and its `completed` names the dust."""
    market = paper.exchange.market
    market.instruments[PERP] = dataclasses.replace(market.instruments[PERP], min_order_amount=0.001)
    await open_positions(paper, {PERP: 0.1005})
    await paper.control("paper/set_book", {"instrument_name": PERP, "levels": 1, "level_amount": 0.1,
                                           "growth": 0.0})
    command = make_command({PERP: 0.1005})
    async with running_executor(make_settings(redis_url, names, paper, trader, **NO_CLEARING)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert account_positions(paper)[PERP] == pytest.approx(0.0005)
    dust = [r for r in got if r.status is ReportStatus.PARTIALLY_FILLED and r.error and r.error.code == 14]
    assert [(r.instrument, r.amount) for r in dust] == [(PERP, pytest.approx(0.0005))]  # said once
    outcome = got[-1]
    assert outcome.status is ReportStatus.COMPLETED and outcome.error is not None, outcome
    assert outcome.error.code == 14
    assert outcome.error.message == ("completed; left open as dust, below what an order may close: "
                                     "BTC-PERPETUAL 0.0005 (minimum order 0.001, volume tick 0.0001)")
    log = await paper.control("paper/order_log", {"key_id": TRADER, "method": "private/insert"})
    assert [row["params"]["amount"] for row in log["orders"]] == [0.1005]  # one order; none for the dust


def test_a_trading_executor_without_a_key_stops_with_exit_2(tmp_path, redis_url: str) -> None:
    from services.executor.app import main

    config = tmp_path / "executor.toml"
    config.write_text(
        f'[redis]\nurl = "{redis_url}"\n[executor]\ndry_run = false\n[metrics]\nexecutor_port = 0\n'
    )
    assert main(["--config", str(config)]) == 2
