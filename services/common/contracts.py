"""The wire contract (v1): one pydantic model per document on the streams.

Every producer builds these models and every consumer validates against them, so a
wrong sign, a NaN price or a misspelt field is stopped at the edge of a service
(and dead-lettered) instead of reaching the money math. `docs/streams.md` is the
human-readable copy of this module; change both together, and bump `v` when a
field changes meaning.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import Annotated, Any, Final, NamedTuple, TypeAlias

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

CONTRACT_VERSION: Final = 1


def _known_version(value: int) -> int:
    if value != CONTRACT_VERSION:
        raise ValueError(f"unsupported contract version {value} (this reader knows v{CONTRACT_VERSION})")
    return value


Version = Annotated[int, Field(strict=True, json_schema_extra={"const": CONTRACT_VERSION}),
                    AfterValidator(_known_version)]
"""`v`: exactly the integer 1 — `true` or `1.0` is not a version (Python's `True == 1` would let it pass)."""

Price = Annotated[float, Field(ge=0.0)]
"""A price or a mark; zero is legal (an expiring worthless option)."""
PositiveAmount = Annotated[float, Field(gt=0.0)]
"""A traded or resting amount: always strictly positive, the side gives the sign."""
Timestamp = Annotated[float, Field(ge=0.0)]
"""Unix seconds (float)."""
NonEmptyStr = Annotated[str, Field(min_length=1)]
BookLevel = tuple[Price, PositiveAmount]
"""One price level of a book side: `[price, amount]`."""


class Document(BaseModel):
    """Base of every wire document: strict, finite, versioned.

    Readers of the wire validate with `strict=True` (`services.common.bus.validate_entry`,
    `read_document`): no bool or string becomes a number there (`"amount": true`,
    `"fee": "0.05"` are refused). Python code building documents keeps pydantic's usual
    conversions (a `"buy"` becomes `Side.BUY`).
    """

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        str_strip_whitespace=True,
    )

    v: Version = CONTRACT_VERSION


class Side(StrEnum):
    BUY = "buy"
    SELL = "sell"


class Liquidity(StrEnum):
    MAKER = "maker"
    TAKER = "taker"


class TradeType(StrEnum):
    """Thalex `Trade.trade_type` (api.yaml)."""

    NORMAL = "normal"
    BLOCK = "block"
    COMBO = "combo"
    AMEND = "amend"
    DELETE = "delete"
    INTERNAL_TRANSFER = "internal_transfer"
    EXPIRATION = "expiration"
    DAILY_MARK = "daily_mark"
    RFQ = "rfq"
    LIQUIDATION = "liquidation"


class InstrumentType(StrEnum):
    """Thalex `Instrument.type` (api.yaml)."""

    PERPETUAL = "perpetual"
    FUTURE = "future"
    OPTION = "option"
    COMBINATION = "combination"


class Fill(Document):
    """`tp:fills`: one account trade, exactly one entry per Thalex `trade_id`.

    Only what booking needs is required (api.yaml requires no field of `Trade`): the trade id
    (de-duplication), instrument, side, price and amount.
    """

    trade_id: NonEmptyStr
    order_id: NonEmptyStr | None = None
    """Absent on trades no order of the account made (an expiration, a settlement)."""
    client_order_id: int | None = None
    instrument: NonEmptyStr
    side: Side
    price: Price
    amount: PositiveAmount
    fee: float | None = None
    """USD actually charged by the exchange; a rebate is negative. Absent: the exchange reported
    none, and the portfolio books an estimate it flags (`fees_estimated`)."""
    liquidation_fee: float | None = None
    """Thalex `liquidation_fee`: charged on a liquidation trade on top of `fee`."""
    index: Price | None = None
    """The underlying's index at the time of the trade (an option's fee is on its notional)."""
    fee_rate: float | None = None
    liquidity: Liquidity | None = None
    position_after: float | None = None
    funding_mark: float | None = None
    label: str | None = None
    trade_type: TradeType = TradeType.NORMAL
    exchange_ts: Timestamp
    ingest_ts: Timestamp

    @property
    def signed_amount(self) -> float:
        """The change of position this fill causes: + for buys, - for sells."""
        return self.amount if self.side is Side.BUY else -self.amount


