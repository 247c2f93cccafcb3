"""Ingest's wiring: the exchange session → Redis, with de-duplication, gap fill and metrics.

Two writers, two disciplines:

* **Ticks** are many and only the latest matters. The reader hands each one to
  `TickWriter`, which keeps the newest tick per instrument and writes whatever
  is pending in one pipelined round trip; while a round trip is in flight new
  ticks of the same instrument replace older ones (coalescing under bursts, no
  backlog, no unbounded memory).
* **Account messages** (trades, portfolio) are few and every one counts. They
  are handled one at a time, in order, by the account worker. A trade is
  published in one Redis transaction with its id in the de-duplication set and
  the checkpoint (`WATCH` on both; see `FillStore`), so `tp:fills` holds
  exactly one entry per `trade_id` across reconnects, restarts and overlapping
  history queries.

On every (re)connection the worker first bootstraps — subscribe the private
channels, load `private/portfolio`, page `private/trade_history` from the
checkpoint — and only then handles the live notifications that queued up
meanwhile, so trades made while ingest was away are published once, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pydantic import ValidationError
from redis.exceptions import RedisError, WatchError
from thalex import Sort

from services.common.bus import Bus, encode_document, raise_if_cancelled
from services.common.config import Settings
from services.common.contracts import (
    ExchangePosition,
    Fill,
    InstrumentInfo,
    InstrumentType,
    Report,
    ReportStatus,
    Tick,
    halt_from_hash,
)
from services.common.funding import funding_period
from services.common.service import Health, service_main
from services.common.streams import Names
from services.common.thalex import (
    ChannelsRefused,
    Connection,
    ConnectionLost,
    Session,
    ThalexError,
    ThalexKey,
    subscribe,
)
from services.common.thalex.connection import SYSTEM
from services.common.thalex.models import MalformedMessage, UnbookableTrade
from services.ingest.follow import Feed, Follow
from services.ingest.freshness import stale_prices
from services.ingest.portfolio_view import UNNAMED, PortfolioView
from services.ingest.refusals import Refusals
from services.ingest.translate import (
    Book,
    as_list,
    fill_from_trade,
    instrument_info,
    positions_from_portfolio,
    tick_from_index,
    tick_from_ticker,
    unrecognised,
    with_book,
)
from services.ingest.violations import BOTS as HALT_BOTS
from services.ingest.violations import CHANNELS as HALT_WATCH_CHANNELS
from services.ingest.violations import CONDITIONAL_ORDERS as HALT_CONDITIONAL_ORDERS
from services.ingest.violations import ORDERS as HALT_ORDERS
from services.ingest.violations import HaltWatch, OrderMemory, sightings

log = logging.getLogger(__name__)

SERVICE = "ingest"
TRADES = "account.trade_history"
PORTFOLIO = "account.portfolio"
PRIVATE_CHANNELS = (TRADES, PORTFOLIO, *HALT_WATCH_CHANNELS)
PRIVATE_MEANING = {TRADES: "fills", PORTFOLIO: "positions", HALT_ORDERS: "orders",
                   HALT_CONDITIONAL_ORDERS: "conditional orders", HALT_BOTS: "bots"}
"""What the account's private channels bring, in the trader's words (logs and /health)."""
HISTORY_PAGE = 1000
HISTORY_OVERLAP_SECONDS = 600.0
"""Each gap fill re-reads this much before the checkpoint: Thalex's trade history
is not real-time, a trade may show up there a little after a later one."""
DEDUP_RETENTION_SECONDS = 86_400.0
"""Trade ids older than checkpoint − this are trimmed from the de-duplication set
(far beyond the overlap, so a re-read trade is always still remembered)."""
FOLLOW_INTERVAL_SECONDS = 1.0
REDIS_RETRY_SECONDS = 0.5
HISTORY_RETRY_FIRST_SECONDS = 1.0
"""A second read of the trade history the exchange refused (error 3, 10, 20 ...) is tried again
after this, doubling up to `history_recheck_seconds`, until it succeeds."""
PORTFOLIO_REREAD_SECONDS = 30.0
"""While the portfolio view is incomplete (a line could not be read), `private/portfolio` is read
again this often: a whole portfolio that reads cleanly makes it complete again."""

MESSAGES = Counter("tp_ingest_messages_total", "Exchange messages received, per channel", ["channel"])
PUBLISHED = Counter("tp_ingest_published_total", "Entries written, per stream or hash", ["stream"])
RECONNECTS = Counter("tp_ingest_reconnects_total", "Connections to the exchange lost and re-opened")
GAP_FILLED = Counter("tp_ingest_gap_filled_trades_total",
                     "Trades published from private/trade_history (made while ingest was not listening)")
REFUSED_PORTFOLIO_LINES = Counter(
    "tp_ingest_refused_portfolio_lines_total",
    "Portfolio lines dead-lettered (no instrument_name, no position, a field of the wrong type): until a "
    "readable line for the instrument arrives, tp:positions is withheld and /health is red")
REFUSED_TRADES = Counter("tp_ingest_refused_trades_total",
                         "Trades dead-lettered instead of published: unbookable (no trade id, instrument, "
                         "direction, price or amount) or malformed (a field of the wrong type)", ["reason"])
REFUSED_CHANNELS = Counter(
    "tp_ingest_refused_channels_total",
    "Channels the exchange left out of a subscribe answer (or refused with an error), per kind: "
    "private (the account's fills, positions, orders: ingest reconnects) or public (prices)", ["kind"])
DUPLICATES = Counter("tp_ingest_duplicate_trades_total",
                     "Trades seen again (history overlap, replays) and not re-published")
COALESCED = Counter("tp_ingest_ticks_coalesced_total",
                    "Ticks replaced by a newer tick of the same instrument before they were written")
HALT_VIOLATIONS = Counter(
    "tp_halt_violations_total",
    "Orders, bots, conditional orders and trades on the account that are not the guardian's, seen on the "
    "exchange's account channels while tp:halt is set", ["kind"])
TICK_LATENCY = Histogram(
    "tp_ingest_tick_latency_seconds", "Exchange mark time to tick written in Redis",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

LAST_MESSAGE: dict[str, float] = {}
"""channel → Unix time of its last message (read at scrape time)."""


class _SecondsSinceLastMessage(Collector):
    """`tp_ingest_seconds_since_last_message{channel}`, computed when Prometheus scrapes."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tp_ingest_seconds_since_last_message",
                                   "Seconds since the last message of each channel", labels=["channel"])
        now = time.time()
        for channel, ts in list(LAST_MESSAGE.items()):
            family.add_metric([channel], max(0.0, now - ts))
        yield family


