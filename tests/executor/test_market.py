"""The executor's reads and its session set-up, as api.yaml lets Thalex answer them: a trade the history
lists without `fee`, instrument data asked through a command's retrying `ask`, the message rate granted.

Unit tests against fake answers first, then the same against the paper exchange.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from redis.asyncio import Redis

from services.common.contracts import InstrumentInfo, ReportStatus
from services.common.streams import Names
from services.common.thalex import ConnectionLost
from services.common.thalex.pacing import OrderPacer
from services.executor.exchange import TradingSession, order_rate
from services.executor.market import INSTRUMENT_REQUESTS_AT_ONCE, Market
from services.executor.plan import LegFill, LegState, Stage
from services.executor.settle import count_trades, verify_flat
from services.paper import accounts
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    NO_CLEARING,
    PERP,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    send,
    wait_outcome,
)
from tests.executor.test_waves import progress_of, spec

NOW = 1_630_059_860.0


def api_yaml_trade(label: str) -> dict[str, Any]:
    """The first trade of api.yaml's `private/trade_history` result example (no `fee`), with our label."""
    return {"order_id": "00011E570000004A", "trade_id": "0080000000000000169F22D05B785A2B",
            "instrument_name": "A", "direction": "sell", "price": 47280, "amount": 0.1, "label": label,
            "time": 1630059868.4145653, "position_after": 1.1, "trade_type": "normal", "leg_index": 0}


def market() -> Market:
    return Market(SimpleNamespace(), SimpleNamespace(instruments="tp:instruments"),  # type: ignore[arg-type]
                  SimpleNamespace())  # type: ignore[arg-type]


def history(*trades: dict[str, Any]) -> Any:
    async def ask(method: str, *args: Any, **kwargs: Any) -> Any:
        assert method == "trade_history"
        return {"trades": list(trades)}
    return ask


async def test_a_trade_the_history_lists_without_fee_is_counted_with_its_fee_unknown() -> None:
    """Before, `fee` was required: the answer was malformed, the command `failed` with its legs open."""
    progress = progress_of({"A": 0.1})
    found = await market().trades_of(history(api_yaml_trade(progress.label)), progress)
    (report,) = count_trades(progress, found, NOW)
    assert (report.status, report.order_id, report.filled, report.avg_price) == (
        ReportStatus.FILLED, "00011E570000004A", 0.1, 47280.0)
    assert report.fee is None  # unknown, not 0
    assert progress.legs["A"].closed == 0.1 and progress.total_fee() is None
    progress.legs["A"].state = LegState.CLOSED
    progress.to(Stage.VERIFYING)
    _, _, (completed,) = verify_flat(progress, {"A": 0.0}, {"A": spec()}, NOW)
    assert completed.status is ReportStatus.COMPLETED and completed.fee is None
    # a later sighting may only add the fee
    assert not progress.record_fill("A", "0080000000000000169F22D05B785A2B",
                                    LegFill(order_id="00011E570000004A", price=47280, amount=0.1, fee=0.5))
    assert progress.total_fee() == 0.5 and progress.legs["A"].closed == 0.1


async def test_a_trade_without_order_id_is_counted_too() -> None:
    progress = progress_of({"A": 0.1})
    raw = api_yaml_trade(progress.label)
    del raw["order_id"]
    (report,) = count_trades(progress, await market().trades_of(history(raw), progress), NOW)
    assert (report.order_id, report.filled) == (None, 0.1)


async def test_a_fee_told_live_is_kept_when_the_history_lists_none() -> None:
    progress = progress_of({"A": 0.1})
    reads = market()
    reads.on_trades([{**api_yaml_trade(progress.label), "fee": 0.25}])
    found = await reads.trades_of(history(api_yaml_trade(progress.label)), progress)
    (report,) = count_trades(progress, found, NOW)
    assert report.fee == 0.25 and progress.total_fee() == 0.25


async def test_instrument_data_is_asked_through_the_given_ask_a_few_at_a_time() -> None:
    """Before, every missing instrument was one unretried request, all at once."""
    wire = {"type": "option", "product": "BTC", "underlying": "BTCUSD", "tick_size": 5.0,
            "volume_tick_size": 0.01, "min_order_amount": 0.01}
    in_flight, most = 0, 0

    async def ask(method: str, name: str) -> Any:
        nonlocal in_flight, most
        assert method == "instrument"
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        return {"instrument_name": name, **wire}

    reads = market()

    async def hmget(key: str, names: list[str]) -> list[None]:
        return [None] * len(names)

    async def documents(raws: dict[str, Any]) -> dict[str, InstrumentInfo]:
        return {}

    reads.redis = SimpleNamespace(hmget=hmget)  # type: ignore[assignment]
    reads.reader = SimpleNamespace(documents=documents)  # type: ignore[assignment]
    names = [f"BTC-X{n}" for n in range(30)]
    infos = await reads.infos(ask, names)
    assert sorted(infos) == sorted(names) and infos["BTC-X0"].tick_size == 5.0
    assert most == INSTRUMENT_REQUESTS_AT_ONCE


