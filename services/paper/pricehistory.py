"""Mark and index history for ``public/mark_price_historical_data`` and
``public/index_price_historical_data``: one-minute OHLC buckets recorded as the market moves,
aggregated on request. Perpetual buckets carry the funding paid by one long contract in the
bucket; option buckets the implied volatility; one-minute buckets the top of the book at the
start of the minute. At most ``MAX_MINUTES`` buckets are kept per series (about two weeks).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_MINUTES = 20_000
RESOLUTIONS: dict[str, int] = {
    "1m": 60,
    "5m": 300,
    "15m": 900,
    "30m": 1800,
    "1h": 3600,
    "1d": 86_400,
    "1w": 604_800,
}
WEEK_OFFSET = 4 * 86_400
"""Unix time 0 was a Thursday: weeks start on Monday 00:00 UTC."""


@dataclass
class Bucket:
    open: float
    high: float
    low: float
    close: float
    funding_open: float = 0.0
    funding_close: float = 0.0
    iv: list[float] | None = None
    top: list[Any] | None = None

    def add(self, value: float, funding: float, iv: float | None) -> None:
        self.high, self.low, self.close = max(self.high, value), min(self.low, value), value
        self.funding_close = funding
        if iv is not None and self.iv is not None:
            self.iv = [self.iv[0], max(self.iv[1], iv), min(self.iv[2], iv), iv]


@dataclass
class Series:
    buckets: OrderedDict[int, Bucket] = field(default_factory=OrderedDict)

    def record(
        self,
        now: float,
        value: float,
        funding: float = 0.0,
        iv: float | None = None,
        top: Callable[[], list[Any]] | None = None,
    ) -> None:
        """One sample; ``top`` (the top of the book) is asked for only when a minute starts."""
        minute = int(now // 60) * 60
        bucket = self.buckets.get(minute)
        if bucket is None:
            if self.buckets and minute < next(reversed(self.buckets)):
                return  # the clock never goes back; ignore a late sample
            self.buckets[minute] = Bucket(
                value,
                value,
                value,
                value,
                funding,
                funding,
                None if iv is None else [iv, iv, iv, iv],
                top() if top else None,
            )
            while len(self.buckets) > MAX_MINUTES:
                self.buckets.popitem(last=False)
        else:
            bucket.add(value, funding, iv)

    def points(self, start: float, end: float, step: int) -> tuple[list[tuple[int, list[Bucket]]], bool]:
        """Buckets in [start, end) grouped by ``step``; and whether any data exists up to ``end``."""
        groups: OrderedDict[int, list[Bucket]] = OrderedDict()
        offset = WEEK_OFFSET if step == RESOLUTIONS["1w"] else 0
        for minute, bucket in self.buckets.items():
            if start <= minute < end:
                key = (minute - offset) // step * step + offset
                groups.setdefault(key, []).append(bucket)
        any_data = any(minute < end for minute in self.buckets)
        return list(groups.items()), any_data


@dataclass
class PriceHistory:
    series: dict[str, Series] = field(default_factory=dict)

    def record(self, key: str, now: float, value: float, **extra: Any) -> None:
        self.series.setdefault(key, Series()).record(now, value, **extra)


def ohlc(buckets: list[Bucket]) -> list[float]:
    return [buckets[0].open, max(b.high for b in buckets), min(b.low for b in buckets), buckets[-1].close]
