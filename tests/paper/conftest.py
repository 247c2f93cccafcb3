"""Fixtures for the paper exchange tests: keys, a running exchange with a frozen market, a raw client."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_asyncio
import websockets

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle, make_keys, running_paper_exchange

PERP = "BTC-PERPETUAL"
PAPER_START = dt.datetime(2026, 3, 2, 12, tzinfo=dt.UTC).timestamp()
"""Where the ``paper`` fixture's clock starts: a Monday noon, far from the 08:00 UTC settlement, so a
test crosses a settlement only when it moves the clock (instruments: BTC-3MAR26, BTC-4MAR26, ...)."""


class RawClient:
    """A bare JSON-RPC websocket client that keeps every message it receives (for schema checks)."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.received: list[dict] = []
        self.sent: dict[int, str] = {}
        self.notifications: list[dict] = []

    async def call(self, method: str, params: dict | None = None, within: float = 5.0) -> dict:
        """Send a request and return the whole answer (``result`` or ``error``)."""
        rid = next(self.ids)
        self.sent[rid] = method
        await self.ws.send(json.dumps({"method": method, "params": params or {}, "id": rid}))
        return await self.answer(rid, within)

    async def result(self, method: str, params: dict | None = None) -> Any:
        answer = await self.call(method, params)
        assert "result" in answer, answer
        return answer["result"]

    async def error_code(self, method: str, params: dict | None = None) -> int:
        answer = await self.call(method, params)
        assert "error" in answer, answer
        return answer["error"]["code"]

    async def answer(self, rid: int | None, within: float = 5.0) -> dict:
        while True:
            message = await self._next(within)
            if "channel_name" not in message and message.get("id") == rid:
                return message

    async def _next(self, within: float) -> dict:
        message = json.loads(await asyncio.wait_for(self.ws.recv(), within))
        self.received.append(message)
        if "channel_name" in message:
            self.notifications.append(message)
        return message

    async def wait_for(
        self, channel: str, predicate: Callable[[Any], bool] = lambda n: True, within: float = 5.0
    ) -> Any:
        """The first (already received or future) notification of ``channel`` matching ``predicate``."""
        for message in self.notifications:
            if message["channel_name"] == channel and predicate(message["notification"]):
                self.notifications.remove(message)
                return message["notification"]
        deadline = asyncio.get_running_loop().time() + within
        while True:
            message = await self._next(max(0.01, deadline - asyncio.get_running_loop().time()))
            if message.get("channel_name") == channel and predicate(message["notification"]):
                self.notifications.remove(message)
                return message["notification"]

    async def drain(self, seconds: float = 0.2) -> None:
        try:
            while True:
                await self._next(seconds)
        except TimeoutError:
            pass

    async def login(self, key: KeyFiles) -> dict:
        token = jwt.encode({"iat": time.time()}, key.private_pem, algorithm="RS512", headers={"kid": key.kid})
        return await self.result("public/login", {"token": token})


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


@pytest.fixture
def keys(keys_dir: Path) -> dict[str, KeyFiles]:
    return {
        "trader": make_keys(keys_dir, "trader"),
        "other": make_keys(keys_dir, "other"),
        "reader": make_keys(keys_dir, "reader", read_only=True),
    }


@pytest_asyncio.fixture
async def paper(keys: dict[str, KeyFiles], keys_dir: Path) -> AsyncIterator[PaperHandle]:
    """A paper exchange with the walk paused, BTC-PERPETUAL pinned at 100000, no funding, a 1.0-lot book."""
    async with running_paper_exchange(keys_dir, seed=3, start_time=PAPER_START) as handle:
        await handle.control("paper/pause")
        await handle.control("paper/set_index", {"underlying": "BTCUSD", "price": 100000})
        await handle.control("paper/set_mark", {"instrument_name": PERP, "price": 100000})
        await handle.control(
            "paper/set_funding", {"instrument_name": PERP, "funding_mark": 0.0, "funding_rate": 0.0}
        )
        await handle.control(
            "paper/set_book",
            {
                "instrument_name": PERP,
                "levels": 5,
                "level_amount": 1.0,
                "growth": 0.0,
                "spread_ticks": 1,
                "step_ticks": 1,
            },
        )
        yield handle


@pytest_asyncio.fixture
async def connect(paper: PaperHandle) -> AsyncIterator[Callable[[], Any]]:
    """Factory of raw clients connected to ``paper``; all are closed at the end."""
    opened: list[websockets.ClientConnection] = []

    async def _connect() -> RawClient:
        ws = await websockets.connect(paper.url, max_size=None)
        opened.append(ws)
        return RawClient(ws)

    yield _connect
    for ws in opened:
        await ws.close()


@pytest_asyncio.fixture
async def official(paper: PaperHandle) -> AsyncIterator[Callable[..., Any]]:
    """Factory of logged-in official ``thalex`` clients (``tests.paper.official.Official``) on ``paper``."""
    from .official import Official

    async with contextlib.AsyncExitStack() as stack:

        async def _open(key: KeyFiles) -> Official:
            bot = await stack.enter_async_context(Official(paper.url))
            await bot.login(key)
            return bot

        yield _open


def problems(*bots: Any) -> list[str]:
    """Everything the official clients received that api.yaml (strict) does not allow."""
    return [problem for bot in bots for problem in bot.problems()]
