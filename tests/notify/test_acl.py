"""notify runs as its Redis ACL user (deploy/redis/users.acl) and Redis refuses it nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from services.common.config import Settings
from services.common.contracts import Report, ReportStatus
from services.common.streams import Names
from services.notify.app import build
from tests.deploy.support import AclRedis, acl_redis
from tests.notify.servers import StandIn, wait_until
from tests.notify.test_service import command
from tests.support import in_process, xadd


@pytest.fixture
def server(tmp_path: Path) -> Iterator[AclRedis]:
    with acl_redis(tmp_path / "acl") as running:
        yield running


@pytest.mark.parametrize("namespace", ["tp", "paper"])
async def test_notify_as_its_acl_user(server: AclRedis, tmp_path: Path, namespace: str) -> None:
    password = tmp_path / "redis_notify"
    password.write_text(server.passwords["notify"])
    target = await StandIn().start()
    settings = Settings(redis={"url": server.host_url, "namespace": namespace, "username": "notify",
                               "password_file": str(password)},
                        notify={"targets": [{"name": "hook", "type": "webhook", "url": f"{target.url}/h"}],
                                "health_urls": {}, "retry_max_seconds": 0.3})
    names = Names(namespace)
    admin = Redis(port=server.port, username="admin", password=server.passwords["admin"])
    try:
        async with in_process(build, settings, "notify"):
            await xadd(admin, names.commands, command(1))
            await wait_until(lambda: target.received, what="the decision")
            failed = Report(command_id="e1-take_profit-s1-n1", status=ReportStatus.FAILED, ts=time.time())
            await xadd(admin, names.reports, failed)
            await wait_until(lambda: len(target.received) == 2, what="the failure")
            await asyncio.sleep(6)  # one claim pass (retry, claim, lag) under the ACL too
    finally:
        await target.stop()
        await admin.aclose()
    denials = [d for d in server.acl_denials() if d.get("object") != "client|setinfo"]
    assert denials == []
