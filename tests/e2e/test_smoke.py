"""The pipeline as processes: trades flow, a take-profit closes, every invariant holds."""

from __future__ import annotations

from tests.e2e.harness import Pipeline, Trader


async def test_a_closure_with_trades_running(pipeline: Pipeline) -> None:
    trader = Trader(pipeline, interval=0.3)
    trader.start()
    try:
        await pipeline.ensure_position()
        command = await pipeline.force_closure()
        assert await pipeline.outcome(command["command_id"]) == "completed"
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    assert figures["closing_trades"] >= 1
