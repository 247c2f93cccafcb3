"""The portfolio service's shell: fills, ticks, positions and reports in; snapshots out.

All money logic is in `ledger.py`. This shell keeps the ledger in Redis in the
same transaction as the acks of the entries that changed it, so after a kill -9
the restarted service re-reads exactly the entries the checkpoint lacks and
its next snapshot equals the one an uninterrupted run would give:

* `<ns>:portfolio:ledger` — the accounting state (positions, epoch, trade ids
  seen, drift), rewritten when a fill, position report or epoch change alters it;
* `<ns>:portfolio:ticks` — hash instrument → latest tick, updated only for the
  instruments a batch touched (ticks are the hot path);
* `<ns>:portfolio:seq` — the last snapshot sequence number.

Under a burst the bus hands batches (`[portfolio] batch_size`); one snapshot is
published per batch, with the latest state, so lag stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict
from typing import Any, cast

import pydantic_core
from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline

from services.common.bus import (
    Bus,
    Delivery,
    Handler,
    MalformedEntry,
    encode_document_bytes,
    validate_entry,
)
from services.common.config import Settings
from services.common.contracts import (
    Fill,
    InstrumentInfo,
    InstrumentType,
    Positions,
    Report,
    ReportStatus,
    Snapshot,
    Tick,
)
from services.common.reference import ReferenceReader
from services.common.service import Health, Unhealthy, run_timer, service_main
from services.common.snapshots import encode_snapshot
from services.portfolio.closures import (
    EPOCH_END_WAIT_SECONDS,
    Calibrations,
    EpochEnd,
    epoch_end_for,
    epoch_ends,
)
from services.portfolio.ledger import FillOutcome, Ledger, LedgerConfig
from services.portfolio.prices import PriceGuard

log = logging.getLogger(__name__)

NET_AFTER_CLOSE = Gauge(
    "tp_portfolio_net_after_close_usd", "Net P&L of the epoch after estimated closing costs"
)
NET_PNL = Gauge("tp_portfolio_net_pnl_usd", "Net P&L of the epoch (gross minus fees paid)")
GROSS_PNL = Gauge("tp_portfolio_gross_pnl_usd", "Realised + unrealised + funding P&L of the epoch")
FEES_PAID = Gauge("tp_portfolio_fees_paid_usd", "Fees the exchange charged in this epoch")
EST_CLOSE_FEES = Gauge("tp_portfolio_est_close_fees_usd", "Estimated taker fees to close everything (raw)")
EST_SLIPPAGE = Gauge("tp_portfolio_est_slippage_usd", "Estimated cost of closing into the book against mark")
EPOCH = Gauge("tp_portfolio_epoch", "Current epoch")
OPEN_POSITIONS = Gauge("tp_portfolio_open_positions", "Instruments with a non-zero position")
INSTRUMENT_PNL = Gauge(
    "tp_portfolio_instrument_pnl_usd", "Gross P&L of one instrument in this epoch", ["instrument"]
)
STALE = Gauge("tp_portfolio_stale_instruments", "Open positions without a new mark for stale_after_seconds")
SUSPECT = Gauge("tp_portfolio_suspect_instruments", "Positions whose latest tick is held as implausible")
TICKS_HELD = Counter("tp_portfolio_ticks_held_total", "Ticks held back as implausible until confirmed")
DUST = Gauge("tp_portfolio_dust_positions",
             "Open positions no order can close (below the minimum order): valued, never closed")
SNAPSHOT_LATENCY = Histogram(
    "tp_portfolio_snapshot_latency_seconds",
    "From the newest input's ingest_ts to its snapshot being written",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1, 5),
)
BATCH_SIZE = Histogram("tp_portfolio_batch_entries", "Entries folded into one snapshot",
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
DRIFT_EVENTS = Counter("tp_portfolio_drift_events_total", "Positions on which ledger and exchange disagreed",
                       ["instrument"])
FILLS = Counter("tp_portfolio_fills_total", "Fills by what the ledger did with them", ["outcome"])
FUNDING_SETTLEMENTS = Counter("tp_portfolio_funding_settlements_total",
                              "Daily funding settlements booked (a perpetual position crossing 08:00 UTC)")
FEES_ESTIMATED = Gauge("tp_portfolio_fees_estimated_usd",
                       "Part of the epoch's fees paid that is estimated (trades that reported no fee)")
CLOSE_COST_ERROR = Gauge(
    "tp_portfolio_close_cost_error_usd",
    "Last closure: actual closing cost minus the estimate (> 0: estimate was optimistic)",
)
CLOSE_COST_ESTIMATED = Gauge("tp_portfolio_close_cost_estimated_usd", "Last closure: estimated closing cost")
CLOSE_COST_ACTUAL = Gauge(
    "tp_portfolio_close_cost_actual_usd", "Last closure: fees + slippage it really cost"
)

INSTRUMENT_RETRY_SECONDS = 5.0


class PortfolioService:
    """Feeds the ledger from the streams and checkpoints it with the acks."""

    def __init__(self, settings: Settings, bus: Bus, consumer_name: str) -> None:
        self.settings = settings
        self.bus = bus
        self.names = settings.names
        self.ledger_key = self.names.key("portfolio:ledger")
        self.ticks_key = self.names.key("portfolio:ticks")
        self.seq_key = self.names.key("portfolio:seq")
        self.config = LedgerConfig.from_settings(settings)
        self.ledger = Ledger(self.config)
        self.seq = 0
        self.last_snapshot: Snapshot | None = None
        self.unknown_instruments: set[str] = set()
        self.calibrations = Calibrations(self.config.fee_estimation_buffer)
        self.epoch_end: EpochEnd | None = None
        self._instrument_gauges: dict[str, Gauge] = {}
        self._last_instrument_retry = 0.0
        self.instrument_reader = ReferenceReader(bus, self.names.instruments, InstrumentInfo)
        self.prices = PriceGuard(settings.portfolio.suspect_price_move)
        """Holds an implausible tick back until the exchange confirms it (issue 21, item 5)."""
        self._suspects_shown: list[str] = []
        self._dust_shown: tuple[str, ...] = ()
        lock = asyncio.Lock()
        batch = settings.portfolio.batch_size
        consumers: list[tuple[str, type[Any], Handler[Any]]] = [
            (self.names.fills, Fill, self.on_fills),
            (self.names.ticks, Tick, self.on_ticks),
            (self.names.positions, Positions, self.on_positions),
            (self.names.reports, Report, self.on_reports),
        ]
        for stream, model, handler in consumers:
            bus.consumer(
                stream,
                "portfolio",
                consumer_name,
                model,
                handler,
                batch_size=batch,
                lock=lock,
                on_failure=self.load,
            )
        self.lock = lock

    async def load(self) -> None:
        """Restore the checkpoint; on a first start, seed from the exchange's last portfolio.

        Also called after a failed batch, to forget what it changed in memory.
        """
        redis = self.bus.redis
        raw, ticks, seq = await asyncio.gather(
            redis.get(self.ledger_key), redis.hgetall(self.ticks_key), redis.get(self.seq_key)
        )
        self.seq = int(seq or 0)
        self.prices = PriceGuard(self.settings.portfolio.suspect_price_move)
        if raw:
            state = json.loads(raw)
            state["ticks"] = {k.decode(): json.loads(v) for k, v in cast(dict[bytes, bytes], ticks).items()}
            for name, info in state["instruments"].items():
                self.prices.set_type(name, InstrumentType(info["type"]))
            for tick in state["ticks"].values():  # what was applied was plausible
                self.prices.trust(Tick.model_validate(tick))
            pending = state.pop("epoch_end", None)
            self.epoch_end = None if pending is None else EpochEnd(**pending)
            self.ledger = Ledger.from_state(state, self.config)
            log.info(
                "restored ledger: epoch %d, %d positions, snapshot #%d",
                self.ledger.epoch,
                len(state["positions"]),
                self.seq,
            )
            return
        self.ledger = Ledger(self.config)
        self.epoch_end = None
        await self._load_instruments(None)
        latest = await redis.xrevrange(self.names.positions, count=1)
        if latest:
            try:
                report = validate_entry(Positions, latest[0][1])
            except MalformedEntry as exc:  # the consumer dead-letters it; seed from the next one
                log.warning("first start: the latest tp:positions entry is unusable (%s); not seeded", exc)
                return
            self.ledger.seed_from_exchange(report, self.settings.portfolio.baseline, time.time())
            # checkpointed now, not with the next fill (which may be days away on a dated book): a
            # restart or a failed batch before it would seed again, re-dating every position (the
            # time limit pushed back) and, with `mark_at_start`, forgetting the losses since
            async with redis.pipeline(transaction=True) as pipe:
                self._save_ledger(pipe)
                await pipe.execute()
            log.info(
                "first start: seeded %d positions from the exchange (%s)",
                len(report.positions),
                self.settings.portfolio.baseline,
            )

    async def _load_instruments(self, names: set[str] | None) -> None:
        """Instrument metadata comes from ingest's `tp:instruments` hash.

        A bad value is dead-lettered and its instrument stays unknown (valued at the fallback fee
        rates, retried by the timer): it never fails the fill, tick or report being handled.
        """
        redis = self.bus.redis
        if names is None:
            listed = cast(dict[bytes, bytes], await redis.hgetall(self.names.instruments))
            raw: dict[str, bytes | str | None] = {k.decode(): v for k, v in listed.items()}
        else:
            ordered = sorted(names)
            values = await redis.hmget(self.names.instruments, ordered)
            raw = dict(zip(ordered, values, strict=True))
        items = await self.instrument_reader.documents(raw)
        for name, info in items.items():
            self.ledger.set_instrument(name, info)
            self.prices.set_type(name, info.type)
            self.unknown_instruments.discard(name)
        if names:
            self.unknown_instruments |= names - set(items)

    async def _know(self, instruments: set[str]) -> None:
        new = {
            i
            for i in instruments
            if not self.ledger.knows_instrument(i) and i not in self.unknown_instruments
        }
        if new:
            await self._load_instruments(new)

    async def on_ticks(self, batch: list[Delivery[Tick]], pipe: Pipeline) -> None:
        """Prices in; a snapshot only if one of them is of an instrument the snapshot values.

        Watch-list tickers (instruments never traded this epoch) are kept for later but change
        no figure: publishing would wake take-profit for nothing.
        """
        await self._know({d.doc.instrument for d in batch})
        changed: dict[str, Tick] = {}
        for delivery in batch:
            tick = self.prices.check(delivery.doc)
            if tick is None:
                self._held(delivery.doc.instrument)
            elif self.ledger.apply_tick(tick):
                changed[tick.instrument] = tick
        if changed:
            pipe.hset(
                self.ticks_key, mapping={n: encode_document_bytes(t) for n, t in changed.items()}
            )
        if self._settlements():  # a tick of a new day settled funding: that is accounting
            self._save_ledger(pipe)
        if any(self.ledger.moves_snapshot(n) for n in changed) or self._suspects() != self._suspects_shown:
            self._publish_snapshot(pipe, len(batch))

    def _held(self, instrument: str) -> None:
        held = self.prices.held[instrument]
        TICKS_HELD.inc()
        if instrument not in self._suspects_shown:
            log.warning("price of %s held as suspect until the exchange confirms it: %s", instrument,
                        held.reason)

    def _suspects(self) -> list[str]:
        """Instruments of the snapshot whose latest tick is held (the snapshot's `suspect_instruments`)."""
        return [name for name in self.prices.suspects if self.ledger.moves_snapshot(name)]

    async def on_fills(self, batch: list[Delivery[Fill]], pipe: Pipeline) -> None:
        await self._know({d.doc.instrument for d in batch})
        for delivery in batch:
            outcome = self.ledger.apply_fill(delivery.doc)
            FILLS.labels(outcome.value).inc()
            if outcome is FillOutcome.BEFORE_HORIZON:
                self.bus.queue_deadletter(
                    pipe,
                    self.names.fills,
                    delivery.entry_id,
                    delivery.doc.model_dump_json(),
                    "fill older than the de-duplication horizon: refused, "
                    "reconciliation with the exchange will heal the position",
                )
            elif outcome is FillOutcome.DUPLICATE:
                log.info("duplicate fill %s ignored", delivery.doc.trade_id)
        self._settlements()
        self._end_epoch_when_flat(pipe)
        self._save_ledger(pipe)
        self._publish_snapshot(pipe, len(batch))

    def _settlements(self) -> bool:
        """Log the daily funding settlements the ledger booked; whether there were any."""
        settled = self.ledger.take_settlements()
        for s in settled:
            FUNDING_SETTLEMENTS.inc()
            log.info(
                "funding of %s settled at %s: funding mark %.10g, position %s, %+.6f USD realised%s",
                s.instrument,
                s.settled_ts,
                s.funding_mark,
                s.position,
                s.realized,
                f" ({s.periods - 1} day(s) without any input: their funding is not counted)"
                if s.periods > 1
                else "",
            )
        return bool(settled)

    async def on_positions(self, batch: list[Delivery[Positions]], pipe: Pipeline) -> None:
        """Reconcile with the exchange; checkpoint and publish only when that changed something.

        The exchange's portfolio arrives often (its lines carry marks: the paper exchange sends it
        with every mark change), and most reports agree with the ledger: republishing the same
        figures would wake take-profit for nothing, at the very moment a move is acted on.
        """
        now = time.time()
        await self._know({p.instrument for d in batch for p in d.doc.positions})
        known = {d.instrument for d in (self.last_snapshot.drift if self.last_snapshot else [])}
        before = self.ledger.reconciliation_state()
        for delivery in batch:
            for drift in self.ledger.reconcile(delivery.doc, now):
                if drift.instrument not in known:
                    known.add(drift.instrument)
                    DRIFT_EVENTS.labels(drift.instrument).inc()
                    log.warning(
                        "DRIFT %s: ledger %s, exchange %s since %.3f; the exchange's position is adopted",
                        drift.instrument,
                        drift.ledger_position,
                        drift.exchange_position,
                        drift.since,
                    )
        settled = self._settlements()
        if self.ledger.reconciliation_state() == before and not settled:
            return
        self._save_ledger(pipe)
        self._publish_snapshot(pipe, len(batch))

    async def on_reports(self, batch: list[Delivery[Report]], pipe: Pipeline) -> None:
        """Calibrate the close-cost estimate; a full closure's `completed` ends the epoch.

        Only that changes the ledger: the other reports (`received`, `order_sent`, ... — they
        arrive while the executor is closing) neither checkpoint nor publish.
        """
        epoch_end = self.epoch_end
        for delivery in batch:
            report = delivery.doc
            self._calibrate(report)
            # the closing fills may still be on their way: the epoch ends when they are in
            self.epoch_end = epoch_end_for(report, self.ledger.epoch, time.time()) or self.epoch_end
        if self.epoch_end is epoch_end:
            return
        self._end_epoch_when_flat(pipe)
        self._save_ledger(pipe)
        self._publish_snapshot(pipe, len(batch))

    def _end_epoch_when_flat(self, pipe: Pipeline, now: float | None = None) -> None:
        """Advance the epoch once the ledger is flat (or the wait for the closing fills ran out)."""
        end = self.epoch_end
        if end is None:
            return
        now = time.time() if now is None else now
        flat = self.ledger.is_flat()
        if not epoch_ends(end, flat, now):
            return
        dust = self.ledger.dust()
        if not flat and dust and self.ledger.is_flat(ignoring=dust):
            log.info("closure %s: only dust is left (%s): epoch %d begins with it", end.command_id,
                     ", ".join(dust), end.epoch + 1)
        elif not flat:
            log.warning(
                "closure %s: the ledger is not flat %.0f s after `completed`; starting epoch %d anyway "
                "(reconciliation with the exchange heals the rest)",
                end.command_id,
                EPOCH_END_WAIT_SECONDS,
                end.epoch + 1,
            )
        self._publish_snapshot(pipe, 0)  # the closed epoch's final figures: what was banked
        if self.ledger.advance_epoch(now, end.epoch):
            log.info("closure %s completed: epoch %d begins", end.command_id, self.ledger.epoch)
        self.epoch_end = None

    def _calibrate(self, report: Report) -> None:
        """Compare what closing was estimated to cost with what the executor's fills cost."""
        last = self.last_snapshot
        if report.status is ReportStatus.RECEIVED and last is not None:  # the rows of that moment
            last = last.model_copy(update={"full": True, "positions": self.ledger.rows()})
        check = self.calibrations.on_report(report, last)
        if check is None:
            return
        CLOSE_COST_ESTIMATED.set(check.estimated)
        CLOSE_COST_ACTUAL.set(check.actual)
        CLOSE_COST_ERROR.set(check.error)
        log.info(
            "closure %s cost %.6f USD against an estimate of %.6f (error %+.6f): tune "
            "fee_estimation_buffer from this",
            report.command_id,
            check.actual,
            check.estimated,
            check.error,
        )

    def _save_ledger(self, pipe: Pipeline) -> None:
        state = self.ledger.to_state(with_ticks=False)
        state["epoch_end"] = None if self.epoch_end is None else asdict(self.epoch_end)
        # pydantic-core's encoder: 2.9 ms instead of json.dumps' 10.3 ms for 1,000 instruments and
        # 10,000 remembered trade ids; "constants" writes NaN/Infinity as json.dumps does
        pipe.set(self.ledger_key, pydantic_core.to_json(state, inf_nan_mode="constants"))

    def _publish_snapshot(self, pipe: Pipeline, entries: int) -> None:
        """Queue the next snapshot (full when due, else the changed rows) and the rows' hash with it.

        `<ns>:snapshot:positions` holds every current row, written in the same transaction as the
        snapshot entry (and the acks), so a reader that starts or missed an entry reads the hash and
        the newest entry together and folds on from there (`services.common.snapshots`).
        """
        now = time.time()
        self.seq += 1
        snapshot = self.ledger.publish(self.seq, now, self.settings.portfolio.stale_after_seconds)
        suspects = self._suspects()
        held_open = [name for name in suspects if self.ledger.position(name) != 0.0]
        if held_open:
            snapshot = snapshot.model_copy(update={"suspect_instruments": held_open})
        if suspects != self._suspects_shown:
            cleared = set(self._suspects_shown) - set(suspects)
            if cleared:
                log.info("prices of %s plausible again (confirmed, or back in line)",
                         ", ".join(sorted(cleared)))
            self._suspects_shown = suspects
            SUSPECT.set(len(suspects))
        self._say_dust(snapshot)
        pipe.set(self.seq_key, self.seq)
        texts = [encode_document_bytes(p) for p in snapshot.positions]
        rows = {p.instrument: text for p, text in zip(snapshot.positions, texts, strict=True)}
        if snapshot.full:
            pipe.delete(self.names.snapshot_positions)
        if rows:
            pipe.hset(self.names.snapshot_positions, mapping=rows)  # type: ignore[arg-type]
        self.bus.queue_publish_encoded(
            pipe, self.names.snapshots, encode_snapshot(snapshot, texts),
            maxlen=self.settings.redis.snapshot_maxlen,
        )
        self.last_snapshot = snapshot
        BATCH_SIZE.observe(entries)
        if snapshot.last_input_ts is not None:
            SNAPSHOT_LATENCY.observe(max(0.0, now - snapshot.last_input_ts))
        self._export(snapshot)

    def _say_dust(self, snapshot: Snapshot) -> None:
        """Say once when a position becomes dust (and when it stops being dust): the trader must know
        the guardian holds something it will not close, and why no closure follows."""
        dust = tuple(snapshot.dust or ())
        if dust == self._dust_shown:
            return
        new = [name for name in dust if name not in self._dust_shown]
        gone = [name for name in self._dust_shown if name not in dust]
        if new:
            log.warning("DUST the guardian cannot close: %s — below what an order may close; it stays "
                        "valued in the P&L, but the time limit and the expiry rule ignore it and no "
                        "closure is decided on it alone (close it by trading it up, or let it expire)",
                        "; ".join(self.ledger.dust_words(name) for name in new))
        if gone:
            log.info("no longer dust (closed, or grown into a position an order can close): %s",
                     ", ".join(gone))
        self._dust_shown = dust
        DUST.set(len(dust))

    def _export(self, snap: Snapshot) -> None:
        NET_AFTER_CLOSE.set(snap.net_after_close)
        NET_PNL.set(snap.net_pnl)
        GROSS_PNL.set(snap.gross_pnl)
        FEES_PAID.set(snap.fees_paid)
        FEES_ESTIMATED.set(snap.fees_estimated or 0.0)
        EST_CLOSE_FEES.set(snap.est_close_fees)
        EST_SLIPPAGE.set(snap.est_slippage)
        EPOCH.set(snap.epoch)
        OPEN_POSITIONS.set(snap.open_positions)
        STALE.set(len(snap.stale_instruments))
        if snap.full:
            held = {p.instrument for p in snap.positions}
            for gone in set(self._instrument_gauges) - held:  # closed out: no stale line on the dashboard
                INSTRUMENT_PNL.remove(gone)
                del self._instrument_gauges[gone]
        for p in snap.positions:
            gauge = self._instrument_gauges.get(p.instrument)
            if gauge is None:
                gauge = self._instrument_gauges[p.instrument] = INSTRUMENT_PNL.labels(p.instrument)
            gauge.set(p.realized_pnl + p.unrealized_pnl + p.funding_pnl)

    async def run(self) -> None:
        """Idle work, every second or so (see `on_timer`)."""
        interval = min(1.0, self.settings.portfolio.stale_after_seconds / 2)
        await run_timer("portfolio", interval, self.bus, self.lock, self.on_timer, self.load)

    async def prices_fresh(self) -> bool:
        """Health: every open position has a mark younger than `stale_after_seconds`, and plausible.

        Stale or suspect prices leave the profit barriers waiting (take-profit decides nothing on
        them): the portfolio is not doing its job, whatever the reason upstream.
        """
        stale_after = self.settings.portfolio.stale_after_seconds
        stale = self.ledger.stale_instruments(time.time(), stale_after)
        if stale:
            shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
            raise Unhealthy("prices stale", f"no new mark within {stale_after:g} s for {shown}")
        suspects = self._suspects()
        if suspects:
            reasons = "; ".join(f"{name}: {self.prices.held[name].reason}" for name in suspects[:5])
            raise Unhealthy("prices suspect", f"held until the exchange confirms them: {reasons}")
        return True

    async def on_timer(self, now: float) -> None:
        """A snapshot when prices go stale without input, late instrument metadata, an overdue epoch end."""
        learned = False
        if self.unknown_instruments and now - self._last_instrument_retry > INSTRUMENT_RETRY_SECONDS:
            self._last_instrument_retry = now
            missing, self.unknown_instruments = set(self.unknown_instruments), set()
            await self._load_instruments(missing)
            learned = self.unknown_instruments != missing
        if self.epoch_end is not None and now >= self.epoch_end.deadline:
            async with self.bus.redis.pipeline(transaction=True) as pipe:
                self._end_epoch_when_flat(pipe, now)
                self._save_ledger(pipe)
                self._publish_snapshot(pipe, 0)
                await pipe.execute()
            return
        # the idle loop only compares the stale list: no full O(n) snapshot every second
        stale = self.ledger.stale_instruments(now, self.settings.portfolio.stale_after_seconds)
        stale_changed = self.last_snapshot is None or stale != self.last_snapshot.stale_instruments
        if learned or stale_changed:
            async with self.bus.redis.pipeline(transaction=True) as pipe:
                self._publish_snapshot(pipe, 0)
                await pipe.execute()


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> PortfolioService:
    """Wire the service to the bus; it restores its checkpoint before any entry is handled."""
    service = PortfolioService(settings, bus, consumer_name)
    bus.before_start.append(service.load)
    health.add("prices", service.prices_fresh)
    return service


def main(argv: list[str]) -> int:
    return service_main("portfolio", argv, build, lambda s: s.metrics.portfolio_port)
