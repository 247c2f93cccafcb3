"""The account's portfolio as the exchange last showed it, read line by line (pure: no I/O, no clock).

Thalex sends the whole portfolio (`private/portfolio`, and the first `account.portfolio`
notification after subscribing), then only the lines that changed; ingest merges them and publishes
the whole view on `tp:positions`, where an instrument that is not listed is flat.

One line that cannot be read (no `instrument_name`, no `position`, a field of the wrong type) is
refused alone: the other lines of its message are kept. But the view is then no longer the whole
portfolio: the refused instrument may hold a position, and published without it, the portfolio
would take it as flat (reconciliation adopts that after `drift_grace_seconds`) and ingest would
stop following its prices — a position nobody guards, with every health check green. So while a
line is unreadable the view is *incomplete*: what is known is kept (the instrument's last readable
line too), nothing is published as the whole portfolio, and ingest's `/health` names the
instrument, until a readable line for it arrives — or, for a line without a name or a message
that was not even a list, until a whole portfolio reads cleanly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from services.common.contracts import ExchangePosition
from services.common.thalex.models import MalformedMessage
from services.ingest.translate import position_from_entry

UNNAMED = "<a line without instrument_name>"
"""Stands for the instrument of a refused line that does not say which it is."""


@dataclass(frozen=True)
class RefusedLine:
    """A portfolio line that could not be read: what it was, whose (when it says), and why."""

    line: Any
    instrument: str | None
    reason: str


@dataclass(frozen=True)
class Merged:
    """What one portfolio message changed."""

    read: list[ExchangePosition]
    """Its readable lines, in order."""
    refused: list[RefusedLine]
    """Its unreadable lines (each to be dead-lettered alone)."""
    absent_is_flat: bool
    """Whether an instrument the message does not list is flat: a whole portfolio in which every
    refused line at least names its instrument."""


class PortfolioView:
    """The merged portfolio, and which instruments it cannot vouch for."""

    def __init__(self) -> None:
        self.lines: dict[str, ExchangePosition] = {}
        """instrument → its last readable line."""
        self.unreadable: dict[str, str] = {}
        """instrument (or `UNNAMED`) → why its last line could not be read."""

    @property
    def complete(self) -> bool:
        """Every line of the account is known as the exchange last sent it: publishable as the whole."""
        return not self.unreadable

    def merge(self, message: Any, whole: bool) -> Merged:
        """Fold one portfolio message in; `whole` = it is the entire portfolio, not changed lines."""
        results: list[ExchangePosition | RefusedLine]
        if isinstance(message, list):
            results = list(_read(message))
        else:  # not even a list: which lines it held is not known
            reason = f"portfolio: expected an array, got {type(message).__name__}"
            results = [RefusedLine(message, None, reason)]
        refused = [r for r in results if isinstance(r, RefusedLine)]
        read = [r for r in results if isinstance(r, ExchangePosition)]
        unnamed = any(r.instrument is None for r in refused)
        if whole:
            named = {r.instrument for r in refused}
            # a refused line keeps its instrument's last known line; an unnamed one may be any
            # instrument not listed, so none of them is dropped
            if not unnamed:
                self.lines = {n: p for n, p in self.lines.items() if n in named}
            self.unreadable = {}
        for result in results:
            if isinstance(result, RefusedLine):
                self.unreadable[result.instrument or UNNAMED] = result.reason
            else:
                self.lines[result.instrument] = result
                self.unreadable.pop(result.instrument, None)
        return Merged(read, refused, absent_is_flat=whole and not unnamed)

    def why_incomplete(self) -> str:
        """The instruments the view cannot vouch for, with the reason (empty when complete)."""
        return "; ".join(f"{name}: {reason}" for name, reason in sorted(self.unreadable.items()))


def _read(lines: list[Any]) -> Iterator[ExchangePosition | RefusedLine]:
    for line in lines:
        try:
            yield position_from_entry(line)
        except MalformedMessage as exc:
            yield RefusedLine(line, instrument_of(line), str(exc))


def instrument_of(line: Any) -> str | None:
    """The instrument a raw portfolio line names, if it names one."""
    name = line.get("instrument_name") if isinstance(line, dict) else None
    return name if isinstance(name, str) and name.strip() else None


__all__ = ["UNNAMED", "Merged", "PortfolioView", "RefusedLine", "instrument_of"]
