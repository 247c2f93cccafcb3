"""The executor's shell: consumes `tp:commands`, closes positions on Thalex, reports on `tp:reports`.

The decisions (prices, amounts, hedge order, the command's state machine) live in `plan.py`;
this module does the I/O around them: the Redis lease and progress of each command, the
Thalex session, market data, sending and following orders, metrics. See docs/executor.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import thalex
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.bus import Bus, Delivery, encode_document, raise_if_cancelled
from services.common.config import Settings, require_key
from services.common.contracts import (
    Command,
    ExchangeError,
    InstrumentInfo,
    InstrumentType,
    PlannedOrder,
    Report,
    ReportStatus,
    Side,
)
from services.common.service import Health, Runnable, service_main
from services.common.streams import Names
from services.common.thalex.requests import ConnectionLost, ThalexError
from services.executor.plan import (
    INSUFFICIENT_LIQUIDITY,
    REDUCE_ONLY_REJECTED,
    ErrorAction,
    HedgeLeg,
    Leg,
    LegFill,
    LegState,
    Progress,
    Stage,
    action_for,
    book_depth,
    close_price,
    close_side,
    decision_order,
    group_legs,
    hedge_wave,
    lead_first,
    order_amount,
    reference_price,
    widened,
)
from services.executor.session import ThalexSession

log = logging.getLogger(__name__)

GROUP = "executor"
LEASE_SECONDS = 3.0
"""A dead executor's lease expires this fast; a live one renews it every third of it."""
PROGRESS_TTL_SECONDS = 30 * 24 * 3600
"""How long a command's progress is kept: a replay within this window is reported `duplicate`."""
CLAIM_MARGIN_SECONDS = 30.0
FEE_WAIT_SECONDS = 1.0
BACKOFF_START, BACKOFF_MAX = 0.05, 1.0
MAX_REMEMBERED_TRADES = 100_000
RETRY_PAUSE = 0.05
"""Pause before re-sending an unfilled remainder, so the book can refill."""
DECISION_PRICE_MAX_AGE_SECONDS = 1.0
"""A command older than this is closed from fresh market reads only (see `_decision_wave`)."""
REMEMBERED_COMMANDS = 10_000

COMMANDS = Counter("tp_executor_commands_total", "Commands by outcome", ["outcome"])
ORDERS_SENT = Counter("tp_executor_orders_sent_total", "Closing orders sent")
ORDERS_FILLED = Counter("tp_executor_orders_filled_total", "Closing orders that traded (fully or partly)")
ORDERS_REJECTED = Counter("tp_executor_orders_rejected_total", "Closing orders rejected, by Thalex code", ["code"])
RETRIES = Counter("tp_executor_retries_total", "Re-sent closing orders, by reason", ["reason"])
EXCHANGE_CONNECTED = Gauge("tp_executor_exchange_connected", "1 while the trading session is connected")
RECONNECTS = Counter("tp_executor_reconnects_total", "Trading sessions re-opened after the first")
TIME_TO_FIRST_ORDER = Histogram(
    "tp_executor_time_to_first_order_seconds", "From the command's created_ts to its first order",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TIME_TO_FLAT = Histogram(
    "tp_executor_time_to_flat_seconds", "From the command's created_ts to verified flat",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30, 60),
)

SAVE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
for i = 5, #ARGV do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', '__data__', ARGV[i])
end
return 1
"""
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
ACQUIRE_SCRIPT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local held = redis.call('GET', KEYS[2])
  if held then return {0, held} end
  return {0}
end
local current = redis.call('GET', KEYS[2])
if current then return {1, current} end
if ARGV[3] == '' then return {1} end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
for i = 6, #ARGV do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', '__data__', ARGV[i])
end
return {2}
"""
"""Take the lease and read the progress in one round trip; a command seen for the first time gets
its progress created and `received` published in the same call (only by the lease's holder)."""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Claim:
    """The lease on a command and its progress as read under it."""

    token: str
    progress: Progress | None
    created: bool
    """The progress was created (and `received` published) by this claim."""


class LeaseLost(RuntimeError):
    """Another executor owns the command now; this one must stop touching it."""


