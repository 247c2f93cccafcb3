"""The shell every service shares: it always stops, and the timer loop of portfolio and take-profit.

A service process must end when its work fails at start (exit 2 for a bad key) and when it gets
SIGTERM, whatever its tasks do. Seen before the fix: ingest with a missing key file hung after
printing the error, twice in ~30 runs, and ignored SIGTERM — asyncio.run was waiting for the
health refresher, whose cancellation Python 3.11's `wait_for` can swallow (the cancel landing
as the Redis ping completes), and nothing listened to the signal any more. Here a task that
swallows its cancellation on purpose stands in for that race, so the test fails every time
without the fix, not once in fifteen.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.common.bus import Bus
from services.common.service import Health, run_timer
from services.common.streams import Names

ROOT = Path(__file__).resolve().parents[2]

SERVICE = textwrap.dedent('''
    import asyncio, sys
    from services.common.config import ConfigError, Problem
    from services.common.service import service_main

    async def stubborn() -> None:
        """Swallows every cancellation, as a lost race in wait_for or redis-py can."""
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    class Work:
        async def run(self) -> None:
            asyncio.get_running_loop().create_task(stubborn())
            print("running", file=sys.stderr, flush=True)
            if sys.argv[1] == "bad-key":
                raise ConfigError([Problem("thalex.private_key_file", "/no/such.pem", "file does not exist")],
                                  "thalex")
            await stubborn()

    def build(settings, bus, health, consumer):
        return Work()

    sys.exit(service_main("probe", ["--config", sys.argv[2]], build, lambda s: 0))
''')


@pytest.fixture
def config(tmp_path: Path, redis_url: str, names: Names) -> Path:
    path = tmp_path / "probe.toml"
    path.write_text(f'[redis]\nurl = "{redis_url}"\nnamespace = "{names.namespace}"\n')
    return path


async def start(mode: str, config: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVICE, mode, str(config), cwd=ROOT, stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    async with asyncio.timeout(20):
        while b"running" not in await process.stderr.readline():
            pass
    return process


async def ended(process: asyncio.subprocess.Process, within: float) -> int | None:
    try:
        async with asyncio.timeout(within):
            return await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        return None


async def test_a_fatal_config_error_at_start_exits_2_even_when_a_task_will_not_stop(config: Path) -> None:
    process = await start("bad-key", config)
    assert await ended(process, 20) == 2


async def test_sigterm_stops_a_service_even_when_a_task_will_not_stop(config: Path) -> None:
    process = await start("forever", config)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert await ended(process, 20) == 0
    assert time.monotonic() - started < 15


async def test_the_timer_restores_after_a_redis_failure_and_keeps_ticking(
        redis_url: str, names: Names) -> None:
    bus = Bus(redis_url, names, "probe")
    lock = asyncio.Lock()
    ticks: list[float] = []
    restored: list[bool] = []
    four = asyncio.Event()

    async def on_timer(now: float) -> None:
        ticks.append(now)
        if len(ticks) == 2:
            raise ConnectionError("Redis went away")
        if len(ticks) == 4:
            four.set()

    async def restore() -> None:
        restored.append(True)

    timer = asyncio.create_task(run_timer("probe", 0.01, bus, lock, on_timer, restore))
    try:
        async with asyncio.timeout(5):
            await four.wait()
    finally:
        timer.cancel()
        await asyncio.gather(timer, return_exceptions=True)
        await bus.redis.aclose()
    assert restored == [True]  # once, before the tick after the failure
    assert bus.restore_due is None


def test_health_reports_the_reason_of_a_failing_check() -> None:
    health = Health("probe")

    async def fine() -> bool:
        return True

    async def logged_out() -> str:
        return "not logged in: login refused"

    health.add("redis", fine)
    health.add("exchange", logged_out)
    asyncio.run(health.refresh())
    assert not health.healthy
    assert health.latest == {"redis": True, "exchange": False}
    assert health.reasons == {"exchange": "not logged in: login refused"}
