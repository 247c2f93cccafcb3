"""The thin shell every service shares: arguments, config, logging, HTTP, lifecycle, timer.

A service supplies a `build(settings, bus, health, consumer_name) -> Runnable` function; this
module parses `--config/--replica`, loads and validates the configuration
(exit 2 on a bad value), connects the bus, serves `/metrics` and `/health`, and
stops on SIGINT/SIGTERM — always: stopping is bounded (`STOP_TIMEOUT_SECONDS` per step), and a
task that will not stop (a cancellation swallowed by a library) is left behind, with an error in
the log, rather than keeping the process alive. `run_timer` is the periodic loop portfolio and
take-profit share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from redis.exceptions import RedisError

from services.common.bus import Bus, raise_if_cancelled
from services.common.config import ConfigError, Settings, load_config
from services.common.metrics import SERVICE_HEALTHY

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[bool | str]]
"""True: healthy; False or a reason (text): not healthy."""
HEALTH_CHECK_TIMEOUT_SECONDS = 2.0
STOP_TIMEOUT_SECONDS = 5.0
"""How long each step of stopping (the service's tasks, then the bus) may take."""


class Runnable(Protocol):
    """What a service's `build` returns."""

    async def run(self) -> None:
        """Work until cancelled (the bus is already started)."""


@dataclass
class Health:
    """Named checks, evaluated on the event loop, read by the HTTP thread."""

    service: str = ""
    checks: dict[str, HealthCheck] = field(default_factory=dict)
    latest: dict[str, bool] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each failing check fails (when it said)."""
    checked_ts: float = 0.0

    def add(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    async def refresh(self) -> None:
        results: dict[str, bool] = {}
        reasons: dict[str, str] = {}
        for name, check in self.checks.items():
            try:
                async with asyncio.timeout(HEALTH_CHECK_TIMEOUT_SECONDS):
                    answer = await check()
            except Exception as exc:  # a failing check is an unhealthy answer, not a crash
                raise_if_cancelled()
                answer = f"check failed: {type(exc).__name__}: {exc}"
            results[name] = answer is True
            if isinstance(answer, str):
                reasons[name] = answer
        if reasons.keys() - self.reasons.keys():
            log.warning("unhealthy: %s", "; ".join(f"{n}: {r}" for n, r in reasons.items()))
        self.latest, self.reasons, self.checked_ts = results, reasons, time.time()
        for name, ok in results.items():
            SERVICE_HEALTHY.labels(self.service, name).set(1 if ok else 0)

    @property
    def healthy(self) -> bool:
        return bool(self.latest) and all(self.latest.values()) and time.time() - self.checked_ts < 10


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
            body = json.dumps({"service": service, "healthy": health.healthy, "checks": health.latest,
                               "reasons": health.reasons, "checked_ts": health.checked_ts}).encode()
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
    level = os.environ.get("TP_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")


def read_secret(path: Any) -> str | None:
    """A password from a file (Docker secret), stripped; None when not configured."""
    return None if path is None else open(path, encoding="utf-8").read().strip()


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

    async def redis_up() -> bool:
        return bool(await bus.redis.ping())

    async def consuming() -> bool:
        return all(c.is_consuming for c in bus.consumers)

    health.add("redis", redis_up)
    health.add("consuming", consuming)
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
    """Redis may come up after us (compose, a restart): wait for it, loudly.

    False when told to stop before Redis ever answered (nothing was started).
    """
    delay = 0.2
    while not stop.is_set():
        try:
            await bus.start()
            return True
        except (ConnectionError, OSError) as exc:
            log.warning("Redis not reachable (%s); retrying in %.1f s", exc, delay)
        except Exception as exc:  # redis-py raises its own ConnectionError subclasses
            if "connect" not in str(exc).lower():
                raise
            log.warning("Redis not reachable (%s); retrying in %.1f s", exc, delay)
        with contextlib.suppress(TimeoutError):
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