class Tick(Document):
    """`tp:ticks`: the latest prices of one instrument.

    `bids`/`asks` carry the top levels (best first) for instruments with a
    position, so the portfolio can price the real cost of closing into the book.
    """

    instrument: NonEmptyStr
    mark: Price
    best_bid: Price | None = None
    best_ask: Price | None = None
    bids: list[BookLevel] | None = None
    asks: list[BookLevel] | None = None
    index: Price | None = None
    funding_mark: float | None = None
    mark_ts: Timestamp | None = None
    """When the exchange marked `mark` (its ticker's time), present only when it is older than
    `exchange_ts`: a book change re-issues the last ticker's mark with the book's time (a ticker that
    arrives after a newer book change is stamped the same way). Absent: the mark is as new as the
    tick. The portfolio's price guard lets only a newer mark confirm a held one, and a price's age
    (ingest's `prices` check, the snapshot's `stale_instruments`) is this mark's, not the book's."""
    exchange_ts: Timestamp
    ingest_ts: Timestamp

    @model_validator(mode="after")
    def _in_order(self) -> Tick:
        if self.bids and any(a[0] < b[0] for a, b in zip(self.bids, self.bids[1:], strict=False)):
            raise ValueError("bids must be sorted best (highest) first")
        if self.asks and any(a[0] > b[0] for a, b in zip(self.asks, self.asks[1:], strict=False)):
            raise ValueError("asks must be sorted best (lowest) first")
        if self.mark_ts is not None and self.mark_ts > self.exchange_ts:
            raise ValueError("mark_ts must not be later than exchange_ts (no mark is newer than its tick)")
        return self

    @property
    def mark_time(self) -> float:
        """When the exchange marked `mark`: `mark_ts`, or `exchange_ts` when the mark is as new as the tick
        (every tick of an ingest older than `mark_ts`)."""
        return self.exchange_ts if self.mark_ts is None else self.mark_ts


class ExchangePosition(BaseModel):
    """One entry of the exchange's own portfolio view (Thalex `PortfolioEntry`)."""

    model_config = Document.model_config

    instrument: NonEmptyStr
    position: float
    mark_price: Price | None = None
    """Absent: the exchange's line carried no mark (api.yaml requires none). The portfolio then
    prices the position from ticks only (see `Ledger.seed_from_exchange` and `reconcile`)."""
    average_price: Price
    realised_pnl: float | None = None
    """Absent: the exchange's line carried none (not read by the guardian: P&L counts from its epoch)."""
    unrealised_pnl: float | None = None
    """Absent: the exchange's line carried none (not read by the guardian)."""
    unrealised_perpetual_funding: float | None = None
    perpetual_funding_entry_value: float | None = None


class Positions(Document):
    """`tp:positions`: the exchange's portfolio, published for reconciliation."""

    positions: list[ExchangePosition]
    exchange_ts: Timestamp
    ingest_ts: Timestamp


class InstrumentInfo(Document):
    """A value of the `tp:instruments` hash (field = instrument name)."""

    type: InstrumentType
    product: NonEmptyStr
    underlying: NonEmptyStr
    tick_size: PositiveAmount
    volume_tick_size: PositiveAmount
    min_order_amount: PositiveAmount
    expiry_ts: Timestamp | None = None

    @model_validator(mode="after")
    def _min_amount_covers_tick(self) -> InstrumentInfo:
        if self.min_order_amount < self.volume_tick_size:
            raise ValueError("min_order_amount must be >= volume_tick_size")
        return self


class ExitPriceSource(StrEnum):
    """Where a position's exit price came from, best evidence first."""

    BOOK = "book"
    """Walked the book levels the tick carried for the position's size."""
    TOP_OF_BOOK = "top_of_book"
    """No depth known: best bid (longs) / best ask (shorts)."""
    MARK = "mark"
    """The side a close would hit was empty: valued at mark, flagged."""


