"""Each open position's full close, kept ready as its row changes (pure: no I/O).

A decision to close a book lists every open position as a `LegToClose`. Built at the decision
(then as validated `PositionToClose` models), a 1,000-position book's legs cost take-profit
milliseconds between the crossing snapshot and the command (`bench/command_costs.py`, before issue
22's sixth pass). A row changes only when the portfolio publishes it, so the leg closing it in
full, priced from it, is built then — the cost follows the rows a batch changed, as folding them
does — and a decision picks it up by identity (`ClosingLegs.full_close`). A leg is a plain tuple:
the rows it comes from were validated, and the command's `Legs` validates every leg once more, as
columns, when the command is built (until the legs became columns, each leg's JSON was kept ready
too, to be spliced into the command's `positions`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from services.common.contracts import LegToClose, SnapshotPosition


@dataclass(frozen=True, slots=True)
class _Ready:
    row: SnapshotPosition
    """The row this leg was built from: it is current while the view holds this very object."""
    leg: LegToClose


def to_close(row: SnapshotPosition, fraction: float, priced: bool) -> LegToClose:
    """`fraction` of a position; with its exit price and mark only when they are fresh (`priced`)."""
    if not priced:
        return LegToClose(row.instrument, row.position * fraction, None, None, None)
    return LegToClose(row.instrument, row.position * fraction, row.exit_price, row.mark,
                      row.exit_within_depth)


class ClosingLegs:
    """The priced full close of every open row, keyed by instrument."""

    __slots__ = ("_ready",)

    def __init__(self, rows: Iterable[SnapshotPosition] = ()) -> None:
        self._ready: dict[str, _Ready] = {}
        self.refresh(rows)

    def __len__(self) -> int:
        return len(self._ready)

    def refresh(self, rows: Iterable[SnapshotPosition]) -> None:
        """Rebuild the legs of rows that changed; a flat row has none."""
        for row in rows:
            if row.position == 0.0:
                self._ready.pop(row.instrument, None)
            else:
                self._ready[row.instrument] = _Ready(row, to_close(row, 1.0, priced=True))

    def full_close(self, row: SnapshotPosition) -> LegToClose:
        """`to_close(row, 1.0, priced=True)` of an open row: the ready one when it was built from this
        very row, else built now (and kept)."""
        ready = self._ready.get(row.instrument)
        if ready is None or ready.row is not row:
            self.refresh((row,))
            ready = self._ready[row.instrument]
        return ready.leg
