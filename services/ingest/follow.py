"""Which instruments ingest follows, and so which channels it holds (pure; time passed in).

Ingest watches what can move the account's money and nothing else: every
instrument with a position, every instrument that just traded (a fill in a new
instrument is followed at once, before the portfolio line arrives), and the
configured watch list. An instrument that went flat keeps its feeds for
`flat_after_seconds` — a quoter that flips in and out of a position should not
make ingest churn subscriptions and book snapshots — and is then dropped.

Followed instruments get a ticker; those not on the watch list only (positions
and recent trades) also get the book, so the portfolio can price a close, and
options among them the index of their underlying (`price_index.<underlying>`):
an option's closing fee is on the index notional, and its ticker may carry none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Feed(StrEnum):
    TICKER = "ticker"
    BOOK = "book"
    INDEX = "index"
    """`price_index.<underlying>`: the channel's target is the underlying, not an instrument."""


def ticker_channel(instrument: str, delay: str) -> str:
    """`ticker.<instrument>.<delay>`."""
    return f"ticker.{instrument}.{delay}"


def book_channel(instrument: str, levels: int, delay: str) -> str:
    """`book.<instrument>.none.<nlevels>.<delay>` (no price grouping: the real levels)."""
    return f"book.{instrument}.none.{levels}.{delay}"


def index_channel(underlying: str) -> str:
    """`price_index.<underlying>`."""
    return f"price_index.{underlying}"


@dataclass(frozen=True, slots=True)
class Plan:
    """What to change on the exchange so the subscriptions match what is followed."""

    subscribe: list[str]
    unsubscribe: list[str]

    def __bool__(self) -> bool:
        return bool(self.subscribe or self.unsubscribe)


class Follow:
    """The followed instruments: positions, recent fills, watch list, flat-since timers."""

    def __init__(self, watch_list: Iterable[str], flat_after_seconds: float, ticker_delay: str,
                 book_levels: int) -> None:
        self.watch_list = frozenset(watch_list)
        self.flat_after_seconds = flat_after_seconds
        self.ticker_delay = ticker_delay
        self.book_levels = book_levels
        self.positions: dict[str, float] = {}
        """Instruments with an open position (never zero)."""
        self.flat_since: dict[str, float] = {}
        """Instruments that went flat (or traded without a known position), and since when."""
        self.option_underlyings: dict[str, str] = {}
        """Options (from the instrument metadata) → their underlying, whose index they need."""

    def note_option(self, instrument: str, underlying: str) -> None:
        """`instrument` is an option on `underlying` (its index is followed while it is held)."""
        self.option_underlyings[instrument] = underlying

    def _set(self, instrument: str, position: float, now: float) -> None:
        if position != 0.0:
            self.positions[instrument] = position
            self.flat_since.pop(instrument, None)
        elif instrument in self.positions or instrument not in self.flat_since:
            self.positions.pop(instrument, None)
            self.flat_since[instrument] = now

    def on_fill(self, instrument: str, position_after: float | None, now: float) -> None:
        """A trade: follow its instrument now (even when the position is not known yet)."""
        if position_after is not None:
            self._set(instrument, position_after, now)
        elif instrument not in self.positions:
            self.flat_since[instrument] = now

    def on_portfolio(self, lines: Iterable[tuple[str, float]], now: float, complete: bool,
                     unreadable: Iterable[str] = ()) -> None:
        """Portfolio lines `(instrument, position)`; `complete` = the whole portfolio.

        In a complete view an instrument that is not listed is flat. `unreadable`: instruments whose
        line could not be read — their position is not known, so they stay as they were, and one not
        followed yet is followed now (as after a fill whose position is not known): never taken as flat.
        """
        seen = set()
        for instrument, position in lines:
            seen.add(instrument)
            self._set(instrument, position, now)
        for instrument in unreadable:  # followed, as a trade of it would be
            seen.add(instrument)
            self.on_fill(instrument, None, now)
        if complete:
            for instrument in [i for i in self.positions if i not in seen]:
                self._set(instrument, 0.0, now)

    def instruments(self, now: float) -> set[str]:
        """Every instrument followed at `now` (forgets the ones flat for long enough)."""
        expired = [i for i, since in self.flat_since.items() if now - since >= self.flat_after_seconds]
        for instrument in expired:
            del self.flat_since[instrument]
        return set(self.positions) | set(self.flat_since) | self.watch_list

    def wanted(self, now: float) -> dict[str, tuple[Feed, str]]:
        """channel → (feed, instrument) for everything that should be subscribed at `now`."""
        channels: dict[str, tuple[Feed, str]] = {}
        for instrument in self.instruments(now):
            channels[ticker_channel(instrument, self.ticker_delay)] = (Feed.TICKER, instrument)
            if instrument in self.positions or instrument in self.flat_since:
                book = book_channel(instrument, self.book_levels, self.ticker_delay)
                channels[book] = (Feed.BOOK, instrument)
                underlying = self.option_underlyings.get(instrument)
                if underlying is not None:
                    channels[index_channel(underlying)] = (Feed.INDEX, underlying)
        return channels

    def guards(self, feed: Feed, target: str) -> bool:
        """The feed prices an open position (its ticker or book, the index of a held option's
        underlying): without it the exit is priced blind, so a refusal of it is never let be."""
        if feed is Feed.INDEX:
            return any(self.option_underlyings.get(instrument) == target for instrument in self.positions)
        return target in self.positions

    def plan(self, now: float, subscribed: Iterable[str]) -> Plan:
        """The subscribe/unsubscribe that turns `subscribed` into `wanted(now)` (sorted, stable)."""
        wanted = self.wanted(now)
        held = set(subscribed)
        return Plan(subscribe=sorted(set(wanted) - held), unsubscribe=sorted(held - set(wanted)))
