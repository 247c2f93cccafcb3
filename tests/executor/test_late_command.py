"""A command whose deadline has passed is not acted on: no clearing round, no order, one `failed`.

Seen before the fix: the executor down an hour, take-profit gave up on its command at the deadline
(failure halt), the trader resumed and opened new positions; the executor came back, read the old
command, cancelled every order, mass quote, conditional order and bot of the account, closed the
new 0.5 BTC position (a full closure closes whatever is open now), then reported `failed`. The
deadline (`min(deadline_ts, start + deadline_seconds)`) was only checked after a wave had been sent.
"""

from __future__ import annotations

import time

import pytest
import thalex
from redis.asyncio import Redis

from services.common.contracts import Command, Report, ReportStatus, Side
from services.common.streams import Names
from services.common.thalex import NO_CODE
from services.executor.app import GROUP
from services.executor.plan import Progress, Stage
from services.executor.waves import Order, wave_sent
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    PERP,
    TRADER,
    account_positions,
    instruments,
    make_command,
    make_settings,
    open_positions,
    reports,
    running_executor,
    send,
    wait_outcome,
)
from tests.paper.official import Official
from tests.support import eventually


async def order_log(paper: PaperHandle) -> list[dict]:
    """Every order message the account's key sent (inserts, cancels of any kind, quotes, bots)."""
    return (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"]


async def trader_at_work(paper: PaperHandle, trader: KeyFiles) -> tuple[Official, Official]:
    """The trader back at work after resuming: a 0.5 BTC position, a resting bid and a quoting session
    (what a late clearing round and a late full closure would have taken away)."""
    await open_positions(paper, {PERP: 0.5})
    owner, quoter = Official(paper.url), Official(paper.url)
    for client in (owner, quoter):
        await client.__aenter__()
        await client.login(trader)
    await owner.result("buy", PERP, 0.2, price=99000, label="trader")
    await quoter.result("set_mm_protection", "FBTCUSD", 1.0, 1.0)
    quote = thalex.Quote(PERP, thalex.SideQuote(99500, 0.1), thalex.SideQuote(100500, 0.1))
    assert (await quoter.result("mass_quote", [quote], label="mm"))["n_success"] == 2
    return owner, quoter


async def labels_resting(client: Official) -> list[str]:
    return sorted(o["label"] for o in await client.result("open_orders"))


async def settled(redis: Redis, names: Names, command: Command) -> Progress:
    """The command's progress once its entry is acked: terminal, so a restart or a replay is a duplicate."""
    async def acked() -> bool:
        return (await redis.xpending(names.commands, GROUP))["pending"] == 0

    await eventually(acked)
    raw = await redis.get(names.key(f"executor:progress:{command.command_id}"))
    assert raw is not None
    return Progress.model_validate_json(raw)


def the_failure(got: list[Report]) -> str:
    (failed,) = [r for r in got if r.status is ReportStatus.FAILED]
    assert failed.instrument is None and (failed.epoch, failed.fraction) == (3, 1.0)
    assert failed.error is not None and failed.error.code == NO_CODE  # not the exchange's refusal
    return failed.error.message


@pytest.mark.parametrize("late", ["an hour late", "fresh but just late"])
async def test_a_command_read_after_its_deadline_is_failed_and_sends_nothing(
        late: str, paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """"fresh but just late": decided 0.3 s ago, so it would be claimed compact with the clearing round
    sent at once and its first wave priced from the command — but its deadline passed 0.1 s ago."""
    owner, quoter = await trader_at_work(paper, trader)
    try:
        before = await order_log(paper)
        settings = make_settings(redis_url, names, paper, trader)
        async with running_executor(settings):
            if late == "an hour late":
                command = make_command({PERP: 0.5}, age=3600.0, deadline=-3540.0)
            else:
                bid = paper.exchange.market.book(PERP)[0][0][0]
                command = make_command({PERP: 0.5}, age=0.3, deadline=-0.1, exit_prices={PERP: bid})
            await send(redis, names, command)
            got = await wait_outcome(redis, names, command.command_id)
            progress = await settled(redis, names, command)
        assert [r.status for r in got] == [ReportStatus.RECEIVED, ReportStatus.FAILED], got
        assert "deadline passed before it was handled" in the_failure(got)
        assert "s late: nothing was sent to the exchange" in the_failure(got)
        if late == "an hour late":
            assert "3540." in the_failure(got)
        assert progress.stage is Stage.FAILED and progress.first_order_ts is None
        assert await order_log(paper) == before, "the late command reached the exchange"
        assert account_positions(paper)[PERP] == 0.5
        assert await labels_resting(owner) == ["mm", "mm", "trader"]

        # restarted: nothing pending to resume; the same command again is a duplicate
        async with running_executor(settings):
            await send(redis, names, command)
            got = await wait_outcome(redis, names, command.command_id, count=2)
        assert [r.status for r in got] == [ReportStatus.RECEIVED, ReportStatus.FAILED, ReportStatus.DUPLICATE]
        assert await order_log(paper) == before
        assert account_positions(paper)[PERP] == 0.5
        assert await labels_resting(owner) == ["mm", "mm", "trader"]
    finally:
        for client in (owner, quoter):
            await client.__aexit__(None, None, None)


@pytest.mark.parametrize("stage", [Stage.RECEIVED, Stage.CLOSING])
async def test_a_command_resumed_after_its_deadline_sends_no_further_round_or_wave(
        stage: Stage, paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str,
        names: Names) -> None:
    """The executor crashed an hour ago right after its claim (`received`: its clearing round not
    answered yet) or after a first wave that did not fill; restarted, it finds the progress and
    resumes — but the deadline has passed: only reads (its own trades by label, the portfolio), then
    `failed`."""
    owner, quoter = await trader_at_work(paper, trader)
    try:
        command = make_command({PERP: 0.5}, age=3600.0, deadline=-3540.0)
        progress = Progress.start(command, command.created_ts + 0.01, 0.005, 20.0)
        if stage is Stage.CLOSING:
            progress.to(Stage.ORDERS_CANCELLED)
            progress.to(Stage.CLOSING)
            progress.legs[PERP].position_before = 0.5
            wave_sent(progress, [Order(PERP, Side.SELL, 0.5, 99000.0)], progress.started_ts + 0.1)
        await redis.set(names.key(f"executor:progress:{command.command_id}"), progress.model_dump_json())
        before = await order_log(paper)
        async with running_executor(make_settings(redis_url, names, paper, trader)):
            await send(redis, names, command)
            got = await wait_outcome(redis, names, command.command_id)
            saved = await settled(redis, names, command)
        assert [r.status for r in got] == [ReportStatus.FAILED], got
        failure = the_failure(got)
        assert "deadline passed before it was resumed" in failure and "3580." in failure, failure
        assert "no further clearing round or order was sent" in failure
        assert saved.stage is Stage.FAILED
        assert await order_log(paper) == before, "the resumed command acted after its deadline"
        assert account_positions(paper)[PERP] == 0.5
        assert await labels_resting(owner) == ["mm", "mm", "trader"]
    finally:
        for client in (owner, quoter):
            await client.__aexit__(None, None, None)


async def test_a_command_whose_orders_had_closed_it_before_the_crash_is_verified_completed_late(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """Its first wave filled, then the executor died before counting it. Resumed after the deadline,
    it sends nothing, but reads what its orders did (the trade, by label) and the portfolio: the leg is
    flat, so the closure is verified `completed` — late, which lifts take-profit's failure halt."""
    future = instruments(paper, "future", "BTCUSD")[0]
    await open_positions(paper, {future: 0.3})
    command = make_command({future: 0.3}, age=3600.0, deadline=-3540.0)
    progress = Progress.start(command, command.created_ts + 0.01, 0.005, 20.0)
    progress.to(Stage.ORDERS_CANCELLED)
    progress.to(Stage.CLOSING)
    progress.legs[future].position_before = 0.3
    wave_sent(progress, [Order(future, Side.SELL, 0.3, 99000.0)], progress.started_ts + 0.1)
    await redis.set(names.key(f"executor:progress:{command.command_id}"), progress.model_dump_json())
    owner, quoter = await trader_at_work(paper, trader)
    try:
        # the order the crashed executor had sent, under the command's label
        await owner.result("sell", future, 0.3, price=99000.0, label=progress.label, reduce_only=True,
                           time_in_force=thalex.TimeInForce.IOC)
        assert account_positions(paper)[future] == 0
        before = await order_log(paper)
        async with running_executor(make_settings(redis_url, names, paper, trader)):
            await send(redis, names, command)
            got = await wait_outcome(redis, names, command.command_id)
            saved = await settled(redis, names, command)
        assert [r.status for r in got] == [ReportStatus.FILLED, ReportStatus.COMPLETED], got
        assert got[0].filled == pytest.approx(0.3) and got[-1].fee is not None and got[-1].fee > 0
        assert saved.stage is Stage.COMPLETED
        assert await order_log(paper) == before, "the resumed command acted after its deadline"
        assert account_positions(paper)[PERP] == 0.5
        assert await labels_resting(owner) == ["mm", "mm", "trader"]
    finally:
        for client in (owner, quoter):
            await client.__aexit__(None, None, None)


async def test_no_wave_leaves_once_the_deadline_has_come(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """No bid to sell into: waves of unfilled orders until the deadline. The pause before the next
    wave ends at the deadline; the wave after it used to be sent anyway, after the deadline."""
    await open_positions(paper, {PERP: 0.5})
    await paper.control("paper/set_book", {"instrument_name": PERP, "bids": False})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        command = make_command({PERP: 0.5}, deadline=1.0)
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.FAILED and got[-1].error is not None and got[-1].error.code == 41
    sent = [r for r in got if r.status is ReportStatus.ORDER_SENT]
    assert len(sent) > 1 and all(r.ts < command.deadline_ts for r in sent), [  # the last ones
        round(r.ts - command.deadline_ts, 4) for r in sent[-3:]]
    assert time.time() >= command.deadline_ts
    assert [r.status for r in await reports(redis, names, command.command_id)] == [r.status for r in got]


async def test_a_dry_run_answers_a_late_command_as_a_trading_executor_would(
        paper: PaperHandle, redis: Redis, redis_url: str, names: Names) -> None:
    """`failed`, not `dry_run`: a dry run shows what the trading executor would do, and it would send
    nothing."""
    await open_positions(paper, {PERP: 0.5})
    command = make_command({PERP: 0.5}, age=3600.0, deadline=-3540.0)
    async with running_executor(make_settings(redis_url, names, paper, None, dry_run=True)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert [r.status for r in got] == [ReportStatus.RECEIVED, ReportStatus.FAILED], got
    assert "deadline passed before it was handled" in the_failure(got)
