"""The compose deployment as a user runs it, on a private engine (tests/deploy/engine.py), offline.

`Deployment.build()` does what docs/operations.md, "Offline build", tells a user without a
registry to do: `deploy/offline/build-base-images.sh` (debootstrap + Debian's packages),
`deploy/offline/make-wheels.sh`, `deploy/make-secrets.sh`, then `docker compose -f
docker-compose.yml -f docker-compose.offline.yml build` and `up -d` of the paper profile. It works
on a staged copy of the repository (the files the image is built from, and deploy/ as is) so the
wheels and secrets never land in the checkout.

Cached outside the clone, in `$TP_DEPLOY_TEST_CACHE` (default ~/.cache/thalex-tp/deploy-test),
each entry named by a hash of its inputs and rebuilt when missing: the debootstrap root
filesystem and a `docker save` of the base images (by build-base-images.sh itself, 7 days at
most), pip's download cache, and the dependency wheels (by pyproject.toml and the Python image).
A machine without the cache builds everything, only slower. thalex-tp's own image is built
every time, from the sources under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.redis_server import free_port
from tests.deploy.engine import DockerEngine
from tests.deploy.support import REPO

SUITE = "bookworm"
PYTHON_IMAGE = f"thalex-tp/python:{SUITE}"
PROJECT = "thalex-tp"  # deploy/.env's COMPOSE_PROJECT_NAME
PAPER_SERVICES = ("paper-ingest", "paper-portfolio", "paper-takeprofit", "paper-executor", "paper-notify")
LONG_RUNNING = ("redis", "prometheus", "paper", *PAPER_SERVICES)
DEFAULT_MIRRORS = ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")


def cache_root() -> Path:
    if configured := os.environ.get("TP_DEPLOY_TEST_CACHE"):
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "thalex-tp" / "deploy-test"


def apt_mirrors(suite: str = SUITE) -> tuple[str, str]:
    """(archive, security archive) this machine's apt is configured with for `suite`, else Debian's own."""
    entries: list[tuple[str, list[str]]] = []
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
                if "deb" in fields.get("Types", "").split():
                    suites = fields.get("Suites", "").split()
                    entries += [(uri, suites) for uri in fields.get("URIs", "").split()]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], [words[2]]))
    archive = next((uri for uri, suites in entries if suite in suites), DEFAULT_MIRRORS[0])
    security = next((uri for uri, suites in entries if f"{suite}-security" in suites), DEFAULT_MIRRORS[1])
    return archive.rstrip("/"), security.rstrip("/")


def pip_cert() -> str | None:
    """The CA bundle the host's pip trusts (a proxy re-signing TLS needs it inside the container too)."""
    if cert := os.environ.get("PIP_CERT"):
        return cert
    answer = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                            capture_output=True, text=True, check=False, timeout=30)
    if answer.returncode != 0 or not answer.stdout.strip():
        return None
    return answer.stdout.strip()


def compose_command(engine: DockerEngine) -> list[str]:
    """`docker compose` (v2) when the CLI has it, else Debian's `docker-compose` (v1)."""
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True,
                        env=engine.env(), check=False, timeout=30)
    if v2.returncode == 0:
        return ["docker", "compose"]
    v1 = shutil.which("docker-compose")
    if v1 is None:
        raise FileNotFoundError("no `docker compose` nor `docker-compose` (apt-get install docker-compose)")
    return [v1]


def timed(figures: dict[str, float], name: str, step: Callable[[], Any]) -> Any:
    started = time.monotonic()
    try:
        return step()
    finally:
        figures[name] = round(time.monotonic() - started, 1)