def test_orders_are_paced_at_the_lower_of_the_configured_rate_and_the_granted_one() -> None:
    assert order_rate(45.0, 50) == 45.0
    assert order_rate(45.0, 20) == 20.0
    assert order_rate(45.0, None) == 45.0


def test_the_granted_rate_sets_the_pacer_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    session = TradingSession.__new__(TradingSession)
    session.order_rate, session._granted = 45.0, None
    session.session = SimpleNamespace(pacer=OrderPacer(45.0))  # type: ignore[assignment]
    pacer = session.session.pacer
    with caplog.at_level(logging.WARNING):
        session._pace({"message_rate": 20})
        session._pace({"message_rate": 20})  # a reconnect granting the same: not said again
        assert pacer is not None and pacer.limit == 20
        session._pace({"message_rate": 50})
        assert pacer.limit == 45
        session._pace({})  # no usable rate: the configured one, with a warning
        assert pacer.limit == 45
    grants = [r for r in caplog.records if "grants 20 order messages" in r.getMessage()]
    assert len(grants) == 1
    assert any("message_rate" in r.getMessage() for r in caplog.records)


# Against the paper exchange


async def test_a_lost_insert_answer_with_a_history_without_fees_still_completes(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The answer to the first order is lost; its trade is found by label in a history that lists no
    `fee` (as api.yaml's example), and the live notification never came: the fill is counted, its
    fee unknown, and the closure completes."""
    await open_positions(paper, {PERP: 0.2})
    await paper.control("paper/history_without_fee", {"on": True})
    command = make_command({PERP: 0.2})
    async with running_executor(make_settings(redis_url, names, paper, trader, **NO_CLEARING)) as running:
        running.executor.market.on_trades = lambda trades: []  # the fee's notification never comes
        session = running.executor.session
        real = session.request
        lost: list[str] = []

        async def request(method: str, *args: object, **kwargs: object) -> object:
            result = await real(method, *args, **kwargs)
            if method == "insert" and not lost:
                lost.append(method)
                raise ConnectionLost("the answer to the insert was lost")
            return result

        session.request = request  # type: ignore[method-assign]
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert lost and got[-1].status is ReportStatus.COMPLETED, got[-1]
    assert account_positions(paper)[PERP] == 0
    filled = [r for r in got if r.status is ReportStatus.FILLED]
    assert filled and sum(r.filled or 0.0 for r in filled) == pytest.approx(0.2)
    assert filled[0].fee is None and got[-1].fee is None  # unknown, and said so


async def test_instrument_data_missing_from_redis_is_asked_again_through_a_temporary_failure(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """`tp:instruments` lacks the instrument and `public/instrument` fails twice with code 20: the
    command's `ask` retries it, and the closure completes (before: `failed` without an order)."""
    await open_positions(paper, {PERP: 0.1})
    assert not await redis.hexists(names.instruments, PERP)
    await paper.control("paper/fail_next", {"code": 20, "count": 2, "methods": ["public/instrument"],
                                            "message": "temporary failure"})
    command = make_command({PERP: 0.1})
    async with running_executor(make_settings(redis_url, names, paper, trader, **NO_CLEARING)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    assert account_positions(paper)[PERP] == 0
    assert (await paper.control("paper/fail_next", {"code": 20, "count": 1, "methods": ["none"]}))[
        "pending"] == 1  # both injected failures were used


async def test_the_paper_grants_its_message_rate_and_the_executor_paces_below_it(
        paper: PaperHandle, trader: KeyFiles, redis_url: str, names: Names,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A session granted 20 order messages per second paces at 20, not the configured 45."""
    monkeypatch.setattr(accounts, "ORDER_RATE_CANCEL_ON_DISCONNECT", 20)
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        pacer = running.executor.session.session.pacer
        assert running.executor.session.ready and pacer is not None and pacer.limit == 20
    monkeypatch.setattr(accounts, "ORDER_RATE_CANCEL_ON_DISCONNECT", 50)  # Thalex's (api.yaml's example)
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        pacer = running.executor.session.session.pacer
        assert pacer is not None and pacer.limit == 45  # 50 granted: the configured 45