class SnapshotPosition(BaseModel):
    """One instrument in a portfolio snapshot."""

    model_config = Document.model_config

    instrument: NonEmptyStr
    position: float
    avg_entry: Price
    mark: Price
    exit_price: Price
    exit_price_source: ExitPriceSource = ExitPriceSource.MARK
    exit_within_depth: bool | None = None
    """The book levels the tick carried held the whole position at `exit_price` (source `book`, not
    beyond the carried depth). The executor sends a hedged book's first wave from the command only
    when every leg was (docs/executor.md). Absent: not known (a portfolio older than this field)."""
    realized_pnl: float
    unrealized_pnl: float
    funding_pnl: float
    fees_paid: float
    est_close_fee: float
    est_slippage: float = 0.0
    fees_estimated: float | None = None
    """The part of `fees_paid` the ledger estimated (trades that reported no fee); absent: none."""
    opened_ts: Timestamp | None = None
    underlying: str | None = None
    instrument_type: InstrumentType | None = None
    expiry_ts: Timestamp | None = None
    volume_tick_size: Annotated[float, Field(gt=0.0)] | None = None
    """The instrument's volume tick (snapshot v2): take-profit rounds a partial close with it
    without reading `tp:instruments` per decision. Absent while the instrument is unknown."""


class Expiry(BaseModel):
    """The open dated position that expires first (snapshot v2's `next_expiry`)."""

    model_config = Document.model_config

    instrument: NonEmptyStr
    expiry_ts: Timestamp


class Drift(BaseModel):
    """A position on which the ledger and the exchange disagree past the grace period."""

    model_config = Document.model_config

    instrument: NonEmptyStr
    ledger_position: float
    exchange_position: float
    since: Timestamp


SNAPSHOT_VERSION: Final = 2
"""`tp:snapshots` is v2 since issue 22: a snapshot may carry only the positions that changed."""


def _one_of_two(document: str, newest: int) -> Callable[[int], int]:
    """The check of `v` for a document with a newer version than the contract's: 1 or `newest`."""
    def known(value: int) -> int:
        if value not in (CONTRACT_VERSION, newest):
            raise ValueError(f"unsupported {document} version {value} (this reader knows 1 and {newest})")
        return value
    return known


SnapshotVersion = Annotated[int, Field(strict=True, json_schema_extra={"enum": [1, SNAPSHOT_VERSION]}),
                            AfterValidator(_one_of_two("snapshot", SNAPSHOT_VERSION))]


def _open_rows(positions: list[SnapshotPosition]) -> list[SnapshotPosition]:
    return [p for p in positions if p.position != 0.0]


class Snapshot(Document):
    """`tp:snapshots`: the fee-aware P&L of the whole account in the current epoch.

    v2 (docs/streams.md): the totals and the derived figures describe the whole account in every
    snapshot; `positions` lists every position only when `full`, otherwise only those whose row
    changed since snapshot `seq - 1` (`services.common.snapshots.SnapshotView` folds them). A v1
    document is a full snapshot; its derived figures are computed from its positions.
    """

    v: SnapshotVersion = SNAPSHOT_VERSION
    seq: Annotated[int, Field(ge=0)]
    epoch: Annotated[int, Field(ge=0)]
    ts: Timestamp
    full: bool = True
    """True: `positions` is every position of the epoch. False: only the rows changed since `seq - 1`."""
    positions: list[SnapshotPosition]
    open_positions: Annotated[int, Field(ge=0)] = 0
    """Positions of the epoch that are not flat (all of them, whatever `positions` carries)."""
    next_expiry: Expiry | None = None
    """The open dated position (future, option) that expires first, dust left out (see `dust`)."""
    realized_pnl: float
    unrealized_pnl: float
    funding_pnl: float
    fees_paid: float
    est_close_fees: float
    est_slippage: float
    gross_pnl: float
    net_pnl: float
    net_after_close: float
    fees_estimated: float | None = None
    """The part of `fees_paid` that is estimated, not the exchange's figure; absent: none."""
    oldest_position_ts: Timestamp | None = None
    """When the oldest open position an order can close was opened (dust, below, is left out: the time
    limit must not fire on what no order can close)."""
    stale_instruments: list[str] = Field(default_factory=list)
    suspect_instruments: list[str] | None = None
    """Open positions whose latest tick was implausible and is held until confirmed (issue 21); their
    figures are the last plausible prices. Absent when there is none."""
    drift: list[Drift] = Field(default_factory=list)
    last_input_ts: Timestamp | None = None
    """`ingest_ts` of the newest input folded into this snapshot (for latency)."""
    dust: list[str] | None = None
    """Open positions no order can close (`services.common.dust`): below the instrument's
    `min_order_amount` once rounded down to its volume tick — a closure's remainder, an RFQ fill off
    the tick. Counted in `open_positions` and valued in every figure, but left out of
    `oldest_position_ts` and `next_expiry`; take-profit decides no closure on them alone. Sorted;
    absent when there is none (and from a portfolio older than this field)."""

    @model_validator(mode="after")
    def _derive_for_full(self) -> Snapshot:
        """A v1 snapshot is full; a full one without the derived figures gets them from its positions."""
        if self.v == CONTRACT_VERSION and not self.full:
            raise ValueError("a v1 snapshot is always full")
        if self.v == CONTRACT_VERSION and self.suspect_instruments:  # v1 also listed flat ones
            held = {p.instrument for p in _open_rows(self.positions)}
            object.__setattr__(self, "suspect_instruments",
                               [n for n in self.suspect_instruments if n in held] or None)
        if self.full and "open_positions" not in self.model_fields_set:
            object.__setattr__(self, "open_positions", len(_open_rows(self.positions)))
        if self.full and "next_expiry" not in self.model_fields_set:
            object.__setattr__(self, "next_expiry", next_expiry(self.positions, self.dust or ()))
        return self

    @property
    def closable_positions(self) -> int:
        """Open positions an order can close: `open_positions` less the dust."""
        return max(0, self.open_positions - len(self.dust or ()))


