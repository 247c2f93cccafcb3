"""`python -m services.ingest` as a real process: kill -9 and restart, refused logins."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.config import ConfigError, Settings
from services.common.streams import Names
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle, make_keys
from tests.ingest.conftest import (
    PERP,
    Trader,
    fills_on,
    ingest_settings,
    running_ingest,
    wait_until,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]


async def start_ingest(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.ingest", "--config", str(config), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TP_LOG_LEVEL": "WARNING"})


def watcher_subscribed(paper: PaperHandle) -> bool:
    return any(c.key is not None and c.key.kid == "watcher" and "account.trade_history" in c.channels
               for c in paper.exchange.connections)


async def test_kill_9_and_restart_duplicates_nothing_and_misses_nothing(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "ingest.toml", settings)
    made: list[str] = []

    async def trade(n: int) -> None:
        for _ in range(n):
            order = await trader.market("buy" if len(made) % 3 else "sell", PERP, 0.1)
            made.extend(f["trade_id"] for f in order["fills"])

    for _ in range(3):
        process = await start_ingest(config)
        try:
            await wait_until(lambda: watcher_subscribed(paper), 15)
            await trade(5)
            # killed while trades keep coming: some in flight, some published, some not yet seen
            trading = asyncio.create_task(trade(5))
            await asyncio.sleep(0.005)
            process.send_signal(signal.SIGKILL)
            await process.wait()
            await trading
            await trade(3)  # while nobody listens
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    process = await start_ingest(config)
    try:
        await wait_until(lambda: _all_published(redis, names, len(made)), 15)
        await asyncio.sleep(0.5)
        fills = await fills_on(redis, names)
    finally:
        process.terminate()
        assert await process.wait() == 0  # SIGTERM: a clean stop
    assert sorted(f.trade_id for f in fills) == sorted(made)
    times = [f.exchange_ts for f in fills]
    assert times == sorted(times)  # gap-filled in order


async def _all_published(redis: Redis, names: Names, n: int) -> bool:
    return len(await fills_on(redis, names)) >= n


async def test_unknown_key_id_exits_2_naming_the_key(
    paper: PaperHandle, redis_url: str, names: Names, tmp_path: Path
) -> None:
    stranger = make_keys(tmp_path / "not-registered", "no-such-key", read_only=True)
    config = write_config(tmp_path / "ingest.toml", ingest_settings(paper.url, redis_url, names, stranger))
    process = await start_ingest(config)
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    text = stderr.decode()
    assert "no-such-key" in text and "refused the login" in text and "unknown key id" in text, text
    assert text.count("refused the login") <= 3  # said once (log + message), not a retry loop


async def test_a_wrong_private_key_is_refused_not_retried(
    paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles], tmp_path: Path
) -> None:
    impostor = make_keys(tmp_path / "other", "watcher", read_only=True)  # right id, wrong key
    settings = ingest_settings(paper.url, redis_url, names, impostor)
    with pytest.raises(
        ConfigError, match=r"thalex\.key_id = 'watcher'.*refused the login.*authentication failed"
    ):
        async with running_ingest(settings):
            pass


async def test_a_missing_key_file_exits_2_every_time_and_sigterm_always_stops_it(
    paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles], tmp_path: Path
) -> None:
    """The probe saw ingest with a missing key file hang and ignore SIGTERM twice in ~30 runs."""
    missing = tmp_path / "gone.pem"
    settings = ingest_settings(paper.url, redis_url, names, keys["watcher"])
    settings = settings.model_copy(update={"thalex": settings.thalex.model_copy(
        update={"private_key_file": missing})})
    config = write_config(tmp_path / "ingest.toml", settings)
    for _ in range(4):
        process = await start_ingest(config)
        _, stderr = await asyncio.wait_for(process.communicate(), 15)
        assert process.returncode == 2, stderr.decode()
        assert "thalex.private_key_file" in stderr.decode() and str(missing) in stderr.decode()
    for delay in (0.05, 0.3, 0.8):  # SIGTERM at start-up, wherever it lands
        process = await start_ingest(config)
        await asyncio.sleep(delay)
        with contextlib.suppress(ProcessLookupError):  # it may have exited 2 (and been reaped) already
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 10)  # ended: by the signal, or exit 2 first
        assert process.returncode in (0, 2, -signal.SIGTERM), process.returncode
