"""The shared Thalex session against the paper exchange: garbage, refusals, notices, backoff."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from services.common.config import ConfigError
from services.common.thalex import (
    Connection,
    ConnectionLost,
    LoginRejected,
    Session,
    ThalexError,
    ThalexKey,
    backoff_delay,
    left_out,
)
from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle, make_keys, running_paper_exchange

RECONNECTING = re.compile(r"reconnecting in ([0-9.]+) s")


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def key_files(keys_dir: Path) -> KeyFiles:
    return make_keys(keys_dir, "k1")


@pytest_asyncio.fixture
async def paper(key_files: KeyFiles, keys_dir: Path) -> AsyncIterator[PaperHandle]:
    async with running_paper_exchange(keys_dir, seed=3) as handle:
        await handle.control("paper/pause")
        yield handle


def key_of(files: KeyFiles) -> ThalexKey:
    return ThalexKey.load("executor", files.kid, files.private_key_path)


async def until(predicate: Any, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


class Running:
    """A session's `run()` as a task, stopped on exit."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Session:
        self.task = asyncio.create_task(self.session.run())
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def test_backoff_grows_is_capped_jittered_and_never_zero() -> None:
    assert [backoff_delay(a, 30, lambda: 0.0) for a in range(8)] == [0.25, 0.5, 1, 2, 4, 8, 15, 15]
    assert [backoff_delay(a, 30, lambda: 1.0) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000, 30, lambda: 0.5) == 22.5
    assert backoff_delay(0, 5, lambda: 0.0, base=0.1) == 0.05


def test_a_key_file_that_cannot_sign_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    pem = tmp_path / "bad.pem"
    pem.write_text("-----BEGIN PRIVATE KEY-----\nsecret-looking garbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as caught:
        ThalexKey.load("executor", "K1", pem)
    text = str(caught.value)
    assert "executor.private_key_file" in text and str(pem) in text and "secret-looking" not in text


def test_the_private_key_is_never_in_a_repr(key_files: KeyFiles) -> None:
    key = key_of(key_files)
    assert "PRIVATE" not in repr(key) and "PRIVATE" not in repr(Session("ws://x", key))


async def test_a_frame_that_is_not_json_goes_to_the_garbage_handler_and_the_session_goes_on(
        paper: PaperHandle, key_files: KeyFiles) -> None:
    garbage: list[tuple[str, str]] = []
    session = Session(paper.url, key_of(key_files),
                      on_garbage=lambda raw, why, ts: garbage.append((raw, why)))
    async with Running(session):
        await until(lambda: session.ready)
        first = session.connection
        for conn in paper.exchange.connections:
            conn.push("{not json")
            conn.push("[1, 2]")
            conn.push('{"surprise": true}')
        await until(lambda: len(garbage) >= 3)
        assert await session.request("portfolio") == []
        assert session.connection is first and session.ready and session.health() is True
    assert [raw for raw, _ in garbage] == ["{not json", "[1, 2]", '{"surprise": true}']
    assert "not valid JSON" in garbage[0][1]


async def test_a_refused_login_ends_run_names_the_key_and_fails_waiting_requests_at_once(
        paper: PaperHandle, tmp_path: Path) -> None:
    stranger = make_keys(tmp_path / "elsewhere", "no-such-key")
    session = Session(paper.url, key_of(stranger), request_timeout=30.0)
    waiting = asyncio.create_task(session.request("portfolio"))
    with pytest.raises(LoginRejected) as caught:
        async with asyncio.timeout(10):
            await session.run()
    assert caught.value.code == 19 and "executor.key_id = 'no-such-key'" in str(caught.value)
    with pytest.raises(ThalexError, match="refused the login of key id 'no-such-key'"):
        async with asyncio.timeout(1):  # not after the 30 s request timeout
            await waiting
    health = session.health()
    assert health is not True and "login refused" in str(health)


async def test_not_ready_is_unhealthy_with_the_reason_and_requests_time_out(key_files: KeyFiles) -> None:
    session = Session("ws://127.0.0.1:9/ws/api/v2", key_of(key_files), request_timeout=0.2, backoff_max=0.2)
    async with Running(session):
        with pytest.raises(ConnectionLost, match="not logged in"):
            await session.request("portfolio")
        health = session.health()
        assert health is not True and "not logged in" in str(health)


async def test_the_reconnect_notice_moves_at_once_but_a_repeated_one_waits(
        paper: PaperHandle, key_files: KeyFiles, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="services.common.thalex.session")
    connected: list[Connection] = []

    async def on_connected(connection: Connection) -> None:
        connected.append(connection)

    session = Session(paper.url, key_of(key_files), on_connected=on_connected, rand=lambda: 0.0)
    async with Running(session):
        await until(lambda: session.ready)
        for count in (2, 3):
            await paper.control("paper/reconnect_notice")
            await until(lambda n=count: len(connected) == n and session.ready)
    delays = [float(d) for d in RECONNECTING.findall(caplog.text)]
    assert delays == [0.0, 0.5]  # the second came before the connection proved stable: attempt 1


async def test_reconnects_asked_by_the_service_back_off_and_grow(
        paper: PaperHandle, key_files: KeyFiles, caplog: pytest.LogCaptureFixture) -> None:
    """Like ingest when Redis refuses every write: each set-up asks for a new connection."""
    caplog.set_level(logging.WARNING, logger="services.common.thalex.session")
    session: Session

    async def on_connected(connection: Connection) -> None:
        session.reconnect("Redis failed: OOM command not allowed")

    session = Session(paper.url, key_of(key_files), on_connected=on_connected, rand=lambda: 0.0,
                      backoff_base=0.1)
    async with Running(session):
        await until(lambda: session.connections >= 4, within=10)
    delays = [float(d) for d in RECONNECTING.findall(caplog.text)][:3]
    assert delays == [0.05, 0.1, 0.2]


async def test_a_system_channel_left_out_of_the_answer_is_said_and_the_watchdog_relied_on(
        paper: PaperHandle, key_files: KeyFiles, caplog: pytest.LogCaptureFixture) -> None:
    """api.yaml: subscribe succeeds "even if no channels were valid"; an answer without `system` is a no."""
    assert left_out(["system", "x"], ["x"]) == ["system"]
    await paper.control("paper/leave_out", {"channels": ["system"]})
    session = Session(paper.url, key_of(key_files))
    with caplog.at_level(logging.INFO, logger="services.common.thalex.session"):
        async with Running(session):
            await until(lambda: session.ready)
    assert any("no system channel on this exchange (left out of the subscribe answer)" in r.getMessage()
               for r in caplog.records)
