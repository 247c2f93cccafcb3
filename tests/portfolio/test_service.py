"""The portfolio service against a real Redis: snapshots, epochs, drift, duplicates, kill -9."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.contracts import (
    DeadLetter,
    ExchangePosition,
    Fill,
    InstrumentInfo,
    InstrumentType,
    Positions,
    Report,
    ReportStatus,
    Snapshot,
    Tick,
)
from services.common.streams import Names
from services.portfolio import closures
from services.portfolio.app import build
from tests.support import (
    ServiceProcess,
    eventually,
    in_process,
    read_stream,
    settings_for,
    write_config,
    xadd,
)

PERP = "BTC-PERPETUAL"
PERP_INFO = InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                           tick_size=1.0, volume_tick_size=0.001, min_order_amount=0.001)


def fill(trade_id: str, side: str, amount: float, price: float, fee: float, ts: float) -> Fill:
    return Fill(trade_id=trade_id, order_id="O" + trade_id, instrument=PERP, side=side, price=price,
                amount=amount, fee=fee, fee_rate=0.0005, liquidity="taker", exchange_ts=ts, ingest_ts=ts)


def tick(mark: float, ts: float, bid: float | None = None, ask: float | None = None) -> Tick:
    return Tick(instrument=PERP, mark=mark, best_bid=bid if bid is not None else mark - 1,
                best_ask=ask if ask is not None else mark + 1, exchange_ts=ts, ingest_ts=ts)


async def last_snapshot(redis: Redis, names: Names) -> Snapshot | None:
    snaps = await read_stream(redis, names.snapshots, Snapshot)
    return snaps[-1] if snaps else None


async def settled(redis: Redis, names: Names) -> bool:
    """Every group of the portfolio has read and acked everything."""
    for stream in (names.fills, names.ticks, names.positions, names.reports):
        if not await redis.exists(stream):
            continue
        groups = await redis.xinfo_groups(stream)
        if not groups:
            return False
        for group in groups:
            if group["pending"] or (group["entries-read"] or 0) != await redis.xlen(stream):
                return False
    return True


async def test_hand_worked_snapshot_of_a_long_perpetual(redis_url: str, names: Names, redis: Redis) -> None:
    now = time.time()
    await redis.hset(names.instruments, PERP, PERP_INFO.model_dump_json())
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 3.0, now))
        await xadd(redis, names.ticks, tick(60_100.0, now, bid=60_090.0))
        await eventually(lambda: settled(redis, names))
        snap = await last_snapshot(redis, names)
    assert snap is not None
    # unrealised: (60,100 - 60,000) x 0.1 = 10.00; fees paid 3.00 -> net 7.00
    # exit at best bid 60,090: slippage (60,100 - 60,090) x 0.1 = 1.00
    # close fee: taker 5 bps x 60,090 x 0.1 = 3.0045; x buffer 1.1 = 3.30495
    # net_after_close = 7.00 - 3.30495 - 1.00 = 2.69505
    assert snap.unrealized_pnl == pytest.approx(10.0)
    assert snap.net_pnl == pytest.approx(7.0)
    assert snap.est_slippage == pytest.approx(1.0)
    assert snap.est_close_fees == pytest.approx(3.0045)
    assert snap.net_after_close == pytest.approx(2.69505)
    [position] = snap.positions
    assert position.underlying == "BTCUSD" and position.exit_price == 60_090.0


async def test_duplicate_fill_entry_is_counted_once(redis_url: str, names: Names, redis: Redis) -> None:
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        duplicate = fill("T1", "buy", 0.1, 60_000.0, 3.0, now)
        await xadd(redis, names.fills, duplicate)
        await xadd(redis, names.fills, duplicate)
        await xadd(redis, names.ticks, tick(60_000.0, now))
        await eventually(lambda: settled(redis, names))
        snap = await last_snapshot(redis, names)
    assert snap is not None and snap.positions[0].position == pytest.approx(0.1)
    assert snap.fees_paid == pytest.approx(3.0)


async def test_completed_full_closure_starts_a_new_epoch_from_zero(
    redis_url: str, names: Names, redis: Redis
) -> None:
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 0.3, now))
        await xadd(redis, names.fills, fill("T2", "sell", 0.1, 60_020.0, 0.3, now + 1))
        await xadd(redis, names.ticks, tick(60_020.0, now + 1))
        await eventually(lambda: settled(redis, names))
        before = await last_snapshot(redis, names)
        assert before is not None and before.realized_pnl == pytest.approx(2.0) and before.epoch == 0
        await xadd(redis, names.reports, Report(command_id="c1", status=ReportStatus.COMPLETED, epoch=0,
                                                fraction=1.0, ts=now + 2))
        await xadd(redis, names.reports, Report(command_id="c1", status=ReportStatus.COMPLETED, epoch=0,
                                                fraction=1.0, ts=now + 2))  # replayed report
        await eventually(lambda: settled(redis, names))
        after = await last_snapshot(redis, names)
    assert after is not None and after.epoch == 1
    assert (after.realized_pnl, after.fees_paid, after.net_pnl) == (0.0, 0.0, 0.0)


async def test_dust_left_by_a_closure_is_listed_in_the_new_epoch_and_said_once(
    redis_url: str, names: Names, redis: Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """A max-age closure of 0.1005 BTC filled 0.1 (volume tick 0.0001, minimum order 0.001): the
    0.0005 left is carried into the new epoch with its day-old `opened_ts`, valued, listed in `dust`
    and kept out of `oldest_position_ts` (the time limit would fire on it after every cool-down)."""
    monkeypatch.setattr(closures, "EPOCH_END_WAIT_SECONDS", 0.2)  # the ledger is not flat: the wait ends it
    fine = PERP_INFO.model_copy(update={"volume_tick_size": 0.0001})
    await redis.hset(names.instruments, PERP, fine.model_dump_json())
    now = time.time()
    settings = settings_for(redis_url, names)
    with caplog.at_level("INFO", logger="services.portfolio.app"):
        async with in_process(build, settings, "portfolio"):
            await xadd(redis, names.fills, fill("T1", "buy", 0.1005, 60_000.0, 0.3, now - 90_000))
            await xadd(redis, names.ticks, tick(60_020.0, now))
            await eventually(lambda: settled(redis, names))
            before = await last_snapshot(redis, names)
            assert before is not None and before.dust is None and before.oldest_position_ts == now - 90_000
            await xadd(redis, names.fills, fill("T2", "sell", 0.1, 60_020.0, 0.3, now + 1))
            await xadd(redis, names.reports, Report(command_id="e0-max_age-s2-n1", epoch=0, fraction=1.0,
                                                    status=ReportStatus.COMPLETED, ts=now + 2))

            async def new_epoch() -> bool:
                snap = await last_snapshot(redis, names)
                return snap is not None and snap.epoch == 1

            await eventually(new_epoch)
            await xadd(redis, names.ticks, tick(60_030.0, now + 3))
            await eventually(lambda: settled(redis, names))
            after = await last_snapshot(redis, names)
    assert after is not None and after.epoch == 1
    assert after.dust == [PERP] and after.open_positions == 1 and after.oldest_position_ts is None
    [row] = after.positions  # the tick moved its row: the delta carries it
    assert row.position == pytest.approx(0.0005)
    assert after.unrealized_pnl == pytest.approx(10.0 * 0.0005)  # re-based at 60,020, marked 60,030
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("DUST")]
    assert len(said) == 1 and "BTC-PERPETUAL 0.0005 (minimum order 0.001, volume tick 0.0001)" in said[0]
    messages = [r.getMessage() for r in caplog.records]
    assert not any("is not flat" in m for m in messages)  # dust is no missing fill: nothing to heal
    assert any("only dust is left (BTC-PERPETUAL): epoch 1 begins with it" in m for m in messages)


async def test_a_cancel_only_commands_completed_ends_no_epoch(
    redis_url: str, names: Names, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the circuit breaker is open the emergency stop judges this epoch's net P&L: a cancel-only
    command closed nothing, so its `completed` must not re-base the open position nor forget the fee."""
    monkeypatch.setattr(closures, "EPOCH_END_WAIT_SECONDS", 0.2)  # a full closure's wait, shortened
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 0.3, now))
        await xadd(redis, names.ticks, tick(60_020.0, now))
        await eventually(lambda: settled(redis, names))
        await xadd(redis, names.reports, Report(command_id="e0-circuit_breaker-s2-n1",
                                                status=ReportStatus.COMPLETED, epoch=0, fraction=1.0,
                                                ts=now + 1))
        await eventually(lambda: settled(redis, names))
        await asyncio.sleep(1.5)  # past the shortened wait, and the timer that ends an epoch after it
        await xadd(redis, names.ticks, tick(60_030.0, now + 2))
        await eventually(lambda: settled(redis, names))
        after = await last_snapshot(redis, names)
    assert after is not None and after.epoch == 0
    # unrealised (60,030 - 60,000) x 0.1 = 3.00, less the 0.30 fee: net 2.70, the open position kept
    assert after.fees_paid == pytest.approx(0.3) and after.net_pnl == pytest.approx(2.7)
    assert [(p.instrument, p.position, p.avg_entry) for p in after.positions] == [(PERP, 0.1, 60_000.0)]


