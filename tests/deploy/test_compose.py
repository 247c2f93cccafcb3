"""deploy/docker-compose.yml: valid for Compose (with and without the paper profile), and the
secrets go where the design says: the trading key to the executor alone, the read-only key to
ingest alone, no Thalex key to portfolio or takeprofit.

Static: `docker-compose config` (Debian's docker-compose, v1) parses, interpolates and validates
the file against the Compose schema, with and without docker-compose.offline.yml. test_compose_up.py
builds and runs it on a Docker engine of its own.
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


def compose(secrets_dir: Path, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,),
            **env_extra: str) -> subprocess.CompletedProcess[str]:
    binary = need_binary("docker-compose", "docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "TP_"))}
    env["TP_SECRETS_DIR"] = str(secrets_dir)
    env.update(env_extra)
    file_args = [a for f in files for a in ("-f", str(f))]
    return subprocess.run([binary, "--project-directory", str(DEPLOY), *file_args, *args],
                          capture_output=True, text=True, env=env, cwd=DEPLOY, timeout=60, check=False)


def resolved(secrets_dir: Path, *profiles: str, files: tuple[Path, ...] = (COMPOSE_FILE,),
             **env_extra: str) -> dict[str, Any]:
    args = [a for p in profiles for a in ("--profile", p)]
    result = compose(secrets_dir, *args, "config", files=files, **env_extra)
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



def test_the_offline_override_builds_every_image_offline_and_swaps_the_public_ones(secrets_dir: Path) -> None:
    """docker-compose.offline.yml: no service is left to pull from a registry or build from PyPI."""
    offline = (COMPOSE_FILE, DEPLOY / "docker-compose.offline.yml")
    services = resolved(secrets_dir, "live", "paper", "tools", "grafana", files=offline)["services"]
    plain = resolved(secrets_dir, "live", "paper", "tools")["services"]
    built = {name for name, service in plain.items() if "build" in service}
    offline_args = {"PYTHON_IMAGE": "thalex-tp/python:bookworm", "PIP_SOURCE": "wheels"}
    assert {name for name, s in services.items() if s.get("build", {}).get("args") == offline_args} == built
    assert services["redis"]["image"] == "thalex-tp/redis:bookworm"
    assert services["prometheus"]["image"] == "thalex-tp/prometheus:bookworm"
    assert services["grafana"]["profiles"] == ["grafana"]  # no Debian package ships it: on demand only


def published(config: dict[str, Any]) -> dict[str, set[str]]:
    return {name: {str(p["published"]) if isinstance(p, dict) else str(p).rsplit(":", 2)[-2]
                   for p in service["ports"]}
            for name, service in config["services"].items() if service.get("ports")}


def test_published_ports_default_to_the_documented_ones_and_can_move(secrets_dir: Path) -> None:
    assert published(resolved(secrets_dir, "paper")) == {
        "redis": {"6379"}, "paper": {"8765"}, "prometheus": {"9090"}, "grafana": {"3000"}}
    moved = resolved(secrets_dir, "paper", TP_REDIS_HOST_PORT="16379", TP_PAPER_HOST_PORT="18765",
                     TP_PROMETHEUS_HOST_PORT="19090", TP_GRAFANA_HOST_PORT="13000")
    assert published(moved) == {"redis": {"16379"}, "paper": {"18765"}, "prometheus": {"19090"},
                                "grafana": {"13000"}}
    for service in moved["services"].values():  # still on loopback only
        for port in service.get("ports", []):
            assert (port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]) == "127.0.0.1"


def test_the_classic_builder_ignores_what_buildkit_ignores() -> None:
    """Compose v1 and Docker < 23 read only .dockerignore at the context root."""
    def rules(path: Path) -> list[str]:
        return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    assert rules(DEPLOY.parent / ".dockerignore") == rules(DEPLOY / "Dockerfile.dockerignore")
