"""What the executor reads: instrument data, quotes, positions, fees, and its own trades and orders.

Every answer is parsed into the typed Thalex models (`services/common/thalex/models.py`); an
answer that does not fit is a `ThalexError` without a code (the command fails with the reason,
never on a half-read figure). Every read takes an `ask`: the shell's request function, for a
command retried through throttling and reconnects until its deadline (instrument data too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel
from redis.asyncio import Redis
from thalex import Sort

from services.common.contracts import HedgeGroup, InstrumentInfo, InstrumentType
from services.common.reference import ReferenceReader
from services.common.streams import Names
from services.common.thalex import NO_CODE, ThalexError
from services.common.thalex.models import (
    MalformedMessage,
    ThalexBook,
    ThalexClosingTrade,
    ThalexInstrument,
    ThalexOrderStatus,
    ThalexPosition,
    ThalexTicker,
    ThalexTrade,
    ThalexTradeHistory,
    parse,
)
from services.executor.plan import Leg, Progress
from services.executor.waves import Quote, hedged

log = logging.getLogger(__name__)

Ask = Callable[..., Awaitable[Any]]
"""`ask(method, *args, **kwargs)`: one request of the official client's `method`; its result."""
M = TypeVar("M", bound=BaseModel)

FEE_WAIT_SECONDS = 1.0
MAX_REMEMBERED_TRADES = 100_000
HISTORY_PAGE = 1000
HISTORY_SLACK_SECONDS = 5
INSTRUMENT_REQUESTS_AT_ONCE = 8
"""`public/instrument` requests in flight at once: a book whose instruments are all missing from
`tp:instruments` must not fire hundreds at once (each a throttle refusal, then retried)."""


def answer(model: type[M], method: str, data: Any) -> M:
    """An answer as its typed model; one that does not fit is the exchange's error (no code)."""
    try:
        return parse(model, f"{method} answer", data)
    except MalformedMessage as exc:
        raise ThalexError(method, NO_CODE, f"malformed answer: {exc}") from None


def answers(model: type[M], method: str, data: Any) -> list[M]:
    """A list answer, every item as its typed model."""
    if not isinstance(data, list):
        raise ThalexError(method, NO_CODE, f"malformed answer: expected an array, got {type(data).__name__}")
    return [answer(model, method, item) for item in data]


