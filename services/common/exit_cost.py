"""The exit-cost warning: when getting out alone costs more than a barrier is wide (pure, no I/O).

A market maker's position can be large for a moment: the estimated cost of closing it through the
book (`net_pnl - net_after_close`: the taker fee x buffer, and the slippage of walking the book) may
then exceed the whole emergency stop (`|emergency_close_threshold|`) or the take-profit target
(`min_profit_usd`, the distance from break-even to the target). Neither is a loss yet, and the
emergency stop does not fire on it (its default basis is `net_pnl`), but the trader must know:
"closing now costs X; the take profit needs a move of Y". Take-profit logs it and exports
`tp_exit_cost_warning`; `thalex-tp status` and the demo view compute it from the same snapshot with
this function, so all three say the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import PortfolioTakeProfit
from services.common.contracts import Snapshot

MONEY_EPSILON = 1e-9
"""USD of float noise tolerated when comparing the exit cost with a barrier."""


@dataclass(frozen=True, slots=True)
class ExitCostWarning:
    """What closing now would cost, and what the take profit still needs (USD)."""

    exit_cost: float
    """`net_pnl - net_after_close` of the snapshot: estimated closing fees x buffer + slippage."""
    move_needed: float
    """How far the profit figure is from the take-profit target (0 once it is reached)."""
    exceeds: tuple[str, ...]
    """Which barrier the exit cost alone is wider than: `emergency stop`, `take-profit target`."""

    def sentence(self) -> str:
        wider = " and the ".join(self.exceeds)
        return (f"closing now costs {_usd(self.exit_cost)}; the take profit needs a move of "
                f"{_usd(self.move_needed)} (the exit cost alone exceeds the {wider})")


def exit_cost_warning(snapshot: Snapshot, tp: PortfolioTakeProfit) -> ExitCostWarning | None:
    """The warning for `snapshot`, or None when nothing is open or the exit cost fits both barriers."""
    if snapshot.open_positions == 0:  # the header's count: a v2 delta lists only the changed rows
        return None
    cost = snapshot.net_pnl - snapshot.net_after_close
    exceeds = []
    if cost > -tp.emergency_close_threshold + MONEY_EPSILON:
        exceeds.append("emergency stop")
    if cost > tp.min_profit_usd + MONEY_EPSILON:
        exceeds.append("take-profit target")
    if not exceeds:
        return None
    figure = snapshot.net_after_close if tp.profit_after_fees else snapshot.net_pnl
    return ExitCostWarning(exit_cost=cost, move_needed=max(0.0, tp.min_profit_usd - figure),
                           exceeds=tuple(exceeds))


def _usd(value: float) -> str:
    return f"{value:,.2f} USD"