def next_expiry(positions: list[SnapshotPosition], dust: Iterable[str] = ()) -> Expiry | None:
    """The open dated position that expires first (perpetuals never expire; dust is left out)."""
    left_out = set(dust)
    dated = [(p.expiry_ts, p.instrument) for p in _open_rows(positions)
             if p.expiry_ts is not None and p.instrument_type is not InstrumentType.PERPETUAL
             and p.instrument not in left_out]
    if not dated:
        return None
    expiry_ts, instrument = min(dated)
    return Expiry(instrument=instrument, expiry_ts=expiry_ts)


class CloseReason(StrEnum):
    TAKE_PROFIT = "take_profit"
    PARTIAL_TAKE_PROFIT = "partial_take_profit"
    EMERGENCY_STOP = "emergency_stop"
    MAX_AGE = "max_age"
    TRAILING_STOP = "trailing_stop"
    MANUAL = "manual"
    CIRCUIT_BREAKER = "circuit_breaker"
    """A cancel-only command (no positions): the executor removes orders and quotes, closes nothing."""


CANCEL_ONLY_MARK = f"-{CloseReason.CIRCUIT_BREAKER.value}-"
"""In the id of every cancel-only command (take-profit's `e{epoch}-circuit_breaker-s{seq}-n{n}`)."""


def cancel_only(command_id: str) -> bool:
    """Whether a command (or a report on it, which carries only its id) closes nothing.

    Its `completed` releases take-profit's lease but starts no cool-down, ends no epoch and tells
    no closure (docs/streams.md): readers of `tp:reports` tell it by its id.
    """
    return CANCEL_ONLY_MARK in command_id


def _not_zero(amount: float) -> float:
    """On the field, not the model: pydantic runs a model's after-validators again on every
    instance handed to another model (take-profit hands 1,000 legs to `Decision`, then `Command`);
    a field's run only when the leg itself is validated."""
    if amount == 0:
        raise ValueError("amount must not be zero (nothing to close)")
    return amount


class PositionToClose(BaseModel):
    """A position a command closes: `amount` is signed like the position it closes."""

    model_config = Document.model_config

    instrument: NonEmptyStr
    amount: Annotated[float, AfterValidator(_not_zero)]
    exit_price: Price | None = None
    """Where the portfolio priced getting out at the decision (its book walked for the whole size).
    The executor prices a fresh full closure's first wave from it instead of reading the market
    again (docs/executor.md, "The first wave")."""
    mark: Price | None = None
    """The mark at the decision: how far `exit_price` is through the book (the executor's cap)."""
    exit_within_depth: bool | None = None
    """The snapshot row's: the book at the decision held the whole amount at `exit_price`."""

    def leg(self) -> LegToClose:
        return LegToClose(self.instrument, self.amount, self.exit_price, self.mark, self.exit_within_depth)


