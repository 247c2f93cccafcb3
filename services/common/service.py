"""The thin shell every service shares: arguments, config, logging, HTTP, lifecycle, timer.

A service supplies a `build(settings, bus, health, consumer_name) -> Runnable` function; this
module parses `--config/--replica`, loads and validates the configuration
(exit 2 on a bad value), connects the bus, serves `/metrics` and `/health`, and
stops on SIGINT/SIGTERM — always: stopping is bounded (`STOP_TIMEOUT_SECONDS` per step), and a
task that will not stop (a cancellation swallowed by a library) is left behind, with an error in
the log, rather than keeping the process alive. `run_timer` is the periodic loop portfolio and
take-profit share.

Health means "guarding", not "the process answers" (`Health`, issue 21). Every service
gets these checks for free (`add_framework_checks`):

* `redis` — a write succeeds (a tiny `SET` of `<ns>:<service>:health` every
  second): red with Redis' own words when it is unreachable, at `maxmemory`
  with `noeviction`, a read-only replica, or refusing the user (ACL);
* `consuming` — every stream reader is alive;
* `handlers` — no entry's handling is failing (`StreamConsumer.problem`): a
  handler that fails on every entry, or again and again on one, is red from its
  first failure until the entry is handled or dead-lettered.

A service adds its own with `health.add(name, check)`; a check (plain or async) returns True,
or False, or the reason it fails (text), or raises `Unhealthy(reason, detail)`. The reasons are on
`/health` (`reasons`), in `tp_service_health_problem{service,check,reason}` and in the log (once
per change, not every second).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import inspect
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from services.common.bus import Bus, raise_if_cancelled
from services.common.config import LOG_LEVELS, ConfigError, Problem, Settings, load_config, read_secret_file
from services.common.metrics import SERVICE_HEALTH_PROBLEM, SERVICE_HEALTHY
from services.common.redact import install_redaction, redact

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[bool | str] | bool | str]
"""True: healthy; False, a reason (text), or `Unhealthy` raised: not healthy. Plain or async."""
HEALTH_CHECK_TIMEOUT_SECONDS = 2.0
HEALTH_FRESH_SECONDS = 10.0
"""A round of checks older than this proves nothing: `/health` and `tp_service_healthy` read red."""
HEALTH_KEY_TTL_MS = 30_000


class Unhealthy(Exception):
    """Raised by a health check: `reason` is short and stable (a metric label), `detail` the particulars."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail
STOP_TIMEOUT_SECONDS = 5.0
"""How long each step of stopping (the service's tasks, then the bus) may take."""


class Runnable(Protocol):
    """What a service's `build` returns."""

    async def run(self) -> None:
        """Work until cancelled (the bus is already started)."""


