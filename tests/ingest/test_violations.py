"""The pure halt-violation rule (services/ingest/violations.py), by hand: what breaks a halt, what does
not, and how precisely it is attributed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.contracts import Halt, ViolationKind
from services.executor.plan import command_label
from services.ingest.violations import (
    BOTS,
    CONDITIONAL_ORDERS,
    ORDERS,
    TRADES,
    HaltWatch,
    OrderMemory,
    halted,
    sightings,
)

HALT = Halt(reason="take_profit", command_id="cmd-1", since=1000.0, until=1060.0)
GUARDIAN = command_label("cmd-1")


def _order(order_id: str, label: str | None = None, change: str = "insert", **extra: object) -> dict:
    order = {"order_id": order_id, "instrument_name": "BTC-PERPETUAL", "direction": "buy", "amount": 0.1,
             "price": 99000.0, "change_reason": change, "insert_reason": "client_request",
             "create_time": 1001.0, **extra}
    if label is not None:
        order["label"] = label
    return order


def test_a_rogue_order_during_a_halt_is_a_violation_with_its_label_and_client_order_id() -> None:
    watch = HaltWatch()
    seen = list(sightings(ORDERS, [_order("o1", "rogue", client_order_id=42)]))
    (violation,) = watch.violations(HALT, seen, now=1010.0)
    assert violation.kind is ViolationKind.ORDER
    assert (violation.label, violation.client_order_id, violation.order_id) == ("rogue", 42, "o1")
    assert (violation.instrument, violation.side, violation.amount, violation.price) == (
        "BTC-PERPETUAL", "buy", 0.1, 99000.0)
    assert (violation.halt_reason, violation.halt_since, violation.halt_command_id) == (
        "take_profit", 1000.0, "cmd-1")
    # once per order and halt: its fill, cancel or a repeat of the notification is not a second violation
    assert watch.violations(HALT, seen, now=1011.0) == []


def test_the_guardians_own_orders_and_trades_and_what_merely_existed_are_not_violations() -> None:
    assert command_label("anything").startswith("tp-")
    quiet = [_order("o1", GUARDIAN), _order("o2", "quoter", change="existing"),
             _order("o3", "quoter", change="cancel"), _order("o4", None, insert_reason="liquidation")]
    assert list(sightings(ORDERS, quiet)) == []
    trades = [{"trade_id": "t1", "label": GUARDIAN, "trade_type": "normal"},
              {"trade_id": "t2", "label": "x", "trade_type": "daily_mark"},
              {"trade_id": "t3", "trade_type": "expiration"}]
    assert list(sightings(TRADES, trades)) == []


def test_no_halt_or_a_finished_cool_down_is_no_violation() -> None:
    seen = list(sightings(ORDERS, [_order("o1", "rogue")]))
    assert seen and HaltWatch().violations(None, seen, now=1010.0) == []
    assert HaltWatch().violations(HALT, seen, now=1060.0) == []  # the cool-down ended at `until`
    operator = Halt(reason="operator", since=5.0)
    assert halted(operator, 1e12) and HaltWatch().violations(operator, seen, now=1e12)


def test_bots_stops_their_orders_and_trades_are_attributed() -> None:
    watch = HaltWatch()
    seen = [
        *sightings(ORDERS, [_order("o5", "grid", bot_id="B1"),
                            _order("o6", None, conditional_order_id="C1")]),
        *sightings(BOTS, [{"bot_id": "B1", "status": "active", "strategy": "grid", "label": "grid",
                           "instrument_name": "BTC-PERPETUAL"}, {"bot_id": "B0", "status": "stopped"}]),
        *sightings(CONDITIONAL_ORDERS, [{"order_id": "C1", "status": "active", "direction": "sell",
                                         "amount": 0.2, "stop_price": 95000.0, "label": "stop"},
                                        {"order_id": "C0", "status": "cancelled"}]),
        *sightings(TRADES, [{"trade_id": "t9", "order_id": "o5", "label": "grid", "bot_id": "B1",
                             "direction": "sell", "amount": 0.1, "price": 100100.0, "trade_type": "normal"}]),
    ]
    found = watch.violations(HALT, seen, now=1001.0)
    assert [(v.kind, v.bot_id, v.conditional_order_id, v.label) for v in found] == [
        (ViolationKind.BOT_ORDER, "B1", None, "grid"),
        (ViolationKind.CONDITIONAL_TRIGGER, None, "C1", None),
        (ViolationKind.BOT, "B1", None, "grid"),
        (ViolationKind.CONDITIONAL_ORDER, None, "C1", "stop"),
        (ViolationKind.TRADE, "B1", None, "grid"),
    ]
    assert found[2].strategy == "grid" and found[4].trade_id == "t9" and found[3].price == 95000.0
    # a new halt: the same bot still running breaks it too
    again = Halt(reason="operator", since=2000.0)
    assert [v.kind for v in watch.violations(again, seen[2:3], now=2001.0)] == [ViolationKind.BOT]


def test_garbage_is_skipped_not_fatal() -> None:
    assert list(sightings(ORDERS, "not a list")) == []
    assert list(sightings(ORDERS, [1, None, {"change_reason": "insert"}])) == []
    assert list(sightings("ticker.BTC-PERPETUAL.raw", [_order("o1", "x")])) == []


_items = st.fixed_dictionaries({
    "order_id": st.sampled_from(["o1", "o2", "o3"]),
    "label": st.sampled_from([None, "rogue", GUARDIAN, "quoter-a"]),
    "change_reason": st.sampled_from(["insert", "amend", "cancel", "fill", "existing"]),
    "insert_reason": st.sampled_from(["client_request", "liquidation", "conditional_order"]),
})


@given(batches=st.lists(st.tuples(st.lists(_items, max_size=4), st.sampled_from([None, 1000.0, 2000.0])),
                        max_size=12))
def test_every_thing_is_reported_at_most_once_per_halt_never_without_one_never_the_guardians(
        batches: list[tuple[list[dict], float | None]]) -> None:
    """Against an independent recount: what a sequence of notifications under changing halts yields."""
    watch = HaltWatch()
    reported: list[tuple[float, str]] = []
    expected: list[tuple[float, str]] = []
    current: float | None = None
    seen_in_halt: set[str] = set()
    for items, since in batches:
        halt = None if since is None else Halt(reason="operator", since=since)
        for violation in watch.violations(halt, list(sightings(ORDERS, items)), now=3000.0):
            assert violation.order_id is not None
            reported.append((violation.halt_since, violation.order_id))
        if since is None:
            continue
        if since != current:
            current, seen_in_halt = since, set()
        for item in items:
            new = item["change_reason"] in ("insert", "amend") and item["insert_reason"] != "liquidation"
            if new and item["label"] != GUARDIAN and item["order_id"] not in seen_in_halt:
                seen_in_halt.add(item["order_id"])
                expected.append((since, item["order_id"]))
    assert reported == expected


def test_an_amend_that_only_takes_away_is_no_violation_one_that_adds_is() -> None:
    """As the guardian closes a long, the exchange trims another program's resting reduce-only sell
    (0.2 → 0.1, then gone) and tells it as `amend`: no one placed anything. A program that amends its
    order up, or to another price, during the halt does break it."""
    memory = OrderMemory()
    resting = _order("o1", "other", change="existing", direction="sell", amount=0.2, price=101000.0)
    assert list(sightings(ORDERS, [resting], memory)) == []
    trimmed = {**resting, "change_reason": "amend", "amount": 0.1, "status": "open"}
    gone = {**resting, "change_reason": "amend", "amount": 0.1, "status": "cancelled",
            "delete_reason": "client_cancel"}
    assert list(sightings(ORDERS, [trimmed], memory)) == []
    assert list(sightings(ORDERS, [gone], memory)) == []
    # another program's order amended up, or to another price: a violation each
    mine = _order("o2", "rogue", change="existing", amount=0.1, price=99000.0)
    assert list(sightings(ORDERS, [mine], memory)) == []
    up = {**mine, "change_reason": "amend", "amount": 0.3, "status": "open"}
    assert [s.key for s in sightings(ORDERS, [up], memory)] == ["order:o2"]
    nearer = {**up, "price": 99500.0, "amount": 0.3}
    assert [s.key for s in sightings(ORDERS, [nearer], memory)] == ["order:o2"]
    # an order never seen before amended down proves nothing about what it was: reported
    assert [s.key for s in sightings(ORDERS, [{**_order("o3", "x"), "change_reason": "amend"}], memory)] == [
        "order:o3"]
