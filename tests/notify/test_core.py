"""The notify core: which notifications, with which figures — hand-worked, and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.config import Notify, PortfolioTakeProfit
from services.common.contracts import (
    Command,
    Drift,
    ExchangeError,
    Legs,
    NotificationKind,
    PositionToClose,
    Report,
    ReportStatus,
    Severity,
    Snapshot,
)
from services.notify.core import Leg, Notifier, realised_cost
from tests.takeprofit.factories import pos

NOW = 1_700_000_000.0
BARRIERS = PortfolioTakeProfit(
    min_profit_usd=10.0, emergency_close_threshold=-20.0, partial_profit_threshold=5.0
)


def notifier(**notify: object) -> Notifier:
    return Notifier(Notify(**notify), BARRIERS, fee_estimation_buffer=1.1)  # type: ignore[arg-type]


def snapshot(
    seq: int,
    net_after_close: float,
    *,
    epoch: int = 1,
    net_pnl: float | None = None,
    est_close_fees: float = 0.0,
    est_slippage: float = 0.0,
    flat: bool = False,
    drift: list[Drift] | None = None,
) -> Snapshot:
    net = net_after_close if net_pnl is None else net_pnl
    return Snapshot(
        seq=seq,
        epoch=epoch,
        ts=NOW + seq,
        positions=[] if flat else [pos()],
        realized_pnl=0.0,
        unrealized_pnl=net,
        funding_pnl=0.0,
        fees_paid=0.0,
        est_close_fees=est_close_fees,
        est_slippage=est_slippage,
        gross_pnl=net,
        net_pnl=net,
        net_after_close=net_after_close,
        drift=drift or [],
    )


def command(
    command_id: str = "e1-take_profit-s3-n1",
    *,
    seq: int = 3,
    fraction: float = 1.0,
    reason: str = "take_profit",
) -> Command:
    return Command(
        command_id=command_id,
        epoch=1,
        reason=reason,
        fraction=fraction,
        snapshot_seq=seq,
        legs=Legs.of([
            PositionToClose(instrument="BTC-PERPETUAL", amount=0.5 * fraction, mark=60000.0),
            PositionToClose(instrument="ETH-PERPETUAL", amount=-0.2 * fraction, mark=3000.0),
        ]),
        net_pnl=10.2,
        threshold=10.0,
        created_ts=NOW,
        deadline_ts=NOW + 30,
    )


def report(status: ReportStatus, command_id: str = "e1-take_profit-s3-n1", **fields: object) -> Report:
    return Report(command_id=command_id, status=status, ts=NOW + 5, **fields)  # type: ignore[arg-type]


def test_a_decision_says_reason_figure_and_threshold() -> None:
    [note] = notifier().on_command(command(), NOW)
    assert note.kind is NotificationKind.DECISION and note.id == "decision:e1-take_profit-s3-n1"
    assert note.title == "Take profit: closing everything at +10.20 USD"
    assert "threshold +10.00 USD" in note.text and note.facts["figure"] == 10.2
    emergency = notifier().on_command(command("e1-emergency_stop-s3-n1", reason="emergency_stop"), NOW)[0]
    assert emergency.severity is Severity.CRITICAL and emergency.title.startswith("EMERGENCY STOP")


def _complete(n: Notifier) -> None:
    """Two legs filled, then `completed` with the exchange's fees."""
    n.on_report(
        report(ReportStatus.FILLED, instrument="BTC-PERPETUAL", filled=0.5, avg_price=59970.0, fee=15.0), NOW
    )
    n.on_report(
        report(ReportStatus.FILLED, instrument="ETH-PERPETUAL", filled=0.2, avg_price=3001.5, fee=0.3), NOW
    )


