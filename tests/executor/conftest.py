"""Executor test fixtures: a paper exchange with a trading key, positions on it, an executor on a real
Redis."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from services.common.bus import Bus, entry_fields
from services.common.config import Settings
from services.common.contracts import (
    CloseReason,
    Command,
    HedgeGroup,
    Legs,
    PositionToClose,
    Report,
    ReportStatus,
)
from services.common.service import Health
from services.common.signing import sign_command
from services.common.streams import Names
from services.executor.app import build
from services.paper.keys import KeyFiles
from services.paper.market import Instrument
from services.paper.testing import PaperHandle, make_keys, running_paper_exchange

PERP = "BTC-PERPETUAL"
TRADER = "trader"
NO_CLEARING = {"cancel_open_orders": False, "cancel_mass_quotes": False, "cancel_conditional_orders": False,
               "cancel_bots": False}
"""`[executor]` with no clearing round before closing (`services/executor/clearing.py`)."""
CLEARED = [ReportStatus.ORDERS_CANCELLED, ReportStatus.MASS_QUOTES_CANCELLED,
           ReportStatus.CONDITIONAL_ORDERS_CANCELLED, ReportStatus.BOTS_CANCELLED]
"""A first clearing round's reports, in order (every kind on: the default)."""
OUTCOMES = {ReportStatus.COMPLETED, ReportStatus.FAILED, ReportStatus.DUPLICATE, ReportStatus.DRY_RUN}
COMMAND_KEY = b"executor-tests-command-key-0123456789abcdef"
"""Take-profit's signing secret in these tests: `send` signs with it, the executor verifies with it."""


