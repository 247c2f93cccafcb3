"""Thalex's wire objects, typed: what ingest and the executor read from the exchange.

Each model holds the fields of an api.yaml schema the guardian relies on (`Trade`, `Ticker`,
`PortfolioEntry`, `Instrument`, `OrderStatus`, the `book.*` notification and `public/book`
answer, `SystemEvent`). Unknown fields are Thalex's business and ignored; a wrong type, NaN or
a missing required field is not: `parse` raises `MalformedMessage` naming the object and the
field, so a service can dead-letter the raw text (or fail the one request) and keep running.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


class MalformedMessage(ValueError):
    """An exchange message the guardian cannot use; the text says which field and why."""


class ThalexObject(BaseModel):
    """An exchange object: unknown fields are ignored; a wrong type or NaN is refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True, strict=True)


class UnbookableTrade(MalformedMessage):
    """A trade without what booking needs: its id, instrument, direction, price or amount."""


BOOKING_FIELDS = ("trade_id", "instrument_name", "direction", "price", "amount")
"""What a trade cannot be booked without. `trade_id` too: fills are de-duplicated by it, and a trade
that may come twice (live and from the history) without one could be counted twice. Such a trade is
refused loudly; reconciliation with the exchange's portfolio heals the position."""


class ThalexTrade(ThalexObject):
    """api.yaml `Trade`, which requires no field: anything may be missing (None).

    Booking needs `trade_id` (de-duplication), `instrument_name`, `direction`, `price` and
    `amount` (see ingest's `fill_from_trade`). `session_realised_after`, `position_pnl`,
    `perpetual_funding_pnl`, `bot_id` and `leg_index` are not carried: the ledger computes
    P&L from its own epoch's basis, and a combination's legs come as trades of their own.
    """

    trade_id: str | None = None
    order_id: str | None = None
    instrument_name: str | None = None
    direction: str | None = None
    price: float | None = None
    amount: float | None = None
    time: float | None = None
    fee: float | None = None
    liquidation_fee: float | None = None
    index: float | None = None
    fee_rate: float | None = None
    maker_taker: str | None = None
    position_after: float | None = None
    funding_mark: float | None = None
    label: str | None = None
    client_order_id: float | None = None
    trade_type: str | None = None


class ThalexClosingTrade(ThalexObject):
    """A trade of the executor's own closing order, as counting a closure's fills needs it.

    `trade_id` (each fill counted once), `instrument_name`, `price` and `amount` are required: without
    them there is nothing to count. `fee` and `order_id` may be missing, as api.yaml's `Trade` requires
    no field and its `private/trade_history` example lists trades without `fee`: the fill is counted
    all the same, its fee unknown (None) — refusing it failed the closure with its legs open.
    """

    trade_id: str
    order_id: str | None = None
    instrument_name: str
    price: float
    amount: float
    fee: float | None = None
    label: str | None = None


class ThalexMessageRate(ThalexObject):
    """The `private/set_cancel_on_disconnect` answer: the order messages per second the session is
    granted (api.yaml requires it)."""

    message_rate: int


class ThalexTicker(ThalexObject):
    """api.yaml `Ticker`: empty book sides are null or absent; `delta` only for options."""

    mark_price: float
    mark_timestamp: float | None = None
    best_bid_price: float | None = None
    best_bid_amount: float | None = None
    best_ask_price: float | None = None
    best_ask_amount: float | None = None
    index: float | None = None
    funding_mark: float | None = None
    delta: float | None = None


class ThalexPosition(ThalexObject):
    """The two fields of api.yaml `PortfolioEntry` a closure needs."""

    instrument_name: str
    position: float


class ThalexPortfolioEntry(ThalexPosition):
    """api.yaml `PortfolioEntry`, as the portfolio's ledger needs it.

    api.yaml requires no field of it: only `instrument_name` and `position` are required here
    (without them a line says nothing the guardian can use); every other field may be missing or
    null (None), so one line without a mark does not cost the account its portfolio.
    """

    mark_price: float | None = None
    average_price: float | None = None
    start_price: float | None = None
    realised_pnl: float | None = None
    unrealised_pnl: float | None = None
    unrealised_perpetual_funding: float | None = None
    perpetual_funding_entry_value: float | None = None


class ThalexIndex(ThalexObject):
    """api.yaml `Index` (the `price_index.<underlying>` notification)."""

    price: float
    timestamp: float | None = None


class ThalexInstrument(ThalexObject):
    """api.yaml `Instrument`."""

    instrument_name: str
    type: str
    product: str
    underlying: str
    tick_size: float
    volume_tick_size: float
    min_order_amount: float
    expiration_timestamp: float | None = None


class ThalexBookUpdate(ThalexObject):
    """The `book.<instrument>.<grouping>.<nlevels>.<delay>` notification (level changes)."""

    bid_changes: list[list[Any]] = []
    ask_changes: list[list[Any]] = []
    time: float | None = None


class ThalexBook(ThalexObject):
    """The `public/book` answer: levels `[price, amount, ...]`, best first."""

    bids: list[list[float]] = []
    asks: list[list[float]] = []
    time: float | None = None


class ThalexOrderFill(ThalexObject):
    """api.yaml `OrderFill`: one trade of an order, as the insert answer lists it."""

    trade_id: str
    price: float
    amount: float


class ThalexOrderStatus(ThalexObject):
    """api.yaml `OrderStatus` (the answer to `private/insert`, the rows of `private/open_orders`)."""

    order_id: str
    instrument_name: str | None = None
    filled_amount: float
    fills: list[ThalexOrderFill]
    label: str | None = None


class ThalexTradeHistory(ThalexObject):
    """The `private/trade_history` answer: a page of trades (each validated alone) and the next bookmark."""

    trades: list[Any] = []
    bookmark: str | None = None


class ThalexSystemEvent(ThalexObject):
    """api.yaml `SystemEvent` on the `system` channel (`reconnect`: the server will close this connection)."""

    event: str


M = TypeVar("M", bound=BaseModel)


def problems(error: ValidationError) -> str:
    """A validation error as `field: message; ...`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or '<object>'}: {item['msg']}" for item in error.errors()
    )


def parse(model: type[M], what: str, data: Any) -> M:
    """Validate one exchange object or raise `MalformedMessage` naming `what` and the fields."""
    if not isinstance(data, Mapping):
        raise MalformedMessage(f"{what}: expected an object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MalformedMessage(f"{what}: {problems(exc)}") from None


def parse_list(model: type[M], what: str, data: Any) -> list[M]:
    """A JSON array of exchange objects, each validated (the first bad one raises)."""
    if not isinstance(data, list):
        raise MalformedMessage(f"{what}: expected an array, got {type(data).__name__}")
    return [parse(model, what, item) for item in data]