def test_closure_completed_compares_estimated_and_realised_cost_and_says_what_was_banked() -> None:
    """Hand-worked.

    Estimate at the decision snapshot #3: est_close_fees 12.0 x buffer 1.1 + est_slippage 4.0 = 17.2.
    Realised: fees 15.0 + 0.3 = 15.3 (the `completed` report's total), plus slippage against the
    decision marks: BTC long 0.5 sold at 59970 vs mark 60000 -> (60000 - 59970) * 0.5 * (+1) = 15.0;
    ETH short 0.2 bought at 3001.5 vs mark 3000 -> (3000 - 3001.5) * 0.2 * (-1) = 0.3.
    Realised = 15.3 + 15.0 + 0.3 = 30.6.
    Banked: the closed epoch's final snapshot (#5, net_pnl 12.34) — the ledger's figure.
    """
    n = notifier()
    n.on_snapshot(snapshot(3, 10.2, net_pnl=27.4, est_close_fees=12.0, est_slippage=4.0), NOW)
    n.on_command(command(), NOW)
    _complete(n)
    assert n.on_report(report(ReportStatus.COMPLETED, fee=15.3), NOW + 6) == []  # waits for the epoch's end
    assert n.on_snapshot(snapshot(5, 12.34 - 0.0, net_pnl=12.34, flat=True), NOW + 6) == []
    [note] = n.on_snapshot(snapshot(6, 0.0, epoch=2, flat=True), NOW + 7)
    assert (
        note.kind is NotificationKind.CLOSURE_COMPLETED
        and note.id == "closure_completed:e1-take_profit-s3-n1"
    )
    assert note.facts["estimated_cost"] == 12.0 * 1.1 + 4.0
    assert abs(note.facts["realised_cost"] - 30.6) < 1e-9  # type: ignore[operator]
    assert note.facts["pnl_banked"] == 12.34 and note.title == "Take profit completed: +12.34 USD banked"
    assert "estimated +17.20 USD, realised +30.60 USD (fees +15.30 USD)" in note.text
    assert n.state.closures == {}


def test_a_completed_report_read_after_the_epoch_changed_is_told_at_once() -> None:
    n = notifier()
    n.on_snapshot(snapshot(3, 10.2), NOW)
    n.on_command(command(), NOW)
    n.on_snapshot(snapshot(4, 11.0, net_pnl=11.5, flat=True), NOW)
    n.on_snapshot(snapshot(5, 0.0, epoch=2, flat=True), NOW)
    [note] = n.on_report(report(ReportStatus.COMPLETED, fee=1.0), NOW)
    assert note.facts["pnl_banked"] == 11.5


def test_without_the_epochs_end_the_completion_is_told_after_the_settle_time() -> None:
    n = notifier(closure_settle_seconds=15)
    n.on_command(command(), NOW)
    n.on_report(report(ReportStatus.COMPLETED, fee=1.0), NOW)
    assert n.on_timer(NOW + 14) == []
    [note] = n.on_timer(NOW + 15)
    assert note.facts["pnl_banked"] is None and "has not come yet" in note.text
    assert "estimated unknown" in note.text  # the decision snapshot was never seen


def test_a_completed_report_without_fee_says_the_fees_are_unknown() -> None:
    """The executor could not learn a fill's fee: the text says so instead of "fees +0.00 USD"."""
    n = notifier()
    n.on_command(command("e1-partial_take_profit-s3-n1", fraction=0.5, reason="partial_take_profit"), NOW)
    [note] = n.on_report(report(ReportStatus.COMPLETED, "e1-partial_take_profit-s3-n1"), NOW)
    assert "before fees (fees unknown" in note.text and note.facts["fees"] is None


def test_a_partial_closure_is_estimated_pro_rata_and_told_at_once() -> None:
    """Estimate 20.0 for the whole book x fraction 0.5 = 10.0; no leg filled -> realised = fees 2.0."""
    n = notifier()
    n.on_snapshot(snapshot(3, 6.0, est_close_fees=0.0, est_slippage=20.0), NOW)
    n.on_command(command("e1-partial_take_profit-s3-n1", fraction=0.5, reason="partial_take_profit"), NOW)
    [note] = n.on_report(report(ReportStatus.COMPLETED, "e1-partial_take_profit-s3-n1", fee=2.0), NOW)
    assert note.facts["estimated_cost"] == 10.0 and note.facts["realised_cost"] == 2.0
    assert "(pro rata)" in note.text and "the rest stays open" in note.text


def test_a_leg_without_a_decision_mark_is_said_to_be_unmeasured() -> None:
    cost, unmeasured = realised_cost(1.0, [Leg(instrument="X", filled=1.0, avg_price=9.0)], {}, {})
    assert (cost, unmeasured) == (1.0, ["X"])


