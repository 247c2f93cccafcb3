"""The whole guardian as separate processes, for fault injection and benchmarks.

`Pipeline` starts a private redis-server (AOF on), the paper exchange
(`python -m services.paper`, control API on) and the four services
(`python -m services.<name>`) with one TOML config, like `thalex-tp demo` does.
It offers:

* process control: `kill(name)` (SIGKILL), `start_service(name)`, `restart_redis()`,
  `wait_healthy(name)` (GET /health == 200), a second executor replica;
* the market: `control(method, params)` (a persistent control websocket),
  a background `Trader` making small trades via `paper/trade` on the guardian's
  account while the random walk keeps ticking, `force_closure()` (moves the index
  in the direction that makes the account money until the take-profit fires);
* the invariants (`check_invariants()`):
  - the latest snapshot's positions equal the exchange's (`private/portfolio` read with a
    read-only key of the account);
  - every trade of the account (`private/trade_history`) is on `tp:fills` exactly once
    (entries the test injected itself are excluded by entry id), and no entry on `tp:fills`
    names a trade the exchange does not know;
  - no position was closed twice or flipped: replaying the account's trades in order, a
    trade of the executor (label `tp-...`) never moves a position through zero nor trades
    on a flat one, and the trades of one command never close more than that command asked;
  - every entry the test registered as malformed is on `tp:deadletter`.

The config sets `[portfolio] drift_grace_seconds` to an hour: the portfolio's
reconciliation would otherwise adopt the exchange's position after 5 s and hide
a fill lost or counted twice — here the ledger has to be right on its own.

As in production (issue 21): Redis runs the shipped `deploy/redis/users.acl` (namespace `tp`),
each service logs in as its own ACL user with its password file, take-profit signs its commands
with the command key, and `check_invariants` also requires Redis' ACL LOG to be empty (nothing a
service really did was refused) and every command to verify under that key. `acl=False` runs the
services unauthenticated (a Redis < 7 has no ACL selectors).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import websockets
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common.bus import entry_document, raise_if_cancelled
from services.common.contracts import Command
from services.common.redis_server import RedisServer, free_port
from services.common.signing import is_authentic
from services.common.snapshots import read_view
from services.common.streams import Names
from services.paper.keys import generate_key

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("ingest", "portfolio", "takeprofit", "executor")
ACCOUNT = "e2e"
ANSWER_TIMEOUT = 10.0
"""Seconds the harness waits for one answer of the paper exchange before calling it lost."""
INGEST_KEY = "e2e-ingest"
EXECUTOR_KEY = "e2e-executor"
TRADER_KEY = "e2e-trader"
READER_KEY = "e2e-reader"
PERP = "BTC-PERPETUAL"
ETH_PERP = "ETH-PERPETUAL"
EXECUTOR_LABEL_PREFIX = "tp-"
TOLERANCE = 1e-6
COMMAND_KEY_FILE = "command_key.txt"
ACL_SERVICES = {"ingest": "ingest", "portfolio": "portfolio", "takeprofit": "takeprofit",
                "executor": "executor", "executor-2": "executor"}
"""Process → its Redis ACL user (deploy/redis/users.acl)."""


# ----------------------------------------------------------------------------- config

def config_text(redis_url: str, paper_url: str, keys: Path, namespace: str, ports: dict[str, int],
                overrides: dict[str, dict[str, Any]] | None = None) -> str:
    sections: dict[str, dict[str, Any]] = {
        "redis": {"url": redis_url, "namespace": namespace},
        "commands": {"signing_key_file": str(keys / COMMAND_KEY_FILE)},
        "thalex": {
            "network": paper_url,
            "key_id": INGEST_KEY,
            "private_key_file": str(keys / f"{INGEST_KEY}.pem"),
        },
        "executor": {
            "key_id": EXECUTOR_KEY,
            "private_key_file": str(keys / f"{EXECUTOR_KEY}.pem"),
            "deadline_seconds": 10.0,
        },
        "portfolio_take_profit": {
            "min_profit_usd": 1.1,
            "cooldown_seconds": 0.5,
            "partial_close_fraction": 0.0,
            "check_interval_seconds": 1.0,
            "emergency_close_threshold": -1000.0,
            "max_position_age_hours": 24.0,
        },
        "portfolio": {"drift_grace_seconds": 3600.0, "stale_after_seconds": 30.0},
        "ingest": {"watch_list": [PERP, ETH_PERP], "ticker_delay": "raw"},
        "metrics": {f"{name}_port": port for name, port in ports.items()},
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("REDIS_URL", None)
    env.setdefault("TP_LOG_LEVEL", "INFO")
    return env


@dataclass
class Proc:
    """One child process (a service, or the paper exchange)."""

    name: str
    argv: list[str]
    log_path: Path
    port: int | None = None  # the metrics port of a service
    env: dict[str, str] = field(default_factory=dict)
    """What this process gets on top of `child_env()` (its Redis user and password file)."""
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env={**child_env(), **self.env}, cwd=REPO,
            start_new_session=True,
        )
        log.close()
        self.started_at = time.time()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9: no cleanup, no last ack."""
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def http_health(port: int, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=timeout) as answer:
            return answer.status == 200
    except Exception:  # connection refused, 503, timeout: not healthy (yet)
        return False


