"""A closure that stays closed (issue 19): before closing, the executor removes every thing that can
re-open the position — orders, the mass quotes of every session, conditional orders and Thalex bots —
and reports what each removal took off. Everything is placed through the official `thalex` client on
the paper exchange; after the closure the market is pushed through every price that would have filled
or triggered them, and the account stays flat through a cool-down."""

from __future__ import annotations

import asyncio

import thalex
from redis.asyncio import Redis

from services.common.contracts import RemovalKind, Report, ReportStatus
from services.common.streams import Names
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.executor.conftest import (
    PERP,
    TRADER,
    account_positions,
    make_command,
    make_settings,
    open_positions,
    running_executor,
    send,
    wait_outcome,
)
from tests.paper.official import Official

COOL_DOWN_SECONDS = 3.0


async def _client(paper: PaperHandle, trader: KeyFiles) -> Official:
    client = Official(paper.url)
    await client.__aenter__()
    await client.login(trader)
    return client


async def _quoting_session(paper: PaperHandle, trader: KeyFiles, label: str, bid: float,
                           ask: float) -> Official:
    """Another session of the account quoting the perpetual under market-maker protection."""
    client = await _client(paper, trader)
    await client.result("set_mm_protection", "FBTCUSD", 1.0, 1.0)
    quote = thalex.Quote(PERP, thalex.SideQuote(bid, 0.1), thalex.SideQuote(ask, 0.1))
    result = await client.result("mass_quote", [quote], label=label)
    assert result["n_success"] == 2, result
    return client


def _removed(got: list[Report], kind: RemovalKind) -> list[Report]:
    return [r for r in got if r.removed is not None and r.removed.kind is kind]


async def _live(client: Official) -> tuple[list[dict], list[dict], list[dict]]:
    orders = await client.result("open_orders")
    listed = await client.result("conditional_orders")
    conditional = [c for c in listed if c["status"] in ("created", "active")]
    bots = [b for b in await client.result("bots") if b["status"] == "active"]
    return orders, conditional, bots


