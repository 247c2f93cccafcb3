"""The take-profit service's shell: snapshots, controls and reports in; commands and halt out.

All decision logic is in `rules.py`. This shell keeps three things in Redis,
always written in the same transaction as the ack of the input that changed
them, so a kill -9 at any moment can neither lose a decision nor make a second
one for the same trigger:

* `<ns>:takeprofit:state` — the engine's memory (`RulesEngine.to_state()`);
* `<ns>:takeprofit:lease` — the closure in flight (value: command id). It
  expires only after the command's deadline plus a margin, survives a restart
  of this service, and is released by the executor's `completed`/`failed`
  report for that command;
* `<ns>:halt` — what quoters read: present while a closure runs, during the
  cool-down, during an operator halt, and after a failed closure until
  `thalex-tp resume` (the failure keeps quoters down until a human looks).

Every command is signed (`services.common.signing`, `[commands] signing_key_file`, required:
without it the service exits 2): the executor acts only on commands it can tie to take-profit.
The operator's `close_all` comes here as a control and leaves as a signed command like any other.

Runs as a single replica: two deciders would race for one lease. Being the only
writer of the lease and of the failed-closure halt, the service mirrors both in
memory (`lease_held`, `failed`) instead of asking Redis on every snapshot: the
mirrors change with the transaction that writes the keys, are reloaded with the
engine after a failed transaction, and are re-read from Redis by the timer every
`check_interval_seconds` (a Redis restart that lost a key is noticed there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline

from services.common.bus import Bus, Delivery
from services.common.config import Settings
from services.common.contracts import (
    CloseReason,
    Control,
    ControlAction,
    Halt,
    InstrumentInfo,
    Report,
    ReportStatus,
    Snapshot,
    cancel_only,
    halt_to_hash,
)
from services.common.reference import ReferenceReader
from services.common.service import Health, Unhealthy, run_timer, service_main
from services.common.signing import require_command_key, signed_text
from services.common.snapshots import Fold, read_view
from services.takeprofit.answers import EXPIRED, NOT_CLOSABLE, answer_control, expired
from services.takeprofit.rules import Decision, External, RulesEngine, build_command, freshness_problem

log = logging.getLogger(__name__)

DECISIONS = Counter("tp_takeprofit_decisions_total", "Closures decided, by reason", ["reason"])
SNAPSHOT_TO_COMMAND = Histogram(
    "tp_takeprofit_snapshot_to_command_seconds", "From the snapshot's timestamp to the command being written",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5),
)
LEASE_HELD = Gauge("tp_takeprofit_lease_held", "1 while a closure is in flight")
HALT_ACTIVE = Gauge("tp_takeprofit_halt_active", "1 while tp:halt is set (quoters stand down)")
BARRIER_DISTANCE = Gauge(
    "tp_takeprofit_barrier_distance", "How far each barrier is from firing (<= 0: holds); USD or seconds",
    ["barrier"],
)
CLOSURES_FINISHED = Counter(
    "tp_takeprofit_closures_finished_total", "Closures ended, by outcome", ["outcome"]
)
NET_AFTER_CLOSE = Gauge("tp_takeprofit_net_after_close_usd", "net_after_close of the last snapshot evaluated")
EXIT_COST_WARNING = Gauge(
    "tp_exit_cost_warning", "1 while the estimated exit cost alone exceeds the emergency stop or the target"
)
EXIT_COST = Gauge("tp_takeprofit_exit_cost_usd", "Estimated cost of closing now (net_pnl - net_after_close)")
BREAKER_OPEN = Gauge("tp_circuit_breaker_open", "1 while the circuit breaker against a fee loop is open")
REPEAT_CLOSURES = Gauge(
    "tp_takeprofit_repeat_closures", "Closures of positions rebuilt in a halt, in the breaker's window"
)
THRESHOLD = Gauge("tp_takeprofit_threshold_usd", "Configured money barriers", ["barrier"])

INSTRUMENT_REFRESH_SECONDS = 60.0
"""How often the cached volume tick sizes of instruments seen in decisions are re-read."""
LEASE_MARGIN_SECONDS = 10.0
"""The lease outlives the command's deadline by this much, so a late report still finds it."""
FAILED_HALT_REASON = "closure_failed"