# ----------------------------------------------------------------------------- exchange access

class PaperControl:
    """`paper/*` calls over one persistent websocket (reopened when it drops)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ids = itertools.count(1)
        self.ws: Any = None
        self.lock = asyncio.Lock()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        async with self.lock:
            for attempt in range(3):
                try:
                    if self.ws is None:
                        self.ws = await websockets.connect(self.url, max_size=None)
                    request_id = next(self.ids)
                    await self.ws.send(
                        json.dumps({"method": method, "params": params or {}, "id": request_id})
                    )
                    while True:
                        answer = json.loads(await asyncio.wait_for(self.ws.recv(), ANSWER_TIMEOUT))
                        if answer.get("id") == request_id:
                            if "error" in answer:
                                raise RuntimeError(f"{method}: {answer['error']}")
                            return answer["result"]
                except (OSError, websockets.ConnectionClosed, TimeoutError):
                    # a lost answer must fail this call loudly, not hang the test until pytest-timeout
                    if self.ws is not None:
                        self.ws.transport.abort()
                    self.ws = None
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.2)

    async def close(self) -> None:
        """Close at once: waiting for the closing handshake of an exchange already stopped took 10 s."""
        if self.ws is not None:
            self.ws.transport.abort()
            self.ws = None


class AccountReader:
    """Reads the guardian's account on the exchange with a read-only key (`private/*`)."""

    def __init__(self, url: str, kid: str, pem: str) -> None:
        self.url, self.kid, self.pem = url, kid, pem
        self.ids = itertools.count(1)

    async def _calls(self, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        async with websockets.connect(self.url, max_size=None) as ws:
            token = jwt.encode({"iat": time.time()}, self.pem, algorithm="RS512", headers={"kid": self.kid})
            results = []
            for method, params in [("public/login", {"token": token}), *calls]:
                request_id = next(self.ids)
                await ws.send(json.dumps({"method": method, "params": params, "id": request_id}))
                while True:
                    answer = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT))
                    if answer.get("id") == request_id:
                        if "error" in answer:
                            raise RuntimeError(f"{method}: {answer['error']}")
                        results.append(answer["result"])
                        break
            return results[1:]

    async def positions(self) -> dict[str, float]:
        (portfolio,) = await self._calls([("private/portfolio", {})])
        return {
            row["instrument_name"]: float(row["position"])
            for row in portfolio
            if float(row["position"]) != 0.0
        }

    async def trades(self) -> list[dict[str, Any]]:
        """The account's whole trade history, oldest first."""
        out: list[dict[str, Any]] = []
        bookmark = None
        while True:
            params: dict[str, Any] = {"limit": 1000, "sort": "ascending"}
            if bookmark:
                params["bookmark"] = bookmark
            (page,) = await self._calls([("private/trade_history", params)])
            out.extend(page["trades"])
            bookmark = page.get("bookmark")
            if not bookmark:
                return out


# ----------------------------------------------------------------------------- the pipeline