class LegToClose(NamedTuple):
    """One leg of `Legs`, read off its columns (a plain tuple: 1,000 of them cost no validation)."""

    instrument: str
    amount: float
    exit_price: float | None
    mark: float | None
    exit_within_depth: bool | None


class Legs(BaseModel):
    """A command's positions to close as columns: leg `i` is `instrument[i]`, `amount[i]`, ….

    Why columns (`tp:commands` v2, issue 22's eighth pass): the executor validated a 1,000-leg
    command's 1,000 row objects in 3.1-3.4 ms of CPU before acting on it; five typed lists validate
    in pydantic's Rust core in 0.5-0.6 ms, and the JSON is half the size (docs/performance.md,
    "Eighth pass"). A column of prices or depths is left out when no leg has one.
    """

    model_config = Document.model_config

    instrument: list[NonEmptyStr]
    amount: list[float]
    """Signed like the position each leg closes; never zero."""
    exit_price: list[Price | None] | None = None
    mark: list[Price | None] | None = None
    exit_within_depth: list[bool | None] | None = None

    @model_validator(mode="after")
    def _columns_agree(self) -> Legs:
        count = len(self.instrument)
        for name in ("amount", "exit_price", "mark", "exit_within_depth"):
            column = getattr(self, name)
            if column is not None and len(column) != count:
                raise ValueError(f"legs.{name} has {len(column)} entries for {count} instruments")
        if 0.0 in self.amount:  # one scan in C, then `index` names the first
            at = self.amount.index(0.0)
            raise ValueError(f"legs.amount[{at}] ({self.instrument[at]}) must not be zero (nothing to close)")
        if len(set(self.instrument)) != count:
            raise ValueError("legs.instrument lists an instrument twice")
        return self

    def __len__(self) -> int:
        return len(self.instrument)

    def rows(self) -> Iterator[LegToClose]:
        """Each leg in order."""
        count = len(self.instrument)
        none: list[None] = [None] * count
        return map(LegToClose._make, zip(self.instrument, self.amount, self.exit_price or none,
                                         self.mark or none, self.exit_within_depth or none, strict=True))

    @classmethod
    def of(cls, rows: Iterable[LegToClose] | Iterable[PositionToClose]) -> Legs:
        """The columns of `rows`, validated (a column every row leaves out is left out).

        Take-profit's legs are `LegToClose` tuples, turned into columns in C (`zip`), not read
        attribute by attribute off 1,000 models."""
        legs: list[Any] = list(rows)
        if not legs:
            return cls(instrument=[], amount=[])
        if isinstance(legs[0], PositionToClose):
            legs = [row.leg() for row in legs]
        instrument, amount, exit_price, mark, depth = map(list, zip(*legs, strict=True))

        def present(column: list[Any]) -> list[Any] | None:
            return None if column.count(None) == len(column) else column

        return cls(instrument=instrument, amount=amount, exit_price=present(exit_price), mark=present(mark),
                   exit_within_depth=present(depth))


class HedgeGroup(BaseModel):
    """Legs on one underlying that must be unwound together."""

    model_config = Document.model_config

    underlying: NonEmptyStr
    instruments: list[NonEmptyStr]


COMMAND_VERSION: Final = 2
"""`tp:commands` is v2 since issue 22's eighth pass: the legs travel as columns (`Legs`)."""


CommandVersion = Annotated[int, Field(strict=True, json_schema_extra={"enum": [1, COMMAND_VERSION]}),
                           AfterValidator(_one_of_two("command", COMMAND_VERSION))]


