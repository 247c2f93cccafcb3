"""The thin shell every service shares: arguments, config, logging, HTTP, lifecycle.

A service supplies a `build(settings, bus, replica) -> Runnable` function; this
module parses `--config/--replica`, loads and validates the configuration
(exit 2 on a bad value), connects the bus, serves `/metrics` and `/health`, and
stops cleanly on SIGINT/SIGTERM.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, make_wsgi_app

from services.common.bus import Bus
from services.common.config import ConfigError, Settings, load_config
from services.common.metrics import SERVICE_HEALTHY

log = logging.getLogger(__name__)

HealthCheck = Callable[[], Awaitable[bool]]


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
    checked_ts: float = 0.0

    def add(self, name: str, check: HealthCheck) -> None:
        self.checks[name] = check

    async def refresh(self) -> None:
        results = {}
        for name, check in self.checks.items():
            try:
                results[name] = bool(await asyncio.wait_for(check(), timeout=2.0))
            except Exception:  # a failing check is an unhealthy answer, not a crash
                results[name] = False
        self.latest, self.checked_ts = results, time.time()
        for name, ok in results.items():
            SERVICE_HEALTHY.labels(self.service, name).set(1 if ok else 0)

    @property
    def healthy(self) -> bool:
        return bool(self.latest) and all(self.latest.values()) and time.time() - self.checked_ts < 10


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
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
                               "checked_ts": health.checked_ts}).encode()
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
    try:
        return asyncio.run(_run(service, settings, args.replica, build, port))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return ConfigError.exit_code


async def _run(service: str, settings: Settings, replica: str, build: Build, port: int) -> int:
    bus = make_bus(settings, service)
    health = Health(service)

    async def redis_up() -> bool:
        return bool(await bus.redis.ping())

    async def consuming() -> bool:
        return all(c.is_consuming for c in bus.consumers)

    health.add("redis", redis_up)
    health.add("consuming", consuming)
    runnable = build(settings, bus, health, f"{service}-{replica}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    http = serve_http(settings.metrics.host, port, health, service)
    if not await _start_bus_when_redis_answers(bus, stop):
        log.warning("%s stopped before Redis ever answered: it never started", service)
        await bus.stop()
        http.shutdown()
        return 0
    work = asyncio.create_task(runnable.run(), name=f"{service}-work")
    log.info("%s started: connected to Redis, consumers reading (namespace %s)", service,
             settings.names.namespace)

    async def refresh_health() -> None:
        while True:
            await health.refresh()
            await asyncio.sleep(1.0)

    refresher = asyncio.create_task(refresh_health())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({work, stopper}, return_when=asyncio.FIRST_COMPLETED)
    exit_code = 0
    if work in done and (exc := work.exception()) is not None:
        if isinstance(exc, ConfigError):
            raise exc
        log.error("%s stopped on an error", service, exc_info=exc)
        exit_code = 1
    for task in (work, refresher, stopper):
        task.cancel()
    await asyncio.gather(work, refresher, stopper, return_exceptions=True)
    await bus.stop()
    http.shutdown()
    log.info("%s stopped", service)
    return exit_code


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