class Store:
    """A command's progress and lease in Redis.

    The lease (`SET NX PX`, value = a fencing token unique to this attempt) says who works a
    command; every progress write checks the token in the same Lua call that writes it and
    appends the reports, so an executor that lost its lease can neither overwrite the new
    owner's progress nor publish for it.
    """

    def __init__(self, redis: Redis, names: Names, maxlen: int, owner: str) -> None:
        self.redis = redis
        self.names = names
        self.maxlen = maxlen
        self.owner = owner
        self._save = redis.register_script(SAVE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)

    def _progress_key(self, command_id: str) -> str:
        return self.names.key(f"executor:progress:{command_id}")

    def _lease_key(self, command_id: str) -> str:
        return self.names.key(f"executor:lease:{command_id}")

    async def load(self, command_id: str) -> Progress | None:
        raw = await self.redis.get(self._progress_key(command_id))
        return None if raw is None else Progress.model_validate_json(raw)

    async def acquire(self, command_id: str) -> str | None:
        """Wait for the lease; None when the command is finished meanwhile (a duplicate)."""
        claimed = await self.claim(command_id)
        return None if claimed is None else claimed.token

    async def claim(self, command_id: str,
                    fresh: Callable[[], tuple[Progress, list[Report]]] | None = None) -> Claim | None:
        """Wait for the lease and read the progress, one Redis round trip per attempt.

        None when the command is finished (terminal progress: a duplicate), whether the lease
        was free or not. With `fresh`, a command without progress gets `fresh()`'s progress
        and reports written in the same Lua call as the lease (`created`), so the first
        `received` costs no extra round trip.
        """
        token = f"{self.owner}:{uuid.uuid4().hex}"
        keys = [self._lease_key(command_id), self._progress_key(command_id), self.names.reports]
        while True:
            args: list[Any] = [token, int(LEASE_SECONDS * 1000), "", PROGRESS_TTL_SECONDS, self.maxlen]
            created: Progress | None = None
            if fresh is not None:
                created, reports = fresh()
                args[2] = created.model_dump_json()
                args.extend(encode_document(r) for r in reports)
            reply = await self._acquire(keys=keys, args=args)
            status = int(reply[0])
            progress = Progress.model_validate_json(reply[1]) if len(reply) > 1 else None
            if status == 2:
                assert created is not None
                return Claim(token, created, created=True)
            if status == 1:
                if progress is not None and progress.terminal:
                    await self.release(command_id, token)
                    return None
                return Claim(token, progress, created=False)
            if progress is not None and progress.terminal:
                return None
            await asyncio.sleep(0.1)

    async def renew(self, command_id: str, token: str) -> bool:
        return bool(await self._renew(keys=[self._lease_key(command_id)],
                                      args=[token, int(LEASE_SECONDS * 1000)]))

    async def release(self, command_id: str, token: str) -> None:
        await self._release(keys=[self._lease_key(command_id)], args=[token])

    async def save(self, progress: Progress, token: str, reports: Iterable[Report] = ()) -> None:
        ok = await self._save(
            keys=[self._lease_key(progress.command_id), self._progress_key(progress.command_id),
                  self.names.reports],
            args=[token, progress.model_dump_json(), PROGRESS_TTL_SECONDS, self.maxlen,
                  *(encode_document(r) for r in reports)],
        )
        if not ok:
            raise LeaseLost(progress.command_id)


@dataclass
class Quote:
    """What the executor needs of the market for one instrument."""

    mark: float
    best_bid: float | None
    best_ask: float | None
    delta: float
    bids: list[list[float]] | None = None
    asks: list[list[float]] | None = None


@dataclass
class Order:
    """One closing order of a wave and its outcome."""

    leg: Leg
    side: Side
    amount: float
    price: float
    result: dict[str, Any] | None = None
    error: ExchangeError | None = None
    lost: bool = False


@dataclass
class Reads:
    """A wave's exchange reads, in flight: the portfolio and the legs' quotes."""

    positions: asyncio.Task[Any] | None = None
    quotes: asyncio.Task[dict[str, Quote]] | None = None

    def cancel(self) -> None:
        for task in (self.positions, self.quotes):
            if task is not None and not task.done():
                task.cancel()
            elif task is not None and not task.cancelled():
                task.exception()  # retrieved: never "exception was never retrieved"


@dataclass
class Work:
    """One command in the hands of this executor: its progress, lease token and reports to publish."""

    progress: Progress
    token: str
    created_ts: float
    reports: list[Report] = field(default_factory=list)
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, status: ReportStatus, **fields: Any) -> None:
        self.reports.append(self.progress.report(status, time.time(), **fields))

    def take_outbox(self) -> None:
        """Move the progress's unpublished reports ahead of this attempt's: the next save publishes them."""
        self.reports[:0], self.progress.outbox = self.progress.outbox, []


