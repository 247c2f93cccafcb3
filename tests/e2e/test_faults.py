"""Fault injection on the whole pipeline (services as processes, Redis with AOF, the paper exchange).

Each test keeps a stream of trades (`Trader`) and ticks (the paper's random walk, raw tickers)
running, injects its fault, makes at least one closure happen, and then checks every invariant
(`Pipeline.check_invariants`): the portfolio's positions equal the exchange's, every trade is on
`tp:fills` exactly once, no position was closed twice or flipped, every malformed entry is on
`tp:deadletter`; and every restarted service answered /health 200 within 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any

import pytest

from tests.e2e.conftest import SEED
from tests.e2e.harness import EXECUTOR_KEY, INGEST_KEY, SERVICES, Pipeline, Trader

HEALTHY_WITHIN = 5.0


def healthy_within(took: float, name: str) -> None:
    assert took <= HEALTHY_WITHIN, f"{name} took {took:.2f} s to be healthy after its restart"


async def insert_latency(pipeline: Pipeline, seconds: float) -> None:
    """Hold the executor's orders in flight a while, so a fault lands mid-order."""
    await pipeline.control("paper/set_latency", {"seconds": seconds, "methods": ["private/insert"]})


@pytest.mark.parametrize("service", SERVICES)
async def test_kill_9_and_restart(pipeline: Pipeline, fault_log: dict[str, Any], service: str) -> None:
    rng = random.Random(f"{SEED}-{service}")
    trader = Trader(pipeline, interval=0.25, seed=rng.randrange(1 << 30))
    trader.start()
    took: list[float] = []
    try:
        await pipeline.ensure_position()
        # 1. at a random moment of the stream
        await asyncio.sleep(rng.uniform(0.2, 2.0))
        pipeline.kill(service)
        await asyncio.sleep(rng.uniform(0.1, 1.0))  # trades and ticks go on while it is dead
        took.append(await pipeline.start_service(service))
        # 2. mid-closure: as soon as the command exists (the executor: with its first order in flight)
        if service == "executor":
            await insert_latency(pipeline, 0.4)

        async def kill_mid_closure(command: dict[str, Any]) -> None:
            await asyncio.sleep(rng.uniform(0.0, 0.2) if service == "executor" else rng.uniform(0.0, 0.3))
            pipeline.kill(service)
            await asyncio.sleep(0.3)
            if service == "executor":
                await insert_latency(pipeline, 0)
            took.append(await pipeline.start_service(service))

        await pipeline.ensure_position()
        await pipeline.force_closure(during=kill_mid_closure)
        # 3. and the pipeline still closes after it
        await pipeline.ensure_position()
        await pipeline.force_closure()
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    fault_log.update(
        fault=f"kill -9 {service} (random moment, then mid-closure)",
        detail="2 kills + restarts; executor killed with an insert in flight"
        if service == "executor"
        else "2 kills + restarts",
        closures=figures["commands"],
        trades=figures["trades"],
        health=" / ".join(f"{t:.2f}" for t in took),
    )
    for t in took:
        healthy_within(t, service)


async def test_redis_restart_mid_stream_and_mid_closure(
    pipeline: Pipeline, fault_log: dict[str, Any]
) -> None:
    trader = Trader(pipeline, interval=0.25, seed=SEED)
    trader.start()
    took: list[float] = []
    try:
        await pipeline.ensure_position()
        await asyncio.sleep(1.0)
        took.append(await pipeline.restart_redis())

        async def restart_mid_closure(command: dict[str, Any]) -> None:
            took.append(await pipeline.restart_redis(down_seconds=0.3))

        await pipeline.ensure_position()
        await pipeline.force_closure(during=restart_mid_closure)
        await pipeline.ensure_position()
        await pipeline.force_closure()
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    fault_log.update(fault="restart Redis (AOF on)",
                     detail="mid-stream, then as the command appears (SIGTERM, same port)",
                     closures=figures["commands"], trades=figures["trades"],
                     health=" / ".join(f"{t:.2f}" for t in took))
    for t in took:
        healthy_within(t, "every service")


