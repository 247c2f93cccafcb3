"""`docker compose up` of the paper profile, for real: built offline, run, probed, killed, taken down.

On a private Docker engine (tests/deploy/engine.py: own containerd, dockerd, data root and
socket, stopped at the end), with the compose file users run plus docker-compose.offline.yml (no
registry is reachable: the images come from Debian's packages, tests/deploy/deployment.py).
Grafana is left out (no Debian package ships it); its provisioning is checked by test_compose.py
and test_metrics_exist.py. Skipped, saying why, only where no engine can be started (not root,
docker.io or debootstrap missing, the engine refusing to start).

The tests share one deployment and run in file order: the last one takes it down.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync
from websockets.sync.client import connect

from services.contract import GROUPS, STREAMS
from tests.deploy.deployment import PAPER_SERVICES, PROJECT, Deployment, cache_root
from tests.deploy.engine import DockerEngine, EngineUnavailable
from tests.deploy.support import REPO

pytestmark = pytest.mark.timeout(1200)

PERP = "BTC-PERPETUAL"
ACCOUNT_KEY = "paper-executor"  # the paper account's trading key id (deploy/docker-compose.yml)


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (OSError, ValueError, KeyError, redis_sync.RedisError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what} not within {timeout} s (last: {last!r})")


@pytest.fixture(scope="module")
def engine() -> Iterator[DockerEngine]:
    if os.environ.get("TP_SKIP_DOCKER_ENGINE"):
        pytest.skip("TP_SKIP_DOCKER_ENGINE is set")
    engine = DockerEngine()
    try:
        engine.start()
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker engine can be started here: {exc}")
    atexit.register(engine.stop)  # a session ended without teardown still stops it
    try:
        yield engine
    finally:
        problems = engine.stop()
        atexit.unregister(engine.stop)
        assert problems == [], problems


@pytest.fixture(scope="module")
def deployment(engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    if shutil.which("debootstrap", path=f"{os.environ.get('PATH', '')}:/usr/sbin") is None:
        pytest.skip("`debootstrap` not installed (Debian/Ubuntu: apt-get install debootstrap)")
    deployment = Deployment(engine, tmp_path_factory.mktemp("compose"))
    started = time.monotonic()
    try:
        deployment.build()
        deployment.up()
        yield deployment
    finally:
        if deployment.containers():
            deployment.down()
        deployment.timings["total"] = round(time.monotonic() - started, 1)
        # where a person measuring cold and warm runs finds the figures (docs/operations.md)
        (cache_root() / "last-run-seconds.json").write_text(
            json.dumps({"compose": deployment.compose_version, **deployment.timings}) + "\n")


@pytest.fixture(scope="module")
def admin(deployment: Deployment) -> Iterator[redis_sync.Redis]:
    """The Redis of the deployment, from the host through its published port, as `admin`."""
    client = redis_sync.Redis(port=deployment.ports["redis"], username="admin",
                              password=deployment.admin_password(), socket_timeout=10)
    yield client
    client.close()


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def documents(client: redis_sync.Redis, stream: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"__data__"]) for _, fields in client.xrange(stream)]


class Paper:
    """The paper exchange's control API, from the host through its published port."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    def __call__(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self.next_id += 1
        self.ws.send(json.dumps({"method": method, "params": params or {}, "id": self.next_id}))
        while True:
            answer = json.loads(self.ws.recv(timeout=10))
            if answer.get("id") == self.next_id:
                assert "error" not in answer, answer
                return answer["result"]


# ---------------------------------------------------------------------------------------------


def test_every_container_of_the_paper_profile_is_healthy(deployment: Deployment) -> None:
    states = deployment.states()
    expected = {"redis", "prometheus", "paper-keys", "paper", *PAPER_SERVICES}
    assert set(states) == expected, states  # no live service, no Grafana (offline override)
    assert states.pop("paper-keys") == "exited/0"
    assert set(states.values()) == {"running/healthy"}, states
    images = {s: c["Config"]["Image"] for s, c in deployment.containers().items()}
    assert images["redis"] == "thalex-tp/redis:bookworm"
    assert images["prometheus"] == "thalex-tp/prometheus:bookworm"
    assert {images[s] for s in ("paper", "paper-keys", *PAPER_SERVICES)} == {"thalex-tp:latest"}


