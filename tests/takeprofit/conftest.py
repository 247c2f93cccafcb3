"""Every take-profit test runs with a command signing key, as the service requires (issue 21)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def command_key(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[bytes]:
    """`[commands] signing_key_file` through the environment: in-process settings and service
    processes started by the test both read it."""
    path: Path = tmp_path_factory.mktemp("command-key") / "command_key.txt"
    key = secrets.token_hex(32)
    path.write_text(key + "\n")
    path.chmod(0o600)
    monkeypatch.setenv("TP_COMMANDS__SIGNING_KEY_FILE", str(path))
    yield key.encode()
