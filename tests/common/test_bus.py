"""The bus against a real Redis: plain JSON on the wire, at-least-once, dead letters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.bus import Bus, Delivery
from services.common.contracts import Control, ControlAction, DeadLetter
from services.common.redis_server import RedisServer


def control(by: str) -> Control:
    return Control(action=ControlAction.HALT, by=by, ts=1_700_000_000.0)


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


class Recorder:
    """A handler that records what it handled and can be told to crash."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.crash_on: set[str] = set()

    async def __call__(self, batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        for delivery in batch:
            if delivery.doc.by in self.crash_on:
                raise RuntimeError(f"handler crashed on {delivery.doc.by}")
        self.seen.extend(d.doc.by for d in batch)


@pytest.fixture
async def make_bus(redis_url: str, names: Any, redis: Redis) -> AsyncIterator[Callable[..., Bus]]:
    """Buses of the test; they stop before `redis` deletes the test's keys (it is set up first)."""
    buses: list[Bus] = []

    def factory(service: str = "test", url: str = redis_url) -> Bus:
        bus = Bus(url, names, service)
        buses.append(bus)
        return bus

    yield factory
    for bus in buses:
        await bus.stop()


async def test_published_document_is_plain_json_in_data_field(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    bus = make_bus()
    await bus.publish(names.control, control("alice"))

    [(_, fields)] = await redis.xrange(names.control)
    assert set(fields) == {b"__data__"}
    document = json.loads(fields[b"__data__"])
    assert document == {"v": 1, "action": "halt", "by": "alice", "ts": 1_700_000_000.0}


@pytest.mark.parametrize("field", ["__data__", "data"])
async def test_plain_xadd_is_consumed_by_the_bus(
    make_bus: Any, redis: Redis, names: Any, field: str
) -> None:
    recorder = Recorder()
    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, recorder)
    await bus.start()
    await redis.xadd(names.control, {field: control("bob").model_dump_json()})

    async def handled() -> bool:
        return recorder.seen == ["bob"]

    await eventually(handled)
    assert await redis.xpending(names.control, "g") == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }


async def test_entries_written_before_first_start_are_consumed(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """The group is created at 0, not `$` (FastStream's default would skip these)."""
    for who in ("early1", "early2"):
        await redis.xadd(names.control, {"__data__": control(who).model_dump_json()})
    recorder = Recorder()
    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, recorder)
    await bus.start()

    async def handled() -> bool:
        return recorder.seen == ["early1", "early2"]

    await eventually(handled)


