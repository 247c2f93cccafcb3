"""Dust: a position no order can close (pure).

Thalex refuses an order below the instrument's `min_order_amount`, or off its `volume_tick_size`.
What is left of a position smaller than that — a closure's remainder after a partial fill, an RFQ or
block trade off the volume tick — can be closed by nobody with an order: it stays until it expires
or the trader trades it up. The guardian keeps valuing it (its P&L is real) but never decides to
close on its account: a closure of dust alone closes nothing and wipes everyone's quotes
(docs/operations.md, "Dust").

The portfolio knows each instrument's sizes (`tp:instruments`), so it says which positions are dust
(`Snapshot.dust`); the rule is the executor's own (`executor.plan.order_amount` sends nothing
for such a position), so what the portfolio calls dust is exactly what the executor would not send.
"""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal

from services.common.contracts import InstrumentInfo

EPS = 1e-12
"""The executor's amount tolerance (`executor.plan.EPS`): a remainder computed from fills keeps its
last lot."""
_NEAR = 1e-9
"""Relative band around `min_order_amount` where the exact (decimal) rounding decides."""


def closable(position: float, info: InstrumentInfo | None) -> bool:
    """Whether an order can close some of `position`: rounded down to the volume tick, at least
    `min_order_amount` (as `executor.plan.order_amount` rounds). An unknown instrument is taken as
    closable: without its sizes nothing is known to stop an order."""
    size = abs(position)
    if size == 0.0:
        return False
    if info is None:
        return True
    minimum, tick = info.min_order_amount, info.volume_tick_size
    if size >= minimum + tick:
        return True  # rounding down loses less than one tick
    if size < minimum * (1.0 - _NEAR) - 2 * EPS:
        return False
    steps = (Decimal(repr(size + EPS)) / Decimal(repr(tick))).to_integral_value(rounding=ROUND_FLOOR)
    return float(steps * Decimal(repr(tick))) >= minimum - EPS


def is_dust(position: float, info: InstrumentInfo | None) -> bool:
    """A position that is open, yet no order can close (see `closable`)."""
    return position != 0.0 and not closable(position, info)


def dust_words(instrument: str, amount: float, info: InstrumentInfo | None) -> str:
    """One dust position for the trader (the portfolio's log, the executor's `completed`): its size
    against what an order needs."""
    sizes = "" if info is None else (
        f" (minimum order {info.min_order_amount:g}, volume tick {info.volume_tick_size:g})")
    return f"{instrument} {amount:g}{sizes}"


__all__ = ["closable", "dust_words", "is_dust"]
