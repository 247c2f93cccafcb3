"""At most once per command_id: a duplicate delivery, two replicas, and a kill -9 mid-closure."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

from redis.asyncio import Redis

from services.common.contracts import ReportStatus
from services.common.streams import Names
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
    trades,
    wait_outcome,
)

REPO = Path(__file__).resolve().parents[2]


def _closed_per_instrument(paper: PaperHandle, start: int) -> Counter[str]:
    closed: Counter[str] = Counter()
    for trade in trades(paper)[start:]:
        closed[trade["instrument_name"]] += trade["amount"]
    return closed


def _never_flipped(paper: PaperHandle, held: dict[str, float], start: int) -> bool:
    return all(
        trade["position_after"] * held[trade["instrument_name"]] >= 0 for trade in trades(paper)[start:]
    )


async def test_same_command_twice_closes_once_and_reports_duplicate(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    future = instruments(paper, "future", "BTCUSD")[0]
    held = {PERP: 0.4, future: -0.2}
    await open_positions(paper, held)
    start = len(trades(paper))
    command = make_command(held)
    settings = make_settings(redis_url, names, paper, trader)
    async with running_executor(settings, "1"), running_executor(settings, "2"):
        await send(redis, names, command)
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, count=2)
    outcomes = sorted(r.status for r in got if r.status in (ReportStatus.COMPLETED, ReportStatus.DUPLICATE))
    assert outcomes == [ReportStatus.COMPLETED, ReportStatus.DUPLICATE]
    assert sum(r.status is ReportStatus.RECEIVED for r in got) == 1
    assert _closed_per_instrument(paper, start) == {PERP: 0.4, future: 0.2}
    assert _never_flipped(paper, held, start)
    # Replayed much later (a new entry, a fresh executor): still a duplicate, nothing sent.
    async with running_executor(settings, "3"):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, count=3)
    assert got[-1].status is ReportStatus.DUPLICATE and (got[-1].epoch, got[-1].fraction) == (3, 1.0)
    assert _closed_per_instrument(paper, start) == {PERP: 0.4, future: 0.2}


async def _start_executor(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.executor", "--config", str(config), cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "TP_LOG_LEVEL": "WARNING"})


async def test_killed_mid_closure_and_restarted_closes_each_position_exactly_once(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names,
        tmp_path: Path) -> None:
    held = {name: (0.3 if n % 2 else -0.2) for n, name in
            enumerate([PERP, *instruments(paper, "future"), "ETH-PERPETUAL"])}
    held.update({name: 1.0 for name in instruments(paper, "option", "BTCUSD")[:4]})
    await open_positions(paper, held)
    start = len(trades(paper))
    await paper.control("paper/set_latency", {"seconds": 0.15, "methods": ["private/insert"]})
    config = tmp_path / "executor.toml"
    config.write_text(f"""
[redis]
url = "{redis_url}"
namespace = "{names.namespace}"
[thalex]
network = "{paper.url}"
[executor]
key_id = "{trader.kid}"
private_key_file = "{trader.private_key_path}"
deadline_seconds = 30
[metrics]
executor_port = 0
""")
    command = make_command(held, deadline=30)
    await send(redis, names, command)
    first = await _start_executor(config)
    try:
        while not any(
            r.status is ReportStatus.FILLED for r in await reports(redis, names, command.command_id)
        ):
            assert first.returncode is None, "executor exited early"
            await asyncio.sleep(0.01)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        before_restart = account_positions(paper)
        assert any(before_restart[name] != 0 for name in held), "the kill came too late to test a resume"
        assert any(before_restart[name] == 0 for name in held)
        await paper.control("paper/set_latency", {"seconds": 0.0, "methods": ["private/insert"]})
        second = await _start_executor(config)
        try:
            got = await wait_outcome(redis, names, command.command_id, within=30)
        finally:
            second.send_signal(signal.SIGTERM)
            await second.wait()
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    assert all(account_positions(paper)[name] == 0 for name in held)
    closed = _closed_per_instrument(paper, start)
    assert {name: round(amount, 10) for name, amount in closed.items()} == {
        n: abs(a) for n, a in held.items()
    }
    assert _never_flipped(paper, held, start)
    log = (await paper.control("paper/order_log", {"key_id": TRADER, "method": "private/insert"}))["orders"]
    assert all("result" in row["outcome"] for row in log), (
        "no reduce-only rejection: nothing re-sent after flat"
    )
