"""The ledger: fee-aware P&L of the whole account, one epoch at a time (pure, no I/O).

Inputs are the wire documents (`Fill`, `Tick`, `Positions`, `InstrumentInfo`);
time is always passed in, never read. Output is a `Snapshot`. All money is USD.

Sign conventions
----------------
* `position` q is signed: long > 0, short < 0. A fill's signed amount s is
  `+amount` for a buy, `-amount` for a sell.
* Every P&L figure is "+ = the trader made money"; every cost figure
  (`fees_paid`, `est_close_fee(s)`, `est_slippage`) is "+ = the trader pays"
  (a maker rebate is a negative fee).

Per instrument (average-cost accounting)
----------------------------------------
* A fill that grows the position (or opens it):
  `avg_entry' = (avg_entry*|q| + price*|s|) / (|q| + |s|)`, `q' = q + s`;
  `opened_ts` is set when the position opens from flat.
* A fill that reduces it by `c = min(|s|, |q|)`:
  `realized_pnl += (price - avg_entry) * c * sign(q)`; the average entry of
  what remains does not change.
* A fill that flips it (|s| > |q|) closes all of q as above and opens the rest
  `q + s` at the fill price (`avg_entry = price`, `opened_ts` = the fill's time).
* A rest below `1e-9 x (|q| + |s|)` is float noise of amounts on the volume-tick
  grid and counts as flat (exactly 0).
* `unrealized_pnl = (mark - avg_entry) * q`.

Perpetual funding (Thalex's definition)
---------------------------------------
Thalex: unrealised funding = `funding_mark * q - perpetual_funding_entry_value`
(E below), `funding_mark` being the funding value of one long contract since
the last settlement. E is to funding what `avg_entry * q` is to price, so it
follows the same average-cost rule, with `fm` the funding mark the fill carries
(else the last ticked funding mark, else 0 — instruments without funding):

* grow:   `E += fm * s`;
* reduce by c: the closed share `c/|q|` of E is released and the funding of
  the closed part is realised: `funding_realized += fm * c * sign(q) - E * c/|q|`,
  `E -= E * c/|q|`;
* flip:   close all (E -> 0), then `E = fm * (q + s)` for the part opened.
* `funding_pnl = funding_realized + (funding_mark * q - E)` with the last
  ticked funding mark; the unrealised part is 0 while no funding mark is known.

Over a whole epoch this makes `funding_pnl = fm_now * q - sum(fm_i * s_i)`,
exactly as `realized + unrealized = mark * q - sum(price_i * s_i)` for prices.
Known gap: Thalex's daily settlement realises funding and resets the funding
mark (and E); v1 of the wire does not carry that settlement, so across one the
ledger's funding P&L misses what was settled (a v2 contract change is needed).

Fees paid
---------
The `fee` of each fill — what Thalex actually charged. A fill with `fee == 0`
and no `fee_rate` is "not reported" (the wire's `fee` is mandatory, so ingest
writes 0 when Thalex sent none; a genuine zero fee comes with its `fee_rate`).
Only then is the configured schedule used: the maker rate if the fill says
maker, else the taker rate, on the notional of `fees.trade_fee_base`, at least
`minimum_fee_usd`.

Closing cost of a position (what getting out now would cost)
------------------------------------------------------------
* `exit_price`: see `book.exit_quote` — the carried book levels walked for |q|
  (`book`; the part beyond the carried depth priced at the worst carried level
  and flagged `beyond_depth`), else the best bid (long) / best ask (short)
  (`top_of_book`), else mark (`mark`, the side is empty).
* `est_slippage = (mark - exit_price) * q` — for a long `(mark - vwap) * q`,
  for a short `(vwap - mark) * |q|`. The sign is kept honest: it is negative
  when the book would pay better than mark, because then closing really would
  bank more than the mark-valued P&L says.
* `est_close_fee = max(taker_rate * fees.close_fee_base(...), minimum_fee_usd)`
  for every open position (0 when flat). This is the RAW estimate: no buffer.

Portfolio (sums over the instruments of the epoch)
--------------------------------------------------
* `gross_pnl = realized_pnl + unrealized_pnl + funding_pnl`
* `net_pnl = gross_pnl - fees_paid`
* `net_after_close = net_pnl - est_close_fees * fee_estimation_buffer - est_slippage`

`est_close_fees` in the snapshot (and `est_close_fee` per position) is the RAW,
unbuffered estimate; `fee_estimation_buffer` is applied exactly once, in
`net_after_close`, so the DESIGN formula can be re-checked from the snapshot's
own fields. A consumer must never multiply `est_close_fees` by the buffer again
to decide — it decides on `net_after_close`.

Epochs
------
P&L counts from the start of the current epoch. `advance_epoch` (on the
executor's `completed`) resets realised P&L, fees and realised funding to 0 and
re-bases whatever is still open (dust) at the current mark (`avg_entry = mark`,
`E = funding_mark * q`), so the new epoch starts at exactly 0 gross P&L; the
position keeps its `opened_ts` (its age is real). Flat instruments leave the
book. Positions carried into the first epoch (`seed_from_exchange`) are valued
from the exchange's `average_price` (baseline `entry`) or its mark
(`mark_at_start`).

Reconciliation
--------------
`reconcile` compares every position with the exchange's `Positions` report (an
instrument the report does not list is flat there). They agree when they differ
by at most half the instrument's `volume_tick_size` (amounts live on that grid,
so any real difference is at least one tick), or by at most 1e-9 relative when
the instrument is unknown. A disagreement is remembered from the first report
that shows it; once it has lasted `drift_grace_seconds` (fills may still be in
flight until then) the ledger adopts the exchange's position, its
`average_price` and its funding entry value, and lists a `Drift`. The part of
the ledger's own position the exchange no longer has is first realised at the
exchange's mark (a missed close is neither lost nor counted twice); what the
exchange holds is carried at its average price (a missed opening shows the
P&L the exchange shows). The `Drift` stays in every snapshot until a later
report agrees (healed); a fill that was still in flight at adoption will show
as a new drift and be healed the same way.

De-duplication (bounded)
------------------------
The ledger remembers the last `dedup_window` trade ids (default 10,000) with
their `exchange_ts`, and a horizon: the newest `exchange_ts` it has forgotten
(and the `exchange_ts` of the report it was seeded from). A fill whose id is
remembered is a DUPLICATE; a fill at or before the horizon is refused
(BEFORE_HORIZON) because it might be one the ledger has forgotten or one the
seed already contains. Guarantee, given that a trade's `exchange_ts` never
changes: no trade is ever counted twice, in bounded memory; the price is that a
genuine fill arriving after `dedup_window` newer fills (so at or before the
horizon) is refused — the service dead-letters it and reconciliation heals the
position. The remembered ids are part of the checkpoint (about 40 bytes of
JSON each: ~4 MB at 100,000), so the service sizes the window against how
often it checkpoints.

Prices and staleness
--------------------
The mark, book, index and funding mark are the instrument's latest tick (a
tick older than the one held is ignored). Until an instrument has ticked it is
valued at its average entry (0 unrealised; after a seed, at the exchange's
mark). An open position is stale when its instrument has not ticked within
`stale_after_seconds` of `now`, measured on the tick's `exchange_ts` (the age
of the price itself), or has never ticked.

Cost
----
A tick or a fill re-values one instrument and moves the portfolio totals by
that instrument's change (`totals()` is O(1)); the running sums are compensated
(double-double) and both the old and the new value are added exactly, so they
do not drift. A snapshot is O(n) in the instruments of the epoch and sums with
`math.fsum`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from services.common.config import FeeRates, Settings, TradingFees
from services.common.contracts import (
    Drift,
    ExchangePosition,
    ExitPriceSource,
    Fill,
    InstrumentInfo,
    Positions,
    Snapshot,
    SnapshotPosition,
    Tick,
)
from services.portfolio.book import ExitQuote, exit_quote
from services.portfolio.fees import (
    close_fee_base,
    estimated_fee,
    rate_for_liquidity,
    rates_for,
    trade_fee_base,
)

STATE_VERSION = 1
DEFAULT_DEDUP_WINDOW = 10_000
FLAT_TOLERANCE = 1e-9
"""Relative rest of a reduction that counts as flat (float noise, not a position)."""
UNKNOWN_INSTRUMENT_TOLERANCE = 1e-9
"""Relative tolerance of reconciliation when the instrument's volume tick is unknown."""

