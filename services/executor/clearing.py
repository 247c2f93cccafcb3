"""Clearing the account before a closure, so the closure stays closed (pure: no I/O, no clock).

`cancel_all` leaves mass quotes, conditional orders and Thalex's server-side bots alone, and each
of them can rebuild a position the executor just closed. A clearing round removes every kind
`[executor]` enables, in one burst of requests on the executor's session:

    cancel_all · open_orders · cancel_mass_quote · open_orders · conditional_orders ·
    cancel_all_conditional_orders · bots · cancel_all_bots

The exchange handles a connection's requests in order, so each listing shows the account just
before (or, for the second `open_orders`, just after) the cancel beside it: that is how a report
can say what a cancel removed when its answer is only `null`. The shell sends the round before
the first closing order and again before each later wave (a quoter or bot that came back in the
meantime is removed again); this module says which requests make a round and turns their
answers into `Removed` reports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common.contracts import ExchangeError, RemovalKind, Removed, Report, ReportStatus
from services.executor.plan import Progress

STATUS = {
    RemovalKind.ORDERS: ReportStatus.ORDERS_CANCELLED,
    RemovalKind.MASS_QUOTES: ReportStatus.MASS_QUOTES_CANCELLED,
    RemovalKind.CONDITIONAL_ORDERS: ReportStatus.CONDITIONAL_ORDERS_CANCELLED,
    RemovalKind.BOTS: ReportStatus.BOTS_CANCELLED,
}

CANCEL = {
    RemovalKind.ORDERS: "cancel_all",
    RemovalKind.MASS_QUOTES: "cancel_mass_quote",
    RemovalKind.CONDITIONAL_ORDERS: "cancel_all_conditional_orders",
    RemovalKind.BOTS: "cancel_all_bots",
}
"""The `thalex.Thalex` method removing each kind."""

REQUESTS = {
    RemovalKind.ORDERS: ("cancel_all",),
    RemovalKind.MASS_QUOTES: ("open_orders", "cancel_mass_quote", "open_orders"),
    RemovalKind.CONDITIONAL_ORDERS: ("conditional_orders", "cancel_all_conditional_orders"),
    RemovalKind.BOTS: ("bots", "cancel_all_bots"),
}
"""Each kind's requests, in sending order: its cancel with the listings that tell what it removed."""

LIVE_CONDITIONAL = frozenset({"created", "active"})
"""Conditional order statuses that can still release an order (api.yaml `ConditionalOrder.status`)."""
LIVE_BOT = frozenset({"active"})


@dataclass(frozen=True)
class Answer:
    """One request of a round: its result, or the exchange's refusal, or neither (lost, unreadable)."""

    result: Any = None
    error: ExchangeError | None = None
    answered: bool = True


def kinds(orders: bool, mass_quotes: bool, conditional_orders: bool, bots: bool) -> tuple[RemovalKind, ...]:
    """The kinds `[executor]` enables, in the order a round removes them (plain orders first)."""
    enabled = {RemovalKind.ORDERS: orders, RemovalKind.MASS_QUOTES: mass_quotes,
               RemovalKind.CONDITIONAL_ORDERS: conditional_orders, RemovalKind.BOTS: bots}
    return tuple(kind for kind, on in enabled.items() if on)


def round_requests(enabled: tuple[RemovalKind, ...]) -> list[tuple[RemovalKind, str]]:
    """Every request of one round, in the order it must reach the exchange."""
    return [(kind, method) for kind in enabled for method in REQUESTS[kind]]


def _items(result: Any, id_field: str, live: frozenset[str] | None) -> dict[str, str | None] | None:
    """id → label of the listed items (only the live ones when `live` is given); None: unreadable."""
    if not isinstance(result, list):
        return None
    out: dict[str, str | None] = {}
    for item in result:
        if not isinstance(item, dict) or not isinstance(item.get(id_field), str):
            return None
        if live is not None and item.get("status") not in live:
            continue
        label = item.get("label")
        out[item[id_field]] = str(label) if label is not None else None
    return out


def _listed(answer: Answer, id_field: str,
            live: frozenset[str] | None = None) -> dict[str, str | None] | None:
    return _items(answer.result, id_field, live) if answer.answered and answer.error is None else None


def removed(kind: RemovalKind, answers: list[Answer], round_no: int) -> tuple[Removed, ExchangeError | None]:
    """What one kind's requests removed, and the cancel's refusal (if it was refused)."""
    cancel = answers[1] if kind is not RemovalKind.ORDERS else answers[0]
    gone: dict[str, str | None] | None = None
    count: int | None = None
    if kind is RemovalKind.ORDERS:
        result = cancel.result
        if cancel.answered and cancel.error is None and isinstance(result, int | float) \
                and not isinstance(result, bool) and result >= 0:
            count = int(result)
    elif kind is RemovalKind.MASS_QUOTES:
        before, after = _listed(answers[0], "order_id"), _listed(answers[2], "order_id")
        if before is not None and after is not None:
            gone = {i: label for i, label in before.items() if i not in after}
    else:
        live = LIVE_BOT if kind is RemovalKind.BOTS else LIVE_CONDITIONAL
        gone = _listed(answers[0], "bot_id" if kind is RemovalKind.BOTS else "order_id", live)
    if cancel.error is not None or not cancel.answered:
        gone, count = None, None  # a refused or unanswered cancel removed nothing we can vouch for
    if gone is not None:
        count = len(gone)
    labels = sorted({label for label in gone.values() if label is not None}) if gone else None
    ids = sorted(gone) if gone else None
    return Removed(kind=kind, round=round_no, count=count, ids=ids, labels=labels), cancel.error


def clearing_reports(progress: Progress, enabled: tuple[RemovalKind, ...], answers: list[Answer],
                     round_no: int, now: float) -> list[Report]:
    """The round's reports, one per kind; a repeated round reports only what removed something or failed.

    `answers` are in `round_requests(enabled)` order.
    """
    reports: list[Report] = []
    at = 0
    for kind in enabled:
        size = len(REQUESTS[kind])
        what, error = removed(kind, answers[at:at + size], round_no)
        at += size
        quiet = what.count == 0 and error is None
        if round_no > 1 and quiet:
            continue
        fields: dict[str, object] = {"removed": what}
        if error is not None:
            fields["error"] = error
        reports.append(progress.report(STATUS[kind], now, **fields))
    return reports


def cancel_refused(enabled: tuple[RemovalKind, ...], answers: list[Answer]) -> Mapping[RemovalKind, Answer]:
    """The cancels among `answers` that the exchange refused or did not answer, by kind."""
    out: dict[RemovalKind, Answer] = {}
    for (kind, method), answer in zip(round_requests(enabled), answers, strict=True):
        if method == CANCEL[kind] and (answer.error is not None or not answer.answered):
            out[kind] = answer
    return out