@pytest.fixture(autouse=True)
def command_key_file(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`[commands] signing_key_file` through the environment (the executor requires it, issue 21):
    in-process settings and executor processes started by a test both read it."""
    path: Path = tmp_path_factory.mktemp("command-key") / "command_key.txt"
    path.write_bytes(COMMAND_KEY + b"\n")
    path.chmod(0o600)
    monkeypatch.setenv("TP_COMMANDS__SIGNING_KEY_FILE", str(path))
    return path


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def trader(keys_dir: Path) -> KeyFiles:
    return make_keys(keys_dir, TRADER)


@pytest_asyncio.fixture
async def paper(trader: KeyFiles, keys_dir: Path) -> AsyncIterator[PaperHandle]:
    """A paper exchange with a frozen market (BTC 100000, ETH 3500) and normal default books."""
    async with running_paper_exchange(keys_dir, seed=5) as handle:
        await handle.control("paper/pause")
        await handle.control("paper/set_index", {"underlying": "BTCUSD", "price": 100000})
        await handle.control("paper/set_index", {"underlying": "ETHUSD", "price": 3500})
        yield handle


def instruments(paper: PaperHandle, kind: str | None = None, underlying: str | None = None) -> list[str]:
    return [i.name for i in paper.exchange.market.instruments.values()
            if (kind is None or i.kind == kind) and (underlying is None or i.underlying == underlying)]


def add_option_strikes(paper: PaperHandle, count: int) -> list[str]:
    """Give the paper market `count` extra BTC options (it lists 28 instruments; a benchmark needs 50)."""
    market = paper.exchange.market
    template = next(i for i in market.instruments.values() if i.kind == "option" and i.underlying == "BTCUSD")
    added = []
    for n in range(count):
        strike = 85000 + 1000 * n
        name = f"BTC-X{n}-{strike}-{'C' if n % 2 else 'P'}"
        market.instruments[name] = Instrument(
            name, template.product, "option", "BTCUSD", template.tick_size, template.volume_tick_size,
            template.min_order_amount, template.create_time, template.expiry_ts,
            "call" if n % 2 else "put", float(strike))
        added.append(name)
    return added


async def open_positions(paper: PaperHandle, positions: dict[str, float]) -> None:
    """Trade the trader's account into `positions` (signed), at mark."""
    for name, amount in positions.items():
        mark = paper.exchange.market.mark(name).price
        await paper.control("paper/trade", {
            "key_id": TRADER, "instrument_name": name, "direction": "buy" if amount > 0 else "sell",
            "amount": abs(amount), "price": max(mark, paper.exchange.market.instruments[name].tick_size)})


def account_positions(paper: PaperHandle) -> dict[str, float]:
    account = paper.exchange.engine.accounts[TRADER]
    return {name: p.position for name, p in account.positions.items()}


def trades(paper: PaperHandle) -> list[dict[str, Any]]:
    return [t for _, t in paper.exchange.engine.accounts[TRADER].trades]


def make_settings(redis_url: str, names: Names, paper: PaperHandle, trader: KeyFiles | None,
                  **executor: Any) -> Settings:
    section: dict[str, Any] = {"deadline_seconds": 20.0, **executor}
    if trader is not None:
        section.update(key_id=trader.kid, private_key_file=str(trader.private_key_path))
    return Settings(redis={"url": redis_url, "namespace": names.namespace}, thalex={"network": paper.url},
                    executor=section, metrics={"executor_port": 0})


def make_command(positions: dict[str, float], *, fraction: float = 1.0, deadline: float = 15.0,
                 command_id: str | None = None, groups: list[HedgeGroup] | None = None,
                 exit_prices: dict[str, float] | None = None, marks: dict[str, float] | None = None,
                 age: float = 0.0) -> Command:
    """A command as take-profit writes it; `exit_prices` and `marks` (default: the exit prices) as
    the snapshot valued the positions."""
    marks = marks if marks is not None else exit_prices
    now = time.time()
    return Command(command_id=command_id or f"cmd-{uuid.uuid4().hex[:8]}", epoch=3,
                   reason=CloseReason.TAKE_PROFIT if fraction == 1.0 else CloseReason.PARTIAL_TAKE_PROFIT,
                   fraction=fraction,
                   legs=Legs.of(PositionToClose(instrument=k, amount=v, exit_price=(exit_prices or {}).get(k),
                                                mark=(marks or {}).get(k)) for k, v in positions.items()),
                   groups=groups, snapshot_seq=1, net_pnl=1.5, threshold=1.1, created_ts=now - age,
                   deadline_ts=now + deadline)


async def send(redis: Redis, names: Names, command: Command) -> None:
    """Publish the command as take-profit does: signed with the command key."""
    await redis.xadd(names.commands, entry_fields(sign_command(command, COMMAND_KEY)))


async def reports(redis: Redis, names: Names, command_id: str | None = None) -> list[Report]:
    rows = await redis.xrange(names.reports)
    out = [Report.model_validate(json.loads(fields[b"__data__"])) for _, fields in rows]
    return [r for r in out if command_id is None or r.command_id == command_id]


async def wait_outcome(redis: Redis, names: Names, command_id: str, count: int = 1,
                       within: float = 20.0) -> list[Report]:
    """Every report of the command once `count` outcome reports (completed/failed/...) are in."""
    deadline = time.monotonic() + within
    while True:
        got = await reports(redis, names, command_id)
        if sum(r.status in OUTCOMES for r in got) >= count:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"no outcome for {command_id} within {within} s: {[r.status for r in got]}")
        await asyncio.sleep(0.02)


@dataclass
class RunningExecutor:
    bus: Bus
    task: asyncio.Task[None]
    executor: Any = None
    """The `Executor` itself (to wrap its session in a test)."""


@asynccontextmanager
async def running_executor(settings: Settings, replica: str = "1") -> AsyncIterator[RunningExecutor]:
    """An executor in this process, as `service_main` would run it (without the HTTP server)."""
    bus = Bus(settings.redis.url, settings.names, "executor")
    runnable: Any = build(settings, bus, Health(), f"executor-{replica}")
    await bus.start()
    task = asyncio.create_task(runnable.run())
    for _ in range(200):  # logged in, as a service would be before its first command
        if runnable.executor.session.ready:
            break
        await asyncio.sleep(0.01)
    try:
        yield RunningExecutor(bus, task, runnable.executor)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runnable.executor.session.close()
        await bus.stop()