Baseline = Literal["entry", "mark_at_start"]


class FillOutcome(StrEnum):
    """What the ledger did with a fill."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    """Its trade id was counted already."""
    BEFORE_HORIZON = "before_horizon"
    """Older than what the ledger can de-duplicate (or than the seed): refused."""


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """The settings the ledger needs (configuration, not state: never checkpointed)."""

    fees: TradingFees
    fee_estimation_buffer: float
    drift_grace_seconds: float = 5.0
    dedup_window: int = DEFAULT_DEDUP_WINDOW

    @classmethod
    def from_settings(cls, settings: Settings) -> LedgerConfig:
        return cls(
            fees=settings.trading_fees,
            fee_estimation_buffer=settings.fee_estimation_buffer,
            drift_grace_seconds=settings.portfolio.drift_grace_seconds,
            dedup_window=settings.portfolio.dedup_window,
        )


@dataclass(frozen=True, slots=True)
class Totals:
    """The portfolio figures of the current epoch (see the module docstring)."""

    realized_pnl: float
    unrealized_pnl: float
    funding_pnl: float
    fees_paid: float
    est_close_fees: float
    """Raw estimate, no buffer."""
    est_slippage: float
    gross_pnl: float
    net_pnl: float
    net_after_close: float

    @classmethod
    def of(
        cls,
        realized: float,
        unrealized: float,
        funding: float,
        fees: float,
        close_fees: float,
        slippage: float,
        fee_estimation_buffer: float,
    ) -> Totals:
        """The derived figures, with the buffer applied once."""
        gross = realized + unrealized + funding
        net = gross - fees
        return cls(
            realized_pnl=realized,
            unrealized_pnl=unrealized,
            funding_pnl=funding,
            fees_paid=fees,
            est_close_fees=close_fees,
            est_slippage=slippage,
            gross_pnl=gross,
            net_pnl=net,
            net_after_close=net - close_fees * fee_estimation_buffer - slippage,
        )


class _RunningSum:
    """A sum kept as an unevaluated pair (hi + lo), updated with error-free TwoSum.

    Adding an instrument's new contribution and subtracting its old one are both
    exact up to ~1e-32 relative, so the running total equals the sum of the
    current contributions however many ticks went by.
    """

    __slots__ = ("hi", "lo")

    def __init__(self) -> None:
        self.hi = 0.0
        self.lo = 0.0

    def add(self, x: float) -> None:
        hi = self.hi
        s = hi + x
        back = s - hi
        self.lo += (hi - (s - back)) + (x - back)
        self.hi = s

    @property
    def value(self) -> float:
        return self.hi + self.lo


class _Position:
    """One instrument in the current epoch: the accounting state plus its valuation."""

    __slots__ = (
        "avg_entry",
        "est_close_fee",
        "est_slippage",
        "exit",
        "fees_paid",
        "funding_entry_value",
        "funding_realized",
        "funding_unrealized",
        "instrument",
        "mark",
        "opened_ts",
        "position",
        "realized_pnl",
        "unrealized_pnl",
    )

    def __init__(self, instrument: str) -> None:
        self.instrument = instrument
        self.position = 0.0
        self.avg_entry = 0.0
        self.realized_pnl = 0.0
        self.fees_paid = 0.0
        self.funding_realized = 0.0
        self.funding_entry_value = 0.0
        self.opened_ts: float | None = None
        self.mark = 0.0
        self.unrealized_pnl = 0.0
        self.funding_unrealized = 0.0
        self.exit = ExitQuote(0.0, ExitPriceSource.MARK)
        self.est_close_fee = 0.0
        self.est_slippage = 0.0

    @property
    def funding_pnl(self) -> float:
        return self.funding_realized + self.funding_unrealized

    def contributions(self) -> tuple[float, float, float, float, float, float]:
        """What this instrument adds to each running portfolio sum."""
        return (
            self.realized_pnl,
            self.unrealized_pnl,
            self.funding_realized + self.funding_unrealized,
            self.fees_paid,
            self.est_close_fee,
            self.est_slippage,
        )

    def accounting_state(self) -> list[float | None]:
        return [
            self.position,
            self.avg_entry,
            self.realized_pnl,
            self.fees_paid,
            self.funding_realized,
            self.funding_entry_value,
            self.opened_ts,
        ]

    @classmethod
    def from_accounting_state(cls, instrument: str, state: list[Any]) -> _Position:
        p = cls(instrument)
        (
            p.position,
            p.avg_entry,
            p.realized_pnl,
            p.fees_paid,
            p.funding_realized,
            p.funding_entry_value,
            p.opened_ts,
        ) = state
        return p


def _sign(x: float) -> float:
    return 1.0 if x > 0 else -1.0


class Ledger:
    """Per-instrument positions and the fee-aware P&L of the current epoch."""

    def __init__(self, config: LedgerConfig) -> None:
        self._config = config
        self._minimum_fee = config.fees.minimum_fee_usd
        self._epoch = 0
        self._epoch_started_ts: float | None = None
        self._last_input_ts: float | None = None
        self._positions: dict[str, _Position] = {}
        self._ticks: dict[str, Tick] = {}
        self._instruments: dict[str, InstrumentInfo] = {}
        self._rates: dict[str, FeeRates] = {}
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._horizon: float | None = None
        self._drift_since: dict[str, float] = {}
        self._drift: dict[str, Drift] = {}
        self._sums = tuple(_RunningSum() for _ in range(6))
        self._rows: dict[str, SnapshotPosition] = {}
        self._adopted_through: dict[str, float] = {}
        """instrument -> exchange_ts of the report whose position was adopted (see `apply_fill`)."""
        """Snapshot rows of positions unchanged since the last snapshot (`_value` drops a row)."""

    # ----------------------------------------------------------------- reading

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def epoch_started_ts(self) -> float | None:
        """When the current epoch began (None: the first epoch, before any seed)."""
        return self._epoch_started_ts

    def position(self, instrument: str) -> float:
        """The signed position the ledger holds in `instrument` (0 when none)."""
        p = self._positions.get(instrument)
        return p.position if p is not None else 0.0

    def beyond_depth(self) -> list[str]:
        """Open positions larger than the book depth the tick carried (exit price is optimistic).

        The snapshot cannot say so in v1 (its source is `book` either way), so
        the service logs / exports this list.
        """
        return [name for name, p in self._positions.items() if p.exit.beyond_depth]

    def totals(self) -> Totals:
        """The portfolio figures, O(1): the running sums kept on every tick and fill."""
        realized, unrealized, funding, fees, close_fees, slippage = (s.value for s in self._sums)
        return Totals.of(
            realized, unrealized, funding, fees, close_fees, slippage, self._config.fee_estimation_buffer
        )

    def stale_instruments(self, now: float, stale_after_seconds: float) -> list[str]:
        """Open positions whose instrument has not ticked within `stale_after_seconds` (sorted)."""
        return sorted(
            name for name, p in self._positions.items()
            if p.position != 0.0
            and ((tick := self._ticks.get(name)) is None or now - tick.exchange_ts > stale_after_seconds)
        )

    def snapshot(self, seq: int, now: float, stale_after_seconds: float) -> Snapshot:
        """The full picture, O(n): every instrument of the epoch plus the exact sums.

        Positions are built without re-validation (the ledger made them from
        validated inputs); the Snapshot itself is validated, so a non-finite
        figure anywhere reaches its totals and is stopped here.
        """
        rows: list[SnapshotPosition] = []
        oldest: float | None = None
        for name, p in self._positions.items():
            row = self._rows.get(name)
            if row is None:
                self._rows[name] = row = self._row(p)
            rows.append(row)
            if p.position == 0.0:
                continue
            if p.opened_ts is not None and (oldest is None or p.opened_ts < oldest):
                oldest = p.opened_ts
        totals = Totals.of(
            math.fsum(r.realized_pnl for r in rows),
            math.fsum(r.unrealized_pnl for r in rows),
            math.fsum(r.funding_pnl for r in rows),
            math.fsum(r.fees_paid for r in rows),
            math.fsum(r.est_close_fee for r in rows),
            math.fsum(r.est_slippage for r in rows),
            self._config.fee_estimation_buffer,
        )
        return Snapshot(
            seq=seq,
            epoch=self._epoch,
            ts=now,
            positions=rows,
            realized_pnl=totals.realized_pnl,
            unrealized_pnl=totals.unrealized_pnl,
            funding_pnl=totals.funding_pnl,
            fees_paid=totals.fees_paid,
            est_close_fees=totals.est_close_fees,
            est_slippage=totals.est_slippage,
            gross_pnl=totals.gross_pnl,
            net_pnl=totals.net_pnl,
            net_after_close=totals.net_after_close,
            oldest_position_ts=oldest,
            stale_instruments=self.stale_instruments(now, stale_after_seconds),
            drift=list(self._drift.values()),
            last_input_ts=self._last_input_ts,
        )

    def _row(self, p: _Position) -> SnapshotPosition:
        """One position's snapshot row, built without re-validation (inputs were validated)."""
        name = p.instrument
        info = self._instruments.get(name)
        return SnapshotPosition.model_construct(
            instrument=name,
            position=p.position,
            avg_entry=p.avg_entry,
            mark=p.mark,
            exit_price=p.exit.price,
            exit_price_source=p.exit.source,
            realized_pnl=p.realized_pnl,
            unrealized_pnl=p.unrealized_pnl,
            funding_pnl=p.funding_pnl,
            fees_paid=p.fees_paid,
            est_close_fee=p.est_close_fee,
            est_slippage=p.est_slippage,
            opened_ts=p.opened_ts,
            underlying=info.underlying if info else None,
            instrument_type=info.type if info else None,
            expiry_ts=info.expiry_ts if info else None,
        )

    # ------------------------------------------------------------------ inputs

    def knows_instrument(self, name: str) -> bool:
        """Whether metadata (type, ticks, underlying) was given for `name`."""
        return name in self._instruments

    def set_instrument(self, name: str, info: InstrumentInfo) -> None:
        """Register (or update) an instrument's metadata; its fee rates follow its type."""
        self._instruments[name] = info
        self._rates[name] = rates_for(self._config.fees, name, info.type)
        p = self._positions.get(name)
        if p is not None:
            before = p.contributions()
            self._value(p)
            self._move_sums(before, p.contributions())

    def in_snapshot(self, instrument: str) -> bool:
        """Whether the snapshot has a row for `instrument` (a position of this epoch, open or closed).

        A price of any other instrument (a watch-list ticker) changes no figure of the snapshot.
        """
        return instrument in self._positions

    def apply_tick(self, tick: Tick) -> bool:
        """Take a new price; False (ignored) if it is older than the one held."""
        held = self._ticks.get(tick.instrument)
        if held is not None and tick.exchange_ts < held.exchange_ts:
            return False
        self._ticks[tick.instrument] = tick
        self._note_input(tick.ingest_ts)
        p = self._positions.get(tick.instrument)
        if p is not None:
            before = p.contributions()
            self._value(p)
            self._move_sums(before, p.contributions())
        return True

    def apply_fill(self, fill: Fill) -> FillOutcome:
        """Count one trade of the account, at most once (see De-duplication)."""
        if fill.trade_id in self._seen:
            return FillOutcome.DUPLICATE
        if self._horizon is not None and fill.exchange_ts <= self._horizon:
            return FillOutcome.BEFORE_HORIZON
        self._remember(fill.trade_id, fill.exchange_ts)
        self._note_input(fill.ingest_ts)
        name = fill.instrument
        p = self._positions.get(name)
        if p is None:
            p = self._positions[name] = _Position(name)
        tick = self._ticks.get(name)
        if fill.exchange_ts <= self._adopted_through.get(name, -math.inf):
            # A fill that arrives after drift was adopted, from before the adopted report: the
            # exchange's position already includes it. Count its fee, not its amount a second time.
            before = p.contributions()
            p.fees_paid += self._fee_of(fill, tick)
            self._value(p)
            self._move_sums(before, p.contributions())
            return FillOutcome.APPLIED
        funding_mark = fill.funding_mark
        if funding_mark is None:
            funding_mark = tick.funding_mark if tick is not None and tick.funding_mark is not None else 0.0
        before = p.contributions()
        self._trade(p, fill.signed_amount, fill.price, funding_mark, fill.exchange_ts)
        p.fees_paid += self._fee_of(fill, tick)
        self._value(p)
        self._move_sums(before, p.contributions())
        return FillOutcome.APPLIED

    def seed_from_exchange(self, report: Positions, baseline: Baseline, now: float) -> None:
        """Start the first epoch from the exchange's positions (start-up without a checkpoint).

        Replaces the book. `entry`: valued from `average_price` and the
        exchange's funding entry value (Thalex omits it when 0). `mark_at_start`:
        valued from `mark_price`, funding re-based so it starts at 0
        (`E = unrealised_perpetual_funding + perpetual_funding_entry_value`).
        `opened_ts` is `now` (the exchange does not say when a position was
        opened). Fills at or before the report's `exchange_ts` are already in
        it, so they become the de-duplication horizon.
        """
        self._positions = {}
        self._drift_since.clear()
        self._drift.clear()
        self._epoch_started_ts = now
        for ex in report.positions:
            if ex.position == 0.0:
                continue
            if ex.instrument not in self._ticks:
                self._ticks[ex.instrument] = Tick(
                    instrument=ex.instrument,
                    mark=ex.mark_price,
                    exchange_ts=report.exchange_ts,
                    ingest_ts=report.ingest_ts,
                )
            p = self._positions[ex.instrument] = _Position(ex.instrument)
            p.position = ex.position
            p.opened_ts = now
            entry_value = ex.perpetual_funding_entry_value or 0.0
            if baseline == "entry":
                p.avg_entry = ex.average_price
                p.funding_entry_value = entry_value
            else:
                p.avg_entry = ex.mark_price
                p.funding_entry_value = entry_value + (ex.unrealised_perpetual_funding or 0.0)
            self._value(p)
        if self._horizon is None or report.exchange_ts > self._horizon:
            self._horizon = report.exchange_ts
        self._note_input(report.ingest_ts)
        self._recount()

    def reconciliation_state(self) -> tuple[tuple[tuple[str, float], ...], tuple[Drift, ...]]:
        """The disagreements waiting out their grace period and the drift listed.

        `reconcile` changes nothing else but the positions it adopts, and an adoption always
        lists a new `Drift`; so when this is equal before and after, the report changed nothing
        worth a checkpoint or a snapshot.
        """
        return tuple(sorted(self._drift_since.items())), tuple(self._drift.values())

    def reconcile(self, report: Positions, now: float) -> list[Drift]:
        """Compare with the exchange; adopt its view where drift outlived the grace period.

        Returns the drift currently listed (see Reconciliation).
        """
        self._note_input(report.ingest_ts)
        exchange = {ex.instrument: ex for ex in report.positions}
        names = set(exchange) | {n for n, p in self._positions.items() if p.position != 0.0}
        for name in sorted(names):
            ex = exchange.get(name)
            exchange_position = ex.position if ex is not None else 0.0
            ledger_position = self.position(name)
            if self._agrees(name, ledger_position, exchange_position):
                self._drift_since.pop(name, None)
                self._drift.pop(name, None)
                continue
            since = self._drift_since.setdefault(name, now)
            if now - since < self._config.drift_grace_seconds:
                continue
            del self._drift_since[name]
            self._drift[name] = Drift(
                instrument=name,
                ledger_position=ledger_position,
                exchange_position=exchange_position,
                since=since,
            )
            self._adopt(name, ex, now)
            self._adopted_through[name] = report.exchange_ts
        return list(self._drift.values())

    def is_flat(self) -> bool:
        """Every position within half a volume tick of zero: a full closure's fills are all in."""
        return all(self._agrees(name, p.position, 0.0) or abs(p.position) < 1e-12
                   for name, p in self._positions.items())

    def advance_epoch(self, now: float, completed_epoch: int | None = None) -> bool:
        """A full closure completed: start a new epoch at zero P&L (see Epochs).

        `completed_epoch` (the report's epoch) guards against a duplicate
        `completed`: advancing twice would wipe the P&L made in between. Returns
        whether the epoch advanced.
        """
        if completed_epoch is not None and completed_epoch != self._epoch:
            return False
        self._epoch += 1
        self._epoch_started_ts = now
        kept: dict[str, _Position] = {}
        for name, p in self._positions.items():
            if p.position == 0.0:
                continue
            tick = self._ticks.get(name)
            if tick is not None:
                p.avg_entry = tick.mark
                if tick.funding_mark is not None:
                    p.funding_entry_value = tick.funding_mark * p.position
            p.realized_pnl = 0.0
            p.fees_paid = 0.0
            p.funding_realized = 0.0
            self._value(p)
            kept[name] = p
        self._positions = kept
        self._recount()
        return True

    # ------------------------------------------------------------------- state

    def to_state(self, *, with_ticks: bool = True) -> dict[str, Any]:
        """Everything the ledger knows, as plain JSON-able data (floats round-trip exactly).

        `with_ticks=False` leaves out the latest tick per instrument: the service
        stores those incrementally (`tick_state`) because they change on every tick
        while the accounting changes only on fills.
        """
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "epoch_started_ts": self._epoch_started_ts,
            "last_input_ts": self._last_input_ts,
            "positions": {n: p.accounting_state() for n, p in self._positions.items()},
            "ticks": {n: t.model_dump(mode="json", exclude_none=True) for n, t in self._ticks.items()}
            if with_ticks
            else {},
            "instruments": {
                n: i.model_dump(mode="json", exclude_none=True) for n, i in self._instruments.items()
            },
            "seen": [[trade_id, ts] for trade_id, ts in self._seen.items()],
            "horizon": self._horizon,
            "drift_since": dict(self._drift_since),
            "adopted_through": dict(self._adopted_through),
            "drift": [d.model_dump(mode="json") for d in self._drift.values()],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], config: LedgerConfig) -> Ledger:
        """Rebuild a ledger from `to_state()`; valuations are recomputed, so snapshots are identical."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"ledger state version {state.get('version')!r} is not {STATE_VERSION}")
        ledger = cls(config)
        ledger._epoch = state["epoch"]
        ledger._epoch_started_ts = state["epoch_started_ts"]
        ledger._last_input_ts = state["last_input_ts"]
        for name, data in state["instruments"].items():
            ledger._instruments[name] = info = InstrumentInfo.model_validate(data)
            ledger._rates[name] = rates_for(config.fees, name, info.type)
        ledger._ticks = {n: Tick.model_validate(t) for n, t in state["ticks"].items()}
        ledger._horizon = state["horizon"]
        for trade_id, ts in state["seen"]:
            ledger._remember(trade_id, ts)
        ledger._drift_since = dict(state["drift_since"])
        ledger._adopted_through = dict(state.get("adopted_through", {}))
        for d in state["drift"]:
            drift = Drift.model_validate(d)
            ledger._drift[drift.instrument] = drift
        for name, data in state["positions"].items():
            p = ledger._positions[name] = _Position.from_accounting_state(name, data)
            ledger._value(p)
        ledger._recount()
        return ledger

    # ------------------------------------------------------------- accounting

    def _trade(
        self, p: _Position, signed_amount: float, price: float, funding_mark: float, ts: float
    ) -> None:
        """Average-cost update of one position by one trade (see the module docstring)."""
        q = p.position
        if q == 0.0 or (q > 0) == (signed_amount > 0):
            size = abs(q) + abs(signed_amount)
            p.avg_entry = (p.avg_entry * abs(q) + price * abs(signed_amount)) / size
            p.funding_entry_value += funding_mark * signed_amount
            if q == 0.0:
                p.opened_ts = ts
            p.position = q + signed_amount
            return
        rest = q + signed_amount
        if abs(rest) <= FLAT_TOLERANCE * (abs(q) + abs(signed_amount)):
            rest = 0.0
        if rest != 0.0 and (rest > 0) == (q > 0):
            self._close(p, abs(signed_amount), price, funding_mark)
            p.position = rest
            return
        self._close(p, abs(q), price, funding_mark)
        p.position = rest
        p.funding_entry_value = funding_mark * rest
        if rest == 0.0:
            p.avg_entry = 0.0
            p.opened_ts = None
        else:
            p.avg_entry = price
            p.opened_ts = ts

    @staticmethod
    def _close(p: _Position, size: float, price: float, funding_mark: float) -> None:
        """Realise `size` (<= |position|) of the position at `price`, and its funding."""
        direction = _sign(p.position)
        p.realized_pnl += (price - p.avg_entry) * size * direction
        released = p.funding_entry_value * (size / abs(p.position))
        p.funding_realized += funding_mark * size * direction - released
        p.funding_entry_value -= released

    def _fee_of(self, fill: Fill, tick: Tick | None) -> float:
        """The fee the exchange charged; the schedule only when it reported none."""
        if fill.fee != 0.0 or fill.fee_rate is not None:
            return fill.fee
        rates = self._rates_for(fill.instrument)
        info = self._instruments.get(fill.instrument)
        base = trade_fee_base(
            fill.amount,
            fill.price,
            info.type if info is not None else None,
            tick.index if tick is not None else None,
        )
        rate = rate_for_liquidity(fill.liquidity, rates.maker_fee_rate, rates.taker_fee_rate)
        return estimated_fee(base, rate, self._minimum_fee)

    def _adopt(self, name: str, ex: ExchangePosition | None, now: float) -> None:
        """Take the exchange's position, average price and funding entry value."""
        p = self._positions.get(name)
        if p is None:
            p = self._positions[name] = _Position(name)
        before = p.contributions()
        q = p.position
        target = ex.position if ex is not None else 0.0
        same_side = q != 0.0 and target != 0.0 and (q > 0) == (target > 0)
        if q != 0.0:
            closed = abs(q) - abs(target) if same_side else abs(q)
            if closed > 0.0:
                tick = self._ticks.get(name)
                mark = ex.mark_price if ex is not None else p.mark
                funding_mark = tick.funding_mark if tick is not None else None
                self._close(p, closed, mark, funding_mark if funding_mark is not None else 0.0)
        p.position = target
        if target == 0.0:
            p.avg_entry = 0.0
            p.funding_entry_value = 0.0
            p.opened_ts = None
        else:
            assert ex is not None
            p.avg_entry = ex.average_price
            p.funding_entry_value = ex.perpetual_funding_entry_value or 0.0
            if not same_side:
                p.opened_ts = now
        self._value(p)
        self._move_sums(before, p.contributions())

    def _agrees(self, name: str, ledger_position: float, exchange_position: float) -> bool:
        info = self._instruments.get(name)
        if info is not None:
            tolerance = info.volume_tick_size / 2
        else:
            tolerance = UNKNOWN_INSTRUMENT_TOLERANCE * max(abs(ledger_position), abs(exchange_position))
        return abs(ledger_position - exchange_position) <= tolerance

    # -------------------------------------------------------------- valuation

    def _value(self, p: _Position) -> None:
        """Mark one position: unrealised P&L, funding, exit price, closing cost."""
        name = p.instrument
        self._rows.pop(name, None)
        q = p.position
        tick = self._ticks.get(name)
        if tick is None:
            mark = p.avg_entry
            funding_mark = index = None
            p.exit = ExitQuote(mark, ExitPriceSource.MARK)
        else:
            mark = tick.mark
            funding_mark = tick.funding_mark
            index = tick.index
            p.exit = exit_quote(q, mark, tick.best_bid, tick.best_ask, tick.bids, tick.asks)
        p.mark = mark
        p.unrealized_pnl = (mark - p.avg_entry) * q
        p.funding_unrealized = funding_mark * q - p.funding_entry_value if funding_mark is not None else 0.0
        p.est_slippage = (mark - p.exit.price) * q
        if q == 0.0:
            p.est_close_fee = 0.0
            return
        info = self._instruments.get(name)
        base = close_fee_base(abs(q), p.exit.price, mark, info.type if info is not None else None, index)
        p.est_close_fee = estimated_fee(base, self._rates_for(name).taker_fee_rate, self._minimum_fee)

    def _rates_for(self, name: str) -> FeeRates:
        rates = self._rates.get(name)
        if rates is None:
            rates = self._rates[name] = rates_for(self._config.fees, name, None)
        return rates

    def _move_sums(self, before: tuple[float, ...], after: tuple[float, ...]) -> None:
        for running, old, new in zip(self._sums, before, after, strict=True):
            if old != new:
                running.add(new)
                running.add(-old)

    def _recount(self) -> None:
        """Rebuild the running sums from the positions (after bulk changes)."""
        self._sums = tuple(_RunningSum() for _ in range(6))
        for p in self._positions.values():
            self._move_sums((0.0,) * 6, p.contributions())

    # ------------------------------------------------------------ bookkeeping

    def _remember(self, trade_id: str, exchange_ts: float) -> None:
        self._seen[trade_id] = exchange_ts
        while len(self._seen) > self._config.dedup_window:
            _, forgotten_ts = self._seen.popitem(last=False)
            if self._horizon is None or forgotten_ts > self._horizon:
                self._horizon = forgotten_ts

    def _note_input(self, ingest_ts: float) -> None:
        if self._last_input_ts is None or ingest_ts > self._last_input_ts:
            self._last_input_ts = ingest_ts


