"""The pure clearing core (services/executor/clearing.py): which requests make a round, in which order,
and what their answers say each cancel removed — by hand, one case per rule."""

from __future__ import annotations

from services.common.contracts import ExchangeError, RemovalKind, ReportStatus
from services.executor.clearing import Answer, cancel_refused, clearing_reports, kinds, round_requests
from services.executor.plan import Progress
from tests.executor.conftest import PERP, make_command

ALL = kinds(True, True, True, True)


def _progress() -> Progress:
    command = make_command({PERP: 0.5})
    return Progress.start(command, command.created_ts, 0.005, 30.0)


def _answers(orders: object = 3, before: object = None, after: object = None, conditional: object = None,
             bots: object = None, refused: dict[int, ExchangeError] | None = None) -> list[Answer]:
    results = [orders,
               before if before is not None else [{"order_id": "q1", "label": "mm-a"},
                                                   {"order_id": "q2", "label": "mm-b"},
                                                   {"order_id": "new", "label": "mm-a"}],
               None,
               after if after is not None else [{"order_id": "new", "label": "mm-a"}],
               conditional if conditional is not None else [
                   {"order_id": "c1", "status": "active", "label": "stop"},
                   {"order_id": "c0", "status": "cancelled", "label": "old"}],
               None,
               bots if bots is not None else [{"bot_id": "b1", "status": "active", "label": "grid"},
                                              {"bot_id": "b0", "status": "stopped"}],
               None]
    return [Answer(error=(refused or {}).get(i)) if i in (refused or {}) else Answer(r)
            for i, r in enumerate(results)]


def test_a_round_is_each_cancel_between_the_listings_that_tell_what_it_removed() -> None:
    assert kinds(True, False, True, False) == (RemovalKind.ORDERS, RemovalKind.CONDITIONAL_ORDERS)
    assert [m for _, m in round_requests(ALL)] == [
        "cancel_all", "open_orders", "cancel_mass_quote", "open_orders", "conditional_orders",
        "cancel_all_conditional_orders", "bots", "cancel_all_bots"]


def test_each_kind_reports_what_it_removed() -> None:
    reports = clearing_reports(_progress(), ALL, _answers(), 1, 10.0)
    assert [r.status for r in reports] == [
        ReportStatus.ORDERS_CANCELLED, ReportStatus.MASS_QUOTES_CANCELLED,
        ReportStatus.CONDITIONAL_ORDERS_CANCELLED, ReportStatus.BOTS_CANCELLED]
    removed = [r.removed for r in reports]
    assert removed[0] is not None and (removed[0].count, removed[0].ids) == (3, None)  # cancel_all's count
    # quotes: open before the cancel and gone after it ("new" arrived in flight and is still there)
    assert removed[1] is not None and (removed[1].count, removed[1].ids, removed[1].labels) == (
        2, ["q1", "q2"], ["mm-a", "mm-b"])
    # only live conditional orders and bots count
    stops, bots = removed[2], removed[3]
    assert stops is not None and (stops.count, stops.ids, stops.labels) == (1, ["c1"], ["stop"])
    assert bots is not None and (bots.count, bots.ids, bots.labels) == (1, ["b1"], ["grid"])
    assert all(r.removed is not None and r.removed.round == 1 and r.epoch == 3 for r in reports)


def test_a_repeated_round_reports_only_what_removed_something_or_failed() -> None:
    refused = ExchangeError(code=7, message="not permitted")
    answers = _answers(orders=0, before=[], after=[], conditional=[], bots=[], refused={7: refused})
    reports = clearing_reports(_progress(), ALL, answers, 2, 10.0)
    assert [(r.status, r.error) for r in reports] == [(ReportStatus.BOTS_CANCELLED, refused)]
    assert reports[0].removed is not None and reports[0].removed.count is None  # refused: nothing vouched for
    assert set(cancel_refused(ALL, answers)) == {RemovalKind.BOTS}
    quiet_first = clearing_reports(_progress(), ALL, _answers(orders=0, before=[], after=[], conditional=[],
                                                              bots=[]), 1, 10.0)
    assert [r.removed.count for r in quiet_first if r.removed is not None] == [0, 0, 0, 0]


def test_an_unreadable_listing_or_a_lost_answer_leaves_the_count_unknown() -> None:
    answers = _answers(before="garbage")
    answers[0] = Answer(answered=False)
    reports = clearing_reports(_progress(), ALL, answers, 1, 10.0)
    assert reports[0].removed is not None and reports[0].removed.count is None
    assert reports[1].removed is not None and reports[1].removed.count is None
    assert set(cancel_refused(ALL, answers)) == {RemovalKind.ORDERS}
    assert clearing_reports(_progress(), ALL, _answers(orders=True), 1, 1.0)[0].removed.count is None  # type: ignore[union-attr]