async def test_a_ledger_seeded_from_the_exchange_survives_a_restart_before_any_fill(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """Seeded at a first start, then restarted before any fill (a dated book can go days without one):
    the restart restores the seed instead of seeding again from a newer `tp:positions`, which would
    re-date the position (the time limit pushed back) and move the loss baseline to today's mark."""
    def exchange_says(mark: float, ts: float) -> Positions:
        return Positions(positions=[ExchangePosition(instrument=PERP, position=0.5, mark_price=mark,
                                                     average_price=60_000.0, realised_pnl=0.0,
                                                     unrealised_pnl=(mark - 60_000.0) * 0.5)],
                         exchange_ts=ts, ingest_ts=ts)

    now = time.time()
    await redis.hset(names.instruments, PERP, PERP_INFO.model_dump_json())
    await xadd(redis, names.positions, exchange_says(60_000.0, now))
    settings = settings_for(redis_url, names, portfolio={"baseline": "mark_at_start"})
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.ticks, tick(59_000.0, time.time()))
        await eventually(lambda: settled(redis, names))
        first = await last_snapshot(redis, names)
    await xadd(redis, names.positions, exchange_says(59_000.0, time.time()))  # ingest's next report
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.ticks, tick(58_900.0, time.time()))
        await eventually(lambda: settled(redis, names))
        second = await last_snapshot(redis, names)
    assert first is not None and second is not None
    # valued from the mark at the first start, 60,000: (59,000 - 60,000) x 0.5 = -500, then
    # (58,900 - 60,000) x 0.5 = -550 — not (58,900 - 59,000) x 0.5 = -50 from a second seed
    assert first.unrealized_pnl == pytest.approx(-500.0)
    assert second.unrealized_pnl == pytest.approx(-550.0)
    assert second.oldest_position_ts == first.oldest_position_ts


