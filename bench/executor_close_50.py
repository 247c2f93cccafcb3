"""Time to flat for 50 positions: the executor against the paper exchange and a real Redis.

    .venv/bin/python bench/executor_close_50.py [--runs 3] [--rate 45]

Starts a private redis-server (or uses REDIS_URL), an in-process paper exchange with a frozen
market and normal books, opens 50 positions (perpetuals, futures and options, long and short),
publishes one full-closure command and prints the time from the command to the `completed`
report (verified flat against the exchange's portfolio).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from services.common.contracts import ReportStatus
from services.common.redis_server import RedisServer
from services.common.streams import Names
from services.paper.testing import make_keys, running_paper_exchange
from tests.executor.conftest import (
    account_positions,
    add_option_strikes,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    send,
    wait_outcome,
)


async def one_run(redis_url: str, workdir: Path, run: int, rate: float) -> float:
    keys = workdir / f"keys{run}"
    trader = make_keys(keys, "trader")
    names = Names(f"bench{run}")
    async with running_paper_exchange(keys, seed=run) as paper:
        await paper.control("paper/pause")
        extra = add_option_strikes(paper, 30)
        listed = [i.name for i in paper.exchange.market.instruments.values() if i.name not in extra] + extra
        # each at least the instrument's minimum order (the paper enforces them since issue 18)
        size = {name: max(paper.exchange.market.instruments[name].min_order_amount,
                          0.05 if "PERPETUAL" in name or name.count("-") == 1 else 0.5)
                for name in listed[:50]}
        held = {name: size[name] if n % 2 else -size[name] for n, name in enumerate(listed[:50])}
        await open_positions(paper, held)
        redis = Redis.from_url(redis_url)
        settings = make_settings(redis_url, names, paper, trader, order_rate_per_second=rate)
        async with running_executor(settings):
            command = make_command(held, deadline=30)
            started = time.perf_counter()
            await send(redis, names, command)
            got = await wait_outcome(redis, names, command.command_id, within=60)
            elapsed = time.perf_counter() - started
        assert got[-1].status is ReportStatus.COMPLETED, got[-1]
        assert all(p == 0 for p in account_positions(paper).values())
        await redis.aclose()
        return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=45.0, help="executor.order_rate_per_second")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = os.environ.get("REDIS_URL")
        if not url:
            server = RedisServer(Path(tmp) / "redis")
            server.start()
            url = server.url
        try:
            times = [await one_run(url, Path(tmp), run, args.rate) for run in range(args.runs)]
        finally:
            if server:
                server.stop()
    print(f"50 positions flat (verified) in: {', '.join(f'{t:.3f}' for t in times)} s "
          f"(median {statistics.median(times):.3f} s, order rate {args.rate:g}/s)")


if __name__ == "__main__":
    asyncio.run(main())
