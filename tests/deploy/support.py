"""What the deploy tests share: paths, binaries (skip when missing), a Redis running users.acl."""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import yaml

from services.common.redis_server import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ACL_TEMPLATE = DEPLOY / "redis" / "users.acl"
RENDER_ACL = DEPLOY / "redis" / "render-acl.sh"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "thalex-tp.json"

ACL_USERS = ("admin", "ingest", "portfolio", "takeprofit", "executor", "operator", "notify", "quoter")
APT_HINT = "Debian/Ubuntu: apt-get install -y {}"


def need_binary(name: str, package: str) -> str:
    """Path of `name`, or skip the test saying which package provides it."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"`{name}` not installed ({APT_HINT.format(package)})")
    return found


def assert_alert_tests_pass(tests: list[dict[str, Any]], tmp_path: Path, evaluation_interval: str) -> None:
    """promtool's own rule tests (`promtool test rules`) of `alerts.yml` against `tests`; skip without it."""
    promtool = need_binary("promtool", "prometheus")
    spec = tmp_path / "alert_tests.yml"
    document = {"rule_files": [str(ALERTS_YML)], "evaluation_interval": evaluation_interval, "tests": tests}
    spec.write_text(yaml.safe_dump(document, sort_keys=False))
    result = subprocess.run([promtool, "test", "rules", str(spec)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def redis_server_7() -> str:
    """A redis-server >= 7 (ACL selectors and %R~/%W~ need it), or skip."""
    binary = need_binary("redis-server", "redis-server")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"v=(\d+)\.", version)
    if not match or int(match.group(1)) < 7:
        pytest.skip(f"users.acl needs Redis >= 7 (ACL selectors); {binary} is {version.strip()}")
    return binary


def write_passwords(directory: Path, users: tuple[str, ...] = ACL_USERS) -> dict[str, str]:
    """`redis_<user>.txt` files as deploy/make-secrets.sh writes them; returns the passwords."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords = {}
    for user in users:
        passwords[user] = secrets.token_hex(32)
        (directory / f"redis_{user}.txt").write_text(passwords[user] + "\n")  # a newline, as editors leave
    return passwords


def render_acl(secrets_dir: Path, out: Path) -> subprocess.CompletedProcess[str]:
    need_binary("sha256sum", "coreutils")
    return subprocess.run(["sh", str(RENDER_ACL), str(ACL_TEMPLATE), str(secrets_dir), str(out)], check=False,
                          capture_output=True, text=True)


@dataclass
class AclRedis:
    """A private redis-server that runs the project's users.acl."""

    port: int
    passwords: dict[str, str]
    process: subprocess.Popen[bytes]
    workdir: Path
    clients: list[redis_sync.Redis] = field(default_factory=list)

    @property
    def host_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, user: str | None) -> redis_sync.Redis:
        options = {} if user is None else {"username": user, "password": self.passwords[user]}
        client = redis_sync.Redis(port=self.port, socket_timeout=5, **options)
        self.clients.append(client)
        return client

    def acl_denials(self) -> list[dict[str, object]]:
        """ACL LOG entries (refused commands/keys), oldest first, decoded."""
        entries = self.client("admin").acl_log(count=1000)
        return [
            {k: (v.decode() if isinstance(v, bytes) else v) for k, v in e.items()} for e in reversed(entries)
        ]


@contextmanager
def acl_redis(workdir: Path) -> Iterator[AclRedis]:
    binary = redis_server_7()
    secrets_dir = workdir / "secrets"
    passwords = write_passwords(secrets_dir)
    acl = workdir / "users.acl"
    rendered = render_acl(secrets_dir, acl)
    assert rendered.returncode == 0, rendered.stderr
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "yes", "--appendfsync", "everysec", "--aclfile", str(acl),
         "--logfile", str(workdir / "redis.log"), "--acllog-max-len", "1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = AclRedis(port, passwords, process, workdir)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"redis-server refused users.acl: {(workdir / 'redis.log').read_text()[-2000:]}"
                )
            try:
                if server.client(None).ping():
                    break
            except redis_sync.AuthenticationError:  # NOAUTH: up, and no one gets in unnamed
                break
            except redis_sync.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield server
    finally:
        for client in server.clients:
            client.close()
        process.terminate()
        process.wait(timeout=10)