async def test_drift_is_reported_then_healed(redis_url: str, names: Names, redis: Redis) -> None:
    now = time.time()
    settings = settings_for(redis_url, names, portfolio={"drift_grace_seconds": 0.2})
    exchange = Positions(positions=[ExchangePosition(instrument=PERP, position=0.2, mark_price=60_000.0,
                                                     average_price=59_000.0)], exchange_ts=now, ingest_ts=now)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.ticks, tick(60_000.0, now))
        await xadd(redis, names.positions, exchange)
        await asyncio.sleep(0.3)
        await xadd(redis, names.positions, exchange.model_copy(update={"exchange_ts": now + 0.3}))
        await eventually(lambda: settled(redis, names))
        drifted = await last_snapshot(redis, names)
        assert drifted is not None and [d.instrument for d in drifted.drift] == [PERP]
        assert drifted.positions[0].position == pytest.approx(0.2), "the exchange's position is adopted"
        await xadd(redis, names.positions, exchange.model_copy(update={"exchange_ts": now + 0.5}))
        await eventually(lambda: settled(redis, names))
        healed = await last_snapshot(redis, names)
    assert healed is not None and healed.drift == []


async def test_reports_and_agreeing_positions_neither_publish_nor_checkpoint(
        redis_url: str, names: Names, redis: Redis) -> None:
    """While the executor closes, its reports and the exchange's agreeing portfolio change no figure:
    no snapshot wakes take-profit for nothing, no checkpoint is rewritten; a disagreement still is."""
    now = time.time()
    settings = settings_for(redis_url, names, portfolio={"drift_grace_seconds": 60.0})
    agreeing = Positions(positions=[ExchangePosition(instrument=PERP, position=0.1, mark_price=60_000.0,
                                                     average_price=60_000.0)], exchange_ts=now, ingest_ts=now)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 0.3, now))
        await xadd(redis, names.ticks, tick(60_000.0, now))
        await eventually(lambda: settled(redis, names))
        snapshots, checkpoint = (
            await redis.xlen(names.snapshots),
            await redis.get(names.key("portfolio:ledger")),
        )

        await xadd(redis, names.positions, agreeing)
        for status in (ReportStatus.RECEIVED, ReportStatus.ORDERS_CANCELLED, ReportStatus.ORDER_SENT):
            await xadd(
                redis, names.reports, Report(command_id="c1", status=status, epoch=0, fraction=1.0, ts=now)
            )
        await eventually(lambda: settled(redis, names))
        assert await redis.xlen(names.snapshots) == snapshots
        assert await redis.get(names.key("portfolio:ledger")) == checkpoint

        # the exchange disagrees: the disagreement's start is checkpointed (it survives a restart)
        await xadd(
            redis,
            names.positions,
            agreeing.model_copy(
                update={
                    "positions": [agreeing.positions[0].model_copy(update={"position": 0.3})],
                    "exchange_ts": now + 1,
                }
            ),
        )
        await eventually(lambda: settled(redis, names))
        assert await redis.get(names.key("portfolio:ledger")) != checkpoint
        assert await redis.xlen(names.snapshots) == snapshots + 1


