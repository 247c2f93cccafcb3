"""One redaction rule for every output (issue 21, item 7): URLs, query passwords, key material."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.common.redact import RedactingFormatter, redact
from services.common.redis_server import free_port
from services.paper.keys import generate_key
from tests.support import read_output_until

CASES = [
    ("redis://user:hunter2@redis:6379/0", "redis://user:***@redis:6379/0"),
    ("redis://user:p@ss@word@redis:6379/0", "redis://user:***@redis:6379/0"),
    ("rediss://:hunter2@redis:6380/1", "rediss://:***@redis:6380/1"),
    ("redis://hunter2@redis/0", "redis://***@redis/0"),
    ("redis://u:pa/ss@redis:1/0 and more", "redis://u:***@redis:1/0 and more"),
    ("redis://redis:6379/0?password=hunter2&db=1", "redis://redis:6379/0?password=***&db=1"),
    ("wss://host/ws?token=abc.def", "wss://host/ws?token=***"),
    ("cannot reach redis://ingest:hunter2@redis:6379/0: Error 111",
     "cannot reach redis://ingest:***@redis:6379/0: Error 111"),
    # what must stay readable
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("/tmp/pytest-of-user/pytest-12/test_a_key_file0/keys/Demo-Executor1.pem",
     "/tmp/pytest-of-user/pytest-12/test_a_key_file0/keys/Demo-Executor1.pem"),
    ("e1-take_profit-s3-n1 BTC-27DEC26-100000-C tp-abcdefghijklmnopqrstuvwxyz",
     "e1-take_profit-s3-n1 BTC-27DEC26-100000-C tp-abcdefghijklmnopqrstuvwxyz"),
    ("hmac-sha256:" + "0123456789abcdef" * 4, "hmac-sha256:" + "0123456789abcdef" * 4),
    ("user@example.com wrote", "user@example.com wrote"),
]


@pytest.mark.parametrize(("text", "shown"), CASES, ids=[c[0][:40] for c in CASES])
def test_the_rule(text: str, shown: str) -> None:
    assert redact(text) == shown


def pem(tmp_path: Path) -> str:
    generate_key(tmp_path, "k")
    return (tmp_path / "k.pem").read_text()


def test_key_material_anywhere_is_redacted(tmp_path: Path) -> None:
    key = pem(tmp_path)
    lines = key.splitlines()
    for text in (key, repr(key), f"value {key!r}: rule", "\n".join(lines[1:-1]), lines[1], key[:120]):
        out = redact(text)
        assert all(line[:24] not in out for line in lines[1:-1] if len(line) >= 24), out
    assert redact(f"x = {key!r}: must be a file").endswith(": must be a file")


def test_the_log_formatter_redacts_messages_arguments_and_tracebacks() -> None:
    formatter = RedactingFormatter("%(message)s")
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "connecting to %s", ("redis://u:hunter2@h/0",),
                               None)
    assert formatter.format(record) == "connecting to redis://u:***@h/0"
    try:
        raise ConnectionError("redis://u:hunter2@h/0 refused")
    except ConnectionError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = formatter.format(record)
    assert "Traceback" in text and "hunter2" not in text


def test_a_service_log_never_shows_the_redis_password(tmp_path: Path) -> None:
    """A service that cannot reach Redis logs the URL it tries; the password stays out."""
    config = tmp_path / "tp.toml"
    config.write_text(f"[redis]\nurl = 'redis://portfolio:hunter2@127.0.0.1:{free_port()}/0'\n"
                      f"[metrics]\nportfolio_port = {free_port()}\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TP_")}
    process = subprocess.Popen([sys.executable, "-m", "services.portfolio", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env={**env, "TP_LOG_LEVEL": "DEBUG"})
    early = read_output_until(process, "Redis not reachable")  # it retries Redis for ever
    process.terminate()
    out, _ = process.communicate(timeout=10)
    text = early + out.decode()
    assert "Redis not reachable" in text, text
    assert "hunter2" not in text


def test_status_with_redis_unreachable_hides_the_password(tmp_path: Path) -> None:
    config = tmp_path / "tp.toml"
    config.write_text(f"[redis]\nurl = 'redis://operator:hunter2@127.0.0.1:{free_port()}/0'\n")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TP_")}
    done = subprocess.run([sys.executable, "-m", "services.cli", "status", "--config", str(config)],
                          capture_output=True, text=True, check=False, env=env, timeout=60)
    assert done.returncode == 1
    assert "cannot reach Redis at redis://operator:***@127.0.0.1" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
