"""The floor under the reaction latency on this machine: the guardian's hops with nothing in them.

    .venv/bin/python bench/floor.py [--trials 300] [--gap-ms 20] [--command-kb 0 125]

Issue 22 asks the reaction (ingest has the crossing tick -> the exchange has the first close order)
to take p50 <= 3 ms with one position. That path crosses, whatever the services do inside: a
websocket message from the exchange to ingest, three Redis stream hops (ticks -> portfolio,
snapshots -> take-profit, commands -> executor, each handler acknowledging in a MULTI with its
output), the executor's claim (one Lua call answered before the first order), and the order's
websocket message back to the exchange. This bench runs exactly that chain as five separate
processes with no validation, no money, no logic: the exchange (this process, a `websockets`
server like the paper's), "ingest" (websocket client -> XADD), "portfolio" and "take-profit"
(XREADGROUP BLOCK -> MULTI [XADD, XACK]), "executor" (XREADGROUP BLOCK -> EVAL claim -> websocket
send -> XACK), all with redis.asyncio and asyncio as the services, against a private redis-server
with the AOF on. Whatever the services' own code costs comes on top: no change inside them can
beat these figures, only faster cores or fewer hops.

`--command-kb` pads the command with that many KB of JSON legs, parsed by the executor (a command
closing 1,000 options is ~125 KB: `bench/command_costs.py`); one chain per size. One trial every
`--gap-ms`, as a move arrives on a market otherwise quiet: every process waits idle in between, as
the guardian's do between reactions. Prints, per size, the reaction (ingest has the tick -> the
exchange has the order) and each step's median, and the exchange -> ingest websocket delay apart
(the latency bench starts its clock at ingest too).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from services.common.redis_server import RedisServer

CLAIM = "if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 1 end return 0"
MIDDLE = {3: ["portfolio", "takeprofit"], 2: ["portfolio+takeprofit"], 1: []}
"""The services between ingest and the executor, by the number of stream hops."""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def _ingest(url: str, port: int, padding: Any) -> None:
    redis = Redis.from_url(url)
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send("ingest")
        async for message in ws:
            tick = json.loads(message)
            tick["ingest"] = time.time()
            if padding is not None:
                tick["positions"] = padding
            await redis.xadd("floor:0", {"__data__": json.dumps(tick)})


def legs(command_kb: int, form: str) -> list[dict[str, Any]] | dict[str, list[Any]] | None:
    """About `command_kb` KB of a command's legs as JSON: a list of objects (the contract's form
    today) or one list per field (`--form columns`)."""
    rows = [{"instrument": f"BTC-27MAR26-{100000 + i}-C", "amount": -0.1, "exit_price": 1234.5,
             "mark": 1240.0, "exit_within_depth": True} for i in range(command_kb * 1000 // 125)]
    if not rows:
        return None
    return rows if form == "rows" else {field: [row[field] for row in rows] for field in rows[0]}


async def _hop(url: str, source: str, target: str, stage: str, padding: Any) -> None:
    """One service's hop: read a batch, write what it produces and ack the input in one MULTI."""
    redis = Redis.from_url(url)
    await redis.xgroup_create(source, stage, id="0", mkstream=True)
    while True:
        read: Any = await redis.xreadgroup(stage, stage, {source: ">"}, count=100, block=60_000)
        for _, entries in read:
            for entry_id, fields in entries:
                doc = json.loads(fields[b"__data__"])
                doc[stage] = time.time()
                if padding is not None:
                    doc["positions"] = padding
                async with redis.pipeline(transaction=True) as pipe:
                    pipe.xadd(target, {"__data__": json.dumps(doc)})
                    pipe.xack(source, stage, entry_id)
                    await pipe.execute()


async def _executor(url: str, port: int, source: str) -> None:
    redis = Redis.from_url(url)
    await redis.xgroup_create(source, "executor", id="0", mkstream=True)
    claim = redis.register_script(CLAIM)
    async with connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send("executor")
        while True:
            read: Any = await redis.xreadgroup("executor", "executor", {source: ">"}, count=10, block=60_000)
            for _, entries in read:
                for entry_id, fields in entries:
                    command = json.loads(fields[b"__data__"])
                    command["executor"] = time.time()
                    await claim(keys=[f"floor:claim:{command['i']}"], args=["executor"])
                    command["claimed"] = time.time()
                    command.pop("positions", None)
                    await ws.send(json.dumps(command))
                    await redis.xack(source, "executor", entry_id)


