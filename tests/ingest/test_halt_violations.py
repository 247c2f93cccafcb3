"""Who breaks a halt (issue 19, item 2): ingest, on its read-only key, hears the account channels of the
paper exchange; while `tp:halt` is set, an order or trade that is not the executor's is reported on
`tp:reports` as a `halt_violation` with its attribution and counted in `tp_halt_violations_total`.
The orders are sent through the official `thalex` client with the account's trading key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import thalex
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.cli import main
from services.common.config import Settings
from services.common.contracts import Halt, Report, ReportStatus, ViolationKind, halt_to_hash
from services.common.streams import Names
from services.executor.plan import command_label
from services.operator import EXIT_NOT_GUARDING
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, Trader, fills_on, running_ingest, stream_docs, wait_until
from tests.support import settings_for, write_config


def _count(kind: str) -> float:
    return REGISTRY.get_sample_value("tp_halt_violations_total", {"kind": kind}) or 0.0


async def _violations(redis: Redis, names: Names) -> list[Report]:
    reports = [Report.model_validate(d) for d in await stream_docs(redis, names.reports)]
    return [r for r in reports if r.status is ReportStatus.HALT_VIOLATION]


async def _fills(redis: Redis, names: Names, n: int) -> bool:
    return len(await fills_on(redis, names)) >= n


async def test_a_rogue_order_during_a_halt_is_reported_attributed_and_counted_the_executors_are_not(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names, redis_url: str,
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_ingest(settings):
        # no halt: trading is nobody's breach
        await trader.market("buy", PERP, 0.1, label="rogue")
        await wait_until(lambda: _fills(redis, names, 1), 5)
        await asyncio.sleep(0.3)
        assert await _violations(redis, names) == []

        now = time.time()
        await redis.hset(names.halt, mapping=halt_to_hash(
            Halt(reason="take_profit", command_id="cmd-h", since=now, until=now + 60)))
        orders, trades = _count("order"), _count("trade")
        # the executor's own closing order during the halt: its label says whose it is
        await trader.market("sell", PERP, 0.05, label=command_label("cmd-h"))
        await wait_until(lambda: _fills(redis, names, 2), 5)
        await asyncio.sleep(0.3)
        assert await _violations(redis, names) == []

        # a quoter that does not read tp:halt: a resting bid with a client order id, and a market order
        await trader.call(lambda rid: trader.client.insert(
            thalex.Direction.BUY, PERP, 0.1, price=90000, label="rogue-mm", client_order_id=77, id=rid))
        await trader.market("buy", PERP, 0.2, label="rogue")
        found = await wait_until(lambda: _at_least(redis, names, 3), 5)
    by_kind = {(r.violation.kind, r.violation.label) for r in found if r.violation is not None}
    assert by_kind == {(ViolationKind.ORDER, "rogue-mm"), (ViolationKind.ORDER, "rogue"),
                       (ViolationKind.TRADE, "rogue")}
    resting = next(r.violation for r in found if r.violation is not None and r.violation.label == "rogue-mm")
    assert (resting.client_order_id, resting.price, resting.amount, resting.side) == (77, 90000, 0.1, "buy")
    violations = [r.violation for r in found if r.violation is not None]
    assert all(r.command_id == "cmd-h" for r in found)
    assert all(v.halt_reason == "take_profit" for v in violations)
    trade = next(v for v in violations if v.kind is ViolationKind.TRADE)
    assert trade.trade_id and trade.order_id and trade.amount == 0.2
    assert _count("order") == orders + 2 and _count("trade") == trades + 1
    # `thalex-tp status` names them under the halt in force
    config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names))
    # (exit 5, NOT GUARDING: only ingest runs here; the halt's lines are printed all the same)
    assert await asyncio.to_thread(main, ["status", "--config", str(config)]) == EXIT_NOT_GUARDING
    out = capsys.readouterr().out
    assert "BROKEN: 3 order(s)/bot(s)/trade(s)" in out and "2 order, 1 trade" in out
    assert "label rogue-mm, client_order_id 77" in out


async def _at_least(redis: Redis, names: Names, n: int) -> list[Report] | None:
    found = await _violations(redis, names)
    return found if len(found) >= n else None


async def _of_kinds(redis: Redis, names: Names, kinds: set[ViolationKind]) -> list[Report] | None:
    found = await _violations(redis, names)
    return found if kinds <= {r.violation.kind for r in found if r.violation is not None} else None


async def test_a_grid_bot_and_a_stop_placed_during_an_operator_halt_are_named(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names
) -> None:
    async with running_ingest(settings):
        await redis.hset(names.halt, mapping=halt_to_hash(Halt(reason="operator", since=time.time())))
        now = float((await paper.control("paper/status"))["time"])
        bot = await trader.call(lambda rid: trader.client.create_grid_bot(
            now + 600, PERP, [99850, 99900, 99950, 100050, 100100, 100150], 0.01, upside_exit_price=100300,
            downside_exit_price=99700, label="grid", id=rid))
        stop = await trader.call(lambda rid: trader.client.create_conditional_order(
            thalex.Direction.SELL, PERP, 0.1, 95000, label="stop", id=rid))
        wanted = {ViolationKind.BOT, ViolationKind.BOT_ORDER, ViolationKind.CONDITIONAL_ORDER}
        found = await wait_until(lambda: _of_kinds(redis, names, wanted), 5)
    named = {(r.violation.kind, r.violation.bot_id or r.violation.conditional_order_id)
             for r in found if r.violation is not None and r.violation.kind is not ViolationKind.BOT_ORDER}
    assert named == {(ViolationKind.BOT, bot["bot_id"]), (ViolationKind.CONDITIONAL_ORDER, stop["order_id"])}
    assert all(r.command_id.startswith("halt@") for r in found)
