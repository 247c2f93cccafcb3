"""The bus itself, as each consuming service's ACL user, through every path it has (issue 21, item 4).

The shipped ACL did not allow XCLAIM: the retry of a failed batch was refused, so a valid fill
sharing a batch with a bad entry stayed pending and was never applied, and the reclaim of a dead
consumer's entries was skipped in the same pass. Here a `Bus` logged in as portfolio, takeprofit
and executor in turn reads, fails a batch beside a malformed entry and retries it (XCLAIM), takes
over a dead consumer's entry (XAUTOCLAIM), dead-letters a poison entry, records its lag and writes
its health probe — with Redis' ACL LOG empty at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio.client import Pipeline

from services.common.bus import Bus, Delivery
from services.common.contracts import Control, ControlAction
from services.common.service import Health, add_framework_checks
from services.common.streams import Names
from tests.deploy.support import AclRedis, acl_redis

TP = Names("tp")
STREAM_OF = {"portfolio": TP.fills, "takeprofit": TP.snapshots, "executor": TP.commands}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    with acl_redis(tmp_path_factory.mktemp("acl-bus")) as running:
        yield running


def doc(by: str) -> str:
    return Control(action=ControlAction.HALT, by=by, ts=time.time()).model_dump_json()


async def eventually(check, within: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("user", list(STREAM_OF))
async def test_every_path_of_the_bus_runs_under_the_services_acl_user(server: AclRedis, user: str,
                                                                      tmp_path: Path) -> None:
    stream = STREAM_OF[user]
    admin = server.client("admin")
    password = tmp_path / "password"
    password.write_text(server.passwords[user])
    seen: list[str] = []
    fail_once = {"fill"}

    async def handler(batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        for delivery in batch:
            if delivery.doc.by in fail_once or delivery.doc.by == "poison":
                fail_once.discard(delivery.doc.by)
                raise ValueError(f"cannot handle {delivery.doc.by}")
        seen.extend(d.doc.by for d in batch)

    # a consumer that died holding an entry: left pending, idle, for the live one to take over
    admin.xadd(stream, {"__data__": doc("orphan")})
    try:
        admin.xgroup_create(stream, user, id="0", mkstream=True)
    except Exception as exc:  # the module's Redis is shared by the parametrized users
        assert "BUSYGROUP" in str(exc)
    admin.xreadgroup(user, f"{user}-dead", {stream: ">"}, count=10)
    # a malformed entry and a valid one in one batch; the handler fails on the valid one once
    admin.xadd(stream, {"__data__": "{broken"})
    admin.xadd(stream, {"__data__": doc("fill")})
    admin.xadd(stream, {"__data__": doc("poison")})

    bus = Bus(server.host_url, TP, user, username=user, password=server.passwords[user])
    consumer = bus.consumer(stream, user, f"{user}-1", Control, handler, claim_idle_seconds=0.5,
                            claim_interval_seconds=0.2, retry_idle_seconds=0.2, max_deliveries=2)
    health = Health(user)
    add_framework_checks(health, bus, TP.key(f"{user}:health"))
    await bus.start()
    try:
        async def settled() -> bool:
            pending = admin.xpending(stream, user)["pending"]
            return sorted(seen) == ["fill", "orphan"] and pending == 0

        await eventually(settled, within=20)
        assert await consumer.record_lag() == 0
        await health.refresh()
        assert health.latest == {"redis": True, "consuming": True, "handlers": True}, health.reasons
    finally:
        await bus.stop()
    letters = [fields[b"__data__"].decode() for _, fields in admin.xrange(TP.deadletter)]
    assert any("not valid JSON" in letter and stream in letter for letter in letters)
    assert any("poison entry" in letter and "cannot handle poison" in letter for letter in letters)
    denials = [d for d in server.acl_denials() if d.get("username") == user]
    assert denials == [], denials