class Market:
    """The executor's reads, with what is worth caching: instrument data and the fees of its trades."""

    def __init__(self, redis: Redis, names: Names, reader: ReferenceReader[InstrumentInfo]) -> None:
        self.redis = redis
        self.names = names
        self.reader = reader
        """Validates `tp:instruments` values one by one: a bad one is dead-lettered, the exchange asked."""
        self.instruments: dict[str, InstrumentInfo] = {}
        """Tick sizes and type per instrument, once read (they do not change while trading)."""
        self.fees: dict[str, float] = {}
        """Fee per trade id, as `account.trade_history` told it (the insert answer has none)."""
        self._fee_seen = asyncio.Event()
        self._instrument_requests = asyncio.Semaphore(INSTRUMENT_REQUESTS_AT_ONCE)

    async def infos(self, ask: Ask, instruments: Sequence[str]) -> dict[str, InstrumentInfo]:
        """Instrument data from `tp:instruments` (ingest keeps it), else the exchange's `public/instrument`.

        What is not cached yet costs one HMGET, plus one request per instrument the hash lacks or
        holds a bad value for (issue 21: a bad value written while running made every command fail
        until it was dead-lettered as poison, with no report; now it is dead-lettered once, by the
        reader, and the exchange's own figures are used). The requests go through `ask` (a command's:
        retried through throttling and reconnects until its deadline, like its other reads), at most
        `INSTRUMENT_REQUESTS_AT_ONCE` in flight. An instrument the exchange does not know either is a
        `ThalexError`: the command fails with a report naming it.
        """
        try:  # the usual case, every one known already: one pass over a 1,000-leg command
            return {name: self.instruments[name] for name in instruments}
        except KeyError:
            pass
        missing = [name for name in dict.fromkeys(instruments) if name not in self.instruments]
        if missing:
            raws = await self.redis.hmget(self.names.instruments, missing)
            self.instruments.update(await self.reader.documents(dict(zip(missing, raws, strict=True))))
            unknown = [name for name in missing if name not in self.instruments]
            wires = await asyncio.gather(*(self._instrument(ask, name) for name in unknown))
            for name, wire in zip(unknown, wires, strict=True):
                self.instruments[name] = _info(answer(ThalexInstrument, "instrument", wire))
        return {name: self.instruments[name] for name in instruments}

    async def _instrument(self, ask: Ask, name: str) -> Any:
        """One `public/instrument` request, waiting its turn among those in flight."""
        async with self._instrument_requests:
            return await ask("instrument", name)

    async def quote(self, ask: Ask, instrument: str, with_book: bool) -> Quote:
        """The instrument's ticker (and book, both read at once) as a `Quote`."""
        if with_book:
            ticker, book = await asyncio.gather(ask("ticker", instrument), ask("book", instrument))
        else:
            ticker, book = await ask("ticker", instrument), None
        t = answer(ThalexTicker, "ticker", ticker)
        quote = Quote(mark=t.mark_price, best_bid=t.best_bid_price, best_ask=t.best_ask_price,
                      delta=1.0 if t.delta is None else t.delta, index=t.index)
        if book is not None:
            levels = answer(ThalexBook, "book", book)
            quote.bids, quote.asks = levels.bids, levels.asks
        return quote

    async def quotes(self, ask: Ask, instruments: Sequence[str], groups: Sequence[HedgeGroup],
                     read: Mapping[str, Quote] | None = None) -> dict[str, Quote]:
        """Every instrument's quote at once, with the book for those hedged against another.

        `read`: quotes already read for this wave; only what they lack (a missing quote, or a
        book a hedged leg needs) is read now.
        """
        several = hedged(instruments, await self.infos(ask, instruments), groups)
        quotes = {n: q for n, q in (read or {}).items()
                  if n in instruments and (n not in several or q.bids is not None)}
        missing = [n for n in instruments if n not in quotes]
        read_now = await asyncio.gather(*(self.quote(ask, n, with_book=n in several) for n in missing))
        quotes.update(zip(missing, read_now, strict=True))
        return quotes

    async def positions(self, ask: Ask) -> dict[str, float]:
        """The account's positions (`private/portfolio`): instrument → signed position."""
        rows = answers(ThalexPosition, "portfolio", await ask("portfolio"))
        return {row.instrument_name: row.position for row in rows}

    def on_trades(self, trades: Any) -> list[str]:
        """An `account.trade_history` notification: remember each trade's fee. Returns what was unusable."""
        items = trades if isinstance(trades, list) else [trades]
        problems = []
        for item in items:
            try:
                trade = parse(ThalexTrade, "Trade", item)
            except MalformedMessage as exc:
                problems.append(str(exc))
                continue
            if trade.trade_id and trade.fee is not None:  # another bot's trade may lack them (api.yaml)
                self.fees[trade.trade_id] = trade.fee
        while len(self.fees) > MAX_REMEMBERED_TRADES:
            del self.fees[next(iter(self.fees))]
        self._fee_seen.set()
        return problems

    async def await_fees(self, trade_ids: Sequence[str]) -> None:
        """Fees arrive on `account.trade_history` just after the insert answer: wait briefly for them."""
        deadline = time.monotonic() + FEE_WAIT_SECONDS
        while any(t not in self.fees for t in trade_ids) and time.monotonic() < deadline:
            self._fee_seen.clear()
            try:
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._fee_seen.wait()
            except TimeoutError:
                break
        unseen = sum(t not in self.fees for t in trade_ids)
        if unseen:
            log.warning("fees of %d trades not seen on account.trade_history", unseen)

    async def trades_of(self, ask: Ask, progress: Progress) -> list[ThalexClosingTrade]:
        """The command's trades (by label) since it started, from `private/trade_history`.

        Only the command's own trades are validated: another bot's odd trade is not its business. A
        trade listed without `fee` (api.yaml's own example has none) keeps the fee
        `account.trade_history` told, if any; otherwise it is counted with its fee unknown.
        """
        found: list[ThalexClosingTrade] = []
        bookmark = None
        while True:
            page = answer(ThalexTradeHistory, "trade_history", await ask(
                "trade_history", limit=HISTORY_PAGE, bookmark=bookmark, sort=Sort.ASC,
                time_low=int(progress.started_ts) - HISTORY_SLACK_SECONDS,
                instrument_names=",".join(progress.legs)))
            for raw in page.trades:
                if isinstance(raw, dict) and raw.get("label") == progress.label:
                    trade = answer(ThalexClosingTrade, "trade_history", raw)
                    if trade.fee is not None:
                        self.fees.setdefault(trade.trade_id, trade.fee)
                    elif trade.trade_id in self.fees:
                        trade = trade.model_copy(update={"fee": self.fees[trade.trade_id]})
                    found.append(trade)
            bookmark = page.bookmark
            if not bookmark:
                return found

    async def open_orders_of(self, ask: Ask, label: str) -> list[str]:
        """Ids of the account's open orders carrying `label`."""
        rows = await ask("open_orders")
        if not isinstance(rows, list):
            raise ThalexError("open_orders", NO_CODE, "malformed answer: expected an array")
        ours = [row for row in rows if isinstance(row, dict) and row.get("label") == label]
        return [answer(ThalexOrderStatus, "open_orders", row).order_id for row in ours]