class Command(Document):
    """`tp:commands`: close `fraction` of the listed positions, at most once.

    v2 lists them in `legs` (columns); a v1 command (written before issue 22's eighth pass, still
    read so a closure in flight across the upgrade is carried out) lists them in `positions`, one
    object per leg. `closing()` gives either as `Legs`.
    """

    v: CommandVersion = COMMAND_VERSION
    command_id: NonEmptyStr
    epoch: Annotated[int, Field(ge=0)]
    reason: CloseReason
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    positions: list[PositionToClose] | None = None
    """v1 only: one object per leg (read, never written since v2)."""
    legs: Legs | None = None
    """v2: the positions to close, as columns."""
    groups: list[HedgeGroup] | None = None
    snapshot_seq: Annotated[int, Field(ge=0)]
    net_pnl: float
    """The figure that triggered the decision (e.g. `net_after_close`)."""
    threshold: float
    created_ts: Timestamp
    deadline_ts: Timestamp
    signature: Annotated[str, Field(pattern=r"^hmac-sha256(-v2)?:[0-9a-f]{64}$")] | None = None
    """`hmac-sha256-v2:<hex>` over the rest of the command, by take-profit (`services.common.signing`;
    the executor also verifies the older `hmac-sha256:` form).
    The executor acts only on a valid one: without it a command is anyone's who can write the stream."""

    @model_validator(mode="after")
    def _deadline_after_creation(self) -> Command:
        if self.deadline_ts <= self.created_ts:
            raise ValueError("deadline_ts must be after created_ts")
        return self

    @model_validator(mode="after")
    def _legs_where_the_version_says(self) -> Command:
        if self.v == CONTRACT_VERSION and (self.positions is None or self.legs is not None):
            raise ValueError("a v1 command lists its legs in `positions` (and has no `legs`)")
        if self.v == COMMAND_VERSION and (self.legs is None or self.positions is not None):
            raise ValueError(f"a v{COMMAND_VERSION} command lists its legs in `legs` "
                             "(and has no `positions`)")
        return self

    def closing(self) -> Legs:
        """The legs to close, whatever the version (a v1 command's objects turned into columns)."""
        if self.legs is not None:
            return self.legs
        return Legs.of(self.positions or [])

    def upgraded(self) -> Command:
        """The same command in the current form (a v1 command's legs turned into columns once, not
        at every `closing()`). Its signature is the one it came with: verify before upgrading."""
        if self.v == COMMAND_VERSION:
            return self
        return self.model_copy(update={"v": COMMAND_VERSION, "legs": self.closing(), "positions": None})


class ReportStatus(StrEnum):
    RECEIVED = "received"
    ORDERS_CANCELLED = "orders_cancelled"
    ORDER_SENT = "order_sent"
    FILLED = "filled"
    PARTIALLY_FILLED = "partially_filled"
    FAILED = "failed"
    COMPLETED = "completed"
    DUPLICATE = "duplicate"
    DRY_RUN = "dry_run"
    MASS_QUOTES_CANCELLED = "mass_quotes_cancelled"
    CONDITIONAL_ORDERS_CANCELLED = "conditional_orders_cancelled"
    BOTS_CANCELLED = "bots_cancelled"
    HALT_VIOLATION = "halt_violation"
    """Not a step of a command: ingest saw an order, bot or trade that is not the guardian's while
    `tp:halt` was set (`violation`); `command_id` is the halt's (`halt_command_id`)."""


class ExchangeError(BaseModel):
    """An error as Thalex reports it (`error: {code, message}`)."""

    model_config = Document.model_config

    code: int
    message: str


class RemovalKind(StrEnum):
    """What the executor removes from the account before (and while) closing, and the request doing it."""

    ORDERS = "orders"
    """`private/cancel_all`: the account's orders (not mass quotes)."""
    MASS_QUOTES = "mass_quotes"
    """`private/cancel_mass_quote`: the mass quotes of every session of the account."""
    CONDITIONAL_ORDERS = "conditional_orders"
    """`private/cancel_all_conditional_orders`: stop, stop-limit, bracket and trailing-stop orders."""
    BOTS = "bots"
    """`private/cancel_all_bots`: Thalex's server-side bots (grid, levels, SGSL, OCQ, hedgers)."""


class Removed(BaseModel):
    """What one removal request took off the account (`orders_cancelled`, `mass_quotes_cancelled`, ...)."""

    model_config = Document.model_config

    kind: RemovalKind
    round: Annotated[int, Field(ge=1)]
    """1 before the first closing order; 2, 3, ... repeated before each later wave."""
    count: Annotated[int, Field(ge=0)] | None = None
    """How many were removed; absent when the exchange's answer or listing could not tell."""
    ids: list[str] | None = None
    """The order, conditional order or bot ids removed, when the exchange listed them."""
    labels: list[str] | None = None
    """Their distinct labels (who they belonged to), when they carried one."""