class Executor:
    """Closes the positions of each command at most once; see docs/executor.md."""

    def __init__(self, settings: Settings, bus: Bus, consumer_name: str) -> None:
        self.settings = settings
        self.config = settings.executor
        self.bus = bus
        self.names = settings.names
        self.store = Store(bus.redis, self.names, bus.maxlen, consumer_name)
        key_id = private_key = None
        if not self.config.dry_run:  # a trading key is loaded only when orders may be sent
            key_id, private_key = require_key("executor", self.config.key_id, self.config.private_key_file)
        self.session = ThalexSession(
            settings.thalex.url, key_id=key_id, private_key=private_key, account=settings.thalex.account,
            order_rate=self.config.order_rate_per_second,
            private_channels=("session.orders", "account.trade_history") if private_key else (),
        )
        self.session.on("account.trade_history", self._on_trades)
        self.trades: dict[str, dict[str, Any]] = {}
        """Trades of this account seen on `account.trade_history`, by trade id (for the fees)."""
        self.trade_seen = asyncio.Event()
        self.instruments: dict[str, InstrumentInfo] = {}
        self.seen: dict[str, None] = {}
        """Command ids this process has claimed, oldest first (no early `cancel_all` for a replay)."""
        bus.consumer(self.names.commands, GROUP, consumer_name, Command, self.handle, batch_size=1,
                     claim_idle_seconds=self.config.deadline_seconds + CLAIM_MARGIN_SECONDS)

    async def run(self) -> None:
        """Keep the exchange session up; commands arrive through the bus consumer."""
        delay = BACKOFF_START
        generation = 0
        while True:
            try:
                await self.session.connect()
                delay = BACKOFF_START
            except Exception as exc:  # noqa: BLE001 - any failure to connect is retried, loudly
                raise_if_cancelled()
                log.warning("cannot connect to %s: %s; retrying in %.1f s", self.settings.thalex.url, exc, delay)
                delay = min(delay * 2, 5.0)
            if self.session.generation > generation:  # connects made here or by a request
                RECONNECTS.inc(self.session.generation - max(generation, 1))
                generation = self.session.generation
            EXCHANGE_CONNECTED.set(1 if self.session.connected else 0)
            await asyncio.sleep(delay if not self.session.connected else 1.0)

    async def exchange_healthy(self) -> bool:
        return self.session.connected

    async def close(self) -> None:
        await self.session.close()

    # Commands

    async def handle(self, batch: list[Delivery[Command]], pipe: Pipeline) -> None:
        """Execute each command; raising leaves it pending, to be resumed on redelivery."""
        for delivery in batch:
            await self.execute(delivery.doc)

    async def execute(self, command: Command) -> None:
        first = await self._decision_wave(command)
        early_cancel = None

        def fresh() -> tuple[Progress, list[Report]]:
            now = time.time()
            progress = Progress.start(command, now, self.config.close_price_buffer, self.config.deadline_seconds)
            reports = [progress.report(ReportStatus.RECEIVED, now)]
            if first is None:
                return progress, reports
            # the first wave is planned in the progress; its reports wait in the outbox until it left
            progress.outbox = reports + self._plan_decision_wave(progress, first, now)
            return progress, []

        try:
            if first is not None and self.config.cancel_open_orders:
                # sent with the claim, not after it; only for a fresh command not seen before, so a
                # replay (which the claim turns into a `duplicate`) cancels nothing
                early_cancel = asyncio.create_task(self.session.request("cancel_all"))
                await asyncio.sleep(0)  # let it reach the socket before the claim is built and sent
            # lease + progress + `received` (or the first wave, `received` in its outbox): one round trip
            claim = await self.store.claim(command.command_id, fresh)
        except BaseException:
            _settle_quietly(early_cancel)
            raise
        self._remember(command.command_id)
        if claim is None:
            _settle_quietly(early_cancel)
            await self._publish_duplicate(command)
            return
        try:
            assert claim.progress is not None
            work = Work(claim.progress, claim.token, command.created_ts)
            if not claim.created:
                log.info("resuming %s at stage %s", command.command_id, claim.progress.stage)
            heartbeat = asyncio.create_task(self._keep_lease(work))
            try:
                await self._work(work, resumed=not claim.created, early_cancel=early_cancel,
                                 first=first if claim.created else None)
            finally:
                heartbeat.cancel()
            COMMANDS.labels(work.progress.stage.value).inc()
        finally:
            _settle_quietly(early_cancel)
            await self.store.release(command.command_id, claim.token)

    def _remember(self, command_id: str) -> None:
        self.seen[command_id] = None
        while len(self.seen) > REMEMBERED_COMMANDS:
            del self.seen[next(iter(self.seen))]

    async def _decision_wave(self, command: Command) -> dict[str, tuple[Side, float, float]] | None:
        """The first wave priced from the command itself, or None for the usual path.

        Taken for a full closure seen for the first time within `DECISION_PRICE_MAX_AGE_SECONDS`
        of its decision, every leg with the portfolio's exit price and mark, none hedged against
        another (a hedged unwind is sized against the book's depth, read fresh), and every limit
        within `max_close_price_buffer` of its mark (no deeper through the book than the usual
        waves may go). It saves reading the market before the first order: the decision's prices
        are a few milliseconds old.
        """
        if self.config.dry_run or command.fraction < 1.0 or command.command_id in self.seen \
                or time.time() - command.created_ts > DECISION_PRICE_MAX_AGE_SECONDS \
                or any(not p.exit_price or not p.mark for p in command.positions):
            return None
        names = [p.instrument for p in command.positions]
        try:
            infos = await self._infos(names)
        except (ThalexError, ConnectionLost):
            return None  # the usual path asks again, retrying until the deadline
        if self._hedged(names, infos, command.groups or []):
            return None
        wave = {}
        for p in command.positions:
            assert p.exit_price is not None and p.mark is not None
            order = decision_order(p.amount, p.exit_price, self.config.close_price_buffer, infos[p.instrument])
            if order is None or abs(order[2] - p.mark) > self.config.max_close_price_buffer * p.mark:
                return None
            wave[p.instrument] = order
        return wave

    def _plan_decision_wave(self, progress: Progress, wave: dict[str, tuple[Side, float, float]],
                            now: float) -> list[Report]:
        """Write the first wave into a new progress; returns its `order_sent` reports (for the outbox)."""
        reports = []
        for instrument, (side, amount, price) in wave.items():
            leg = progress.legs[instrument]
            leg.position_before = leg.listed  # what the decision saw; a full closure closes what is there
            leg.orders_sent = 1
            reports.append(progress.report(
                ReportStatus.ORDER_SENT, now, instrument=instrument, label=progress.label, amount=amount,
                orders=[progress.planned(instrument, side, amount, price)]))
        progress.first_order_ts = now
        return reports

    async def _publish_duplicate(self, command: Command) -> None:
        log.info("command %s already handled: duplicate", command.command_id)
        COMMANDS.labels("duplicate").inc()
        await self.bus.publish(self.names.reports, Report(
            command_id=command.command_id, status=ReportStatus.DUPLICATE, epoch=command.epoch,
            fraction=command.fraction, ts=time.time()))

    async def _keep_lease(self, work: Work) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                if not await self.store.renew(work.progress.command_id, work.token):
                    work.lease_lost.set()
                    return
            except Exception:
                raise_if_cancelled()
                log.exception("renewing the lease of %s failed", work.progress.command_id)

    async def _save(self, work: Work) -> None:
        """Progress and reports in one Lua call; the outbox (see `Progress.outbox`) is published first."""
        work.take_outbox()
        reports, work.reports = work.reports, []
        await self.store.save(work.progress, work.token, reports)

    async def _work(self, work: Work, resumed: bool, early_cancel: asyncio.Task[Any] | None = None,
                    first: dict[str, tuple[Side, float, float]] | None = None) -> None:
        progress = work.progress
        if self.config.dry_run:
            await self._dry_run(work)
            return
        reads: Reads | None = None
        if progress.stage is Stage.RECEIVED:
            cancel = None
            if self.config.cancel_open_orders:  # first, so quoters' orders cannot rebuild the position
                cancel = asyncio.create_task(self._cancel_all(work, early_cancel))  # created first: sent first
            # The first wave's reads go out with cancel_all instead of after it; no order is sent
            # before cancel_all's answer (awaited here). A full closure reads the portfolio at once
            # too (a quoter's fill racing the cancel is closed by the next wave / verify flat); a
            # partial one reads it after the cancel, so `position_before` cannot move under it.
            # A first wave priced from the command reads nothing.
            if not resumed and first is None:
                reads = self._start_reads(work, progress.open_legs(), positions=cancel is None or progress.full)
            if cancel is not None:
                try:
                    await cancel
                except BaseException:
                    if reads is not None:
                        reads.cancel()
                    raise
                progress.to(Stage.ORDERS_CANCELLED)
                work.add(ReportStatus.ORDERS_CANCELLED)
            progress.to(Stage.CLOSING)
            # saved with the first wave's `order_sent` (before that order leaves), or earlier by
            # whatever saves first; a crash before it repeats cancel_all, which is harmless
        try:
            if resumed:
                await self._resync(work)
            if first is not None:
                await self._send_decision_wave(work, first)
            await self._close(work, reads)
        except ThalexError as exc:  # a request the executor cannot do without (e.g. 28 unauthorized)
            progress.error = ExchangeError(code=exc.code, message=exc.message)
            await self._fail(work, {})
        except ConnectionLost as exc:  # still unreachable at the deadline
            progress.error = ExchangeError(code=20, message=f"exchange unreachable: {exc}")
            await self._fail(work, {})
        finally:
            if reads is not None:
                reads.cancel()

    async def _cancel_all(self, work: Work, early: asyncio.Task[Any] | None) -> Any:
        """cancel_all's answer: the one sent with the claim, else (or if that one failed) a retried one."""
        if early is not None:
            try:
                return await early
            except (ThalexError, ConnectionLost) as exc:
                log.warning("cancel_all sent with the claim failed (%s); retrying", exc)
        return await self._retrying(work, "cancel_all")

    async def _send_decision_wave(self, work: Work, wave: dict[str, tuple[Side, float, float]]) -> None:
        """Send the first wave planned at the claim (its `order_sent` is in Redis already)."""
        progress = work.progress
        orders = [Order(progress.legs[name], side, amount, price) for name, (side, amount, price) in wave.items()]
        TIME_TO_FIRST_ORDER.observe(max(0.0, time.time() - work.created_ts))
        # the outbox (`received`, `order_sent`) and `orders_cancelled` are published as the orders leave
        await asyncio.gather(*(self._send(work, order) for order in orders), self._save(work))
        pause = await self._settle(work, orders, from_decision=True)
        if pause:
            await asyncio.sleep(min(pause, max(0.0, progress.deadline_ts - time.time())))

    def _start_reads(self, work: Work, legs: list[Leg], positions: bool = True) -> Reads:
        """Start a wave's exchange reads concurrently: the portfolio and each leg's ticker (and book)."""
        return Reads(
            positions=asyncio.create_task(self._retrying(work, "portfolio")) if positions else None,
            quotes=asyncio.create_task(self._quotes(work, [leg.instrument for leg in legs])) if legs else None,
        )

    async def _retrying(self, work: Work, method: str, *args: Any, order: bool = False, **kwargs: Any) -> Any:
        """A request retried through throttling, temporary failures and reconnects until the deadline."""
        delay = BACKOFF_START
        while True:
            self._check_lease(work)
            try:
                return await self.session.request(method, *args, order=order, **kwargs)
            except ThalexError as exc:
                if action_for(exc.code) is not ErrorAction.BACK_OFF or time.time() >= work.progress.deadline_ts:
                    raise
                RETRIES.labels("throttle" if exc.code == 4 else "temporary").inc()
            except ConnectionLost as exc:
                if time.time() >= work.progress.deadline_ts:
                    raise
                log.warning("%s: %s; reconnecting", method, exc)
                RETRIES.labels("reconnect").inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    @staticmethod
    def _check_lease(work: Work) -> None:
        if work.lease_lost.is_set():
            raise LeaseLost(work.progress.command_id)

    # Market data

    async def _info(self, instrument: str) -> InstrumentInfo:
        """Tick sizes from `tp:instruments` (ingest keeps it), else from the exchange; cached."""
        if instrument in self.instruments:
            return self.instruments[instrument]
        return (await self._infos([instrument]))[instrument]

    async def _infos(self, instruments: list[str]) -> dict[str, InstrumentInfo]:
        """`_info` of several instruments; what is not cached yet costs one HMGET (plus the
        exchange's `public/instrument` for what `tp:instruments` lacks)."""
        missing = [name for name in dict.fromkeys(instruments) if name not in self.instruments]
        if missing:
            raws = await self.bus.redis.hmget(self.names.instruments, missing)
            for name, raw in zip(missing, raws):
                if raw is not None:
                    self.instruments[name] = InstrumentInfo.model_validate_json(raw)
            unknown = [name for name in missing if name not in self.instruments]
            for name, wire in zip(unknown, await asyncio.gather(
                    *(self.session.request("instrument", name) for name in unknown))):
                self.instruments[name] = InstrumentInfo(
                    type=InstrumentType(wire["type"]), product=wire["product"], underlying=wire["underlying"],
                    tick_size=wire["tick_size"], volume_tick_size=wire["volume_tick_size"],
                    min_order_amount=max(wire["min_order_amount"], wire["volume_tick_size"]),
                    expiry_ts=wire.get("expiration_timestamp"),
                )
        return {name: self.instruments[name] for name in instruments}

    def _hedged(self, names: list[str], infos: dict[str, InstrumentInfo], groups_of: Any) -> set[str]:
        """The instruments sharing an underlying with another one (their book depth is needed)."""
        groups = group_legs(names, groups_of, {n: i.underlying for n, i in infos.items()})
        return {name for members in groups.values() if len(members) > 1 for name in members}

    async def _quotes(self, work: Work, names: list[str]) -> dict[str, Quote]:
        """Every leg's quote at once, with the book for legs hedged against another."""
        infos = await self._infos(names)
        several = self._hedged(names, infos, work.progress.groups)
        quotes = await asyncio.gather(*(self._quote(work, n, with_book=n in several) for n in names))
        return dict(zip(names, quotes))

    async def _quote(self, work: Work, instrument: str, with_book: bool) -> Quote:
        if with_book:  # both reads at once
            ticker, book = await asyncio.gather(self._retrying(work, "ticker", instrument),
                                                self._retrying(work, "book", instrument))
        else:
            ticker, book = await self._retrying(work, "ticker", instrument), None
        info = await self._info(instrument)
        delta = ticker.get("delta")
        if delta is None or info.type is not InstrumentType.OPTION:
            delta = 1.0 if delta is None else delta
        quote = Quote(mark=ticker["mark_price"], best_bid=ticker.get("best_bid_price"),
                      best_ask=ticker.get("best_ask_price"), delta=float(delta))
        if book is not None:
            quote.bids, quote.asks = book.get("bids") or [], book.get("asks") or []
        return quote

    async def _positions(self) -> dict[str, float]:
        rows = await self.session.request("portfolio")
        return {row["instrument_name"]: float(row["position"]) for row in rows}

    def _on_trades(self, channel: str, trades: Any) -> None:
        for trade in trades or []:
            if trade.get("trade_id"):
                self.trades[trade["trade_id"]] = trade
        while len(self.trades) > MAX_REMEMBERED_TRADES:
            del self.trades[next(iter(self.trades))]
        self.trade_seen.set()

    # Dry run

    async def _dry_run(self, work: Work) -> None:
        """Price every listed position as the first wave would, send nothing, report the orders."""
        progress = work.progress
        orders: list[PlannedOrder] = []
        for leg in progress.legs.values():
            info = await self._info(leg.instrument)
            quote = await self._quote(work, leg.instrument, with_book=False)
            side = close_side(leg.listed)
            amount = order_amount(leg.listed, leg.listed, info)
            if amount > 0:
                price = close_price(side, reference_price(side, quote.best_bid, quote.best_ask, quote.mark),
                                    leg.buffer, info.tick_size)
                orders.append(progress.planned(leg.instrument, side, amount, price))
        progress.to(Stage.DRY_RUN)
        work.add(ReportStatus.DRY_RUN, orders=orders)
        await self._save(work)
        log.info("dry run of %s: would send %s", progress.command_id, orders)

    # Closing

    async def _close(self, work: Work, reads: Reads | None = None) -> None:
        """Waves of closing orders until every leg is closed, dust or stopped, then verify flat.

        A closing wave's portfolio and quotes are read concurrently (`reads`, already in flight
        for the first wave); verifying reads only the portfolio.
        """
        progress = work.progress
        while True:
            self._check_lease(work)
            if reads is None and progress.stage is Stage.CLOSING:
                reads = self._start_reads(work, progress.open_legs())
            quotes: dict[str, Quote] | None = None
            try:
                if reads is not None and reads.positions is not None:
                    rows = await reads.positions
                else:
                    rows = await self._retrying(work, "portfolio")
                if reads is not None and reads.quotes is not None:
                    quotes = await reads.quotes
            finally:
                if reads is not None:
                    reads.cancel()
                reads = None
            positions = {row["instrument_name"]: float(row["position"]) for row in rows}
            if progress.stage is Stage.VERIFYING:
                if await self._verified(work, positions):
                    return
                continue
            pause = await self._wave(work, positions, quotes)
            if not progress.open_legs():
                progress.to(Stage.VERIFYING)
                await self._save(work)
                continue
            if time.time() >= progress.deadline_ts:
                await self._fail(work, positions)
                return
            if pause:
                await asyncio.sleep(min(pause, max(0.0, progress.deadline_ts - time.time())))

    async def _verified(self, work: Work, positions: dict[str, float]) -> bool:
        """Verify flat against the exchange's portfolio; reopen a leg that is not."""
        progress = work.progress
        reopened = False
        for leg in progress.legs.values():
            info = await self._info(leg.instrument)
            position = positions.get(leg.instrument, 0.0)
            if leg.state is LegState.CLOSED and not leg.is_done(position, progress.full, info):
                log.warning("%s: %s not closed after all (position %s); closing again",
                            progress.command_id, leg.instrument, position)
                leg.state = LegState.OPEN
                reopened = True
        if reopened and time.time() < progress.deadline_ts:
            progress.to(Stage.CLOSING)
            await self._save(work)
            return False
        if reopened or any(leg.state is LegState.STOPPED for leg in progress.legs.values()):
            await self._fail(work, positions)
            return True
        progress.to(Stage.COMPLETED)
        work.add(ReportStatus.COMPLETED, fee=progress.total_fee())
        await self._save(work)
        TIME_TO_FLAT.observe(max(0.0, time.time() - work.created_ts))
        log.info("%s completed: %d legs flat, fees %.6f", progress.command_id, len(progress.legs),
                 progress.total_fee())
        return True

    async def _fail(self, work: Work, positions: dict[str, float]) -> None:
        """Report `failed` with the exchange's error (the first leg's), naming every leg left open."""
        progress = work.progress
        problems = []
        error = progress.error
        for leg in progress.legs.values():
            if leg.state is LegState.DUST:
                continue
            info = await self._info(leg.instrument)
            position = positions.get(leg.instrument, leg.position_before or leg.listed)
            if leg.state is not LegState.STOPPED and leg.is_done(position, progress.full, info):
                continue
            leg_error = leg.error or ExchangeError(
                code=INSUFFICIENT_LIQUIDITY, message="no liquidity within the price buffer before the deadline")
            error = error or leg_error
            left = leg.remaining(position, progress.full)
            problems.append(f"{leg.instrument}: {abs(left):g} left ({leg_error.code} {leg_error.message})")
        error = error or ExchangeError(code=INSUFFICIENT_LIQUIDITY, message="not flat at the deadline")
        progress.error = ExchangeError(code=error.code, message="; ".join(problems) or error.message)
        progress.to(Stage.FAILED)
        work.add(ReportStatus.FAILED, error=progress.error, fee=progress.total_fee())
        await self._save(work)
        log.error("%s failed: %s", progress.command_id, progress.error.message)

    async def _wave(self, work: Work, positions: dict[str, float],
                    quotes: dict[str, Quote] | None = None) -> float:
        """Send one round of closing orders; returns how long to pause before the next."""
        progress = work.progress
        remaining: dict[str, float] = {}
        for leg in progress.open_legs():
            position = positions.get(leg.instrument, 0.0)
            info = await self._info(leg.instrument)
            if leg.position_before is None:
                leg.position_before = position
            if leg.is_done(position, progress.full, info):
                leg.state = LegState.CLOSED
                continue
            if leg.error is not None and leg.error.code in REDUCE_ONLY_REJECTED:
                leg.state = LegState.STOPPED  # rejected as not reducing, yet the position is there
                continue
            left = leg.remaining(position, progress.full)
            if order_amount(left, position, info) == 0:
                leg.state = LegState.DUST
                work.add(ReportStatus.PARTIALLY_FILLED, instrument=leg.instrument, label=progress.label,
                         amount=abs(left), filled=0.0, error=ExchangeError(
                             code=14, message=f"remainder {abs(left):g} below min_order_amount "
                                              f"{info.min_order_amount:g}; not sent"))
                continue
            remaining[leg.instrument] = left
        if not remaining:
            return 0.0
        orders = await self._plan_wave(work, remaining, positions, quotes)
        if not orders:
            return RETRY_PAUSE
        for order in orders:
            order.leg.orders_sent += 1
            if order.leg.orders_sent > 1:
                RETRIES.labels("remainder").inc()
            work.add(ReportStatus.ORDER_SENT, instrument=order.leg.instrument, label=progress.label,
                     amount=order.amount,
                     orders=[progress.planned(order.leg.instrument, order.side, order.amount, order.price)])
        if progress.first_order_ts is None:
            progress.first_order_ts = time.time()
            TIME_TO_FIRST_ORDER.observe(max(0.0, progress.first_order_ts - work.created_ts))
        await self._save(work)  # order_sent and position_before are in Redis before any order leaves
        await asyncio.gather(*(self._send(work, order) for order in orders))
        return await self._settle(work, orders)

    async def _plan_wave(self, work: Work, remaining: dict[str, float], positions: dict[str, float],
                         read: dict[str, Quote] | None = None) -> list[Order]:
        """Size (hedge-aware) and price this wave's orders, lead side of each underlying first.

        `read`: quotes already read for this wave (with the portfolio); what it lacks is read now.
        """
        progress = work.progress
        names = list(remaining)
        infos = await self._infos(names)
        groups = group_legs(names, progress.groups, {n: i.underlying for n, i in infos.items()})
        several = self._hedged(names, infos, progress.groups)
        quotes = {n: q for n, q in (read or {}).items()
                  if n in remaining and (n not in several or q.bids is not None)}
        missing = [n for n in names if n not in quotes]
        quotes.update(zip(missing, await asyncio.gather(
            *(self._quote(work, n, with_book=n in several) for n in missing))))
        orders: list[Order] = []
        for underlying, members in groups.items():
            if not members:
                continue
            legs = []
            prices: dict[str, tuple[Side, float]] = {}
            signs = {remaining[n] * quotes[n].delta > 0 for n in members if abs(quotes[n].delta) > 0}
            hedged = len(signs) > 1
            for name in members:
                leg, quote, info = progress.legs[name], quotes[name], infos[name]
                side = close_side(remaining[name])
                price = close_price(side, reference_price(side, quote.best_bid, quote.best_ask, quote.mark),
                                    leg.buffer, info.tick_size)
                prices[name] = (side, price)
                fillable = None
                if hedged:
                    levels = quote.bids if side is Side.SELL else quote.asks
                    fillable = book_depth(levels or [], side, price)
                legs.append(HedgeLeg(name, remaining[name], quote.delta, fillable, info.volume_tick_size))
            if underlying not in progress.hedge_bounds:
                progress.hedge_bounds[underlying] = abs(sum(leg.exposure for leg in legs))
            quantum = max(infos[leg.instrument].min_order_amount * abs(leg.delta) for leg in legs)
            amounts = hedge_wave(legs, max(progress.hedge_bounds[underlying], quantum))
            for name in lead_first(legs):
                amount = order_amount(math.copysign(amounts.get(name, 0.0), remaining[name]),
                                      positions.get(name, 0.0), infos[name])
                if amount > 0:
                    side, price = prices[name]
                    orders.append(Order(progress.legs[name], side, amount, price))
        return orders

    async def _send(self, work: Work, order: Order) -> None:
        """One reduce-only IOC limit order, collar clamp; the outcome is kept on `order`."""
        leg = order.leg
        direction = thalex.Direction.SELL if order.side is Side.SELL else thalex.Direction.BUY
        try:
            self._check_lease(work)
            ORDERS_SENT.inc()
            order.result = await self.session.request(
                "insert", direction, leg.instrument, order.amount, price=order.price, label=work.progress.label,
                order_type=thalex.OrderType.LIMIT, time_in_force=thalex.TimeInForce.IOC, reduce_only=True,
                collar="clamp", order=True,
            )
        except ThalexError as exc:
            ORDERS_REJECTED.labels(str(exc.code)).inc()
            order.error = ExchangeError(code=exc.code, message=exc.message)
        except ConnectionLost as exc:
            log.warning("answer to the %s order lost (%s); will look it up by label", leg.instrument, exc)
            order.lost = True

    async def _settle(self, work: Work, orders: list[Order], from_decision: bool = False) -> float:
        """Count fills (with their fees), apply the error rules; returns the pause before the next wave.

        `from_decision`: the wave was sized and priced from the command, not the exchange. A
        reduce-only rejection then says the position is not what the decision saw (it shrank to
        flat or changed sign), and a miss that the market moved: the next wave reads both afresh,
        with the base buffer, instead of stopping the leg or widening.
        """
        progress = work.progress
        pause = 0.0
        if any(o.lost for o in orders):
            await self._resync(work)
            pause = RETRY_PAUSE
        await self._await_fees([f["trade_id"] for o in orders if o.result for f in o.result.get("fills", [])])
        for order in orders:
            leg = order.leg
            if order.error is not None:
                action = action_for(order.error.code)
                log.warning("%s order rejected %s: %s", leg.instrument, order.error.code, order.error.message)
                if action is ErrorAction.BACK_OFF:
                    RETRIES.labels("throttle" if order.error.code == 4 else "temporary").inc()
                    pause = max(pause, min(BACKOFF_MAX, BACKOFF_START * 2 ** min(leg.orders_sent, 5)))
                elif action is ErrorAction.WIDEN:
                    leg.buffer = widened(leg.buffer, self.config.close_price_buffer, self.config.max_close_price_buffer)
                    RETRIES.labels("widen").inc()
                elif action is ErrorAction.CHECK_FLAT:
                    if not from_decision:
                        leg.error = order.error  # the next wave's portfolio says whether it is done
                else:
                    leg.state, leg.error = LegState.STOPPED, order.error
                    work.add(ReportStatus.PARTIALLY_FILLED, instrument=leg.instrument, label=progress.label,
                             amount=order.amount, filled=0.0, error=order.error)
                continue
            if order.result is None:
                continue
            filled = float(order.result.get("filled_amount", 0.0))
            fills = order.result.get("fills") or []
            for f in fills:
                trade = self.trades.get(f["trade_id"], {})
                progress.record_fill(leg.instrument, f["trade_id"], LegFill(
                    order_id=order.result["order_id"], price=f["price"], amount=f["amount"], fee=trade.get("fee")))
            fee = sum(self.trades.get(f["trade_id"], {}).get("fee", 0.0) for f in fills)
            avg = sum(f["price"] * f["amount"] for f in fills) / filled if filled > 0 and fills else None
            if filled > 0:
                ORDERS_FILLED.inc()
            complete = filled >= order.amount - 1e-12
            if not complete:
                if not from_decision:
                    leg.buffer = widened(leg.buffer, self.config.close_price_buffer, self.config.max_close_price_buffer)
                pause = max(pause, RETRY_PAUSE)
            work.add(ReportStatus.FILLED if complete else ReportStatus.PARTIALLY_FILLED,
                     instrument=leg.instrument, order_id=order.result["order_id"], label=progress.label,
                     amount=order.amount, filled=filled, avg_price=avg, fee=fee if filled > 0 else None)
        await self._save(work)
        return pause

    async def _await_fees(self, trade_ids: list[str]) -> None:
        """Fees arrive on `account.trade_history`, just after the insert answer; wait briefly for them."""
        deadline = time.monotonic() + FEE_WAIT_SECONDS
        while any(t not in self.trades for t in trade_ids) and time.monotonic() < deadline:
            self.trade_seen.clear()
            try:
                await asyncio.wait_for(self.trade_seen.wait(), deadline - time.monotonic())
            except TimeoutError:
                break
        if any(t not in self.trades for t in trade_ids):
            log.warning("fees of %d trades not seen on account.trade_history",
                        sum(t not in self.trades for t in trade_ids))

    async def _resync(self, work: Work) -> None:
        """After a restart or a lost answer: find this command's trades and open orders by label.

        Trades found are counted (once, by trade id) and reported; an order of ours still open
        is cancelled, so a resumed command starts from what really happened.
        """
        progress = work.progress
        new: dict[str, list[dict[str, Any]]] = {}
        bookmark = None
        while True:
            page = await self._retrying(
                work, "trade_history", limit=1000, time_low=int(progress.started_ts) - 5, bookmark=bookmark,
                instrument_names=",".join(progress.legs), sort=thalex.Sort.ASC)
            for trade in page.get("trades", []):
                self.trades.setdefault(trade["trade_id"], trade)
                if trade.get("label") != progress.label or trade.get("instrument_name") not in progress.legs:
                    continue
                if progress.record_fill(trade["instrument_name"], trade["trade_id"], LegFill(
                        order_id=trade["order_id"], price=trade["price"], amount=trade["amount"],
                        fee=trade.get("fee"))):
                    new.setdefault(trade["order_id"], []).append(trade)
            bookmark = page.get("bookmark")
            if not bookmark:
                break
        for order_id, trades in new.items():
            filled = sum(t["amount"] for t in trades)
            work.add(ReportStatus.FILLED, instrument=trades[0]["instrument_name"], order_id=order_id,
                     label=progress.label, amount=filled, filled=filled,
                     avg_price=sum(t["price"] * t["amount"] for t in trades) / filled,
                     fee=sum(t.get("fee", 0.0) for t in trades))
        for order in await self._retrying(work, "open_orders"):
            if order.get("label") == progress.label:
                await self._retrying(work, "cancel", order_id=order["order_id"], order=True)
        if new:
            log.info("%s: found %d earlier orders by label", progress.command_id, len(new))
        await self._save(work)


def _settle_quietly(task: asyncio.Task[Any] | None) -> None:
    """Let a request nobody will await finish on its own; its outcome (or error) is dropped."""
    if task is not None and not task.done():
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
    elif task is not None and not task.cancelled():
        task.exception()


@dataclass
class ExecutorService:
    """What `service_main` runs: the executor's session loop, closed cleanly on stop."""

    executor: Executor

    async def run(self) -> None:
        try:
            await self.executor.run()
        finally:
            await self.executor.close()


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> Runnable:
    executor = Executor(settings, bus, consumer_name)
    health.add("exchange", executor.exchange_healthy)
    return ExecutorService(executor)


def main(argv: list[str]) -> int:
    return service_main("executor", argv, build, lambda s: s.metrics.executor_port)
