"""deploy/docker-compose.yml: valid for Compose (with and without the paper profile), and the
secrets go where the design says: the trading key to the executor alone, the read-only key to
ingest alone, no Thalex key to portfolio or takeprofit.

CI has no Docker engine; `docker-compose config` (Debian's docker-compose, v1) still parses,
interpolates and validates the file against the Compose schema.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import COMPOSE_FILE, DEPLOY, need_binary

SECRET_FILES = ("redis_admin.txt", "redis_ingest.txt", "redis_portfolio.txt", "redis_takeprofit.txt",
                "redis_executor.txt", "redis_operator.txt", "redis_notify.txt", "redis_quoter.txt",
                "grafana_admin_password.txt",
                "thalex_read_only.pem", "thalex_trading.pem", "command_key.txt")


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    for name in SECRET_FILES:
        (directory / name).write_text("not-a-real-secret\n")
    return directory


def compose(secrets_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    binary = need_binary("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env["TP_SECRETS_DIR"] = str(secrets_dir)
    return subprocess.run([binary, "--project-directory", str(DEPLOY), "-f", str(COMPOSE_FILE), *args],
                          capture_output=True, text=True, env=env, cwd=DEPLOY, timeout=60, check=False)


def resolved(secrets_dir: Path, *profiles: str) -> dict[str, Any]:
    args = [a for p in profiles for a in ("--profile", p)]
    result = compose(secrets_dir, *args, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def secrets_of(service: dict[str, Any]) -> set[str]:
    return {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}


@pytest.mark.parametrize("profiles", [(), ("live",), ("paper",), ("tools",)])
def test_compose_accepts_the_file(secrets_dir: Path, profiles: tuple[str, ...]) -> None:
    args = [a for p in profiles for a in ("--profile", p)]
    result = compose(secrets_dir, *args, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_each_service_gets_only_its_own_secrets(secrets_dir: Path) -> None:
    services = resolved(secrets_dir, "live", "paper", "tools")["services"]
    assert secrets_of(services["ingest"]) == {"redis_ingest", "thalex_read_only"}
    assert secrets_of(services["executor"]) == {"redis_executor", "thalex_trading", "command_key"}
    assert secrets_of(services["portfolio"]) == {"redis_portfolio"}
    assert secrets_of(services["takeprofit"]) == {"redis_takeprofit", "command_key"}
    assert secrets_of(services["operator"]) == {"redis_operator"}
    assert secrets_of(services["notify"]) == secrets_of(services["paper-notify"]) == {"redis_notify"}
    holders = {name for name, s in services.items() if "thalex_trading" in secrets_of(s)}
    assert holders == {"executor"}
    for name in ("paper-ingest", "paper-portfolio", "paper-takeprofit", "paper-executor"):
        signs = {"command_key"} if name in ("paper-takeprofit", "paper-executor") else set()
        assert secrets_of(services[name]) == {f"redis_{name.removeprefix('paper-')}"} | signs
    # only take-profit and the executor hold the command key (item 6 of issue 21)
    assert {n for n, s in services.items() if "command_key" in secrets_of(s)} == {
        "takeprofit", "executor", "paper-takeprofit", "paper-executor"}
    # in the paper profile, too, only the executor sees the trading key
    mounts = {name: " ".join(map(str, s.get("volumes", []))) for name, s in services.items()}
    assert {n for n, m in mounts.items() if "paper-keys-executor" in m} == {"paper-keys", "paper-executor"}
    assert {n for n, m in mounts.items() if "paper-keys-ingest" in m} == {"paper-keys", "paper-ingest"}


def test_every_service_has_healthcheck_restart_policy_and_its_redis_user(secrets_dir: Path) -> None:
    services = resolved(secrets_dir, "live", "paper")["services"]
    ports = {"ingest": "9101", "portfolio": "9102", "takeprofit": "9103", "executor": "9104",
             "notify": "9105"}
    for name, port in ports.items():
        for variant in (name, f"paper-{name}"):
            service = services[variant]
            assert service["restart"] == "unless-stopped"
            assert port in service["healthcheck"]["test"]
            env = service["environment"]
            assert env["TP_REDIS__USERNAME"] == name
            assert env["TP_REDIS__PASSWORD_FILE"] == f"/run/secrets/redis_{name}"
            assert env["TP_METRICS__HOST"] == "0.0.0.0"
            assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        paper = services[f"paper-{name}"]
        assert paper["environment"]["TP_REDIS__NAMESPACE"] == "paper"  # never mixes with live state
        assert paper["environment"]["TP_THALEX__NETWORK"] == "ws://paper:8765/ws/api/v2"
        assert name in paper["networks"]["default"]["aliases"]  # Prometheus scrapes the same name
        assert services[name]["profiles"] == ["live"] and paper["profiles"] == ["paper"]
        assert "TP_REDIS__NAMESPACE" not in services[name]["environment"]  # live: the default `tp`


def test_redis_persists_with_aof_on_a_named_volume_and_loads_the_acl(secrets_dir: Path) -> None:
    config = resolved(secrets_dir)
    redis = config["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    volumes = [str(v) for v in redis["volumes"]]
    assert any(v.startswith("redis-data:/data") or "'source': 'redis-data'" in v for v in volumes)
    assert "redis-data" in config["volumes"]
    start = (DEPLOY / "redis" / "start.sh").read_text()
    assert "--appendonly yes --appendfsync everysec" in start and "--aclfile" in start
    assert "healthcheck" in redis


def test_default_profile_is_live() -> None:
    env = dict(line.split("=", 1) for line in (DEPLOY / ".env").read_text().splitlines()
               if line and not line.startswith("#"))
    assert env["COMPOSE_PROFILES"] == "live"