@dataclass
class WaveReads:
    """A wave's exchange reads in flight: the portfolio and the legs' quotes (read concurrently)."""

    positions: asyncio.Task[dict[str, float]] | None = None
    quotes: asyncio.Task[dict[str, Quote]] | None = None

    @classmethod
    def start(cls, market: Market, ask: Ask, legs: Sequence[Leg], groups: Sequence[HedgeGroup],
              positions: bool = True) -> WaveReads:
        """Start the reads: the portfolio (unless `positions` is False) and each leg's ticker (and book)."""
        names = [leg.instrument for leg in legs]
        return cls(positions=asyncio.create_task(market.positions(ask)) if positions else None,
                   quotes=asyncio.create_task(market.quotes(ask, names, groups)) if names else None)

    async def result(self, market: Market, ask: Ask) -> tuple[dict[str, float], dict[str, Quote] | None]:
        """The positions (read now if they were not started) and the quotes (None if not started)."""
        try:
            positions = await self.positions if self.positions is not None else await market.positions(ask)
            return positions, (await self.quotes if self.quotes is not None else None)
        finally:
            self.cancel()

    def cancel(self) -> None:
        for task in (self.positions, self.quotes):
            settle_quietly(task, cancel=True)


def settle_quietly(task: asyncio.Future[Any] | None, cancel: bool = False) -> None:
    """Let a request nobody will await finish (or cancel it); its outcome (or error) is dropped."""
    if task is None:
        return
    if not task.done():
        if cancel:
            task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    elif not task.cancelled():
        task.exception()  # retrieved: never "exception was never retrieved"


def _info(wire: ThalexInstrument) -> InstrumentInfo:
    """An instrument as a closure sizes orders for it: the minimum order never below one volume tick."""
    try:
        kind = InstrumentType(wire.type)
    except ValueError:
        raise ThalexError("instrument", NO_CODE, f"unknown instrument type {wire.type!r}") from None
    return InstrumentInfo(type=kind, product=wire.product, underlying=wire.underlying,
                          tick_size=wire.tick_size, volume_tick_size=wire.volume_tick_size,
                          min_order_amount=max(wire.min_order_amount, wire.volume_tick_size),
                          expiry_ts=wire.expiration_timestamp)
