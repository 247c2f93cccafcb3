"""Soak: the fault-injection suite's faults, at random, for a long time, on one running pipeline.

    .venv/bin/python bench/soak.py [--minutes 10] [--seed 1] [--workdir DIR]
    .venv/bin/python bench/soak.py --positions 1000 --minutes 60 [--sample-seconds 30]

`--positions N` (issue 22) is the memory soak instead: N open positions on the paper exchange
(`tests/e2e/many.py`), ticks on all of them at >= 2,000 ticker messages a second (`TickLoad`) and a
trade on one of them every few seconds, for `--minutes`; the resident memory (RSS) of each
service and of Redis is sampled every `--sample-seconds` and printed, then first / after warm-up /
last / peak and the growth from the end of the first tenth of the run to its end.

One pipeline (tests/e2e/harness.py: redis-server with AOF, the paper exchange and the four services
as processes) runs the whole time with a stream of trades (`Trader`) and ticks (random walk). Each
round picks a fault at random — kill -9 of a service (at a random moment or mid-closure), a Redis
restart, the exchange dropping ingest's or the executor's connection, exchange errors on the
executor's orders, duplicated/reordered fills and ticks, a batch of malformed entries — then
forces a closure and checks every invariant (positions equal the exchange's, every trade on
tp:fills exactly once, no double close or flip, every malformed entry dead-lettered, every
restarted service healthy within 5 s). Prints one row per round and a summary table.

The known bug (a Redis restart while the executor has an order in flight; see
docs/reliability.md) is not injected on purpose: it halts the guardian until `thalex-tp resume`,
which would end the soak. `--with-known-bugs` includes it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.harness import EXECUTOR_KEY, INGEST_KEY, SERVICES, Pipeline, Trader

MALFORMED = [
    {"__data__": "not json {"},
    {"__data__": "[]"},
    {"__data__": '{"v": 1}'},
    {"unexpected": "x"},
    {"__data__": '{"v": 1, "instrument": "BTC-PERPETUAL", "mark": NaN, "exchange_ts": 1, "ingest_ts": 1}'},
]


async def fault(pipeline: Pipeline, kind: str, rng: random.Random) -> tuple[str, Any]:
    """Inject one fault; returns (detail, the `during` callback for the closure that follows or None)."""
    if kind.startswith("kill "):
        return await _kill(pipeline, kind.split()[1], rng)
    if kind == "redis restart":
        took = await pipeline.restart_redis(down_seconds=rng.uniform(0.1, 1.0))
        return f"all healthy {took:.2f} s after Redis was back", None
    if kind == "redis restart, order in flight":
        await pipeline.control("paper/set_latency", {"seconds": 0.3, "methods": ["private/insert"]})

        async def mid_order(command: dict[str, Any]) -> None:
            await pipeline.restart_redis(down_seconds=1.0)
            await pipeline.control("paper/set_latency", {"seconds": 0})
        return "mid-closure, insert in flight", mid_order
    if kind.startswith("drop "):
        key = INGEST_KEY if kind.endswith("ingest") else EXECUTOR_KEY
        n = (await pipeline.control("paper/drop_connections", {"key_id": key, "abrupt": rng.random() < 0.5}))[
            "dropped"
        ]
        return f"{n} dropped", None
    if kind.startswith("error "):
        code = int(kind.split()[1])
        count = rng.randint(1, 3)
        await pipeline.control(
            "paper/fail_next",
            {"count": count, "code": code, "methods": ["private/insert"], "key_id": EXECUTOR_KEY},
        )
        return f"next {count} inserts refused", None
    if kind == "duplicate+reorder":
        return await _duplicate_and_reorder(pipeline), None
    if kind == "malformed":
        return await _malformed(pipeline), None
    raise ValueError(kind)


async def _kill(pipeline: Pipeline, service: str, rng: random.Random) -> tuple[str, Any]:
    """kill -9 of one service at a random moment, or in the middle of the next closure."""
    if rng.random() < 0.5:
        await asyncio.sleep(rng.uniform(0, 1.5))
        pipeline.kill(service)
        await asyncio.sleep(rng.uniform(0.1, 1.0))
        took = await pipeline.start_service(service)
        return f"random moment, healthy in {took:.2f} s", None

    async def mid(command: dict[str, Any]) -> None:
        await asyncio.sleep(rng.uniform(0, 0.2))
        pipeline.kill(service)
        await asyncio.sleep(0.3)
        await pipeline.start_service(service)
    return "mid-closure", mid


async def _duplicate_and_reorder(pipeline: Pipeline) -> str:
    assert pipeline.redis is not None
    fills = await pipeline.redis.xrevrange(pipeline.names.fills, count=50)
    ticks = await pipeline.redis.xrevrange(pipeline.names.ticks, count=100)
    for _, fields in fills:
        await pipeline.xadd_raw(pipeline.names.fills, fields)
    for _, fields in ticks:
        await pipeline.xadd_raw(pipeline.names.ticks, fields)
    return f"{len(fills)} fills and {len(ticks)} ticks re-added newest first"


async def _malformed(pipeline: Pipeline) -> str:
    assert pipeline.redis is not None
    streams = [
        pipeline.names.fills,
        pipeline.names.ticks,
        pipeline.names.snapshots,
        pipeline.names.commands,
        pipeline.names.reports,
    ]
    async with pipeline.redis.pipeline(transaction=False) as pipe:
        for n in range(1000):
            pipe.xadd(streams[n % len(streams)], MALFORMED[n % len(MALFORMED)])
        ids = await pipe.execute()
    for n, entry_id in enumerate(ids):
        stream = streams[n % len(streams)]
        pipeline.injected[stream].add(entry_id.decode())
        pipeline.malformed[stream].add(entry_id.decode())
    return "1,000 entries on 5 streams"


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    kinds = [*(f"kill {s}" for s in SERVICES), "redis restart", "drop ingest", "drop executor", "error 4",
             "error 20", "duplicate+reorder", "malformed"]
    if args.with_known_bugs:
        kinds.append("redis restart, order in flight")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tp-soak-"))
    pipeline = Pipeline(workdir, seed=args.seed, namespace="tp")  # the shipped ACL: production-like
    await pipeline.start()
    trader = Trader(pipeline, interval=0.25, seed=args.seed)
    trader.start()
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    end = time.monotonic() + args.minutes * 60
    rounds = 0
    failed = False
    try:
        while time.monotonic() < end and not failed:
            kind = rng.choice(kinds)
            rounds += 1
            started = time.monotonic()
            detail = ""
            try:
                await pipeline.ensure_position()
                detail, during = await fault(pipeline, kind, rng)
                await pipeline.ensure_position()
                command = await pipeline.force_closure(during=during)
                outcome = await pipeline.outcome(command["command_id"])
                await trader.stop()  # a trade made while the checks read the history would not be in yet
                try:
                    figures = await pipeline.check_invariants()
                finally:
                    trader.start()
                result = f"ok ({outcome}; {figures['trades']} trades, {figures['commands']} closures so far)"
                outcomes[kind]["ok"] += 1
            except Exception as exc:
                result = f"FAILED: {exc!s:.300}"
                outcomes[kind]["failed"] += 1
                traceback.print_exc()
                failed = True
            print(f"round {rounds:>4}  {kind:<32} {detail:<45} {time.monotonic() - started:5.1f} s  "
                  f"{result}", flush=True)
    finally:
        await trader.stop()
        await pipeline.stop()
    print(f"\nsoak: {rounds} rounds in {args.minutes} min (seed {args.seed}); logs in {workdir}")
    print("| fault | rounds | invariants held | failed |")
    print("|---|---|---|---|")
    for kind in kinds:
        c = outcomes.get(kind, Counter())
        print(f"| {kind} | {c['ok'] + c['failed']} | {c['ok']} | {c['failed']} |")
    slow = [(n, t) for n, t in pipeline.health_times if t > 5.0]
    print(f"restarts: {len(pipeline.health_times)}, slowest to healthy: "
          f"{max((t for _, t in pipeline.health_times), default=0):.2f} s; over 5 s: {slow}")
    return 1 if failed else 0


async def memory_soak(args: argparse.Namespace) -> int:
    """RSS of every process over a long run with `--positions` open positions and ticks on all."""
    import psutil

    from tests.e2e.many import STOCK_INSTRUMENTS, TickLoad, open_positions, paper_module, wait_open

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tp-soak-"))
    overrides = {"portfolio_take_profit": {"min_profit_usd": 1e9, "partial_close_fraction": 0.0,
                                           "emergency_close_threshold": -1e9, "max_position_age_hours": 1e6,
                                           "close_before_expiry_minutes": 0.0},
                 "portfolio": {"stale_after_seconds": 3600.0}}
    pipeline = Pipeline(workdir, seed=args.seed, overrides=overrides,
                        paper_module=paper_module(args.positions + 10 - STOCK_INSTRUMENTS))
    rng = random.Random(args.seed)
    samples: list[dict[str, float]] = []
    await pipeline.start()
    try:
        await pipeline.control("paper/pause")
        bought = await open_positions(pipeline, args.positions)
        held = await wait_open(pipeline, args.positions // 2)
        load = TickLoad(pipeline, list(bought))
        load.start()
        names = ["ingest", "portfolio", "takeprofit", "executor"]
        procs = {name: psutil.Process(pipeline.procs[name].pid) for name in names}
        assert pipeline.redis_server is not None and pipeline.redis_server.process is not None
        procs["redis"] = psutil.Process(pipeline.redis_server.process.pid)
        started = time.monotonic()
        next_sample = started
        try:
            while time.monotonic() - started < args.minutes * 60:
                name = rng.choice(list(bought))
                await pipeline.control("paper/trade", {"key_id": "e2e-trader", "instrument_name": name,
                                                       "direction": "buy", "amount": bought[name]})
                if time.monotonic() >= next_sample:
                    row = {k: p.memory_info().rss / 2**20 for k, p in procs.items()}
                    row["minute"] = (time.monotonic() - started) / 60
                    samples.append(row)
                    print(f"  {row['minute']:6.1f} min  " + "  ".join(f"{k} {row[k]:6.1f}" for k in procs)
                          + " MB", flush=True)
                    next_sample += args.sample_seconds
                await asyncio.sleep(3.0)
        finally:
            await load.stop()
        figures = await pipeline.check_invariants(settle_timeout=60)
    finally:
        await pipeline.stop()
    warm = samples[max(1, len(samples) // 10)] if len(samples) > 1 else samples[0]
    print(f"\nmemory soak: {held} open positions, {samples[-1]['minute']:.1f} min, ticks on every position "
          f"({load.sent} ticker messages sent), {len(bought)} instruments bought; invariants: {figures}")
    print("| process | RSS first | after warm-up | last | peak | growth warm-up -> last |")
    print("|---|---|---|---|---|---|")
    for name in procs:
        peak = max(r[name] for r in samples)
        print(f"| {name} | {samples[0][name]:.1f} MB | {warm[name]:.1f} MB | {samples[-1][name]:.1f} MB | "
              f"{peak:.1f} MB | {samples[-1][name] - warm[name]:+.1f} MB |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir")
    parser.add_argument("--with-known-bugs", action="store_true")
    parser.add_argument("--positions", type=int, help="memory soak with this many open positions")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.positions:
        return asyncio.run(memory_soak(args))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
