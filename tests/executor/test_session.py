"""The executor's Thalex session: a refused key, a session not logged in, garbage, the reconnect notice.

Seen before the fix (the executor had a session layer of its own): a refused trading key was
retried forever while /health said healthy and `tp_executor_exchange_connected` said 1 (the
websocket stays open after a failed login), and an emergency command was retried, then
dead-lettered as poison without a `failed` report; one frame that was not JSON ended the
reader and dropped the connection; the exchange's reconnect notice was ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.common.contracts import DeadLetter, ReportStatus
from services.common.streams import Names
from services.common.thalex import LoginRejected
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle, make_keys
from tests.executor.conftest import (
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

REPO = Path(__file__).resolve().parents[2]


def trader_connections(paper: PaperHandle) -> list[object]:
    return [c for c in paper.exchange.connections if c.key is not None and c.key.kid == TRADER]


def connected_gauge() -> float | None:
    return REGISTRY.get_sample_value("tp_executor_exchange_connected")


async def eventually(predicate: object, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if predicate():  # type: ignore[operator]
                return
            await asyncio.sleep(0.02)


async def dead_letters(redis: Redis, names: Names) -> list[DeadLetter]:
    """The dead letters, once there is one (5 s at most)."""
    async with asyncio.timeout(5):
        while True:
            rows = await redis.xrange(names.deadletter)
            if rows:
                return [DeadLetter.model_validate_json(fields[b"__data__"]) for _, fields in rows]
            await asyncio.sleep(0.02)


async def test_a_refused_trading_key_fails_the_command_in_hand_and_exits_2_naming_the_key(
        paper: PaperHandle, redis: Redis, redis_url: str, names: Names, tmp_path: Path) -> None:
    stranger = make_keys(tmp_path / "elsewhere", "not-registered")
    # the refusal comes after the command has been read: it waits for the session, then fails
    await paper.control("paper/set_latency", {"seconds": 1.0, "methods": ["public/login"]})
    command = make_command({PERP: 0.1}, deadline=30)
    await send(redis, names, command)
    config = tmp_path / "executor.toml"
    config.write_text(f"""
[redis]
url = "{redis_url}"
namespace = "{names.namespace}"
[thalex]
network = "{paper.url}"
[executor]
key_id = "{stranger.kid}"
private_key_file = "{stranger.private_key_path}"
[metrics]
executor_port = 0
""")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.executor", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TP_LOG_LEVEL": "WARNING"})
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = stderr.decode()
    assert process.returncode == 2, text
    assert "executor.key_id = 'not-registered'" in text and "refused the login" in text, text
    got = await reports(redis, names, command.command_id)
    assert [r.status for r in got] == [ReportStatus.RECEIVED, ReportStatus.FAILED], got
    error = got[-1].error
    assert error is not None and error.code == 19 and "not-registered" in error.message
    assert not await redis.xlen(names.deadletter)


async def test_not_logged_in_is_unhealthy_with_the_reason_and_a_command_still_ends_failed(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.1})
    await paper.control("paper/fail_next", {"code": 20, "count": 10_000, "methods": ["public/login"],
                                            "message": "temporary failure"})
    command = make_command({PERP: 0.1}, deadline=2.0)
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        await asyncio.sleep(1.0)
        health = await running.executor.session.health()
        assert health is not True and "not logged in" in str(health), health
        assert connected_gauge() == 0
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, within=15)
    assert got[-1].status is ReportStatus.FAILED and got[-1].error is not None, got[-1]
    assert account_positions(paper)[PERP] == 0.1
    assert not await redis.xlen(names.deadletter)


async def test_a_frame_that_is_not_json_is_dead_lettered_and_the_session_keeps_going(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.2})
    command = make_command({PERP: 0.2})
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        await eventually(lambda: running.executor.session.ready)
        (first,) = trader_connections(paper)
        first.push("{not json")  # type: ignore[attr-defined]
        letters = await dead_letters(redis, names)
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
        assert trader_connections(paper) == [first], "the connection was dropped"
    (letter,) = letters
    assert (letter.service, letter.source_stream, letter.raw) == ("executor", "thalex:websocket", "{not json")
    assert "not valid JSON" in letter.error
    assert got[-1].status is ReportStatus.COMPLETED and account_positions(paper)[PERP] == 0


async def test_the_reconnect_notice_moves_to_a_new_session_at_once(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.2})
    command = make_command({PERP: 0.2})
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        await eventually(lambda: running.executor.session.ready)
        (first,) = trader_connections(paper)
        await paper.control("paper/reconnect_notice")
        await eventually(lambda: any(c is not first and c.session is not None  # type: ignore[attr-defined]
                                     for c in trader_connections(paper)), within=1.0)
        await eventually(lambda: running.executor.session.ready)
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED and account_positions(paper)[PERP] == 0


async def test_after_a_refused_login_the_executor_never_looks_connected(
        paper: PaperHandle, redis_url: str, names: Names, tmp_path: Path) -> None:
    """The probe saw /health 200 and `tp_executor_exchange_connected 1` after the refusal (the
    websocket stays open); now the gauge is 0, the check says why, and the run ends with the refusal."""
    stranger = make_keys(tmp_path / "elsewhere", "not-registered")
    async with running_executor(make_settings(redis_url, names, paper, stranger)) as running:
        with pytest.raises(LoginRejected):
            async with asyncio.timeout(10):
                await running.task
        health = await running.executor.session.health()
        assert connected_gauge() == 0
        assert health is not True and "login refused" in str(health) and "error 19" in str(health), health


async def test_a_trade_history_left_out_of_the_subscribe_answer_is_red_and_asked_for_again(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names,
        caplog: pytest.LogCaptureFixture) -> None:
    """api.yaml: subscribe "returns successfully even if no channels were valid; check the return value".
    Before, the executor took any answer for a yes: without `account.trade_history` every wave waited
    for fees that never came, and /health said nothing."""
    await open_positions(paper, {PERP: 0.2})
    command = make_command({PERP: 0.2})
    await paper.control("paper/leave_out", {"channels": ["account.trade_history"], "count": 2})
    with caplog.at_level(logging.WARNING, logger="services.executor.exchange"):
        async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
            await eventually(lambda: running.executor.session.ready)
            health = await running.executor.session.health()
            assert isinstance(health, str) and health.startswith(
                "channels refused: account.trade_history (the fees of its trades) left out"), health
            await send(redis, names, command)  # closing does not wait on the channel of its fees
            got = await wait_outcome(redis, names, command.command_id)
            assert got[-1].status is ReportStatus.COMPLETED and account_positions(paper)[PERP] == 0
            # asked again after 1 s and 2 s more: the second answer leaves it out, the third holds it
            await eventually(lambda: not running.executor.session.refused, within=10.0)
            assert await running.executor.session.health() is True
            (first,) = trader_connections(paper)
            assert "account.trade_history" in first.channels  # type: ignore[attr-defined]
    said = [r for r in caplog.records
            if r.name == "services.executor.exchange" and "account.trade_history" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING  # once, not per try
    assert any("fees of 1 trades not seen" in r.getMessage() for r in caplog.records)  # what it cost