@dataclass
class Health:
    """Named checks, evaluated on the event loop every second, read by the HTTP thread."""

    service: str = ""
    checks: dict[str, HealthCheck] = field(default_factory=dict)
    latest: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each failing check fails ("reason: detail"), redacted."""
    checked_ts: float = 0.0
    round_results: dict[str, bool] = field(default_factory=dict)
    """This refresh's verdicts so far: a check added `last` sees every other one of the same refresh."""
    round_reasons: dict[str, str] = field(default_factory=dict)
    not_guarding: dict[str, str] = field(default_factory=dict)
    """What the service is set to do that leaves the account unguarded though it works as told (the
    executor's dry run): `/health` stays green — a restart would not change it — but the report in
    Redis carries it, and `thalex-tp status` says NOT GUARDING with it."""
    _labels: dict[str, str] = field(default_factory=dict)
    """Check → the reason label its `tp_service_health_problem` series carries now."""
    _last: set[str] = field(default_factory=set)

    def add(self, name: str, check: HealthCheck, *, last: bool = False) -> None:
        """`last`: evaluated after the others in each refresh (the `redis` check writes their verdict)."""
        self.checks[name] = check
        if last:
            self._last.add(name)
        else:
            self._last.discard(name)
        SERVICE_HEALTHY.labels(self.service, name).set_function(lambda: 1.0 if self.passes(name) else 0.0)

    def passes(self, name: str) -> bool:
        """Whether check `name` passed in a round of at most `HEALTH_FRESH_SECONDS` ago.

        Read at every scrape of `tp_service_healthy`: a gauge set only by `refresh` kept its last 1
        while the refreshing stopped (a check hung past its timeout, the loop blocked) — `/health`
        red, `status` NOT GUARDING, and the alert on the gauge silent.
        """
        return self.latest.get(name, False) and time.time() - self.checked_ts < HEALTH_FRESH_SECONDS

    async def refresh(self) -> None:
        results: dict[str, bool] = {}
        reasons: dict[str, str] = {}
        self.round_results, self.round_reasons = results, reasons
        for name in sorted(self.checks, key=lambda name: name in self._last):  # stable: the `last` ones after
            reason, detail = await self._evaluate(self.checks[name])
            results[name] = reason is None
            if reason is not None:
                reasons[name] = redact(f"{reason}: {detail}" if detail else reason)
            self._label(name, reason)
        self._log_changes(reasons)
        self.latest, self.reasons, self.checked_ts = results, reasons, time.time()

    @staticmethod
    async def _evaluate(check: HealthCheck) -> tuple[str | None, str]:
        """(reason, detail) of a failing check; (None, "") when it passes."""
        try:
            async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_SECONDS):
                answer = check()
                if inspect.isawaitable(answer):
                    answer = await answer
        except Unhealthy as exc:
            raise_if_cancelled()  # redis-py turns a cancellation into its own error: stop must stop
            return exc.reason, exc.detail
        except TimeoutError:
            raise_if_cancelled()
            return "check timed out", f"no answer within {HEALTH_CHECK_TIMEOUT_SECONDS:.0f} s"
        except Exception as exc:  # a failing check is an unhealthy answer, not a crash
            raise_if_cancelled()
            return f"check raised {type(exc).__name__}", str(exc)
        if answer is True:
            return None, ""
        if isinstance(answer, str):  # "reason: particulars" — the part before the colon is the label
            reason, _, detail = answer.partition(": ")
            return reason, detail
        return "check failed", ""

    def _label(self, name: str, reason: str | None) -> None:
        label = None if reason is None else redact(reason)[:80]
        previous = self._labels.get(name)
        if previous == label:
            return
        if previous is not None:
            SERVICE_HEALTH_PROBLEM.remove(self.service, name, previous)
            del self._labels[name]
        if label is not None:
            SERVICE_HEALTH_PROBLEM.labels(self.service, name, label).set(1)
            self._labels[name] = label

    def _log_changes(self, reasons: dict[str, str]) -> None:
        for name, why in reasons.items():
            if self.reasons.get(name) != why:
                log.warning("%s UNHEALTHY: %s: %s", self.service, name, why)
        for name in self.reasons.keys() - reasons.keys():
            log.info("%s: %s healthy again", self.service, name)

    @property
    def healthy(self) -> bool:
        return bool(self.latest) and all(self.passes(name) for name in self.latest)

    def document(self) -> dict[str, Any]:
        """What `/health` answers."""
        return {"service": self.service, "healthy": self.healthy, "checks": self.latest,
                "reasons": self.reasons, "checked_ts": self.checked_ts}


def health_report(health: Health, now: float) -> str:
    """What the `redis` check writes to `<ns>:<service>:health`: the service's verdict, for
    `thalex-tp status` (JSON `{"ts", "healthy", "reasons"}`; the key expires after 30 s).

    The verdict is this refresh's: the write is its last check, after every other one (it was the
    first, writing the previous refresh's verdict, and `status` said NOT GUARDING for a second after
    `/health` turned green: the native walkthrough's `status` failed on it). Without a `redis`
    reason: the write that carries the report succeeds, so Redis takes writes again.
    """
    others = {name: ok for name, ok in health.round_results.items() if name != "redis"}
    reasons = {name: why for name, why in health.round_reasons.items() if name != "redis"}
    report: dict[str, Any] = {"ts": now, "healthy": bool(others) and all(others.values()), "reasons": reasons}
    if health.not_guarding:
        report["not_guarding"] = health.not_guarding
    return json.dumps(report)


def add_framework_checks(health: Health, bus: Bus, key: str) -> None:
    """The checks every service gets: `redis` (a write to `key` succeeds), `consuming`, `handlers`."""

    async def redis_writable() -> bool:
        try:
            await bus.redis.set(key, health_report(health, time.time()), px=HEALTH_KEY_TTL_MS)
        except ResponseError as exc:  # OutOfMemoryError at maxmemory, ReadOnlyError, NoPermissionError
            raise Unhealthy("Redis refuses writes", f"{type(exc).__name__}: {exc}") from None
        except (RedisError, OSError) as exc:
            raise Unhealthy("Redis unreachable", f"{type(exc).__name__}: {exc}") from None
        return True

    async def consuming() -> bool:
        dead = [c.stream for c in bus.consumers if not c.is_consuming]
        if dead:
            raise Unhealthy("a stream reader is not running", ", ".join(dead))
        return True

    async def handlers() -> bool:
        failing = [problem for c in bus.consumers if c.is_consuming and (problem := c.problem())]
        if failing:
            raise Unhealthy("handlers failing", "; ".join(failing))
        return True

    health.add("redis", redis_writable, last=True)
    health.add("consuming", consuming)
    health.add("handlers", handlers)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the service's own log."""


