"""Are the prices ingest passes on fresh? Judged by the exchange's own timestamps, not by arrival.

A probe saw ingest healthy with `tp_ingest_seconds_since_last_message` near 0 while the ticks it
wrote were 24 s old (a slowed feed: messages keep arriving, each carrying an old mark), and healthy
on a starved feed (nothing arriving for a position's instrument). What matters to the guardian is
the age of the data behind each open position: the newest tick's `exchange_ts` (the ticker's
`mark_timestamp`, or a later book update) against the clock. Pure: `now` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from services.common.contracts import Tick


def stale_prices(open_positions: Iterable[str], ticks: Mapping[str, Tick],
                 followed_since: Mapping[str, float], now: float, max_age: float) -> list[str]:
    """Why each open position's prices are not fresh; empty when they all are.

    A position whose instrument has a tick is stale when that tick's exchange time is more than
    `max_age` seconds old; one with no tick yet, when its ticker was subscribed more than `max_age`
    seconds ago (`followed_since`; not subscribed yet: not judged here — the portfolio flags a
    position without prices).
    """
    problems = []
    for name in sorted(set(open_positions)):
        tick = ticks.get(name)
        if tick is not None:
            age = now - tick.exchange_ts
            if age > max_age:
                problems.append(f"{name} price {age:.1f} s old by the exchange's clock")
            continue
        since = followed_since.get(name)
        if since is not None and now - since > max_age:
            problems.append(f"{name} no price in the {now - since:.1f} s since subscribing")
    return problems


__all__ = ["stale_prices"]
