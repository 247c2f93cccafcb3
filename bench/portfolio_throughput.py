"""Portfolio benchmark: per-tick cost against open positions, memory after 1M fills, service throughput.

    .venv/bin/python bench/portfolio_throughput.py [--ticks 200000] [--skip-memory]

Prints three figures (see docs/performance.md):
1. the pure ledger's cost per tick with 1, 10, 100 and 1,000 open positions (should be flat);
2. resident memory of a process that fed 1,000,000 fills to a ledger (target < 150 MB);
3. ticks/s consumed by the real service process (`python -m services.portfolio`) from a
   real Redis with 1,000 open positions, backlog drained as fast as it can (target >= 20,000/s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.common.bus import DATA_FIELD, encode_document  # noqa: E402
from services.common.config import Settings  # noqa: E402
from services.common.contracts import Fill, InstrumentInfo, InstrumentType, Tick  # noqa: E402
from services.common.redis_server import RedisServer  # noqa: E402
from services.common.streams import Names  # noqa: E402
from services.portfolio.ledger import Ledger, LedgerConfig  # noqa: E402

INFO = InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD", tick_size=0.1,
                      volume_tick_size=0.001, min_order_amount=0.001)


def instrument(i: int) -> str:
    return f"SIM{i:05d}-PERPETUAL"


def opening_fill(i: int, now: float) -> Fill:
    return Fill(
        trade_id=f"open-{i}",
        order_id=f"o{i}",
        instrument=instrument(i),
        side="buy" if i % 2 else "sell",
        price=100.0 + i,
        amount=0.01,
        fee=0.0005,
        fee_rate=0.0005,
        liquidity="taker",
        exchange_ts=now,
        ingest_ts=now,
    )


def ticks_for(n: int, count: int, now: float) -> list[Tick]:
    return [Tick(instrument=instrument(k % n), mark=100.0 + (k % n) + (k % 7) * 0.1,
                 best_bid=99.9 + (k % n), best_ask=100.1 + (k % n),
                 bids=[[99.9 + (k % n), 1.0], [99.8 + (k % n), 2.0]], asks=[[100.1 + (k % n), 1.0]],
                 exchange_ts=now + k * 1e-6, ingest_ts=now + k * 1e-6) for k in range(count)]


def per_tick_cost() -> None:
    config = LedgerConfig.from_settings(Settings())
    print("1) pure ledger, cost of one tick (apply_tick) by open positions:")
    for n in (1, 10, 100, 1000):
        ledger = Ledger(config)
        now = time.time()
        for i in range(n):
            ledger.set_instrument(instrument(i), INFO)
            ledger.apply_fill(opening_fill(i, now))
        ticks = ticks_for(n, 100_000, now)
        start = time.perf_counter()
        for t in ticks:
            ledger.apply_tick(t)
        per_tick = (time.perf_counter() - start) / len(ticks)
        start = time.perf_counter()
        ledger.snapshot(1, now, 10.0)
        snap_ms = (time.perf_counter() - start) * 1000
        print(f"   {n:>5} positions: {per_tick * 1e6:6.2f} us/tick ({1 / per_tick:>9,.0f} ticks/s); "
              f"building one snapshot: {snap_ms:6.2f} ms")


def memory_after_fills(count: int) -> None:
    """Run in a child process so the figure is that process's own peak RSS.

    VmHWM, not getrusage: Linux carries ru_maxrss across fork+exec, so a child
    would report its parent's high-water mark.
    """
    code = f"""