def test_closure_failed_is_critical_and_names_the_error_and_what_filled() -> None:
    n = notifier()
    n.on_command(command(), NOW)
    n.on_report(
        report(
            ReportStatus.PARTIALLY_FILLED, instrument="BTC-PERPETUAL", filled=0.2, avg_price=59990.0, fee=6.0
        ),
        NOW,
    )
    [note] = n.on_report(
        report(ReportStatus.FAILED, fee=6.0, error=ExchangeError(code=14, message="no liquidity")), NOW
    )
    assert note.kind is NotificationKind.CLOSURE_FAILED and note.severity is Severity.CRITICAL
    assert "no liquidity" in note.title and "BTC-PERPETUAL 0.2 @ 59990" in note.text
    assert "thalex-tp resume" in note.text


def test_drift_is_told_once_per_disagreement() -> None:
    n = notifier()
    drift = Drift(instrument="ETH-PERPETUAL", ledger_position=0.0, exchange_position=1.0, since=NOW)
    [note] = n.on_snapshot(snapshot(1, 0.0, drift=[drift]), NOW)
    assert note.kind is NotificationKind.DRIFT_ADOPTED and "exchange says 1" in note.text
    assert n.on_snapshot(snapshot(2, 0.0, drift=[drift]), NOW) == []
    assert n.on_snapshot(snapshot(3, 0.0), NOW) == []
    later = drift.model_copy(update={"since": NOW + 60})
    assert len(n.on_snapshot(snapshot(4, 0.0, drift=[later]), NOW)) == 1


def test_near_the_target_is_told_once_per_approach() -> None:
    """Target 10.0, share 0.8 -> warn at >= 8.0 (below 10.0); re-armed below 0.5 x 10.0 = 5.0."""
    n = notifier(near_barrier_share=0.8, rearm_share=0.5)
    figures = [7.9, 8.0, 8.5, 7.0, 8.2, 4.9, 8.1, 10.0]
    told = [bool(n.on_snapshot(snapshot(i + 1, f), NOW)) for i, f in enumerate(figures)]
    assert told == [False, True, False, False, False, False, True, False]
    n2 = notifier()
    assert n2.on_snapshot(snapshot(1, 12.0), NOW) == []  # the barrier itself: the decision says it


def test_near_the_emergency_stop_and_a_new_epoch_rearms() -> None:
    """Stop -20.0, share 0.8 -> warn at <= -16.0 (above -20.0)."""
    n = notifier(near_barrier_share=0.8, rearm_share=0.5)
    [note] = n.on_snapshot(snapshot(1, -16.5), NOW)
    assert note.kind is NotificationKind.NEAR_EMERGENCY_STOP and note.severity is Severity.WARNING
    assert note.id == "near_emergency_stop:e1:s1" and "-16.50 USD of -20.00 USD" in note.title
    assert n.on_snapshot(snapshot(2, -17.0), NOW) == []
    assert len(n.on_snapshot(snapshot(3, -16.2, epoch=2), NOW)) == 1  # a new epoch, a new approach
    assert n.on_snapshot(snapshot(4, -18.0, epoch=2, flat=True), NOW) == []  # flat: nothing at risk


def test_no_approach_is_told_while_only_dust_is_open() -> None:
    """Dust (below the minimum order) is never closed by a decision: "near" would promise one."""
    n = notifier(near_barrier_share=0.8, rearm_share=0.5)
    dust = snapshot(1, -16.5).model_copy(update={"dust": ["BTC-PERPETUAL"]})
    assert n.on_snapshot(dust, NOW) == []
    assert len(n.on_snapshot(snapshot(2, -16.5), NOW)) == 1  # the same figure, closable: told


def test_a_service_unhealthy_longer_than_the_limit_is_told_once_and_its_recovery_too() -> None:
    n = notifier(unhealthy_after_seconds=60)
    assert n.on_health("executor", False, "consuming failing", NOW) == []
    assert n.on_health("executor", False, "consuming failing", NOW + 59) == []
    [down] = n.on_health("executor", False, "consuming failing", NOW + 60)
    assert (
        down.kind is NotificationKind.SERVICE_UNHEALTHY and down.id == f"service_unhealthy:executor:{NOW:.0f}"
    )
    assert down.title == "executor unhealthy for 60 s" and "consuming failing" in down.text
    assert n.on_health("executor", False, "x", NOW + 120) == []
    [up] = n.on_health("executor", True, "", NOW + 130)
    assert up.kind is NotificationKind.SERVICE_RECOVERED and "after 130 s" in up.text
    assert n.on_health("ingest", False, "x", NOW) == [] and n.on_health("ingest", True, "", NOW + 5) == []


