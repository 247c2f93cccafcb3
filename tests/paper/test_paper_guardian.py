"""The guardian keeps agreeing with the paper across an expiry and a funding settlement.

The whole guardian runs as processes against the paper exchange (``tests/e2e/harness.py``). The
account holds a perpetual (funding accruing at a high rate) and the daily future that expires at the
next 08:00 UTC; the paper's clock is moved across it. Then, as on Thalex:

* the expiration trade reaches ``tp:fills`` exactly once and the guardian's positions equal the
  exchange's, with no drift ever reported (the portfolio's drift grace is 5 s here, so a position
  the ledger got wrong would show);
* the guardian's funding P&L of the perpetual equals what the account earned: the funding realised
  by trades, plus what the daily settlement realised (``DailyMark.realized_funding_pnl``), plus the
  unrealised funding after it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.harness import PERP, Pipeline, eventually

pytestmark = pytest.mark.asyncio
FUNDING_RATE = 0.05
"""Per 24 h: one long BTC-PERPETUAL pays 5 % of the index a day (about 47 USD a day on 0.01 BTC)."""


@pytest_asyncio.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    # the guardian watches but never closes here: no barrier within reach
    overrides = {
        "portfolio": {"drift_grace_seconds": 5.0},
        "portfolio_take_profit": {
            "min_profit_usd": 1e9,
            "emergency_close_threshold": -1e9,
            "max_position_age_hours": 1e6,
        },
    }
    pipe = Pipeline(tmp_path / "guardian", seed=3, overrides=overrides)
    try:
        await pipe.start()
        yield pipe
    finally:
        await pipe.stop()


async def _funding_on_exchange(pipe: Pipeline) -> float:
    """Everything the perpetual's funding made: realised in trades, at settlements, and unrealised."""
    assert pipe.reader is not None
    trades = await pipe.reader.trades()
    (marks, portfolio) = await pipe.reader._calls(
        [("private/daily_mark_history", {}), ("private/portfolio", {})]
    )
    realised = sum(t.get("perpetual_funding_pnl", 0.0) for t in trades if t["instrument_name"] == PERP)
    settled = sum(
        m.get("realized_funding_pnl", 0.0) for m in marks["daily_marks"] if m["instrument_name"] == PERP
    )
    unrealised = sum(
        p.get("unrealised_perpetual_funding", 0.0) for p in portfolio if p["instrument_name"] == PERP
    )
    return float(realised + settled + unrealised)


def _guardian_funding(snapshot: dict[str, Any] | None) -> float:
    return sum(p["funding_pnl"] for p in (snapshot or {}).get("positions", []) if p["instrument"] == PERP)


async def test_the_guardian_agrees_with_the_paper_across_an_expiry_and_a_funding_settlement(
    pipeline: Pipeline,
) -> None:
    await pipeline.control("paper/set_funding", {"instrument_name": PERP, "funding_rate": FUNDING_RATE})
    status = await pipeline.control("paper/status")
    instruments = (await pipeline.reader._calls([("public/instruments", {})]))[0]  # type: ignore[union-attr]
    daily = min(
        (i for i in instruments if i["type"] == "future" and i["underlying"] == "BTCUSD"),
        key=lambda i: i["expiration_timestamp"],
    )
    assert daily["expiration_timestamp"] == status["next_settlement"]
    await pipeline.trade(PERP, "buy", 0.01)
    await pipeline.trade(daily["instrument_name"], "buy", 0.01)
    await pipeline.control("paper/advance_clock", {"seconds": 3 * 3600})  # funding accrues for 3 hours
    await pipeline.trade(PERP, "sell", 0.004)  # realises 40 % of it
    await pipeline.wait_settled()

    crossing = time.time()
    status = await pipeline.control("paper/status")
    crossed = await pipeline.control(
        "paper/advance_clock", {"seconds": status["next_settlement"] - status["time"] + 1}
    )
    assert crossed["settlements"] == 1
    await asyncio.sleep(1.0)
    await pipeline.control("paper/pause")  # funding stops accruing: both sides can be compared at rest
    # and a last ticker carries the paused funding mark to the guardian (the rate is unchanged)
    await pipeline.control("paper/set_funding", {"instrument_name": PERP, "funding_rate": FUNDING_RATE})

    trades = await pipeline.reader.trades()  # type: ignore[union-attr]
    (expiry,) = [t for t in trades if t["trade_type"] == "expiration"]
    assert expiry["instrument_name"] == daily["instrument_name"] and expiry["amount"] == 0.01
    commands = [(c["reason"], c["net_pnl"], c["threshold"]) for c in await pipeline.commands()]
    assert await pipeline.exchange_positions() == {PERP: pytest.approx(0.006)}, commands
    try:
        await pipeline.wait_settled()
    except AssertionError as exc:
        dead = [doc.get("error") for _, doc in await pipeline.stream_docs(pipeline.names.deadletter) if doc]
        raise AssertionError(f"{exc}; dead-lettered: {dead}") from None
    figures = await pipeline.check_invariants()
    assert figures["trades"] == len(trades)

    exchange_funding = await _funding_on_exchange(pipeline)
    assert exchange_funding < -0.1  # a long pays at a positive rate: the settlement realised real money

    async def funding_agrees() -> bool:
        return abs(_guardian_funding(await pipeline.latest_snapshot()) - exchange_funding) < 1e-6

    try:
        await eventually(funding_agrees, within=10.0, interval=0.2)
    except AssertionError:
        snapshot = await pipeline.latest_snapshot()
        raise AssertionError(
            f"guardian funding {_guardian_funding(snapshot)} != exchange funding {exchange_funding}"
        ) from None
    await asyncio.sleep(6.0)  # past the drift grace: a wrong position would be reported by now
    drifts = [
        doc["drift"]
        for _, doc in await pipeline.stream_docs(pipeline.names.snapshots)
        if doc and doc.get("ts", 0) >= crossing and doc.get("drift")
    ]
    assert drifts == []
