"""Reaction latency of the whole pipeline: from the paper exchange sending the tick that makes
`net_after_close` cross `min_profit_usd` to the paper exchange receiving the first close order.

    .venv/bin/python bench/latency.py [--trials 200] [--seed 1] [--workdir DIR] [--cancel-all-only]

`--cancel-all-only` turns off the rest of the executor's clearing round (mass quotes, conditional
orders, bots: issue 19), to measure what the full round costs the first order, back to back.

Everything runs as separate processes, as in production: a private redis-server (AOF on),
the paper exchange (`python -m services.paper`, random walk paused), ingest (raw tickers),
portfolio, takeprofit and executor (`tests/e2e/harness.py: Pipeline`). Per trial:

1. open a position through `paper/trade` on the guardian's account at the pinned mark
   (0.01 BTC-PERPETUAL at 100,000: net_after_close about -1.06 USD, fees and closing cost);
2. wait until the latest snapshot shows it and no halt/cool-down is set;
3. `paper/set_mark` +250 USD (net_after_close about +1.44 > 1.10);
4. t_tick = when the paper exchange sent the move (`paper/ticker_log` `sent`: handed to the
   websocket): the earlier of the crossing ticker and the book notification that goes with it
   (the exit is priced off the book, and ingest tops the book with the newer of the two, so
   either one alone crosses: docs/ingest.md), t_order = receipt of the executor's first
   `private/insert` (`paper/order_log`); latency = t_order - t_tick. The paper's own time from
   queuing the move to sending it is printed apart, not counted;
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
QUIET_SECONDS = 0.15
"""The bench reads nothing for this long after moving the mark (the reaction takes ~10 ms)."""
OVERRIDES = {
    "portfolio_take_profit": {"cooldown_seconds": 0.2, "min_profit_usd": 1.1, "partial_close_fraction": 0.0},
    "executor": {"deadline_seconds": 5.0},
    "portfolio": {"stale_after_seconds": 3600.0},
}


BREAKDOWN = (
    ("tick sent -> first close order", "latency"),
    ("  tick -> snapshot written", "tick_to_snapshot"),
    ("    tick sent -> ingest received", "tick_to_ingest"),
    ("    ingest -> tick in Redis (1 ms id)", "ingest_to_redis"),
    ("    tick in Redis -> snapshot", "redis_to_snapshot"),
    ("  snapshot -> command written", "snapshot_to_command"),
    ("  command -> order received", "command_to_order"),
    ("    command -> executor's received", "command_to_received"),
    ("    received -> order at exchange", "received_to_order"),
    ("      received -> cancel_all at exch.", "received_to_cancel"),
    ("      exchange handles cancel_all", "cancel_at_exchange"),
    ("      cancel_all done -> order at exch.", "cancel_to_order"),
    ("not counted: paper queued -> sent move", "paper_queue"),
    ("not counted: ticker sent -> book sent", "book_after_ticker"),
)
"""What the summary prints: (label, key of the per-trial figures), the whole first, its parts indented."""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summary(name: str, values_ms: list[float]) -> str:
    return (
        f"{name:<34} n={len(values_ms):<4} p50 {pct(values_ms, 50):8.2f}  p90 {pct(values_ms, 90):8.2f}  "
        f"p99 {pct(values_ms, 99):8.2f}  max {max(values_ms):8.2f}  "
        f"mean {statistics.fmean(values_ms):8.2f} ms"
    )


async def snapshots_since(pipeline: Pipeline, since: float) -> list[dict[str, Any]]:
    assert pipeline.redis is not None
    start = f"{int(since * 1000)}-0"
    return [doc for _, doc in [(i, d) for i, d in await _range(pipeline, start)] if doc]


async def _range(pipeline: Pipeline, start: str) -> list[tuple[str, dict[str, Any] | None]]:
    return await _range_of(pipeline, pipeline.names.snapshots, start)


async def _range_of(pipeline: Pipeline, stream: str, start: str) -> list[tuple[str, dict[str, Any] | None]]:
    from services.common.bus import entry_document
    assert pipeline.redis is not None
    out = []
    for entry_id, fields in await pipeline.redis.xrange(stream, min=start):
        out.append((entry_id.decode(), entry_document(fields)[1]))
    return out


async def last_id(pipeline: Pipeline, stream: str) -> str:
    assert pipeline.redis is not None
    newest = await pipeline.redis.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


async def crossing_tick(pipeline: Pipeline, since: float, sent: float) -> tuple[int, dict[str, Any]]:
    """The first `tp:ticks` entry whose bids carry the move (received after `sent`), with its XADD time
    (id, ms)."""
    for entry_id, doc in await _range_of(pipeline, pipeline.names.ticks, f"{int(since * 1000)}-0"):
        if doc and doc.get("instrument") == PERP and doc.get("bids") and doc["bids"][0][0] > P0 + CROSS / 2 \
                and doc["ingest_ts"] >= sent:
            return int(entry_id.split("-")[0]), doc
    raise RuntimeError("crossing tick not found on tp:ticks")


async def one_trial(pipeline: Pipeline, n: int) -> dict[str, float]:
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": P0})

    async def ready() -> bool:
        snap = await pipeline.latest_snapshot()
        if snap is None or await pipeline.halted():
            return False
        held = {p["instrument"]: p["position"] for p in snap["positions"]}
        return abs(held.get(PERP, 0.0) - AMOUNT) < 1e-9 and snap["net_after_close"] < 0

    await pipeline.control(
        "paper/trade",
        {"key_id": "e2e-trader", "instrument_name": PERP, "direction": "buy", "amount": AMOUNT, "price": P0},
    )
    await eventually(ready, within=20, interval=0.01)
    commands_from, reports_from = await last_id(pipeline, pipeline.names.commands), \
        await last_id(pipeline, pipeline.names.reports)
    await asyncio.sleep(0.05)
    t0 = time.time()
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": P0 + CROSS})
    # Silent while the guardian reacts: polling Redis here would compete with it for the two cores.
    await asyncio.sleep(QUIET_SECONDS)

    async def new_command() -> dict[str, Any] | None:
        fresh = [doc for _, doc in await _range_of(pipeline, pipeline.names.commands, f"({commands_from}")
                 if doc and "command_id" in doc]
        return fresh[0] if fresh else None

    command = await eventually_value(new_command, within=20, interval=0.05)

    async def outcome() -> list[dict[str, Any]] | None:
        reports = [doc for _, doc in await _range_of(pipeline, pipeline.names.reports, f"({reports_from}")
                   if doc and doc.get("command_id") == command["command_id"]]
        done = any(r["status"] in ("completed", "failed") and not r.get("instrument") for r in reports)
        return reports if done else None

    reports = await eventually_value(outcome, within=20, interval=0.05)
    final = next(
        r["status"] for r in reports if r["status"] in ("completed", "failed") and not r.get("instrument")
    )
    if final != "completed":
        raise RuntimeError(f"trial {n}: {command['command_id']} {final}")
    tickers = (await pipeline.control("paper/ticker_log", {"since": t0, "instrument_name": PERP}))["tickers"]
    crossing_rows = [r for r in tickers if abs(r["mark_price"] - (P0 + CROSS)) < 1e-6]
    # The move reaches the guardian as a ticker and a book notification; either one carries the
    # new top of the book (ingest takes the newer of the two), so the move starts with the first.
    ticker_row, book_row = (
        next(r for r in crossing_rows if r["channel"] == channel) for channel in ("ticker", "book")
    )
    first = min(ticker_row, book_row, key=lambda r: r["sent"] or r["time"])
    t_tick = first["sent"] or first["time"]
    orders = (await pipeline.control("paper/order_log", {"since": t0, "key_id": EXECUTOR_KEY,
                                                         "method": "private/insert"}))["orders"]
    t_order = orders[0]["time"]
    cancels = (await pipeline.control("paper/order_log", {"since": t0, "key_id": EXECUTOR_KEY,
                                                          "method": "private/cancel_all"}))["orders"]
    t_cancel, t_cancel_done = cancels[0]["time"], cancels[0]["done_time"]
    snaps = await snapshots_since(pipeline, t0 - 0.01)
    crossing = next(s for s in snaps if s["ts"] >= t_tick and s["net_after_close"] >= 1.1)
    tick_id, tick = await crossing_tick(pipeline, t0, t_tick)
    received = next(r["ts"] for r in reports if r["status"] == "received")
    # flat again and the cool-down over before the next trial
    await pipeline.control("paper/set_mark", {"instrument_name": PERP, "price": P0})
    return {
        "latency": t_order - t_tick,
        "tick_to_snapshot": crossing["ts"] - t_tick,
        "tick_to_ingest": tick["ingest_ts"] - t_tick,
        "ingest_to_redis": tick_id / 1000 - tick["ingest_ts"],
        "redis_to_snapshot": crossing["ts"] - tick_id / 1000,
        "command_to_received": received - command["created_ts"],
        "received_to_order": t_order - received,
        "received_to_cancel": t_cancel - received,
        "cancel_at_exchange": t_cancel_done - t_cancel,
        "cancel_to_order": t_order - t_cancel_done,
        "snapshot_to_command": command["created_ts"] - crossing["ts"],
        "paper_queue": t_tick - first["time"],
        "book_after_ticker": (book_row["sent"] or book_row["time"])
        - (ticker_row["sent"] or ticker_row["time"]),
        "command_to_order": t_order - command["created_ts"],
        "t_tick": t_tick,
        "t_snap": crossing["ts"],
    }


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tp-latency-"))
    overrides = OVERRIDES
    if args.cancel_all_only:
        overrides = {**OVERRIDES, "executor": {**OVERRIDES["executor"], "cancel_mass_quotes": False,
                                               "cancel_conditional_orders": False, "cancel_bots": False}}
    pipeline = Pipeline(workdir, seed=args.seed, overrides=overrides, namespace="tp")  # the shipped ACL
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

    def ms(key: str) -> list[float]:
        return [r[key] * 1000 for r in rows]

    print(f"\nreaction latency, {len(rows)} trials (services as processes, Redis AOF, paper exchange; "
          f"{args.warmup} warm-up trials not counted)")
    for label, key in BREAKDOWN:
        print(summary(label, ms(key)))
    base_ms = [b * 1000 for b in baseline]
    print(summary("baseline: 2 s polling loop (sim.)", base_ms))
    ours = ms("latency")
    print(
        f"ratio baseline/ours: p50 {pct(base_ms, 50) / pct(ours, 50):.0f}x, "
        f"p99 {pct(base_ms, 99) / pct(ours, 99):.0f}x"
        f", mean {statistics.fmean(base_ms) / statistics.fmean(ours):.0f}x"
    )
    print(f"invariants after the run: {figures}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir")
    parser.add_argument("--cancel-all-only", action="store_true",
                        help="the executor clears only orders (cancel_all) before closing (before issue 19)")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
