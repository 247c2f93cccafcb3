"""Reading `tp:snapshots` v2: folding the changed positions into the whole book.

A v2 snapshot carries the totals of the whole account every time, but its positions only when
`full`; otherwise only the rows that changed since snapshot `seq - 1` (docs/streams.md). A reader
that needs every position keeps a `SnapshotView` and folds each snapshot into it, in order. The
portfolio also keeps every current row in the hash `<ns>:snapshot:positions`, written in the same
transaction as the snapshot, so a reader that starts (or finds a gap: an entry it never saw) reads
that hash and the newest snapshot in one transaction and folds on from there (`read_view`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from services.common.bus import encode_document_bytes, read_document, validate_entry, with_positions
from services.common.contracts import Snapshot, SnapshotPosition
from services.common.streams import Names


class Fold(StrEnum):
    """What folding one snapshot did."""

    APPLIED = "applied"
    SEEN = "seen"
    """Not newer than the view: its rows are already in it (or superseded)."""
    GAP = "gap"
    """A delta whose predecessor the view never folded: the view must be re-read first."""


class SnapshotView:
    """Every position of the current epoch as the newest snapshot folded describes it (pure)."""

    __slots__ = ("rows", "seq")

    def __init__(self, rows: Iterable[SnapshotPosition] = (), seq: int | None = None) -> None:
        self.rows: dict[str, SnapshotPosition] = {p.instrument: p for p in rows}
        self.seq = seq
        """The seq of the newest snapshot the rows reflect (None: nothing folded yet)."""

    def fold(self, snapshot: Snapshot) -> Fold:
        """Apply one snapshot: a full one replaces the rows, a delta its changed ones."""
        if self.seq is not None and snapshot.seq <= self.seq:
            return Fold.SEEN
        if snapshot.full:
            self.rows = {p.instrument: p for p in snapshot.positions}
        elif self.seq is None or snapshot.seq != self.seq + 1:
            return Fold.GAP
        else:
            for p in snapshot.positions:
                self.rows[p.instrument] = p
        self.seq = snapshot.seq
        return Fold.APPLIED

    def open_positions(self) -> list[SnapshotPosition]:
        """The positions that are not flat, in the order the portfolio listed them."""
        return [p for p in self.rows.values() if p.position != 0.0]

    def full_snapshot(self, header: Snapshot) -> Snapshot:
        """`header` (a snapshot folded into this view) with every position: the v1 picture."""
        return header.model_copy(update={"full": True, "positions": list(self.rows.values())})


def encode_snapshot(snapshot: Snapshot, row_texts: Iterable[bytes]) -> bytes:
    """`encode_document_bytes(snapshot)` from its rows already encoded, in `snapshot.positions`' order.

    The portfolio encodes every changed row once for `<ns>:snapshot:positions`; encoding the
    snapshot whole encoded each row a second time (at batch 100, the rows' encoding was 8.5 % of the
    service's CPU, `bench/portfolio_throughput.py`'s profile). pydantic writes a list of models as
    their own texts joined by commas, so splicing the texts in gives the same bytes
    (`bus.with_positions`; tests/portfolio/test_snapshot_fold.py compares them).
    """
    return with_positions(encode_document_bytes(snapshot.model_copy(update={"positions": []})), row_texts)


def view_from(rows: Mapping[bytes, bytes], latest: Sequence[tuple[Any, Mapping[Any, Any]]]) -> tuple[
        SnapshotView, Snapshot | None]:
    """The view and the newest snapshot from one transaction's `HGETALL` of the rows and
    `XREVRANGE … COUNT 1` of the stream (raises `MalformedEntry` for a bad document)."""
    header = validate_entry(Snapshot, latest[0][1]) if latest else None
    if header is not None and header.full:
        return SnapshotView(header.positions, header.seq), header
    parsed = sorted((read_document(SnapshotPosition, raw) for raw in rows.values()),
                    key=lambda p: p.instrument)
    return SnapshotView(parsed, header.seq if header is not None else None), header


async def read_view(redis: Redis, names: Names) -> tuple[SnapshotView, Snapshot | None]:
    """Every current position and the newest snapshot, read consistently (one transaction)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(names.snapshot_positions)
        pipe.xrevrange(names.snapshots, count=1)
        rows, latest = await pipe.execute()
    return view_from(rows, latest)
