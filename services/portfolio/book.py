"""Pricing a close into the book the tick carries.

A long closes by selling into the bids, a short by buying from the asks. The
evidence is used best first:

1. `BOOK`: the levels the tick carries for that side are walked for the whole
   size; the exit price is the volume-weighted average of the levels hit. When
   the carried levels are not deep enough, the rest is priced at the worst
   carried level and `beyond_depth` is set (the real cost is probably worse:
   the book beyond the carried depth is unknown).
2. `TOP_OF_BOOK`: no levels, but a best bid (long) / best ask (short): the
   whole size at that price (depth unknown).
3. `MARK`: the side a close would hit is empty or unknown: valued at mark and
   flagged by the source, because nobody is there to take the position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.contracts import BookLevel, ExitPriceSource

FILLED_TOLERANCE = 1e-12
"""Relative rest of the size below which a walk counts as fully filled (float noise)."""


@dataclass(frozen=True, slots=True)
class ExitQuote:
    """What closing a position into the book would fetch, per unit."""

    price: float
    source: ExitPriceSource
    beyond_depth: bool = False
    """The carried levels were too thin: the rest was priced at the worst carried level."""


def walk_levels(levels: Sequence[BookLevel], size: float) -> tuple[float, bool]:
    """Average price of taking `size` (> 0) from `levels` (best first).

    Returns `(vwap, beyond_depth)`; the part the levels cannot fill is priced
    at the worst (last) carried level.
    """
    rest = size
    cost = 0.0
    for price, amount in levels:
        take = min(rest, amount)
        cost += price * take
        rest -= take
        if rest <= size * FILLED_TOLERANCE:
            return cost / size, False
    cost += levels[-1][0] * rest
    return cost / size, True


def exit_quote(
    position: float,
    mark: float,
    best_bid: float | None,
    best_ask: float | None,
    bids: Sequence[BookLevel] | None,
    asks: Sequence[BookLevel] | None,
) -> ExitQuote:
    """Where closing `position` (signed) would get out; mark for a flat position."""
    if position > 0:
        levels, best = bids, best_bid
    elif position < 0:
        levels, best = asks, best_ask
    else:
        return ExitQuote(mark, ExitPriceSource.MARK)
    if levels:
        price, beyond = walk_levels(levels, abs(position))
        return ExitQuote(price, ExitPriceSource.BOOK, beyond)
    if best is not None:
        return ExitQuote(best, ExitPriceSource.TOP_OF_BOOK)
    return ExitQuote(mark, ExitPriceSource.MARK)