@dataclass
class Deployment:
    engine: DockerEngine
    workdir: Path
    ports: dict[str, int] = field(default_factory=lambda: {
        "redis": free_port(), "paper": free_port(), "prometheus": free_port(), "grafana": free_port()})
    timings: dict[str, float] = field(default_factory=dict)
    compose_version: str = ""

    @property
    def stage(self) -> Path:
        return self.workdir / "repo"

    @property
    def secrets(self) -> Path:
        return self.workdir / "secrets"

    # ------------------------------------------------------------------ building

    def build(self) -> None:
        cache = cache_root()
        cache.mkdir(parents=True, exist_ok=True)
        self.stage_repository()
        archive, security = apt_mirrors()
        timed(self.timings, "base images", lambda: self.run(
            [str(self.stage / "deploy" / "offline" / "build-base-images.sh"), "--mirror", archive,
             "--security-mirror", security, "--suite", SUITE, "--cache", str(cache / "images")], timeout=900))
        timed(self.timings, "wheels", lambda: self.wheels(cache))
        self.run([str(self.stage / "deploy" / "make-secrets.sh")], env={"TP_SECRETS_DIR": str(self.secrets)})
        self.compose_base = [*compose_command(self.engine), "-f", "docker-compose.yml",
                             "-f", "docker-compose.offline.yml"]
        self.compose_version = self.compose("version", timeout=30).stdout.strip().splitlines()[0]
        timed(self.timings, "thalex-tp image", lambda: self.compose("build", timeout=900))

    def stage_repository(self) -> None:
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "secrets", "*.whl")
        self.stage.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, self.stage / name)
        for name in ("services", "deploy"):
            shutil.copytree(REPO / name, self.stage / name, ignore=ignore)

    def wheels(self, cache: Path) -> None:
        """deploy/wheels/ of the staged copy, from the cache when pyproject.toml and the image match."""
        image_id = self.engine.docker("image", "inspect", "--format", "{{.Id}}", PYTHON_IMAGE).stdout.strip()
        key = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + image_id.encode()).hexdigest()[:16]
        cached = cache / f"wheels-{key}"
        target = self.stage / "deploy" / "wheels"
        if not cached.is_dir():
            command = [str(self.stage / "deploy" / "offline" / "make-wheels.sh"), "--image", PYTHON_IMAGE,
                       "--out", str(target), "--pip-cache", str(cache / "pip")]
            if cert := pip_cert():
                command += ["--cert", cert]
            self.run(command, timeout=600)
            for old in cache.glob("wheels-*"):
                shutil.rmtree(old, ignore_errors=True)
            staging = cache / f"staging-{key}-{os.getpid()}"  # another run may be caching too
            shutil.copytree(target, staging, ignore=shutil.ignore_patterns("README.md"))
            try:
                staging.rename(cached)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)
            return
        for wheel in cached.glob("*.whl"):
            shutil.copy2(wheel, target / wheel.name)

    # ------------------------------------------------------------------ running

    def env(self) -> dict[str, str]:
        return self.engine.env(
            # Compose v1 adds --profile to .env's COMPOSE_PROFILES=live; the variable replaces it (v1 and v2)
            COMPOSE_PROFILES="paper",
            TP_SECRETS_DIR=str(self.secrets),
            TP_REDIS_HOST_PORT=str(self.ports["redis"]), TP_PAPER_HOST_PORT=str(self.ports["paper"]),
            TP_PROMETHEUS_HOST_PORT=str(self.ports["prometheus"]),
            TP_GRAFANA_HOST_PORT=str(self.ports["grafana"]))

    def run(self, argv: list[str], timeout: float = 300, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                                cwd=self.stage / "deploy",
                                env={**self.env(), **(env or {})})
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                                 f"{result.stderr[-4000:]}")
        return result

    def compose(self, *args: str, timeout: float = 300,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([*self.compose_base, *args], timeout=timeout, check=check)

    def up(self) -> None:
        timed(self.timings, "up", lambda: self.compose("up", "-d", timeout=600))
        timed(self.timings, "healthy", lambda: self.wait_healthy(180))

    def containers(self, all_: bool = True) -> dict[str, dict[str, Any]]:
        """service name -> `docker inspect` of its container (this project's only)."""
        ids = self.engine.docker("ps", "-q", *(["-a"] if all_ else []), "--filter",
                                 f"label=com.docker.compose.project={PROJECT}").stdout.split()
        if not ids:
            return {}
        inspected = json.loads(self.engine.docker("inspect", *ids).stdout)
        return {c["Config"]["Labels"]["com.docker.compose.service"]: c for c in inspected}

    def states(self) -> dict[str, str]:
        """service -> `running/healthy`, `running/starting`, `exited/0` ... (exit code once stopped)."""
        out = {}
        for service, c in self.containers().items():
            state = c["State"]
            health = state.get("Health", {}).get("Status") if state["Status"] == "running" else None
            out[service] = f"{state['Status']}/{health or state['ExitCode']}"
        return out

    def wait_healthy(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            states = self.states()
            if (all(states.get(s) == "running/healthy" for s in LONG_RUNNING)
                    and states.get("paper-keys") == "exited/0"):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"not every container healthy within {timeout} s: {states}\n"
                                     f"{self.logs()}")
            time.sleep(1.0)

    def logs(self, tail: int = 40) -> str:
        logs = self.compose("logs", "--no-color", "--tail", str(tail), check=False, timeout=60)
        return logs.stdout[-12000:]

    def exec(self, service: str, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        container = self.containers(all_=False)[service]["Id"]
        return self.engine.docker("exec", *(["--user", user] if user else []), container, *argv, check=False,
                                  timeout=60)

    # ------------------------------------------------------------------ the host's view (published ports)

    def admin_password(self) -> str:
        return (self.secrets / "redis_admin.txt").read_text().strip()

    def prometheus(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/{path}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())["data"]

    def down(self) -> None:
        timed(self.timings, "down",
              lambda: self.compose("down", "--volumes", "--remove-orphans", timeout=300))