def serve_http(host: str, port: int, health: Health, service: str) -> WSGIServer:
    """`/metrics` (Prometheus) and `/health` (JSON; 200 healthy, 503 not) in a thread.

    Prometheus' own WSGI app and the stdlib server: no extra dependency, and
    the scrape never waits on the service's event loop.
    """
    metrics_app = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") == "/health":
            body = json.dumps(health.document()).encode()
            status = "200 OK" if health.healthy else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json")])
            return [body]
        return metrics_app(environ, start_response)  # type: ignore[no-any-return]

    server = make_server(host, port, app, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name=f"{service}-http", daemon=True).start()
    log.info("%s: /metrics and /health on http://%s:%d", service, host, server.server_port)
    return server


def tune_gc_for_latency() -> None:
    """Collect young garbage less often, and never re-scan what start-up built.

    With CPython's default gen-0 threshold (700) a burst of messages triggers
    collections whose gen-2 passes stall the event loop for tens of ms: the
    ingest benchmark's p99 added latency fell from 5-19 ms to 1.6-1.9 ms with
    this setting (docs/performance.md). The services make little cyclic
    garbage, so memory barely moves.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)


def setup_logging(service: str) -> None:
    """Log to stderr through the redaction rule; an unknown TP_LOG_LEVEL is refused by `load_config`."""
    level = os.environ.get("TP_LOG_LEVEL", "INFO").strip().upper()
    logging.basicConfig(level=level if level in LOG_LEVELS else "INFO", stream=sys.stderr,
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")
    install_redaction()


def read_secret(path: Any, key: str = "redis.password_file") -> str | None:
    """A password from a file (Docker secret), stripped; None when not configured.

    A file that cannot be read is a `ConfigError` naming `key` (exit 2), never a traceback.
    """
    return None if path is None else read_secret_file(key, Path(path)).strip()


def make_bus(settings: Settings, service: str) -> Bus:
    return Bus(settings.redis.url, settings.names, service, maxlen=settings.redis.stream_maxlen,
               username=settings.redis.username, password=read_secret(settings.redis.password_file))


Build = Callable[[Settings, Bus, Health, str], Runnable]


def service_main(service: str, argv: list[str], build: Build, metrics_port: Callable[[Settings], int]) -> int:
    """Entry point shared by the four services: parse, validate, run until a signal."""
    parser = argparse.ArgumentParser(prog=f"thalex-tp {service}")
    parser.add_argument("--config", help="TOML configuration file (default: built-in defaults + TP_* env)")
    parser.add_argument("--replica", default=os.environ.get("TP_REPLICA", "1"),
                        help="replica name; consumers are named <service>-<replica> (default 1)")
    parser.add_argument("--metrics-port", type=int, default=None, help="override the configured metrics port")
    args = parser.parse_args(argv)
    setup_logging(service)
    try:
        settings = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return ConfigError.exit_code
    port = metrics_port(settings) if args.metrics_port is None else args.metrics_port
    tune_gc_for_latency()
    return asyncio.run(_run(service, settings, args.replica, build, port))


async def _run(service: str, settings: Settings, replica: str, build: Build, port: int) -> int:
    """Run until a signal or until the work ends; returns the exit code (2: a fatal config error)."""
    bus = make_bus(settings, service)
    health = Health(service)
    add_framework_checks(health, bus, settings.names.key(f"{service}:health"))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task[Any]] = []
    http: list[WSGIServer] = []
    code = 1
    try:
        code = await _serve(service, settings, replica, build, port, bus, health, stop, tasks, http)
    finally:
        stop.set()
        clean = await _cancel_and_wait(tasks, service)
        clean = await _stopped_within(bus.stop(), "the bus") and clean
        for server in http:
            server.shutdown()
        clean = await _cancel_and_wait(_others(), service) and clean
        log.info("%s stopped", service)
        if not clean:  # asyncio.run's own clean-up would wait for the stuck task forever
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
    return code


async def _serve(service: str, settings: Settings, replica: str, build: Build, port: int, bus: Bus,
                 health: Health, stop: asyncio.Event, tasks: list[asyncio.Task[Any]],
                 http: list[WSGIServer]) -> int:
    """Build, serve HTTP, start the bus, run the work; the tasks and server it starts are left in
    `tasks` and `http` for `_run` to stop."""
    try:
        runnable = build(settings, bus, health, f"{service}-{replica}")
        http.append(serve_http(settings.metrics.host, port, health, service))
        tasks.append(asyncio.create_task(_refresh_health(health, stop), name=f"{service}-health"))
        starting = asyncio.create_task(_start_bus_when_redis_answers(bus, stop), name=f"{service}-bus")
        tasks.append(starting)
        if not await _until_stopped(starting, stop) or not starting.result():
            log.warning("%s stopped before Redis ever answered: it never started", service)
            return 0
        log.info("%s started: connected to Redis, consumers reading (namespace %s)", service,
                 settings.names.namespace)
        work = asyncio.create_task(runnable.run(), name=f"{service}-work")
        tasks.append(work)
        if not await _until_stopped(work, stop):
            return 0
        work.result()
        return 0
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return ConfigError.exit_code
    except Exception:
        log.exception("%s stopped on an error", service)
        return 1


async def _until_stopped(task: asyncio.Task[Any], stop: asyncio.Event) -> bool:
    """Wait for `task` unless a stop signal comes first; False when stopped first."""
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    return task.done()


async def _refresh_health(health: Health, stop: asyncio.Event) -> None:
    """Re-evaluate the checks every second; ends on `stop` even if a cancellation got swallowed."""
    while not stop.is_set():
        await health.refresh()
        await asyncio.sleep(1.0)


async def _cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], service: str) -> bool:
    """Cancel and wait at most `STOP_TIMEOUT_SECONDS`; False (logged) when one would not stop."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=STOP_TIMEOUT_SECONDS)
        if stuck:
            log.error("%s: %d task(s) did not stop within %.0f s (%s); exiting without them", service,
                      len(stuck), STOP_TIMEOUT_SECONDS, ", ".join(t.get_name() for t in stuck))
            return False
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: never "exception was never retrieved"
    return True