def open_and_take_profit(paper: Paper, admin: redis_sync.Redis) -> dict[str, Any]:
    """Buy 0.01 BTC-PERPETUAL on the guardian's paper account, lift the index until its take-profit
    fires; returns the command once the executor reported it `completed`."""
    paper("paper/pause")  # no random walk: the one move below decides
    trade = paper("paper/trade", {"key_id": ACCOUNT_KEY, "instrument_name": PERP, "direction": "buy",
                                  "amount": 0.01})
    assert trade["trades"][0]["position_after"] == pytest.approx(0.01)

    def position_in_snapshot() -> bool:
        row = admin.hget("paper:snapshot:positions", PERP)  # v2: a delta lists only the rows that changed
        return row is not None and json.loads(row)["position"] == pytest.approx(0.01)
    wait_for(position_in_snapshot, 30, "the position in paper:snapshot:positions")
    # +0.6 % on 0.01 BTC at ~95,000 is ~ +5.7 USD, well past the 1.10 target after fees
    paper("paper/move_index", {"underlying": "BTCUSD", "pct": 0.6})
    command: dict[str, Any] = wait_for(lambda: documents(admin, "paper:commands"), 30, "a command")[0]

    def outcome() -> str | None:
        statuses = [r["status"] for r in documents(admin, "paper:reports")
                    if r["command_id"] == command["command_id"]]
        return next((s for s in statuses if s in ("completed", "failed")), None)
    assert wait_for(outcome, 60, "the executor's outcome") == "completed"
    return command


def test_the_guardian_takes_profit_on_the_paper_exchange_inside_containers(
    deployment: Deployment, admin: redis_sync.Redis
) -> None:
    with connect(f"ws://127.0.0.1:{deployment.ports['paper']}/ws/api/v2") as ws:
        paper = Paper(ws)
        try:
            command = open_and_take_profit(paper, admin)
        finally:
            paper("paper/resume")
    assert command["reason"] == "take_profit" and command["fraction"] == 1.0, command
    assert command["legs"]["instrument"] == [PERP] and command["legs"]["amount"] == [0.01], command

    def flat_on_the_exchange() -> bool:  # the exchange's own portfolio, as ingest relays it
        latest = documents(admin, "paper:positions")[-1]
        return all(p["position"] == 0 for p in latest["positions"] if p["instrument"] == PERP)
    wait_for(flat_on_the_exchange, 30, "the account flat on the paper exchange")
    wait_for(lambda: documents(admin, "paper:snapshots")[-1]["open_positions"] == 0, 30, "a flat snapshot")
    # the operator's tool, as docs/operations.md runs it on the paper profile
    history = deployment.compose("run", "--rm", "-e", "TP_REDIS__NAMESPACE=paper", "operator", "history",
                                 "--json", timeout=120)
    decisions = json.loads(history.stdout)
    assert [(d["reason"], d["outcome"]) for d in decisions][-1] == ("take_profit", "completed")


