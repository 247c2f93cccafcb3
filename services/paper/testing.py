"""Helpers for tests and other services that need a running paper exchange.

Usage::

    from services.paper.testing import make_keys, running_paper_exchange

    trader = make_keys(tmp_path / "keys", "trader")               # may trade
    watcher = make_keys(tmp_path / "keys", "watcher", read_only=True)
    async with running_paper_exchange(tmp_path / "keys", seed=7) as paper:
        client = thalex.Thalex(types.SimpleNamespace(value=paper.url))
        await client.connect()
        await client.login(trader.kid, trader.private_pem, id=1)
        await paper.control("paper/pause")                         # freeze prices
        await paper.control("paper/set_index", {"underlying": "BTCUSD", "price": 100000})
        log = await paper.control("paper/order_log", {"key_id": "trader"})

``paper.control`` raises :class:`ControlError` (with ``code``) when the method fails.
``paper.exchange`` is the in-process :class:`~services.paper.server.PaperExchange` for direct
inspection (e.g. ``paper.exchange.engine.accounts``). Keys are loaded when the exchange starts,
so create them first. The market walk ticks every ``tick_interval`` seconds unless paused.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from services.paper.keys import KeyFiles, generate_key, load_keys
from services.paper.server import PaperExchange


class ControlError(Exception):
    """A control request answered with a Thalex-style error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def make_keys(
    directory: Path | str, kid: str, read_only: bool = False, account: str | None = None
) -> KeyFiles:
    """Create a key pair ``kid`` in ``directory`` (see :mod:`services.paper.keys` for the layout).

    Keys given the same ``account`` share one paper account (a read-only key for ingest
    beside a trading key for the executor, as on Thalex).
    """
    return generate_key(directory, kid, read_only, account)


@dataclass
class PaperHandle:
    """A running paper exchange: its ``url`` and a ``control`` channel on its own websocket."""

    url: str
    exchange: PaperExchange
    _ws: ClientConnection | None = None
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    async def control(self, method: str, params: dict | None = None) -> Any:
        """Call a ``paper/*`` method and return its result (raises ControlError on error)."""
        if self._ws is None:
            self._ws = await websockets.connect(self.url, max_size=None)
        rid = next(self._ids)
        await self._ws.send(json.dumps({"method": method, "params": params or {}, "id": rid}))
        while True:
            answer = json.loads(await self._ws.recv())
            if answer.get("id") == rid:
                break
        if "error" in answer:
            raise ControlError(answer["error"]["code"], answer["error"]["message"])
        return answer["result"]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None


@asynccontextmanager
async def running_paper_exchange(
    keys_dir: Path | str,
    *,
    seed: int = 1,
    control: bool = True,
    tick_interval: float = 0.25,
    reconnect_grace: float = 0.0,
    host: str = "127.0.0.1",
) -> AsyncIterator[PaperHandle]:
    """Start a paper exchange in-process on a free port; stop it (reconnect notice first) on exit."""
    exchange = PaperExchange(
        load_keys(keys_dir),
        seed=seed,
        control=control,
        host=host,
        port=0,
        tick_interval=tick_interval,
        reconnect_grace=reconnect_grace,
    )
    url = await exchange.start()
    handle = PaperHandle(url, exchange)
    try:
        yield handle
    finally:
        await handle.close()
        await exchange.stop()
