"""The take-profit service against a real Redis: one command per trigger, halts, controls, restarts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from redis.asyncio import Redis

from services.common.contracts import (
    Command,
    Control,
    ControlAction,
    ControlAnswer,
    Report,
    ReportStatus,
    Snapshot,
    SnapshotPosition,
    halt_from_hash,
)
from services.common.streams import Names
from services.takeprofit.app import build
from tests.support import (
    ServiceProcess,
    eventually,
    in_process,
    read_stream,
    settings_for,
    write_config,
    xadd,
)
from tests.takeprofit.factories import pos, snap

NO_PARTIAL = {"partial_close_fraction": 0.0, "cooldown_seconds": 0.5, "check_interval_seconds": 1.0}


def live(seq: int, net_after_close: float, **kwargs: object) -> Snapshot:
    """A snapshot stamped now, so the time-limit barrier stays quiet."""
    now = time.time()
    return snap(seq, net_after_close, ts=now, oldest=now, **kwargs)  # type: ignore[arg-type]


async def commands(redis: Redis, names: Names) -> list[Command]:
    return await read_stream(redis, names.commands, Command)


async def one_command(redis: Redis, names: Names, within: float = 10.0) -> Command:
    """Wait until the service has written exactly one command, and return it."""

    async def decided() -> bool:
        return len(await commands(redis, names)) == 1

    await eventually(decided, within=within)
    [command] = await commands(redis, names)
    return command


async def all_snapshots_handled(redis: Redis, names: Names, count: int) -> None:
    """Wait until the service has read and acknowledged `count` snapshots."""

    async def handled() -> bool:
        info = await redis.xinfo_groups(names.snapshots)
        return info[0]["pending"] == 0 and info[0]["entries-read"] == count

    await eventually(handled, within=30)


async def test_a_thousand_snapshots_above_target_make_exactly_one_command(
    redis_url: str, names: Names, redis: Redis
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        for seq in range(1, 1001):
            await xadd(redis, names.snapshots, live(seq, 1.25))

        await all_snapshots_handled(redis, names, 1000)
        [command] = await commands(redis, names)
    assert command.reason == "take_profit" and command.fraction == 1.0
    assert command.snapshot_seq == 1 and command.net_pnl == 1.25 and command.threshold == 1.1
    assert [(p.instrument, p.amount) for p in command.closing().rows()] == [("BTC-PERPETUAL", 1.0)]
    assert command.deadline_ts - command.created_ts == 30.0
    halt = halt_from_hash(await redis.hgetall(names.halt))
    assert halt is not None and halt.command_id == command.command_id and halt.until is None


async def test_target_not_reached_a_cent_below(redis_url: str, names: Names, redis: Redis) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 1.09))
        await xadd(redis, names.snapshots, live(2, 1.10))

        async def one() -> bool:
            return len(await commands(redis, names)) == 1

        await eventually(one)
    [command] = await commands(redis, names)
    assert command.snapshot_seq == 2


async def test_completed_report_releases_lease_then_cooldown_then_halt_cleared(
    redis_url: str, names: Names, redis: Redis
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 2.0))

        command = await one_command(redis, names)
        assert await redis.exists(names.key("takeprofit:lease"))
        await xadd(redis, names.reports, Report(command_id=command.command_id, status=ReportStatus.COMPLETED,
                                                epoch=command.epoch, fraction=1.0, ts=time.time()))

        async def cooling() -> bool:
            halt = halt_from_hash(await redis.hgetall(names.halt))
            return (
                halt is not None
                and halt.until is not None
                and not await redis.exists(names.key("takeprofit:lease"))
            )

        await eventually(cooling)

        async def cleared() -> bool:
            return not await redis.exists(names.halt)

        await eventually(cleared, within=5)  # cool-down 0.5 s, timer every 1 s
        # the epoch is closed: later snapshots of the same epoch decide nothing
        await xadd(redis, names.snapshots, live(2, 3.0))
        await xadd(redis, names.snapshots, live(3, 3.0, epoch=2))

        async def next_epoch() -> bool:
            return len(await commands(redis, names)) == 2

        await eventually(next_epoch)
    second = (await commands(redis, names))[1]
    assert second.epoch == 2 and second.snapshot_seq == 3


async def test_a_closure_that_leaves_dust_is_not_decided_again_and_close_all_says_why(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """The dust loop, through the service: a max-age closure completed leaving 0.0005 BTC (below the
    0.001 minimum order); the portfolio's next epoch lists it as dust. Past the cool-down and several
    timer ticks no second command is written, and a `close_all` is refused as `only_dust`."""
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    old = time.time() - 25 * 3600
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, snap(1, 0.0, ts=time.time(), oldest=old))
        command = await one_command(redis, names)
        assert command.reason == "max_age"
        await xadd(redis, names.reports, Report(command_id=command.command_id, status=ReportStatus.COMPLETED,
                                                epoch=command.epoch, fraction=1.0, ts=time.time()))
        dust = [pos(position=0.0005, opened_ts=old, volume_tick_size=0.0001)]
        for seq in range(2, 6):
            await xadd(redis, names.snapshots, snap(seq, 0.0, epoch=2, ts=time.time(), oldest=None,
                                                    positions=dust, dust=["BTC-PERPETUAL"]))
            await asyncio.sleep(0.6)  # cool-down 0.5 s, timer every 1 s
        await eventually(lambda: _no_halt(redis, names), within=5)
        await xadd(redis, names.control, Control(action=ControlAction.CLOSE_ALL, by="op", ts=time.time()))

        async def answered() -> bool:
            return bool(await read_stream(redis, names.control_answers, ControlAnswer))

        await eventually(answered)
        [answer] = await read_stream(redis, names.control_answers, ControlAnswer)
        assert len(await commands(redis, names)) == 1
    assert (answer.outcome, answer.reason) == ("refused", "only_dust")


async def test_failed_report_releases_lease_and_keeps_halt_until_resume(
    redis_url: str, names: Names, redis: Redis
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 2.0))

        command = await one_command(redis, names)
        await xadd(redis, names.reports, Report(command_id=command.command_id, status=ReportStatus.FAILED,
                                                epoch=1, fraction=1.0, ts=time.time(),
                                                error={"code": 41, "message": "insufficient liquidity"}))
        await eventually(lambda: _lease_gone(redis, names))
        await asyncio.sleep(1.5)  # longer than the cool-down: the failure still holds quoters down
        halt = halt_from_hash(await redis.hgetall(names.halt))
        assert halt is not None and halt.reason == "closure_failed" and halt.command_id == command.command_id
        await xadd(redis, names.control, Control(action=ControlAction.RESUME, by="op", ts=time.time()))

        async def resumed() -> bool:
            return not await redis.exists(names.halt)

        await eventually(resumed)


async def _lease_gone(redis: Redis, names: Names) -> bool:
    return not await redis.exists(names.key("takeprofit:lease"))


async def test_stale_prices_block_take_profit_but_not_emergency_stop(
    redis_url: str, names: Names, redis: Redis
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 5.0, stale=["BTC-PERPETUAL"]))
        await xadd(redis, names.snapshots, live(2, -10.0, stale=["BTC-PERPETUAL"]))

        async def decided() -> bool:
            return len(await commands(redis, names)) == 1

        await eventually(decided)
    [command] = await commands(redis, names)
    assert command.reason == "emergency_stop" and command.snapshot_seq == 2


async def test_operator_halt_resume_and_close_all(redis_url: str, names: Names, redis: Redis) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.control, Control(action=ControlAction.HALT, by="op", ts=time.time()))

        async def halted() -> bool:
            halt = halt_from_hash(await redis.hgetall(names.halt))
            return halt is not None and halt.reason == "operator_halt"

        await eventually(halted)
        await xadd(redis, names.snapshots, live(1, 5.0))  # above target, but halted: no command
        await xadd(redis, names.control, Control(action=ControlAction.RESUME, by="op", ts=time.time()))
        await eventually(lambda: _no_halt(redis, names))
        assert await commands(redis, names) == []
        await xadd(redis, names.control, Control(action=ControlAction.CLOSE_ALL, by="op", ts=time.time()))

        async def manual() -> bool:
            return len(await commands(redis, names)) == 1

        await eventually(manual)
    [command] = await commands(redis, names)
    assert command.reason == "manual"


async def _no_halt(redis: Redis, names: Names) -> bool:
    return not await redis.exists(names.halt)


async def test_partial_take_profit_keeps_hedge_ratio_and_fires_once(
    redis_url: str, names: Names, redis: Redis
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit={"cooldown_seconds": 0.0})
    legs = [pos("BTC-PERPETUAL", 2.0), pos("BTC-27DEC26-100000-C", -10.0, instrument_type="option")]
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 0.6, positions=legs))

        command = await one_command(redis, names)
        await xadd(redis, names.reports, Report(command_id=command.command_id, status=ReportStatus.COMPLETED,
                                                epoch=1, fraction=0.5, ts=time.time()))
        await eventually(lambda: _lease_gone(redis, names))
        await xadd(redis, names.snapshots, live(2, 0.7, positions=legs))
        await asyncio.sleep(0.3)
    [command] = await commands(redis, names)
    assert command.reason == "partial_take_profit" and command.fraction == 0.5
    assert {p.instrument: p.amount for p in command.closing().rows()} == {
        "BTC-PERPETUAL": 1.0,
        "BTC-27DEC26-100000-C": -5.0,
    }
    assert command.groups and command.groups[0].underlying == "BTCUSD"


async def test_a_partial_that_rounds_to_nothing_sends_nothing_halts_nothing_and_holds_no_barrier(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """A 0.1-lot book at a volume tick of 0.1: half of it rounds to zero, so no command goes out — and
    the emergency stop fires at once afterwards, not a cool-down later (nothing was closed to cool)."""
    settings = settings_for(redis_url, names, portfolio_take_profit={"cooldown_seconds": 30.0})
    legs = [pos("BTC-PERPETUAL", 0.1).model_copy(update={"volume_tick_size": 0.1})]
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 0.6, positions=legs))
        await all_snapshots_handled(redis, names, 1)
        assert await commands(redis, names) == []
        assert not await redis.exists(names.halt), "no closure: the quoters must not stand down"
        await xadd(redis, names.snapshots, live(2, -50.0, positions=legs))
        command = await one_command(redis, names)
    assert command.reason == "emergency_stop"


async def test_killed_after_publishing_a_command_and_restarted_makes_no_second_command(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    config = write_config(tmp_path / "tp.toml", settings)
    process = ServiceProcess("takeprofit", config, tmp_path / "takeprofit.log")
    process.start()
    try:
        await xadd(redis, names.snapshots, live(1, 2.0))

        async def decided() -> bool:
            return len(await commands(redis, names)) == 1

        await eventually(decided, within=20)
        process.kill()
        for seq in range(2, 12):
            await xadd(redis, names.snapshots, live(seq, 2.0))
        process.start()

        async def all_read() -> bool:
            groups = await redis.xinfo_groups(names.snapshots)
            return groups[0]["entries-read"] == 11 and groups[0]["pending"] == 0

        await eventually(all_read, within=20)
        assert len(await commands(redis, names)) == 1, process.log()
    finally:
        process.stop()


async def command_calls(redis: Redis, *commands: str) -> int:
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)


async def test_snapshots_below_target_cost_no_redis_reads(redis_url: str, names: Names, redis: Redis) -> None:
    """The lease and the failed-closure halt are mirrored in memory: the hot path only writes."""
    settings = settings_for(
        redis_url, names, portfolio_take_profit={**NO_PARTIAL, "check_interval_seconds": 60.0}
    )
    async with in_process(build, settings, "takeprofit"):
        before = await command_calls(redis, "exists", "get", "hmget")
        for seq in range(1, 201):
            await xadd(redis, names.snapshots, live(seq, 0.5))

        await all_snapshots_handled(redis, names, 200)
        reads = await command_calls(redis, "exists", "get", "hmget") - before
    # the test's own XINFO polling is not counted; 200 snapshots must not cost 200 reads
    assert reads < 10, reads


async def test_reports_on_the_way_to_completed_write_nothing(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """`received`, `order_sent`, ... arrive while a closure runs; only `completed` / `failed` matter."""
    settings = settings_for(
        redis_url, names, portfolio_take_profit={**NO_PARTIAL, "check_interval_seconds": 60.0}
    )
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 2.0))
        command = await one_command(redis, names)
        before = await command_calls(redis, "set", "del", "hset")
        for status in (ReportStatus.RECEIVED, ReportStatus.ORDERS_CANCELLED, ReportStatus.ORDER_SENT):
            await xadd(
                redis, names.reports, Report(command_id=command.command_id, status=status, ts=time.time())
            )

        async def reports_handled() -> bool:
            info = await redis.xinfo_groups(names.reports)
            return info[0]["pending"] == 0 and info[0]["entries-read"] == 3

        await eventually(reports_handled)
        assert await command_calls(redis, "set", "del", "hset") == before
        await xadd(redis, names.reports, Report(command_id=command.command_id, status=ReportStatus.COMPLETED,
                                                ts=time.time()))
        await eventually(lambda: _lease_gone(redis, names))


async def test_a_lease_lost_in_redis_is_noticed_by_the_timer(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """A Redis restart that lost the lease key: the timer re-reads it and ends the closure as failed."""
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit"):
        await xadd(redis, names.snapshots, live(1, 2.0))
        command = await one_command(redis, names)
        await redis.delete(names.key("takeprofit:lease"))

        async def failed_halt() -> bool:
            halt = halt_from_hash(await redis.hgetall(names.halt))
            return (
                halt is not None and halt.reason == "closure_failed" and halt.command_id == command.command_id
            )

        await eventually(failed_halt, within=5)


async def test_a_failed_timer_transaction_is_forgotten_before_anything_else(
        redis_url: str, names: Names, redis: Redis) -> None:
    """The timer changed memory, then Redis failed: the state is reloaded before the next decision."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    async with in_process(build, settings, "takeprofit") as service:
        original = service.on_timer

        async def failing_timer(now: float) -> None:
            service.on_timer = original
            service.lease_held = True  # what a half-done timer pass could leave in memory
            raise RedisConnectionError("Redis went away mid-transaction")

        service.on_timer = failing_timer

        async def restore_due() -> bool:
            return service.bus.restore_due is not None

        await eventually(restore_due, within=5)
        await xadd(redis, names.snapshots, live(1, 2.0))  # handled only after the reload
        command = await one_command(redis, names)
    assert command.snapshot_seq == 1 and service.bus.restore_due is None