async def test_a_watch_list_tick_publishes_no_snapshot(redis_url: str, names: Names, redis: Redis) -> None:
    """A price of an instrument never traded this epoch changes no figure; it is kept for later."""
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 0.3, now))
        await xadd(redis, names.ticks, tick(60_000.0, now))
        await eventually(lambda: settled(redis, names))
        snapshots = await redis.xlen(names.snapshots)
        await xadd(redis, names.ticks, Tick(instrument="ETH-PERPETUAL", mark=3_500.0, best_bid=3_499.5,
                                            best_ask=3_500.5, exchange_ts=now + 1, ingest_ts=now + 1))
        await eventually(lambda: settled(redis, names))
        assert await redis.xlen(names.snapshots) == snapshots
        assert await redis.hexists(names.key("portfolio:ticks"), "ETH-PERPETUAL")
        await xadd(redis, names.ticks, tick(60_050.0, now + 2))
        await eventually(lambda: settled(redis, names))
        assert await redis.xlen(names.snapshots) == snapshots + 1


async def test_malformed_fill_is_dead_lettered_and_service_goes_on(
    redis_url: str, names: Names, redis: Redis
) -> None:
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await redis.xadd(names.fills, {"__data__": '{"v": 1, "trade_id": "T9", "amount": "NaN"}'})
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 0.3, now))
        await eventually(lambda: settled(redis, names))
        snap = await last_snapshot(redis, names)
    [letter] = await read_stream(redis, names.deadletter, DeadLetter)
    assert letter.service == "portfolio" and "Fill invalid" in letter.error
    assert snap is not None and snap.positions[0].position == pytest.approx(0.1)