async def _stopped_within(aw: Awaitable[None], what: str) -> bool:
    try:
        async with asyncio.timeout(STOP_TIMEOUT_SECONDS):
            await aw
    except TimeoutError:
        log.error("stopping %s took over %.0f s; exiting without it", what, STOP_TIMEOUT_SECONDS)
        return False
    except Exception:  # stopping must not fail the exit code
        log.exception("stopping %s failed", what)
    return True


def _others() -> list[asyncio.Task[Any]]:
    """Tasks a service left behind (asyncio.run would wait for them without a bound)."""
    return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def _start_bus_when_redis_answers(bus: Bus, stop: asyncio.Event) -> bool:
    """Redis may come up after us (compose, a restart), or refuse writes for a while: wait, loudly.

    False when told to stop before Redis ever answered (nothing was started). A refused user or
    password is a configuration error (exit 2), not something to wait out.
    """
    delay = 0.2
    while not stop.is_set():
        try:
            await bus.start()
            return True
        except (AuthenticationError, NoPermissionError) as exc:
            raise ConfigError([Problem("redis.username", None, f"Redis refused this service's user: {exc} "
                                       "(check [redis] username, password_file and the ACL)")],
                              "redis") from None
        except ResponseError as exc:  # at maxmemory, a read-only replica, still loading its data
            log.warning("Redis refuses to start the consumers (%s); retrying in %.1f s", exc, delay)
        except (RedisError, OSError) as exc:
            log.warning("Redis not reachable (%s); retrying in %.1f s", exc, delay)
        with contextlib.suppress(TimeoutError):  # a stop ends the wait at once
            await asyncio.wait_for(stop.wait(), timeout=delay)
        delay = min(delay * 2, 5.0)
    return False


async def run_timer(name: str, interval: float, bus: Bus, lock: asyncio.Lock,
                    on_timer: Callable[[float], Awaitable[None]],
                    restore: Callable[[], Awaitable[None]]) -> NoReturn:
    """Call `on_timer(now)` every `interval` seconds under the service's lock (portfolio, take-profit).

    A restore still due from a failed batch runs first. When Redis fails (restarting, full), what
    the failed transaction changed in memory is not in Redis: `restore` is made due, so it runs
    before the next batch or tick, whichever comes first; the next tick tries again.
    """
    while True:
        raise_if_cancelled()  # a cancellation redis-py swallowed must still end the loop
        await asyncio.sleep(interval)
        async with lock:
            try:
                await bus.restore_if_due()
                await on_timer(time.time())
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                bus.must_restore(restore)
                log.warning("%s timer: Redis unavailable (%s); retrying in %.1f s", name, exc, interval)
