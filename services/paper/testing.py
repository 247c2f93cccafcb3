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
:class:`ControlClient` is the same control channel for an exchange running elsewhere (e.g. a
``thalex-tp paper`` process): ``await ControlClient(url).call("paper/status")``.
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


class ControlClient:
    """The ``paper/*`` control API of a paper exchange at ``url``, over one websocket of its own.

    The websocket is opened on first use and reopened once if it was dropped; answers are
    matched by id (notifications such as the reconnect notice are skipped).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._ws: ClientConnection | None = None
        self._ids = itertools.count(1)

    async def call(self, method: str, params: dict | None = None) -> Any:
        """Call a ``paper/*`` method and return its result (raises ControlError on error)."""
        try:
            return await self._call(method, params)
        except websockets.ConnectionClosed:
            self._ws = None
            return await self._call(method, params)

    async def _call(self, method: str, params: dict | None) -> Any:
        if self._ws is None:
            self._ws = await websockets.connect(self.url, max_size=None)
        rid = next(self._ids)
        await self._ws.send(json.dumps({"method": method, "params": params or {}, "id": rid}))
        while True:
            answer = json.loads(await self._ws.recv())
            if answer.get("id") == rid and "channel_name" not in answer:
                break
        if "error" in answer:
            raise ControlError(answer["error"]["code"], answer["error"]["message"])
        return answer["result"]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def start_rogue_bot(
        self,
        key_id: str,
        instrument_name: str,
        position: float,
        *,
        modes: tuple[str, ...] = ("orders", "mass_quotes", "grid"),
        delay: float = 1.0,
        label: str = "rogue",
    ) -> dict:
        """A bot that does not listen: whenever the key's account holds less than ``position`` (signed) of
        the instrument for ``delay`` seconds it re-opens it, by turns with a plain order, a mass quote of
        its own session and the fills of a grid bot it keeps running (docs/paper.md); the rogue's row."""
        params = {
            "key_id": key_id,
            "instrument_name": instrument_name,
            "position": position,
            "modes": list(modes),
            "delay": delay,
            "label": label,
        }
        return await self.call("paper/start_rogue_bot", params)

    async def stop_rogue_bot(self, rogue_id: str) -> dict:
        """Stop re-opening; the rogue's grid bot stops (``admin_cancel``), positions stay."""
        return await self.call("paper/stop_rogue_bot", {"rogue_id": rogue_id})


@dataclass
class PaperHandle:
    """A running paper exchange: its ``url`` and a ``control`` channel on its own websocket."""

    url: str
    exchange: PaperExchange
    _client: ControlClient | None = field(default=None, repr=False)

    async def control(self, method: str, params: dict | None = None) -> Any:
        """Call a ``paper/*`` method and return its result (raises ControlError on error)."""
        if self._client is None:
            self._client = ControlClient(self.url)
        return await self._client.call(method, params)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


@asynccontextmanager
async def running_paper_exchange(
    keys_dir: Path | str,
    *,
    seed: int = 1,
    control: bool = True,
    tick_interval: float = 0.25,
    reconnect_grace: float = 0.0,
    host: str = "127.0.0.1",
    start_time: float | None = None,
) -> AsyncIterator[PaperHandle]:
    """Start a paper exchange in-process on a free port; stop it (reconnect notice first) on exit.

    ``start_time`` starts the paper's clock there (Unix seconds) instead of now."""
    exchange = PaperExchange(
        load_keys(keys_dir),
        seed=seed,
        control=control,
        host=host,
        port=0,
        tick_interval=tick_interval,
        reconnect_grace=reconnect_grace,
        start_time=start_time,
    )
    url = await exchange.start()
    handle = PaperHandle(url, exchange)
    try:
        yield handle
    finally:
        await handle.close()
        await exchange.stop()
