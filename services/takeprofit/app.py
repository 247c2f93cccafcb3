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

Runs as a single replica: two deciders would race for one lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from services.common.bus import Bus, Delivery
from services.common.config import Settings
from services.common.contracts import (
    Control,
    ControlAction,
    Halt,
    InstrumentInfo,
    Report,
    ReportStatus,
    Snapshot,
    halt_to_hash,
)
from services.common.service import Health, service_main
from services.takeprofit.rules import Decision, External, RulesEngine, build_command

log = logging.getLogger("services.takeprofit")

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
CLOSURES_FINISHED = Counter("tp_takeprofit_closures_finished_total", "Closures ended, by outcome", ["outcome"])
NET_AFTER_CLOSE = Gauge("tp_takeprofit_net_after_close_usd", "net_after_close of the last snapshot evaluated")
THRESHOLD = Gauge("tp_takeprofit_threshold_usd", "Configured money barriers", ["barrier"])

LEASE_MARGIN_SECONDS = 10.0
"""The lease outlives the command's deadline by this much, so a late report still finds it."""
FAILED_HALT_REASON = "closure_failed"


class TakeProfitService:
    """Feeds the rules engine from the streams and writes its decisions back, atomically."""

    def __init__(self, settings: Settings, bus: Bus, consumer_name: str) -> None:
        self.settings = settings
        self.bus = bus
        self.names = settings.names
        self.state_key = self.names.key("takeprofit:state")
        self.lease_key = self.names.key("takeprofit:lease")
        self.failed_key = self.names.key("takeprofit:failed_closure")
        self.engine = RulesEngine(settings.portfolio_take_profit)
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
        """Restore the engine from its checkpoint (before any input, and after a failed batch)."""
        raw = await self.bus.redis.get(self.state_key)
        if not raw:
            self.engine = RulesEngine(self.settings.portfolio_take_profit)
            return
        self.engine = RulesEngine.from_state(self.settings.portfolio_take_profit, json.loads(raw))
        if self.engine.in_flight is not None:
            log.info("resuming with closure %s in flight", self.engine.in_flight.command_id)

    async def run(self) -> None:
        """The timer: time barriers, cool-down end, and leases that ran out with no report."""
        interval = self.settings.portfolio_take_profit.check_interval_seconds
        while True:
            await asyncio.sleep(interval)
            async with self.lock:
                try:
                    await self.on_timer(time.time())
                except (RedisError, OSError) as exc:  # Redis restarting: the next tick retries
                    log.warning("timer: Redis unavailable (%s); retrying in %.1f s", exc, interval)

    async def _external(self) -> External:
        return External(closure_in_flight=bool(await self.bus.redis.exists(self.lease_key)))

    async def on_snapshots(self, batch: list[Delivery[Snapshot]], pipe: Pipeline) -> None:
        now = time.time()
        external = await self._external()
        for delivery in batch:
            decision = self.engine.on_snapshot(delivery.doc, now, external)
            if decision is not None:
                await self._write_decision(decision, pipe, now)
                SNAPSHOT_TO_COMMAND.observe(max(0.0, time.time() - delivery.doc.ts))
                external = External(closure_in_flight=True)
        if batch:
            NET_AFTER_CLOSE.set(batch[-1].doc.net_after_close)
        await self._write_state(pipe, now)

    async def on_controls(self, batch: list[Delivery[Control]], pipe: Pipeline) -> None:
        now = time.time()
        for delivery in batch:
            control = delivery.doc
            log.info("operator %s: %s", control.by, control.action.value)
            if control.action is ControlAction.RESUME:
                pipe.delete(self.failed_key)
            decision = self.engine.on_control(control, now, await self._external())
            if decision is not None:
                await self._write_decision(decision, pipe, now)
            elif control.action is ControlAction.CLOSE_ALL:
                log.warning("close_all by %s refused: %s", control.by, self.engine.last_skip)
        await self._write_state(pipe, now, resumed=any(d.doc.action is ControlAction.RESUME for d in batch))

    async def on_reports(self, batch: list[Delivery[Report]], pipe: Pipeline) -> None:
        now = time.time()
        resumed = False
        for delivery in batch:
            report = delivery.doc
            if report.status not in (ReportStatus.COMPLETED, ReportStatus.FAILED):
                continue
            completed = report.status is ReportStatus.COMPLETED
            if not self.engine.on_closure_finished(report.command_id, completed=completed, now=now):
                if completed and await self._failed_command() == report.command_id:
                    # given up on (no report before the lease ran out), but it did complete after all
                    log.info("closure %s completed after its deadline: lifting the failure halt",
                             report.command_id)
                    pipe.delete(self.failed_key)
                    resumed = True
                continue  # otherwise not the closure in flight: a replayed or foreign report
            self._release(pipe, report.command_id, completed, report.error.message if report.error else None)
        await self._write_state(pipe, now, resumed=resumed)

    async def on_timer(self, now: float) -> None:
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            in_flight = self.engine.in_flight
            if in_flight is not None and not await self.bus.redis.exists(self.lease_key):
                log.error("closure %s: no completed/failed report before its deadline; releasing",
                          in_flight.command_id)
                self.engine.on_closure_finished(in_flight.command_id, completed=False, now=now)
                self._release(pipe, in_flight.command_id, False, "no report before the deadline")
            decision = self.engine.on_timer(now, await self._external())
            if decision is not None:
                await self._write_decision(decision, pipe, now)
            await self._write_state(pipe, now)
            await pipe.execute()

    async def _failed_command(self) -> str | None:
        raw = await self.bus.redis.get(self.failed_key)
        return Halt.model_validate_json(raw).command_id if raw else None

    def _release(self, pipe: Pipeline, command_id: str, completed: bool, why: str | None) -> None:
        pipe.delete(self.lease_key)
        if completed:
            pipe.delete(self.failed_key)
            CLOSURES_FINISHED.labels("completed").inc()
            log.info("closure %s completed; cool-down %.0f s", command_id,
                     self.settings.portfolio_take_profit.cooldown_seconds)
        else:
            halt = Halt(reason=FAILED_HALT_REASON, command_id=command_id, since=time.time())
            pipe.set(self.failed_key, halt.model_dump_json())
            CLOSURES_FINISHED.labels("failed").inc()
            log.error("closure %s FAILED (%s): quoters stay halted until `thalex-tp resume`", command_id, why)

    async def _write_decision(self, decision: Decision, pipe: Pipeline, now: float) -> None:
        volume_ticks = await self._volume_ticks([p.instrument for p in decision.positions])
        try:
            command = build_command(decision, decision.decided_ts, self.settings.executor.deadline_seconds,
                                    volume_ticks)
        except ValueError as exc:
            log.warning("decision %s dropped: %s", decision.command_id, exc)
            self.engine.on_closure_finished(decision.command_id, completed=False, now=now)
            return
        ttl = command.deadline_ts - now + LEASE_MARGIN_SECONDS
        pipe.set(self.lease_key, command.command_id, px=max(1, int(ttl * 1000)))
        self.bus.queue_publish(pipe, self.names.commands, command)
        DECISIONS.labels(decision.reason.value).inc()
        log.warning("DECISION %s: %s [snapshot #%d, figure %.6f, threshold %.6f, %d positions, deadline %.0f s]",
                    command.command_id, decision.sentence, decision.snapshot_seq, decision.figure,
                    decision.threshold, len(command.positions), self.settings.executor.deadline_seconds)

    async def _volume_ticks(self, instruments: list[str]) -> dict[str, float]:
        raw = await self.bus.redis.hmget(self.names.instruments, instruments) if instruments else []
        ticks = {}
        for instrument, value in zip(instruments, raw):
            if value:
                ticks[instrument] = InstrumentInfo.model_validate_json(value).volume_tick_size
        return ticks

    async def _write_state(self, pipe: Pipeline, now: float, resumed: bool = False) -> None:
        """Checkpoint the engine and set `tp:halt` to what it should be now."""
        pipe.set(self.state_key, json.dumps(self.engine.to_state()))
        halt = self.engine.halt_document(now)
        if halt is None and not resumed:
            failed = await self.bus.redis.get(self.failed_key)
            if failed:
                halt = Halt.model_validate_json(failed)
        pipe.delete(self.names.halt)
        if halt is not None:
            pipe.hset(self.names.halt, mapping=halt_to_hash(halt))
        HALT_ACTIVE.set(0 if halt is None else 1)
        LEASE_HELD.set(0 if self.engine.in_flight is None else 1)
        for barrier, distance in self.engine.distances(now).items():
            BARRIER_DISTANCE.labels(barrier).set(distance)


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> TakeProfitService:
    """Wire the service to the bus; it restores its checkpoint before any entry is handled."""
    service = TakeProfitService(settings, bus, consumer_name)
    bus.before_start.append(service.load)
    return service


def main(argv: list[str]) -> int:
    return service_main("takeprofit", argv, build, lambda s: s.metrics.takeprofit_port)
