"""Thalex messages → wire documents (pure: no I/O, no clock; `ingest_ts` is passed in).

The exchange's objects (api.yaml: `Trade`, `Ticker`, `PortfolioEntry`,
`Instrument`, the `book.*` notification) are validated against the parts of the
schema the guardian relies on (the typed models in `services/common/thalex/models.py`,
shared with the executor), and turned into the contract documents of
`services/common/contracts.py`. Anything that does not fit raises
`MalformedMessage` naming the object and the field, so the shell can
dead-letter the raw text and keep running: one bad message must never cost the
account its other fills.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from services.common.contracts import (
    ExchangePosition,
    Fill,
    InstrumentInfo,
    Liquidity,
    Positions,
    Tick,
    TradeType,
)
from services.common.funding import funding_period
from services.common.thalex.models import (
    BOOKING_FIELDS,
    MalformedMessage,
    ThalexBookUpdate,
    ThalexIndex,
    ThalexInstrument,
    ThalexPortfolioEntry,
    ThalexTicker,
    ThalexTrade,
    UnbookableTrade,
    parse,
    problems,
)

M = TypeVar("M", bound=BaseModel)


def _contract(model: type[M], what: str, **fields: Any) -> M:
    """Build a contract document; a value the contract refuses is the exchange's message's fault."""
    try:
        return model(**fields)
    except ValidationError as exc:
        raise MalformedMessage(f"{what} does not fit the wire contract: {problems(exc)}") from None


def as_list(data: Any, what: str) -> list[Any]:
    """A notification or result that must be a JSON array (trades, portfolio lines)."""
    if not isinstance(data, list):
        raise MalformedMessage(f"{what}: expected an array, got {type(data).__name__}")
    return data


# Fills


def fill_from_trade(data: Any, ingest_ts: float) -> Fill:
    """One Thalex `Trade` → `Fill` (amount stays positive; `direction` is the side).

    A trade missing an optional field is kept: no `fee` → the fill has none (the portfolio
    estimates and flags it), no `order_id` (an expiration) → none, no `time` → the receive time,
    no `trade_type` → `normal`. A value the guardian does not know is no reason to lose the trade
    either (`unrecognised` says which, for the shell's WARNING): a `maker_taker` other than
    maker/taker (`''`) → no liquidity, a `trade_type` Thalex added after api.yaml → `normal`.
    Raises `UnbookableTrade` when a field of `BOOKING_FIELDS` is missing, `MalformedMessage`
    when a field is of the wrong type or value.
    """
    trade = parse(ThalexTrade, "Trade", data)
    what = f"Trade {trade.trade_id}" if trade.trade_id else "Trade"
    missing = [name for name in BOOKING_FIELDS if getattr(trade, name) in (None, "")]
    if missing:
        raise UnbookableTrade(f"Trade: cannot be booked without {', '.join(missing)}")
    client_order_id = trade.client_order_id
    if client_order_id is not None and not float(client_order_id).is_integer():
        raise MalformedMessage(f"{what}: client_order_id {client_order_id} is not an integer")
    return _contract(
        Fill,
        what,
        trade_id=trade.trade_id,
        order_id=trade.order_id or None,
        client_order_id=None if client_order_id is None else int(client_order_id),
        instrument=trade.instrument_name,
        side=trade.direction,
        price=trade.price,
        amount=trade.amount,
        fee=trade.fee,
        liquidation_fee=trade.liquidation_fee,
        index=trade.index,
        fee_rate=trade.fee_rate,
        liquidity=_liquidity(trade.maker_taker),
        position_after=trade.position_after,
        funding_mark=trade.funding_mark,
        label=trade.label or None,
        trade_type=_trade_type(trade.trade_type),
        exchange_ts=trade.time if trade.time is not None else ingest_ts,
        ingest_ts=ingest_ts,
    )


def _liquidity(maker_taker: str | None) -> Liquidity | None:
    """Thalex `maker_taker` → `Liquidity`; anything else (`''`, a new word) → not known (None).

    Only the fee estimate of a trade that reported neither `fee` nor `fee_rate` reads it (the
    taker rate when not known: the dearer guess)."""
    return Liquidity(maker_taker) if maker_taker in _LIQUIDITIES else None


def _trade_type(trade_type: str | None) -> TradeType:
    """Thalex `trade_type` → `TradeType`; absent or unknown → `normal`.

    The closest meaning for a kind of trade api.yaml does not list (a `settlement`, say): every
    type but `daily_mark` moves the position by its amount at its price in the ledger, and its fee
    is the one the trade reported (estimated as a trade's when it reported none). Reading it as
    `daily_mark` (moves nothing) would lose the amount; refusing it would lose amount and fee."""
    return TradeType(trade_type) if trade_type in _TRADE_TYPES else TradeType.NORMAL


_LIQUIDITIES = frozenset(Liquidity)
_TRADE_TYPES = frozenset(TradeType)


def unrecognised(trade: Any) -> list[str]:
    """What of a trade `fill_from_trade` did not recognise and read as its closest meaning.

    E.g. `["trade_type 'settlement' (published as normal)"]`; empty for a trade read as sent.
    """
    if not isinstance(trade, dict):
        return []
    found = []
    trade_type, maker_taker = trade.get("trade_type"), trade.get("maker_taker")
    if isinstance(trade_type, str) and trade_type and trade_type not in _TRADE_TYPES:
        found.append(f"trade_type {trade_type!r} (published as normal)")
    if isinstance(maker_taker, str) and maker_taker and maker_taker not in _LIQUIDITIES:
        found.append(f"maker_taker {maker_taker!r} (published without liquidity)")
    return found


# Ticks and books


class Book:
    """One instrument's aggregated book, rebuilt from `book.*` level changes.

    Thalex sends the whole book as changes against an empty view on
    subscription, then only the levels that changed (amount 0 = level gone);
    so a book must be dropped whenever its subscription is (a reconnect too).

    The ticker carries the best bid and ask too, and the two channels arrive as
    separate messages: after a move, the ticker can be newer than the book. Its
    best levels then are the book's top (see `top`), so a tick never carries a
    best bid of the new price over levels of the old one.
    """

    __slots__ = ("asks", "bids", "ticker", "time")

    def __init__(self) -> None:
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self.time: float | None = None
        """`time` of the last book notification (exchange clock)."""
        self.ticker: ThalexTicker | None = None
        """The last ticker of the instrument, for its best levels."""

    def apply(self, data: Any) -> float | None:
        """Fold one notification in; returns its `time` (None when the exchange gave none)."""
        update = parse(ThalexBookUpdate, "book update", data)
        for side, changes, name in ((self.bids, update.bid_changes, "bid_changes"),
                                    (self.asks, update.ask_changes, "ask_changes")):
            for change in changes:
                price, amount = _level(change, name)
                if amount == 0.0:
                    side.pop(price, None)
                else:
                    side[price] = amount
        if update.time is not None:
            self.time = update.time
        return update.time

    def ticker_is_newer(self) -> bool | None:
        """Whether the last ticker is newer than the last book update; None when a time is missing."""
        ticker = self.ticker
        if ticker is None or ticker.mark_timestamp is None or self.time is None:
            return None
        return ticker.mark_timestamp > self.time

    def top(self, levels: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """The best `levels` levels of each side, best first (bids descending, asks ascending).

        When the last ticker is newer than the last book update, its best bid / ask (with their
        amounts) are the top of each side and the book's levels at or better than them are
        gone; the book's worse levels stay below (the only depth known). A side the newer
        ticker shows empty is empty.
        """
        bids = sorted(self.bids.items(), key=lambda level: -level[0])
        asks = sorted(self.asks.items())
        ticker = self.ticker
        if ticker is not None and self.ticker_is_newer():
            bids = _under_best(bids, ticker.best_bid_price, ticker.best_bid_amount, buy=True)
            asks = _under_best(asks, ticker.best_ask_price, ticker.best_ask_amount, buy=False)
        return bids[:levels], asks[:levels]


def _under_best(levels: list[tuple[float, float]], price: float | None, amount: float | None,
                buy: bool) -> list[tuple[float, float]]:
    """`levels` under a newer best level: the ones at or better than it dropped, it on top."""
    if price is None:
        return []
    worse = [level for level in levels if (level[0] < price if buy else level[0] > price)]
    return ([(price, amount)] if amount is not None and amount > 0 else []) + worse


def _level(change: Sequence[Any], side: str) -> tuple[float, float]:
    if len(change) < 2:
        raise MalformedMessage(f"book update: {side}: level {change!r} needs [price, amount, ...]")
    price, amount = change[0], change[1]
    for value, name in ((price, "price"), (amount, "amount")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MalformedMessage(f"book update: {side}: {name} {value!r} is not a finite number")
    if price < 0 or amount < 0:
        raise MalformedMessage(f"book update: {side}: level {change!r} has a negative price or amount")
    return float(price), float(amount)


def tick_from_ticker(instrument: str, data: Any, ingest_ts: float, book: Book | None = None,
                     levels: int = 0) -> Tick:
    """A `Ticker` (+ the instrument's book, when followed) → `Tick`.

    `exchange_ts` is the ticker's `mark_timestamp` (when the price was marked),
    the receive time when the exchange gave none. The ticker is noted in `book`:
    its best levels top the book until a newer book update (`Book.top`); a ticker
    older than the book takes its best bid and ask from the book, and is stamped
    like a book change (`with_book`): the book's time, the mark's own as `mark_ts`.
    Stamped with its older mark time it would be older than the book's re-issue
    before it, and the portfolio (which drops a tick older than the one it holds)
    would keep the older mark — which now ages into a stale price.
    """
    ticker = parse(ThalexTicker, f"Ticker {instrument}", data)
    bids = asks = None
    if book is not None:
        book.ticker = ticker
        bids, asks = book.top(levels)
    tick = _contract(
        Tick,
        f"Ticker {instrument}",
        instrument=instrument,
        mark=ticker.mark_price,
        best_bid=ticker.best_bid_price,
        best_ask=ticker.best_ask_price,
        bids=bids,
        asks=asks,
        index=ticker.index,
        funding_mark=ticker.funding_mark,
        exchange_ts=ticker.mark_timestamp if ticker.mark_timestamp is not None else ingest_ts,
        ingest_ts=ingest_ts,
    )
    if book is not None and book.ticker_is_newer() is False:  # a late ticker: the book is newer
        return with_book(tick, book, levels, book.time, ingest_ts)
    return tick


def with_book(tick: Tick, book: Book, levels: int, exchange_ts: float | None, ingest_ts: float) -> Tick:
    """The last tick re-issued with the book's new top levels (the mark unchanged).

    A book change moves the cost of getting out even when the mark does not. A book
    newer than the last ticker also has the newer best bid and ask: its top levels.
    A book stamped after the 08:00 UTC settlement that ended the ticker's funding
    period carries no funding mark: the ticker's is the day before's (the new day's
    starts again from 0), and booked as today's it would count the day's funding twice.
    A re-issue stamped later than its mark says when the mark was marked (`mark_ts`):
    the portfolio holds a glitching mark until a newer ticker confirms it, and the same
    mark sent again with an unrelated book change is no confirmation.
    """
    bids, asks = book.top(levels)
    stamped = max(tick.exchange_ts, exchange_ts) if exchange_ts is not None else tick.exchange_ts
    marked = tick.mark_time
    update: dict[str, Any] = {"bids": bids, "asks": asks, "exchange_ts": stamped, "ingest_ts": ingest_ts,
                              "mark_ts": marked if stamped > marked else None}
    if funding_period(stamped) > funding_period(tick.exchange_ts):
        update["funding_mark"] = None
    if book.ticker_is_newer() is False:
        update["best_bid"] = bids[0][0] if bids else None
        update["best_ask"] = asks[0][0] if asks else None
    return tick.model_copy(update=update)


def tick_from_index(underlying: str, data: Any, ingest_ts: float) -> Tick:
    """A `price_index.<underlying>` notification → the underlying's own `Tick`.

    `instrument` is the underlying (`BTCUSD`), `mark` and `index` its index price: the portfolio
    prices an option's closing fee on it when the option's own ticker carries no index.
    """
    index = parse(ThalexIndex, f"Index {underlying}", data)
    return _contract(
        Tick,
        f"Index {underlying}",
        instrument=underlying,
        mark=index.price,
        index=index.price,
        exchange_ts=index.timestamp if index.timestamp is not None else ingest_ts,
        ingest_ts=ingest_ts,
    )


# Positions and instruments


def positions_from_portfolio(lines: Iterable[ExchangePosition], exchange_ts: float,
                             ingest_ts: float) -> Positions:
    """The account's whole portfolio view (every line, flat ones included, sorted by instrument)."""
    return Positions(positions=sorted(lines, key=lambda p: p.instrument), exchange_ts=exchange_ts,
                     ingest_ts=ingest_ts)


def position_from_entry(data: Any) -> ExchangePosition:
    """One `PortfolioEntry` → `ExchangePosition` (`average_price` falls back to `start_price`, then
    to `mark_price`: the position's P&L then counts from its mark, as with `mark_at_start`).

    Needs `instrument_name` and `position`, and for an open position one of the three prices; a mark
    or P&L figure the line does not carry is absent from the result (raises `MalformedMessage`
    without them, or for a field of the wrong type). An open position with no price at all is not
    valued at 0 — a 1 BTC long "bought at 0" reads as a 100,000 USD profit and fires the take profit."""
    entry = parse(ThalexPortfolioEntry, "PortfolioEntry", data)
    average = next((price for price in (entry.average_price, entry.start_price, entry.mark_price)
                    if price is not None), None)
    if average is None:
        if entry.position != 0.0:
            raise MalformedMessage(f"PortfolioEntry {entry.instrument_name}: no average_price, start_price "
                                   "or mark_price: the position cannot be valued")
        average = 0.0
    return _contract(
        ExchangePosition,
        f"PortfolioEntry {entry.instrument_name}",
        instrument=entry.instrument_name,
        position=entry.position,
        mark_price=entry.mark_price,
        average_price=average,
        realised_pnl=entry.realised_pnl,
        unrealised_pnl=entry.unrealised_pnl,
        unrealised_perpetual_funding=entry.unrealised_perpetual_funding,
        perpetual_funding_entry_value=entry.perpetual_funding_entry_value,
    )


def instrument_info(data: Any) -> tuple[str, InstrumentInfo]:
    """One `Instrument` → `(name, InstrumentInfo)` for the `tp:instruments` hash."""
    inst = parse(ThalexInstrument, "Instrument", data)
    info = _contract(
        InstrumentInfo,
        f"Instrument {inst.instrument_name}",
        type=inst.type,
        product=inst.product,
        underlying=inst.underlying,
        tick_size=inst.tick_size,
        volume_tick_size=inst.volume_tick_size,
        min_order_amount=inst.min_order_amount,
        expiry_ts=inst.expiration_timestamp,
    )
    return inst.instrument_name, info
