"""When a closure ends the epoch, and what it really cost against the estimate (pure, by hand)."""

from __future__ import annotations

import pytest

from services.common.contracts import Report, ReportStatus, Snapshot, SnapshotPosition
from services.portfolio.closures import (
    EPOCH_END_WAIT_SECONDS,
    Calibrations,
    EpochEnd,
    epoch_end_for,
    epoch_ends,
)

T = 1_000.0


def report(status: ReportStatus, *, epoch: int | None = 3, fraction: float | None = 1.0,
           **fields: object) -> Report:
    return Report(command_id="c1", status=status, epoch=epoch, fraction=fraction, ts=T,
                  **fields)  # type: ignore[arg-type]


def snapshot() -> Snapshot:
    """Long 0.5 PERP at mark 100,000, short 2 CALL at mark 50; estimated 30 fees and 20 slippage."""
    def pos(name: str, position: float, mark: float) -> SnapshotPosition:
        return SnapshotPosition(instrument=name, position=position, avg_entry=mark, mark=mark,
                                exit_price=mark, realized_pnl=0.0, unrealized_pnl=0.0, funding_pnl=0.0,
                                fees_paid=0.0, est_close_fee=0.0, est_slippage=0.0, opened_ts=T)

    return Snapshot(seq=1, epoch=3, ts=T, positions=[pos("PERP", 0.5, 100_000.0), pos("CALL", -2.0, 50.0)],
                    realized_pnl=0.0, unrealized_pnl=0.0, funding_pnl=0.0, fees_paid=0.0,
                    est_close_fees=30.0, est_slippage=20.0, gross_pnl=0.0, net_pnl=0.0, net_after_close=-53.0,
                    oldest_position_ts=T, stale_instruments=[])


def test_only_a_full_closures_completed_for_this_epoch_starts_the_wait() -> None:
    assert epoch_end_for(report(ReportStatus.COMPLETED), 3, T) == EpochEnd(3, "c1",
                                                                            T + EPOCH_END_WAIT_SECONDS)
    assert epoch_end_for(report(ReportStatus.COMPLETED, epoch=None, fraction=None), 3, T) is not None
    assert epoch_end_for(report(ReportStatus.COMPLETED, fraction=0.5), 3, T) is None  # partial
    assert epoch_end_for(report(ReportStatus.COMPLETED, epoch=2), 3, T) is None  # an old epoch's
    assert epoch_end_for(report(ReportStatus.FAILED), 3, T) is None
    cancel_only = report(ReportStatus.COMPLETED).model_copy(update={"command_id": "e3-circuit_breaker-s9-n2"})
    assert epoch_end_for(cancel_only, 3, T) is None  # closed nothing: docs/streams.md


def test_the_epoch_ends_when_flat_or_when_the_wait_ran_out() -> None:
    end = EpochEnd(3, "c1", T + 10)
    assert epoch_ends(end, flat=True, now=T)
    assert not epoch_ends(end, flat=False, now=T + 9.9)
    assert epoch_ends(end, flat=False, now=T + 10)


def test_a_closure_is_checked_against_the_estimate_it_started_from() -> None:
    calibrations = Calibrations(fee_estimation_buffer=1.1)
    assert calibrations.on_report(report(ReportStatus.RECEIVED), snapshot()) is None
    # sold 0.5 PERP at 99,900 (fee 25) and bought back 2 CALL at 51 (fee 1.5)
    calibrations.on_report(report(ReportStatus.FILLED, instrument="PERP", filled=0.5, avg_price=99_900.0,
                                  fee=25.0), None)
    calibrations.on_report(report(ReportStatus.FILLED, instrument="CALL", filled=2.0, avg_price=51.0,
                                  fee=1.5), None)
    check = calibrations.on_report(report(ReportStatus.COMPLETED), None)
    assert check is not None
    # estimated: 30 x 1.1 + 20 = 53
    # actual: 25 + (100,000 - 99,900) x 0.5 = 75 for PERP; 1.5 + (50 - 51) x -2 = 3.5 for CALL; 78.5
    assert (check.estimated, check.actual, check.error) == pytest.approx((53.0, 78.5, 25.5))
    assert calibrations.open == {}


def test_a_closure_without_fills_or_seen_only_halfway_is_not_checked() -> None:
    calibrations = Calibrations(fee_estimation_buffer=1.0)
    calibrations.on_report(report(ReportStatus.RECEIVED), snapshot())
    assert calibrations.on_report(report(ReportStatus.FAILED), None) is None and calibrations.open == {}
    assert calibrations.on_report(report(ReportStatus.FILLED, instrument="PERP", filled=0.5, avg_price=1.0),
                                  None) is None  # its start was not seen: nothing to compare with


def test_a_closure_with_a_fill_whose_fee_is_unknown_is_not_checked() -> None:
    """A `filled` without `fee` (the executor could not learn it): the real cost is not known, and
    counting the fee as 0 would make the estimate look pessimistic."""
    calibrations = Calibrations(fee_estimation_buffer=1.0)
    calibrations.on_report(report(ReportStatus.RECEIVED), snapshot())
    calibrations.on_report(report(ReportStatus.FILLED, instrument="PERP", filled=0.5, avg_price=99_900.0,
                                  fee=25.0), None)
    calibrations.on_report(report(ReportStatus.FILLED, instrument="CALL", filled=2.0, avg_price=51.0), None)
    assert calibrations.on_report(report(ReportStatus.COMPLETED), None) is None and calibrations.open == {}
