"""The demo's screen is a pure function: check what a trader reads off it."""

from __future__ import annotations

from services.common.config import PortfolioTakeProfit
from services.common.contracts import Command, Halt, HaltAck, Report
from services.demo.view import DemoState, barrier_bar, render

TS = 1_700_000_000.0


def test_bar_places_net_after_close_between_the_barriers() -> None:
    assert barrier_bar(-10.0, -10.0, 1.1).split("|")[1].startswith("*")
    assert barrier_bar(1.1, -10.0, 1.1).split("|")[1].endswith("*")
    assert "0" in barrier_bar(-5.0, -10.0, 1.1)


def test_closing_fees_are_the_fills_fees_not_counted_twice() -> None:
    command = Command(
        command_id="c1",
        epoch=0,
        reason="take_profit",
        legs={"instrument": ["X"], "amount": [1]},
        snapshot_seq=1,
        net_pnl=1.2,
        threshold=1.1,
        created_ts=TS,
        deadline_ts=TS + 30,
    )
    reports = [
        Report(command_id="c1", status="filled", instrument="X", filled=1, avg_price=1, fee=2.5, ts=TS),
        Report(command_id="c1", status="completed", fee=2.5, ts=TS + 1),
    ]
    state = DemoState(commands=[command], reports={"c1": reports},
                      halt=Halt(reason="take_profit", command_id="c1", since=TS, until=TS + 10),
                      acks={"quoter": HaltAck(command_id="c1", ts=TS)})
    screen = "\n".join(render(state, PortfolioTakeProfit(), 1.1, now=TS + 4))
    assert "-> completed, closing fees 2.5000" in screen
    assert "HALT: take_profit c1, 6 s of cool-down left; acknowledged by quoter" in screen


def test_the_view_says_how_to_talk_to_this_demo_and_shows_notifications() -> None:
    from services.common.contracts import Notification

    note = Notification(id="decision:c1", kind="decision", severity="info",
                        title="Take profit: closing everything", text="", ts=TS)
    state = DemoState(config="/tmp/d/demo.toml", notifications=[note])
    screen = "\n".join(render(state, PortfolioTakeProfit(), 1.1, now=TS))
    assert "thalex-tp status --config /tmp/d/demo.toml" in screen
    assert "Take profit: closing everything" in screen


def test_the_view_names_who_broke_the_halt() -> None:
    """Issue 19, item 2: the halt in force, broken by a rogue quoter and a grid bot, says so and by whom."""
    from services.common.contracts import HaltViolation, ViolationKind

    halt = Halt(reason="take_profit", command_id="c1", since=TS, until=TS + 10)
    earlier = HaltViolation(kind=ViolationKind.ORDER, halt_reason="operator", halt_since=TS - 100,
                            label="old")
    broken = [HaltViolation(kind=ViolationKind.ORDER, halt_reason="take_profit", halt_since=TS,
                            label="rogue", side="buy", amount=0.2, instrument="BTC-PERPETUAL", price=99000.0),
              HaltViolation(kind=ViolationKind.BOT, halt_reason="take_profit", halt_since=TS, bot_id="B1",
                            strategy="grid", label="grid")]
    screen = "\n".join(render(DemoState(halt=halt, violations=[earlier, *broken]), PortfolioTakeProfit(), 1.1,
                              now=TS + 4))
    assert "this halt BROKEN 2x" in screen and "latest: bot (label grid, bot B1, strategy grid)" in screen
    after = "\n".join(render(DemoState(violations=[earlier, *broken]), PortfolioTakeProfit(), 1.1,
                             now=TS + 20))
    assert "the last halt BROKEN 2x" in after
    assert "BROKEN" not in "\n".join(render(DemoState(halt=halt), PortfolioTakeProfit(), 1.1, now=TS + 4))


def test_the_view_shows_the_circuit_breaker_open() -> None:
    """Issue 19: what take-profit writes to `<ns>:takeprofit:breaker`."""
    from services.common.config import PortfolioTakeProfit
    from services.demo.view import DemoState, render

    state = DemoState(breaker={"opened_ts": 1.0, "repeats_when_opened": 3})
    text = "\n".join(render(state, PortfolioTakeProfit(), 1.1, now=2.0))
    assert "CIRCUIT BREAKER OPEN: 3 repeat closures" in text and "thalex-tp resume" in text
    closed = "\n".join(render(DemoState(breaker={"opened_ts": None}), PortfolioTakeProfit(), 1.1, now=2.0))
    assert "CIRCUIT BREAKER" not in closed