async def test_redis_restart_with_a_closing_order_in_flight(
    pipeline: Pipeline, fault_log: dict[str, Any]
) -> None:
    fault_log.update(
        fault="restart Redis with a closing order in flight",
        detail="insert held 0.3 s by the exchange; Redis down 1 s from the command on",
        closures=1,
    )
    await pipeline.ensure_position(0.01)
    await insert_latency(pipeline, 0.3)

    async def restart_mid_order(command: dict[str, Any]) -> None:
        # Redis goes down as the command appears and stays down past the insert's answer:
        # the executor's next progress write (order_sent / filled) meets a dead Redis
        await pipeline.restart_redis(down_seconds=1.0)
        await insert_latency(pipeline, 0)

    command = None

    async def closure() -> None:
        nonlocal command
        command = await pipeline.force_closure(during=restart_mid_order, within=15)

    with contextlib.suppress(TimeoutError):  # deadline 10 s: a healthy closure reports well before
        await asyncio.wait_for(closure(), timeout=25)
    assert command is not None or (await pipeline.commands()), "no command decided"
    cid = (command or (await pipeline.commands())[-1])["command_id"]
    assert await pipeline.outcome(cid) == "completed", "no outcome within the command's deadline"
    assert pipeline.redis is not None
    assert not await pipeline.redis.exists(pipeline.names.key("takeprofit:failed_closure")), (
        "quoters left halted"
    )


@pytest.mark.parametrize("who", ["ingest", "executor"])
async def test_exchange_drops_the_connection(pipeline: Pipeline, fault_log: dict[str, Any], who: str) -> None:
    key = INGEST_KEY if who == "ingest" else EXECUTOR_KEY
    trader = Trader(pipeline, interval=0.25, seed=SEED)
    trader.start()
    drops = 0
    try:
        await pipeline.ensure_position()
        await asyncio.sleep(0.5)
        drops += (await pipeline.control("paper/drop_connections", {"key_id": key, "abrupt": True}))[
            "dropped"
        ]
        await asyncio.sleep(0.5)
        drops += (await pipeline.control("paper/drop_connections", {"key_id": key}))["dropped"]
        if who == "executor":
            await insert_latency(pipeline, 0.3)

        async def drop_mid_closure(command: dict[str, Any]) -> None:
            nonlocal drops
            await asyncio.sleep(0.15)
            drops += (await pipeline.control("paper/drop_connections", {"key_id": key, "abrupt": True}))[
                "dropped"
            ]
            if who == "executor":
                await insert_latency(pipeline, 0)

        await pipeline.ensure_position()
        await pipeline.force_closure(during=drop_mid_closure)
        await pipeline.ensure_position()
        await pipeline.force_closure()
        await asyncio.sleep(1.5)  # health is re-evaluated every second: let it see the drop
        dropped_at = time.time()
        drops += (await pipeline.control("paper/drop_connections", {"key_id": key, "abrupt": True}))[
            "dropped"
        ]
        await asyncio.sleep(1.5)
        healthy_after = await pipeline.healthy_since(who, dropped_at, HEALTHY_WITHIN)
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    fault_log.update(fault=f"exchange drops {who}'s connection",
                     detail=f"{drops} connections dropped (abrupt, clean, abrupt mid-closure"
                            f"{' with an insert in flight' if who == 'executor' else ''})",
                     closures=figures["commands"], trades=figures["trades"],
                     health=f"{healthy_after:.2f} (after the last drop)")


@pytest.mark.parametrize("code, what", [(4, "throttle"), (20, "temporary failure")])
async def test_exchange_errors_on_the_executors_orders(pipeline: Pipeline, fault_log: dict[str, Any],
                                                      code: int, what: str) -> None:
    trader = Trader(pipeline, interval=0.25, seed=SEED)
    trader.start()
    try:
        for count in (1, 3):
            await pipeline.ensure_position()
            await pipeline.control("paper/fail_next", {"count": count, "code": code, "message": what,
                                                       "methods": ["private/insert"], "key_id": EXECUTOR_KEY})
            command = await pipeline.force_closure()
            assert await pipeline.outcome(command["command_id"]) == "completed"
    finally:
        await trader.stop()
    orders = (
        await pipeline.control("paper/order_log", {"key_id": EXECUTOR_KEY, "method": "private/insert"})
    )["orders"]
    refused = sum(1 for o in orders if o["outcome"].get("error", {}).get("code") == code)
    assert refused == 4
    figures = await pipeline.check_invariants()
    fault_log.update(fault=f"exchange error {code} ({what}) on the executor's inserts",
                     detail=f"1 then 3 inserts refused ({refused} in all); both closures completed",
                     closures=figures["commands"], trades=figures["trades"], health="no restart")


