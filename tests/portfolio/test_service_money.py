"""The portfolio service and the exchange's own figures: settlements checkpointed, estimates flagged,
an option re-valued on its underlying's index (real Redis, the service in process)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.common.contracts import Fill, InstrumentInfo, InstrumentType, Snapshot, Tick
from services.common.streams import Names
from services.portfolio.app import build
from tests.portfolio.test_service import PERP, PERP_INFO, last_snapshot, settled
from tests.support import eventually, in_process, read_stream, settings_for, xadd

SETTLEMENT = 1_704_096_000.0
"""2024-01-01 08:00 UTC."""
CALL = "BTC-27DEC24-100000-C"
CALL_INFO = InstrumentInfo(type=InstrumentType.OPTION, product="OBTCUSD", underlying="BTCUSD", tick_size=5.0,
                           volume_tick_size=0.01, min_order_amount=0.01, expiry_ts=1_735_286_400.0)


def perp_tick(funding_mark: float, ts: float) -> Tick:
    return Tick(instrument=PERP, mark=50_000, best_bid=49_999, best_ask=50_001, funding_mark=funding_mark,
                exchange_ts=ts, ingest_ts=ts)


async def test_a_settlement_booked_on_a_tick_survives_a_restart(
    redis_url: str, names: Names, redis: Redis
) -> None:
    await redis.hset(names.instruments, PERP, PERP_INFO.model_dump_json())
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        opened = SETTLEMENT - 100
        await xadd(redis, names.fills, Fill(trade_id="T1", instrument=PERP, side="buy", price=50_000,
                                            amount=1, fee=25.0, funding_mark=0.5, exchange_ts=opened,
                                            ingest_ts=opened))
        await xadd(redis, names.ticks, perp_tick(3.0, SETTLEMENT - 1))
        await eventually(lambda: settled(redis, names))
        await xadd(redis, names.ticks, perp_tick(0.01, SETTLEMENT + 1))
        await eventually(lambda: settled(redis, names))
        snap = await last_snapshot(redis, names)
    # settled at 3.0: 3.0 * 1 - 0.5 = 2.5 realised; then 0.01 * 1 - 0 = 0.01 unrealised
    assert snap is not None and snap.funding_pnl == pytest.approx(2.51)
    async with in_process(build, settings, "portfolio"):  # the settlement was checkpointed with its tick
        await xadd(redis, names.ticks, perp_tick(0.02, SETTLEMENT + 2))
        await eventually(lambda: settled(redis, names))
        snap = await last_snapshot(redis, names)
    # not settled again (at the fill's 0.5 the checkpoint would have held without it): 2.5 + 0.02
    assert snap is not None and snap.funding_pnl == pytest.approx(2.52)


async def test_an_estimated_fee_is_flagged_and_an_index_tick_reprices_an_option(
    redis_url: str, names: Names, redis: Redis
) -> None:
    await redis.hset(names.instruments, CALL, CALL_INFO.model_dump_json())
    settings = settings_for(redis_url, names)
    async with in_process(build, settings, "portfolio"):
        # a trade that reported no fee: 2.5 bps of its index notional 1 * 100000 = 25, flagged
        await xadd(redis, names.fills, Fill(trade_id="T1", instrument=CALL, side="buy", price=2_500, amount=1,
                                            index=100_000, exchange_ts=1.0, ingest_ts=1.0))
        await xadd(redis, names.ticks, Tick(instrument=CALL, mark=2_600, best_bid=2_590, exchange_ts=2.0,
                                            ingest_ts=2.0))
        await eventually(lambda: settled(redis, names))
        before = await last_snapshot(redis, names)
        await xadd(redis, names.ticks, Tick(instrument="BTCUSD", mark=100_000, index=100_000, exchange_ts=3.0,
                                            ingest_ts=3.0))
        await eventually(lambda: settled(redis, names))
        snaps = await read_stream(redis, names.snapshots, Snapshot)
    assert before is not None and before.fees_paid == pytest.approx(25.0)
    assert before.fees_estimated == pytest.approx(25.0)
    # the option's tick has no index: its premium, 2.5 bps of 2600 = 0.65 ...
    assert before.est_close_fees == pytest.approx(0.65)
    # ... until the underlying's index arrives: 2.5 bps of 100000 = 25, in a snapshot of its own
    assert snaps[-1].est_close_fees == pytest.approx(25.0) and snaps[-1].seq == before.seq + 1
