"""A Redis restart must not lose a transaction written under the shipped ACL (found by issue 21's
fault suite run under the ACL users).

Redis replays the AOF as a client of the `default` user, and up to the fix of redis/redis#14541
(valkey-io/valkey#3983) EXEC re-checks the ACL for every queued command while loading: with
`default` allowed PING only, every MULTI/EXEC in the AOF — each service's effects and acks — was
refused at start and silently dropped ("-NOPERM ACLs rules changed between the moment the
transaction was accumulated and the EXEC call" in the Redis log), while plain commands loaded.
`default` is now `off` (no client can log in as it) with every permission (the replay passes).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis as redis_sync

from services.common.redis_server import free_port
from tests.deploy.support import redis_server_7, render_acl, write_passwords


def start(binary: str, workdir: Path, port: int, acl: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--aclfile", str(acl),
         "--logfile", str(workdir / "redis.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis_sync.Redis(port=port, socket_timeout=1).ping()
            return process
        except redis_sync.AuthenticationError:  # NOAUTH: it answers, and nobody is let in unnamed
            return process
        except redis_sync.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise
            time.sleep(0.02)


def test_a_services_transactions_survive_a_redis_restart(tmp_path: Path) -> None:
    binary = redis_server_7()
    passwords = write_passwords(tmp_path / "secrets")
    acl = tmp_path / "users.acl"
    assert render_acl(tmp_path / "secrets", acl).returncode == 0
    port = free_port()
    process = start(binary, tmp_path, port, acl)
    try:
        portfolio = redis_sync.Redis(port=port, username="portfolio", password=passwords["portfolio"])
        with portfolio.pipeline(transaction=True) as pipe:  # a handler's effects, as the bus writes them
            pipe.set("tp:portfolio:seq", 7)
            pipe.xadd("tp:snapshots", {"__data__": '{"v": 1}'})
            pipe.execute()
        portfolio.set("tp:portfolio:plain", 1)
        portfolio.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
    process = start(binary, tmp_path, port, acl)
    try:
        admin = redis_sync.Redis(port=port, username="admin", password=passwords["admin"])
        assert admin.get("tp:portfolio:plain") == b"1"
        assert admin.get("tp:portfolio:seq") == b"7", (tmp_path / "redis.log").read_text()[-1500:]
        assert admin.xlen("tp:snapshots") == 1
        anonymous = redis_sync.Redis(port=port)
        try:
            anonymous.get("tp:portfolio:seq")
            raise AssertionError("an unauthenticated client read a key")
        except redis_sync.AuthenticationError:
            pass
        admin.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
