"""Throughput of ingest -> portfolio -> takeprofit, services as processes, with 10 / 100 / 1,000 open
positions.

    .venv/bin/python bench/throughput_pipeline.py [--positions 10 100 1000] [--rates 500 1000 2000 4000 8000]
                                                  [--seconds 5] [--profile DIR]

A private redis-server (AOF on), the paper exchange as a process (with extra BTC options so that
1,000 instruments exist: the stock paper lists 28; `tests/e2e/many.py: paper_module` adds them before it
starts), the four services (`tests/e2e/harness.py: Pipeline`). The random walk is paused; the
account gets N positions via `paper/trade` (ingest then follows N tickers and books). The load
is `paper/burst_ticks` on BTC-PERPETUAL, paced to the offered rate in 20 slices a second.

Per offered rate, over `--seconds`: ticks ingest wrote to tp:ticks per second, entries not yet
delivered to portfolio (tp:ticks) and takeprofit (tp:snapshots) at the end (XINFO GROUPS lag),
the time to drain after the load stops, snapshots per second, and CPU (% of one core) and RSS
per service (psutil). "Bounded" = the portfolio's lag at the end is under a quarter second of load
and drains within 1 s. Take-profit never fires (barriers out of reach).

`--profile DIR` runs py-spy (if installed) on portfolio and ingest during the highest rate and
writes flame graphs (SVG) there.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.harness import PERP, TRADER_KEY, Pipeline
from tests.e2e.many import paper_module

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]

OVERRIDES = {
    "portfolio_take_profit": {
        "min_profit_usd": 1e9,
        "partial_profit_threshold": 1e8,
        "partial_close_fraction": 0.0,
        "emergency_close_threshold": -1e9,
        "max_position_age_hours": 1e6,
        "close_before_expiry_minutes": 0.0,
    },
    "portfolio": {"stale_after_seconds": 3600.0},
    "ingest": {"watch_list": [PERP], "ticker_delay": "raw"},
}
SERVICE_NAMES = ("ingest", "portfolio", "takeprofit")


async def instruments(pipeline: Pipeline) -> list[str]:
    import json

    import websockets
    async with websockets.connect(pipeline.paper_url, max_size=None) as ws:
        await ws.send(json.dumps({"method": "public/instruments", "params": {}, "id": 1}))
        while True:
            answer = json.loads(await ws.recv())
            if answer.get("id") == 1:
                return [i["instrument_name"] for i in answer["result"]]


async def open_positions(pipeline: Pipeline, count: int) -> None:
    names = [PERP] + [n for n in await instruments(pipeline) if n != PERP and "-" in n]
    names = names[:count]
    if len(names) < count:
        raise SystemExit(f"the paper lists only {len(names)} instruments; start it with more (--extra)")
    for name in names:
        amount = 0.01 if name == PERP else (0.001 if name.count("-") == 1 and name.startswith("BTC") else
                                           (0.01 if name.count("-") == 1 else (0.01 if name.startswith("BTC")
                                                                               else 0.1)))
        await pipeline.control("paper/trade", {"key_id": TRADER_KEY, "instrument_name": name,
                                               "direction": "buy", "amount": amount})

    async def followed() -> bool:
        snap = await pipeline.latest_snapshot()
        return snap is not None and sum(1 for p in snap["positions"] if p["position"] != 0) >= count
    from tests.e2e.harness import eventually
    await eventually(followed, within=120, interval=0.5)


async def ingest_counters(pipeline: Pipeline) -> tuple[float, float]:
    """(ticker messages received, ticks coalesced) from ingest's /metrics."""
    import urllib.request
    port = pipeline.procs["ingest"].port
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                                  timeout=5).read().decode())
    received = coalesced = 0.0
    for line in text.splitlines():
        if line.startswith("tp_ingest_messages_total{") and 'channel="ticker' in line:
            received += float(line.rsplit(" ", 1)[1])
        elif line.startswith("tp_ingest_ticks_coalesced_total"):
            coalesced += float(line.rsplit(" ", 1)[1])
    return received, coalesced


async def lag(pipeline: Pipeline, stream: str, group: str) -> int:
    assert pipeline.redis is not None
    for g in await pipeline.redis.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return int(g.get("lag") or 0)
    return -1


async def stream_len(pipeline: Pipeline, stream: str) -> int:
    assert pipeline.redis is not None
    info = await pipeline.redis.xinfo_stream(stream)
    return int(info.get("entries-added", info["length"]))


