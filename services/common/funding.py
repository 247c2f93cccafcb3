"""Thalex's daily funding periods: perpetual funding settles every day at 08:00 UTC (pure).

Shared because two services act on the same boundary: the portfolio's ledger settles a period at
the newest funding mark it saw in it, and ingest therefore never coalesces that mark away (its
tick writer keeps only the newest tick of an instrument, except the last one of a period).
"""

from __future__ import annotations

import math

SECONDS_PER_DAY = 86_400.0
FUNDING_SETTLEMENT_SECONDS = 8 * 3_600.0
"""Thalex settles daily at 08:00 UTC (contract specifications of its perpetuals)."""


def funding_period(exchange_ts: float) -> int:
    """The daily funding period of a time: period k starts at the settlement of day k (inclusive)."""
    return math.floor((exchange_ts - FUNDING_SETTLEMENT_SECONDS) / SECONDS_PER_DAY)


def settlement_ts(period: int) -> float:
    """When funding period `period` began (the settlement that opened it)."""
    return period * SECONDS_PER_DAY + FUNDING_SETTLEMENT_SECONDS


__all__ = ["FUNDING_SETTLEMENT_SECONDS", "SECONDS_PER_DAY", "funding_period", "settlement_ts"]