GUARDIAN_LABEL = re.compile(r"^tp-[a-z2-7]{26}$")
"""The label of every order the executor sends (`tp-` + 26 lower-case base32 characters of the command id's
hash): an order or trade with it is the guardian's own, never a halt violation."""


def is_guardian_label(label: str | None) -> bool:
    return label is not None and GUARDIAN_LABEL.match(label) is not None


class ViolationKind(StrEnum):
    """What broke a halt, as the exchange's account channels show it."""

    ORDER = "order"
    """An order inserted or amended (`account.orders`; Thalex does not mark mass quotes apart there)."""
    BOT_ORDER = "bot_order"
    """An order a Thalex bot inserted (`bot_id` set)."""
    CONDITIONAL_TRIGGER = "conditional_trigger"
    """An order a conditional order released (`conditional_order_id` set)."""
    CONDITIONAL_ORDER = "conditional_order"
    """A conditional order created or active that was not seen before (`account.conditional_orders`)."""
    BOT = "bot"
    """A bot started or active that was not seen before (`account.bots`)."""
    TRADE = "trade"
    """A trade of the account that is not the guardian's (`account.trade_history`)."""


ORDER_KINDS = frozenset({ViolationKind.ORDER, ViolationKind.BOT_ORDER, ViolationKind.CONDITIONAL_TRIGGER})
"""The violations that are an order reaching the book (whoever placed it)."""


class HaltViolation(BaseModel):
    """Who broke a halt, as precisely as Thalex tells (`halt_violation` reports)."""

    model_config = Document.model_config

    kind: ViolationKind
    halt_reason: NonEmptyStr
    halt_since: Timestamp
    halt_command_id: str | None = None
    instrument: str | None = None
    side: Side | None = None
    amount: Annotated[float, Field(ge=0.0)] | None = None
    price: float | None = None
    order_id: str | None = None
    trade_id: str | None = None
    label: str | None = None
    client_order_id: int | None = None
    bot_id: str | None = None
    conditional_order_id: str | None = None
    strategy: str | None = None
    """A bot's strategy (`grid`, `levels`, ...)."""
    exchange_ts: Timestamp | None = None

    def describe(self) -> str:
        """One line naming what broke the halt and whose it was, as far as Thalex tells."""
        what = " ".join(str(x) for x in (self.kind.value, self.side and self.side.value, self.amount,
                                         self.instrument) if x)
        price = f" at {self.price:g}" if self.price is not None else ""
        who = ", ".join(f"{name} {value}" for name, value in (
            ("label", self.label), ("client_order_id", self.client_order_id), ("bot", self.bot_id),
            ("strategy", self.strategy), ("conditional order", self.conditional_order_id),
            ("order", self.order_id), ("trade", self.trade_id)) if value is not None)
        return f"{what}{price} ({who or 'no label: Thalex names no session or key'})"


class PlannedOrder(BaseModel):
    """An order the executor sent, or would send in a dry run."""

    model_config = Document.model_config

    instrument: NonEmptyStr
    side: Side
    amount: PositiveAmount
    price: Price
    label: Annotated[str, Field(max_length=32)]
    reduce_only: bool = True


class Report(Document):
    """`tp:reports`: one step of executing a command."""

    command_id: NonEmptyStr
    status: ReportStatus
    epoch: Annotated[int, Field(ge=0)] | None = None
    fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    instrument: str | None = None
    order_id: str | None = None
    label: Annotated[str, Field(max_length=32)] | None = None
    amount: PositiveAmount | None = None
    filled: Annotated[float, Field(ge=0.0)] | None = None
    avg_price: Price | None = None
    fee: float | None = None
    error: ExchangeError | None = None
    orders: list[PlannedOrder] | None = None
    removed: Removed | None = None
    """`orders_cancelled`, `mass_quotes_cancelled`, `conditional_orders_cancelled`, `bots_cancelled`:
    what the request removed (absent on an `orders_cancelled` of an older executor)."""
    violation: HaltViolation | None = None
    """`halt_violation`: who broke the halt."""
    ts: Timestamp


