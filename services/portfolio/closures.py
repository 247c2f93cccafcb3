"""What a closure means for the portfolio (pure): when its epoch ends, and what closing really cost.

* **Epoch end.** The executor reports `completed` when it has seen the account flat; the closing
  fills may still be on their way through ingest. A full closure's `completed` for the current
  epoch (`epoch_end_for`) therefore starts a wait, and the epoch ends when the ledger is flat —
  or when the wait ran out (`epoch_ends`) — so the exit's P&L and fees count in the epoch that
  decided it, never in the next one.
* **Calibration.** When a closure starts (`received`), the last snapshot's estimate of the cost
  of closing is kept; each `filled` / `partially_filled` adds the leg as it really closed; the
  outcome (`completed` / `failed`) compares the two (`Calibrations.on_report`), so the operator
  can tune `fee_estimation_buffer`. A closure with a fill whose fee the executor could not learn
  (a `filled` report without `fee`) is not compared: its real cost is not known, and counting the
  fee as 0 would make the estimate look pessimistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.contracts import Report, ReportStatus, Snapshot, cancel_only
from services.portfolio.ledger import CloseCostCheck, ClosedLeg, check_close_cost, estimated_close_cost

EPOCH_END_WAIT_SECONDS = 10.0
"""How long a completed closure waits for its fills to come through ingest before the epoch ends anyway."""


@dataclass
class EpochEnd:
    """A full closure the executor reported completed; the epoch ends when its fills are in."""

    epoch: int
    command_id: str
    deadline: float


def epoch_end_for(report: Report, epoch: int, now: float) -> EpochEnd | None:
    """The wait a report starts: a full closure's `completed` for the current epoch (or for none).

    A cancel-only command's `completed` starts none: it closed nothing, and ending the epoch on it
    would re-base the positions still open at their marks and forget the epoch's realised P&L and
    fees — the figure the emergency stop, the only barrier while the circuit breaker is open, judges.
    """
    full = report.fraction is None or report.fraction >= 1.0
    if report.status is ReportStatus.COMPLETED and full and report.epoch in (None, epoch) \
            and not cancel_only(report.command_id):
        return EpochEnd(epoch, report.command_id, now + EPOCH_END_WAIT_SECONDS)
    return None


def epoch_ends(end: EpochEnd, flat: bool, now: float) -> bool:
    """The epoch ends once the ledger is flat, or when the wait for the closing fills ran out."""
    return flat or now >= end.deadline


@dataclass
class Calibration:
    """What a closure was expected to cost, and what its fills really cost."""

    estimated: float
    marks: dict[str, float]
    signs: dict[str, float]
    legs: list[ClosedLeg] = field(default_factory=list)
    fee_unknown: bool = False
    """A fill's fee was not reported: what closing cost is not known, so nothing is compared."""


class Calibrations:
    """The closures in flight, each with the estimate it started from."""

    def __init__(self, fee_estimation_buffer: float) -> None:
        self.fee_estimation_buffer = fee_estimation_buffer
        self.open: dict[str, Calibration] = {}

    def on_report(self, report: Report, last_snapshot: Snapshot | None) -> CloseCostCheck | None:
        """Follow one report; the check when a closure that filled something finished."""
        if report.status is ReportStatus.RECEIVED and last_snapshot is not None:
            self.open[report.command_id] = Calibration(
                estimated=estimated_close_cost(last_snapshot, self.fee_estimation_buffer),
                marks={p.instrument: p.mark for p in last_snapshot.positions},
                signs={p.instrument: (1.0 if p.position > 0 else -1.0) for p in last_snapshot.positions},
            )
            return None
        calibration = self.open.get(report.command_id)
        if calibration is None:
            return None
        if report.status in (ReportStatus.FILLED, ReportStatus.PARTIALLY_FILLED) and report.instrument \
                and report.filled and report.avg_price is not None and report.instrument in calibration.marks:
            calibration.fee_unknown |= report.fee is None
            calibration.legs.append(ClosedLeg(
                position=report.filled * calibration.signs[report.instrument],
                mark_at_decision=calibration.marks[report.instrument],
                avg_price=report.avg_price, fee=report.fee or 0.0))
        elif report.status in (ReportStatus.COMPLETED, ReportStatus.FAILED):
            del self.open[report.command_id]
            if calibration.legs and not calibration.fee_unknown:
                return check_close_cost(calibration.estimated, calibration.legs)
        return None
