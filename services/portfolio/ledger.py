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
  `opened_ts` is set when the position opens from flat, and when it grows out of dust (below).
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
(else the position's current funding mark, else 0 — instruments without funding):

* grow:   `E += fm * s`;
* reduce by c: the closed share `c/|q|` of E is released and the funding of
  the closed part is realised: `funding_realized += fm * c * sign(q) - E * c/|q|`,
  `E -= E * c/|q|`;
* flip:   close all (E -> 0), then `E = fm * (q + s)` for the part opened.
* `funding_pnl = funding_realized + (funding_mark * q - E)` with the position's
  current funding mark: the newest one of its period from a tick or a fill
  (0 right after a settlement); the unrealised part is 0 while none is known.

Over a whole epoch this makes `funding_pnl = fm_now * q - sum(fm_i * s_i)`,
exactly as `realized + unrealized = mark * q - sum(price_i * s_i)` for prices.

Daily settlement. Thalex settles perpetual funding every day at 08:00 UTC
(contract specifications): the funding of the day is realised, the funding mark
starts again from 0 and so does E. The ledger does the same, on the exchange's
clock: every input of an instrument (tick or fill) is in the funding period of
its `exchange_ts` (period k runs from the settlement of day k, inclusive, to the
next). The first input of a later period settles the position first, at `F`,
the newest funding mark it had in the period that ended:
`funding_realized += F * q - E`, `E = 0`, funding mark 0. `funding_pnl` is
continuous across it (it moves only by the funding accrued between that last
mark and 08:00; ingest never coalesces a perpetual's last tick before 08:00
away, and a book change stamped after it carries no funding mark, so that mark
is the day's last ticker's), and E and the unrealised part are again the
exchange's `perpetual_funding_entry_value` and `unrealised_perpetual_funding`.
`funding_period` and `settlement_ts` live in services/common/funding.py. A fill of
the period before that arrives after the settlement is booked with its funding
mark moved into the new period (`fm - F`), so its funding is neither lost nor
counted twice. Periods without any input (ingest down a whole day) settle at
the last known mark; the funding of the days missed is unknown and not counted.
Each settlement is reported (`take_settlements`) so the service checkpoints it.
See docs/money.md for how this reads api.yaml.

Fees paid
---------
The exchange's figures: a fill's `fee`, plus its `liquidation_fee` for a
liquidation trade. A fee of 0 is the exchange's figure like any other (an
option expiring worthless pays nothing). Only a fill without `fee` (the
exchange reported none) is estimated, and the estimate is flagged in
`fees_estimated` (per position and in total):

* expiration: `settlement_fee_rate * price * amount` (Thalex: 1 bps of what is
  settled; 0 for an option expiring worthless);
* daily_mark (a settlement, not an exchange of contracts): 0 (Thalex: free);
* any other trade: its `fee_rate` if it reported one, else the schedule's maker
  rate if it says maker, else the taker rate, on `fees.trade_fee_base` (an
  option's on its index: the trade's own `index`, else the underlying's newest),
  capped by the option's `premium_cap`; the schedule's estimate is at least
  `minimum_fee_usd`;
* a liquidation without `liquidation_fee`: `liquidation_fee_rate * price * amount`
  more, flagged likewise.

Trade types (api.yaml `Trade.trade_type`)
-----------------------------------------
normal, block, combo (one trade per leg, on the leg's instrument, its direction
already the leg's), rfq (likewise), internal_transfer, liquidation, expiration
(the position closed at the settlement price), amend and delete: each moves
the position by its signed amount at its price, as above. daily_mark (legacy
futures-style settlement entries) moves nothing but its fee.

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
(`mark_at_start`; a line without a mark starts from the latest tick held, else
from `average_price`).

Dust
----
A position no order can close (`services.common.dust`: below the instrument's
`min_order_amount` once rounded down to its volume tick — what a closure leaves
after a partial fill, an RFQ fill off the tick) is listed in `Snapshot.dust`.
It stays in the book, in `open_positions` and in every figure (its P&L is
real), but `oldest_position_ts` and `next_expiry` leave it out: those exist for
take-profit's time limit, and a closure of dust closes nothing — it only wipes
every quote on the account, again after every cool-down (the dust loop,
docs/operations.md). Dust that a fill grows into a closable position is dated
from that fill (`opened_ts`): the exposure the time limit is about starts
there. Which positions are dust changes only with fills, adoptions and
instrument data, so it is part of `_Shape`. The knowledge lives here, not in
take-profit: the ledger holds every instrument's sizes (`tp:instruments`), and
the header says it without a field per row.

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
exchange's mark (the ledger's own mark when the report's line carries none; a
missed close is neither lost nor counted twice); what the
exchange holds is carried at its average price (a missed opening shows the
P&L the exchange shows). The `Drift` stays in every snapshot until a later
report agrees (healed).

A late trade corrects the adoption. A fill at or before the adopted report's
`exchange_ts` is already in the exchange's position: its amount is not counted
again (its fee is). The part of the adoption realised at the exchange's mark is
kept as a lot `(amount, side, mark, funding mark)`; a late fill that closes in
its direction takes `c = min(amount, lot)` from the oldest lot it may belong to
and corrects realised P&L by `(price - mark) * c * side` (and funding by
`(fm - lot fm) * c * side`), so realised P&L becomes what the trade really made,
`(price - avg_entry) * c * side` — Thalex's `position_pnl`. What a late fill
opened is already in the exchange's average price. Lots end with the epoch.

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
The mark and book are the instrument's latest tick (a tick older than the one
held is ignored). An option's index is its tick's, else the underlying's newest
from any tick: the latest tick of every instrument on the underlying and of the
underlying's own index feed (a `Tick` whose `instrument` is the underlying,
from `price_index.<underlying>`), newest first by when the ticker was marked (`Tick.mark_time`:
a book change re-issues the ticker's index with the book's time; ties by name).
An option valued on the underlying's index is re-valued when that index changes.
Until an instrument has ticked it is valued at its average entry (0 unrealised;
after a seed, at the exchange's mark). An open position is stale when its mark is older than
`stale_after_seconds` at `now`, measured on when the exchange marked it (`Tick.mark_time`: the
age of the price itself), or it has never ticked. A book change re-issues the last mark with the
book's time as `exchange_ts` (and the mark's own as `mark_ts`): it moves the exit price, not the
mark's age, so a live book behind a slowed or silent ticker leaves the position stale — valued at
a frozen mark, which only the emergency stop may decide on. A tick without `mark_ts` (an older
ingest) is as old as its `exchange_ts`, as before.

