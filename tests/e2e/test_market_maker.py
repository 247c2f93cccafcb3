"""Issue 19 on the whole guardian against the paper exchange: a market maker's positions.

* a large position opened at the mark with no price move: no emergency stop, the exit-cost warning
  appears (log, metric, status); the same position after an adverse move beyond the threshold: an
  emergency stop;
"""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import pytest

from services.common.config import load_config
from services.common.contracts import Snapshot
from services.operator import format_status
from tests.e2e.harness import PERP, TRADER_KEY, Pipeline, eventually, eventually_value

MARK = 95_000.0
SIZE = 0.2
SPREAD_TICKS = 150
"""Best bid and ask about 150 USD either side of the mark (tick 1 USD): getting out of 0.2 BTC costs 30 USD
of slippage on top of the taker fee."""


def metric(pipeline: Pipeline, service: str, name: str) -> float | None:
    """One sample of `name` (no labels) from the service's /metrics, or None."""
    port = pipeline.procs[service].port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return None


async def new_commands(pipeline: Pipeline, before: set[str]) -> list[dict[str, Any]]:
    return [c for c in await pipeline.commands() if c["command_id"] not in before]


@pytest.mark.pipeline(overrides={"portfolio_take_profit": {"emergency_close_threshold": -25.0}})
async def test_a_large_position_at_the_mark_warns_and_only_a_loss_stops_it(pipeline: Pipeline) -> None:
    """0.2 BTC bought at the mark 95,000: fee 0.2 x 95,000 x 0.0005 = 9.50, net_pnl -9.50 > -25: no stop.
    Exit cost 9.50 x 1.1 + 0.2 x 150 = 40.45 > 25: the warning. The mark falls 200: net_pnl
    -9.50 - 0.2 x 200 = -49.50 <= -25: the emergency stop."""
    await pipeline.control("paper/pause")
    await pipeline.control("paper/set_book", {"instrument_name": PERP, "spread_ticks": SPREAD_TICKS})
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": MARK})
    before = {c["command_id"] for c in await pipeline.commands()}
    await pipeline.control("paper/trade", {"key_id": TRADER_KEY, "instrument_name": PERP, "direction": "buy",
                                           "amount": SIZE, "price": MARK})

    async def snapshot_with_position() -> dict[str, Any] | None:
        snap = await pipeline.latest_snapshot()
        held = [p for p in (snap or {}).get("positions", []) if abs(p["position"] - SIZE) < 1e-9]
        return snap if held and snap and snap["net_pnl"] - snap["net_after_close"] > 25 else None

    snap = await eventually_value(snapshot_with_position, within=15.0)
    assert snap["net_pnl"] == pytest.approx(-9.50, abs=0.01)
    assert snap["net_after_close"] == pytest.approx(-49.95, abs=0.5)
    await eventually(lambda: _warning_on(pipeline), within=10.0)
    await asyncio.sleep(3.0)  # several snapshots and timer ticks: still no decision
    assert await new_commands(pipeline, before) == []
    assert "EXIT COST: closing now costs" in pipeline.procs["takeprofit"].log()
    assert pipeline.config_path is not None
    status = format_status(Snapshot.model_validate(snap), None, {}, {}, load_config(pipeline.config_path),
                           snap["ts"])
    assert "EXIT COST WARNING: closing now costs 40." in status

    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": MARK - 200.0})

    async def emergency() -> dict[str, Any] | None:
        found = [c for c in await new_commands(pipeline, before) if c["reason"] == "emergency_stop"]
        return found[0] if found else None

    command = await eventually_value(emergency, within=15.0)
    assert command["net_pnl"] == pytest.approx(-49.50, abs=0.5) and command["threshold"] == -25.0
    assert [c["reason"] for c in await new_commands(pipeline, before)] == ["emergency_stop"]


async def _warning_on(pipeline: Pipeline) -> bool:
    return await asyncio.to_thread(metric, pipeline, "takeprofit", "tp_exit_cost_warning") == 1.0
