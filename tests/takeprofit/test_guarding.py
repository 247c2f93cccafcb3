"""Take-profit keeps guarding, and says when it cannot (issue 21, items 2 and 3).

* a bad `tp:instruments` value written while running never stops a decision (it failed every
  snapshot: no command for 45 s while `net_after_close` was -450 against -10);
* Redis at `maxmemory` (noeviction): `/health` is red with Redis' reason while nothing can be
  written, and the decision is taken as soon as writes work again;
* `/health` is red while the last snapshot's prices are stale.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from services.common.contracts import Command, DeadLetter, InstrumentInfo, InstrumentType, Snapshot
from services.common.redis_server import RedisServer, free_port
from services.common.streams import Names
from services.takeprofit.app import build
from tests.support import (
    ServiceProcess,
    eventually,
    in_process,
    read_stream,
    settings_for,
    write_config,
    xadd,
)
from tests.takeprofit.factories import pos, snap

NO_PARTIAL = {"partial_close_fraction": 0.0, "cooldown_seconds": 0.5, "check_interval_seconds": 1.0}
ETH = "ETH-PERPETUAL"
BTC = "BTC-PERPETUAL"


def crash(seq: int, net_after_close: float = -450.0, **kwargs: Any) -> Snapshot:
    now = time.time()
    return snap(seq, net_after_close, ts=now, oldest=now, **kwargs)


def info(volume_tick: float) -> str:
    return InstrumentInfo(type=InstrumentType.PERPETUAL, product="P", underlying="U", tick_size=0.5,
                          volume_tick_size=volume_tick, min_order_amount=volume_tick).model_dump_json()


async def dead_letters(redis: Redis, names: Names) -> list[DeadLetter]:
    return await read_stream(redis, names.deadletter, DeadLetter)


async def test_a_bad_instrument_entry_written_while_running_never_stops_a_decision(
    redis_url: str, names: Names, redis: Redis
) -> None:
    partial = {**NO_PARTIAL, "partial_close_fraction": 0.5, "partial_profit_threshold": 0.5}
    settings = settings_for(redis_url, names, portfolio_take_profit=partial)
    async with in_process(build, settings, "takeprofit"):
        await redis.hset(names.instruments, mapping={BTC: info(0.001), ETH: '{"v": 1, "type": "perpetual"}'})
        both = [pos(BTC, 0.0105), pos(ETH, 0.25, underlying="ETHUSD")]
        await xadd(redis, names.snapshots, crash(1, 0.7, positions=both))  # a partial take profit

        async def decided() -> bool:
            return len(await read_stream(redis, names.commands, Command)) == 1

        await eventually(decided, within=10)
        await xadd(redis, names.snapshots, crash(2, 0.8, positions=both))
        await xadd(redis, names.snapshots, crash(3, 0.9, positions=both))

        async def handled() -> bool:
            groups = await redis.xinfo_groups(names.snapshots)
            return groups[0]["pending"] == 0 and groups[0]["entries-read"] == 3

        await eventually(handled)
    [command] = await read_stream(redis, names.commands, Command)
    # half of each leg: BTC rounded down to its volume tick, ETH (tick unknown) exactly half
    assert {p.instrument: p.amount for p in command.closing().rows()} == {BTC: 0.005, ETH: 0.125}
    [letter] = await dead_letters(redis, names)  # once, though both later snapshots saw it too
    assert (letter.source_stream, letter.entry_id, letter.service) == (names.instruments, ETH, "takeprofit")
    assert "InstrumentInfo invalid" in letter.error and "volume_tick_size" in letter.error


async def test_a_bad_instrument_entry_never_delays_an_emergency_stop(redis_url: str, names: Names,
                                                                     redis: Redis) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    await redis.hset(names.instruments, mapping={BTC: "garbage {"})
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, crash(1))

        async def decided() -> bool:
            return len(await read_stream(redis, names.commands, Command)) == 1

        await eventually(decided, within=5)
    [command] = await read_stream(redis, names.commands, Command)
    assert command.reason == "emergency_stop" and command.closing().amount == [1.0]


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


async def wait_health(port: int, status: int, within: float = 15.0) -> dict[str, Any]:
    seen: list[Any] = []

    async def reached() -> bool:
        code, body = health(port)
        seen[:] = [code, body]
        return code == status

    try:
        await eventually(reached, within=within, interval=0.1)
    except AssertionError:
        raise AssertionError(f"/health never answered {status}; last {seen}") from None
    return seen[1]


async def test_redis_at_maxmemory_is_red_with_the_reason_and_the_decision_comes_when_writes_work(
    own_redis_server: RedisServer, tmp_path: Path
) -> None:
    names = Names("tp")
    settings = settings_for(own_redis_server.url, names, portfolio_take_profit=NO_PARTIAL)
    port = free_port()
    service = ServiceProcess("takeprofit", write_config(tmp_path / "tp.toml", settings), tmp_path / "tp.log",
                             extra_args=["--metrics-port", str(port)])
    redis = Redis.from_url(own_redis_server.url)
    service.start()
    try:
        await wait_health(port, 200)
        await xadd(redis, names.snapshots, crash(1, -5.0))  # fine: nothing to decide
        assert service.process is not None
        os.kill(service.process.pid, signal.SIGSTOP)  # hold it while the crash arrives and memory fills
        await xadd(redis, names.snapshots, crash(2, -450.0))
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        os.kill(service.process.pid, signal.SIGCONT)
        body = await wait_health(port, 503)
        assert body["checks"]["redis"] is False
        assert body["reasons"]["redis"].startswith("Redis refuses writes: OutOfMemoryError")
        await eventually(lambda: _problem(port, "handlers", "OutOfMemoryError"), within=10, interval=0.2)
        assert await redis.xlen(names.commands) == 0  # nothing can be written: no command yet

        await redis.config_set("maxmemory", 0)

        async def decided() -> bool:
            return await redis.xlen(names.commands) == 1

        await eventually(decided, within=15)
        [command] = await read_stream(redis, names.commands, Command)
        assert command.reason == "emergency_stop" and command.snapshot_seq == 2
        await wait_health(port, 200)
        assert await redis.xlen(names.deadletter) == 0  # the crash snapshot was never "poison"
        assert "UNHEALTHY: redis: Redis refuses writes" in service.log()
    finally:
        await redis.config_set("maxmemory", 0)
        service.stop()
        await redis.aclose()


async def _problem(port: int, check: str, text: str) -> bool:
    return text in health(port)[1].get("reasons", {}).get(check, "")


async def test_health_is_red_while_the_last_snapshot_has_stale_prices(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    port = free_port()
    service = ServiceProcess("takeprofit", write_config(tmp_path / "tp.toml", settings), tmp_path / "tp.log",
                             extra_args=["--metrics-port", str(port)])
    service.start()
    try:
        await wait_health(port, 200)
        await xadd(redis, names.snapshots, crash(1, 0.5, stale=[BTC]))
        body = await wait_health(port, 503)
        assert body["reasons"]["snapshots"] == (f"prices stale: snapshot #1 flags {BTC} (stale or suspect): "
                                                 "profit barriers wait")
        await xadd(redis, names.snapshots, crash(2, 0.5))
        await wait_health(port, 200)
    finally:
        service.stop()


async def test_every_command_is_signed_with_the_command_key(redis_url: str, names: Names, redis: Redis,
                                                            command_key: bytes) -> None:
    """Item 6: the executor can tie each command to take-profit; the operator's close_all too."""
    from services.common.contracts import Control, ControlAction, Report, ReportStatus
    from services.common.signing import verify_command

    settings = settings_for(redis_url, names, portfolio_take_profit={**NO_PARTIAL, "cooldown_seconds": 0.0})
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, crash(1))

        async def commands(count: int) -> bool:
            return len(await read_stream(redis, names.commands, Command)) == count

        await eventually(lambda: commands(1))
        [first] = await read_stream(redis, names.commands, Command)
        await xadd(redis, names.reports, Report(command_id=first.command_id, status=ReportStatus.FAILED,
                                                epoch=1, fraction=1.0, ts=time.time()))
        await xadd(redis, names.control, Control(action=ControlAction.CLOSE_ALL, by="op", ts=time.time()))
        await eventually(lambda: commands(2))
    emergency, manual = await read_stream(redis, names.commands, Command)
    assert (emergency.reason, manual.reason) == ("emergency_stop", "manual")
    for command in (emergency, manual):
        verify_command(command, command_key)


def test_takeprofit_without_a_command_key_exits_2_naming_it(tmp_path: Path, redis_url: str, names: Names,
                                                              monkeypatch: Any) -> None:
    import subprocess
    import sys
    monkeypatch.delenv("TP_COMMANDS__SIGNING_KEY_FILE")
    config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
    done = subprocess.run([sys.executable, "-m", "services.takeprofit", "--config", str(config),
                           "--metrics-port", "0"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "commands.signing_key_file = None: required by takeprofit and the executor" in done.stderr
    assert "Traceback" not in done.stderr