import resource, time, sys
sys.path.insert(0, {str(REPO)!r})
from services.common.config import Settings
from services.common.contracts import Fill
from services.portfolio.ledger import Ledger, LedgerConfig
ledger = Ledger(LedgerConfig.from_settings(Settings()))
now = time.time()
for k in range({count}):
    ledger.apply_fill(Fill(trade_id=f"T{{k}}", order_id="O", instrument=f"SIM{{k % 1000:04d}}-PERPETUAL",
        side="buy" if (k // 1000) % 3 else "sell", price=100.0 + k % 50, amount=0.001, fee=0.00001,
        fee_rate=0.0001, exchange_ts=now + k * 1e-6, ingest_ts=now))
state_bytes = len(__import__("json").dumps(ledger.to_state()))
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]
print(int(hwm) / 1024, state_bytes)
"""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    print(f"2) {count:,} fills on 1,000 instruments: peak RSS {float(out[0]):.0f} MB "
          f"(checkpoint {int(out[1]) / 1e6:.1f} MB), {count / (time.perf_counter() - start):,.0f} fills/s")


async def service_throughput(tick_count: int, batch_size: int, positions: int = 1000) -> float:
    """Ticks/s the service process drains from a backlog in Redis with `positions` open positions."""
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis")
        server.start()
        try:
            names = Names("bench")
            redis = Redis.from_url(server.url)
            now = time.time()
            await redis.hset(
                names.instruments, mapping={instrument(i): INFO.model_dump_json() for i in range(positions)}
            )
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(positions):
                    pipe.xadd(names.fills, {DATA_FIELD: encode_document(opening_fill(i, now))})
                await pipe.execute()
            ticks = ticks_for(positions, tick_count, time.time() + 3600)
            for chunk in range(0, len(ticks), 10_000):
                async with redis.pipeline(transaction=False) as pipe:
                    for t in ticks[chunk:chunk + 10_000]:
                        pipe.xadd(names.ticks, {DATA_FIELD: encode_document(t)})
                    await pipe.execute()
            config = Path(tmp) / "tp.toml"
            config.write_text(f'[redis]\nurl = "{server.url}"\nnamespace = "bench"\n'
                              f"[portfolio]\nbatch_size = {batch_size}\nstale_after_seconds = 100000\n")
            env = {**os.environ, "PYTHONPATH": str(REPO), "TP_LOG_LEVEL": "WARNING"}
            start = time.perf_counter()
            process = subprocess.Popen(  # noqa: ASYNC220 - started once, the bench's only work meanwhile
                [sys.executable, "-m", "services.portfolio", "--config", str(config), "--metrics-port", "0"],
                env=env, cwd=REPO)
            try:
                while True:
                    groups = await redis.xinfo_groups(names.ticks) if await redis.exists(names.ticks) else []
                    if groups and groups[0]["entries-read"] == tick_count and groups[0]["pending"] == 0:
                        break
                    await asyncio.sleep(0.01)
                elapsed = time.perf_counter() - start
                usage = _child_usage(process.pid)
            finally:
                process.terminate()
                process.wait()
            snapshots = await redis.xlen(names.snapshots)
            print(f"3) service, {positions:,} open positions, batch {batch_size}: {tick_count:,} ticks "
                  f"drained in {elapsed:.2f} s (incl. ~0.5 s start-up) = {tick_count / elapsed:,.0f} "
                  "ticks/s; "
                  f"{snapshots:,} snapshots published; {usage}")
            await redis.aclose()
        finally:
            server.stop()
    return tick_count / elapsed


def _child_usage(pid: int) -> str:
    try:
        fields = Path(f"/proc/{pid}/status").read_text().splitlines()
        rss = next(line for line in fields if line.startswith("VmRSS")).split()[1]
        stat = Path(f"/proc/{pid}/stat").read_text().split()
        cpu = (int(stat[13]) + int(stat[14])) / os.sysconf("SC_CLK_TCK")
        return f"service RSS {int(rss) / 1024:.0f} MB, CPU {cpu:.2f} s"
    except (OSError, StopIteration):
        return "service usage unavailable"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--fills", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_memory:
        memory_after_fills(args.fills)
    per_tick_cost()
    asyncio.run(service_throughput(args.ticks, args.batch))
    print(f"(bench process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
