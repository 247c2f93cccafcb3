"""Each open position's full close, kept ready as its row changes (pure: no I/O).

A decision to close a book lists every open position as a `PositionToClose`. Built at the
decision — validated constructors, then two encodings of the whole list (one to sign, one for the
stream entry) — a 1,000-position book cost take-profit ≈ 3.9 ms of CPU between the crossing
snapshot and the command in Redis (`bench/command_costs.py`, before issue 22's sixth pass). A
row changes only when the portfolio publishes it, so the leg closing it in full, priced from it,
and that leg's JSON are built then — the cost follows the rows a batch changed, as folding them
does — and a decision picks them up by identity (`ClosingLegs.full_close`, `texts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.common.bus import encode_document_bytes
from services.common.contracts import PositionToClose, SnapshotPosition


@dataclass(frozen=True, slots=True)
class _Ready:
    row: SnapshotPosition
    """The row this leg was built from: it is current while the view holds this very object."""
    leg: PositionToClose
    text: bytes
    """`leg` as the command's JSON writes it (`encode_document_bytes`)."""


def to_close(row: SnapshotPosition, fraction: float, priced: bool) -> PositionToClose:
    """`fraction` of a position; with its exit price and mark only when they are fresh (`priced`)."""
    return PositionToClose(instrument=row.instrument, amount=row.position * fraction,
                           exit_price=row.exit_price if priced else None, mark=row.mark if priced else None,
                           exit_within_depth=row.exit_within_depth if priced else None)


class ClosingLegs:
    """The priced full close of every open row, and its text, keyed by instrument."""

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
                leg = to_close(row, 1.0, priced=True)
                self._ready[row.instrument] = _Ready(row, leg, encode_document_bytes(leg))

    def full_close(self, row: SnapshotPosition) -> PositionToClose:
        """`to_close(row, 1.0, priced=True)` of an open row: the ready one when it was built from this
        very row, else built now (and kept)."""
        ready = self._ready.get(row.instrument)
        if ready is None or ready.row is not row:
            self.refresh((row,))
            ready = self._ready[row.instrument]
        return ready.leg

    def texts(self, legs: Sequence[PositionToClose]) -> list[bytes]:
        """Each leg's JSON, in order: the ready text of a leg `full_close` gave, else encoded now
        (a partial or unpriced leg)."""
        out = []
        for leg in legs:
            ready = self._ready.get(leg.instrument)
            out.append(ready.text if ready is not None and ready.leg is leg else encode_document_bytes(leg))
        return out
