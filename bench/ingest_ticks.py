"""Benchmark: how many raw tickers ingest sustains into Redis, and the latency it adds.

    .venv/bin/python bench/ingest_ticks.py [--count 200000] [--instruments 1] [--profile]

The paper exchange runs in its own process (so ingest has its core to itself)
and is told to emit `--count` `raw` ticker updates as fast as it can
(`paper/burst_ticks`, once per instrument, concurrently). Ingest runs in this
process exactly as in production (`services.ingest.app.Ingest`), against a
real Redis (`REDIS_URL`, or a private redis-server started here).

Printed:
* received/s — ticker messages ingest read, parsed, validated and handed to
  the writer per second, from the first to the last (what it sustains: no
  backlog builds up as long as the exchange sends slower than this);
* written/s — entries XADDed to `tp:ticks` (fewer than received: under a burst
  the writer keeps only the newest tick per instrument while a round trip is
  in flight — see docs/ingest.md);
* latency of the written ticks: exchange mark time → entry acknowledged by
  Redis (p50/p99/max), and ingest receive → Redis (the part ingest adds).
  The first includes the paper exchange's own send queue.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.bus import Bus
from services.common.config import Settings
from services.common.contracts import Tick
from services.common.redis_server import RedisServer
from services.common.service import Health, tune_gc_for_latency
from services.common.streams import Names
from services.ingest.app import Ingest
from services.paper.testing import make_keys

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def start_paper(keys_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, read in a thread below
        [sys.executable, "-m", "services.paper", "--keys", str(keys_dir), "--port", "0", "--control",
         "--tick-interval", "3600", "--log-level", "INFO"],
        cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert process.stderr is not None
    while True:
        line = (await asyncio.to_thread(process.stderr.readline)).decode()
        if not line:
            raise RuntimeError("the paper exchange did not start")
        if match := re.search(r"ready at (\S+)", line):
            return process, match.group(1)


async def control(url: str, method: str, params: dict) -> dict:
    import json

    import websockets

    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"method": method, "params": params, "id": 1}))
        while True:
            answer = json.loads(await ws.recv())
            if answer.get("id") == 1:
                return answer["result"]


async def until(condition: Callable[[], bool], interval: float = 0.05) -> None:
    """Poll `condition`: the state of other processes, which nothing here can signal."""
    while True:
        if condition():
            return
        await asyncio.sleep(interval)


async def bench(redis_url: str, count: int, instruments: int, profile: bool, backlog: float) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    key = make_keys(workdir / "keys", "bench", read_only=True)
    paper, url = await start_paper(workdir / "keys")
    try:
        names = Names(f"bench{os.getpid()}")
        listed = sorted(n for n in await _instrument_names(url) if n.startswith("BTC-"))
        watch = (["BTC-PERPETUAL"] + [n for n in listed if n != "BTC-PERPETUAL"])[:instruments]
        settings = Settings(
            thalex={"network": url, "key_id": key.kid, "private_key_file": str(key.private_key_path)},
            redis={"url": redis_url, "namespace": names.namespace},
            ingest={"watch_list": watch, "ticker_delay": "raw"},
        )
        bus = Bus(redis_url, names, "ingest")
        await bus.start()
        ingest = Ingest(settings, bus, Health())
        written: list[tuple[float, list[Tick]]] = []
        flush = ingest.ticks.flush

        async def timed_flush() -> list[Tick]:
            ticks = await flush()
            written.append((time.time(), ticks))
            return ticks

        ingest.ticks.flush = timed_flush  # type: ignore[method-assign]
        received: list[float] = []
        on_notification = ingest.on_notification

        def counting(channel: str, notification: object, raw: str, ts: float) -> None:
            if channel.startswith("ticker."):
                received.append(ts)
            on_notification(channel, notification, raw, ts)

        ingest.on_notification = counting  # type: ignore[method-assign]
        task = asyncio.create_task(ingest.run())
        await until(lambda: bool(ingest.session and ingest.session.ready)  # logged in, following all
                    and len(ingest.channels) >= len(watch))
        await asyncio.sleep(0.5)
        received.clear()
        written.clear()
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        started = time.time()
        per_instrument = count // len(watch)
        bursts = asyncio.gather(*(control(url, "paper/burst_ticks",
                                          {"instrument_name": n, "count": per_instrument})
                                  for n in watch))
        if backlog:  # freeze this loop while the exchange queues the whole burst, then drain it
            await asyncio.sleep(0.1)
            time.sleep(backlog)  # noqa: ASYNC251 - blocking on purpose: ingest must not read
        thawed = time.time()
        results = await bursts
        expected = per_instrument * len(watch)
        await until(lambda: len(received) >= expected or time.time() - started >= 120)  # all, or 2 minutes
        await asyncio.sleep(0.2)
        if profiler:
            profiler.disable()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.redis.delete(names.ticks, names.positions, names.instruments, names.key("ingest:since"))
        await bus.stop()
    finally:
        paper.terminate()
        paper.wait()

    send_seconds = max(r["seconds"] for r in results)
    if backlog:  # measure the drain only
        received = [ts for ts in received if ts >= thawed]
        written = [(at, ticks) for at, ticks in written if at >= thawed]
    span = received[-1] - received[0]
    entries = [tick for _, ticks in written for tick in ticks]
    exchange_latency = [(at - t.exchange_ts) * 1000 for at, ticks in written for t in ticks]
    wire_latency = [(t.ingest_ts - t.exchange_ts) * 1000 for _, ticks in written for t in ticks]
    ingest_latency = [(at - t.ingest_ts) * 1000 for at, ticks in written for t in ticks]
    print(
        f"instruments: {len(watch)}  ticker updates sent: {expected} "
        f"(paper sent them in {send_seconds:.2f} s)"
    )
    print(f"received by ingest: {len(received)} in {span:.2f} s = {len(received) / span:,.0f} ticks/s")
    print(f"written to Redis:   {len(entries)} entries in {len(written)} round trips "
          f"= {len(entries) / span:,.0f} entries/s (newest per instrument kept while a round trip runs)")
    for label, values in (("exchange mark -> in Redis", exchange_latency),
                          ("exchange mark -> ingest receive (the paper's send queue)", wire_latency),
                          ("ingest receive -> in Redis (what ingest adds)", ingest_latency)):
        print(
            f"latency {label}:\n    p50 {statistics.median(values):.2f} ms  "
            f"p99 {percentile(values, 0.99):.2f} ms"
            f"  max {max(values):.2f} ms"
        )
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())


async def _instrument_names(url: str) -> list[str]:
    import json

    import websockets

    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"method": "public/instruments", "params": {}, "id": 1}))
        return [i["instrument_name"] for i in json.loads(await ws.recv())["result"]]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--instruments", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="cProfile ingest during the burst")
    parser.add_argument(
        "--backlog",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="freeze ingest this long while the exchange queues the burst, then measure how "
        "fast it drains the backlog (ingest's own ceiling, not the exchange's send rate)",
    )
    args = parser.parse_args()
    tune_gc_for_latency()  # ingest runs in this process: tune it as service_main does in production
    if url := os.environ.get("REDIS_URL"):
        asyncio.run(bench(url, args.count, args.instruments, args.profile, args.backlog))
        return
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            asyncio.run(bench(server.url, args.count, args.instruments, args.profile, args.backlog))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
