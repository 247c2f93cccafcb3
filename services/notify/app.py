"""The notify service's shell: the guardian's streams and the services' health in, notifications out.

What to say is decided by `core.Notifier` (pure). This shell

* consumes `tp:snapshots`, `tp:commands` and `tp:reports` (group `notify`) and, in the same
  transaction as each ack, checkpoints the core (`<ns>:notify:state`), appends every notification
  to `tp:notifications` and queues it in each interested target's outbox (`outbox.py`);
* polls the watched services' `/health` (aiohttp, 2 s timeout per request, in a task of its own)
  and feeds the answers to the core — a service that does not answer is unhealthy;
* sends from each target's outbox in a task per target, rate-limited (token bucket), retried with
  exponential backoff while the target is down (`targets.py` says what is retried).

Sending never happens on the ack path: a target that hangs or is down delays only its own
outbox, never the consumers — and never the guardian, whose services do not know notify exists.

On its very first start (no checkpoint) the groups are created at the END of the streams:
notifications are about now, and a first start on a guardian with months of history must not
replay every old decision to the trader's phone. From then on it resumes from its groups like
every consumer, so nothing that happens while it is down is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from prometheus_client import Counter, Gauge
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, ResponseError

from services.common.bus import Bus, Delivery, StreamConsumer, raise_if_cancelled
from services.common.config import Settings
from services.common.contracts import Command, Notification, Report, Snapshot
from services.common.service import Health, Unhealthy, service_main
from services.notify.core import Notifier
from services.notify.outbox import Entry, Outbox
from services.notify.targets import Outcome, Result, Target, load_targets, send

log = logging.getLogger("services.notify")

NOTIFICATIONS = Counter("tp_notify_notifications_total", "Notifications produced, by kind", ["kind"])
SENT = Counter("tp_notify_sent_total", "Notifications delivered, by target", ["target"])
RETRIES = Counter("tp_notify_retries_total", "Deliveries that failed and will be retried", ["target"])
DROPPED = Counter("tp_notify_dropped_total", "Notifications settled without delivery (rejected, too old, "
                  "unconfirmed)", ["target", "why"])
WAITING = Gauge("tp_notify_waiting", "Notifications waiting for their target", ["target"])
OLDEST_WAITING = Gauge("tp_notify_oldest_waiting_seconds", "Age of the oldest notification waiting",
                       ["target"])
WATCHED_HEALTHY = Gauge("tp_notify_watched_service_healthy", "1 when the watched service's /health is green",
                        ["service"])

SENDER_POLL_SECONDS = 0.2
TIMER_SECONDS = 1.0
STATS_SECONDS = 2.0
HEALTH_REQUEST_SECONDS = 2.0
NOTIFICATIONS_MAXLEN = 10_000
SERVICES = ("ingest", "portfolio", "takeprofit", "executor")


class TokenBucket:
    """At most `burst` at once, then `rate` per second (monotonic time)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), time.monotonic()

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until one token is there."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


def health_urls(settings: Settings) -> dict[str, str]:
    """The watched services' /health: `[notify] health_urls`, else each on [metrics] host and port."""
    if settings.notify.health_urls is not None:
        return dict(settings.notify.health_urls)
    host = settings.metrics.host
    host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return {s: f"http://{host}:{getattr(settings.metrics, f'{s}_port')}/health" for s in SERVICES}


async def probe(session: aiohttp.ClientSession, url: str) -> tuple[bool, str]:
    """(healthy, why not) from one GET of a service's /health."""
    try:
        timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_SECONDS)
        async with session.get(url, timeout=timeout) as answer:
            body: dict[str, Any] = await answer.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return False, f"its /health ({url}) does not answer ({type(exc).__name__})"
    if answer.status == 200 and body.get("healthy"):
        return True, ""
    failing = [name for name, ok in (body.get("checks") or {}).items() if not ok]
    return False, f"/health answers {answer.status}, failing: {', '.join(failing) or 'no check passed yet'}"


