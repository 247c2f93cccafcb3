"""deploy/redis/users.acl on a real Redis: each service user can do its work and nothing else.

The full services also run under these users in test_stack.py, which checks Redis' ACL LOG
stays empty; this file shows, command by command, what each user is refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import NoPermissionError

from services.common.bus import DATA_FIELD
from services.common.streams import Names
from tests.deploy.support import ACL_TEMPLATE, AclRedis, acl_redis, render_acl, write_passwords

TP = Names("tp")
PAPER = Names("paper")
DOC = {DATA_FIELD: '{"v": 1}'}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    with acl_redis(tmp_path_factory.mktemp("acl-redis")) as running:
        yield running


def refused(call, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NoPermissionError):
        call(*args, **kwargs)


def consume(client: redis_sync.Redis, stream: str, group: str) -> None:
    """Everything StreamConsumer does on a stream it reads: create, read, claim, inspect, ack
    (tests/deploy/test_redis_acl_bus.py runs the bus itself as each user)."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis_sync.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)
    client.xreadgroup(group, f"{group}-1", {stream: ">"}, count=10)
    client.xreadgroup(group, f"{group}-1", {stream: "0"}, count=10)
    client.xautoclaim(stream, group, f"{group}-1", min_idle_time=30000, start_id="0-0", count=10)
    client.xclaim(stream, group, f"{group}-1", min_idle_time=2000, message_ids=["0-1"])
    client.xpending_range(stream, group, min="-", max="+", count=10, consumername=f"{group}-1")
    client.xinfo_groups(stream)
    refused(client.xinfo_consumers, stream, group)  # nothing the services do


def test_unauthenticated_clients_may_do_nothing(server: AclRedis) -> None:
    """`default` is off (it has every permission only so Redis can replay the AOF as it)."""
    anonymous = server.client(None)
    calls = ((anonymous.ping, ()), (anonymous.get, ("tp:halt",)), (anonymous.xadd, (TP.commands, DOC)),
             (anonymous.keys, ("*",)))
    for call, args in calls:
        with pytest.raises(redis_sync.AuthenticationError):
            call(*args)
    with pytest.raises(redis_sync.AuthenticationError):
        redis_sync.Redis(port=server.port, username="default", password="").ping()


def test_ingest_writes_the_exchange_streams_and_nothing_downstream(server: AclRedis) -> None:
    ingest = server.client("ingest")
    for stream in (TP.fills, TP.ticks, TP.positions, TP.deadletter, PAPER.fills):
        ingest.xadd(stream, DOC, maxlen=1000, approximate=True)
    ingest.hset(TP.instruments, mapping={"BTC-PERPETUAL": '{"v": 1}'})
    # FillStore.publish: WATCH the dedup set and checkpoint, then one transaction
    with ingest.pipeline(transaction=True) as pipe:
        pipe.watch(TP.key("ingest:trade_ids"), TP.key("ingest:checkpoint"))
        pipe.zmscore(TP.key("ingest:trade_ids"), ["t1"])
        pipe.get(TP.key("ingest:checkpoint"))
        pipe.multi()
        pipe.xadd(TP.fills, DOC, maxlen=1000, approximate=True)
        pipe.zadd(TP.key("ingest:trade_ids"), {"t1": time.time()})
        pipe.set(TP.key("ingest:checkpoint"), "1.0")
        pipe.zremrangebyscore(TP.key("ingest:trade_ids"), "-inf", "(0")
        pipe.execute()
    assert ingest.set(TP.key("ingest:since"), "1.0", nx=True) is not None
    # issue 19: it reads the halt and reports who breaks it (`halt_violation` on tp:reports)
    assert ingest.hgetall(TP.halt) == {} and ingest.hgetall(PAPER.halt) == {}
    ingest.xadd(TP.reports, DOC, maxlen=1000, approximate=True)
    # never downstream streams, never other services' keys, never reading what it does not need
    for stream in (TP.commands, TP.snapshots, TP.control, PAPER.commands):
        refused(ingest.xadd, stream, DOC)
    refused(ingest.hset, TP.halt, "reason", "x")
    refused(ingest.delete, TP.halt)
    refused(ingest.xrange, TP.reports)
    refused(ingest.hgetall, TP.halt_acks)
    refused(ingest.set, TP.key("takeprofit:lease"), "x")
    refused(ingest.xrange, TP.fills)
    refused(ingest.delete, TP.fills)
    refused(ingest.flushall)
    refused(ingest.config_get, "*")
    refused(ingest.xadd, "other:fills", DOC)  # the ACL names the namespaces tp and paper only