REGISTRY.register(_SecondsSinceLastMessage())


class TickWriter:
    """Writes ticks to `tp:ticks` in pipelined batches, newest per instrument.

    `add` never blocks (the websocket reader calls it); `run` writes whatever
    is pending as soon as the previous round trip has returned.

    One tick is never coalesced away: the last one of a funding period (a tick
    with a funding mark replaced by one stamped after the next 08:00 UTC). The
    portfolio settles the day's funding at the newest mark it saw of that day;
    losing it under a burst (the reader hands buffered messages over without
    yielding) settled the day at an older mark and lost what accrued since.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.stream = bus.names.ticks
        self.pending: dict[str, Tick] = {}
        self.period_ends: list[Tick] = []
        """Ticks that closed a funding period, written (in order) ahead of `pending`."""
        self.letters: list[tuple[str, str, str, str]] = []
        self.added = 0
        """Ticks handed in since the last flush (the ones not written were coalesced)."""
        self._wake = asyncio.Event()
        self._published = PUBLISHED.labels(self.stream)

    def add(self, tick: Tick) -> None:
        self.added += 1
        older = self.pending.get(tick.instrument)
        if older is not None and ends_funding_period(older, tick):
            self.period_ends.append(older)
        self.pending[tick.instrument] = tick
        self._wake.set()

    def deadletter(self, source: str, entry_id: str, raw: str, error: str) -> None:
        """Queue a dead letter with the next batch (the reader cannot await)."""
        self.letters.append((source, entry_id, raw, error))
        self._wake.set()

    async def run(self) -> None:
        while True:
            # a cancellation redis-py swallowed mid-write would otherwise leave this loop waiting here
            # forever and the service unable to stop (seen in a test under load)
            raise_if_cancelled()
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except RedisError as exc:  # ticks are perishable: the next one replaces them
                raise_if_cancelled()
                log.warning("writing ticks failed (%s); retrying with the newest", exc)
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    async def flush(self) -> list[Tick]:
        """Write what is pending in one round trip; returns the ticks written."""
        ticks, self.pending = [*self.period_ends, *self.pending.values()], {}
        self.period_ends = []
        letters, self.letters = self.letters, []
        COALESCED.inc(self.added - len(ticks))
        self.added = 0
        if not ticks and not letters:
            return []
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for tick in ticks:
                self.bus.queue_publish(pipe, self.stream, tick)
            for source, entry_id, raw, error in letters:
                self.bus.queue_deadletter(pipe, source, entry_id, raw, error)
            await pipe.execute()
        written = time.time()
        self._published.inc(len(ticks))
        for tick in ticks:
            TICK_LATENCY.observe(max(0.0, written - tick.exchange_ts))
        return ticks


def ends_funding_period(older: Tick, newer: Tick) -> bool:
    """`older` is the last funding mark of its day: `newer` is stamped after the settlement that
    ends it (the portfolio settles the day at that mark, so it must reach it)."""
    return older.funding_mark is not None and (
        funding_period(older.exchange_ts) < funding_period(newer.exchange_ts))


class FillStore:
    """`tp:fills` with exactly one entry per trade id, plus the gap-fill checkpoint.

    Keys (under the namespace): `ingest:trade_ids` (ZSET trade id → trade time),
    `ingest:checkpoint` (time of the newest trade published), `ingest:since`
    (when this guardian first started: older trades are not its business — the
    positions they built arrive through the portfolio).
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        names: Names = bus.names
        self.ids_key = names.key("ingest:trade_ids")
        self.checkpoint_key = names.key("ingest:checkpoint")
        self.since_key = names.key("ingest:since")
        self._published = PUBLISHED.labels(names.fills)

    async def since(self, now: float) -> float:
        """The first start of this guardian (recorded once, kept across restarts)."""
        await self.bus.redis.set(self.since_key, repr(now), nx=True)
        return float(cast(bytes, await self.bus.redis.get(self.since_key)))

    async def checkpoint(self) -> float | None:
        value = await self.bus.redis.get(self.checkpoint_key)
        return None if value is None else float(value)

    async def publish(self, fills: list[Fill]) -> list[Fill]:
        """Publish the fills not published before, in the given order; returns those.

        The check and the writes run under `WATCH`, so even two ingest
        processes racing on one account cannot publish a trade twice.
        """
        unique = list({f.trade_id: f for f in fills}.values())
        if not unique:
            return []
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.ids_key, self.checkpoint_key)
                    scores = await pipe.zmscore(self.ids_key, [f.trade_id for f in unique])
                    raw_checkpoint = await pipe.get(self.checkpoint_key)
                    new = [f for f, score in zip(unique, scores, strict=True) if score is None]
                    if not new:
                        await pipe.unwatch()
                        break
                    checkpoint = max([f.exchange_ts for f in new]
                                     + ([float(raw_checkpoint)] if raw_checkpoint is not None else []))
                    pipe.multi()
                    for fill in new:
                        self.bus.queue_publish(pipe, self.bus.names.fills, fill)
                    pipe.zadd(self.ids_key, {f.trade_id: f.exchange_ts for f in new})
                    pipe.set(self.checkpoint_key, repr(checkpoint))
                    pipe.zremrangebyscore(self.ids_key, "-inf", f"({checkpoint - DEDUP_RETENTION_SECONDS!r}")
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        DUPLICATES.inc(len(fills) - len(new))
        self._published.inc(len(new))
        return new