async def test_crash_before_ack_is_redelivered_to_another_consumer_and_acked_never_again(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    first = Recorder()
    first.crash_on = {"crashes"}
    bus1 = make_bus("one")
    bus1.consumer(names.control, "g", "dies", Control, first)
    await bus1.start()
    await redis.xadd(names.control, {"__data__": control("fine").model_dump_json()})
    await redis.xadd(names.control, {"__data__": control("crashes").model_dump_json()})

    async def first_pending() -> bool:
        return first.seen == ["fine"] and (await redis.xpending(names.control, "g"))["pending"] == 1

    await eventually(first_pending)
    await bus1.stop()  # the consumer "dies" with one entry pending

    second = Recorder()
    bus2 = make_bus("two")
    rescuer = bus2.consumer(names.control, "g", "rescuer", Control, second,
                            claim_idle_seconds=0.05, claim_interval_seconds=0.05)
    await bus2.start()

    async def rescued() -> bool:
        return second.seen == ["crashes"]

    await eventually(rescued)
    assert (await redis.xpending(names.control, "g"))["pending"] == 0
    await asyncio.sleep(0.3)
    assert await rescuer.claim_abandoned() == 0
    assert second.seen == ["crashes"], "an acked entry must never be delivered again"


async def test_restarted_consumer_first_finishes_its_own_pending_entries(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """Entries read but not acked before a crash are handled before newer ones."""
    for who in ("a", "b"):
        await redis.xadd(names.control, {"__data__": control(who).model_dump_json()})
    await redis.xgroup_create(names.control, "g", id="0")
    # The consumer read both entries and then died (kill -9): they are pending on it.
    await redis.xreadgroup("g", "worker", {names.control: ">"})
    await redis.xadd(names.control, {"__data__": control("c").model_dump_json()})

    recorder = Recorder()
    bus = make_bus()
    bus.consumer(names.control, "g", "worker", Control, recorder, claim_idle_seconds=3600)
    await bus.start()

    async def handled() -> bool:
        return recorder.seen == ["a", "b", "c"]

    await eventually(handled)
    assert (await redis.xpending(names.control, "g"))["pending"] == 0


async def test_malformed_entry_is_dead_lettered_and_next_good_entry_processed(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    recorder = Recorder()
    bus = make_bus("svc")
    bus.consumer(names.control, "g", "c1", Control, recorder)
    await bus.start()
    bad_json = await redis.xadd(names.control, {"__data__": "{not json"})
    bad_doc = await redis.xadd(
        names.control, {"__data__": json.dumps({"v": 1, "action": "explode", "by": "x", "ts": 1})}
    )
    no_field = await redis.xadd(names.control, {"other": "1"})
    await redis.xadd(names.control, {"__data__": control("good").model_dump_json()})

    async def settled() -> bool:
        return recorder.seen == ["good"] and await redis.xlen(names.deadletter) == 3

    await eventually(settled)
    letters = [
        DeadLetter.model_validate_json(f[b"__data__"]) for _, f in await redis.xrange(names.deadletter)
    ]
    assert [letter.entry_id for letter in letters] == [i.decode() for i in (bad_json, bad_doc, no_field)]
    assert "not valid JSON" in letters[0].error and letters[0].raw == "{not json"
    assert "action" in letters[1].error
    assert "neither" in letters[2].error
    assert {letter.service for letter in letters} == {"svc"}
    assert letters[0].source_stream == names.control
    assert (await redis.xpending(names.control, "g"))["pending"] == 0


async def test_poison_entry_is_dead_lettered_after_max_deliveries(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    recorder = Recorder()
    recorder.crash_on = {"poison"}
    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, recorder, max_deliveries=3,
                 claim_idle_seconds=0.01, claim_interval_seconds=0.02)
    await bus.start()
    await redis.xadd(names.control, {"__data__": control("poison").model_dump_json()})
    await redis.xadd(names.control, {"__data__": control("after").model_dump_json()})

    async def dead_lettered() -> bool:
        return await redis.xlen(names.deadletter) == 1

    await eventually(dead_lettered)
    [(_, fields)] = await redis.xrange(names.deadletter)
    letter = DeadLetter.model_validate_json(fields[b"__data__"])
    assert "delivered 4 times" in letter.error
    assert "after" in recorder.seen
    assert (await redis.xpending(names.control, "g"))["pending"] == 0


async def test_handler_effects_and_ack_are_one_transaction(make_bus: Any, redis: Redis, names: Any) -> None:
    """A handler's queued writes land together with the ack, or not at all."""
    attempts = 0

    async def handler(batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        nonlocal attempts
        attempts += 1
        pipe.incr(names.key("effects"))
        if attempts == 1:
            raise RuntimeError("crash after queuing effects")

    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, handler,
                 claim_idle_seconds=0.05, claim_interval_seconds=0.05)
    await bus.start()
    await redis.xadd(names.control, {"__data__": control("x").model_dump_json()})

    async def done() -> bool:
        return attempts == 2 and (await redis.xpending(names.control, "g"))["pending"] == 0

    await eventually(done)
    assert int(await redis.get(names.key("effects"))) == 1


async def test_group_lost_with_redis_restart_is_recreated_from_start(
    own_redis_server: RedisServer, names: Any, make_bus: Any
) -> None:
    """Redis restarts without the group: it is recreated at 0 and nothing new is skipped."""
    recorder = Recorder()
    bus = make_bus(url=own_redis_server.url)
    bus.consumer(names.control, "g", "c1", Control, recorder, claim_interval_seconds=0.1)
    await bus.start()
    client = Redis.from_url(own_redis_server.url)
    await client.xadd(names.control, {"__data__": control("before").model_dump_json()})

    async def first() -> bool:
        return recorder.seen == ["before"]

    await eventually(first)
    await client.xgroup_destroy(names.control, "g")  # what a restart without persistence leaves
    await client.xadd(names.control, {"__data__": control("after-loss").model_dump_json()})

    async def recovered() -> bool:
        return "after-loss" in recorder.seen

    await eventually(recovered, within=15)
    await client.aclose()


async def test_a_reader_that_died_is_restarted_and_what_it_held_is_handled_once(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """An unexpected error kills the reader right after Redis delivered it an entry: `/health`
    is red until the claim loop restarts the reader, the new reader takes what came meanwhile,
    and the entry the dead one held (pending, never handled) is retried — each handled once."""
    recorder = Recorder()
    bus = make_bus()
    consumer = bus.consumer(names.control, "g", "c1", Control, recorder, claim_interval_seconds=3600,
                            retry_idle_seconds=0.2)
    read_new = consumer._read_new

    async def dies_holding_an_entry() -> Any:
        while not await read_new():
            pass
        consumer._read_new = read_new  # type: ignore[method-assign]  # the restarted reader reads normally
        raise RuntimeError("unexpected")

    consumer._read_new = dies_holding_an_entry  # type: ignore[method-assign]
    await bus.start()
    reader = consumer._tasks[0]
    await redis.xadd(names.control, {"__data__": control("held").model_dump_json()})
    await asyncio.wait([reader], timeout=5)
    assert reader.done() and not consumer.is_consuming  # red: nothing reads
    assert recorder.seen == [] and (await redis.xpending(names.control, "g"))["pending"] == 1

    await redis.xadd(names.control, {"__data__": control("while-dead").model_dump_json()})
    consumer._keep_reading()  # what the claim loop does every claim_interval_seconds
    assert consumer.is_consuming

    async def new_one_read() -> bool:
        return recorder.seen == ["while-dead"]

    await eventually(new_one_read)
    await asyncio.sleep(0.3)  # the held entry is idle longer than retry_idle_seconds
    assert await consumer.retry_failed_own() == 1
    await asyncio.sleep(0.3)
    assert recorder.seen == ["while-dead", "held"]
    assert (await redis.xpending(names.control, "g"))["pending"] == 0


async def test_an_entry_the_reader_holds_while_the_lock_is_busy_is_not_retried_too(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """The reader has an entry but waits for the service's lock longer than `retry_idle_seconds`:
    the retry pass must leave it to the reader, or the handler would run twice."""
    recorder = Recorder()
    bus = make_bus()
    consumer = bus.consumer(names.control, "g", "c1", Control, recorder, claim_interval_seconds=3600,
                            retry_idle_seconds=0.1)
    await bus.start()
    async with consumer.lock:  # another consumer of the service is busy
        retry = asyncio.create_task(consumer.retry_failed_own())  # the claim loop queues on the lock first
        await asyncio.sleep(0)
        await redis.xadd(names.control, {"__data__": control("waiting").model_dump_json()})
        await asyncio.sleep(0.4)  # read by the reader, which queues second; idle > retry_idle_seconds
        assert consumer._in_hand
    assert await retry == 0  # the retry pass lists it first, but leaves it to the reader
    await asyncio.sleep(0.2)
    assert recorder.seen == ["waiting"]


async def test_consumer_survives_a_redis_restart_with_aof(
    own_redis_server: RedisServer, names: Any, make_bus: Any
) -> None:
    recorder = Recorder()
    bus = make_bus(url=own_redis_server.url)
    bus.consumer(names.control, "g", "c1", Control, recorder, claim_interval_seconds=0.2)
    await bus.start()
    client = Redis.from_url(own_redis_server.url)
    await client.xadd(names.control, {"__data__": control("one").model_dump_json()})

    async def first() -> bool:
        return recorder.seen == ["one"]

    await eventually(first)
    await client.aclose()
    await asyncio.sleep(1.2)  # let appendfsync everysec flush
    own_redis_server.stop()
    own_redis_server.start()
    client = Redis.from_url(own_redis_server.url)
    await client.xadd(names.control, {"__data__": control("two").model_dump_json()})

    async def second() -> bool:
        return recorder.seen == ["one", "two"]

    await eventually(second, within=20)
    await client.aclose()


async def test_own_failed_entry_is_retried_soon_and_state_restored(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """A batch that failed (handler or EXEC) is retried within seconds, not after claim_idle_seconds,
    and the service's on_failure hook runs first so it can reload its checkpoint."""
    recorder = Recorder()
    recorder.crash_on = {"flaky"}
    restored = 0

    async def restore() -> None:
        nonlocal restored
        restored += 1
        recorder.crash_on.clear()  # the "checkpoint" it reloads no longer crashes

    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, recorder, claim_idle_seconds=3600,
                 claim_interval_seconds=0.2, retry_idle_seconds=0.3, on_failure=restore)
    await bus.start()
    await redis.xadd(names.control, {"__data__": control("flaky").model_dump_json()})

    async def retried() -> bool:
        return recorder.seen == ["flaky"] and (await redis.xpending(names.control, "g"))["pending"] == 0

    await eventually(retried, within=5)
    assert restored == 1


async def test_a_restore_that_failed_runs_before_the_next_batch(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """Redis still away when the service tried to reload: the next batch (of any consumer of the
    service) first restores, so nothing is handled on memory that is ahead of Redis."""
    recorder = Recorder()
    recorder.crash_on = {"flaky"}
    calls: list[str] = []

    async def restore() -> None:
        calls.append("restore")
        if len(calls) == 1:
            raise ConnectionError("Redis still away")
        recorder.crash_on.clear()

    async def other(batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        calls.extend(f"handled {d.doc.by}" for d in batch)

    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, recorder, claim_idle_seconds=3600,
                 claim_interval_seconds=0.2, retry_idle_seconds=0.3, on_failure=restore)
    bus.consumer(names.halt_acks, "g", "c1", Control, other, on_failure=restore)
    await bus.start()
    await redis.xadd(names.control, {"__data__": control("flaky").model_dump_json()})

    async def restore_due() -> bool:
        return bus.restore_due is not None

    await eventually(restore_due, within=5)
    await redis.xadd(names.halt_acks, {"__data__": control("next").model_dump_json()})

    async def handled() -> bool:
        return "handled next" in calls and recorder.seen == ["flaky"]

    await eventually(handled, within=5)
    assert calls[:3] == ["restore", "restore", "handled next"] and bus.restore_due is None


async def test_a_deeply_nested_entry_is_dead_lettered_and_its_batch_handled(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """One entry too deep for a JSON parser must not fail the batch it shares with good ones, and
    its dead letter says why (issue 21, item 8: it failed the batch and ended as "poison")."""
    recorder = Recorder()
    bus = make_bus()
    consumer = bus.consumer(names.control, "g", "c1", Control, recorder)
    await redis.xadd(names.control, {"__data__": control("before").model_dump_json()})
    nested = '{"v": 1, "by": ' + "[" * 50_000 + "]" * 50_000 + "}"
    deep = await redis.xadd(names.control, {"__data__": nested})
    await redis.xadd(names.control, {"__data__": control("after").model_dump_json()})
    await bus.start()  # the three are one batch of the first read

    async def settled() -> bool:
        return recorder.seen == ["before", "after"] and await redis.xlen(names.deadletter) == 1

    await eventually(settled)
    [(_, fields)] = await redis.xrange(names.deadletter)
    letter = DeadLetter.model_validate_json(fields[b"__data__"])
    assert letter.entry_id == deep.decode()
    assert "not valid JSON" in letter.error and "recursion" in letter.error
    assert (await redis.xpending(names.control, "g"))["pending"] == 0 and consumer.problem() is None


async def test_a_poison_entry_is_dead_lettered_with_the_handlers_own_error(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    recorder = Recorder()
    recorder.crash_on = {"poison"}
    bus = make_bus()
    consumer = bus.consumer(names.control, "g", "c1", Control, recorder, max_deliveries=2,
                            claim_idle_seconds=3600, claim_interval_seconds=0.05, retry_idle_seconds=0.05)
    await bus.start()
    await redis.xadd(names.control, {"__data__": control("poison").model_dump_json()})

    async def failing() -> bool:
        return consumer.problem() is not None

    await eventually(failing)
    assert "RuntimeError: handler crashed on poison" in str(consumer.problem())

    async def dead_lettered() -> bool:
        return await redis.xlen(names.deadletter) == 1

    await eventually(dead_lettered)
    [(_, fields)] = await redis.xrange(names.deadletter)
    error = DeadLetter.model_validate_json(fields[b"__data__"]).error
    assert "delivered 3 times" in error and "RuntimeError: handler crashed on poison" in error

    async def settled() -> bool:  # the consumer forgets the failure once its transaction has returned
        return consumer.problem() is None

    await eventually(settled)


class RedisAway(Recorder):
    """A handler whose Redis refuses writes (maxmemory, a read-only replica) until told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.refusing = True

    async def __call__(self, batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        if self.refusing:
            from redis.exceptions import OutOfMemoryError
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        await super().__call__(batch, pipe)


async def test_an_entry_failing_on_redis_is_never_dead_lettered_and_is_handled_when_redis_is_back(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """A real fill must not become "poison" because Redis refused writes for longer than
    `max_deliveries` retries: it waits, the consumer reports it, and it is handled afterwards."""
    handler = RedisAway()
    bus = make_bus()
    consumer = bus.consumer(names.control, "g", "c1", Control, handler, max_deliveries=2,
                            claim_idle_seconds=3600, claim_interval_seconds=0.05, retry_idle_seconds=0.05)
    await bus.start()
    await redis.xadd(names.control, {"__data__": control("real-fill").model_dump_json()})

    async def retried_past_the_limit() -> bool:
        pending = await redis.xpending_range(names.control, "g", min="-", max="+", count=10)
        return bool(pending) and pending[0]["times_delivered"] > 4

    await eventually(retried_past_the_limit)
    assert await redis.xlen(names.deadletter) == 0
    assert "1 entry of" in str(consumer.problem()) and "OutOfMemoryError" in str(consumer.problem())
    handler.refusing = False

    async def handled() -> bool:
        return handler.seen == ["real-fill"] and (await redis.xpending(names.control, "g"))["pending"] == 0

    await eventually(handled)
    assert await redis.xlen(names.deadletter) == 0 and consumer.problem() is None


async def test_a_valid_entry_sharing_a_batch_with_a_malformed_one_is_applied_after_a_failure(
    make_bus: Any, redis: Redis, names: Any
) -> None:
    """The handler fails on the batch once; the malformed entry is settled at once, the valid one
    is retried (XCLAIM, which the ACL must allow) and applied."""
    recorder = Recorder()
    recorder.crash_on = {"fill"}
    restored = 0

    async def restore() -> None:
        nonlocal restored
        restored += 1
        recorder.crash_on.clear()

    bus = make_bus()
    bus.consumer(names.control, "g", "c1", Control, recorder, claim_idle_seconds=3600,
                 claim_interval_seconds=0.1, retry_idle_seconds=0.1, on_failure=restore)
    await redis.xadd(names.control, {"__data__": "{broken"})
    await redis.xadd(names.control, {"__data__": control("fill").model_dump_json()})
    await bus.start()

    async def applied() -> bool:
        return recorder.seen == ["fill"] and (await redis.xpending(names.control, "g"))["pending"] == 0

    await eventually(applied)
    assert await redis.xlen(names.deadletter) == 1
    assert restored == 1  # what the failed handler changed in memory was forgotten