def test_portfolio_reads_its_inputs_with_a_group_and_writes_snapshots(server: AclRedis) -> None:
    portfolio = server.client("portfolio")
    for stream in (TP.fills, TP.ticks, TP.positions, TP.reports, PAPER.fills):
        consume(portfolio, stream, "portfolio")
    portfolio.xrevrange(TP.positions, count=1)
    portfolio.hgetall(TP.instruments)
    portfolio.hmget(TP.instruments, ["BTC-PERPETUAL"])
    with portfolio.pipeline(transaction=True) as pipe:  # effects and ack in one transaction
        pipe.set(TP.key("portfolio:ledger"), "{}")
        pipe.hset(TP.key("portfolio:ticks"), mapping={"BTC-PERPETUAL": "{}"})
        pipe.set(TP.key("portfolio:seq"), 1)
        pipe.xadd(TP.snapshots, DOC, maxlen=10000, approximate=True)
        pipe.xadd(TP.deadletter, DOC)
        pipe.xack(TP.fills, "portfolio", "0-1")
        pipe.execute()
    portfolio.get(TP.key("portfolio:ledger"))
    for stream in (TP.fills, TP.ticks, TP.commands, TP.reports, TP.control):
        refused(portfolio.xadd, stream, DOC)
    refused(portfolio.hset, TP.instruments, "x", "y")
    refused(portfolio.hset, TP.halt, "reason", "x")
    refused(portfolio.set, TP.key("takeprofit:state"), "{}")
    refused(portfolio.xreadgroup, "portfolio", "p", {TP.commands: ">"})


def test_takeprofit_alone_writes_commands_and_the_halt(server: AclRedis) -> None:
    takeprofit = server.client("takeprofit")
    for stream in (TP.snapshots, TP.control, TP.reports):
        consume(takeprofit, stream, "takeprofit")
    takeprofit.hmget(TP.instruments, ["BTC-PERPETUAL"])
    takeprofit.exists(TP.key("takeprofit:lease"))
    with takeprofit.pipeline(transaction=True) as pipe:
        pipe.set(TP.key("takeprofit:lease"), "cmd-1", px=40000)
        pipe.xadd(TP.commands, DOC, maxlen=1000, approximate=True)
        pipe.xadd(TP.control_answers, DOC, maxlen=1000, approximate=True)
        pipe.set(TP.key("takeprofit:state"), "{}")
        pipe.delete(TP.halt)
        pipe.hset(TP.halt, mapping={"v": "1", "reason": "take_profit", "since": "1.0"})
        pipe.xack(TP.snapshots, "takeprofit", "0-1")
        pipe.execute()
    takeprofit.xadd(PAPER.commands, DOC)
    takeprofit.get(TP.key("takeprofit:failed_closure"))
    for stream in (TP.fills, TP.ticks, TP.snapshots, TP.reports, TP.control):
        refused(takeprofit.xadd, stream, DOC)
    refused(takeprofit.hset, TP.halt_acks, "bot", "{}")
    refused(takeprofit.set, TP.key("executor:progress:cmd-1"), "{}")
    # a refused command inside MULTI aborts the whole transaction: no half-written effects
    with takeprofit.pipeline(transaction=True) as pipe:
        pipe.set(TP.key("takeprofit:state"), "changed")
        pipe.xadd(TP.reports, DOC)
        with pytest.raises(redis_sync.ResponseError):
            pipe.execute()
    assert takeprofit.get(TP.key("takeprofit:state")) == b"{}"


def test_executor_consumes_commands_and_runs_its_lua_store(server: AclRedis) -> None:
    executor = server.client("executor")
    consume(executor, TP.commands, "executor")
    executor.hmget(TP.instruments, ["BTC-PERPETUAL"])
    asyncio.run(_executor_store(server))
    for stream in (TP.commands, TP.snapshots, TP.fills, TP.control):
        refused(executor.xadd, stream, DOC)
    refused(executor.hset, TP.halt, "reason", "x")
    refused(executor.delete, TP.key("takeprofit:lease"))
    refused(executor.xrange, TP.reports)
    # a script runs with the caller's rights: no way around the ACL through Lua
    sneaky = executor.register_script("return redis.call('XADD', KEYS[1], '*', 'data', '{}')")
    with pytest.raises(redis_sync.ResponseError):
        sneaky(keys=[TP.key("executor:lease:x")], args=[])  # the key is its own, XADD on it is not
    with pytest.raises(redis_sync.ResponseError):
        sneaky(keys=[TP.commands], args=[])


