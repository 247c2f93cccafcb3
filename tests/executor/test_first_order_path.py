"""The path from a command to its first close order: concurrent where it may be, ordered where it must.

`cancel_all`'s answer is delayed here, so the first wave's reads (sent with it) come back first:
the insert must still wait for the cancel, and when it leaves, Redis must already hold the
progress (stage `closing`) and the `orders_cancelled` and `order_sent` reports.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from redis.asyncio import Redis

from services.common.contracts import ReportStatus
from services.common.streams import Names
from services.executor.plan import Progress, Stage
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    CLEARED,
    PERP,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    reports,
    running_executor,
    send,
    wait_outcome,
)

CANCEL_DELAY = 0.2


async def test_first_order_waits_for_cancel_all_and_saved_progress_while_reads_overlap(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.5})
    settings = make_settings(redis_url, names, paper, trader)
    command = make_command({PERP: 0.5})
    events: list[tuple[str, float]] = []
    at_insert: list[tuple[Progress, list[ReportStatus]]] = []
    async with running_executor(settings) as running:
        session = running.executor.session
        real = session.request

        async def request(method: str, *args: Any, **kwargs: Any) -> Any:
            events.append((f"{method}:sent", time.monotonic()))
            if method == "cancel_all":
                await asyncio.sleep(CANCEL_DELAY)
            if method == "insert" and not at_insert:
                raw = await redis.get(names.key(f"executor:progress:{command.command_id}"))
                assert raw is not None, "no progress in Redis before the first order"
                at_insert.append((Progress.model_validate_json(raw),
                                  [r.status for r in await reports(redis, names, command.command_id)]))
            result = await real(method, *args, **kwargs)
            events.append((f"{method}:answered", time.monotonic()))
            return result

        session.request = request
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    assert account_positions(paper)[PERP] == 0
    first = {name: t for name, t in reversed(events)}  # earliest of each
    assert first["cancel_all:answered"] <= first["insert:sent"]
    # the first wave's reads went out while cancel_all was pending, not after it
    assert first["portfolio:sent"] < first["cancel_all:answered"]
    assert first["ticker:sent"] < first["cancel_all:answered"]
    progress, statuses = at_insert[0]
    assert progress.stage is Stage.CLOSING
    assert progress.legs[PERP].position_before == 0.5
    assert statuses[:6] == [ReportStatus.RECEIVED, *CLEARED, ReportStatus.ORDER_SENT]
    inserts = [
        row["params"]
        for row in (await paper.control("paper/order_log", {"key_id": "trader"}))["orders"]
        if row["method"] == "private/insert"
    ]
    assert inserts and all(p["reduce_only"] for p in inserts)


async def test_replayed_command_is_a_duplicate_and_cancels_nothing(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.2})
    settings = make_settings(redis_url, names, paper, trader)
    command = make_command({PERP: 0.2})
    async with running_executor(settings):
        await send(redis, names, command)
        await wait_outcome(redis, names, command.command_id)
        before = len((await paper.control("paper/order_log", {"key_id": "trader"}))["orders"])
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, count=2)
    assert [r.status for r in got].count(ReportStatus.RECEIVED) == 1
    assert got[-1].status is ReportStatus.DUPLICATE
    after = (await paper.control("paper/order_log", {"key_id": "trader"}))["orders"]
    assert len(after) == before, json.dumps(after[before:])
    assert not await redis.exists(names.key(f"executor:lease:{command.command_id}"))