@dataclass
class Pipeline:
    workdir: Path
    seed: int = 1
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespace: str = "tp"
    acl: bool = True
    """Run Redis with the shipped ACL and every service as its own user (needs redis-server >= 7)."""
    tick_interval: float = 0.25
    paper_argv_extra: list[str] = field(default_factory=list)
    paper_module: list[str] = field(default_factory=lambda: ["-m", "services.paper"])
    redis_server: RedisServer | None = None
    procs: dict[str, Proc] = field(default_factory=dict)
    control_client: PaperControl | None = None
    reader: AccountReader | None = None
    redis: Redis | None = None
    paper_url: str = ""
    config_path: Path | None = None
    injected: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Entries the test wrote itself, per stream (excluded from exactly-once counts)."""
    malformed: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    """Malformed entries the test wrote, per stream: each must end up on tp:deadletter."""
    health_times: list[tuple[str, float]] = field(default_factory=list)
    """(service, seconds from its restart to /health 200) for every restart."""
    passwords: dict[str, str] = field(default_factory=dict)
    """ACL user → password (files in `<workdir>/secrets/redis_<user>.txt`)."""
    command_key: bytes = b""

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    # ---------------------------------------------------------------- start / stop

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis_server = RedisServer(self.workdir / "redis", appendonly=True, extra_args=self._acl_args())
        self.redis_server.start()
        keys = self.workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        self.command_key = os.urandom(32).hex().encode()
        (keys / COMMAND_KEY_FILE).write_bytes(self.command_key + b"\n")
        (keys / COMMAND_KEY_FILE).chmod(0o600)
        generate_key(keys, INGEST_KEY, read_only=True, account=ACCOUNT)
        generate_key(keys, READER_KEY, read_only=True, account=ACCOUNT)
        generate_key(keys, EXECUTOR_KEY, account=ACCOUNT)
        generate_key(keys, TRADER_KEY, account=ACCOUNT)
        paper_port = free_port()
        self.paper_url = f"ws://127.0.0.1:{paper_port}/ws/api/v2"
        paper = Proc(
            "paper",
            [
                sys.executable,
                *self.paper_module,
                "--host",
                "127.0.0.1",
                "--port",
                str(paper_port),
                "--keys",
                str(keys),
                "--control",
                "--seed",
                str(self.seed),
                "--reconnect-grace",
                "0",
                "--tick-interval",
                str(self.tick_interval),
                "--log-level",
                "WARNING",
                *self.paper_argv_extra,
            ],
            self.workdir / "logs" / "paper.log",
        )
        self.procs["paper"] = paper
        paper.start()
        await self._wait_port(paper, paper_port)
        self.control_client = PaperControl(self.paper_url)
        self.reader = AccountReader(self.paper_url, READER_KEY, (keys / f"{READER_KEY}.pem").read_text())
        ports = {name: free_port() for name in SERVICES}
        self.config_path = self.workdir / "e2e.toml"
        self.config_path.write_text(
            config_text(self.redis_server.url, self.paper_url, keys, self.namespace, ports, self.overrides)
        )
        # the harness' own client rides out a Redis restart (the services have their own ways)
        # the socket timeouts turn a hung call into an error naming it, instead of a pytest-timeout
        self.redis = Redis.from_url(
            self.redis_server.url,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 40),
            retry_on_error=[RedisConnectionError, OSError],
            **self.credentials("admin"),
            socket_timeout=ANSWER_TIMEOUT,
            socket_connect_timeout=ANSWER_TIMEOUT,
        )
        for name in SERVICES:
            self.procs[name] = Proc(
                name,
                [sys.executable, "-m", f"services.{name}", "--config", str(self.config_path)],
                self.workdir / "logs" / f"{name}.log",
                port=ports[name],
                env=self.user_env(name),
            )
            self.procs[name].start()
        await asyncio.gather(*(self.wait_healthy(name, within=30) for name in SERVICES))
        await self.wait_ingest_ready()

    def _acl_args(self) -> list[str]:
        """`--aclfile` of the shipped users.acl, rendered with fresh passwords as the Redis container does."""
        if not self.acl:
            return []
        from tests.deploy.support import render_acl, write_passwords  # Redis >= 7 and sha256sum
        if self.namespace not in ("tp", "paper"):
            raise ValueError(f"namespace {self.namespace!r}: the shipped ACL names tp and paper only")
        secrets = self.workdir / "secrets"
        self.passwords = write_passwords(secrets)
        for path in secrets.iterdir():
            path.chmod(0o600)
        rendered = render_acl(secrets, self.workdir / "users.acl")
        if rendered.returncode != 0:
            raise RuntimeError(f"render-acl failed: {rendered.stderr}")
        return ["--aclfile", str(self.workdir / "users.acl"), "--acllog-max-len", "1000"]

    def credentials(self, user: str) -> dict[str, str]:
        """redis-py keyword arguments to log in as `user` (nothing without the ACL)."""
        return {"username": user, "password": self.passwords[user]} if self.acl else {}

    def user_env(self, process: str) -> dict[str, str]:
        """What docker-compose.yml sets for a service: its Redis user and password file."""
        if not self.acl:
            return {}
        user = ACL_SERVICES[process]
        return {"TP_REDIS__USERNAME": user,
                "TP_REDIS__PASSWORD_FILE": str(self.workdir / "secrets" / f"redis_{user}.txt")}

    async def acl_denials(self) -> list[dict[str, Any]]:
        """Redis' ACL LOG: commands or keys users.acl refused (redis-py's CLIENT SETINFO aside)."""
        if not self.acl:
            return []
        assert self.redis is not None
        entries = await self.redis.acl_log(count=1000)
        decoded = [{k: (v.decode() if isinstance(v, bytes) else v) for k, v in e.items()} for e in entries]
        return [d for d in decoded if d.get("object") != "client|setinfo"]

    async def wait_ingest_ready(self, within: float = 20.0) -> None:
        """Ingest has published instrument metadata and ticks flow."""
        assert self.redis is not None

        async def ready() -> bool:
            assert self.redis is not None
            return bool(await self.redis.hexists(self.names.instruments, PERP)) and \
                await self.redis.xlen(self.names.ticks) > 0
        await eventually(ready, within)

    async def stop(self) -> None:
        # the control connection first: a paper exchange stopping waits for its open connections to
        # close, and this loop, blocked in `Proc.stop`, could not answer (10 s per test)
        if self.control_client is not None:
            await self.control_client.close()
        for name in ["executor-2", *reversed(SERVICES)]:
            if name in self.procs:
                self.procs[name].stop()
        if "paper" in self.procs:  # after a trade it takes 10 s to stop on SIGTERM; nothing is checked now
            self.procs["paper"].kill()
        if self.redis is not None:
            await self.redis.aclose()
        if self.redis_server is not None:
            self.redis_server.stop()

    async def _wait_port(self, proc: Proc, port: int, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{proc.name} did not listen on {port}")

    # ---------------------------------------------------------------- processes

    async def health(self, name: str) -> bool:
        port = self.procs[name].port
        assert port is not None
        return await asyncio.to_thread(http_health, port)

    async def wait_healthy(self, name: str, within: float = 5.0) -> float:
        """Seconds from the process' start to /health 200 (raises after `timeout` s from now)."""
        proc = self.procs[name]
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if not proc.alive():
                raise AssertionError(f"{name} died:\n{proc.log()[-3000:]}")
            if await self.health(name):
                return time.time() - proc.started_at
            await asyncio.sleep(0.05)
        raise AssertionError(f"{name} not healthy within {within} s:\n{proc.log()[-3000:]}")

    async def healthy_since(self, name: str, since: float, within: float = 5.0) -> float:
        """Seconds from `since` (a fault) until /health 200 again; raises after `timeout`."""
        await self.wait_healthy(name, within=within - (time.time() - since))
        return time.time() - since

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    async def start_service(self, name: str, health_timeout: float = 5.0) -> float:
        """(Re)start a service; returns seconds until its /health said 200 (must be <= health_timeout)."""
        proc = self.procs[name]
        proc.restarts += 1
        proc.start()
        took = await self.wait_healthy(name, within=health_timeout + 1.0)
        self.health_times.append((name, took))
        return took

    async def restart(self, name: str) -> float:
        self.kill(name)
        return await self.start_service(name)

    async def add_executor_replica(self) -> None:
        assert self.config_path is not None
        port = free_port()
        proc = Proc(
            "executor-2",
            [
                sys.executable,
                "-m",
                "services.executor",
                "--config",
                str(self.config_path),
                "--replica",
                "2",
                "--metrics-port",
                str(port),
            ],
            self.workdir / "logs" / "executor-2.log",
            port=port,
            env=self.user_env("executor-2"),
        )
        self.procs["executor-2"] = proc
        proc.start()
        self.health_times.append(("executor-2", await self.wait_healthy("executor-2", within=30)))

    async def restart_redis(self, down_seconds: float = 0.5) -> float:
        """Stop Redis gracefully (AOF flushed), keep it down a moment, start it on the same port.

        Returns the seconds from Redis being back until every service answered /health 200.
        """
        assert self.redis_server is not None
        self.redis_server.stop()
        await asyncio.sleep(down_seconds)
        self.redis_server.start()
        back = time.time()
        services = [n for n in self.procs if n != "paper"]
        for name in services:
            await self.wait_healthy(name, within=10)
        took = time.time() - back
        self.health_times.append(("all after redis restart", took))
        return took

    # ---------------------------------------------------------------- market

    async def control(self, method: str, params: dict[str, Any] | None = None) -> Any:
        assert self.control_client is not None
        return await self.control_client.call(method, params)

    async def trade(self, instrument: str, direction: str, amount: float) -> list[dict[str, Any]]:
        result = await self.control("paper/trade", {"key_id": TRADER_KEY, "instrument_name": instrument,
                                                    "direction": direction, "amount": amount})
        return list(result["trades"])

    async def exchange_positions(self) -> dict[str, float]:
        assert self.reader is not None
        return await self.reader.positions()

    async def latest_snapshot(self) -> dict[str, Any] | None:
        assert self.redis is not None
        view, header = await read_view(self.redis, self.names)  # v2: the rows from the portfolio's hash
        return None if header is None else view.full_snapshot(header).model_dump(mode="json")

    async def stream_docs(self, stream: str) -> list[tuple[str, dict[str, Any] | None]]:
        assert self.redis is not None
        out = []
        for entry_id, fields in await self.redis.xrange(stream):
            try:
                out.append((entry_id.decode(), entry_document(fields)[1]))
            except Exception:
                out.append((entry_id.decode(), None))
        return out

    async def commands(self) -> list[dict[str, Any]]:
        return [doc for _, doc in await self.stream_docs(self.names.commands) if doc and "command_id" in doc]

    async def reports(self) -> list[dict[str, Any]]:
        return [doc for _, doc in await self.stream_docs(self.names.reports) if doc and "command_id" in doc]

    async def outcome(self, command_id: str) -> str | None:
        for report in await self.reports():
            if report["command_id"] == command_id and report["status"] in ("completed", "failed") \
                    and not report.get("instrument"):
                return str(report["status"])
        return None

    async def halted(self) -> bool:
        assert self.redis is not None
        return bool(await self.redis.exists(self.names.halt))

    async def force_closure(self, within: float = 40.0, step_pct: float = 0.15,
                            during: Any = None) -> dict[str, Any]:
        """Move each underlying the way that makes the account money until a take-profit command appears,
        then wait for its outcome. `during` (an async callable taking the command) runs as soon as
        the command is seen, before waiting for the outcome (e.g. to kill a service mid-closure).
        Returns the command; raises if none came or it did not complete.
        """
        known = {c["command_id"] for c in await self.commands()}
        deadline = time.monotonic() + within
        command = None
        while time.monotonic() < deadline and command is None:
            new = [c for c in await self.commands() if c["command_id"] not in known]
            if new:
                command = new[0]
                break
            if not await self.halted():
                positions = await self.exchange_positions()
                for underlying, perp in (("BTCUSD", PERP), ("ETHUSD", ETH_PERP)):
                    held = positions.get(perp, 0.0)
                    if abs(held) > TOLERANCE:
                        await self.control("paper/move_index", {"underlying": underlying,
                                                                "pct": step_pct if held > 0 else -step_pct})
            await asyncio.sleep(0.15)
        if command is None:
            raise AssertionError(
                f"no closure decided within {within} s; last snapshot {await self.latest_snapshot()}"
            )
        if during is not None:
            await during(command)
        await eventually_value(
            lambda: self.outcome(command["command_id"]), max(5.0, deadline - time.monotonic()) + 20
        )
        return command

    async def ensure_position(self, minimum: float = 0.002) -> None:
        """The account holds something to close (on BTC-PERPETUAL)."""
        positions = await self.exchange_positions()
        if abs(positions.get(PERP, 0.0)) < minimum:
            await self.trade(PERP, "buy", 0.01)

    # ---------------------------------------------------------------- injected entries

    async def xadd_raw(self, stream: str, fields: dict[str, Any], malformed: bool = False) -> str:
        assert self.redis is not None
        entry_id = (await self.redis.xadd(stream, fields)).decode()
        self.injected[stream].add(entry_id)
        if malformed:
            self.malformed[stream].add(entry_id)
        return entry_id

    # ---------------------------------------------------------------- invariants

    async def wait_settled(self, within: float = 20.0) -> None:
        """Portfolio's latest snapshot equals the exchange's positions (what ingest has to deliver)."""
        last: list[Any] = []

        async def equal() -> bool:
            exchange = await self.exchange_positions()
            snap = await self.latest_snapshot()
            ledger = {p["instrument"]: p["position"] for p in (snap or {}).get("positions", [])
                      if abs(p["position"]) > TOLERANCE}
            last[:] = [exchange, ledger]
            return positions_equal(exchange, ledger)
        try:
            await eventually(equal, within, interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"portfolio positions != exchange positions: exchange {last[0]}, ledger {last[1]}"
            ) from None

    async def check_invariants(self, settle_timeout: float = 20.0) -> dict[str, Any]:
        """Every invariant of the issue; returns figures for the faults table (raises on a violation)."""
        await self.wait_settled(settle_timeout)
        assert self.reader is not None
        trades = await self.reader.trades()
        problems: list[str] = []
        # exactly once on tp:fills (entries the test wrote itself excluded)
        fills = await self.stream_docs(self.names.fills)
        counted = Counter(doc["trade_id"] for entry_id, doc in fills
                          if entry_id not in self.injected[self.names.fills] and doc and "trade_id" in doc)
        exchange_ids = {t["trade_id"] for t in trades}
        missing = exchange_ids - set(counted)
        twice = {k: v for k, v in counted.items() if v > 1}
        unknown = set(counted) - exchange_ids
        if missing:
            problems.append(f"{len(missing)} trades never reached tp:fills: {sorted(missing)[:5]}")
        if twice:
            problems.append(f"trades on tp:fills more than once: {dict(list(twice.items())[:5])}")
        if unknown:
            problems.append(f"tp:fills names trades the exchange does not know: {sorted(unknown)[:5]}")
        # no double close, no flip
        problems += closing_problems(trades, await self.commands())
        # every malformed entry dead-lettered
        dead = await self.deadlettered()
        for stream, ids in self.malformed.items():
            lost = ids - dead.get(stream, set())
            if lost:
                problems.append(
                    f"{len(lost)} of {len(ids)} malformed entries on {stream} not in tp:deadletter"
                )
        # every service alive
        for name, proc in self.procs.items():
            if not proc.alive():
                problems.append(f"{name} is not running: {proc.log()[-2000:]}")
        # as in production: nothing the services did was refused by the ACL, every command is take-profit's
        denials = await self.acl_denials()
        if denials:
            problems.append(f"users.acl refused {len(denials)} command(s): {denials[:3]}")
        for command in await self.commands():
            if not is_authentic(Command.model_validate(command), self.command_key):
                problems.append(f"command {command['command_id']} does not verify under the command key")
        assert not problems, "\n".join(problems)
        executor_trades = [t for t in trades if str(t.get("label") or "").startswith(EXECUTOR_LABEL_PREFIX)]
        return {
            "trades": len(trades),
            "closing_trades": len(executor_trades),
            "commands": len(await self.commands()),
            "malformed": sum(len(v) for v in self.malformed.values()),
        }

    async def deadlettered(self) -> dict[str, set[str]]:
        assert self.redis is not None
        out: dict[str, set[str]] = defaultdict(set)
        last = "-"
        while True:
            batch = await self.redis.xrange(self.names.deadletter, min=last, count=10_000)
            if last != "-":
                batch = batch[1:]
            if not batch:
                return out
            for _, fields in batch:
                try:
                    doc = entry_document(fields)[1]
                    out[doc["source_stream"]].add(doc["entry_id"])
                except Exception:
                    pass
            last = batch[-1][0].decode()


