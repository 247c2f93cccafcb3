"""Fault injection at an options market maker's size: 1,000 open positions (issue 22).

Snapshots v2 carry only the rows that changed (docs/streams.md); a restarted portfolio publishes a
full one and rewrites `tp:snapshot:positions`, a restarted take-profit reads its positions from
that hash. With 1,000 positions on the account and ticks flowing on all of them, the portfolio and
take-profit are each killed (-9) at a random moment and restarted (trades on ten of the positions go
on while the portfolio is down); then an operator `close_all` must be decided on every position the
exchange holds, and closed, with every invariant of the fault suite (`Pipeline.check_invariants`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from services.common.contracts import Control, ControlAction
from tests.e2e.conftest import SEED
from tests.e2e.harness import TOLERANCE, Pipeline, eventually_value
from tests.e2e.many import STOCK_INSTRUMENTS, TickLoad, open_positions, paper_module, wait_open
from tests.e2e.test_faults import healthy_within

POSITIONS = 1_000
OVERRIDES = {
    "portfolio_take_profit": {"min_profit_usd": 1e9, "partial_profit_threshold": 1e8,
                              "partial_close_fraction": 0.0, "emergency_close_threshold": -1e9,
                              "max_position_age_hours": 1e6, "close_before_expiry_minutes": 0.0,
                              "cooldown_seconds": 0.2},
    "portfolio": {"stale_after_seconds": 3600.0},
    "executor": {"deadline_seconds": 120.0},
}


async def test_kill_9_portfolio_and_takeprofit_with_a_thousand_positions(
    tmp_path: Path, fault_log: dict[str, Any]
) -> None:
    rng = random.Random(f"{SEED}-many")
    pipeline = Pipeline(tmp_path / "e2e", seed=3, overrides=OVERRIDES,
                        paper_module=paper_module(POSITIONS + 10 - STOCK_INSTRUMENTS))
    took: list[float] = []
    try:
        await pipeline.start()
        await pipeline.control("paper/pause")
        load = TickLoad(pipeline, list(await open_positions(pipeline, POSITIONS)))
        load.start()
        try:
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            pipeline.kill("portfolio")
            await open_positions(pipeline, 10, wait=False)  # while it is dead: more of ten it holds
            await asyncio.sleep(0.3)
            took.append(await pipeline.start_service("portfolio"))
            held = await wait_open(pipeline, POSITIONS * 9 // 10)
            await eventually_value(lambda: agrees(pipeline), 90)  # the ten bought while it was dead
            await asyncio.sleep(rng.uniform(0.2, 1.5))
            pipeline.kill("takeprofit")
            await asyncio.sleep(0.3)
            took.append(await pipeline.start_service("takeprofit"))
        finally:
            await load.stop()
        # what the account holds as the operator closes it (the first wave may leave within
        # milliseconds of the command, priced from it: read before, not after)
        exchange = {name: amount for name, amount in (await pipeline.exchange_positions()).items()
                    if abs(amount) > TOLERANCE}
        command = await close_all(pipeline)
        legs = dict(zip(command["legs"]["instrument"], command["legs"]["amount"], strict=True))
        assert len(legs) == len(exchange) == held
        wrong = {name: (legs[name], amount) for name, amount in exchange.items()
                 if abs(legs[name] - amount) > TOLERANCE}
        assert not wrong, f"command amount, exchange position: {dict(list(wrong.items())[:10])}"
        outcome = await eventually_value(lambda: pipeline.outcome(command["command_id"]), 150)
        assert outcome == "completed"
        figures = await pipeline.check_invariants(settle_timeout=60)
    finally:
        await pipeline.stop()
    fault_log.update(fault=f"kill -9 portfolio, then take-profit, {held} open positions",
                     detail="ticks on every position throughout; then close_all of every position",
                     closures=figures["commands"], trades=figures["trades"],
                     health=" / ".join(f"{t:.2f}" for t in took))
    for t in took:
        healthy_within(t, "portfolio / takeprofit")


async def agrees(pipeline: Pipeline) -> bool | None:
    """The portfolio's picture holds every amount the exchange holds (the count alone does not say so:
    the ten positions bought while it was dead were already open)."""
    snap = await pipeline.latest_snapshot()
    rows = {p["instrument"]: p["position"] for p in snap["positions"]} if snap else {}
    exchange = await pipeline.exchange_positions()
    return all(abs(rows.get(name, 0.0) - amount) <= TOLERANCE for name, amount in exchange.items()) or None


async def close_all(pipeline: Pipeline) -> dict[str, Any]:
    """The operator's close_all (as `thalex-tp close-all` writes it); the command take-profit decided."""
    control = Control(action=ControlAction.CLOSE_ALL, by="test", ts=time.time())
    await pipeline.xadd_raw(pipeline.names.control, {"__data__": control.model_dump_json()})

    async def decided() -> dict[str, Any] | None:
        commands = await pipeline.commands()
        return commands[-1] if commands else None
    command = await eventually_value(decided, 30)
    assert command["reason"] == "manual", json.dumps(command)[:500]
    return command
