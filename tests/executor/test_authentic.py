"""What the executor acts on (issue 21, items 1, 2 and 6): only commands take-profit signed, and a
command that cannot be executed always ends in a `failed` report, never only as a dead letter.

Seen before the fix: a forged `tp:commands` entry listing 0.0001 BTC made the executor cancel
every order and close the whole 0.01 (it verified nothing); a bad `tp:instruments` value for a
listed instrument made every delivery of an emergency command fail until the bus gave up on it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from redis.asyncio import Redis

from services.common.bus import entry_fields
from services.common.contracts import DeadLetter, InstrumentInfo, InstrumentType, ReportStatus
from services.common.signing import sign_command
from services.common.streams import Names
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    COMMAND_KEY,
    PERP,
    TRADER,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    reports,
    running_executor,
    send,
    wait_outcome,
)
from tests.executor.test_session import dead_letters

REPO = Path(__file__).resolve().parents[2]


async def order_log(paper: PaperHandle) -> list[str]:
    """The methods the trading key sent that touch orders (what a forged command must never cause)."""
    rows = (await paper.control("paper/order_log", {"key_id": TRADER}))["orders"]
    return [row["method"] for row in rows]


async def test_a_forged_command_is_refused_with_a_failed_report_and_touches_nothing(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.01})
    unsigned = make_command({PERP: 0.0001})
    other_key = sign_command(make_command({PERP: 0.0001}), b"not-the-command-key-" * 2)
    altered = sign_command(make_command({PERP: 0.01}), COMMAND_KEY).model_copy(
        update={"deadline_ts": make_command({PERP: 0.01}).deadline_ts + 3600})  # any field breaks it
    genuine = make_command({PERP: 0.01})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        before = await order_log(paper)
        for forged in (unsigned, other_key, altered):
            await redis.xadd(names.commands, entry_fields(forged))
        refused = [await wait_outcome(redis, names, c.command_id) for c in (unsigned, other_key, altered)]
        assert await order_log(paper) == before, "a forged command reached the exchange"
        assert account_positions(paper)[PERP] == 0.01
        await send(redis, names, genuine)  # the executor goes on with take-profit's commands
        got = await wait_outcome(redis, names, genuine.command_id)
    whys = ("is not signed", "invalid signature", "invalid signature")
    for refusal, why in zip(refused, whys, strict=True):
        assert [r.status for r in refusal] == [ReportStatus.FAILED], refusal
        error = refusal[0].error
        assert error is not None and why in error.message and "refused" in error.message, error
    assert got[-1].status is ReportStatus.COMPLETED and account_positions(paper)[PERP] == 0
    assert not await redis.xlen(names.deadletter)


async def test_a_forgery_of_a_real_commands_id_is_dead_lettered_never_reported_under_that_id(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """A `failed` under a real command's id would tell take-profit its real closure failed."""
    await open_positions(paper, {PERP: 0.02})
    real = make_command({PERP: 0.01}, fraction=0.5)
    copy = make_command({PERP: 0.02}, command_id=real.command_id)  # same id, more to close, unsigned
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, real)
        got = await wait_outcome(redis, names, real.command_id)
        await redis.xadd(names.commands, entry_fields(copy))
        (letter,) = await dead_letters(redis, names)
    assert [r.status for r in await reports(redis, names, real.command_id)] == [r.status for r in got]
    assert got[-1].status is ReportStatus.COMPLETED and abs(account_positions(paper)[PERP] - 0.01) < 1e-9
    assert letter.source_stream == names.commands and "is not signed" in letter.error
    assert "its id is a real command's" in letter.error


def test_an_executor_without_the_command_key_exits_2_naming_it(tmp_path: Path, redis_url: str,
                                                                names: Names, trader: KeyFiles) -> None:
    config = tmp_path / "executor.toml"
    config.write_text(f"""
[redis]
url = "{redis_url}"
namespace = "{names.namespace}"
[executor]
key_id = "{trader.kid}"
private_key_file = "{trader.private_key_path}"
[metrics]
executor_port = 0
""")
    env = {k: v for k, v in os.environ.items() if k != "TP_COMMANDS__SIGNING_KEY_FILE"}
    done = subprocess.run([sys.executable, "-m", "services.executor", "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "commands.signing_key_file = None: required by takeprofit and the executor" in done.stderr


async def test_a_bad_instrument_value_is_dead_lettered_once_and_the_command_uses_the_exchanges(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.3})
    await redis.hset(names.instruments, PERP, '{"type": "perpetual", "tick_size": "wide"}')
    first, second = make_command({PERP: 0.1}, fraction=0.5), make_command({PERP: 0.1}, fraction=0.5)
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, first)
        got = await wait_outcome(redis, names, first.command_id, within=10)
        await send(redis, names, second)
        again = await wait_outcome(redis, names, second.command_id, within=10)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    assert again[-1].status is ReportStatus.COMPLETED, again[-1]
    assert abs(account_positions(paper)[PERP] - 0.1) < 1e-9
    rows = await redis.xrange(names.deadletter)
    letters = [DeadLetter.model_validate_json(fields[b"__data__"]) for _, fields in rows]
    assert [(letter.source_stream, letter.entry_id) for letter in letters] == [(names.instruments, PERP)]
    assert "tick_size" in letters[0].error


async def test_a_listed_instrument_nobody_knows_ends_failed_naming_it(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.1})
    command = make_command({PERP: 0.1, "BTC-NO-SUCH-THING": 1.0}, deadline=5)
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, within=15)
    assert got[-1].status is ReportStatus.FAILED, got[-1]
    error = got[-1].error
    assert error is not None and "BTC-NO-SUCH-THING" in error.message, error
    assert not await redis.xlen(names.deadletter)


async def test_a_good_instrument_value_is_read_from_redis_not_asked(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The fallback is only for bad values: a good one costs no request."""
    await open_positions(paper, {PERP: 0.1})
    info = InstrumentInfo(type=InstrumentType.PERPETUAL, product="BTC", underlying="BTCUSD", tick_size=1.0,
                          volume_tick_size=0.001, min_order_amount=0.001)
    await redis.hset(names.instruments, PERP, info.model_dump_json())
    command = make_command({PERP: 0.1})
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
        await asyncio.sleep(0)
        assert running.executor.market.instruments[PERP] == info
    assert got[-1].status is ReportStatus.COMPLETED


async def test_a_command_that_fails_on_every_delivery_ends_failed_even_with_its_progress_unreadable(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """Its last delivery reports `failed`; before, with a progress that could not be read, giving up
    failed too and the bus dead-lettered the command as poison with no report."""
    await open_positions(paper, {PERP: 0.1})
    command = make_command({PERP: 0.1}, deadline=30)
    await redis.set(names.key(f"executor:progress:{command.command_id}"), "{not a progress")
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        running.executor.consumer.max_deliveries = 2
        running.executor.consumer.claim_interval_seconds = 0.5
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, within=30)
    assert [r.status for r in got] == [ReportStatus.FAILED], got
    error = got[0].error
    assert error is not None and "the executor cannot handle it: ValidationError" in error.message, error
    assert not await redis.xlen(names.deadletter)
    assert account_positions(paper)[PERP] == 0.1
