"""The probe of issue 21 on the whole guardian, under the shipped ACL: never silently unguarded.

* a bad `tp:instruments` value written while running: take-profit still decides and the closure
  completes; the value is dead-lettered with its reason;
* Redis at `maxmemory` (noeviction): every service's `/health` turns red with Redis' reason while
  nothing can be written, and the closure is decided and completed once writes work again;
* one forged tick (mark 0, bids at 0) never fires the emergency stop;

each followed by the full invariant check (positions, exactly-once fills, no double close, the ACL
LOG empty, every command signed).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import SEED
from tests.e2e.harness import PERP, SERVICES, Pipeline, Trader, eventually


def health_document(pipeline: Pipeline, name: str) -> tuple[int, dict[str, Any]]:
    port = pipeline.procs[name].port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}


async def test_a_bad_instrument_value_while_running_never_stops_a_decision(
    pipeline: Pipeline, fault_log: dict[str, Any]
) -> None:
    assert pipeline.redis is not None
    trader = Trader(pipeline, interval=0.3, seed=SEED)
    trader.start()
    try:
        await pipeline.ensure_position()
        await pipeline.force_closure()  # the executor now knows the instrument's tick sizes
        bad = '{"v": 1, "type": "perpetual", "volume_tick_size": true}'
        await pipeline.redis.hset(pipeline.names.instruments, PERP, bad)
        # since snapshots v2 take-profit reads no instrument data (the rows carry the tick size); the
        # executor does, for its orders: restarted, it has to read the value again for the next closure
        took = await pipeline.restart("executor")
        await pipeline.ensure_position()
        command = await pipeline.force_closure()
        assert await pipeline.outcome(command["command_id"]) == "completed"  # on the exchange's own figures
    finally:
        await trader.stop()
    letters = [doc for _, doc in await pipeline.stream_docs(pipeline.names.deadletter) if doc]
    about = [d for d in letters if d["source_stream"] == pipeline.names.instruments and d["entry_id"] == PERP]
    # each service that read the value dead-lettered it once, with the reason (take-profit may too:
    # its timer refreshes the volume tick sizes it rounds a partial closure with)
    services = [d["service"] for d in about]
    assert "executor" in services and len(services) == len(set(services)), services  # once per reader
    assert all("volume_tick_size" in d["error"] for d in about)
    figures = await pipeline.check_invariants()
    fault_log.update(fault="bad tp:instruments value while running", detail="BTC-PERPETUAL's value made "
                     "invalid, the executor restarted to read it; a closure decided and completed",
                     closures=figures["commands"], trades=figures["trades"], health=f"{took:.2f}")


async def test_redis_at_maxmemory_is_red_everywhere_and_the_closure_comes_when_writes_work(
    pipeline: Pipeline, fault_log: dict[str, Any]
) -> None:
    assert pipeline.redis is not None
    trader = Trader(pipeline, interval=0.3, seed=SEED)
    trader.start()
    try:
        await pipeline.ensure_position()
        await pipeline.redis.config_set("maxmemory-policy", "noeviction")
        await pipeline.redis.config_set("maxmemory", 1)
        red: dict[str, str] = {}

        async def every_service_red() -> bool:
            for name in SERVICES:
                status, body = await asyncio.to_thread(health_document, pipeline, name)
                if status == 503 and "Redis refuses writes" in body.get("reasons", {}).get("redis", ""):
                    red[name] = body["reasons"]["redis"]
            return set(red) == set(SERVICES)

        await eventually(every_service_red, within=15, interval=0.2)
        assert all("OutOfMemoryError" in why for why in red.values()), red
        await asyncio.sleep(3.0)  # trades go on at the exchange meanwhile; nothing can be written
        await pipeline.redis.config_set("maxmemory", 0)
        back = time.monotonic()
        for name in SERVICES:
            await pipeline.wait_healthy(name, within=20)
        healthy_after = time.monotonic() - back
        await pipeline.ensure_position()
        command = await pipeline.force_closure()
        assert await pipeline.outcome(command["command_id"]) == "completed"
    finally:
        await pipeline.redis.config_set("maxmemory", 0)
        await trader.stop()
    figures = await pipeline.check_invariants()
    fault_log.update(fault="Redis at maxmemory (noeviction)", detail="all four /health 503 'Redis refuses "
                     "writes: OutOfMemoryError' for 3 s; then a closure decided and completed",
                     closures=figures["commands"], trades=figures["trades"], health=f"{healthy_after:.2f}")


@pytest.mark.pipeline(overrides={"portfolio_take_profit": {"emergency_close_threshold": -50.0}})
async def test_one_forged_tick_never_fires_the_emergency_stop(pipeline: Pipeline,
                                                               fault_log: dict[str, Any]) -> None:
    """The probe's forged tick: contract-valid, mark 0 and bids at 0 — on the account's 0.01 BTC
    long that is about -600 USD, far beyond an emergency stop at -50."""
    assert pipeline.redis is not None
    await pipeline.ensure_position(0.01)
    await pipeline.wait_settled()
    before = {c["command_id"] for c in await pipeline.commands()}
    now = time.time()
    forged = {"v": 1, "instrument": PERP, "mark": 0.0, "best_bid": 0.0, "best_ask": 1.0,
              "bids": [[0.0, 10.0]], "asks": [[1.0, 10.0]], "exchange_ts": now, "ingest_ts": now}
    await pipeline.xadd_raw(pipeline.names.ticks, {"__data__": json.dumps(forged)})
    await asyncio.sleep(3.0)  # the probe saw the stop 20 ms after the tick
    after = [c for c in await pipeline.commands() if c["command_id"] not in before]
    assert after == [], after
    snapshots = [doc for _, doc in await pipeline.stream_docs(pipeline.names.snapshots) if doc]
    assert all(s["net_after_close"] > -50 for s in snapshots), "a snapshot valued the forged tick"
    figures = await pipeline.check_invariants()
    fault_log.update(fault="one forged tick (mark 0, bids at 0)", detail="injected on tp:ticks for the "
                     "0.01 BTC long; no command, no snapshot valued it", closures=figures["commands"],
                     trades=figures["trades"], health="no restart")
