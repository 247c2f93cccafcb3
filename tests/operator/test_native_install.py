"""The native install (docs/operations.md, "Native install"): its systemd units and its walkthrough.

The units are checked by `systemd-analyze verify`. The walkthrough is run as far as a machine
without systemd as PID 1 allows: its own shell commands (keygen, key files), its configuration
file, `check-config --service all`, then each unit's ExecStart with the unit's Environment= and
LoadCredential= (copied into a credentials directory, as systemd does for `%d`), against a
Redis running deploy/redis/users.acl and the paper exchange; then its operator commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.sync.client import connect

from services.common.redis_server import free_port
from tests.deploy.support import AclRedis, acl_redis, need_binary

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
GUIDE = REPO / "docs" / "operations.md"
BIN = Path(sys.executable).parent / "thalex-tp"
FIVE = ("ingest", "portfolio", "takeprofit", "executor", "notify")


@dataclass
class Unit:
    name: str
    exec_start: str
    environment: dict[str, str] = field(default_factory=dict)
    credentials: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Unit:
        text = path.read_text()
        unit = cls(path.name, re.search(r"^ExecStart=(.+)$", text, re.M).group(1))  # type: ignore[union-attr]
        for name, value in re.findall(r"^Environment=([A-Z0-9_]+)=(.+)$", text, re.M):
            unit.environment[name] = value
        for name, source in re.findall(r"^LoadCredential=([^:]+):(.+)$", text, re.M):
            unit.credentials[name] = source
        return unit


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = need_binary("systemd-analyze", "systemd")
    for unit in UNITS.iterdir():  # verify checks ExecStart exists: point it at this checkout's thalex-tp
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/thalex-tp/bin/thalex-tp", str(BIN)))
    files = sorted(str(p) for p in tmp_path.iterdir())
    assert len(files) == 7, files  # five services, the paper exchange, the target
    done = subprocess.run([binary, "verify", *files], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_only_the_executor_gets_the_trading_key_and_ingest_the_read_only_one() -> None:
    units = {name: Unit.read(UNITS / f"thalex-tp-{name}.service") for name in FIVE}
    holders = {name for name, u in units.items() if any("trading" in s for s in u.credentials.values())}
    assert holders == {"executor"}
    assert {n for n, u in units.items() if any("read_only" in s for s in u.credentials.values())} == {
        "ingest"
    }
    for name, unit in units.items():
        assert unit.environment["TP_REDIS__USERNAME"] == name
        assert unit.credentials["redis_password"] == f"/etc/thalex-tp/secrets/redis_{name}.txt"
        assert "RestartPreventExitStatus=2" in (UNITS / unit.name).read_text()
    target = (UNITS / "thalex-tp.target").read_text()
    assert all(f"thalex-tp-{name}.service" in target for name in FIVE) and "paper" not in target


def block_after(marker: str) -> str:
    """The fenced block that follows `<!-- marker -->` in the guide."""
    text = GUIDE.read_text()
    after = text[text.index(f"<!-- {marker} -->") :]
    return re.search(r"```\w*\n(.*?)```", after, re.S).group(1)  # type: ignore[union-attr]


@dataclass
class Machine:
    """What the walkthrough made, under a temporary /etc/thalex-tp."""

    root: Path
    redis: AclRedis
    paper_port: int = field(default_factory=free_port)
    ports: dict[str, int] = field(default_factory=lambda: {s: free_port() for s in FIVE})
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def here(self, text: str) -> str:
        """The guide's text with this machine's paths and ports."""
        return (
            text.replace("/opt/thalex-tp/bin/thalex-tp", str(BIN))
            .replace("/etc/thalex-tp", str(self.root))
            .replace("127.0.0.1:6379", f"127.0.0.1:{self.redis.port}")
            .replace("127.0.0.1:8765", f"127.0.0.1:{self.paper_port}")
            .replace("--port 8765", f"--port {self.paper_port}")
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TP_")}
        env.update({f"TP_METRICS__{s.upper()}_PORT": str(p) for s, p in self.ports.items()})
        return env

    def start(self, unit_file: str) -> None:
        """Start a unit the way systemd would: its credentials copied, %d pointing at them."""
        unit = Unit.read(UNITS / unit_file)
        credentials = self.root.parent / "credentials" / unit.name
        credentials.mkdir(parents=True, exist_ok=True)
        for name, source in unit.credentials.items():
            shutil.copyfile(self.here(source), credentials / name)
        env = self.env()
        env.update({k: v.replace("%d", str(credentials)) for k, v in unit.environment.items()})
        log = open(self.root.parent / f"{unit.name}.log", "ab")  # noqa: SIM115 - the process keeps it
        self.processes[unit.name] = subprocess.Popen(
            self.here(unit.exec_start).split(), env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT
        )

    def run(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.here(command),
            shell=True,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=self.root,
            timeout=60,
            check=False,
        )

    def healthy(self, service: str) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.ports[service]}/health", timeout=2
            ) as answer:
                return bool(json.loads(answer.read())["healthy"])
        except OSError:
            return False

    def trade(self) -> None:
        with connect(f"ws://127.0.0.1:{self.paper_port}/ws/api/v2") as ws:
            ws.send(
                json.dumps(
                    {
                        "method": "paper/trade",
                        "id": 1,
                        "params": {
                            "key_id": "paper-executor",
                            "instrument_name": "BTC-PERPETUAL",
                            "direction": "buy",
                            "amount": 0.01,
                        },
                    }
                )
            )
            while json.loads(ws.recv(timeout=10)).get("id") != 1:
                pass

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.root.parent.glob("*.log")
        )

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def wait(check, within: float, what: str, machine: Machine) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{machine.logs()}")
        time.sleep(0.3)


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    with acl_redis(tmp_path / "redis") as redis:
        root = tmp_path / "etc-thalex-tp"
        secrets = root / "secrets"
        secrets.mkdir(parents=True)
        for user, password in redis.passwords.items():  # what make-secrets.sh wrote, step 2
            (secrets / f"redis_{user}.txt").write_text(password + "\n")
            (secrets / f"redis_{user}.txt").chmod(0o600)
        (secrets / "command_key.txt").write_text(os.urandom(32).hex() + "\n")  # make-secrets.sh too
        (secrets / "command_key.txt").chmod(0o600)
        (root / "notify").mkdir()
        running = Machine(root, redis)
        try:
            yield running
        finally:
            running.stop()


def test_the_walkthrough_on_the_paper_exchange(machine: Machine) -> None:
    text = GUIDE.read_text()
    step3 = text[text.index("### 3. Practise on the paper exchange") : text.index("<!-- native-config -->")]
    key_commands = re.search(r"```sh\n(.*?)```", step3, re.S).group(1)  # type: ignore[union-attr]
    done = machine.run(f"set -e\n{key_commands}")
    assert done.returncode == 0, done.stderr
    assert (machine.root / "paper-keys" / "paper-ingest.pub.pem").exists()
    config = machine.root / "config.toml"
    config.write_text(machine.here(block_after("native-config")))
    commands = [line for line in block_after("native-commands").splitlines() if line.strip()]
    outcomes: dict[str, subprocess.CompletedProcess[str]] = {}
    for line in commands:
        if line.startswith("systemctl start"):
            for unit in line.split()[2:]:
                if unit.endswith(".target"):
                    for name in FIVE:
                        machine.start(f"thalex-tp-{name}.service")
                else:
                    machine.start(unit)
                    wait(lambda: _listens(machine.paper_port), 20, "the paper exchange", machine)
            if "thalex-tp.target" in line:
                wait(lambda: all(machine.healthy(s) for s in FIVE), 60, "every service healthy", machine)
                machine.trade()  # a position to guard (docs: paper/trade over the websocket)
                wait(lambda: "BTC-PERPETUAL" in machine.run(commands[5]).stdout, 30, "the position", machine)
            continue
        if line.startswith("systemctl"):
            continue  # daemon-reload, status: systemd's own
        if line.split()[1] == "status":  # dry run: every service healthy, and NOT GUARDING saying why
            def only_the_dry_run(line: str = line) -> bool:
                outcomes["status"] = machine.run(line)
                reasons = outcomes["status"].stdout.split("\n\n")[0].splitlines()[1:]
                return outcomes["status"].returncode == 5 and [r.split(":")[0].strip() for r in reasons] == [
                    "executor"] and "nothing will be closed" in reasons[0]
            wait(only_the_dry_run, 30, "status: not guarding for the dry run alone", machine)
            continue
        outcomes[line.split()[1]] = result = machine.run(line)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}\n{machine.logs()}"
    checked = outcomes["check-config"].stderr
    assert "ERROR" not in checked and "executor.dry_run" in checked and "no order will be sent" in checked
    assert "accepted by take-profit: operator halt set" in outcomes["halt"].stdout
    assert "accepted by take-profit: closing every position" in outcomes["close-all"].stdout
    assert "BUT NOTHING WILL BE CLOSED" in outcomes["close-all"].stderr

    def dry_run_reported() -> bool:
        history = machine.run(commands[-1] + " --json")
        rows = json.loads(history.stdout or "[]")
        return any(
            r["kind"] == "decision" and r["reason"] == "manual" and r["outcome"] == "dry_run" for r in rows
        )

    wait(dry_run_reported, 30, "the manual decision, ended dry_run", machine)
    assert all(p.poll() is None for p in machine.processes.values()), machine.logs()
    denials = [d for d in machine.redis.acl_denials() if d.get("object") != "client|setinfo"]
    assert denials == [], denials


def _listens(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