class Ingest:
    """The service: one exchange session, one tick writer, one account worker."""

    def __init__(self, settings: Settings, bus: Bus, health: Health) -> None:
        self.settings = settings
        self.bus = bus
        self.names = bus.names
        cfg = settings.ingest
        self.levels = cfg.book_levels
        self.follow = Follow(cfg.watch_list, cfg.unsubscribe_after_flat_seconds, cfg.ticker_delay,
                             cfg.book_levels)
        self.ticks = TickWriter(bus)
        self.fills = FillStore(bus)
        self.account_queue: asyncio.Queue[tuple[str, Any, str, float]] = asyncio.Queue()
        self.halt_queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        """Account notifications to judge against `tp:halt`: a worker of their own, never delaying fills."""
        self.channels: dict[str, tuple[Feed, str]] = {}
        """Public channels held on the current connection → (feed, instrument)."""
        self.refusals = Refusals()
        """Public channels the exchange would not subscribe on this connection (`refusals.py`)."""
        self.private_refused: dict[str, float] = {}
        """Private channels left out of the last private subscribe → since when (kept across connections
        until one holds them all)."""
        self.books: dict[str, Book] = {}
        self.last_tick: dict[str, Tick] = {}
        self.portfolio_view = PortfolioView()
        self.portfolio_snapshot_due = False
        self.portfolio_reread_at: float | None = None
        """When to read `private/portfolio` again while the view is incomplete (None: not due)."""
        self.portfolio_reread_seconds = PORTFOLIO_REREAD_SECONDS
        self.known_instruments: set[str] = set()
        self.since = 0.0
        self.history_recheck_at: float | None = None
        """When to read the trade history once more after a gap fill (None: not due, or done)."""
        self.history_retry_seconds = HISTORY_RETRY_FIRST_SECONDS
        """The wait before the next attempt when the exchange refuses the second read."""
        self.halt_watch = HaltWatch()
        self.order_memory = OrderMemory()
        """The account's orders as last seen, so an amend that only takes away is no halt violation."""
        self.session: Session | None = None
        self._counters: dict[str, Any] = {}
        self.subscribed_at: dict[str, float] = {}
        """Channel → when it was last subscribed (how long a position's ticker has been silent)."""
        health.add("exchange", self._exchange_healthy)
        health.add("prices", self.prices_fresh)
        health.add("subscriptions", self.subscriptions_held)
        health.add("portfolio", self.portfolio_whole)

    # Life

    async def run(self) -> None:
        """Follow the account until cancelled; a key the exchange can never accept raises `ConfigError`
        (exit 2 naming it): an unusable key file at once, a refused login when the exchange says so."""
        thalex_cfg = self.settings.thalex
        key = ThalexKey.load("thalex", thalex_cfg.key_id, thalex_cfg.private_key_file,
                             hint="a read-only key is enough")
        cfg = self.settings.ingest
        self.since = await self.fills.since(time.time())
        self.session = Session(
            thalex_cfg.url, key,
            account=thalex_cfg.account,
            idle_timeout=cfg.idle_timeout_seconds,
            request_timeout=max(cfg.idle_timeout_seconds, 5.0),
            backoff_max=cfg.reconnect_max_seconds,
            on_notification=self.on_notification,
            on_garbage=self.on_garbage,
            on_connected=self.on_connected,
            on_disconnected=self.on_disconnected,
        )
        workers = [asyncio.create_task(self.session.run(), name="ingest-session"),
                   asyncio.create_task(self.ticks.run(), name="ingest-ticks"),
                   asyncio.create_task(self._account_worker(), name="ingest-account"),
                   asyncio.create_task(self._halt_worker(), name="ingest-halt-watch")]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the login refused (LoginRejected, a ConfigError) ends ingest here
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    @property
    def portfolio(self) -> dict[str, ExchangePosition]:
        """The exchange's portfolio lines as last read, by instrument (`PortfolioView.lines`)."""
        return self.portfolio_view.lines

    def portfolio_whole(self) -> bool | str:
        """Every portfolio line could be read: red, naming the instrument, while one could not (then
        `tp:positions` is withheld rather than published without it — see `portfolio_view`)."""
        if self.portfolio_view.complete:
            return True
        return "portfolio incomplete, tp:positions withheld: " + self.portfolio_view.why_incomplete()

    async def _exchange_healthy(self) -> bool | str:
        return self.session.health() if self.session is not None else "not started"

    def prices_fresh(self) -> bool | str:
        """Every open position's latest mark is at most `[portfolio] stale_after_seconds` old by the
        exchange's clock (`freshness.stale_prices`): a slowed or starved feed is red with the reason,
        a moving book behind a silent ticker too (the book re-issues the old mark, not a new one)."""
        since = {instrument: self.subscribed_at[channel]
                 for channel, (feed, instrument) in self.channels.items()
                 if feed is Feed.TICKER and channel in self.subscribed_at}
        held = [p.instrument for p in self.portfolio.values() if p.position != 0]
        problems = stale_prices(held, self.last_tick, since, time.time(),
                                self.settings.portfolio.stale_after_seconds)
        return "prices stale: " + "; ".join(problems) if problems else True

    def subscriptions_held(self) -> bool | str:
        """Every private channel is held, and every feed that prices an open position: otherwise which are
        not (a refused subscription is silent — no error, no message — so only this check says so)."""
        now = time.time()
        problems = [f"{channel} (the account's {PRIVATE_MEANING[channel]}) left out of the "
                    f"subscribe answer {now - since:.0f} s ago, reconnecting"
                    for channel, since in sorted(self.private_refused.items())]
        problems += self.refusals.unpriced(self.follow.guards, now)
        return "channels refused: " + "; ".join(problems) if problems else True

    def on_disconnected(self, reason: str) -> None:
        RECONNECTS.inc()

    # The reader's side (synchronous, in arrival order)

    def _count(self, channel: str, received: float) -> None:
        counter = self._counters.get(channel)
        if counter is None:
            counter = self._counters[channel] = MESSAGES.labels(channel)
        counter.inc()
        LAST_MESSAGE[channel] = received

    def on_notification(self, channel: str, notification: Any, raw: str, received: float) -> None:
        held = self.channels.get(channel)
        if held is not None:
            self._count(channel, received)
            feed, instrument = held
            try:
                if feed is Feed.TICKER:
                    tick = tick_from_ticker(instrument, notification, received, self.books.get(instrument),
                                            self.levels)
                elif feed is Feed.INDEX:  # `instrument` is the underlying
                    tick = tick_from_index(instrument, notification, received)
                else:
                    book = self.books.setdefault(instrument, Book())
                    book_ts = book.apply(notification)
                    last = self.last_tick.get(instrument)
                    if last is None:
                        return
                    tick = with_book(last, book, self.levels, book_ts, received)
            except MalformedMessage as exc:
                self.ticks.deadletter(f"thalex:{channel}", f"{channel}@{received:.6f}", raw, str(exc))
                return
            self.last_tick[instrument] = tick
            self.ticks.add(tick)
        elif channel in (TRADES, PORTFOLIO):
            self._count(channel, received)
            self.account_queue.put_nowait((channel, notification, raw, received))
            if channel == TRADES:
                self.halt_queue.put_nowait((channel, notification))
        elif channel in HALT_WATCH_CHANNELS:
            self._count(channel, received)
            self.halt_queue.put_nowait((channel, notification))
        elif channel == SYSTEM:  # the session acts on the reconnect notice
            self._count(channel, received)
        # else: a late message of a channel just unsubscribed — nothing to do

    def on_garbage(self, raw: str, reason: str, received: float) -> None:
        self._count("<unparsed>", received)
        self.ticks.deadletter("thalex:websocket", f"websocket@{received:.6f}", raw, reason)

    # The account worker (one item at a time, in order)

    async def on_connected(self, link: Connection) -> None:
        """Bootstrap on the worker (behind anything it still holds, ahead of the live feed)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.account_queue.put_nowait(("<bootstrap>", (link, done), "", time.time()))
        await done

    async def _account_worker(self) -> None:
        while True:
            raise_if_cancelled()  # see TickWriter.run
            item: tuple[str, Any, str, float] | None = None
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                async with asyncio.timeout(FOLLOW_INTERVAL_SECONDS):
                    item = await self.account_queue.get()
            except TimeoutError:
                pass  # time to re-check the flat-since timers
            link = self.session.connection if self.session is not None else None
            try:
                if item is not None:
                    channel, notification, raw, received = item
                    if channel == "<bootstrap>":
                        link, done = notification
                        await self._bootstrap_into(link, done)
                        continue
                    await self._on_account(channel, notification, raw, received)
                if link is not None and not link.closed and self.session is not None and self.session.ready:
                    await self.sync_subscriptions(link)
                    if self.history_recheck_at is not None and time.time() >= self.history_recheck_at:
                        await self.read_history_again(link)
                    if self.portfolio_reread_at is not None and time.time() >= self.portfolio_reread_at:
                        await self.read_portfolio_again(link)
            except ConnectionLost as exc:  # the session reconnects; its bootstrap catches up
                log.info("account worker: %s", exc)
            except ThalexError as exc:
                log.warning("account worker: %s", exc)
            except RedisError as exc:
                raise_if_cancelled()
                # What could not be written is still on the exchange: a new connection's gap fill
                # publishes it (once) as soon as Redis answers again.
                log.error("account worker: Redis failed (%s); re-connecting to fill the gap", exc)
                if self.session is not None:  # with backoff: Redis refusing every write must not make it spin
                    self.session.reconnect(f"Redis failed: {exc}")
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    async def read_history_again(self, link: Connection) -> None:
        """The second read of the trade history (see `bootstrap`): done only once it succeeded.

        It exists for a trade made just before a disconnect and missing from the first gap fill; a
        refusal by the exchange (error 3, 10, 20 ...) must not cancel it, so it is tried again with
        backoff. A lost connection leaves it to the next connection's bootstrap, which re-arms it.
        """
        log.info("reading the trade history again (trades appear in it with a delay)")
        try:
            await self.gap_fill(link)
        except ThalexError as exc:
            wait = self.history_retry_seconds
            self.history_retry_seconds = min(wait * 2, max(self.settings.ingest.history_recheck_seconds,
                                                           HISTORY_RETRY_FIRST_SECONDS))
            self.history_recheck_at = time.time() + wait
            log.warning("the second read of the trade history failed (%s); trying again in %.1f s", exc, wait)
            return
        self.history_recheck_at = None
        self.history_retry_seconds = HISTORY_RETRY_FIRST_SECONDS

    async def read_portfolio_again(self, link: Connection) -> None:
        """Read the whole portfolio while the view is incomplete: it is complete once it reads cleanly."""
        log.info("reading the portfolio again (%s)", self.portfolio_view.why_incomplete())
        self.portfolio_reread_at = time.time() + self.portfolio_reread_seconds  # again, whatever happens
        received = time.time()
        lines = await link.request("portfolio")
        await self.on_portfolio(lines, None, received, complete=True)

    async def _on_account(self, channel: str, notification: Any, raw: str, received: float) -> None:
        if channel == TRADES:
            await self.on_trades(notification, raw, received, f"thalex:{TRADES}", gap=False)
        else:
            await self.on_portfolio(notification, raw, received)

    async def _bootstrap_into(self, link: Connection, done: asyncio.Future[None]) -> None:
        try:
            await self.bootstrap(link)
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            if not done.done():
                done.set_result(None)

    async def bootstrap(self, link: Connection) -> None:
        """After every login: private feeds first (nothing slips between), then the gap fill."""
        # A new connection holds no public channel and no book view: start from nothing.
        self.channels.clear()
        self.refusals.clear()
        self.books.clear()
        self.portfolio_snapshot_due = True
        await self.subscribe_private(link)
        await self.load_instruments(link)
        received = time.time()
        lines = await link.request("portfolio")
        await self.on_portfolio(lines, None, received, complete=True)
        await self.gap_fill(link)
        # Thalex lists trades in the history with a slight delay: one made just before this
        # connection (its live notification lost with the old one) can be missing above.
        self.history_recheck_at = time.time() + self.settings.ingest.history_recheck_seconds
        await self.sync_subscriptions(link)
        for channel in list(LAST_MESSAGE):  # followed before the reconnect, not any more
            if channel not in self.channels and channel not in (TRADES, PORTFOLIO, SYSTEM, "<unparsed>",
                                                                *HALT_WATCH_CHANNELS):
                del LAST_MESSAGE[channel]

    async def subscribe_private(self, link: Connection) -> None:
        """Subscribe the account's channels; one left out of the answer ends this connection.

        Why a reconnect and not a retry on this connection: ingest's promise that no fill slips
        between the live feed and the catch-up rests on the bootstrap's order — subscribe, then
        `private/portfolio`, then the trade history from the checkpoint. A channel subscribed later
        would need that whole sequence again, which is what a new connection runs. The session's
        backoff grows while no connection gets set up, so a refusal that lasts never spins, and
        nothing is published from a connection that cannot see the account's fills or positions.
        /health (`subscriptions`) names the channel until a connection holds it.
        """
        refused = await subscribe(link, PRIVATE_CHANNELS, private=True)
        now = time.time()
        for channel in refused:
            REFUSED_CHANNELS.labels("private").inc()
            if channel not in self.private_refused:
                self.private_refused[channel] = now
                log.warning("the exchange left %s (the account's %s) out of its subscribe answer: "
                            "reconnecting with backoff until it is held", channel,
                            PRIVATE_MEANING[channel])
        for channel in [c for c in self.private_refused if c not in refused]:
            log.info("%s held again after %.0f s", channel, now - self.private_refused.pop(channel))
        if refused:
            raise ChannelsRefused("private_subscribe", refused)

    async def gap_fill(self, link: Connection) -> None:
        """Page `private/trade_history` (ascending) from the checkpoint; publish what is new."""
        checkpoint = await self.fills.checkpoint()
        time_low = self.since if checkpoint is None else max(self.since, checkpoint - HISTORY_OVERLAP_SECONDS)
        bookmark: str | None = None
        while True:
            result = await link.request("trade_history", limit=HISTORY_PAGE, time_low=time_low,
                                        sort=Sort.ASC, bookmark=bookmark)
            received = time.time()
            if not isinstance(result, dict):
                await self.bus.deadletter("thalex:private/trade_history", f"history@{received:.6f}",
                                          json.dumps(result), "result: expected an object with trades")
                return
            await self.on_trades(result.get("trades"), None, received, "thalex:private/trade_history",
                                 gap=True)
            bookmark = result.get("bookmark")
            if not bookmark:
                return

    async def on_trades(self, trades: Any, raw: str | None, received: float, source: str, gap: bool) -> None:
        """Translate, drop pre-start history, publish once; follow what traded."""
        try:
            items = as_list(trades, "trades")
        except MalformedMessage as exc:
            await self.bus.deadletter(source, f"trades@{received:.6f}", raw or json.dumps(trades), str(exc))
            return
        fills: list[Fill] = []
        for item in items:
            try:
                fill = fill_from_trade(item, received)
            except MalformedMessage as exc:  # a real trade refused: say so loudly
                trade_id = item.get("trade_id") if isinstance(item, dict) else None
                REFUSED_TRADES.labels("unbookable" if isinstance(exc, UnbookableTrade) else "malformed").inc()
                log.error("trade %s refused, dead-lettered (%s); the position heals by reconciliation with "
                          "the exchange's portfolio", trade_id, exc)
                await self.bus.deadletter(source, str(trade_id or f"trade@{received:.6f}"),
                                          json.dumps(item), str(exc))
                continue
            for surprise in unrecognised(item):  # published all the same: never lost for a word
                log.warning("trade %s: unknown %s", fill.trade_id, surprise)
            if fill.exchange_ts >= self.since:
                fills.append(fill)
        new = await self.fills.publish(fills)
        if gap:
            GAP_FILLED.inc(len(new))
        for fill in new:
            self.follow.on_fill(fill.instrument, fill.position_after, received)

    async def on_portfolio(self, lines: Any, raw: str | None, received: float,
                           complete: bool | None = None) -> None:
        """Merge the lines into the account's portfolio, line by line; publish the whole view when it is.

        A line that cannot be read is dead-lettered alone (the others are merged); until a readable
        line for its instrument arrives the view is incomplete: not published, `/health` red, and
        `private/portfolio` read again every `portfolio_reread_seconds` (see `portfolio_view`).
        """
        if complete is None:  # the first notification after subscribing is the full portfolio
            complete, self.portfolio_snapshot_due = self.portfolio_snapshot_due, False
        view = self.portfolio_view
        merged = view.merge(lines, whole=complete)
        for refused in merged.refused:
            REFUSED_PORTFOLIO_LINES.inc()
            name = refused.instrument or UNNAMED
            log.error("portfolio line of %s refused, dead-lettered (%s); tp:positions is withheld until a "
                      "readable line for it arrives", name, refused.reason)
            text = raw if refused.line is lines and raw else json.dumps(refused.line)
            entry_id = f"{refused.instrument or 'portfolio'}@{received:.6f}"
            await self.bus.deadletter(f"thalex:{PORTFOLIO}", entry_id, text, refused.reason)
        if view.complete:
            self.portfolio_reread_at = None
            doc = positions_from_portfolio(view.lines.values(), exchange_ts=received, ingest_ts=time.time())
            await self.bus.publish(self.names.positions, doc)
            PUBLISHED.labels(self.names.positions).inc()
        else:
            if self.portfolio_reread_at is None:  # said once as it turns incomplete, not per message
                self.portfolio_reread_at = time.time() + self.portfolio_reread_seconds
                log.warning("portfolio incomplete, tp:positions withheld: %s", view.why_incomplete())
        self.follow.on_portfolio(((e.instrument, e.position) for e in merged.read), received,
                                 merged.absent_is_flat,
                                 unreadable=[r.instrument for r in merged.refused if r.instrument])

    # Who breaks a halt (services/ingest/violations.py)

    async def _halt_worker(self) -> None:
        """Judge the account's notifications against `tp:halt`, one at a time, in arrival order.

        Best effort next to the fills: a Redis failure here is logged and the watch goes on with
        the next notification (the exchange's own records still hold what happened)."""
        while True:
            raise_if_cancelled()  # see TickWriter.run
            channel, notification = await self.halt_queue.get()
            try:
                await self.watch_halt(channel, notification)
            except RedisError as exc:
                raise_if_cancelled()
                log.error("judging %s against tp:halt failed (Redis: %s); not reported", channel, exc)
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    async def watch_halt(self, channel: str, notification: Any) -> None:
        """Report on `tp:reports` whatever on the account is not the guardian's while `tp:halt` is set.

        `tp:halt` is read only when a notification shows something that is not the guardian's.
        """
        seen = list(sightings(channel, notification, self.order_memory))
        if not seen:
            return
        raw: Any = await self.bus.redis.hgetall(self.names.halt)
        try:
            halt = halt_from_hash(raw)
        except ValidationError as exc:
            log.error("tp:halt is unreadable (%s); %d order(s)/trade(s) on %s not judged", exc, len(seen),
                      channel)
            return
        now = time.time()
        found = self.halt_watch.violations(halt, seen, now)
        if not found or halt is None:
            return
        reports = [Report(command_id=halt.command_id or f"halt@{halt.since:.6f}",
                          status=ReportStatus.HALT_VIOLATION, violation=v, ts=now) for v in found]
        async with self.bus.redis.pipeline(transaction=False) as pipe:
            for report in reports:
                self.bus.queue_publish(pipe, self.names.reports, report)
            await pipe.execute()
        for violation in found:
            HALT_VIOLATIONS.labels(violation.kind.value).inc()
            log.warning("halt (%s) broken: %s", halt.reason, violation.describe())

    # Instruments and subscriptions

    async def load_instruments(self, link: Connection) -> None:
        """`public/instruments` → the `tp:instruments` hash (every active instrument)."""
        listed = await link.request("instruments")
        try:
            items = as_list(listed, "public/instruments result")
        except MalformedMessage as exc:
            await self.bus.deadletter("thalex:public/instruments", f"instruments@{time.time():.6f}",
                                      json.dumps(listed), str(exc))
            return
        await self._store_instruments(items, "public/instruments")

    async def _store_instruments(self, items: Iterable[Any], source: str) -> None:
        infos: dict[str, InstrumentInfo] = {}
        for item in items:
            try:
                name, info = instrument_info(item)
            except MalformedMessage as exc:
                await self.bus.deadletter(f"thalex:{source}", f"instrument@{time.time():.6f}",
                                          json.dumps(item), str(exc))
                continue
            infos[name] = info
            if info.type is InstrumentType.OPTION:
                self.follow.note_option(name, info.underlying)
        if infos:
            await self.bus.redis.hset(self.names.instruments,
                                      mapping={n: encode_document(i) for n, i in infos.items()})
            PUBLISHED.labels(self.names.instruments).inc(len(infos))
            self.known_instruments.update(infos)

    async def sync_subscriptions(self, link: Connection) -> None:
        """Make the exchange's subscriptions match what is followed now."""
        now = time.time()
        wanted = self.follow.wanted(now)
        unknown = sorted({target for feed, target in wanted.values() if feed is not Feed.INDEX}
                         - self.known_instruments)
        for name in unknown:  # e.g. expired instruments still in a position
            try:
                item = await link.request("instrument", name)
            except ThalexError as exc:
                log.warning("no metadata for %s: %s", name, exc.message)
                self.known_instruments.add(name)  # do not ask again on this connection
                continue
            await self._store_instruments([item], "public/instrument")
        self.refusals.keep_only(wanted)
        plan = self.follow.plan(now, self.channels)
        if plan.unsubscribe:
            for channel in plan.unsubscribe:
                _, instrument = self.channels.pop(channel)
                LAST_MESSAGE.pop(channel, None)  # no longer followed: its silence is no news
                if channel.startswith("book."):
                    self.books.pop(instrument, None)
            await link.request("unsubscribe", plan.unsubscribe)
            log.info("unsubscribed %s", ", ".join(plan.unsubscribe))
        due = [c for c in plan.subscribe if self.refusals.due(c, self.follow.guards(*wanted[c]), now)]
        if due:
            await self._subscribe(link, due, wanted)

    async def _subscribe(self, link: Connection, channels: list[str],
                         wanted: dict[str, tuple[Feed, str]]) -> None:
        """Register first (the snapshot can arrive right behind the answer), then subscribe.

        What the answer leaves out is refused (api.yaml: the call succeeds even when no channel
        was valid) and dropped again; the others go through (`refusals.py`: a feed of an open
        position is asked for again with backoff, any other not on this connection).
        """
        for channel in channels:
            self.channels[channel] = wanted[channel]
            self.subscribed_at[channel] = time.time()
            if wanted[channel][0] is Feed.BOOK:
                self.books[wanted[channel][1]] = Book()
        try:
            refused = await subscribe(link, channels, private=False)
        except ThalexError as exc:  # not how Thalex refuses a channel, but an exchange may
            if len(channels) == 1:
                self._refuse(channels[0], wanted[channels[0]], exc.message)
                return
            for channel in channels:  # find the one(s) it refused
                self.channels.pop(channel, None)
            for channel in channels:
                await self._subscribe(link, [channel], wanted)
            return
        for channel in refused:
            self._refuse(channel, wanted[channel], "left out of the subscribe answer")
        held = [c for c in channels if c not in refused]
        for channel in held:
            refusal = self.refusals.held(channel)
            if refusal is not None:
                log.info("%s held after %d refusal(s) in %.0f s", channel, refusal.attempts,
                         time.time() - refusal.since)
        if held:
            log.info("subscribed %s", ", ".join(held))

    def _refuse(self, channel: str, fed: tuple[Feed, str], why: str) -> None:
        """Drop a channel the exchange did not subscribe; say so once per connection."""
        feed, target = fed
        self.channels.pop(channel, None)
        if feed is Feed.BOOK:
            self.books.pop(target, None)
        REFUSED_CHANNELS.labels("public").inc()
        if self.refusals.refuse(channel, feed, target, time.time()):
            guarding = self.follow.guards(feed, target)
            then = ("a feed of an open position: asking again with backoff" if guarding
                    else "not asked for again on this connection")
            log.warning("the exchange refused %s (%s); %s", channel, why, then)


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> Ingest:
    """Ingest consumes no stream: it only publishes, so `consumer_name` is unused."""
    return Ingest(settings, bus, health)


def main(argv: list[str]) -> int:
    return service_main(SERVICE, argv, build, lambda s: s.metrics.ingest_port)


__all__ = ["Ingest", "build", "main"]