# ------------------------------------------------------------------ calibration


@dataclass(frozen=True, slots=True)
class ClosedLeg:
    """One position as the executor closed it (from its `filled` / `completed` reports)."""

    position: float
    """The signed position that was closed (long > 0): the filled amount with the position's sign."""
    mark_at_decision: float
    """The mark in the snapshot the command was decided on."""
    avg_price: float
    """The average price the close filled at."""
    fee: float
    """The fees the closing trades actually paid."""


@dataclass(frozen=True, slots=True)
class CloseCostCheck:
    """How far the closing-cost estimate was from what closing really cost."""

    estimated: float
    actual: float
    error: float
    """`actual - estimated`: positive = closing cost more than estimated (the estimate was optimistic)."""


def estimated_close_cost(snapshot: Snapshot, fee_estimation_buffer: float) -> float:
    """The cost of closing the snapshot says it would take (`net_pnl - net_after_close`)."""
    return snapshot.est_close_fees * fee_estimation_buffer + snapshot.est_slippage


def check_close_cost(estimated: float, legs: Iterable[ClosedLeg]) -> CloseCostCheck:
    """Compare an estimate with the real cost: fees paid plus the fills' distance from mark.

    Measured the same way as the estimate: against the mark at decision time,
    `(mark - avg_price) * position` per leg (positive = sold below / bought
    above mark).
    """
    actual = math.fsum(leg.fee + (leg.mark_at_decision - leg.avg_price) * leg.position for leg in legs)
    return CloseCostCheck(estimated=estimated, actual=actual, error=actual - estimated)
