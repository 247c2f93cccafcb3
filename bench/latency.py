"""Reaction latency of the whole pipeline: from the paper exchange sending the tick that makes
`net_after_close` cross `min_profit_usd` to the paper exchange receiving the first close order.

    .venv/bin/python bench/latency.py [--trials 200] [--seed 1] [--workdir DIR]

Everything runs as separate processes, as in production: a private redis-server (AOF on),
the paper exchange (`python -m services.paper`, random walk paused), ingest (raw tickers),
portfolio, takeprofit and executor (`tests/e2e/harness.py: Pipeline`). Per trial:

1. open a position through `paper/trade` on the guardian's account at the pinned mark
   (0.01 BTC-PERPETUAL at 100,000: net_after_close about -1.06 USD, fees and closing cost);
2. wait until the latest snapshot shows it and no halt/cool-down is set;
3. `paper/set_mark` +250 USD (net_after_close about +1.44 > 1.10);
4. t_tick = that ticker's send time (`paper/ticker_log`), t_order = receipt of the executor's first
   `private/insert` (`paper/order_log`); latency = t_order - t_tick;
5. wait for `completed`, re-pin the mark, next trial.

Baseline (the seed's design, `manage_portfolio_take_profit` polling every 2 s): simulated on the
same trials, not run. A poller with a fixed random phase looks at the latest snapshot every 2 s;
its reaction to trial i is (snapshot reflecting the crossing written - t_tick) + (wait for its
next poll after that) + (command -> first order, as measured). That is a lower bound for the
seed: it also read prices on its own schedule, not pushed ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.harness import EXECUTOR_KEY, PERP, Pipeline, eventually, eventually_value

P0 = 100_000.0
CROSS = 250.0
AMOUNT = 0.01
POLL_SECONDS = 2.0
OVERRIDES = {
    "portfolio_take_profit": {"cooldown_seconds": 0.2, "min_profit_usd": 1.1, "partial_close_fraction": 0.0},
    "executor": {"deadline_seconds": 5.0},
    "portfolio": {"stale_after_seconds": 3600.0},
}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, values_ms: list[float]) -> str:
    return (f"{name:<34} n={len(values_ms):<4} p50 {pct(values_ms, 50):8.2f}  p90 {pct(values_ms, 90):8.2f}  "
            f"p99 {pct(values_ms, 99):8.2f}  max {max(values_ms):8.2f}  mean {statistics.fmean(values_ms):8.2f} ms")


async def snapshots_since(pipeline: Pipeline, since: float) -> list[dict[str, Any]]:
    assert pipeline.redis is not None
    start = f"{int(since * 1000)}-0"
    return [doc for _, doc in [(i, d) for i, d in await _range(pipeline, start)] if doc]


async def _range(pipeline: Pipeline, start: str) -> list[tuple[str, dict[str, Any] | None]]:
    from services.common.bus import entry_document
    assert pipeline.redis is not None
    out = []
    for entry_id, fields in await pipeline.redis.xrange(pipeline.names.snapshots, min=start):
        out.append((entry_id.decode(), entry_document(fields)[1]))
    return out


async def one_trial(pipeline: Pipeline, n: int) -> dict[str, float]:
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": P0})

    async def ready() -> bool:
        snap = await pipeline.latest_snapshot()
        if snap is None or await pipeline.halted():
            return False
        held = {p["instrument"]: p["position"] for p in snap["positions"]}
        return abs(held.get(PERP, 0.0) - AMOUNT) < 1e-9 and snap["net_after_close"] < 0

    await pipeline.control("paper/trade", {"key_id": "e2e-trader", "instrument_name": PERP, "direction": "buy",
                                           "amount": AMOUNT, "price": P0})
    await eventually(ready, timeout=20, interval=0.01)
    known = {c["command_id"] for c in await pipeline.commands()}
    await asyncio.sleep(0.05)
    t0 = time.time()
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": P0 + CROSS})

    async def new_command() -> dict[str, Any] | None:
        fresh = [c for c in await pipeline.commands() if c["command_id"] not in known]
        return fresh[0] if fresh else None

    command = await eventually_value(new_command, timeout=20, interval=0.01)
    outcome = await eventually_value(lambda: pipeline.outcome(command["command_id"]), timeout=20, interval=0.01)
    if outcome != "completed":
        raise RuntimeError(f"trial {n}: {command['command_id']} {outcome}")
    tickers = (await pipeline.control("paper/ticker_log", {"since": t0, "instrument_name": PERP}))["tickers"]
    t_tick = next(r["time"] for r in tickers if abs(r["mark_price"] - (P0 + CROSS)) < 1e-6)
    orders = (await pipeline.control("paper/order_log", {"since": t0, "key_id": EXECUTOR_KEY,
                                                         "method": "private/insert"}))["orders"]
    t_order = orders[0]["time"]
    snaps = await snapshots_since(pipeline, t0 - 0.01)
    crossing = next(s for s in snaps if s["ts"] >= t_tick and s["net_after_close"] >= 1.1)
    # flat again and the cool-down over before the next trial
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": P0})
    return {"latency": t_order - t_tick, "tick_to_snapshot": crossing["ts"] - t_tick,
            "snapshot_to_command": command["created_ts"] - crossing["ts"],
            "command_to_order": t_order - command["created_ts"], "t_tick": t_tick, "t_snap": crossing["ts"]}


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tp-latency-"))
    pipeline = Pipeline(workdir, seed=args.seed, overrides=OVERRIDES, namespace="lat")
    await pipeline.start()
    try:
        await pipeline.control("paper/pause")
        await pipeline.control("paper/set_index", {"underlying": "BTCUSD", "price": P0})
        for n in range(args.warmup):
            await one_trial(pipeline, -n)
        rows = []
        started = time.time()
        for n in range(args.trials):
            rows.append(await one_trial(pipeline, n))
            if (n + 1) % 50 == 0:
                print(f"  {n + 1} trials ({time.time() - started:.0f} s)", flush=True)
        figures = await pipeline.check_invariants()
    finally:
        await pipeline.stop()
    rng = random.Random(args.seed)
    phase = rng.uniform(0, POLL_SECONDS)
    baseline = []
    for r in rows:
        wait = (phase - r["t_snap"]) % POLL_SECONDS
        baseline.append(r["tick_to_snapshot"] + wait + r["command_to_order"])
    ms = lambda key: [r[key] * 1000 for r in rows]
    print(f"\nreaction latency, {len(rows)} trials (services as processes, Redis AOF, paper exchange; "
          f"{args.warmup} warm-up trials not counted)")
    print(summary("tick sent -> first close order", ms("latency")))
    print(summary("  tick -> snapshot written", ms("tick_to_snapshot")))
    print(summary("  snapshot -> command written", ms("snapshot_to_command")))
    print(summary("  command -> order received", ms("command_to_order")))
    base_ms = [b * 1000 for b in baseline]
    print(summary("baseline: 2 s polling loop (sim.)", base_ms))
    ours = ms("latency")
    print(f"ratio baseline/ours: p50 {pct(base_ms, 50) / pct(ours, 50):.0f}x, p99 {pct(base_ms, 99) / pct(ours, 99):.0f}x"
          f", mean {statistics.fmean(base_ms) / statistics.fmean(ours):.0f}x")
    print(f"invariants after the run: {figures}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