def _role(role: str, url: str, port: int, hops: int, padding: Any) -> None:
    middle = MIDDLE[hops]
    if role == "ingest":
        asyncio.run(_ingest(url, port, None if middle else padding))
    elif role == "executor":
        asyncio.run(_executor(url, port, f"floor:{hops - 1}"))
    else:
        k = middle.index(role)
        last = k == len(middle) - 1
        asyncio.run(_hop(url, f"floor:{k}", f"floor:{k + 1}", role, padding if last else None))


async def chain(url: str, trials: int, gap_ms: float, hops: int, padding: Any) -> list[dict[str, float]]:
    """Run the processes; send a tick every `gap_ms`; return each trial's stamps."""
    clients: dict[str, ServerConnection] = {}
    connected = asyncio.Event()
    orders: asyncio.Queue[dict[str, float]] = asyncio.Queue()

    async def handler(ws: ServerConnection) -> None:
        clients[str(await ws.recv())] = ws
        if len(clients) == 2:
            connected.set()
        try:
            async for message in ws:
                order = json.loads(message)
                order["exchange"] = time.time()
                await orders.put(order)
        except ConnectionClosed:
            return

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        spawn = multiprocessing.get_context("spawn")
        processes = [spawn.Process(target=_role, args=(role, url, port, hops, padding), daemon=True)
                     for role in ("ingest", *MIDDLE[hops], "executor")]
        for process in processes:
            process.start()
        try:
            await asyncio.wait_for(connected.wait(), 30)
            await asyncio.sleep(1.0)
            results: list[dict[str, float]] = []
            for i in range(trials):
                await clients["ingest"].send(json.dumps({"i": i, "sent": time.time()}))
                results.append(await asyncio.wait_for(orders.get(), 10))
                await asyncio.sleep(gap_ms / 1000)
            return results
        finally:
            for process in processes:
                process.terminate()
                process.join(5)


def report(title: str, stages: list[str], trials: list[dict[str, float]]) -> None:
    reaction = [(t["exchange"] - t["ingest"]) * 1000 for t in trials]
    print(f"{title}, {len(trials)} trials:")
    print(f"  reaction floor, ingest has the tick -> exchange has the order: p50 {pct(reaction, 50):.3f}  "
          f"p90 {pct(reaction, 90):.3f}  p99 {pct(reaction, 99):.3f}  "
          f"mean {statistics.fmean(reaction):.3f} ms")
    steps = [("exchange sends -> ingest has it (not in the reaction)", "sent", "ingest")]
    steps += [(f"{a} -> {b}", a, b) for a, b in itertools.pairwise(stages)]
    for name, start, end in steps:
        values = [(t[end] - t[start]) * 1000 for t in trials]
        print(f"  {name:<55} p50 {pct(values, 50):6.3f}  p90 {pct(values, 90):6.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20, help="trials run first and left out")
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--command-kb", type=int, nargs="+", default=[0, 125])
    parser.add_argument("--hops", type=int, nargs="+", choices=sorted(MIDDLE), default=[3])
    parser.add_argument("--form", choices=("rows", "columns"), default="rows")
    args = parser.parse_args()
    for hops in args.hops:
        for command_kb in args.command_kb:
            padding = legs(command_kb, args.form)
            with tempfile.TemporaryDirectory(prefix="tp-floor-") as tmp:
                server = RedisServer(Path(tmp), appendonly=True)
                server.start()
                try:
                    runs = args.trials + args.warmup
                    trials = asyncio.run(chain(server.url, runs, args.gap_ms, hops, padding))
                finally:
                    server.stop()
            form = f" as {args.form}" if padding is not None else ""
            stages = ["ingest", *MIDDLE[hops], "executor", "claimed", "exchange"]
            report(f"{hops} stream hops, command with {command_kb} KB of legs{form}", stages,
                   trials[args.warmup:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