async def test_orders_quotes_of_two_sessions_a_stop_and_a_grid_bot_are_removed_and_the_account_stays_flat(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    await open_positions(paper, {PERP: 0.5})
    now = float((await paper.control("paper/status"))["time"])
    quoters = [await _quoting_session(paper, trader, "mm-a", 99500, 100500),
               await _quoting_session(paper, trader, "mm-b", 99400, 100600)]
    owner = await _client(paper, trader)
    try:
        await owner.result("buy", PERP, 0.2, price=99000, label="plain")
        stop = await owner.result("create_conditional_order", thalex.Direction.BUY, PERP, 0.3, 100800,
                                  label="stop")
        levels = [99850, 99900, 99950, 100050, 100100, 100150]
        grid = await owner.result("create_grid_bot", now + 3600, PERP, levels, 0.01,
                                  upside_exit_price=100300, downside_exit_price=99700, label="grid")
        orders, conditional, bots = await _live(owner)
        assert {o["label"] for o in orders} >= {"mm-a", "mm-b", "plain"} and conditional and bots

        command = make_command({PERP: 0.5})
        async with running_executor(make_settings(redis_url, names, paper, trader)):
            await send(redis, names, command)
            got = await wait_outcome(redis, names, command.command_id)
        assert got[-1].status is ReportStatus.COMPLETED, got[-1]
        assert account_positions(paper)[PERP] == 0

        # each kind removed before the first order, and reported with what it removed
        first_order = next(i for i, r in enumerate(got) if r.status is ReportStatus.ORDER_SENT)
        (orders_gone,) = _removed(got[:first_order], RemovalKind.ORDERS)
        assert orders_gone.status is ReportStatus.ORDERS_CANCELLED
        assert orders_gone.removed is not None and orders_gone.removed.count is not None
        assert orders_gone.removed.count >= 4  # the plain bid and the grid bot's levels
        (quotes_gone,) = _removed(got[:first_order], RemovalKind.MASS_QUOTES)
        assert quotes_gone.status is ReportStatus.MASS_QUOTES_CANCELLED and quotes_gone.removed is not None
        assert quotes_gone.removed.count == 4 and quotes_gone.removed.labels == ["mm-a", "mm-b"]
        (stops_gone,) = _removed(got[:first_order], RemovalKind.CONDITIONAL_ORDERS)
        assert stops_gone.removed is not None and stops_gone.removed.ids == [stop["order_id"]]
        assert stops_gone.removed.labels == ["stop"] and stops_gone.removed.count == 1
        (bots_gone,) = _removed(got[:first_order], RemovalKind.BOTS)
        assert bots_gone.removed is not None and bots_gone.removed.ids == [grid["bot_id"]]
        assert bots_gone.removed.labels == ["grid"]
        assert all(r.error is None and r.removed.round == 1 for r in got if r.removed is not None)
        assert await _live(owner) == ([], [], [])

        # the cool-down: every price that would have filled a quote, a grid level or the stop
        for price in (99000, 99400, 99850, 100150, 100600, 100800, 101000):
            await paper.control("paper/set_index", {"underlying": "BTCUSD", "price": price})
            await paper.control("paper/fill_orders", {"key_id": TRADER})
            await asyncio.sleep(COOL_DOWN_SECONDS / 7)
            assert account_positions(paper)[PERP] == 0, f"re-opened at {price}"
        assert await _live(owner) == ([], [], [])
    finally:
        for client in (*quoters, owner):
            await client.__aexit__(None, None, None)


async def test_a_refused_removal_is_reported_with_its_error_and_the_closure_goes_on(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """Refused twice: the round sent with the claim (a fresh full closure's) is retried once for what
    of it failed, and the retry is refused too."""
    await open_positions(paper, {PERP: 0.3})
    await paper.control("paper/fail_next", {"code": 7, "count": 2, "methods": ["private/cancel_all_bots"],
                                            "key_id": TRADER, "message": "not permitted"})
    command = make_command({PERP: 0.3})
    async with running_executor(make_settings(redis_url, names, paper, trader)):
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    refused = [r for r in got if r.status is ReportStatus.BOTS_CANCELLED]
    assert refused and refused[0].error is not None and refused[0].error.code == 7
    assert refused[0].removed is not None and refused[0].removed.count is None
    assert account_positions(paper)[PERP] == 0


async def test_quotes_that_come_back_between_waves_are_removed_again_before_the_next_wave(
        paper: PaperHandle, trader: KeyFiles, redis: Redis, redis_url: str, names: Names) -> None:
    """A thin book takes several waves; a quoter that does not listen re-quotes after the first one:
    the round repeated before the next wave removes its quotes (reported as round 2) before any order."""
    await open_positions(paper, {PERP: 0.3})
    await paper.control("paper/set_book", {"instrument_name": PERP, "levels": 1, "level_amount": 0.1,
                                           "growth": 0.0})
    command = make_command({PERP: 0.3})
    methods: list[str] = []
    async with running_executor(make_settings(redis_url, names, paper, trader)) as running:
        session = running.executor.session
        real = session.request

        async def request(method: str, *args: object, **kwargs: object) -> object:
            result = await real(method, *args, **kwargs)
            methods.append(method)
            if method == "insert" and methods.count("insert") == 1:  # the quoter comes back after wave 1
                quote = [{"i": PERP, "b": [[90000, 0.1]], "a": [[110000, 0.1]]}]
                await paper.control("paper/mass_quote", {"key_id": TRADER, "quotes": quote, "label": "deaf"})
            return result

        session.request = request  # type: ignore[method-assign]
        await send(redis, names, command)
        got = await wait_outcome(redis, names, command.command_id)
    assert got[-1].status is ReportStatus.COMPLETED, got[-1]
    assert account_positions(paper)[PERP] == 0
    again = [r.removed for r in _removed(got, RemovalKind.MASS_QUOTES)
             if r.removed is not None and r.removed.round > 1]
    assert again and again[0].labels == ["deaf"] and again[0].count == 2
    second_insert = [i for i, m in enumerate(methods) if m == "insert"][1]
    assert "cancel_mass_quote" in methods[methods.index("insert"):second_insert]
    assert not paper.exchange.engine.accounts[TRADER].orders