def positions_equal(a: dict[str, float], b: dict[str, float], tolerance: float = TOLERANCE) -> bool:
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) <= tolerance for k in set(a) | set(b))


def command_label(command_id: str) -> str:
    """The executor's order label for a command (docs/executor.md: `tp-` + base32(sha256)[:26])."""
    import base64
    import hashlib
    return "tp-" + base64.b32encode(hashlib.sha256(command_id.encode()).digest()).decode().lower()[:26]


def closing_problems(trades: list[dict[str, Any]], commands: list[dict[str, Any]]) -> list[str]:
    """Replay the account's trades in order and look for a double close or a flip.

    * a trade of the executor (label `tp-...`) never trades a flat position nor moves one through zero;
    * one command never closes more of an instrument than the account held when its first closing
      trade happened plus what others traded there meanwhile (a full closure closes the whole
      position it finds on the exchange, which can exceed the snapshot's figure when the snapshot
      lagged; closing it, re-opened, a second time would exceed this bound);
    * a partial closure never closes more than it listed (+ one volume tick of rounding);
    * every closing label belongs to a command.
    """
    problems, closed, allowance = _replay_closing_trades(trades)
    return problems + _closed_beyond_commands(closed, allowance, commands)


def _replay_closing_trades(
    trades: list[dict[str, Any]],
) -> tuple[list[str], dict[tuple[str, str], float], dict[tuple[str, str], float]]:
    """The flips and closes of flat positions; what each (label, instrument) closed, and may close."""
    problems = []
    position: dict[str, float] = defaultdict(float)
    closed: dict[tuple[str, str], float] = defaultdict(float)
    allowance: dict[tuple[str, str], float] = {}
    ordered = sorted(trades, key=lambda t: t.get("time", 0.0))  # stable: history order within one time
    for t in ordered:
        name = t["instrument_name"]
        signed = float(t["amount"]) * (1 if t["direction"] == "buy" else -1)
        before = position[name]
        after = before + signed
        label = str(t.get("label") or "")
        if label.startswith(EXECUTOR_LABEL_PREFIX):
            if abs(before) <= TOLERANCE:
                problems.append(f"closing trade {t['trade_id']} on a flat {name}")
            elif before * after < 0 and abs(after) > TOLERANCE:
                problems.append(f"closing trade {t['trade_id']} flipped {name}: {before} -> {after}")
            allowance.setdefault((label, name), abs(before))
            closed[(label, name)] += abs(signed)
        else:
            for key in allowance:  # others trading while a closure runs may give it more to close
                if key[1] == name:
                    allowance[key] += abs(signed)
        position[name] = 0.0 if abs(after) <= 1e-9 else after
    return problems, closed, allowance


