"""The services and a real Prometheus, as docker compose wires them, without Docker.

Redis runs deploy/redis/users.acl; the paper exchange, ingest, portfolio, takeprofit and executor
run as processes, each under its own Redis user (the compose file's TP_REDIS__* variables); a
real `prometheus` scrapes them with deploy/prometheus/prometheus.yml (targets rewritten to
localhost, 1 s scrape) and loads alerts.yml. Then a position is opened on the paper account,
closed with `thalex-tp close-all` run as the `operator` user, and the test checks:

* every service target is `up`, answers /health with 200, and the key metrics are present;
* the closure went through all four services (decision, executor `completed`);
* every expression of the Grafana dashboard and of the alert rules evaluates on this
  Prometheus, and the rules are loaded and healthy;
* Redis' ACL LOG is empty: nothing the services really did was refused by users.acl.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from websockets.sync.client import connect

from services.common.redis_server import free_port
from services.paper.keys import generate_key
from tests.deploy.support import ALERTS_YML, PROMETHEUS_YML, REPO, AclRedis, acl_redis, need_binary
from tests.deploy.test_metrics_exist import alert_exprs, dashboard_exprs

SERVICES = ("ingest", "portfolio", "takeprofit", "executor", "notify")
PERP = "BTC-PERPETUAL"
KEY_METRICS = (
    "tp_portfolio_net_after_close_usd", "tp_portfolio_fees_paid_usd", "tp_portfolio_est_close_fees_usd",
    # per-instrument P&L is dropped once the closure ends the epoch: look back over the run
    "last_over_time(tp_portfolio_instrument_pnl_usd[10m])", "tp_portfolio_snapshot_latency_seconds_bucket",
    "tp_takeprofit_threshold_usd", "tp_takeprofit_decisions_total", "tp_takeprofit_closures_finished_total",
    "tp_takeprofit_lease_held", "tp_bus_stream_lag_entries", "tp_ingest_messages_total",
    "tp_ingest_tick_latency_seconds_bucket", "tp_ingest_seconds_since_last_message",
    "tp_executor_commands_total", "tp_executor_orders_sent_total", "tp_executor_time_to_flat_seconds_bucket",
)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout} s (last: {last!r})")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


class Stack:
    def __init__(self, workdir: Path, redis: AclRedis) -> None:
        self.workdir = workdir
        self.redis = redis
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.ports = {name: free_port() for name in SERVICES}
        self.paper_port = free_port()
        self.prometheus_port = free_port()
        self.logs = workdir / "logs"
        self.logs.mkdir()

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                       env={**os.environ, "TP_LOG_LEVEL": "INFO", **(env or {})})
        self.processes[name] = process
        return process

    def log_tail(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]

    def service_env(self, user: str) -> dict[str, str]:
        """What docker-compose.yml sets for a service (Redis user, password secret)."""
        return {"TP_REDIS__URL": self.redis.host_url, "TP_REDIS__USERNAME": user,
                "TP_REDIS__PASSWORD_FILE": str(self.workdir / "secrets" / f"redis_{user}.txt"),
                "TP_METRICS__HOST": "127.0.0.1"}

    @staticmethod
    def command_key(keys: Path) -> Path:
        """The secret take-profit signs commands with (docker-compose.yml: the command_key secret)."""
        path = keys / "command_key.txt"
        path.write_text(os.urandom(32).hex() + "\n")
        path.chmod(0o600)
        return path

    def start(self) -> None:
        keys = self.workdir / "keys"
        generate_key(keys, "ingest", read_only=True, account="acct")
        generate_key(keys, "executor", account="acct")
        self.spawn("paper", [sys.executable, "-m", "services.paper", "--host", "127.0.0.1", "--port",
                             str(self.paper_port), "--keys", str(keys), "--control", "--reconnect-grace", "0",
                             "--tick-interval", "0.1"])
        wait_for(lambda: listening(self.paper_port), 20, "paper exchange listening")
        config = self.workdir / "thalex-tp.toml"
        config.write_text(f"""
[thalex]
network = "ws://127.0.0.1:{self.paper_port}/ws/api/v2"
key_id = "ingest"
private_key_file = "{keys / 'ingest.pem'}"

[executor]
key_id = "executor"
private_key_file = "{keys / 'executor.pem'}"
deadline_seconds = 15

[commands]
signing_key_file = "{self.command_key(keys)}"

[portfolio_take_profit]
check_interval_seconds = 1
emergency_close_threshold = -1000
cooldown_seconds = 1

[ingest]
watch_list = ["{PERP}"]
ticker_delay = "raw"

