"""Ingest against the paper exchange and a real Redis: the portfolio is read line by line.

Found by review (reproduced): a perpetual line and an option line without `mark_price` as the whole
portfolio, then a perpetual delta → `tp:positions` held only BTC-PERPETUAL, the short option gone
(flat to the portfolio), only the perpetual's channels followed, and `/health` green.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from services.common.config import Settings
from services.common.contracts import DeadLetter, Positions
from services.common.streams import Names
from services.paper.testing import PaperHandle
from tests.ingest.conftest import PERP, Trader, running_ingest, stream_docs, wait_until


def watcher(paper: PaperHandle):  # type: ignore[no-untyped-def]
    return next(c for c in paper.exchange.connections if c.key is not None and c.key.kid == "watcher")


async def published(redis: Redis, names: Names) -> list[Positions]:
    return [Positions.model_validate(d) for d in await stream_docs(redis, names.positions)]


def held(doc: Positions) -> dict[str, float]:
    return {p.instrument: p.position for p in doc.positions}


async def test_an_option_line_without_a_mark_is_kept_followed_and_published_with_the_next_delta(
    paper: PaperHandle, settings: Settings, redis: Redis, names: Names,
) -> None:
    option = next(i.name for i in paper.exchange.market.instruments.values() if i.kind == "option")
    async with running_ingest(settings) as ingest:
        before = len(await published(redis, names))
        conn = watcher(paper)
        # the first notification after subscribing is the whole portfolio
        conn.notify("account.portfolio", [
            {"instrument_name": PERP, "position": 2.0, "mark_price": 100_000.0, "average_price": 99_000.0},
            {"instrument_name": option, "position": -1.0, "average_price": 500.0},
        ])
        conn.notify("account.portfolio", [
            {"instrument_name": PERP, "position": 3.0, "mark_price": 100_100.0, "average_price": 99_300.0}])

        async def after_the_delta() -> list[Positions]:
            docs = (await published(redis, names))[before:]
            return docs if len(docs) == 2 else []

        whole, delta = await wait_until(after_the_delta, 5)
        await wait_until(lambda: f"ticker.{option}.raw" in ingest.channels, 5)
        verdict = ingest.portfolio_whole()
    assert held(whole) == {PERP: 2.0, option: -1.0}
    assert held(delta) == {PERP: 3.0, option: -1.0}  # the short option is still held, not flat
    assert next(p for p in delta.positions if p.instrument == option).mark_price is None
    assert verdict is True
    assert not await stream_docs(redis, names.deadletter)


async def test_an_unreadable_line_withholds_the_positions_and_is_named_until_its_instrument_reads_again(
    paper: PaperHandle, settings: Settings, trader: Trader, redis: Redis, names: Names,
) -> None:
    async with running_ingest(settings) as ingest:
        ingest.portfolio_reread_seconds = 1.0
        await trader.market("buy", PERP, 0.1)

        async def with_the_perpetual() -> list[Positions]:
            return [d for d in await published(redis, names) if held(d).get(PERP) == 0.1]

        await wait_until(with_the_perpetual, 5)
        before = len(await published(redis, names))
        watcher(paper).notify("account.portfolio", [{"instrument_name": PERP, "mark_price": 100_000.0}])
        verdict = await wait_until(lambda: v if isinstance(v := ingest.portfolio_whole(), str) else None, 5)
        assert len(await published(redis, names)) == before  # nothing published as the whole portfolio
        assert ingest.portfolio[PERP].position == 0.1  # its last readable line is kept
        # the re-read of private/portfolio (every `portfolio_reread_seconds` while incomplete) heals it
        await wait_until(lambda: ingest.portfolio_whole() is True, 5)
        await wait_until(lambda: _more(redis, names, before), 5)
    assert verdict == ("portfolio incomplete, tp:positions withheld: "
                       f"{PERP}: PortfolioEntry: position: Field required")
    letters = [DeadLetter.model_validate(d) for d in await stream_docs(redis, names.deadletter)]
    (letter,) = [d for d in letters if d.source_stream == "thalex:account.portfolio"]
    assert letter.entry_id.startswith(f"{PERP}@") and "position: Field required" in letter.error
    assert held((await published(redis, names))[-1]) == {PERP: 0.1}


async def _more(redis: Redis, names: Names, than: int) -> bool:
    await asyncio.sleep(0)
    return len(await published(redis, names)) > than