class NotifyService:
    """Feeds the core from the streams and the health endpoints; sends from the outboxes."""

    def __init__(self, settings: Settings, bus: Bus, health: Health, consumer_name: str) -> None:
        self.settings = settings
        self.config = settings.notify
        self.bus = bus
        self.names = settings.names
        self.state_key = self.names.notify_key("state")
        self.core = Notifier(settings.notify, settings.portfolio_take_profit, settings.fee_estimation_buffer)
        self.targets: list[Target] = load_targets(settings.notify.targets)
        self.outboxes = {t.name: Outbox(bus.redis, self.names, t.name) for t in self.targets}
        self.oldest_waiting: dict[str, float] = {}
        self.rejecting: dict[str, str] = {}
        """Target → why it rejected its last notification; gone once one is delivered to it again."""
        self.lock = asyncio.Lock()
        options: dict[str, Any] = {"lock": self.lock, "on_failure": self.load}
        self.consumers: list[StreamConsumer[Any]] = [
            bus.consumer(self.names.snapshots, "notify", consumer_name, Snapshot, self.on_snapshots,
                         batch_size=50, **options),
            bus.consumer(self.names.commands, "notify", consumer_name, Command, self.on_commands, **options),
            bus.consumer(self.names.reports, "notify", consumer_name, Report, self.on_reports, **options),
        ]
        health.add("delivering", self._delivering)
        if not self.targets:
            log.warning("no [notify] targets configured: notifications are written to %s only, nothing is "
                        "sent (README, `[notify]`)", self.names.notifications)

    # --- start-up ------------------------------------------------------------------------

    async def first_start(self) -> None:
        """No checkpoint yet: start the groups at the end of the streams (module docstring)."""
        if await self.bus.redis.exists(self.state_key):
            return
        for consumer in self.consumers:
            try:
                await self.bus.redis.xgroup_create(consumer.stream, consumer.group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        await self.bus.redis.set(self.state_key, self.core.to_state())
        log.info("first start: notifications begin with what happens from now on")

    async def load(self) -> None:
        """Restore the core from its checkpoint (at start, and after a failed batch)."""
        self.core.load_state(await self.bus.redis.get(self.state_key))

    async def settle_interrupted(self) -> None:
        """Requests under way when the last process died may have arrived: never send them again."""
        now = time.time()
        for name, outbox in self.outboxes.items():
            for entry in await outbox.settle_interrupted(now):
                DROPPED.labels(name, "unconfirmed").inc()
                log.warning("%s: %s was being sent when notify stopped; it may or may not have arrived "
                            "and is not sent again", name, entry.note.id)

    # --- consumers ----------------------------------------------------------------------

    async def on_snapshots(self, batch: list[Delivery[Snapshot]], pipe: Pipeline) -> None:
        now = time.time()
        notes = [n for d in batch for n in self.core.on_snapshot(d.doc, now)]
        await self._queue(pipe, notes, now)

    async def on_commands(self, batch: list[Delivery[Command]], pipe: Pipeline) -> None:
        now = time.time()
        await self._queue(pipe, [n for d in batch for n in self.core.on_command(d.doc, now)], now)

    async def on_reports(self, batch: list[Delivery[Report]], pipe: Pipeline) -> None:
        now = time.time()
        await self._queue(pipe, [n for d in batch for n in self.core.on_report(d.doc, now)], now)

    async def _queue(self, pipe: Pipeline, notes: list[Notification], now: float) -> None:
        """Checkpoint the core and queue `notes` for every target that wants them (on `pipe`)."""
        pipe.set(self.state_key, self.core.to_state())
        for note in notes:
            NOTIFICATIONS.labels(note.kind.value).inc()
            log.info("NOTIFY %s: %s", note.kind.value, note.title)
            self.bus.queue_publish(pipe, self.names.notifications, note, maxlen=NOTIFICATIONS_MAXLEN)
        for target in self.targets:
            wanted = [n for n in notes if target.wants(n.kind)]
            settled = await self.outboxes[target.name].settled([n.id for n in wanted])
            for note in wanted:
                if note.id not in settled:
                    self.outboxes[target.name].queue(pipe, note, now)

    async def _commit(self, notes: list[Notification], now: float) -> None:
        """Outside a consumer (timer, health): the same effects in a transaction of their own."""
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            await self._queue(pipe, notes, now)
            await pipe.execute()

    # --- background work ----------------------------------------------------------------

    async def run(self) -> None:
        await self.settle_interrupted()
        tasks = [asyncio.create_task(self._deliver_forever(t), name=f"notify:{t.name}") for t in self.targets]
        tasks += [asyncio.create_task(self._watch_forever(), name="notify:health"),
                  asyncio.create_task(self._timer_forever(), name="notify:timer"),
                  asyncio.create_task(self._stats_forever(), name="notify:stats")]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _guarded(self, what: str, step: Any) -> None:
        """Run one step under the lock; Redis away: reload the core before the next input."""
        async with self.lock:
            try:
                await self.bus.restore_if_due()
                await step()
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                self.bus.must_restore(self.load)
                log.warning("%s: Redis unavailable (%s); retrying", what, exc)

    async def _timer_forever(self) -> None:
        async def tick() -> None:
            now = time.time()
            notes = self.core.on_timer(now)
            if notes:
                await self._commit(notes, now)

        while True:
            await asyncio.sleep(TIMER_SECONDS)
            await self._guarded("timer", tick)

    async def _watch_forever(self) -> None:
        urls = health_urls(self.settings)
        if not urls:
            return
        async with aiohttp.ClientSession() as session:
            while True:
                answers = await asyncio.gather(*(probe(session, url) for url in urls.values()))
                for service, (ok, _) in zip(urls, answers, strict=True):
                    WATCHED_HEALTHY.labels(service).set(1 if ok else 0)

                async def record(answers: list[tuple[bool, str]] = answers) -> None:
                    now = time.time()
                    before = self.core.to_state()
                    notes = [n for service, (ok, why) in zip(urls, answers, strict=True)
                             for n in self.core.on_health(service, ok, why, now)]
                    if notes or self.core.to_state() != before:
                        await self._commit(notes, now)

                await self._guarded("health", record)
                await asyncio.sleep(self.config.health_interval_seconds)

    async def _stats_forever(self) -> None:
        while True:
            now = time.time()
            for name, outbox in self.outboxes.items():
                try:
                    waiting = await outbox.entries()
                except (RedisError, OSError):
                    raise_if_cancelled()
                    break
                oldest = min((e.first_ts for e in waiting), default=now)
                self.oldest_waiting[name] = now - oldest
                WAITING.labels(name).set(len(waiting))
                OLDEST_WAITING.labels(name).set(now - oldest)
            await asyncio.sleep(STATS_SECONDS)

    async def _delivering(self) -> bool:
        """Red while a notification has waited `delivery_alarm_seconds` for its target, and while a
        target rejects what it is sent (a revoked token, a chat that blocked the bot: HTTP 401/403) —
        such notifications are dropped at once, so nothing waits and only this says the trader is
        not being told."""
        if self.rejecting:
            raise Unhealthy("target rejecting", "; ".join(f"{name}: {why}"
                                                          for name, why in sorted(self.rejecting.items())))
        return all(age < self.config.delivery_alarm_seconds for age in self.oldest_waiting.values())

    # --- sending ------------------------------------------------------------------------

    async def _deliver_forever(self, target: Target) -> None:
        outbox = self.outboxes[target.name]
        bucket = TokenBucket(self.config.rate_per_minute / 60.0, self.config.rate_burst)
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    if not await self._deliver_one(session, target, outbox, bucket):
                        await asyncio.sleep(SENDER_POLL_SECONDS)
                except (RedisError, OSError) as exc:
                    raise_if_cancelled()
                    log.warning("%s: outbox unavailable (%s); retrying in 1 s", target.name, exc)
                    await asyncio.sleep(1.0)

    async def _deliver_one(self, session: aiohttp.ClientSession, target: Target, outbox: Outbox,
                           bucket: TokenBucket) -> bool:
        """Send the next due notification, if any; False when nothing was due."""
        wait = bucket.wait(time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)
        now = time.time()
        entry = await outbox.claim(now)
        if entry is None:
            return False
        note = entry.note
        if now - entry.first_ts > self.config.give_up_after_seconds:
            await outbox.settle(note.id, now)
            DROPPED.labels(target.name, "too_old").inc()
            log.error("%s: giving up on %s after %d attempts over %.0f s", target.name, note.id,
                      entry.attempts, now - entry.first_ts)
            return True
        bucket.take(time.monotonic())
        result = await send(session, target, note, self.config.request_timeout_seconds)
        await self._settle(target, outbox, entry, result)
        return True

    async def _settle(self, target: Target, outbox: Outbox, entry: Entry, result: Result) -> None:
        now, note = time.time(), entry.note
        if result.outcome is Outcome.RETRY:
            delay = min(self.config.retry_max_seconds, 2.0 ** (entry.attempts - 1))
            delay = max(delay, result.retry_after or 0.0)
            RETRIES.labels(target.name).inc()
            if entry.attempts == 1 or entry.attempts % 10 == 0:
                log.warning("%s: %s not delivered (%s, attempt %d); retrying in %.1f s", target.name, note.id,
                            result.why, entry.attempts, delay)
            await outbox.retry(entry, now + delay)
            return
        await outbox.settle(note.id, now)
        if result.outcome is Outcome.SENT:
            SENT.labels(target.name).inc()
            log.info("%s: sent %s (attempt %d)", target.name, note.id, entry.attempts)
            if self.rejecting.pop(target.name, None) is not None:
                log.info("%s: accepting notifications again", target.name)
        elif result.outcome is Outcome.REJECTED:
            DROPPED.labels(target.name, "rejected").inc()
            self.rejecting[target.name] = target.scrub(result.why)[:120]
            log.error("%s: %s REJECTED by the target (%s): check its configuration; not retried", target.name,
                      note.id, target.scrub(result.why))
        else:
            DROPPED.labels(target.name, "unconfirmed").inc()
            log.warning("%s: %s sent but not confirmed (%s); not sent again", target.name, note.id,
                        result.why)


def build(settings: Settings, bus: Bus, health: Health, consumer_name: str) -> NotifyService:
    """Wire the service; its checkpoint is restored (or its groups placed) before any entry."""
    service = NotifyService(settings, bus, health, consumer_name)
    bus.before_start.append(service.first_start)
    bus.before_start.append(service.load)
    return service


def main(argv: list[str]) -> int:
    return service_main("notify", argv, build, lambda s: s.metrics.notify_port)
