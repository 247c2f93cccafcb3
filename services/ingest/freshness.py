"""Are the prices ingest passes on fresh? Judged by the exchange's own timestamps, not by arrival.

A probe saw ingest healthy with `tp_ingest_seconds_since_last_message` near 0 while the ticks it
wrote were 24 s old (a slowed feed: messages keep arriving, each carrying an old mark), and healthy
on a starved feed (nothing arriving for a position's instrument). What matters to the guardian is
the age of the data behind each open position: when the exchange marked the newest tick's mark
(`Tick.mark_time`: the ticker's `mark_timestamp`) against the clock. A book change re-issues the
last mark with the book's time as `exchange_ts`; judged on that, a live book made a frozen mark look
fresh (a slowed or silent ticker behind a moving book), while the portfolio valued the position at
it. The book refreshes the exit price, never the mark's age. Pure: `now` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.common.contracts import Tick


def stale_prices(open_positions: Iterable[str], ticks: Mapping[str, Tick],
                 followed_since: Mapping[str, float], now: float, max_age: float) -> list[str]:
    """Why each open position's prices are not fresh; empty when they all are.

    A position whose instrument has a tick is stale when its mark was marked more than `max_age`
    seconds ago by the exchange's clock (`Tick.mark_time`; a tick without `mark_ts` is as old as
    its `exchange_ts`, as before the field); one with no tick yet, when its ticker was subscribed
    more than `max_age` seconds ago (`followed_since`; not subscribed yet: not judged here — the
    portfolio flags a position without prices).
    """
    problems = []
    for name in sorted(set(open_positions)):
        tick = ticks.get(name)
        if tick is not None:
            age = now - tick.mark_time
            if age > max_age:
                note = _book_note(tick, now)
                problems.append(f"{name} price {age:.1f} s old by the exchange's clock{note}")
            continue
        since = followed_since.get(name)
        if since is not None and now - since > max_age:
            problems.append(f"{name} no price in the {now - since:.1f} s since subscribing")
    return problems


def _book_note(tick: Tick, now: float) -> str:
    """Says the book is newer than the mark, so an operator seeing it move does not trust the mark."""
    if tick.mark_ts is None:
        return ""
    return f" (the mark's; its book moved {now - tick.exchange_ts:.1f} s ago)"


__all__ = ["stale_prices"]
