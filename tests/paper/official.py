"""The official ``thalex`` client against the paper exchange, with every message it receives kept.

``Official`` drives the paper only through ``thalex.Thalex``'s own methods (``await
bot.result("portfolio")`` calls ``Thalex.portfolio(id=...)``); a background reader files answers
by id and notifications in arrival order, and ``problems()`` validates every message received
strictly against api.yaml (see :mod:`tests.paper.schema`), naming the method each answer answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import types
from collections.abc import Callable
from typing import Any

import thalex

from services.paper.keys import KeyFiles

from .schema import channel_family, message_problems


class ThalexError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Official:
    """One websocket of the official client; ``async with Official(url) as bot: ...``."""

    def __init__(self, url: str) -> None:
        self.client = thalex.Thalex(types.SimpleNamespace(value=url))
        self.methods: dict[Any, str] = {}
        """Request id -> the JSON-RPC method the official client sent with it."""
        self.received: list[dict] = []
        self.answers: dict[Any, dict] = {}
        self.notifications: list[dict] = []
        self._taken: set[int] = set()
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Official:
        await self.client.connect()
        send = self.client.ws.send

        async def recording_send(text: str) -> None:
            request = json.loads(text)
            self.methods[request.get("id")] = request["method"]
            await send(text)

        self.client.ws.send = recording_send
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    async def _read(self) -> None:
        while True:
            message = json.loads(await self.client.receive())
            self.received.append(message)
            if "channel_name" in message:
                self.notifications.append(message)
            else:
                self.answers[message.get("id")] = message
            self._arrived.set()

    async def _wait(self, ready: Callable[[], Any], within: float) -> Any:
        async with asyncio.timeout(within):
            while True:
                found = ready()
                if found is not None:
                    return found
                self._arrived.clear()
                await self._arrived.wait()

    async def request(self, name: str, *args: Any, within: float = 5.0, **kwargs: Any) -> dict:
        """Call ``Thalex.<name>(*args, id=..., **kwargs)`` and return the whole answer."""
        rid = next(self._ids)
        await getattr(self.client, name)(*args, id=rid, **kwargs)
        return await self._wait(lambda: self.answers.get(rid), within)

    async def result(self, name: str, *args: Any, **kwargs: Any) -> Any:
        answer = await self.request(name, *args, **kwargs)
        if "error" in answer:
            raise ThalexError(answer["error"]["code"], answer["error"]["message"])
        return answer["result"]

    async def error(self, name: str, *args: Any, **kwargs: Any) -> int:
        answer = await self.request(name, *args, **kwargs)
        assert "error" in answer, answer
        return int(answer["error"]["code"])

    async def login(self, key: KeyFiles) -> dict:
        return await self.result("login", key.kid, key.private_pem)

    async def notification(
        self, channel: str, predicate: Callable[[Any], bool] = lambda n: True, within: float = 5.0
    ) -> Any:
        """The first notification of ``channel`` not taken yet that matches ``predicate`` (waits for it)."""

        def find() -> Any:
            for number, message in enumerate(self.notifications):
                taken = number in self._taken or message["channel_name"] != channel
                if not taken and predicate(message["notification"]):
                    self._taken.add(number)
                    return message
            return None

        return (await self._wait(find, within))["notification"]

    async def settle(self, seconds: float = 0.3) -> None:
        """Let the notifications in flight arrive."""
        await asyncio.sleep(seconds)

    def of(self, channel: str) -> list[Any]:
        return [m["notification"] for m in self.notifications if m["channel_name"] == channel]

    def channels_seen(self) -> set[str]:
        return {channel_family(m["channel_name"]) for m in self.notifications}

    def methods_answered(self) -> set[str]:
        return {self.methods[rid] for rid, answer in self.answers.items() if "result" in answer}

    def problems(self) -> list[str]:
        """Every received message that does not validate strictly against api.yaml."""
        out: list[str] = []
        for message in self.received:
            method = None if "channel_name" in message else self.methods.get(message.get("id"))
            out += message_problems(message, method)
        return out
