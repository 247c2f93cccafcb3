"""Who breaks a halt (pure: no I/O, no clock — `now` is passed in).

While `tp:halt` is set, nothing but the executor's closing orders should trade the account.
Ingest hears the exchange's own account channels, so it sees whoever does anyway: a quoter that
does not read `tp:halt`, a Thalex bot, a stop order, another program on the same key. This module
turns a notification of those channels into `HaltViolation`s, each attributed as precisely as
Thalex's messages allow:

* `account.orders` — an order inserted or amended (`change_reason` `insert` / `amend`): its
  label, client order id, and `bot_id` / `conditional_order_id` when a bot or a stop released it.
  Orders that already existed (`existing`, the snapshot on subscribing) and the exchange's own
  (`insert_reason` `liquidation`) are not anyone's breach; nor is an amend that only takes away —
  the order gone, or smaller at the same price — which is what the exchange itself sends when it
  trims another program's reduce-only order as the guardian closes the position under it (an order
  seen before is remembered, `OrderMemory`, to tell).
* `account.conditional_orders`, `account.bots` — the full list on every change: a conditional
  order `created`/`active`, a bot `active`, while the halt is set (once per id and halt).
* `account.trade_history` — a trade of the account (`normal`, `block`, `combo`, `rfq`).

The executor's own orders and trades carry its label (`tp-` + 26 base32 characters, see
`contracts.is_guardian_label`) and are never violations. Thalex names no session or key on these
messages: the label (and client order id) is what tells one program from another, so quoters
should label their orders. Each order, trade, bot or conditional order is reported once per halt.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from services.common.contracts import Halt, HaltViolation, Side, ViolationKind, is_guardian_label

ORDERS = "account.orders"
CONDITIONAL_ORDERS = "account.conditional_orders"
BOTS = "account.bots"
TRADES = "account.trade_history"
CHANNELS = (ORDERS, CONDITIONAL_ORDERS, BOTS)
"""The channels ingest subscribes for this watch (trades it follows anyway)."""

NEW_ORDER = frozenset({"insert", "amend"})
LIVE_CONDITIONAL = frozenset({"created", "active"})
TRADER_TRADES = frozenset({"normal", "block", "combo", "rfq"})
"""Trade types a program on the account makes (not expirations, marks, transfers or liquidations)."""
REMEMBERED = 100_000
"""Ids remembered per halt (an endless rogue cannot grow memory without bound)."""


def halted(halt: Halt | None, now: float) -> bool:
    """A halt is in force until its `until` (an operator halt has none: until `resume`)."""
    return halt is not None and (halt.until is None or now < halt.until)


def _text(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _side(value: Any) -> Side | None:
    return Side(value) if value in ("buy", "sell") else None


@dataclass(frozen=True)
class Sighting:
    """Something on the account that is not the guardian's, before knowing whether a halt is set."""

    key: str
    """`kind:id`, to report each thing once per halt."""
    kind: ViolationKind
    fields: dict[str, Any]


GONE = frozenset({"cancelled", "cancelled_partially_filled", "filled"})
"""An order's final statuses: nothing of it can trade any more."""


@dataclass
class OrderMemory:
    """The price and amount each order of the account last had, to tell an amend that only takes
    away from one that adds (bounded: the oldest are forgotten first)."""

    last: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def only_takes_away(self, order_id: str, item: dict[str, Any]) -> bool:
        """Note the order's state; True for an amend that leaves it gone, or smaller at its price."""
        price, amount = _number(item.get("price")), _number(item.get("amount"))
        before = self.last.pop(order_id, None)
        gone = item.get("status") in GONE
        if not gone:
            self.last[order_id] = (price, amount)
            if len(self.last) > REMEMBERED:
                del self.last[next(iter(self.last))]
        if item.get("change_reason") != "amend":
            return False
        return gone or (before is not None and before[0] == price and amount is not None
                        and before[1] is not None and amount <= before[1])


