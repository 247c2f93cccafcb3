"""The first wave of a fresh full closure, priced from the command: no market read before the order.

Take-profit's command carries the exit price the portfolio valued each position at. For a full
closure decided less than a second ago the executor sends the clearing round with its claim (a
compact one: the promise that the first wave is priced from the command, from which the wave and
its `order_sent` follow), and sends the orders as soon as the claim is won, right behind the round
on the same connection (the exchange handles them in order). Anything else (old, partial, hedged
beyond the book's depth, replayed) takes the usual path.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from services.common.contracts import Report, ReportStatus, Side
from services.common.streams import Names
from services.executor import app
from services.executor.clearing import kinds, round_requests
from services.executor.plan import CommandWave, Progress
from services.executor.waves import Order, expand_claim
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    CLEARED,
    PERP,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    send,
    wait_outcome,
)

CANCEL_DELAY = 0.2
READS = {"ticker", "book", "portfolio"}
Events = list[tuple[str, float, tuple[Any, ...], dict[str, Any]]]
"""(request `method:sent` / `method:answered`, monotonic time, args, kwargs), in order."""


def best_bid(paper: PaperHandle) -> float:
    bids, _ = paper.exchange.market.book(PERP)
    return bids[0][0]


def recording(session: Any, events: Events, before_insert: Any = None) -> None:
    """Wrap the executor's requests: every method sent and answered, cancel_all's answer held back
    `CANCEL_DELAY` (the request itself leaves at once, so the exchange handles it in its place)."""
    real = session.request

    async def request(method: str, *args: Any, **kwargs: Any) -> Any:
        events.append((f"{method}:sent", time.monotonic(), args, kwargs))
        if method == "insert" and before_insert is not None:
            await before_insert()
        result = await real(method, *args, **kwargs)
        if method == "cancel_all":
            await asyncio.sleep(CANCEL_DELAY)
        events.append((f"{method}:answered", time.monotonic(), args, kwargs))
        return result

    session.request = request


async def closed_recording(redis: Redis, names: Names, settings: Any, command: Any,
                           before_insert: Any = None) -> tuple[list[Any], Events]:
    """Run an executor on `command` until its outcome; returns its reports and its requests."""
    events: Events = []
    started = time.time()
    async with running_executor(settings) as running:
        # the executor's start-up (seconds on a loaded machine) is not the command's age
        shift = time.time() - started
        command = command.model_copy(update={"created_ts": command.created_ts + shift,
                                             "deadline_ts": command.deadline_ts + shift})
        recording(running.executor.session, events, before_insert)
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    return got, events


async def resumed_from_compact_claim(redis: Redis, names: Names, settings: Any, command: Any) -> list[Any]:
    """The command's reports when an executor finds the compact claim a crashed one left (written here
    as `execute` writes it) and resumes it to its outcome."""
    promise = CommandWave(priced_ts=command.created_ts + 0.001, buffer=0.005, ceiling=0.05)
    claim = Progress.claimed(command, command.created_ts + 0.002, 20.0, promise)
    await redis.set(names.key(f"executor:progress:{command.command_id}"), claim.model_dump_json())
    async with running_executor(settings):
        await send(redis, names, command)
        return await wait_outcome(redis, names, command.command_id)


async def test_a_fresh_full_command_is_priced_from_its_exit_price_without_reading_the_market(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.5})
    exit_price = best_bid(paper)
    command = make_command({PERP: 0.5}, exit_prices={PERP: exit_price})
    at_insert: list[tuple[Progress, list[ReportStatus]]] = []

    async def saved_before_insert() -> None:
        if not at_insert:  # progress and reports read in one transaction: the executor's save may run now
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(names.key(f"executor:progress:{command.command_id}"))
                pipe.xrange(names.reports)
                raw, rows = await pipe.execute()
            assert raw is not None, "no progress in Redis before the first order"
            published = [Report.model_validate_json(fields[b"__data__"]) for _, fields in rows]
            at_insert.append((Progress.model_validate_json(raw),
                              [r.status for r in published if r.command_id == command.command_id]))

    got, events = await closed_recording(
        redis, names, make_settings(redis_url, names, paper, trader), command, saved_before_insert
    )
    assert account_positions(paper)[PERP] == 0
    # (instrument metadata is asked once per instrument and cached; it is not the market)
    events = [e for e in events if not e[0].startswith("instrument:")]
    names_in_order = [name for name, *_ in events]
    first_insert = names_in_order.index("insert:sent")
    # the whole clearing round leaves first, on the same connection (handled in order by the exchange),
    # and the first order right behind it, without waiting for the answers
    round_sent = [f"{method}:sent" for _, method in round_requests(kinds(True, True, True, True))]
    assert names_in_order[:len(round_sent)] == round_sent
    assert first_insert < names_in_order.index("cancel_all:answered"), "the order waited for the answers"
    assert not {n.split(":")[0] for n in names_in_order[:first_insert]} & READS, names_in_order[:first_insert]
    # priced from the command: a sell 0.5 % through the exit price, rounded up to the 1.0 tick
    _, _, args, kwargs = events[first_insert]
    assert args[1:3] == (PERP, 0.5) and kwargs["reduce_only"] is True
    assert kwargs["price"] == pytest.approx(-(-exit_price * 0.995 // 1.0))
    # the intent was in Redis before the order left: the compact claim, promising the wave priced from
    # the command (its legs, `received` and `order_sent` follow from the command and the promise; the
    # save that goes out with the order writes them), or already the full progress
    progress, statuses = at_insert[0]
    if progress.command_wave is not None:
        assert progress.legs == {} and statuses == [] and progress.command_wave.buffer == 0.005
        expand_claim(progress, command, [Order(PERP, Side.SELL, 0.5, kwargs["price"])])
    assert progress.legs[PERP].orders_sent == 1
    assert statuses + [r.status for r in progress.take_unpublished()] in (
        [ReportStatus.RECEIVED, ReportStatus.ORDER_SENT],
        [ReportStatus.RECEIVED, ReportStatus.ORDER_SENT, *CLEARED])
    assert [r.status for r in got] == [
        ReportStatus.RECEIVED,
        ReportStatus.ORDER_SENT,
        *CLEARED,
        ReportStatus.FILLED,
        ReportStatus.COMPLETED,
    ]


async def test_an_exit_price_the_market_left_behind_is_closed_by_the_next_wave(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The bid fell 3 % after the decision: the first IOC sell fills nothing, the next one (read fresh) does,
    at the base buffer (a miss of the decision's price says nothing about the buffer)."""
    await open_positions(paper, {PERP: 0.2})
    bid = best_bid(paper)
    command = make_command({PERP: 0.2}, exit_prices={PERP: bid * 1.03})
    got, events = await closed_recording(
        redis, names, make_settings(redis_url, names, paper, trader), command
    )
    assert account_positions(paper)[PERP] == 0
    inserts = [kwargs["price"] for name, _, _, kwargs in events if name == "insert:sent"]
    assert len(inserts) == 2 and inserts[0] == pytest.approx(-(-bid * 1.03 * 0.995 // 1.0))
    assert inserts[1] == pytest.approx(-(-bid * 0.995 // 1.0))
    assert [r.filled for r in got if r.status is ReportStatus.PARTIALLY_FILLED] == [0.0]


async def test_a_position_that_changed_sign_since_the_decision_is_still_closed(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The decision saw a long; the exchange holds a short (fills raced the halt): the reduce-only sell
    is rejected, and the next wave, read from the exchange, buys the short back."""
    await open_positions(paper, {PERP: -0.2})
    command = make_command({PERP: 0.2}, exit_prices={PERP: best_bid(paper)})
    _, events = await closed_recording(redis, names, make_settings(redis_url, names, paper, trader), command)
    assert account_positions(paper)[PERP] == 0
    sides = [args[0].value for name, _, args, _ in events if name == "insert:sent"]
    assert sides == ["sell", "buy"]


@pytest.mark.parametrize("kind", ["old", "partial", "no exit price", "exit far through the book"])
async def test_any_other_command_reads_the_market_before_its_first_order(
        kind: str, paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.4})
    bid = best_bid(paper)
    exit_prices = None if kind == "no exit price" else {PERP: bid}
    # 5 % below the mark: deeper than max_close_price_buffer (5 %) less close_price_buffer allows
    marks = {PERP: bid / 0.95} if kind == "exit far through the book" else None
    command = make_command(
        {PERP: 0.4},
        exit_prices=exit_prices,
        marks=marks,
        age=5.0 if kind == "old" else 0.0,
        fraction=0.5 if kind == "partial" else 1.0,
    )
    got, events = await closed_recording(
        redis, names, make_settings(redis_url, names, paper, trader), command
    )
    names_in_order = [name for name, *_ in events if not name.startswith("instrument:")]
    assert "ticker:sent" in names_in_order[:names_in_order.index("insert:sent")]
    assert [r.status for r in got][:6] == [ReportStatus.RECEIVED, *CLEARED, ReportStatus.ORDER_SENT]
    # one clearing round before the first order on every path; a fresh full closure's goes out with its
    # claim, first, and its wave is checked while both are on the way: found not priceable, the usual
    # path takes that round
    assert names_in_order[:names_in_order.index("insert:sent")].count("cancel_all:sent") == 1
    if kind in ("no exit price", "exit far through the book"):
        round_sent = [f"{method}:sent" for _, method in round_requests(kinds(True, True, True, True))]
        assert names_in_order[:len(round_sent)] == round_sent


async def test_a_replayed_fresh_command_cancels_nothing(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """A replay within the second that makes a command fresh: this executor has seen it, no early cancel."""
    await open_positions(paper, {PERP: 0.2})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        # dated once the executor is up: its start-up on a loaded machine is not the command's age
        command = make_command({PERP: 0.2}, exit_prices={PERP: best_bid(paper)})
        await send(redis, names, command)
        await wait_outcome(redis, names, command.command_id)
        before = len((await paper.control("paper/order_log", {"key_id": "trader"}))["orders"])
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id, count=2)
    assert time.time() - command.created_ts < 1.0, (
        "the replay must have been fresh for this test to mean anything"
    )
    assert got[-1].status is ReportStatus.DUPLICATE
    assert len((await paper.control("paper/order_log", {"key_id": "trader"}))["orders"]) == before


async def test_a_refused_cancel_all_fails_the_command_after_the_wave_that_went_with_it_is_counted(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The first order does not wait for `cancel_all`'s answer: when the answer is a refusal (the
    round sent with the claim, and its retry), the order has filled already. Its fill is counted and
    the command still ends `failed`, naming the refusal: the account was not cleared."""
    await open_positions(paper, {PERP: 0.2})
    await paper.control("paper/fail_next", {"code": 7, "count": 2, "methods": ["private/cancel_all"],
                                            "key_id": "trader", "message": "not permitted"})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        command = make_command({PERP: 0.2}, exit_prices={PERP: best_bid(paper)})
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    statuses = [r.status for r in got]
    assert statuses[:2] == [ReportStatus.RECEIVED, ReportStatus.ORDER_SENT]
    assert ReportStatus.FILLED in statuses and statuses[-1] is ReportStatus.FAILED
    assert statuses.index(ReportStatus.FILLED) < statuses.index(ReportStatus.FAILED)
    error = got[-1].error
    assert error is not None and error.code == 7 and "not permitted" in error.message
    assert account_positions(paper)[PERP] == 0


async def test_reports_a_crash_left_in_the_outbox_are_published_when_the_command_resumes(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """Killed between the claim and the first save: the progress holds `received` and `order_sent`."""
    await open_positions(paper, {PERP: 0.2})
    command = make_command({PERP: 0.2}, exit_prices={PERP: best_bid(paper)})
    progress = Progress.start(command, time.time(), 0.005, 20.0)
    progress.outbox = [progress.report(ReportStatus.RECEIVED, time.time()),
                       progress.report(ReportStatus.ORDER_SENT, time.time(), instrument=PERP, amount=0.2)]
    await redis.set(names.key(f"executor:progress:{command.command_id}"), progress.model_dump_json())
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    statuses = [r.status for r in got]
    assert (
        statuses[:2] == [ReportStatus.RECEIVED, ReportStatus.ORDER_SENT]
        and got[-1].status is ReportStatus.COMPLETED
    )
    assert statuses.count(ReportStatus.RECEIVED) == 1
    assert account_positions(paper)[PERP] == 0
    saved = Progress.model_validate_json(
        await redis.get(names.key(f"executor:progress:{command.command_id}"))
    )
    assert saved.outbox == [] and saved.unreported == []


async def test_a_crash_after_the_compact_claim_resumes_from_the_same_wave_priced_again(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """Killed after the claim, before the save that goes out with the orders: Redis holds only the
    promise. The restarted executor prices the same wave from the command (its `order_sent`, once,
    after `received`), counts what its orders did by label, and closes the rest as after any crash."""
    await open_positions(paper, {PERP: 0.2})
    exit_price = best_bid(paper)
    command = make_command({PERP: 0.2}, exit_prices={PERP: exit_price})
    settings = make_settings(redis_url, names, paper, trader)
    got = await resumed_from_compact_claim(redis, names, settings, command)
    statuses = [r.status for r in got]
    assert statuses[:2] == [ReportStatus.RECEIVED, ReportStatus.ORDER_SENT], statuses
    assert statuses.count(ReportStatus.RECEIVED) == 1 and got[-1].status is ReportStatus.COMPLETED
    (promised,) = got[1].orders or []
    # the wave the claim promised: a sell 0.5 % through the exit price, rounded up to the 1.0 tick
    assert (promised.instrument, promised.side, promised.amount) == (PERP, Side.SELL, 0.2)
    assert promised.price == pytest.approx(-(-exit_price * 0.995 // 1.0))
    assert account_positions(paper)[PERP] == 0
    saved = Progress.model_validate_json(
        await redis.get(names.key(f"executor:progress:{command.command_id}"))
    )
    assert saved.command_wave is None and saved.legs[PERP].position_before == 0.2


@pytest.mark.parametrize("priceable", [True, False])
async def test_the_first_wave_is_checked_while_the_claim_and_the_clearing_round_are_on_their_way(
        priceable: bool, monkeypatch: pytest.MonkeyPatch, paper: PaperHandle, trader: KeyFiles, redis: Redis,
        redis_url: str, names: Names) -> None:
    """The check walks every leg (milliseconds at 1,000 legs): the claim's request and the whole round
    are written before it runs, so it costs the first order nothing but what outlasts the claim's
    round trip — whether the wave is then priced from the command or not."""
    await open_positions(paper, {PERP: 0.2})
    events: Events = []
    checked = app.wave_refusal

    def checking(*args: Any, **kwargs: Any) -> str | None:
        events.append(("checked", time.monotonic(), (), {}))
        return checked(*args, **kwargs)

    monkeypatch.setattr(app, "wave_refusal", checking)
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        store = running.executor.store
        acquire = store._acquire

        async def claiming(*args: Any, **kwargs: Any) -> Any:
            events.append(("claim:sent", time.monotonic(), (), {}))
            return await acquire(*args, **kwargs)

        store._acquire = claiming  # type: ignore[method-assign]
        recording(running.executor.session, events)
        bid = best_bid(paper)
        command = make_command({PERP: 0.2}, exit_prices={PERP: bid},
                               marks=None if priceable else {PERP: bid / 0.95})
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    names_in_order = [name for name, *_ in events if not name.startswith("instrument:")]
    round_sent = [f"{method}:sent" for _, method in round_requests(kinds(True, True, True, True))]
    assert names_in_order[:len(round_sent) + 1] == ["claim:sent", *round_sent], names_in_order
    assert names_in_order.index("checked") > len(round_sent)  # (here after the instrument's first read)
    assert names_in_order.count("claim:sent") == 1 and names_in_order.count("checked") == 1
    # priced from the command, the order leaves before the round is answered; else the market is read first
    first_insert = names_in_order.index("insert:sent")
    assert (first_insert < names_in_order.index("cancel_all:answered")) is priceable
    assert ("ticker:sent" in names_in_order[:first_insert]) is not priceable
    assert [r.status for r in got].count(ReportStatus.RECEIVED) == 1


async def test_a_crash_after_a_compact_claim_whose_wave_was_refused_closes_by_the_usual_path(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """The claim went out compact, the check then refused the wave (its exit price far through the
    book), and the executor died before the usual path's first save. Resumed, the wave is refused
    again: nothing says whether it left, so every leg counts as sent and the executor finds out from
    the exchange (no trade, no order under the command's label) before the usual waves close it."""
    await open_positions(paper, {PERP: 0.2})
    bid = best_bid(paper)
    command = make_command({PERP: 0.2}, exit_prices={PERP: bid}, marks={PERP: bid / 0.95})
    settings = make_settings(redis_url, names, paper, trader)
    got = await resumed_from_compact_claim(redis, names, settings, command)
    statuses = [r.status for r in got]
    assert statuses[0] is ReportStatus.RECEIVED and statuses.count(ReportStatus.RECEIVED) == 1, statuses
    assert got[-1].status is ReportStatus.COMPLETED
    assert account_positions(paper)[PERP] == 0
    saved = Progress.model_validate_json(
        await redis.get(names.key(f"executor:progress:{command.command_id}"))
    )
    assert saved.command_wave is None and saved.legs[PERP].position_before == 0.2