def test_prometheus_scrapes_every_service(deployment: Deployment) -> None:
    def all_up() -> dict[str, str]:
        targets = deployment.prometheus("targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        services = ("ingest", "portfolio", "takeprofit", "executor", "notify")
        every = all(health.get(s) == "up" for s in services)
        return health if every else {}

    wait_for(all_up, 30, "every service target up")
    result = deployment.prometheus("query?query=tp_bus_stream_lag_entries")["result"]
    assert {r["metric"]["job"] for r in result} >= {"portfolio", "takeprofit", "executor"}


ACL_PROBE = """
import json, os, sys
import redis
password = open(os.environ["TP_REDIS__PASSWORD_FILE"]).read().strip()
client = redis.Redis.from_url(os.environ["TP_REDIS__URL"], username=os.environ["TP_REDIS__USERNAME"],
                              password=password, socket_timeout=5)
answers = {}
for name, command in json.loads(sys.argv[1]).items():
    try:
        client.execute_command(*command)
        answers[name] = "ok"
    except redis.exceptions.NoPermissionError as exc:
        answers[name] = f"NOPERM {exc}"
print(json.dumps(answers))
"""
PROBE_ENTRY = ["*", "__data__", '{"acl_probe": true}']
ACL_CASES = {  # user: (an allowed command its service needs, a forbidden one that would be harmful)
    "ingest": (["GET", "paper:ingest:checkpoint"], ["XADD", "paper:commands", *PROBE_ENTRY]),
    "portfolio": (["HGETALL", "paper:instruments"], ["XADD", "paper:commands", *PROBE_ENTRY]),
    "takeprofit": (["EXISTS", "paper:takeprofit:lease"], ["XADD", "paper:fills", *PROBE_ENTRY]),
    "executor": (["GET", "paper:executor:acl-probe"], ["XADD", "paper:commands", *PROBE_ENTRY]),
}


def test_each_service_can_do_only_what_its_redis_user_allows(
    deployment: Deployment, admin: redis_sync.Redis
) -> None:
    admin.acl_log_reset()
    for user, (allowed, forbidden) in ACL_CASES.items():
        probe = deployment.exec(
            f"paper-{user}",
            "python",
            "-c",
            ACL_PROBE,
            json.dumps({"allowed": allowed, "forbidden": forbidden}),
        )
        assert probe.returncode == 0, probe.stderr
        answers = json.loads(probe.stdout)
        assert answers["allowed"] == "ok", (user, allowed, answers)
        assert answers["forbidden"].startswith("NOPERM"), (user, forbidden, answers)
    refused = {(text(e["username"]), text(e["object"])) for e in admin.acl_log()}  # object: command or key
    for user, (_, forbidden) in ACL_CASES.items():
        assert refused & {(user, forbidden[0].lower()), (user, forbidden[1])}, (user, refused)
    assert admin.xlen("paper:commands") == 1 and admin.xlen("paper:fills") >= 1
    assert all("acl_probe" not in json.dumps(d) for d in documents(admin, "paper:fills"))


KEY_SCAN = (
    "grep -rlsI 'PRIVATE KEY' /run /var /etc /tmp /data /prometheus /root /home /srv /opt/thalex-tp "
    "2>/dev/null | xargs -r sha256sum"
)


def test_only_the_executor_holds_the_trading_key(deployment: Deployment) -> None:
    held: dict[str, set[str]] = {}
    for service in deployment.containers(all_=False):
        scan = deployment.exec(service, "sh", "-c", KEY_SCAN, user="0")
        held[service] = {line.split()[0] for line in scan.stdout.splitlines()}
    keys = "/var/lib/thalex-tp/keys"
    trading = deployment.exec(
        "paper-executor", "sha256sum", f"{keys}/executor/paper-executor.pem", user="0"
    ).stdout.split()[0]
    read_only = deployment.exec(
        "paper-ingest", "sha256sum", f"{keys}/ingest/paper-ingest.pem", user="0"
    ).stdout.split()[0]
    assert {s for s, hashes in held.items() if trading in hashes} == {"paper-executor"}, held
    assert {s for s, hashes in held.items() if read_only in hashes} == {"paper-ingest"}, held
    assert {s for s, hashes in held.items() if hashes} == {"paper-executor", "paper-ingest"}, held


def test_the_paper_run_leaves_the_live_namespace_untouched(
    deployment: Deployment, admin: redis_sync.Redis
) -> None:
    assert list(admin.scan_iter("tp:*")) == []
    paper_keys = {k.decode() for k in admin.scan_iter("paper:*")}
    assert {"paper:fills", "paper:ticks", "paper:snapshots", "paper:commands", "paper:reports"} <= paper_keys
    created = {
        (stream.suffix, text(group["name"]))
        for stream in STREAMS
        if admin.exists(f"paper:{stream.suffix}")
        for group in admin.xinfo_groups(f"paper:{stream.suffix}")
    }
    assert created == {(g.suffix, g.group) for g in GROUPS}  # as docs/asyncapi.yaml declares them
    for service in PAPER_SERVICES:
        logs = deployment.engine.docker("logs", deployment.containers()[service]["Id"]).stderr
        assert "started: connected to Redis, consumers reading (namespace paper)" in logs, (
            service,
            logs[-2000:],
        )


def test_a_killed_service_is_restarted_and_reports_healthy(deployment: Deployment) -> None:
    before = deployment.containers()["paper-executor"]
    os.kill(before["State"]["Pid"], signal.SIGKILL)  # as the OOM killer would: no goodbye

    def back() -> bool:
        now = deployment.containers()["paper-executor"]
        return (
            now["Id"] == before["Id"]
            and now["RestartCount"] > before["RestartCount"]
            and now["State"]["Health"]["Status"] == "healthy"
        )

    wait_for(back, 90, "the executor restarted by Docker and healthy again", interval=1.0)
    assert deployment.containers()["paper-executor"]["State"]["Pid"] != before["State"]["Pid"]
    deployment.wait_healthy(60)


def test_down_leaves_nothing_running(deployment: Deployment) -> None:
    deployment.down()
    docker = deployment.engine.docker
    assert docker("ps", "-aq").stdout.split() == []
    assert docker("volume", "ls", "-q").stdout.split() == []
    networks = set(docker("network", "ls", "--format", "{{.Name}}").stdout.split())
    assert networks <= {"host", "none", "bridge"}, networks
    assert docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").stdout.split() == []


# ---------------------------------------------------------------------------------------------


def test_the_redis_fixture_falls_back_when_the_engine_cannot_pull(engine: DockerEngine) -> None:
    """An engine that answers but cannot pull (this one: no registry) must not make tests error:
    the session's Redis fixture tries the container, fails, says so and takes a local redis-server."""
    env = engine.env()
    env.pop("REDIS_URL", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",  # in the foreground: the fixture's choice is printed in this process's summary
            "tests/common/test_bus.py::test_published_document_is_plain_json_in_data_field",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Redis for the tests: a local redis-server" in result.stdout, result.stdout[-3000:]
    assert "testcontainers could not start redis:7-alpine" in result.stdout, result.stdout[-3000:]
    assert engine.docker("ps", "-aq").stdout.split() == []  # nothing left behind by the attempt