def _order(item: dict[str, Any], memory: OrderMemory | None = None) -> Sighting | None:
    order_id = _text(item.get("order_id"))
    if memory is not None and order_id is not None and memory.only_takes_away(order_id, item):
        return None
    if item.get("change_reason") not in NEW_ORDER or item.get("insert_reason") == "liquidation":
        return None
    label = _text(item.get("label"))
    if is_guardian_label(label) or order_id is None:
        return None
    bot_id, conditional_id = _text(item.get("bot_id")), _text(item.get("conditional_order_id"))
    kind = (ViolationKind.BOT_ORDER if bot_id else ViolationKind.CONDITIONAL_TRIGGER if conditional_id
            else ViolationKind.ORDER)
    return Sighting(f"order:{order_id}", kind, {
        "instrument": _text(item.get("instrument_name")), "side": _side(item.get("direction")),
        "amount": _number(item.get("amount")), "price": _number(item.get("price")), "order_id": order_id,
        "label": label, "bot_id": bot_id, "conditional_order_id": conditional_id,
        "client_order_id": _integer(item.get("client_order_id")),
        "exchange_ts": _number(item.get("create_time"))})


def _conditional(item: dict[str, Any]) -> Sighting | None:
    order_id = _text(item.get("order_id"))
    if item.get("status") not in LIVE_CONDITIONAL or order_id is None:
        return None
    return Sighting(f"conditional:{order_id}", ViolationKind.CONDITIONAL_ORDER, {
        "instrument": _text(item.get("instrument_name")), "side": _side(item.get("direction")),
        "amount": _number(item.get("amount")), "price": _number(item.get("stop_price")),
        "conditional_order_id": order_id, "label": _text(item.get("label")),
        "exchange_ts": _number(item.get("create_time"))})


def _bot(item: dict[str, Any]) -> Sighting | None:
    bot_id = _text(item.get("bot_id"))
    if item.get("status") != "active" or bot_id is None:
        return None
    return Sighting(f"bot:{bot_id}", ViolationKind.BOT, {
        "instrument": _text(item.get("instrument_name")), "bot_id": bot_id, "label": _text(item.get("label")),
        "strategy": _text(item.get("strategy"))})


def _trade(item: dict[str, Any]) -> Sighting | None:
    trade_id, label = _text(item.get("trade_id")), _text(item.get("label"))
    if trade_id is None or is_guardian_label(label) or item.get("trade_type", "normal") not in TRADER_TRADES:
        return None
    return Sighting(f"trade:{trade_id}", ViolationKind.TRADE, {
        "instrument": _text(item.get("instrument_name")), "side": _side(item.get("direction")),
        "amount": _number(item.get("amount")), "price": _number(item.get("price")), "trade_id": trade_id,
        "order_id": _text(item.get("order_id")), "label": label, "bot_id": _text(item.get("bot_id")),
        "client_order_id": _integer(item.get("client_order_id")),
        "exchange_ts": _number(item.get("time"))})


READERS = {ORDERS: _order, CONDITIONAL_ORDERS: _conditional, BOTS: _bot, TRADES: _trade}


def sightings(channel: str, notification: Any, orders: OrderMemory | None = None) -> Iterator[Sighting]:
    """What in one notification of an account channel is not the guardian's (whatever the halt).

    `orders`: what the account's orders were, so an amend that only takes away is no sighting.
    """
    read = partial(_order, memory=orders) if channel == ORDERS else READERS.get(channel)
    if read is None or not isinstance(notification, list):
        return
    for item in notification:
        if isinstance(item, dict):
            found = read(item)
            if found is not None:
                yield found


@dataclass
class HaltWatch:
    """Turns sightings into violations of the halt in force, each thing once per halt."""

    halt_since: float | None = None
    reported: dict[str, None] = field(default_factory=dict)

    def violations(self, halt: Halt | None, seen: list[Sighting], now: float) -> list[HaltViolation]:
        if not halted(halt, now):
            return []
        assert halt is not None
        if halt.since != self.halt_since:  # a new halt: everything may break it again
            self.halt_since, self.reported = halt.since, {}
        out = []
        for sighting in seen:
            if sighting.key in self.reported:
                continue
            self.reported[sighting.key] = None
            if len(self.reported) > REMEMBERED:
                del self.reported[next(iter(self.reported))]
            given = {k: v for k, v in sighting.fields.items() if v is not None}
            out.append(HaltViolation(kind=sighting.kind, halt_reason=halt.reason, halt_since=halt.since,
                                     halt_command_id=halt.command_id, **given))
        return out