class TakeProfitService:
    """Feeds the rules engine from the streams and writes its decisions back, atomically."""

    def __init__(self, settings: Settings, bus: Bus, consumer_name: str, *, command_key: bytes) -> None:
        self.settings = settings
        self.command_key = command_key
        """Signs every command (`services.common.signing`): the executor acts only on signed ones."""
        self.bus = bus
        self.names = settings.names
        self.state_key = self.names.key("takeprofit:state")
        self.lease_key = self.names.key("takeprofit:lease")
        self.failed_key = self.names.key("takeprofit:failed_closure")
        self.engine = RulesEngine(settings.portfolio_take_profit)
        self.lease_held = False
        """Mirror of the lease key (this service is its only writer)."""
        self.failed: Halt | None = None
        """Mirror of the failed-closure halt (this service is its only writer)."""
        self.volume_ticks: dict[str, float] = {}
        """Volume tick size per instrument (for the command's amounts); refreshed by the timer."""
        self._volume_ticks_read = 0.0
        self.exit_cost_warned = False
        """Whether the exit-cost warning was logged (it is logged as it starts and as it ends)."""
        self.instrument_reader = ReferenceReader(bus, self.names.instruments, InstrumentInfo)
        self.lock = asyncio.Lock()
        options: dict[str, Any] = {"lock": self.lock, "on_failure": self.load}
        bus.consumer(self.names.snapshots, "takeprofit", consumer_name, Snapshot, self.on_snapshots,
                     batch_size=50, **options)
        bus.consumer(self.names.control, "takeprofit", consumer_name, Control, self.on_controls, **options)
        bus.consumer(self.names.reports, "takeprofit", consumer_name, Report, self.on_reports, **options)
        tp = settings.portfolio_take_profit
        THRESHOLD.labels("take_profit").set(tp.min_profit_usd)
        THRESHOLD.labels("emergency_stop").set(tp.emergency_close_threshold)
        THRESHOLD.labels("partial_take_profit").set(tp.partial_profit_threshold)

    async def load(self) -> None:
        """Restore the engine and the mirrors from Redis (before any input, and after a failed batch)."""
        await self._read_mirrors()
        raw = await self.bus.redis.get(self.state_key)
        if not raw:
            self.engine = RulesEngine(self.settings.portfolio_take_profit)
        else:
            self.engine = RulesEngine.from_state(self.settings.portfolio_take_profit, raw)
        await self._read_view()
        if self.engine.in_flight is not None:
            log.info("resuming with closure %s in flight", self.engine.in_flight.command_id)

    async def run(self) -> None:
        """The timer: time barriers, cool-down end, and leases that ran out with no report."""
        interval = self.settings.portfolio_take_profit.check_interval_seconds
        await run_timer("takeprofit", interval, self.bus, self.lock, self.on_timer, self.load)

    async def _read_view(self) -> None:
        """Every position from the portfolio's rows hash and its newest snapshot (one transaction).

        The hash may be ahead of the snapshots still to handle: their rows are then already in
        the view (folding skips them) and their totals are decided on as they come.
        """
        self.engine.view, _ = await read_view(self.bus.redis, self.names)
        log.info("positions view read: %d rows at snapshot #%s", len(self.engine.view.rows),
                 self.engine.view.seq)

    async def _read_mirrors(self) -> None:
        self.lease_held = bool(await self.bus.redis.exists(self.lease_key))
        raw = await self.bus.redis.get(self.failed_key)
        self.failed = Halt.model_validate_json(raw) if raw else None

    async def snapshots_fresh(self) -> bool:
        """Health: the last snapshot prices every open position freshly, and is recent.

        Stale or suspect prices hold the profit barriers (the emergency stop decides on the last
        known or plausible prices); and with positions open, the portfolio publishes a snapshot on
        every tick of them, so silence longer than `stale_after_seconds` means it is not.
        """
        problem = freshness_problem(self.engine.last_snapshot, time.time(),
                                    self.settings.portfolio.stale_after_seconds, self.engine.view)
        if problem is not None:
            raise Unhealthy(*problem)
        return True

    def _external(self) -> External:
        return External(closure_in_flight=self.lease_held)

    async def on_snapshots(self, batch: list[Delivery[Snapshot]], pipe: Pipeline) -> None:
        now = time.time()
        external = self._external()
        for delivery in batch:
            if self.engine.view.fold(delivery.doc) is Fold.GAP:  # an entry never seen: re-read the rows
                log.warning("snapshot #%d does not follow #%s: re-reading the positions", delivery.doc.seq,
                            self.engine.view.seq)
                await self._read_view()
            decision = self.engine.on_snapshot(delivery.doc, now, external)
            if decision is not None:
                await self._write_decision(decision, pipe, now)
                SNAPSHOT_TO_COMMAND.observe(max(0.0, time.time() - delivery.doc.ts))
                external = External(closure_in_flight=True)
        if batch:
            NET_AFTER_CLOSE.set(batch[-1].doc.net_after_close)
            EXIT_COST.set(batch[-1].doc.net_pnl - batch[-1].doc.net_after_close)
            self._warn_exit_cost()
        self._write_state(pipe, now)

    def _warn_exit_cost(self) -> None:
        """Log the exit-cost warning once as it starts (and once as it ends); the gauge always."""
        warning = self.engine.exit_cost_warning()
        EXIT_COST_WARNING.set(0 if warning is None else 1)
        if warning is not None and not self.exit_cost_warned:
            log.warning("EXIT COST: %s; the emergency stop judges %s", warning.sentence(),
                        self.settings.portfolio_take_profit.emergency_stop_basis.value)
        elif warning is None and self.exit_cost_warned:
            log.info("exit cost back within the barriers")
        self.exit_cost_warned = warning is not None

    async def on_controls(self, batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        now = time.time()
        for delivery in batch:
            control = delivery.doc
            log.info("operator %s: %s", control.by, control.action.value)
            if expired(control, now):
                self._answer_control(pipe, delivery, None, None, now)
                continue
            failed_before = self.failed
            breaker_was_open = self.engine.breaker.is_open
            if control.action is ControlAction.RESUME:
                pipe.delete(self.failed_key)
                self.failed = None
            decision = self.engine.on_control(control, now, self._external())
            if breaker_was_open and not self.engine.breaker.is_open:
                log.warning("circuit breaker closed by %s: automatic closures resume", control.by)
            if decision is not None:
                await self._write_decision(decision, pipe, now)
            elif control.action is ControlAction.CLOSE_ALL:
                log.warning("close_all by %s refused: %s", control.by, self.engine.last_skip)
            self._answer_control(pipe, delivery, decision, failed_before, now,
                                 closed_breaker=breaker_was_open and not self.engine.breaker.is_open)
        self._write_state(pipe, now)

    def _answer_control(self, pipe: Pipeline, delivery: Delivery[Control], decision: Decision | None,
                        failed_before: Halt | None, now: float, *, closed_breaker: bool = False) -> None:
        """Queue take-profit's answer to one control (`tp:control:answers`, see answers.py)."""
        control = delivery.doc
        refusal = command_id = lifted = None
        if expired(control, now):
            refusal = EXPIRED
        elif control.action is ControlAction.CLOSE_ALL:
            in_flight = self.engine.in_flight
            if decision is not None and in_flight is not None and in_flight.command_id == decision.command_id:
                command_id = decision.command_id
            else:
                refusal = NOT_CLOSABLE if decision is not None else str(self.engine.last_skip or NOT_CLOSABLE)
        elif control.action is ControlAction.RESUME and failed_before is not None:
            lifted = failed_before.command_id
        halt_after = self.engine.halt_document(now) or self.failed
        answer = answer_control(control, delivery.entry_id, now, refusal=refusal, command_id=command_id,
                                halt_after=halt_after, lifted_failure=lifted, closed_breaker=closed_breaker)
        self.bus.queue_publish(pipe, self.names.control_answers, answer)
        if refusal is not None:
            log.warning("%s by %s refused: %s", control.action.value, control.by, answer.detail)

    async def on_reports(self, batch: list[Delivery[Report]], pipe: Pipeline) -> None:
        """A closure's `completed` / `failed` releases it; a halt violation while the breaker is open
        calls for another cancel-only command; the other reports on the way change nothing."""
        violations = sum(1 for d in batch if d.doc.status is ReportStatus.HALT_VIOLATION)
        if violations and self.engine.breaker.is_open:
            for _ in range(violations):
                self.engine.breaker.violation_seen()
            log.info("circuit breaker open: %d halt violation(s) seen; orders and quotes will be "
                     "cancelled again", violations)
        elif not any(d.doc.status in (ReportStatus.COMPLETED, ReportStatus.FAILED) for d in batch):
            return
        now = time.time()
        for delivery in batch:
            report = delivery.doc
            if report.status not in (ReportStatus.COMPLETED, ReportStatus.FAILED):
                continue
            completed = report.status is ReportStatus.COMPLETED
            if not self.engine.on_closure_finished(report.command_id, completed=completed, now=now):
                if completed and self.failed is not None and self.failed.command_id == report.command_id:
                    # given up on (no report before the lease ran out), but it did complete after all
                    log.info("closure %s completed after its deadline: lifting the failure halt",
                             report.command_id)
                    pipe.delete(self.failed_key)
                    self.failed = None
                continue  # otherwise not the closure in flight: a replayed or foreign report
            self._release(pipe, report.command_id, completed, report.error.message if report.error else None)
        self._write_state(pipe, now)

    async def on_timer(self, now: float) -> None:
        await self._read_mirrors()
        if self.volume_ticks and now - self._volume_ticks_read >= INSTRUMENT_REFRESH_SECONDS:
            await self._read_volume_ticks(list(self.volume_ticks), now)
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            in_flight = self.engine.in_flight
            if in_flight is not None and not self.lease_held:
                log.error("closure %s: no completed/failed report before its deadline; releasing",
                          in_flight.command_id)
                self.engine.on_closure_finished(in_flight.command_id, completed=False, now=now)
                self._release(pipe, in_flight.command_id, False, "no report before the deadline")
            decision = self.engine.on_timer(now, self._external())
            if decision is not None:
                await self._write_decision(decision, pipe, now)
            self._write_state(pipe, now)
            await pipe.execute()

    def _release(self, pipe: Pipeline, command_id: str, completed: bool, why: str | None) -> None:
        pipe.delete(self.lease_key)
        self.lease_held = False
        if completed:
            pipe.delete(self.failed_key)
            self.failed = None
            CLOSURES_FINISHED.labels("completed").inc()
            if cancel_only(command_id):
                log.info("cancel-only command %s completed (no cool-down: nothing was closed)", command_id)
                return
            log.info("closure %s completed; cool-down %.0f s", command_id,
                     self.settings.portfolio_take_profit.cooldown_seconds)
        else:
            halt = Halt(reason=FAILED_HALT_REASON, command_id=command_id, since=time.time())
            pipe.set(self.failed_key, halt.model_dump_json())
            self.failed = halt
            CLOSURES_FINISHED.labels("failed").inc()
            log.error("closure %s FAILED (%s): quoters stay halted until `thalex-tp resume`", command_id, why)

    async def _write_decision(self, decision: Decision, pipe: Pipeline, now: float) -> None:
        # only a partial close rounds its legs to the volume tick (`build_command`)
        volume_ticks = None if decision.fraction == 1.0 else \
            await self._volume_ticks([p.instrument for p in decision.positions])
        try:
            built = build_command(decision, decision.decided_ts, self.settings.executor.deadline_seconds,
                                  volume_ticks)
        except ValueError as exc:
            log.warning("decision %s dropped: %s", decision.command_id, exc)
            self.engine.on_decision_dropped(decision.command_id)
            return
        command, text = signed_text(built, self.command_key)
        ttl = command.deadline_ts - now + LEASE_MARGIN_SECONDS
        pipe.set(self.lease_key, command.command_id, px=max(1, int(ttl * 1000)))
        self.lease_held = True
        self.bus.queue_publish_encoded(pipe, self.names.commands, text)
        DECISIONS.labels(decision.reason.value).inc()
        if decision.reason is CloseReason.CIRCUIT_BREAKER:
            log.error("CIRCUIT BREAKER %s: %s", command.command_id, decision.sentence)
            return
        log.warning(
            "DECISION %s: %s [snapshot #%d, figure %.6f, threshold %.6f, %d positions, deadline %.0f s]",
            command.command_id,
            decision.sentence,
            decision.snapshot_seq,
            decision.figure,
            decision.threshold,
            len(command.closing()),
            self.settings.executor.deadline_seconds,
        )

    async def _volume_ticks(self, instruments: list[str]) -> dict[str, float]:
        """Carried by the snapshot's rows (v2); read from `tp:instruments` (cached) only when not."""
        rows = self.engine.view.rows
        for i in instruments:
            row = rows.get(i)
            if row is not None and row.volume_tick_size is not None:
                self.volume_ticks[i] = row.volume_tick_size
        missing = [i for i in instruments if i not in self.volume_ticks]
        if missing:
            await self._read_volume_ticks(missing, time.time())
        return {i: self.volume_ticks[i] for i in instruments if i in self.volume_ticks}

    async def _read_volume_ticks(self, instruments: list[str], now: float) -> None:
        """Volume ticks from `tp:instruments`; a bad value is dead-lettered and that leg left unrounded.

        A partial close of a leg whose volume tick is unknown closes exactly `fraction` of it (the
        executor rounds to what the exchange accepts); it never stops the decision on the others.
        """
        values = await self.bus.redis.hmget(self.names.instruments, instruments)
        infos = await self.instrument_reader.documents(dict(zip(instruments, values, strict=True)))
        for instrument in instruments:
            info = infos.get(instrument)
            if info is not None:
                self.volume_ticks[instrument] = info.volume_tick_size
        self._volume_ticks_read = now

    def _write_state(self, pipe: Pipeline, now: float) -> None:
        """Checkpoint the engine (the breaker's mirror with it) and set `tp:halt` to what it should be now."""
        pipe.set(self.state_key, self.engine.to_state())
        breaker = self.engine.breaker
        pipe.set(self.names.breaker, breaker.state.model_dump_json())
        BREAKER_OPEN.set(1 if breaker.is_open else 0)
        REPEAT_CLOSURES.set(breaker.recent(now))
        halt = self.engine.halt_document(now)
        if halt is None:
            halt = self.failed
        pipe.delete(self.names.halt)
        if halt is not None:
            fields: dict[Any, Any] = halt_to_hash(halt)  # redis-py's key type is wider than str
            pipe.hset(self.names.halt, mapping=fields)
        HALT_ACTIVE.set(0 if halt is None else 1)
        LEASE_HELD.set(0 if self.engine.in_flight is None else 1)
        for barrier, distance in self.engine.distances(now).items():
            BARRIER_DISTANCE.labels(barrier).set(distance)


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> TakeProfitService:
    """Wire the service to the bus; it restores its checkpoint before any entry is handled."""
    service = TakeProfitService(settings, bus, consumer_name, command_key=require_command_key(settings))
    bus.before_start.append(service.load)
    health.add("snapshots", service.snapshots_fresh)
    return service


def main(argv: list[str]) -> int:
    return service_main("takeprofit", argv, build, lambda s: s.metrics.takeprofit_port)