def script(seed: int, now: float) -> list[tuple[str, Fill | Tick]]:
    """A reproducible stream of fills and ticks on one perpetual."""
    rng = random.Random(seed)
    steps: list[tuple[str, Fill | Tick]] = []
    mark = 60_000.0
    for i in range(600):
        mark += rng.choice((-5.0, 5.0))
        if rng.random() < 0.3:
            side = rng.choice(("buy", "sell"))
            steps.append(
                ("fills", fill(f"T{i}", side, rng.choice((0.001, 0.002, 0.005)), mark, 0.01, now + i * 0.001))
            )
        steps.append(("ticks", tick(mark, now + i * 0.001)))
    return steps


MONEY_FIELDS = (
    "realized_pnl",
    "unrealized_pnl",
    "funding_pnl",
    "fees_paid",
    "est_close_fees",
    "est_slippage",
    "gross_pnl",
    "net_pnl",
    "net_after_close",
)


async def test_kill_9_mid_stream_and_restart_gives_the_uninterrupted_snapshot(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    now = time.time()
    steps = script(7, now)
    reference_names = Names(names.namespace + "ref")
    # the uninterrupted run, in-process
    async with in_process(build, settings_for(redis_url, reference_names), "portfolio"):
        for stream, doc in steps:
            await xadd(redis, reference_names.key(stream), doc)
        await eventually(lambda: settled(redis, reference_names), within=30)
        reference = await last_snapshot(redis, reference_names)
    # the same inputs, with the service killed -9 twice while it works
    config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names, portfolio={"batch_size": 20}))
    process = ServiceProcess("portfolio", config, tmp_path / "portfolio.log")
    process.start()
    try:
        for chunk in (steps[:300], steps[300:600], steps[600:]):
            seen = await redis.xlen(names.snapshots)
            for stream, doc in chunk:
                await xadd(redis, names.key(stream), doc)

            async def working(seen: int = seen) -> bool:
                return await redis.xlen(names.snapshots) > seen + 2

            await eventually(working, within=30, interval=0.001)
            process.kill()  # mid-stream: the rest of the chunk is unread or read-but-unacked
            process.start()
        await eventually(lambda: settled(redis, names), within=30)
        final = await last_snapshot(redis, names)
    finally:
        process.stop()
        async for key in redis.scan_iter(match=f"{reference_names.namespace}:*"):
            await redis.delete(key)
    assert reference is not None and final is not None, process.log()
    for name in MONEY_FIELDS:
        assert getattr(final, name) == pytest.approx(getattr(reference, name), rel=1e-9, abs=1e-9), name
    assert [(p.instrument, p.position) for p in final.positions] == [
        (p.instrument, p.position) for p in reference.positions
    ]


async def test_epoch_ends_only_when_the_closing_fills_are_in(
    redis_url: str, names: Names, redis: Redis
) -> None:
    """The executor's `completed` may overtake its fills through ingest: the exit's P&L stays in its epoch."""
    now = time.time()
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        await xadd(redis, names.fills, fill("T1", "buy", 0.1, 60_000.0, 0.3, now))
        await xadd(redis, names.ticks, tick(60_020.0, now))
        await eventually(lambda: settled(redis, names))
        await xadd(redis, names.reports, Report(command_id="c1", status=ReportStatus.COMPLETED, epoch=0,
                                                fraction=1.0, ts=now + 1))
        await eventually(lambda: settled(redis, names))
        waiting = await last_snapshot(redis, names)
        assert waiting is not None and waiting.epoch == 0, "not flat yet: the epoch must not end"
        await xadd(redis, names.fills, fill("T2", "sell", 0.1, 60_020.0, 0.3, now + 1))
        await eventually(lambda: settled(redis, names))
        snaps = await read_stream(redis, names.snapshots, Snapshot)
    closing = [s for s in snaps if s.epoch == 0][-1]
    # the exit realised (60,020 - 60,000) x 0.1 = 2.00 minus 0.60 fees, in epoch 0
    assert closing.realized_pnl == pytest.approx(2.0) and closing.net_pnl == pytest.approx(1.4)
    assert snaps[-1].epoch == 1 and snaps[-1].net_pnl == 0.0 and snaps[-1].positions == []