async def test_duplicated_and_reordered_fills_and_ticks(
    pipeline: Pipeline, fault_log: dict[str, Any]
) -> None:
    trader = Trader(pipeline, interval=0.15, seed=SEED)
    trader.start()
    try:
        await pipeline.ensure_position()
        await asyncio.sleep(2.0)
        await pipeline.wait_settled()
        assert pipeline.redis is not None
        names = pipeline.names
        fills = await pipeline.redis.xrange(names.fills)
        ticks = await pipeline.redis.xrevrange(
            names.ticks, count=300
        )  # newest first: re-added, they go back in time
        for _, fields in reversed(fills):  # every fill again, in reverse order
            await pipeline.xadd_raw(names.fills, fields)
        for _, fields in ticks:
            await pipeline.xadd_raw(names.ticks, fields)
        for _, fields in fills[-5:]:  # the latest fills a third time
            await pipeline.xadd_raw(names.fills, fields)
        await asyncio.sleep(1.0)
        await pipeline.wait_settled()
        await pipeline.ensure_position()
        await pipeline.force_closure()
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    fault_log.update(fault="duplicate + reorder entries on tp:fills and tp:ticks",
                     detail=f"{len(fills) + 5} fill copies (reversed), 300 old ticks re-added newest first",
                     closures=figures["commands"], trades=figures["trades"], health="no restart")


MALFORMED_KINDS = [
    {"__data__": "not json {"},
    {"__data__": "[]"},
    {"__data__": json.dumps({"v": 1})},
    {"__data__": json.dumps({"v": 2, "trade_id": "x"})},
    {"data": '{"v": 1, "instrument": "BTC-PERPETUAL", "mark": "NaN"}'},
    {"__data__": '{"v": 1, "instrument": "BTC-PERPETUAL", "mark": NaN, "exchange_ts": 1, "ingest_ts": 1}'},
    {
        "__data__": json.dumps(
            {"v": 1, "instrument": "BTC-PERPETUAL", "mark": -5.0, "exchange_ts": 1.0, "ingest_ts": 1.0}
        )
    },
    {
        "__data__": json.dumps(
            {
                "v": 1,
                "trade_id": "t",
                "order_id": "o",
                "instrument": "BTC-PERPETUAL",
                "side": "up",
                "price": 1.0,
                "amount": 1.0,
                "fee": 0.0,
                "exchange_ts": 1.0,
                "ingest_ts": 1.0,
            }
        )
    },
    {"unexpected": "field"},
    {"__data__": "\xff\xfe binary"},
]


async def test_ten_thousand_malformed_entries(pipeline: Pipeline, fault_log: dict[str, Any]) -> None:
    names = pipeline.names
    streams = [names.fills, names.ticks, names.snapshots, names.commands, names.reports]
    trader = Trader(pipeline, interval=0.25, seed=SEED)
    trader.start()
    try:
        await pipeline.ensure_position()
        assert pipeline.redis is not None
        async with pipeline.redis.pipeline(transaction=False) as pipe:
            for n in range(10_000):
                pipe.xadd(streams[n % len(streams)], MALFORMED_KINDS[n % len(MALFORMED_KINDS)])
            ids = await pipe.execute()
        for n, entry_id in enumerate(ids):
            stream = streams[n % len(streams)]
            pipeline.injected[stream].add(entry_id.decode())
            pipeline.malformed[stream].add(entry_id.decode())

        async def all_dead_lettered() -> bool:
            dead = await pipeline.deadlettered()
            return all(ids <= dead.get(s, set()) for s, ids in pipeline.malformed.items())
        from tests.e2e.harness import eventually
        await eventually(all_dead_lettered, within=40, interval=0.5)
        await pipeline.ensure_position()
        await pipeline.force_closure()
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    for name in SERVICES:
        assert await pipeline.health(name)
    fault_log.update(
        fault="10,000 malformed entries",
        detail="2,000 each on tp:fills, tp:ticks, tp:snapshots, tp:commands, tp:reports; 10 kinds",
        closures=figures["commands"],
        trades=figures["trades"],
        health="no restart",
    )


async def test_second_executor_replica(pipeline: Pipeline, fault_log: dict[str, Any]) -> None:
    await pipeline.add_executor_replica()
    trader = Trader(pipeline, interval=0.25, seed=SEED)
    trader.start()
    try:
        for _ in range(3):
            await pipeline.ensure_position()
            await pipeline.force_closure()
    finally:
        await trader.stop()
    figures = await pipeline.check_invariants()
    assert pipeline.redis is not None
    consumers = await pipeline.redis.xinfo_consumers(pipeline.names.commands, "executor")
    seen = sorted(c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers)
    assert len(seen) == 2, seen
    fault_log.update(fault="second executor replica on the same commands",
                     detail=f"3 closures; consumers {', '.join(seen)} both in the executor group",
                     closures=figures["commands"], trades=figures["trades"], health="no restart")
