"""Small builders for snapshots and configs; every test reads its numbers off the call."""

from __future__ import annotations

from services.common.config import PortfolioTakeProfit
from services.common.contracts import InstrumentType, Snapshot, SnapshotPosition

NOW = 1_700_000_000.0


def pos(
    instrument: str = "BTC-PERPETUAL",
    position: float = 1.0,
    *,
    underlying: str | None = "BTCUSD",
    instrument_type: InstrumentType | None = InstrumentType.PERPETUAL,
    expiry_ts: float | None = None,
    opened_ts: float | None = None,
    volume_tick_size: float | None = None,
) -> SnapshotPosition:
    return SnapshotPosition(
        instrument=instrument,
        position=position,
        avg_entry=100.0,
        mark=100.0,
        exit_price=100.0,
        realized_pnl=0.0,
        unrealized_pnl=0.0,
        funding_pnl=0.0,
        fees_paid=0.0,
        est_close_fee=0.0,
        opened_ts=opened_ts,
        underlying=underlying,
        instrument_type=instrument_type,
        expiry_ts=expiry_ts,
        volume_tick_size=volume_tick_size,
    )


def snap(
    seq: int,
    net_after_close: float = 0.0,
    *,
    epoch: int = 1,
    ts: float | None = None,
    net_pnl: float | None = None,
    positions: list[SnapshotPosition] | None = None,
    stale: list[str] | None = None,
    oldest: float | None = None,
    dust: list[str] | None = None,
) -> Snapshot:
    """A snapshot whose only interesting numbers are the ones passed in (`dust`: the portfolio's list
    of positions no order can close)."""
    net = net_after_close if net_pnl is None else net_pnl
    return Snapshot(
        seq=seq,
        epoch=epoch,
        ts=NOW + seq if ts is None else ts,
        positions=[pos()] if positions is None else positions,
        realized_pnl=0.0,
        unrealized_pnl=net,
        funding_pnl=0.0,
        fees_paid=0.0,
        est_close_fees=0.0,
        est_slippage=0.0,
        gross_pnl=net,
        net_pnl=net,
        net_after_close=net_after_close,
        oldest_position_ts=NOW if oldest is None else oldest,
        stale_instruments=stale or [],
        dust=dust,
    )


def cfg(**overrides: object) -> PortfolioTakeProfit:
    """Seed defaults (min profit 1.10, emergency -10, partial 0.5 @ 50%), trailing off, no cool-down."""
    values: dict[str, object] = {"cooldown_seconds": 0.0}
    values.update(overrides)
    return PortfolioTakeProfit(**values)