async def _executor_store(server: AclRedis) -> None:
    """The executor's real Store: lease (SET NX PX), Lua save/renew/release, progress GET."""
    from services.common.contracts import CloseReason, Command, Legs, PositionToClose, ReportStatus
    from services.executor.app import Store
    from services.executor.plan import Progress

    client = AsyncRedis(port=server.port, username="executor", password=server.passwords["executor"])
    try:
        store = Store(client, TP, 1000, "executor-1")
        now = time.time()
        command = Command(command_id="cmd-acl", epoch=1, reason=CloseReason.MANUAL, fraction=1.0,
                          legs=Legs.of([PositionToClose(instrument="BTC-PERPETUAL", amount=0.1)]),
                          snapshot_seq=1, net_pnl=0.0, threshold=0.0, created_ts=now, deadline_ts=now + 30)
        token = await store.acquire(command.command_id)
        assert token is not None
        progress = Progress.start(command, now, 0.005, 30.0)
        await store.save(progress, token, [progress.report(ReportStatus.RECEIVED, now)])
        assert await store.renew(command.command_id, token)
        assert (await store.load(command.command_id)) is not None
        await store.release(command.command_id, token)
    finally:
        await client.aclose()
    admin = server.client("admin")
    assert admin.xlen(TP.reports) >= 1


def test_operator_sends_controls_and_reads_the_state(server: AclRedis) -> None:
    server.client("admin").xadd(TP.fills, DOC)  # the lag it reads needs the stream, whichever test ran first
    operator = server.client("operator")
    operator.xadd(TP.control, DOC, maxlen=1000, approximate=True)
    for stream in (TP.snapshots, TP.commands, TP.reports, TP.control_answers, PAPER.control_answers):
        operator.xrevrange(stream, count=1)
    operator.xrange(TP.control_answers, min="(0-0", max="+", count=100)  # waiting for take-profit's answer
    operator.hgetall(TP.halt)
    operator.hgetall(TP.halt_acks)
    for service in ("ingest", "portfolio", "takeprofit", "executor"):  # status: GUARDING or not
        operator.get(TP.key(f"{service}:health"))
        refused(operator.set, TP.key(f"{service}:health"), "{}")
    operator.xinfo_groups(TP.fills)
    for stream in (TP.commands, TP.reports, TP.fills, TP.snapshots, TP.control_answers):
        refused(operator.xadd, stream, DOC)
    refused(operator.hset, TP.halt, "reason", "x")
    refused(operator.delete, TP.halt)
    refused(operator.xreadgroup, "takeprofit", "op", {TP.control: ">"})


def test_quoters_read_the_halt_and_acknowledge_it(server: AclRedis) -> None:
    quoter = server.client("quoter")
    quoter.hgetall(TP.halt)
    quoter.hset(TP.halt_acks, "my-bot", '{"v": 1, "ts": 1.0}')
    refused(quoter.hset, TP.halt, "reason", "x")
    refused(quoter.delete, TP.halt)
    refused(quoter.xadd, TP.control, DOC)
    refused(quoter.xrange, TP.snapshots)


def test_a_missing_password_stops_the_render_with_the_users_name(tmp_path: Path) -> None:
    write_passwords(
        tmp_path / "secrets", ("admin", "ingest", "portfolio", "takeprofit", "executor", "operator")
    )
    result = render_acl(tmp_path / "secrets", tmp_path / "users.acl")
    assert result.returncode != 0
    assert "quoter" in result.stderr and "make-secrets.sh" in result.stderr
    assert not (tmp_path / "users.acl").exists()


def test_the_template_holds_no_secret() -> None:
    text = ACL_TEMPLATE.read_text()
    lines = [line for line in text.splitlines() if line.startswith("user ")]
    assert lines, "no users"
    for line in lines:
        assert " >" not in line, f"plain-text password in users.acl: {line[:40]}"
        hashes = [token for token in line.split() if token.startswith("#")]
        assert all(token.startswith("#@") and token.endswith("@") for token in hashes), line[:60]