async def offer(
    pipeline: Pipeline, rate: int, seconds: float, profile: Path | None, n: int
) -> dict[str, Any]:
    procs = {name: psutil.Process(pipeline.procs[name].pid) for name in (*SERVICE_NAMES, "paper")}
    cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    ticks0 = await stream_len(pipeline, pipeline.names.ticks)
    received0, coalesced0 = await ingest_counters(pipeline)
    snaps0 = await stream_len(pipeline, pipeline.names.snapshots)
    spies = []
    if profile is not None and shutil.which("py-spy"):
        await asyncio.to_thread(profile.mkdir, parents=True, exist_ok=True)
        for name in ("ingest", "portfolio"):
            spies.append(subprocess.Popen(["py-spy", "record", "--pid", str(procs[name].pid), "--duration",  # noqa: ASYNC220 - py-spy, fire and forget
                                           str(int(seconds)), "--rate", "200", "--output",
                                           str(profile / f"{name}-{n}pos-{rate}.svg"), "--nonblocking"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    slice_seconds = 0.05
    per_slice = max(1, round(rate * slice_seconds))
    started = time.perf_counter()
    sent = 0
    next_at = started
    while time.perf_counter() - started < seconds:
        await pipeline.control("paper/burst_ticks", {"instrument_name": PERP, "count": per_slice})
        sent += per_slice
        next_at += slice_seconds
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    elapsed = time.perf_counter() - started
    ticks1 = await stream_len(pipeline, pipeline.names.ticks)
    snaps1 = await stream_len(pipeline, pipeline.names.snapshots)
    received1, coalesced1 = await ingest_counters(pipeline)
    lag_portfolio = await lag(pipeline, pipeline.names.ticks, "portfolio")
    lag_takeprofit = await lag(pipeline, pipeline.names.snapshots, "takeprofit")
    cpu1 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}
    rss = {name: p.memory_info().rss / 2**20 for name, p in procs.items()}
    drain_start = time.perf_counter()
    while time.perf_counter() - drain_start < 30:
        if await lag(pipeline, pipeline.names.ticks, "portfolio") == 0 and \
                await lag(pipeline, pipeline.names.snapshots, "takeprofit") == 0:
            break
        await asyncio.sleep(0.02)
    drain = time.perf_counter() - drain_start
    for spy in spies:
        spy.wait(timeout=60)
    written = ticks1 - ticks0
    return {"rate": rate, "sent_per_s": sent / elapsed, "received_per_s": (received1 - received0) / elapsed,
            "coalesced_per_s": (coalesced1 - coalesced0) / elapsed, "ingest_per_s": written / elapsed,
            "snapshots_per_s": (snaps1 - snaps0) / elapsed, "lag_portfolio": lag_portfolio,
            "lag_takeprofit": lag_takeprofit, "drain_s": drain,
            "bounded": lag_portfolio <= rate * 0.25 and drain < 1.0,
            "cpu": {name: 100 * (cpu1[name] - cpu0[name]) / elapsed for name in procs}, "rss": rss}


async def run_for(
    count: int, rates: list[int], seconds: float, profile: Path | None, workdir: Path
) -> list[dict]:
    extra = max(0, count - 20)
    pipeline = Pipeline(workdir / f"pos{count}", seed=1, overrides=OVERRIDES, namespace="tp",
                        paper_module=paper_module(extra))
    await pipeline.start()
    rows = []
    try:
        await pipeline.control("paper/pause")
        await open_positions(pipeline, count)
        await asyncio.sleep(1.0)
        for i, rate in enumerate(rates):
            row = await offer(pipeline, rate, seconds, profile if i == len(rates) - 1 else None, count)
            rows.append(row)
            print(
                f"  {count:>5} positions  offered {rate:>6}/s  sent {row['sent_per_s']:8.0f}/s  "
                f"ingest got {row['received_per_s']:7.0f}/s wrote {row['ingest_per_s']:6.0f}/s  "
                f"snapshots {row['snapshots_per_s']:6.0f}/s  "
                f"lag pf {row['lag_portfolio']:>6} tp {row['lag_takeprofit']:>5}  "
                f"drain {row['drain_s']:5.2f} s  "
                f"{'bounded' if row['bounded'] else 'NOT bounded'}  "
                f"CPU% "
                + " ".join(f"{k[:4]} {v:4.0f}" for k, v in row["cpu"].items())
                + "  RSS MB "
                + " ".join(f"{k[:4]} {v:4.0f}" for k, v in row["rss"].items()),
                flush=True,
            )
            if not row["bounded"] and i + 1 < len(rates) and rows[-2:-1] and not rows[-2]["bounded"]:
                break  # two unbounded in a row: no point going higher
    finally:
        await pipeline.stop()
    return rows


async def main_async(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tp-throughput-"))
    results = {}
    for count in args.positions:
        results[count] = await run_for(
            count, args.rates, args.seconds, Path(args.profile) if args.profile else None, workdir
        )
    print(
        "\n| open positions | largest offered rate with bounded lag (ticks/s) | "
        "CPU % of a core at that rate: ingest / portfolio / takeprofit / paper | RSS MB ingest / portfolio / "
        "takeprofit |"
    )
    print("|---|---|---|---|")
    for count, rows in results.items():
        good = [r for r in rows if r["bounded"]]
        if not good:
            print(f"| {count} | none of the offered rates | | |")
            continue
        best = max(good, key=lambda r: r["received_per_s"])
        c, m = best["cpu"], best["rss"]
        print(
            f"| {count} | {best['received_per_s']:.0f} received by ingest (offered {best['rate']}; "
            f"{best['ingest_per_s']:.0f} written after coalescing, "
            f"{best['snapshots_per_s']:.0f} snapshots/s) | "
            f"{c['ingest']:.0f} / "
            f"{c['portfolio']:.0f} / {c['takeprofit']:.0f} / {c['paper']:.0f} | {m['ingest']:.0f} / "
            f"{m['portfolio']:.0f} / {m['takeprofit']:.0f} |"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--positions", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rates", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--profile")
    parser.add_argument("--workdir")
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