Cost
----
A tick or a fill re-values one instrument and moves the portfolio totals by
that instrument's change (`totals()` is O(1)); the running sums are compensated
(double-double) and both the old and the new value are added exactly, so they
do not drift. A snapshot is O(n) in the instruments of the epoch and sums with
`math.fsum`.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from services.common.config import FeeRates, Settings, TradingFees
from services.common.contracts import (
    Drift,
    ExchangePosition,
    ExitPriceSource,
    Expiry,
    Fill,
    InstrumentInfo,
    InstrumentType,
    Positions,
    Snapshot,
    SnapshotPosition,
    Tick,
    TradeType,
)
from services.common.dust import closable, dust_words, is_dust
from services.common.funding import funding_period, settlement_ts
from services.portfolio.book import ExitQuote, exit_quote
from services.portfolio.fees import (
    close_fee_base,
    estimated_fee,
    premium_cap_of,
    rate_for_liquidity,
    rates_for,
    trade_fee_base,
)

STATE_VERSION = 2
"""2: positions carry their estimated fees and funding period; adoption lots (1 is still read)."""
DEFAULT_DEDUP_WINDOW = 10_000
FLAT_TOLERANCE = 1e-9
"""Relative rest of a reduction that counts as flat (float noise, not a position)."""
UNKNOWN_INSTRUMENT_TOLERANCE = 1e-9
"""Relative tolerance of reconciliation when the instrument's volume tick is unknown."""
SUMS = 7
"""Running sums: realised, unrealised, funding, fees, close fees, slippage, estimated fees."""
MAX_ADOPTED_LOTS = 100
"""Adoption lots kept per instrument waiting for their late trades (the oldest goes first)."""

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


@dataclass(frozen=True, slots=True)
class FundingSettlement:
    """A daily funding settlement the ledger booked (see Daily settlement)."""

    instrument: str
    settled_ts: float
    """When the period that was settled ended (08:00 UTC)."""
    funding_mark: float
    """The funding mark it was settled at: the newest the position had in that period."""
    position: float
    realized: float
    """`funding_mark * position - E`: what moved from unrealised to realised funding."""
    periods: int
    """Settlements passed (more than 1: periods without any input, not counted)."""


@dataclass(slots=True)
class AdoptedLot:
    """A part of a position that reconciliation realised at the exchange's mark, awaiting its trade."""

    amount: float
    side: float
    """+1: a long was closed (the late trade sells), -1: a short was closed."""
    mark: float
    funding_mark: float
    through_ts: float
    """`exchange_ts` of the adopted report: only trades at or before it belong to the lot."""

    def to_state(self) -> list[float]:
        return [self.amount, self.side, self.mark, self.funding_mark, self.through_ts]


class _RunningSum:
    """An exact running sum: Shewchuk's non-overlapping partials (what `math.fsum` keeps inside).

    Adding an instrument's new contribution and subtracting its old one are exact, so `value`
    is the correctly rounded sum of the current contributions — bit for bit what `math.fsum`
    over every row gives (a delta snapshot's totals equal a full one's), however many ticks
    went by, in O(1) per change (a handful of partials).
    """

    __slots__ = ("partials",)

    def __init__(self) -> None:
        self.partials: list[float] = []

    def add(self, x: float) -> None:
        partials = self.partials
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]

    @property
    def value(self) -> float:
        return math.fsum(self.partials)


@dataclass(frozen=True, slots=True)
class _Shape:
    """What a snapshot says about the whole book besides money (changes only with fills and the like)."""

    open_positions: int
    oldest: float | None
    """The oldest opening of a position an order can close (dust left out)."""
    next_expiry: Expiry | None
    """Likewise: the closable dated position that expires first."""
    unpriced: int
    """Open positions that never ticked (stale by definition)."""
    dust: tuple[str, ...] = ()
    """Open positions no order can close, sorted."""


