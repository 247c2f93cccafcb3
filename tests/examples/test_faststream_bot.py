"""examples/faststream_bot.py against a real Redis: the FastStream app receives what the guardian writes.

The take-profit service runs in-process and decides a closure from a snapshot above the target;
the bot (a real process, as a user runs it) must see that command on `tp:commands`, stand down
and acknowledge in `tp:halt:acks`, then hear the executor's `completed` on `tp:reports`. Its
`tp:halt` poll is set longer than the test, so the acknowledgement can only come from the stream.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.contracts import Command, Report, ReportStatus
from services.common.streams import Names
from services.takeprofit.app import build
from tests.support import eventually, in_process, read_stream, settings_for, xadd
from tests.takeprofit.factories import snap

pytest.importorskip("faststream", reason="the `faststream` extra is not installed")

REPO = Path(__file__).resolve().parents[2]
BOT_NAME = "fs-bot"


async def xread_blocked(redis: Redis) -> int:
    """How many connections wait in XREAD right now (the bot's subscribers, once they listen)."""
    return sum(1 for c in await redis.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))


def start_bot(redis_url: str, namespace: str, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "examples/faststream_bot.py", "--redis-url", redis_url, "--namespace", namespace,
             "--name", BOT_NAME, "--halt-poll", "600"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


async def test_the_bot_stands_down_on_the_guardians_command_and_hears_the_outcome(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    log_path = tmp_path / "bot.log"
    blocked_before = await xread_blocked(redis)
    bot = start_bot(redis_url, names.namespace, log_path)
    try:
        async def listening() -> bool:
            assert bot.poll() is None, log_path.read_text()
            return await xread_blocked(redis) >= blocked_before + 2
        await eventually(listening, within=30, interval=0.1)

        key = tmp_path / "command_key.txt"  # take-profit signs every command (issue 21)
        key.write_text("ab" * 32 + "\n")
        key.chmod(0o600)
        settings = settings_for(redis_url, names, portfolio_take_profit={"partial_close_fraction": 0.0},
                                commands={"signing_key_file": str(key)})
        async with in_process(build, settings, "takeprofit"):
            now = time.time()
            await xadd(redis, names.snapshots, snap(1, 1.25, ts=now, oldest=now))

            async def decided() -> bool:
                return bool(await read_stream(redis, names.commands, Command))
            await eventually(decided, within=10)
            [command] = await read_stream(redis, names.commands, Command)

            async def acknowledged() -> bool:
                raw = await redis.hget(names.halt_acks, BOT_NAME)
                return raw is not None and json.loads(raw).get("command_id") == command.command_id
            await eventually(acknowledged, within=10, interval=0.05)

            completed = Report(command_id=command.command_id, status=ReportStatus.COMPLETED,
                               epoch=command.epoch, fraction=1.0, ts=time.time())
            await xadd(redis, names.reports, completed)  # as the executor writes it

            async def heard() -> bool:
                return f"closure {command.command_id} completed" in log_path.read_text()
            await eventually(heard, within=10, interval=0.05)
    finally:
        bot.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(bot.wait, 15)
        except subprocess.TimeoutExpired:
            bot.kill()
            raise
    output = log_path.read_text()
    assert f"tp:commands: take_profit {command.command_id}" in output  # received from the stream
    assert code == 0, output
