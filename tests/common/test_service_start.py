"""A service that never reached Redis must not claim it started (issue 24, honest figures)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from services.common.redis_server import free_port
from tests.support import REPO, read_output_until


def test_a_service_stopped_before_redis_answered_never_logs_started(tmp_path: Path) -> None:
    config = tmp_path / "tp.toml"
    config.write_text(f'[redis]\nurl = "redis://127.0.0.1:{free_port()}/0"\n')
    process = subprocess.Popen([sys.executable, "-m", "services.portfolio", "--config", str(config),
                                "--metrics-port", "0"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    early = read_output_until(process, "Redis not reachable")  # it waits for Redis: told to stop meanwhile
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=20)
    output = early + rest.decode()
    assert "Redis not reachable" in output
    assert "portfolio started" not in output
    assert "stopped before Redis ever answered: it never started" in output
    assert process.returncode == 0
