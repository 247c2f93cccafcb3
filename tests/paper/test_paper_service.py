"""Sessions, connections, control methods, scenarios, the command line and the tick feed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets

from services.paper.cli import keygen_main
from services.paper.keys import KeyFiles, load_keys
from services.paper.market import Market
from services.paper.scenario import load_scenario, parse_scenario, run_scenario
from services.paper.server import PaperExchange
from services.paper.testing import ControlError, PaperHandle, make_keys, running_paper_exchange

from .conftest import PERP, RawClient

REPO = Path(__file__).resolve().parents[2]


def test_keygen_writes_private_key_0600_public_key_and_permissions(tmp_path: Path) -> None:
    assert keygen_main(["--kid", "exec", "--out", str(tmp_path)]) == 0
    assert keygen_main(["--kid", "ingest", "--out", str(tmp_path), "--read-only"]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "exec.pem").st_mode) == 0o600
    assert (tmp_path / "exec.pub.pem").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert json.loads((tmp_path / "ingest.json").read_text()) == {
        "kid": "ingest",
        "read_only": True,
        "account": "ingest",
    }
    keys = load_keys(tmp_path)
    assert {k: v.read_only for k, v in keys.items()} == {"exec": False, "ingest": True}


@pytest.mark.asyncio
async def test_a_read_only_key_and_a_trading_key_share_one_account(tmp_path: Path) -> None:
    """As on Thalex: ingest's read-only key sees what the executor's trading key does."""
    trading = make_keys(tmp_path, "desk-trading", account="desk")
    reading = make_keys(tmp_path, "desk-reading", read_only=True, account="desk")
    async with running_paper_exchange(tmp_path, seed=3) as handle:
        reader = RawClient(await websockets.connect(handle.url))
        trader = RawClient(await websockets.connect(handle.url))
        login_reader, login_trader = await reader.login(reading), await trader.login(trading)
        assert login_reader["account_number"] == login_trader["account_number"]
        await reader.result("private/subscribe", {"channels": ["account.trade_history"]})
        await trader.result("private/buy", {"instrument_name": PERP, "amount": 0.01, "order_type": "market"})
        [trade] = await reader.wait_for("account.trade_history")
        assert trade["instrument_name"] == PERP and trade["amount"] == 0.01
        assert await reader.error_code("private/buy", {"instrument_name": PERP, "amount": 0.01,
                                                       "order_type": "market"}) == 28
        assert (await trader.result("private/portfolio"))[0]["position"] == 0.01
        await reader.ws.close()
        await trader.ws.close()


def test_same_seed_gives_the_same_index_path() -> None:
    def path(seed: int) -> list[float]:
        market = Market(seed=seed, now=1_700_000_000.0)
        return [market.step(1_700_000_000.0 + i, 0.25) and market.index["BTCUSD"] for i in range(1, 20)]

    assert path(5) == path(5)
    assert path(5) != path(6)


@pytest.mark.asyncio
async def test_session_end_cancels_only_non_persistent_orders(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    watcher: RawClient = await connect()
    await watcher.login(keys["trader"])
    await watcher.result("private/subscribe", {"channels": ["account.orders"]})
    quoter: RawClient = await connect()
    await quoter.login(keys["trader"])
    persistent = await quoter.result("private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 90000})
    await quoter.result("private/set_cancel_on_disconnect", {"timeout_secs": 5})
    volatile = await quoter.result(
        "private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 90001, "client_order_id": 1}
    )
    assert (persistent["persistent"], volatile["persistent"]) == (True, False)
    await quoter.ws.close()
    update = await watcher.wait_for(
        "account.orders", lambda n: bool(n) and n[0].get("delete_reason") == "session_end"
    )
    assert update[0]["order_id"] == volatile["order_id"]
    assert [o["order_id"] for o in await watcher.result("private/open_orders")] == [persistent["order_id"]]
    # client_order_id is session-local: a new session can reuse 1 and cannot cancel by the old one.
    again: RawClient = await connect()
    await again.login(keys["trader"])
    assert await again.error_code("private/cancel", {"client_order_id": 1}) == 1
    assert (
        await again.result(
            "private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 90002, "client_order_id": 1}
        )
    )["client_order_id"] == 1


@pytest.mark.asyncio
async def test_drop_connections_of_one_key(paper: PaperHandle, connect, keys: dict[str, KeyFiles]) -> None:
    trader: RawClient = await connect()
    await trader.login(keys["trader"])
    other: RawClient = await connect()
    await other.login(keys["other"])
    assert await paper.control("paper/drop_connections", {"key_id": "trader"}) == {"dropped": 1}
    with pytest.raises(websockets.ConnectionClosed):
        await trader.call("public/instruments")
    assert await other.result("private/portfolio") == []


@pytest.mark.asyncio
async def test_latency_and_control_disabled(
    paper: PaperHandle, connect, keys_dir: Path, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await paper.control("paper/set_latency", {"seconds": 0.2, "methods": ["public/ticker"]})
    started = time.perf_counter()
    await client.result("public/ticker", {"instrument_name": PERP})
    assert time.perf_counter() - started >= 0.2
    await paper.control("paper/set_latency", {"seconds": 0})
    async with running_paper_exchange(keys_dir, control=False) as closed:
        with pytest.raises(ControlError) as info:
            await closed.control("paper/status")
        assert info.value.code == 31


@pytest.mark.asyncio
async def test_graceful_stop_sends_the_reconnect_notice_first(
    keys_dir: Path, keys: dict[str, KeyFiles]
) -> None:
    exchange = PaperExchange(load_keys(keys_dir), reconnect_grace=0.2)
    url = await exchange.start()
    async with websockets.connect(url) as ws:
        client = RawClient(ws)
        await client.login(keys["trader"])
        stopping = asyncio.create_task(exchange.stop())
        assert await client.wait_for("system") == {"event": "reconnect"}
        assert not stopping.done()
        await stopping
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()


@pytest.mark.asyncio
async def test_delayed_ticker_is_throttled_and_raw_sends_every_change(paper: PaperHandle, connect) -> None:
    client: RawClient = await connect()
    await client.result("public/subscribe", {"channels": [f"ticker.{PERP}.raw", f"ticker.{PERP}.500ms"]})
    for price in range(100010, 100060, 10):
        await paper.control("paper/set_mark", {"instrument_name": PERP, "price": price})
    await client.drain(0.7)
    raw = [
        n["notification"]["mark_price"]
        for n in client.notifications
        if n["channel_name"] == f"ticker.{PERP}.raw"
    ]
    slow = [
        n["notification"]["mark_price"]
        for n in client.notifications
        if n["channel_name"] == f"ticker.{PERP}.500ms"
    ]
    assert raw[-5:] == [100010, 100020, 100030, 100040, 100050]
    assert 1 <= len(slow) <= 3 and slow[-1] == 100050


@pytest.mark.asyncio
async def test_public_book_answers_at_most_five_levels_a_side_as_thalex_does(
        paper: PaperHandle, connect) -> None:
    """api.yaml, `public/book`: "with a maximum of 5 levels" (the paper's books are 10 deep)."""
    client: RawClient = await connect()
    book = await client.result("public/book", {"instrument_name": PERP})
    assert len(book["bids"]) == 5 and len(book["asks"]) == 5
    assert all(a[0] > b[0] for a, b in zip(book["bids"], book["bids"][1:], strict=False))  # the best five


@pytest.mark.asyncio
async def test_burst_ticks_feed_and_ticker_log(paper: PaperHandle, connect) -> None:
    client: RawClient = await connect()
    await client.result("public/subscribe", {"channels": [f"ticker.{PERP}.raw"]})
    await client.wait_for(f"ticker.{PERP}.raw")
    count = 5000
    since = time.time()
    burst = asyncio.create_task(paper.control("paper/burst_ticks", {"instrument_name": PERP, "count": count}))
    received = 0
    while received < count:  # how fast is bench/ingest_ticks.py's to print, not this test's to assert
        message = json.loads(await asyncio.wait_for(client.ws.recv(), 5))
        received += message.get("channel_name") == f"ticker.{PERP}.raw"
    assert (await burst)["sent"] == count
    log = (await paper.control("paper/ticker_log", {"instrument_name": PERP, "since": since}))["tickers"]
    assert len(log) >= count and all(row["time"] >= since for row in log)
    # every row was sent (to this subscriber), after it was queued
    assert all(row["sent"] is not None and row["sent"] >= row["time"] for row in log[-count:])


@pytest.mark.asyncio
async def test_scenario_runs_control_steps_in_time(paper: PaperHandle, tmp_path: Path) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(
        '[[steps]]\nat = 0.0\nmethod = "paper/set_index"\n'
        'params = { underlying = "ETHUSD", price = 4000 }\n\n'
        '[[steps]]\nat = 0.05\nmethod = "paper/move_index"\nrepeat = 3\nevery = 0.02\n'
        'params = { underlying = "ETHUSD", delta = 10 }\n'
    )
    steps = load_scenario(path)
    assert [round(s.at, 2) for s in steps] == [0.0, 0.05, 0.07, 0.09]
    await run_scenario(steps, paper.exchange.control)
    assert paper.exchange.market.index["ETHUSD"] == pytest.approx(4030)
    with pytest.raises(ValueError):
        parse_scenario([{"at": 0, "method": "private/insert"}])


def test_command_line_server_logs_ready_url_and_shuts_down(
    tmp_path: Path, keys: dict[str, KeyFiles], keys_dir: Path
) -> None:
    scenario = tmp_path / "s.json"
    scenario.write_text(json.dumps({"steps": [{"at": 0, "method": "paper/pause"}]}))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.paper",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--keys",
            str(keys_dir),
            "--seed",
            "4",
            "--control",
            "--scenario",
            str(scenario),
            "--reconnect-grace",
            "0.1",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        url = None
        deadline = time.monotonic() + 20
        while url is None and time.monotonic() < deadline:
            match = re.search(r"ready at (ws://127\.0\.0\.1:(\d+)/ws/api/v2)", process.stderr.readline())
            if match and match.group(2) != "0":
                url = match.group(1)
        assert url is not None

        async def talk() -> dict:
            async with websockets.connect(url) as ws:
                client = RawClient(ws)
                await client.login(keys["trader"])
                return await client.result("paper/status")

        status = asyncio.run(talk())
        assert status["seed"] == 4 and status["url"] == url
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.asyncio
async def test_paper_step_replays_the_same_walk_for_a_seed() -> None:
    async def walk(seed: int) -> dict:
        exchange = PaperExchange({}, seed=seed, control=True)
        return (await exchange.control("paper/step", {"count": 50, "dt": 60}))["index"]

    first, again, other = await walk(9), await walk(9), await walk(10)
    assert first == again and first != other
    assert first["BTCUSD"] != 95000.0