def test_the_state_survives_a_restart() -> None:
    n = notifier()
    n.on_snapshot(snapshot(3, 8.5, est_close_fees=1.0), NOW)
    n.on_command(command(), NOW)
    restarted = notifier()
    restarted.load_state(n.to_state())
    assert restarted.on_snapshot(snapshot(3, 8.5), NOW) == []  # redelivered: already seen
    assert restarted.on_command(command(), NOW) == []
    assert restarted.on_report(report(ReportStatus.COMPLETED, fee=1.0), NOW) == []
    second = notifier()
    second.load_state(restarted.to_state())  # restarted again while waiting for the epoch's end
    [note] = second.on_timer(NOW + 100)
    assert note.kind is NotificationKind.CLOSURE_COMPLETED and note.facts["estimated_cost"] == 1.1


@given(st.lists(st.floats(min_value=-30.0, max_value=15.0, allow_nan=False), min_size=1, max_size=60))
def test_warnings_never_outnumber_the_approaches(figures: list[float]) -> None:
    """Independent count: a new approach to the target starts only after the figure was below the re-arm
    level (or at the start); at most one warning per approach, and none at or past the barrier."""
    n = notifier(near_barrier_share=0.8, rearm_share=0.5)
    warnings = 0
    approaches = 1
    below = False
    for i, figure in enumerate(figures):
        notes = n.on_snapshot(snapshot(i + 1, figure), NOW)
        near = [x for x in notes if x.kind is NotificationKind.NEAR_TAKE_PROFIT]
        warnings += len(near)
        if near:
            assert 8.0 <= figure < 10.0
        if figure < 5.0 and not below:
            approaches += 1
        below = figure < 5.0
    assert warnings <= approaches


def test_a_broken_halt_is_told_once_naming_who_broke_it() -> None:
    """Issue 19, item 2: ingest's `halt_violation` reports; the first of each halt is told (a warning),
    the rest are for `thalex-tp status`; the memory survives a restart."""
    from services.common.contracts import HaltViolation, ViolationKind

    def broken(since: float, label: str) -> Report:
        return report(ReportStatus.HALT_VIOLATION, violation=HaltViolation(
            kind=ViolationKind.ORDER, halt_reason="take_profit", halt_since=since, label=label,
            halt_command_id="e1-take_profit-s3-n1", instrument="BTC-PERPETUAL", side="buy", amount=0.2))

    n = notifier()
    [note] = n.on_report(broken(NOW, "rogue"), NOW)
    assert note.kind is NotificationKind.HALT_VIOLATED and note.severity is Severity.WARNING
    assert note.id == f"halt_violated:{NOW:.6f}" and "label rogue" in note.title
    assert "thalex-tp status" in note.text and note.facts["label"] == "rogue"
    assert n.on_report(broken(NOW, "other"), NOW) == []
    restarted = notifier()
    restarted.load_state(n.to_state())
    assert restarted.on_report(broken(NOW, "again"), NOW) == []
    later = restarted.on_report(broken(NOW + 100, "next"), NOW)
    assert [x.kind for x in later] == [NotificationKind.HALT_VIOLATED]


def test_a_cancel_only_command_says_the_circuit_breaker_opened_and_its_completion_is_no_closure() -> None:
    """Issue 19: take-profit's `circuit_breaker` command closes nothing: one critical notification,
    nothing when it completes."""
    n = notifier()
    cancel = Command(command_id="e4-circuit_breaker-s9-n2", epoch=4, reason="circuit_breaker",
                     legs=Legs.of([]), snapshot_seq=9, net_pnl=-0.4, threshold=3.0, created_ts=NOW,
                     deadline_ts=NOW + 30)
    [note] = n.on_command(cancel, NOW)
    assert note.severity is Severity.CRITICAL and note.title.startswith("Circuit breaker open: 3 repeat")
    assert "thalex-tp resume" in note.text and "emergency stop stays armed on net P&L" in note.text
    done = Report(command_id=cancel.command_id, status=ReportStatus.COMPLETED, epoch=4, fraction=1.0, ts=NOW)
    assert n.on_report(done, NOW + 1) == [] and n.on_timer(NOW + 100) == []