class _Position:
    """One instrument in the current epoch: the accounting state plus its valuation."""

    __slots__ = (
        "avg_entry",
        "est_close_fee",
        "est_slippage",
        "exit",
        "fees_estimated",
        "fees_paid",
        "funding_entry_value",
        "funding_mark",
        "funding_period",
        "funding_realized",
        "funding_ts",
        "funding_unrealized",
        "instrument",
        "mark",
        "opened_ts",
        "position",
        "realized_pnl",
        "settled_mark",
        "unrealized_pnl",
    )

    def __init__(self, instrument: str) -> None:
        self.instrument = instrument
        self.position = 0.0
        self.avg_entry = 0.0
        self.realized_pnl = 0.0
        self.fees_paid = 0.0
        self.fees_estimated = 0.0
        self.funding_realized = 0.0
        self.funding_entry_value = 0.0
        self.funding_mark: float | None = None
        """The newest funding mark of the current period (tick or fill); None: never known."""
        self.funding_ts: float | None = None
        self.funding_period: int | None = None
        self.settled_mark: float | None = None
        """The funding mark of the last settlement (moves a late fill of that period into this one)."""
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

    def contributions(self) -> tuple[float, float, float, float, float, float, float]:
        """What this instrument adds to each running portfolio sum (its snapshot row's figures)."""
        return (
            self.realized_pnl,
            self.unrealized_pnl,
            self.funding_realized + self.funding_unrealized,
            self.fees_paid,
            self.est_close_fee,
            self.est_slippage,
            self.fees_estimated,
        )

    def accounting_state(self) -> list[float | int | None]:
        return [
            self.position,
            self.avg_entry,
            self.realized_pnl,
            self.fees_paid,
            self.funding_realized,
            self.funding_entry_value,
            self.opened_ts,
            self.fees_estimated,
            self.funding_mark,
            self.funding_ts,
            self.funding_period,
            self.settled_mark,
        ]

    @classmethod
    def from_accounting_state(cls, instrument: str, state: list[Any]) -> _Position:
        """From `accounting_state()`; a version-1 list (7 items) takes the defaults for the rest."""
        p = cls(instrument)
        values = list(state) + [0.0, None, None, None, None][len(state) - 7:]
        (
            p.position,
            p.avg_entry,
            p.realized_pnl,
            p.fees_paid,
            p.funding_realized,
            p.funding_entry_value,
            p.opened_ts,
            p.fees_estimated,
            p.funding_mark,
            p.funding_ts,
            p.funding_period,
            p.settled_mark,
        ) = values
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
        self._sums = tuple(_RunningSum() for _ in range(SUMS))
        self._rows: dict[str, SnapshotPosition] = {}
        """Snapshot rows of positions unchanged since the last snapshot (`_value` drops a row)."""
        self._changed: dict[str, None] = {}
        """Positions valued again since the last published snapshot (its delta's candidates)."""
        self._published: dict[str, tuple[tuple[object, ...], SnapshotPosition]] = {}
        """Each position's row as last published, with the figures it was built from (`_figures`):
        a delta leaves out a row whose figures are the same (a ticker re-sent at the same prices
        values a position again and changes nothing), without building it again."""
        self._full_due = True
        """The next published snapshot must be full: nothing published yet, or rows left the book."""
        self._shape: _Shape | None = None
        """Open count, oldest opening, next expiry: recomputed only after a fill or the like."""
        self._price_ages: list[tuple[float, str]] = []
        """Heap of (mark time, instrument) of open positions, lazily pruned (`stale_instruments`)."""
        self._adopted_through: dict[str, float] = {}
        """instrument -> exchange_ts of the report whose position was adopted (see `apply_fill`)."""
        self._lots: dict[str, list[AdoptedLot]] = {}
        """instrument -> what adoptions realised at the exchange's mark, awaiting the late trades."""
        self._index: dict[str, tuple[float, float, str]] = {}
        """underlying -> (index, exchange_ts, tick it came from): the newest of the latest ticks."""
        self._on_underlying: dict[str, set[str]] = {}
        """underlying -> the ticks held that belong to it (instruments, and its own index feed)."""
        self._index_users: dict[str, set[str]] = {}
        """underlying -> options of the book valued on its index (their own tick carries none)."""
        self._settlements: list[FundingSettlement] = []

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

    def take_settlements(self) -> list[FundingSettlement]:
        """The funding settlements booked since the last call (the service checkpoints and logs them)."""
        settled, self._settlements = self._settlements, []
        return settled

    def totals(self) -> Totals:
        """The portfolio figures, O(1): the running sums kept on every tick and fill."""
        realized, unrealized, funding, fees, close_fees, slippage, _ = (s.value for s in self._sums)
        return Totals.of(
            realized, unrealized, funding, fees, close_fees, slippage, self._config.fee_estimation_buffer
        )

    def stale_instruments(self, now: float, stale_after_seconds: float) -> list[str]:
        """Open positions whose mark is older than `stale_after_seconds`, or that never ticked (sorted).

        Judged on when the mark was marked (`Tick.mark_time`), not on the tick's time: a book
        change re-issues the old mark stamped fresh, and the position is valued at that mark.
        O(1) amortised while every price is fresh (the heap's oldest valid entry says so); the
        scan over every position runs only when something is stale.
        """
        shape = self._shape_now()
        if shape.unpriced == 0:
            heap = self._price_ages
            while heap:
                ts, name = heap[0]
                p = self._positions.get(name)
                tick = self._ticks.get(name)
                if p is not None and p.position != 0.0 and tick is not None and tick.mark_time == ts:
                    break
                heapq.heappop(heap)
            if not heap or not now - heap[0][0] > stale_after_seconds:
                return []
        return sorted(
            name for name, p in self._positions.items()
            if p.position != 0.0
            and ((tick := self._ticks.get(name)) is None or now - tick.mark_time > stale_after_seconds)
        )

    def snapshot(self, seq: int, now: float, stale_after_seconds: float) -> Snapshot:
        """The full picture: every instrument of the epoch plus the exact sums (publishes nothing)."""
        return self._snapshot(seq, now, stale_after_seconds, self.rows(), full=True)

    def publish(self, seq: int, now: float, stale_after_seconds: float) -> Snapshot:
        """The snapshot to publish: full when due (first one, rows left the book), else the delta.

        A delta carries the rows that differ from the ones last published, so its cost grows
        with the positions a batch changed, not with the positions held; the totals and derived
        figures are the whole account's either way (running sums, `_Shape`, the price heap).
        """
        full = self._full_due
        if full:
            built = {name: self._figured_row(p) for name, p in self._positions.items()}
            self._published = built
            rows = [row for _, row in built.values()]
        else:
            rows = []
            for name in self._changed:
                p = self._positions.get(name)
                if p is None:
                    continue
                figures = self._figures(p)
                published = self._published.get(name)
                if published is not None and published[0] == figures:
                    self._rows[name] = published[1]  # the very row: nothing to build
                    continue
                self._rows[name] = row = self._row(name, figures)
                rows.append(row)
                self._published[name] = (figures, row)
        self._changed.clear()
        self._full_due = False
        return self._snapshot(seq, now, stale_after_seconds, rows, full=full)

    def rows(self) -> list[SnapshotPosition]:
        """Every position's snapshot row (cached for the positions unchanged since they were built)."""
        return [self._figured_row(p)[1] for p in self._positions.values()]

    def _figured_row(self, p: _Position) -> tuple[tuple[object, ...], SnapshotPosition]:
        """A position's figures and its row (the cached one while it is unchanged)."""
        figures = self._figures(p)
        row = self._rows.get(p.instrument)
        if row is None:
            self._rows[p.instrument] = row = self._row(p.instrument, figures)
        return figures, row

    def _snapshot(self, seq: int, now: float, stale_after_seconds: float, rows: list[SnapshotPosition],
                  *, full: bool) -> Snapshot:
        """The rows are validated as they are built (`_row`); the Snapshot itself is validated too,
        so a non-finite figure anywhere is stopped before anything is published."""
        totals = self.totals()
        estimated = self._sums[6].value
        shape = self._shape_now()
        return Snapshot(
            seq=seq,
            epoch=self._epoch,
            ts=now,
            full=full,
            positions=rows,
            open_positions=shape.open_positions,
            next_expiry=shape.next_expiry,
            realized_pnl=totals.realized_pnl,
            unrealized_pnl=totals.unrealized_pnl,
            funding_pnl=totals.funding_pnl,
            fees_paid=totals.fees_paid,
            est_close_fees=totals.est_close_fees,
            est_slippage=totals.est_slippage,
            gross_pnl=totals.gross_pnl,
            net_pnl=totals.net_pnl,
            net_after_close=totals.net_after_close,
            fees_estimated=estimated if estimated != 0.0 else None,
            oldest_position_ts=shape.oldest,
            stale_instruments=self.stale_instruments(now, stale_after_seconds),
            drift=list(self._drift.values()),
            last_input_ts=self._last_input_ts,
            dust=list(shape.dust) or None,
        )

    def _shape_now(self) -> _Shape:
        """The open count, oldest opening and next expiry; O(n) only after they may have changed."""
        shape = self._shape
        if shape is not None:
            return shape
        opened = [p for p in self._positions.values() if p.position != 0.0]
        infos = self._instruments
        dust = {p.instrument for p in opened if is_dust(p.position, infos.get(p.instrument))}
        closing = [p for p in opened if p.instrument not in dust] if dust else opened
        oldest = min((p.opened_ts for p in closing if p.opened_ts is not None), default=None)
        dated = []
        for p in closing:
            info = self._instruments.get(p.instrument)
            if info is not None and info.expiry_ts is not None and info.type is not InstrumentType.PERPETUAL:
                dated.append((info.expiry_ts, p.instrument))
        soonest = min(dated, default=None)
        self._price_ages = [(t.mark_time, p.instrument) for p in opened
                            if (t := self._ticks.get(p.instrument)) is not None]
        heapq.heapify(self._price_ages)
        self._shape = shape = _Shape(
            open_positions=len(opened),
            oldest=oldest,
            next_expiry=None if soonest is None else Expiry(instrument=soonest[1], expiry_ts=soonest[0]),
            unpriced=len(opened) - len(self._price_ages),
            dust=tuple(sorted(dust)),
        )
        return shape

    def _figures(self, p: _Position) -> tuple[object, ...]:
        """Everything a position's row is built from, and all `_row` reads: equal figures, equal row.

        Compared instead of the rows themselves: 0.13 µs against 0.5 µs for pydantic's `==` of two
        rows, and a row whose figures did not move is not built at all (3.8 µs; bench/batch_curve.py).
        """
        return (p.position, p.avg_entry, p.mark, p.exit, p.realized_pnl, p.unrealized_pnl, p.funding_realized,
                p.funding_unrealized, p.fees_paid, p.est_close_fee, p.est_slippage, p.fees_estimated,
                p.opened_ts, self._instruments.get(p.instrument))

    @staticmethod
    def _row(name: str, figures: tuple[Any, ...]) -> SnapshotPosition:
        """One position's snapshot row from its `_figures` (nothing else: a figure the row shows must
        be one the comparison sees), validated: pydantic-core's constructor is the cheaper one (3.1 µs
        a row against 5.1 µs for `model_construct`'s Python loop; docs/performance.md), and a
        non-finite figure is stopped at the row that carries it."""
        (position, avg_entry, mark, exit_quote, realized, unrealized, funding_realized, funding_unrealized,
         fees_paid, close_fee, slippage, fees_estimated, opened_ts, info) = figures
        return SnapshotPosition(
            instrument=name,
            position=position,
            avg_entry=avg_entry,
            mark=mark,
            exit_price=exit_quote.price,
            exit_price_source=exit_quote.source,
            exit_within_depth=exit_quote.source is ExitPriceSource.BOOK and not exit_quote.beyond_depth,
            realized_pnl=realized,
            unrealized_pnl=unrealized,
            funding_pnl=funding_realized + funding_unrealized,
            fees_paid=fees_paid,
            est_close_fee=close_fee,
            est_slippage=slippage,
            fees_estimated=fees_estimated if fees_estimated != 0.0 else None,
            opened_ts=opened_ts,
            underlying=info.underlying if info else None,
            instrument_type=info.type if info else None,
            expiry_ts=info.expiry_ts if info else None,
            volume_tick_size=info.volume_tick_size if info else None,
        )

    # ------------------------------------------------------------------ inputs

    def knows_instrument(self, name: str) -> bool:
        """Whether metadata (type, ticks, underlying) was given for `name`."""
        return name in self._instruments

    def set_instrument(self, name: str, info: InstrumentInfo) -> None:
        """Register (or update) an instrument's metadata; its fee rates follow its type."""
        old_underlying = self._underlying(name)
        self._instruments[name] = info
        self._rates[name] = rates_for(self._config.fees, name, info.type)
        tick = self._ticks.get(name)
        if tick is not None and old_underlying != info.underlying:  # its tick now speaks for the underlying
            self._on_underlying.get(old_underlying, set()).discard(name)
            self._rescan_index(old_underlying)
            self._note_index(name, tick)
        p = self._positions.get(name)
        if p is not None:
            self._shape = None
            self._revalue(p)

    def moves_snapshot(self, instrument: str) -> bool:
        """Whether a price of `instrument` moves a figure of the snapshot.

        A position of this epoch (open or closed), or an index an option of the epoch is valued
        on (its own tick carries none). A price of any other instrument (a watch-list ticker)
        changes no figure of the snapshot.
        """
        return instrument in self._positions or bool(self._index_users.get(self._underlying(instrument)))

    def apply_tick(self, tick: Tick) -> bool:
        """Take a new price; False (ignored) if it is older than the one held."""
        name = tick.instrument
        held = self._ticks.get(name)
        if held is not None and tick.exchange_ts < held.exchange_ts:
            return False
        self._ticks[name] = tick
        self._note_input(tick.ingest_ts)
        p = self._positions.get(name)
        if p is not None:
            before = p.contributions()
            self._funding_input(p, tick.exchange_ts, tick.funding_mark)
            self._value(p)
            self._move_sums(before, p.contributions())
            if held is None:
                self._shape = None  # its first price
            elif p.position != 0.0 and tick.mark_time != held.mark_time:  # a book change ages nothing
                self._note_price_age(tick.mark_time, name)
        self._note_index(name, tick)
        return True

    def apply_fill(self, fill: Fill) -> FillOutcome:
        """Count one trade of the account, at most once (see De-duplication and Trade types)."""
        if fill.trade_id in self._seen:
            return FillOutcome.DUPLICATE
        if self._horizon is not None and fill.exchange_ts <= self._horizon:
            return FillOutcome.BEFORE_HORIZON
        self._remember(fill.trade_id, fill.exchange_ts)
        self._note_input(fill.ingest_ts)
        self._shape = None
        p = self._position_for(fill.instrument)
        before = p.contributions()
        fee, estimated = self._fee_of(fill)
        p.fees_paid += fee
        p.fees_estimated += estimated
        if fill.exchange_ts <= self._adopted_through.get(fill.instrument, -math.inf):
            # A fill that arrives after drift was adopted, from before the adopted report: the
            # exchange's position already includes it. Count its fee and correct what the adoption
            # realised at the exchange's mark; never its amount a second time.
            self._funding_input(p, fill.exchange_ts, fill.funding_mark)
            self._correct_adoption(p, fill)
        elif fill.trade_type is TradeType.DAILY_MARK:
            self._funding_input(p, fill.exchange_ts, None)
        else:
            funding_mark = self._funding_mark_of(p, fill)
            self._trade(p, fill.signed_amount, fill.price, funding_mark, fill.exchange_ts)
        self._value(p)
        self._move_sums(before, p.contributions())
        return FillOutcome.APPLIED

    def seed_from_exchange(self, report: Positions, baseline: Baseline, now: float) -> None:
        """Start the first epoch from the exchange's positions (start-up without a checkpoint).

        Replaces the book. `entry`: valued from `average_price` and the
        exchange's funding entry value (Thalex omits it when 0). `mark_at_start`:
        valued from `mark_price`, funding re-based so it starts at 0
        (`E = unrealised_perpetual_funding + perpetual_funding_entry_value`).
        The funding mark is the exchange's, `(unrealised + E) / position`, until a
        tick or fill brings a newer one; the funding period starts with it.
        `opened_ts` is `now` (the exchange does not say when a position was
        opened). Fills at or before the report's `exchange_ts` are already in
        it, so they become the de-duplication horizon.

        A line without `mark_price` (api.yaml requires none): `mark_at_start` starts it from the
        latest tick held, else from `average_price` as `entry` would (the only price the exchange
        gave; its P&L then counts from the exchange's entry, not from zero). It has no price until
        its first tick: stale, like any position that never ticked.
        """
        self._positions = {}
        self._full_due = True
        self._shape = None
        self._index_users.clear()
        self._drift_since.clear()
        self._drift.clear()
        self._epoch_started_ts = now
        for ex in report.positions:
            if ex.position == 0.0:
                continue
            if ex.instrument not in self._ticks and ex.mark_price is not None:
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
            if ex.unrealised_perpetual_funding is not None:
                p.funding_mark = (ex.unrealised_perpetual_funding + entry_value) / ex.position
            tick = self._ticks.get(ex.instrument)
            if tick is not None and tick.funding_mark is not None:
                p.funding_mark = tick.funding_mark
            start_mark = ex.mark_price if ex.mark_price is not None else (
                tick.mark if tick is not None else None)
            if baseline == "entry" or start_mark is None:
                p.avg_entry = ex.average_price
                p.funding_entry_value = entry_value
            else:
                p.avg_entry = start_mark
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
            self._adopt(name, ex, now, report.exchange_ts)
            self._adopted_through[name] = report.exchange_ts
        return list(self._drift.values())

    def dust(self) -> tuple[str, ...]:
        """Open positions no order can close (see Dust), sorted."""
        return self._shape_now().dust

    def dust_words(self, name: str) -> str:
        """One dust position for the trader: its size against what an order needs."""
        return dust_words(name, self.position(name), self._instruments.get(name))

    def is_flat(self, ignoring: Collection[str] = ()) -> bool:
        """Every position within half a volume tick of zero: a full closure's fills are all in.

        `ignoring`: positions not to look at (the dust: whether a closure's wait ended on dust alone).
        """
        return all(self._agrees(name, p.position, 0.0) or abs(p.position) < 1e-12
                   for name, p in self._positions.items() if name not in ignoring)

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
        self._lots.clear()
        self._index_users.clear()
        kept: dict[str, _Position] = {}
        for name, p in self._positions.items():
            if p.position == 0.0:
                continue
            tick = self._ticks.get(name)
            if tick is not None:
                p.avg_entry = tick.mark
            if p.funding_mark is not None:
                p.funding_entry_value = p.funding_mark * p.position
            p.realized_pnl = 0.0
            p.fees_paid = 0.0
            p.fees_estimated = 0.0
            p.funding_realized = 0.0
            self._value(p)
            kept[name] = p
        self._positions = kept
        self._full_due = True
        self._shape = None
        self._recount()
        return True

    # ------------------------------------------------------------------- state

    def to_state(self, *, with_ticks: bool = True) -> dict[str, Any]:
        """Everything the ledger knows, as plain JSON-able data (floats round-trip exactly).

        `with_ticks=False` leaves out the latest tick per instrument: the service
        stores those incrementally (`tick_state`) because they change on every tick
        while the accounting changes only on fills (and settlements).
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
            "adopted_lots": {n: [lot.to_state() for lot in lots] for n, lots in self._lots.items() if lots},
            "drift": [d.model_dump(mode="json") for d in self._drift.values()],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], config: LedgerConfig) -> Ledger:
        """Rebuild a ledger from `to_state()`; valuations are recomputed, so snapshots are identical.

        The latest ticks may be newer than the accounting (the service stores them apart): each
        is folded into its position's funding mark exactly as `apply_tick` did.
        """
        if state.get("version") not in (1, STATE_VERSION):
            raise ValueError(f"ledger state version {state.get('version')!r} is not {STATE_VERSION}")
        ledger = cls(config)
        ledger._epoch = state["epoch"]
        ledger._epoch_started_ts = state["epoch_started_ts"]
        ledger._last_input_ts = state["last_input_ts"]
        for name, data in state["instruments"].items():
            ledger._instruments[name] = info = InstrumentInfo.model_validate(data)
            ledger._rates[name] = rates_for(config.fees, name, info.type)
        ledger._ticks = {n: Tick.model_validate(t) for n, t in state["ticks"].items()}
        for name, tick in ledger._ticks.items():
            ledger._note_index(name, tick)
        ledger._horizon = state["horizon"]
        for trade_id, ts in state["seen"]:
            ledger._remember(trade_id, ts)
        ledger._drift_since = dict(state["drift_since"])
        ledger._adopted_through = dict(state.get("adopted_through", {}))
        lots = state.get("adopted_lots", {})
        ledger._lots = {n: [AdoptedLot(*lot) for lot in held] for n, held in lots.items()}
        for d in state["drift"]:
            drift = Drift.model_validate(d)
            ledger._drift[drift.instrument] = drift
        for name, data in state["positions"].items():
            p = ledger._positions[name] = _Position.from_accounting_state(name, data)
            latest = ledger._ticks.get(name)
            if latest is not None:
                ledger._funding_input(p, latest.exchange_ts, latest.funding_mark)
            ledger._value(p)
        ledger._recount()
        return ledger

    # ------------------------------------------------------------- accounting

    def _position_for(self, name: str) -> _Position:
        """The instrument's position, opened flat (with its latest tick's funding) when new."""
        p = self._positions.get(name)
        if p is None:
            p = self._positions[name] = _Position(name)
            tick = self._ticks.get(name)
            if tick is not None:
                self._funding_input(p, tick.exchange_ts, tick.funding_mark)
        return p

    def _trade(
        self, p: _Position, signed_amount: float, price: float, funding_mark: float, ts: float
    ) -> None:
        """Average-cost update of one position by one trade (see the module docstring)."""
        q = p.position
        if q == 0.0 or (q > 0) == (signed_amount > 0):
            size = abs(q) + abs(signed_amount)
            p.avg_entry = (p.avg_entry * abs(q) + price * abs(signed_amount)) / size
            p.funding_entry_value += funding_mark * signed_amount
            if q == 0.0 or self._grows_out_of_dust(p.instrument, q, q + signed_amount):
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

    def _grows_out_of_dust(self, name: str, before: float, after: float) -> bool:
        """Dust that became a position an order can close: its age restarts (see Dust)."""
        info = self._instruments.get(name)
        return is_dust(before, info) and closable(after, info)

    @staticmethod
    def _close(p: _Position, size: float, price: float, funding_mark: float) -> None:
        """Realise `size` (<= |position|) of the position at `price`, and its funding."""
        direction = _sign(p.position)
        p.realized_pnl += (price - p.avg_entry) * size * direction
        released = p.funding_entry_value * (size / abs(p.position))
        p.funding_realized += funding_mark * size * direction - released
        p.funding_entry_value -= released

    def _funding_input(self, p: _Position, ts: float, funding_mark: float | None) -> None:
        """An input of the position's instrument stamped `ts`: settle a period that ended, take its mark."""
        period = funding_period(ts)
        if p.funding_period is None:
            p.funding_period = period
        elif period > p.funding_period:
            if p.funding_mark is not None:
                self._settle(p, period)
            p.funding_period = period
        newer = p.funding_ts is None or ts >= p.funding_ts
        if funding_mark is not None and period == p.funding_period and newer:
            p.funding_mark = funding_mark
            p.funding_ts = ts

    def _settle(self, p: _Position, period: int) -> None:
        """Thalex's daily settlement of the funding of the period(s) before `period`."""
        assert p.funding_mark is not None and p.funding_period is not None
        mark = p.funding_mark
        realized = mark * p.position - p.funding_entry_value
        p.funding_realized += realized
        p.funding_entry_value = 0.0
        p.settled_mark = mark
        p.funding_mark = 0.0
        p.funding_ts = settlement_ts(period)
        if p.position == 0.0 and realized == 0.0:
            return  # a flat instrument: nothing was settled (its next input restores the same state)
        self._settlements.append(FundingSettlement(
            instrument=p.instrument, settled_ts=settlement_ts(p.funding_period + 1), funding_mark=mark,
            position=p.position, realized=realized, periods=period - p.funding_period))

    def _funding_mark_of(self, p: _Position, fill: Fill) -> float:
        """The funding mark a fill is booked at, in the position's current funding period."""
        self._funding_input(p, fill.exchange_ts, fill.funding_mark)
        if fill.funding_mark is None:
            return p.funding_mark if p.funding_mark is not None else 0.0
        if p.funding_period is not None and funding_period(fill.exchange_ts) < p.funding_period:
            return fill.funding_mark - (p.settled_mark or 0.0)  # a late fill of the settled period
        return fill.funding_mark

    def _fee_of(self, fill: Fill) -> tuple[float, float]:
        """`(fee, the part of it estimated)`: the exchange's figures, the schedule only where it gave none."""
        fees = self._config.fees
        trade_notional = fill.amount * fill.price
        fee, estimated = fill.fee, 0.0
        if fee is None:
            if fill.trade_type is TradeType.EXPIRATION:
                fee = fees.settlement_fee_rate * trade_notional
            elif fill.trade_type is TradeType.DAILY_MARK:
                fee = 0.0
            else:
                fee = self._estimated_trade_fee(fill)
            estimated = fee
        if fill.trade_type is TradeType.LIQUIDATION:
            if fill.liquidation_fee is not None:
                fee += fill.liquidation_fee
            else:
                extra = fees.liquidation_fee_rate * trade_notional
                fee += extra
                estimated += extra
        return fee, estimated

    def _estimated_trade_fee(self, fill: Fill) -> float:
        """A trading fee the exchange did not report: its `fee_rate`, else the schedule (see Fees paid)."""
        rates = self._rates_for(fill.instrument)
        info = self._instruments.get(fill.instrument)
        kind = info.type if info is not None else None
        index = fill.index if fill.index is not None else self._index_of(fill.instrument)
        base = trade_fee_base(fill.amount, fill.price, kind, index)
        cap = premium_cap_of(kind, rates.premium_cap, fill.amount, fill.price)
        if fill.fee_rate is not None:
            return estimated_fee(base, fill.fee_rate, -math.inf, cap)
        rate = rate_for_liquidity(fill.liquidity, rates.maker_fee_rate, rates.taker_fee_rate)
        return estimated_fee(base, rate, self._minimum_fee, cap)

    def _adopt(self, name: str, ex: ExchangePosition | None, now: float, report_ts: float) -> None:
        """Take the exchange's position, average price and funding entry value.

        The report is an input of its time: a funding period that ended before it is settled
        first, so the exchange's funding entry value (of its new period) is never mixed with
        the ledger's of the old one.
        """
        p = self._position_for(name)
        self._shape = None
        before = p.contributions()
        self._funding_input(p, report_ts, None)
        q = p.position
        target = ex.position if ex is not None else 0.0
        same_side = q != 0.0 and target != 0.0 and (q > 0) == (target > 0)
        if q != 0.0:
            closed = abs(q) - abs(target) if same_side else abs(q)
            if closed > 0.0:
                mark = ex.mark_price if ex is not None and ex.mark_price is not None else p.mark
                funding_mark = p.funding_mark if p.funding_mark is not None else 0.0
                lots = self._lots.setdefault(name, [])
                lots.append(AdoptedLot(closed, _sign(q), mark, funding_mark, report_ts))
                del lots[:-MAX_ADOPTED_LOTS]
                self._close(p, closed, mark, funding_mark)
        p.position = target
        if target == 0.0:
            p.avg_entry = 0.0
            p.funding_entry_value = 0.0
            p.opened_ts = None
        else:
            assert ex is not None
            p.avg_entry = ex.average_price
            p.funding_entry_value = ex.perpetual_funding_entry_value or 0.0
            if not same_side or self._grows_out_of_dust(name, q, target):
                p.opened_ts = now
        self._value(p)
        self._move_sums(before, p.contributions())

    def _correct_adoption(self, p: _Position, fill: Fill) -> None:
        """A late trade closes what an adoption realised at the exchange's mark: book its real P&L."""
        lots = self._lots.get(p.instrument)
        rest = fill.amount
        for lot in lots or ():
            if rest <= 0.0:
                break
            belongs = fill.exchange_ts <= lot.through_ts and _sign(fill.signed_amount) != lot.side
            if not belongs or lot.amount <= 0.0:
                continue
            size = min(rest, lot.amount)
            p.realized_pnl += (fill.price - lot.mark) * size * lot.side
            if fill.funding_mark is not None:
                p.funding_realized += (fill.funding_mark - lot.funding_mark) * size * lot.side
            lot.amount -= size
            rest -= size
        if lots:
            lots[:] = [lot for lot in lots if lot.amount > FLAT_TOLERANCE * max(1.0, fill.amount)]

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
        self._changed[name] = None
        q = p.position
        tick = self._ticks.get(name)
        if tick is None:
            mark = p.avg_entry
            p.exit = ExitQuote(mark, ExitPriceSource.MARK)
        else:
            mark = tick.mark
            p.exit = exit_quote(q, mark, tick.best_bid, tick.best_ask, tick.bids, tick.asks)
        p.mark = mark
        p.unrealized_pnl = (mark - p.avg_entry) * q
        fm = p.funding_mark
        p.funding_unrealized = fm * q - p.funding_entry_value if fm is not None else 0.0
        p.est_slippage = (mark - p.exit.price) * q
        info = self._instruments.get(name)
        kind = info.type if info is not None else None
        index = tick.index if tick is not None else None
        if kind is InstrumentType.OPTION:
            assert info is not None
            users = self._index_users.setdefault(info.underlying, set())
            if index is None and q != 0.0:
                users.add(name)
                index = self._index_of(name)
            else:
                users.discard(name)
        if q == 0.0:
            p.est_close_fee = 0.0
            return
        rates = self._rates_for(name)
        base = close_fee_base(abs(q), p.exit.price, mark, kind, index)
        cap = premium_cap_of(kind, rates.premium_cap, abs(q), p.exit.price)
        p.est_close_fee = estimated_fee(base, rates.taker_fee_rate, self._minimum_fee, cap)

    def _revalue(self, p: _Position) -> None:
        before = p.contributions()
        self._value(p)
        self._move_sums(before, p.contributions())

    def _underlying(self, name: str) -> str:
        """What a tick of `name` is an index of: its instrument's underlying, else the name itself."""
        info = self._instruments.get(name)
        return info.underlying if info is not None else name

    def _index_of(self, name: str) -> float | None:
        """The newest index of the instrument's underlying the guardian has, from any tick."""
        best = self._index.get(self._underlying(name))
        return best[0] if best is not None else None

    def _note_index(self, name: str, tick: Tick) -> None:
        """Keep the newest index per underlying over the latest ticks (see Prices and staleness)."""
        underlying = self._underlying(name)
        self._on_underlying.setdefault(underlying, set()).add(name)
        best = self._index.get(underlying)
        if tick.index is not None:  # a ticker's index is as old as its mark, not as its re-issuing book
            if best is None or (tick.mark_time, name) >= (best[1], best[2]):
                self._set_index(underlying, (tick.index, tick.mark_time, name))
        elif best is not None and best[2] == name:
            self._rescan_index(underlying)

    def _rescan_index(self, underlying: str) -> None:
        candidates = [(t.mark_time, n, t.index) for n in self._on_underlying.get(underlying, ())
                      if (t := self._ticks.get(n)) is not None and t.index is not None]
        if candidates:
            ts, name, index = max(candidates)
            assert index is not None
            self._set_index(underlying, (index, ts, name))
        elif self._index.pop(underlying, None) is not None:
            self._revalue_index_users(underlying)

    def _set_index(self, underlying: str, best: tuple[float, float, str]) -> None:
        old = self._index.get(underlying)
        self._index[underlying] = best
        if old is None or old[0] != best[0]:
            self._revalue_index_users(underlying)

    def _revalue_index_users(self, underlying: str) -> None:
        for name in list(self._index_users.get(underlying, ())):
            p = self._positions.get(name)
            if p is not None:
                self._revalue(p)

    def _rates_for(self, name: str) -> FeeRates:
        rates = self._rates.get(name)
        if rates is None:
            rates = self._rates[name] = rates_for(self._config.fees, name, None)
        return rates

    def _note_price_age(self, ts: float, name: str) -> None:
        """Remember an open position's newest mark time; compact the heap when it outgrows the book."""
        heap = self._price_ages
        heapq.heappush(heap, (ts, name))
        if len(heap) > 4 * len(self._positions) + 64:
            self._shape = None  # rebuilt from the current prices on the next read

    def _move_sums(self, before: tuple[float, ...], after: tuple[float, ...]) -> None:
        for running, old, new in zip(self._sums, before, after, strict=True):
            if old != new:
                running.add(new)
                running.add(-old)

    def _recount(self) -> None:
        """Rebuild the running sums from the positions (after bulk changes)."""
        self._sums = tuple(_RunningSum() for _ in range(SUMS))
        for p in self._positions.values():
            self._move_sums((0.0,) * SUMS, p.contributions())

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
