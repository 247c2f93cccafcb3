"""A subscribe answer is checked: what it leaves out is refused, though no error says so.

api.yaml (public/subscribe, private/subscribe): "List of successfully subscribed channels. Note that
this method returns successfully even if no channels were valid; check the return value." Found by a
review and reproduced on the paper exchange: ingest treated only an error answer as a refusal, so a
left-out channel stayed in its held set and was never asked for again — with `watch_list =
["NO-SUCH-PERP"]` it "held" `ticker.NO-SUCH-PERP.raw`; a left-out `account.portfolio` would have
brought no positions with /health green.
"""

from __future__ import annotations

import logging

import pytest
from prometheus_client import REGISTRY

from services.common.config import Settings
from services.common.service import Health
from services.common.streams import Names
from services.common.thalex import left_out
from services.ingest.follow import Feed, book_channel
from services.ingest.refusals import Refusals
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, WATCHER, Trader, ingest_settings, running_ingest, wait_until

NOW = 1_700_000_000.0


def refused_total(kind: str) -> float:
    return REGISTRY.get_sample_value("tp_ingest_refused_channels_total", {"kind": kind}) or 0.0


def test_what_the_answer_leaves_out_is_refused() -> None:
    assert left_out(["a", "b", "c", "b"], ["c", "a"]) == ["b"]
    assert left_out(["a"], []) == ["a"]  # "returns successfully even if no channels were valid"
    assert left_out(["a", "b"], None) == ["a", "b"]  # an answer that is no list holds nothing


def test_a_feed_of_an_open_position_is_asked_again_with_backoff_any_other_is_not() -> None:
    refusals = Refusals(first=1.0, cap=4.0)
    assert refusals.refuse("book.X", Feed.BOOK, "X", NOW)  # first time: say it
    assert not refusals.due("book.X", guarding=False, now=NOW + 100)  # not held: not on this connection
    assert not refusals.due("book.X", guarding=True, now=NOW + 0.5)
    assert refusals.due("book.X", guarding=True, now=NOW + 1.0)
    assert not refusals.refuse("book.X", Feed.BOOK, "X", NOW + 1.0)  # again: said already
    assert not refusals.due("book.X", guarding=True, now=NOW + 2.9)  # 2 s after the second
    assert refusals.due("book.X", guarding=True, now=NOW + 3.0)
    for _ in range(5):
        refusals.refuse("book.X", Feed.BOOK, "X", NOW + 3.0)
    assert refusals.channels["book.X"].retry_at == NOW + 7.0  # capped at 4 s
    assert refusals.unpriced(lambda feed, target: target == "X", NOW + 10) == [
        "book.X of held X refused 10 s ago (7 tries), retrying"]
    assert refusals.unpriced(lambda feed, target: False, NOW + 10) == []  # flat: a warning was enough
    assert refusals.held("book.X") is not None and refusals.due("book.X", guarding=False, now=NOW)


async def test_a_watch_list_instrument_that_does_not_exist_is_refused_warned_once_and_not_held(
    paper: PaperHandle, redis_url: str, names: Names, keys: dict[str, KeyFiles],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = ingest_settings(paper.url, redis_url, names, keys[WATCHER], watch_list=["NO-SUCH-PERP", PERP])
    channel = "ticker.NO-SUCH-PERP.raw"
    before = refused_total("public")
    with caplog.at_level(logging.WARNING, logger="services.ingest.app"):
        async with running_ingest(settings) as ingest:
            await wait_until(lambda: channel in ingest.refusals.channels, 5)
            await wait_until(lambda: f"ticker.{PERP}.raw" in ingest.channels, 5)
            held = dict(ingest.channels)
            for _ in range(3):  # the once-a-second re-plan must not ask for it again
                await ingest.sync_subscriptions(ingest.session.connection)  # type: ignore[union-attr,arg-type]
            verdict = ingest.subscriptions_held()
    assert channel not in held
    assert verdict is True  # nothing held depends on it: a warning, not a red /health
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and channel in r.getMessage()]
    assert len(warnings) == 1 and "left out of the subscribe answer" in warnings[0], warnings
    assert refused_total("public") == before + 1


async def test_a_private_channel_left_out_makes_health_red_naming_it_until_a_connection_holds_it(
    paper: PaperHandle, settings: Settings, caplog: pytest.LogCaptureFixture,
) -> None:
    before = refused_total("private")
    async with running_ingest(settings) as ingest:
        health = Health("ingest")
        health.add("subscriptions", ingest.subscriptions_held)
        await health.refresh()
        assert health.healthy, health.reasons
        with caplog.at_level(logging.WARNING, logger="services.ingest.app"):
            await paper.control("paper/leave_out", {"channels": ["account.portfolio"]})
            await paper.control("paper/drop_connections", {"key_id": WATCHER})
            await wait_until(lambda: "account.portfolio" in ingest.private_refused, 5)
            await wait_until(lambda: refused_total("private") >= before + 2, 10)  # reconnecting, with backoff
        await health.refresh()
        assert not health.healthy
        reason = health.reasons["subscriptions"]
        assert reason.startswith(
            "channels refused: account.portfolio (the account's positions) left out"), reason
        assert ingest.session is not None and not ingest.session.ready  # nothing published meanwhile
        said = [r for r in caplog.records
                if r.name == "services.ingest.app" and "account.portfolio" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING  # once, not per reconnect
        await paper.control("paper/leave_out", {"channels": []})
        await wait_until(lambda: ingest.session is not None and ingest.session.ready, 10)
        await health.refresh()
        assert health.healthy, health.reasons
        assert ingest.private_refused == {}


async def test_a_held_instruments_book_refused_is_asked_again_and_health_is_green_once_held(
    paper: PaperHandle, settings: Settings, trader: Trader,
) -> None:
    book = book_channel(PERP, settings.ingest.book_levels, settings.ingest.ticker_delay)
    async with running_ingest(settings) as ingest:
        await paper.control("paper/leave_out", {"channels": [book], "count": 2})
        await trader.market("buy", PERP, 0.1)
        await wait_until(lambda: book in ingest.refusals.channels, 5)
        verdict = ingest.subscriptions_held()
        assert isinstance(verdict, str), verdict
        assert verdict.startswith(f"channels refused: {book} of held {PERP} refused"), verdict
        assert book not in ingest.channels
        # 1 s, then 2 s later: the second answer leaves it out too, the third holds it
        await wait_until(lambda: book in ingest.channels, 10)
        assert ingest.subscriptions_held() is True
        assert book not in ingest.refusals.channels
        await wait_until(lambda: ingest.books.get(PERP) is not None and bool(ingest.books[PERP].bids), 5)
