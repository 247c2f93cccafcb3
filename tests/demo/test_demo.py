"""`thalex-tp demo` as a user runs it, and the operator CLI against the running guardian."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from services.common.bus import entry_document
from services.common.config import load_config
from services.common.contracts import Command, Report, ReportStatus, Snapshot, halt_from_hash
from services.common.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "services.cli", "demo"]
CLI = [sys.executable, "-m", "services.cli"]


def leftovers(workdir: Path) -> list[str]:
    """Processes whose command line mentions the demo's directory (keys, config, Redis dir)."""
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(workdir) in line and "ps -eww" not in line]


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def start_demo(workdir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    # its own process group, as in a terminal: a signal to the group reaches the demo and what it started
    return subprocess.Popen([*DEMO, "--no-ui", "--workdir", str(workdir), *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_demo_locks_in_profit_and_the_quoter_stands_down(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    done = subprocess.run([*DEMO, "--no-ui", "--duration", "90", "--workdir", str(tmp_path / "demo"),
                           "--summary-json", str(summary_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=240, env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    completed = [c for c in summary["closures"] if c["completed"]]
    assert summary["epochs_closed"] >= 1 and completed, summary
    assert all(c["reason"] == "take_profit" for c in completed)
    assert all(c["flat_after"] in (True, None) for c in completed), summary
    assert any(c["flat_after"] for c in completed), f"the account must be flat after a closure: {summary}"
    assert summary["quoter_orders_while_halted"] == [], f"the quoter quoted while halted: {summary}"
    assert summary["pnl_banked_usd"] > 0, summary
    assert "epochs closed:" in done.stdout
    # it says how to talk to it, and where its files are (kept: --workdir)
    config = tmp_path / "demo" / "demo.toml"
    assert f"thalex-tp status --config {config}" in done.stdout
    assert f"kept in {tmp_path / 'demo'}" in done.stdout.strip().splitlines()[-1]
    # notify ran with no target: it told the story on tp:notifications
    kinds = {n["kind"] for n in summary["notifications"]}
    assert {"decision", "closure_completed"} <= kinds, summary["notifications"]
    assert leftovers(tmp_path / "demo") == []


def test_without_a_workdir_the_summary_names_no_removed_directory() -> None:
    from services.demo.app import _where_things_are

    gone = Path("/tmp/thalex-tp-demo-abc")
    line = _where_things_are(gone, keep=False, removed=True)
    assert str(gone) not in line and "--workdir DIR" in line
    assert str(gone) in _where_things_are(gone, keep=False, removed=False)


def test_operator_commands_against_the_running_demo_then_ctrl_c_leaves_nothing(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    demo = start_demo(workdir)
    try:
        config = workdir / "demo.toml"
        wait_for(config.exists, 30, "the demo's config")
        settings = load_config(config)
        client = redis.Redis.from_url(settings.redis.url)
        names = settings.names

        def snapshot() -> Snapshot | None:
            latest = client.xrevrange(names.snapshots, count=1)
            return Snapshot.model_validate(entry_document(latest[0][1])[1]) if latest else None

        wait_for(lambda: snapshot() is not None, 60, "the first snapshot")

        def a_closure_completed() -> bool:
            reports = [Report.model_validate(entry_document(f)[1]) for _, f in client.xrange(names.reports)]
            return any(r.status is ReportStatus.COMPLETED for r in reports)

        wait_for(a_closure_completed, 90, "the first take-profit")
        status = subprocess.run(
            [*CLI, "status", "--config", str(config)], capture_output=True, text=True, cwd=REPO
        )
        assert status.returncode == 0, status.stderr
        assert "net after close" in status.stdout and "take profit" in status.stdout

        def halted_by_operator() -> bool:
            halt = halt_from_hash(client.hgetall(names.halt))
            return halt is not None and halt.reason == "operator_halt"

        wait_for(lambda: not client.exists(names.halt), 60, "no closure running")
        assert subprocess.run([*CLI, "halt", "--config", str(config)], cwd=REPO).returncode == 0
        wait_for(halted_by_operator, 10, "the operator halt")
        assert subprocess.run([*CLI, "resume", "--config", str(config)], cwd=REPO).returncode == 0
        wait_for(lambda: not halted_by_operator(), 10, "the halt to be lifted")

        def manual_command() -> bool:
            commands = [
                Command.model_validate(entry_document(f)[1]) for _, f in client.xrange(names.commands)
            ]
            return any(c.reason == "manual" for c in commands)

        deadline = time.monotonic() + 180  # a loaded machine: the quoter may take long to hold a position
        while not manual_command() and time.monotonic() < deadline:
            snap = snapshot()
            if snap and snap.open_positions and not client.exists(names.halt):  # v2: the header says
                done = subprocess.run([*CLI, "close-all", "--yes", "--config", str(config)], cwd=REPO,
                                      capture_output=True, text=True)
                # 0: accepted; 3: refused (a take-profit got there first) and it says why
                refused = done.returncode == 3 and "REFUSED" in done.stderr
                assert done.returncode == 0 or refused, done.stderr
            time.sleep(2)
        assert manual_command(), "close-all --yes must produce a manual closure"
        history = subprocess.run([*CLI, "history", "--json", "--config", str(config)], capture_output=True,
                                 text=True, cwd=REPO)
        assert any(row["reason"] == "manual" for row in json.loads(history.stdout))
    finally:
        demo.send_signal(signal.SIGINT)
        output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, output[-3000:]
    assert leftovers(workdir) == []


def test_a_closed_terminal_stops_every_child(tmp_path: Path) -> None:
    """The terminal closed (SIGHUP): every child the demo started stops with it. Before, the demo died
    on the signal, and the paper exchange and the bundled Redis (each in a session of its own) ran on."""
    workdir = tmp_path / "demo"
    demo = start_demo(workdir)
    try:
        wait_for(lambda: (workdir / "logs" / "quoter.log").exists(), 60, "all children started")
    finally:
        demo.send_signal(signal.SIGHUP)
        output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, output[-3000:]
    assert leftovers(workdir) == []


@pytest.mark.parametrize("to_the_group", [False, True], ids=["to_the_demo", "to_its_process_group"])
def test_sigterm_stops_every_child_and_the_demo_still_sums_up(tmp_path: Path, to_the_group: bool) -> None:
    """`timeout 600 thalex-tp demo` signals the whole process group, the bundled Redis included:
    the Redis must outlive the services and the summary, which the demo stops and prints first."""
    workdir = tmp_path / "demo"
    demo = start_demo(workdir)
    try:
        wait_for(lambda: (workdir / "logs" / "quoter.log").exists(), 60, "all children started")
        assert len(leftovers(workdir)) >= 6, leftovers(workdir)  # redis, paper, 4 services, quoter
    finally:
        if to_the_group:
            os.killpg(demo.pid, signal.SIGTERM)
        else:
            demo.send_signal(signal.SIGTERM)
        output, _ = demo.communicate(timeout=60)
    assert demo.returncode == 0, output[-3000:]
    assert "=== thalex-tp demo summary ===" in output and "Connection closed" not in output, output[-3000:]
    assert leftovers(workdir) == []


def test_the_demos_redis_is_out_of_reach_of_a_signal_to_the_demos_process_group(tmp_path: Path) -> None:
    """The deterministic half of the test above: whatever the timing, Ctrl-C or `timeout` cannot
    stop the Redis before the demo has stopped its services and read its summary."""
    server = RedisServer(tmp_path / "redis", prefer_bundled=True)
    server.start()
    try:
        assert server.process is not None
        assert os.getpgid(server.process.pid) != os.getpgid(0)
    finally:
        server.stop()


def test_operator_cli_says_clearly_when_redis_is_unreachable(tmp_path: Path) -> None:
    config = tmp_path / "tp.toml"
    config.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n')
    done = subprocess.run([*CLI, "status", "--config", str(config)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in done.stderr


@pytest.mark.parametrize("command", ["halt", "close-all"])
def test_close_all_refuses_without_confirmation_when_not_interactive(tmp_path: Path, redis_url: str,
                                                                     command: str) -> None:
    config = tmp_path / "tp.toml"
    config.write_text(f'[redis]\nurl = "{redis_url}"\nnamespace = "cli{os.getpid()}"\n')
    done = subprocess.run([*CLI, command, "--timeout", "0.5", "--config", str(config)], capture_output=True,
                          text=True, cwd=REPO, stdin=subprocess.DEVNULL)
    if command == "close-all":
        assert done.returncode == 1 and "pass --yes" in done.stderr
    else:  # no take-profit runs in this namespace: nobody answers, and the exit code says so
        assert done.returncode == 4 and "NO ANSWER from take-profit" in done.stderr


def test_demo_with_a_rogue_bot_opens_the_breaker_and_bounds_the_fees(tmp_path: Path) -> None:
    """Issue 19: a bot that ignores the halt (orders, mass quotes, a grid bot) keeps re-opening; after
    1 + 3 closures the breaker opens, no fee loop follows, and the closing fees stay within the bound."""
    summary_path = tmp_path / "summary.json"
    done = subprocess.run([*DEMO, "--no-ui", "--duration", "90", "--rogue-bot", "--workdir",
                           str(tmp_path / "demo"), "--summary-json", str(summary_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=240,
                          env={k: v for k, v in os.environ.items() if k != "REDIS_URL"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    rogue = summary["rogue_bot"]
    assert rogue["breaker_opened"] and rogue["repeat_closures"] == 3, summary
    assert sum(rogue["reopened"].values()) >= 3, rogue  # it really did not listen
    assert rogue["closures"] <= 1 + 3 + rogue["emergency_stops_while_open"], summary["closures"]
    assert 0 < rogue["closing_fees_usd"] <= rogue["closing_fee_bound_usd"], rogue
    reasons = [c["reason"] for c in summary["closures"]]
    after = reasons[reasons.index("circuit_breaker"):]
    assert set(after) <= {"circuit_breaker", "emergency_stop"}, reasons  # no fee loop once it is open
    assert "circuit breaker: OPEN after 3 repeat closures" in done.stdout
    assert summary["quoter_orders_while_halted"] == [], "the demo's own quoter still obeys the halt"
    # issue 19, item 2: ingest saw the rogue break the halts, and the summary counts its orders too
    assert summary["orders_while_halted"] >= 1, summary["halt_violations"][:5]
    assert any(v.get("label") == "rogue" for v in summary["halt_violations"]), summary["halt_violations"][:5]
    assert "orders on the account while halted, not the guardian's: " in done.stdout
    assert leftovers(tmp_path / "demo") == []
