"""One hop of the bus: an entry XADDed by one process until `StreamConsumer`'s handler has it in another.

    .venv/bin/python bench/bus_hop.py [--count 1000] [--gap-ms 5]

Every reaction crosses three such hops (ingest -> portfolio -> takeprofit -> executor), so their
cost is the floor under the whole pipeline's latency (docs/performance.md). A producer process
writes `Tick` entries one at a time (a gap between them, as ticks arrive on a quiet market); the
consumer is a real `StreamConsumer` (its reader, validation, handler, ack in one MULTI) in
this process. Prints the handler's delay after the producer's `time.time()` and the time from
the handler's start to the acknowledging transaction's answer; then the same producer against a
bare redis-py `XREADGROUP BLOCK` loop (no validation, no handler, `XACK` alone): the floor
under any hop. Uses a private redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from services.common.bus import Bus, Delivery
from services.common.contracts import Tick
from services.common.redis_server import RedisServer
from services.common.streams import Names

PRODUCER = r"""
import json, sys, time
import redis
url, stream, count, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
r = redis.Redis.from_url(url)
time.sleep(0.5)
for i in range(count):
    now = time.time()
    r.xadd(stream, {"__data__": json.dumps({"v": 1, "instrument": "BTC-PERPETUAL", "mark": 100000.0 + i,
                                            "exchange_ts": now, "ingest_ts": now})})
    time.sleep(gap)
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run(count: int, gap_ms: float) -> None:
    with tempfile.TemporaryDirectory(prefix="tp-bus-hop-") as tmp:
        server = RedisServer(Path(tmp), appendonly=True)
        server.start()
        url = server.url
        try:
            names = Names("hop")
            bus = Bus(url, names, "bench")
            arrival: list[float] = []
            handled: list[float] = []

            async def handler(batch: list[Delivery[Tick]], pipe: Any) -> None:
                now = time.time()
                arrival.extend((now - d.doc.ingest_ts) * 1000 for d in batch)
                pipe.set(names.key("seen"), batch[-1].entry_id)

            consumer = bus.consumer(names.ticks, "bench", "bench-1", Tick, handler)
            original = consumer.handle

            async def timed(entries: Any, deliveries: Any) -> bool:
                start = time.perf_counter()
                try:
                    return await original(entries, deliveries)
                finally:
                    handled.append((time.perf_counter() - start) * 1000)

            consumer.handle = timed  # type: ignore[method-assign]
            await bus.start()
            producer = await asyncio.create_subprocess_exec(
                sys.executable, "-c", PRODUCER, url, names.ticks, str(count), str(gap_ms / 1000))
            await producer.wait()
            await asyncio.sleep(0.5)
            await bus.stop()
            bare = await bare_hops(url, names.key("bare"), count, gap_ms)
        finally:
            server.stop()
    print(f"bus hop, {len(arrival)} entries one at a time ({gap_ms:g} ms apart), producer in another process")
    for name, values in (
        ("XADD sent -> handler has it", arrival),
        ("handler -> ack transaction answered", handled),
        ("bare redis-py: XADD sent -> reply read", bare),
    ):
        print(
            f"  {name:<38} p50 {pct(values, 50):6.3f}  p90 {pct(values, 90):6.3f}  "
            f"p99 {pct(values, 99):6.3f}  "
            f"mean {statistics.fmean(values):6.3f} ms"
        )


async def bare_hops(url: str, stream: str, count: int, gap_ms: float) -> list[float]:
    """The same producer read by a bare `XREADGROUP BLOCK` loop: ms from XADD to the reply parsed."""
    redis = Redis.from_url(url)
    try:
        await redis.xgroup_create(stream, "bare", id="$", mkstream=True)
        producer = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PRODUCER, url, stream, str(count), str(gap_ms / 1000))
        delays: list[float] = []
        while len(delays) < count:
            for _, entries in await redis.xreadgroup("bare", "c", {stream: ">"}, count=100, block=5000):
                now = time.time()
                for entry_id, fields in entries:
                    delays.append((now - json.loads(fields[b"__data__"])["ingest_ts"]) * 1000)
                    await redis.xack(stream, "bare", entry_id)
        await producer.wait()
        return delays
    finally:
        await redis.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--gap-ms", type=float, default=5.0)
    args = parser.parse_args()
    asyncio.run(run(args.count, args.gap_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