def _closed_beyond_commands(closed: dict[tuple[str, str], float], allowance: dict[tuple[str, str], float],
                            commands: list[dict[str, Any]]) -> list[str]:
    """Closing labels of no command, and closes beyond what their command lists (or may close)."""
    problems = []
    listed: dict[tuple[str, str], float] = {}
    full: dict[str, bool] = {}
    labels = {}
    for c in commands:
        label = command_label(c["command_id"])
        labels[label] = c["command_id"]
        full[label] = float(c.get("fraction", 1.0)) >= 1.0
        for name, amount in zip(c["legs"]["instrument"], c["legs"]["amount"], strict=True):
            listed[(label, name)] = abs(float(amount))
    for (label, name), amount in closed.items():
        if label not in labels:
            problems.append(f"closing trades with label {label} of no known command")
            continue
        if (label, name) not in listed and not full[label]:
            problems.append(f"partial command {labels[label]} traded {name}, which it did not list")
        limit = allowance[(label, name)] if full[label] else listed.get((label, name), 0.0)
        if amount > limit + 1e-6:
            problems.append(
                f"command {labels[label]} closed {amount} of {name}, more than {limit}: closed twice"
            )
    return problems


# ----------------------------------------------------------------------------- background trading

class Trader:
    """Small trades on the guardian's account via `paper/trade`, while the test does its thing."""

    def __init__(self, pipeline: Pipeline, interval: float = 0.3, seed: int = 1,
                 instruments: tuple[str, ...] = (PERP,)) -> None:
        self.pipeline = pipeline
        self.interval = interval
        self.random = random.Random(seed)
        self.instruments = instruments
        self.task: asyncio.Task[None] | None = None
        self.made = 0
        self.errors = 0
        self.stopping = False

    async def _run(self) -> None:
        # the flag, not only the cancel: redis-py can turn a cancellation into one of its errors,
        # which the `except` below would swallow, and stop() would then wait forever (seen in a full run)
        while not self.stopping:
            name = self.random.choice(self.instruments)
            amount = 0.001 if name == PERP else 0.01
            # mostly buys: the account keeps something to close
            side = "buy" if self.random.random() < 0.7 else "sell"
            try:
                if not await self.pipeline.halted():  # a quoter stands down while halted
                    await self.pipeline.trade(name, side, amount)
                    self.made += 1
            except Exception:
                raise_if_cancelled()
                self.errors += 1
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


# ----------------------------------------------------------------------------- helpers

async def eventually(check: Any, within: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition {getattr(check, '__name__', check)} not met within {within} s")


async def eventually_value(get: Any, within: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = await get()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"no value within {within} s")
