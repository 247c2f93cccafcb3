"""Across the `tp:commands` v2 upgrade (the legs as columns): a command the old take-profit wrote
(v1, one object per leg) and that is still in flight — pending in the group, or claimed by the old
executor before it was replaced — is verified on its own form and closed by the new executor."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.common.contracts import Command, PositionToClose, ReportStatus, Side
from services.common.streams import Names
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import PERP, account_positions, make_command, make_settings, open_positions
from tests.executor.test_decision_wave import best_bid, closed_recording, resumed_from_compact_claim


def as_v1(command: Command) -> Command:
    """The same command as take-profit wrote it before v2: `positions`, one object per leg."""
    rows = [PositionToClose(**leg._asdict()) for leg in command.closing().rows()]
    v1 = Command.model_validate({**command.model_dump(exclude={"legs"}), "v": 1, "positions": rows})
    assert v1.legs is None and v1.closing() == command.closing()
    return v1


async def test_a_fresh_v1_command_is_closed_priced_from_the_command(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.3})
    exit_price = best_bid(paper)
    command = as_v1(make_command({PERP: 0.3}, exit_prices={PERP: exit_price}))
    settings = make_settings(redis_url, names, paper, trader)
    got, events = await closed_recording(redis, names, settings, command)
    assert account_positions(paper)[PERP] == 0
    requests = [name for name, *_ in events]
    before_first = requests[:requests.index("insert:sent")]
    assert "ticker:sent" not in before_first  # its exit price and mark carried the first wave
    sent = next(r for r in got if r.status is ReportStatus.ORDER_SENT)
    (order,) = sent.orders or []
    # a sell 0.5 % through the exit price, rounded up to the 1.0 tick
    assert (order.instrument, order.side, order.amount) == (PERP, Side.SELL, 0.3)
    assert order.price == pytest.approx(-(-exit_price * 0.995 // 1.0))


async def test_a_v1_command_the_old_executor_claimed_is_resumed_and_closed(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """Claimed (compact) before the executor was replaced: the new one prices the same wave again
    from the v1 command's legs and closes the rest as after any restart."""
    await open_positions(paper, {PERP: 0.2})
    command = as_v1(make_command({PERP: 0.2}, exit_prices={PERP: best_bid(paper)}))
    got = await resumed_from_compact_claim(redis, names, make_settings(redis_url, names, paper, trader),
                                           command)
    statuses = [r.status for r in got]
    assert statuses[:2] == [ReportStatus.RECEIVED, ReportStatus.ORDER_SENT], statuses
    assert got[-1].status is ReportStatus.COMPLETED and account_positions(paper)[PERP] == 0