class ControlAction(StrEnum):
    HALT = "halt"
    RESUME = "resume"
    CLOSE_ALL = "close_all"


class Control(Document):
    """`tp:control`: an operator's instruction."""

    action: ControlAction
    by: NonEmptyStr
    ts: Timestamp


CONTROL_MAX_AGE_SECONDS = 60.0
"""Take-profit refuses (`expired`) a `close_all` or `resume` older than this (by its `ts`)."""


class ControlOutcome(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"


class ControlAnswer(Document):
    """`tp:control:answers`: take-profit's answer to one `tp:control` entry.

    Written in the transaction that acks the control, so every control take-profit
    handled has exactly one answer; the operator CLI waits for it (by `control_id`)
    instead of assuming success.
    """

    control_id: NonEmptyStr
    """The id of the `tp:control` entry answered."""
    action: ControlAction
    by: NonEmptyStr
    outcome: ControlOutcome
    reason: NonEmptyStr
    """Accepted: what was done (`halted`, `resumed`, `closing`); refused: why (`no_positions`, ...)."""
    detail: NonEmptyStr
    """One sentence for the trader."""
    command_id: str | None = None
    """An accepted `close_all`: the closure's command id (follow it with `thalex-tp history`)."""
    halt: str | None = None
    """The reason of the halt in force after the answer (`tp:halt`), absent when none."""
    ts: Timestamp


class Halt(Document):
    """The `tp:halt` hash: quoters stand down while it exists.

    `until` is absent for an operator halt (held until `resume`).
    """

    reason: NonEmptyStr
    command_id: str | None = None
    since: Timestamp
    until: Timestamp | None = None


class HaltAck(Document):
    """A value of the `tp:halt:acks` hash (field = quoter name)."""

    command_id: str | None = None
    ts: Timestamp


class NotificationKind(StrEnum):
    """What a notification is about. A new kind: add it here, in docs/streams.md, and a producer
    in services/notify/core.py (readers validating against an older list reject the new kind)."""

    DECISION = "decision"
    CLOSURE_COMPLETED = "closure_completed"
    CLOSURE_FAILED = "closure_failed"
    DRIFT_ADOPTED = "drift_adopted"
    NEAR_TAKE_PROFIT = "near_take_profit"
    NEAR_EMERGENCY_STOP = "near_emergency_stop"
    SERVICE_UNHEALTHY = "service_unhealthy"
    SERVICE_RECOVERED = "service_recovered"
    HALT_VIOLATED = "halt_violated"
    """Something that is not the guardian's traded the account during a halt (once per halt)."""


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Notification(Document):
    """`tp:notifications`: one thing the trader is told (also the body of a generic webhook)."""

    id: NonEmptyStr
    """Deterministic from what caused it (e.g. `decision:<command_id>`): sent at most once per target."""
    kind: NotificationKind
    severity: Severity
    title: NonEmptyStr
    text: str
    facts: dict[str, float | int | str | None] = Field(default_factory=dict)
    """The figures behind the text (USD, seconds, ids), for machines."""
    ts: Timestamp


class DeadLetter(Document):
    """`tp:deadletter`: an input that could not be used, kept with the reason."""

    service: NonEmptyStr
    source_stream: NonEmptyStr
    entry_id: str
    raw: str
    error: NonEmptyStr
    ts: Timestamp


StreamDocument: TypeAlias = (
    Fill | Tick | Positions | Snapshot | Command | Report | Control | ControlAnswer | Notification
    | DeadLetter
)


def halt_to_hash(halt: Halt) -> dict[str, str]:
    """`tp:halt` is a hash so quoters can read it with one HGETALL: one field per key."""
    return {key: str(value) for key, value in halt.model_dump(mode="json", exclude_none=True).items()}


def halt_from_hash(raw: dict[bytes, bytes] | dict[str, str]) -> Halt | None:
    """Read the `tp:halt` hash back; None when no halt is set."""
    if not raw:
        return None
    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
              for k, v in raw.items()}
    fields["v"] = int(fields.get("v", CONTRACT_VERSION))  # type: ignore[assignment]
    return Halt.model_validate(fields)