async def test_deltas_are_folded_and_a_gap_or_a_start_reads_the_portfolios_rows(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """v2 snapshots carry only changed rows: the command closes every position all the same.

    Started with the rows already in `tp:snapshot:positions` (as the portfolio writes them), the
    service reads them; a delta that does not follow the last one seen makes it read them again.
    """
    settings = settings_for(redis_url, names, portfolio_take_profit=NO_PARTIAL)
    eth, sol = pos("ETH-PERPETUAL", -2.0, underlying="ETHUSD"), pos("SOL-PERPETUAL", 3.0, underlying="SOLUSD")
    btc = pos("BTC-PERPETUAL", 1.0)
    first = live(1, 0.0, positions=[btc, eth])
    await xadd(redis, names.snapshots, first)
    rows = {p.instrument: p.model_dump_json() for p in (btc, eth)}
    await redis.hset(names.snapshot_positions, mapping=rows)  # type: ignore[arg-type]

    def delta(seq: int, net: float, rows: list[SnapshotPosition]) -> Snapshot:
        return live(seq, net, positions=rows).model_copy(update={"full": False, "open_positions": 3})

    async with in_process(build, settings, "takeprofit"):
        # seq 2 changes SOL; seq 3 is "lost" (never written: the service sees a gap at 4 and re-reads)
        await xadd(redis, names.snapshots, delta(2, 0.5, [sol]))
        await redis.hset(names.snapshot_positions, "SOL-PERPETUAL", sol.model_dump_json())
        moved = pos("ETH-PERPETUAL", -1.5, underlying="ETHUSD")
        await redis.hset(names.snapshot_positions, "ETH-PERPETUAL", moved.model_dump_json())
        await xadd(redis, names.snapshots, delta(4, 1.25, []))
        command = await one_command(redis, names)
    assert command.snapshot_seq == 4
    assert sorted((p.instrument, p.amount) for p in command.closing().rows()) == [
        ("BTC-PERPETUAL", 1.0), ("ETH-PERPETUAL", -1.5), ("SOL-PERPETUAL", 3.0)]