[metrics]
{chr(10).join(f"{name}_port = {port}" for name, port in self.ports.items())}
""")
        self.config = config
        for name in SERVICES:
            self.spawn(name, [sys.executable, "-m", f"services.{name}", "--config", str(config)],
                       self.service_env(name))
        self.start_prometheus()

    def start_prometheus(self) -> None:
        binary = need_binary("prometheus", "prometheus")
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        config["global"].update(scrape_interval="1s", scrape_timeout="900ms", evaluation_interval="1s")
        config["rule_files"] = [str(ALERTS_YML)]
        for job in config["scrape_configs"]:
            port = self.ports.get(job["job_name"], self.prometheus_port)
            job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.spawn(
            "prometheus",
            [
                binary,
                f"--config.file={path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                "--log.level=warn",
            ],
        )

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        answer = get_json(f"http://127.0.0.1:{self.prometheus_port}/api/v1/{path}?{query}")
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]

    def paper(self, method: str, params: dict[str, Any]) -> Any:
        with connect(f"ws://127.0.0.1:{self.paper_port}/ws/api/v2") as ws:
            ws.send(json.dumps({"method": method, "params": params, "id": 1}))
            while True:
                answer = json.loads(ws.recv(timeout=10))
                if answer.get("id") == 1:
                    assert "error" not in answer, answer
                    return answer["result"]

    def operator(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "services.cli", *argv, "--config", str(self.config)],
                              capture_output=True, text=True, cwd=REPO, timeout=30, check=False,
                              env={**os.environ, **self.service_env("operator")})

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    need_binary("prometheus", "prometheus")
    workdir = tmp_path_factory.mktemp("stack")
    with acl_redis(workdir / "redis") as redis:
        running = Stack(workdir, redis)
        # the services read their Redis passwords from the files the ACL was rendered from
        (workdir / "secrets").symlink_to(workdir / "redis" / "secrets")
        try:
            running.start()
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def closed(stack: Stack) -> Stack:
    """Every target up, then one position opened on the paper account and closed by the operator."""
    def all_up() -> bool:
        targets = stack.api("targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return all(health.get(name) == "up" for name in SERVICES)

    try:
        wait_for(all_up, 40, "every service target up")
        wait_for(
            lambda: stack.query('tp_ingest_messages_total{channel=~"ticker.*"}'),
            20,
            "ticks from the exchange",
        )
        stack.paper("paper/trade", {"key_id": "executor", "instrument_name": PERP, "direction": "buy",
                                    "amount": 0.01})
        wait_for(lambda: stack.query("tp_portfolio_open_positions == 1"), 20, "the position in a snapshot")
        time.sleep(1.0)  # takeprofit reads that snapshot

        def closing() -> bool:
            """close-all as the operator; refused (exit 3, not queued) if takeprofit saw no snapshot yet."""
            result = stack.operator("close-all", "--yes")
            assert result.returncode in (0, 3), result.stderr
            time.sleep(1.0)
            return bool(stack.query('tp_takeprofit_decisions_total{reason="manual"}'))

        wait_for(closing, 20, "close-all accepted", interval=1.0)
        wait_for(lambda: stack.query('tp_executor_commands_total{outcome="completed"} >= 1'), 30,
                 "the executor's completed closure")
        wait_for(lambda: stack.query("tp_portfolio_open_positions == 0"), 20, "flat in a snapshot")
    except AssertionError as exc:
        logs = "\n".join(f"--- {name}\n{stack.log_tail(name)}" for name in stack.processes)
        raise AssertionError(f"{exc}\n{logs}\nACL LOG: {stack.redis.acl_denials()}") from None
    return stack


def test_every_service_is_up_healthy_and_exports_its_key_metrics(closed: Stack) -> None:
    targets = closed.api("targets")["activeTargets"]
    assert {t["labels"]["job"] for t in targets if t["health"] == "up"} >= set(SERVICES)
    for name, port in closed.ports.items():
        health = get_json(f"http://127.0.0.1:{port}/health")
        assert health["healthy"], (name, health)
    time.sleep(1.5)  # one more scrape after the closure
    missing = [name for name in KEY_METRICS if not closed.query(name)]
    assert missing == []


def test_the_closure_is_visible_in_metrics(closed: Stack) -> None:
    assert closed.query('tp_takeprofit_decisions_total{reason="manual"} >= 1')
    assert closed.query('tp_takeprofit_closures_finished_total{outcome="completed"} >= 1')
    assert closed.query("tp_executor_orders_sent_total >= 1")
    lag = closed.query("tp_bus_stream_lag_entries")
    assert {(s["metric"]["service"], s["metric"]["stream"]) for s in lag} >= {
        ("portfolio", "tp:fills"), ("portfolio", "tp:ticks"), ("takeprofit", "tp:snapshots"),
        ("executor", "tp:commands")}


def test_every_dashboard_and_alert_expression_evaluates(closed: Stack) -> None:
    for expr in dashboard_exprs() + alert_exprs():
        closed.query(expr.replace("$__rate_interval", "10s"))  # raises on a PromQL error
    groups = closed.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == sum(1 for _ in alert_exprs())
    assert all(r["health"] in ("ok", "unknown") for r in rules), [
        (r["name"], r.get("lastError")) for r in rules
    ]


def test_the_operator_reads_status_as_its_acl_user(closed: Stack) -> None:
    result = closed.operator("status")
    assert result.returncode == 0, result.stderr
    history = closed.operator("history", "--json")
    assert history.returncode == 0, history.stderr
    assert json.loads(history.stdout)[-1]["outcome"] == "completed"


def test_redis_refused_nothing_the_services_did(closed: Stack) -> None:
    denials = [d for d in closed.redis.acl_denials() if d.get("object") != "client|setinfo"]
    assert denials == []


def test_the_consumer_groups_are_the_ones_the_asyncapi_document_declares(closed: Stack) -> None:
    """docs/asyncapi.yaml lists a subscriber per consumer group: the running services create exactly those."""
    from services.contract import GROUPS, STREAMS

    admin = closed.redis.client("admin")
    created = {(stream.suffix, group["name"].decode())
               for stream in STREAMS if admin.exists(f"tp:{stream.suffix}")
               for group in admin.xinfo_groups(f"tp:{stream.suffix}")}
    assert created == {(g.suffix, g.group) for g in GROUPS}
