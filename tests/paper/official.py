"""The official ``thalex`` client against the paper exchange, keeping every message for strict api.yaml checks.

``OfficialClient.call("create_grid_bot", ...)`` calls the client's own method (with an ``id``) and
returns the whole answer; every message the client receives is kept and :func:`problems` validates
all of them (results by the method actually sent, notifications by their channel) with the strict
schema helpers of ``test_paper_schema``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import types
from collections.abc import Callable
from typing import Any

import thalex

from services.paper.keys import KeyFiles

from .test_paper_schema import _errors, _payload_schema, _result_schema, _validator

BOT_FIELDS_API_YAML_LEAVES_OUT = ("bot_id", "status", "stop_reason")
"""api.yaml's ``Bot`` variants for DHedge and DFollow list neither ``bot_id`` nor ``status`` nor
``stop_reason``, yet ``cancel_bot`` takes "the bot_id returned when creating the bot, or calling
private/bots" and the feed lists stopped bots: the paper sends them for every strategy, and these
checks accept exactly these three fields (typed as in the other variants) on those two variants."""


def with_bot_ids(api: dict) -> dict:
    """``api`` with DHedge and DFollow bots allowed the three fields every other bot carries."""
    patched = copy.deepcopy(api)
    variants = patched["components"]["schemas"]["Bot"]["oneOf"]
    sgsl = next(v for v in variants if v["title"] == "SGSL")
    for variant in variants:
        if variant["title"] in ("DHedge", "DFollow"):
            for name in BOT_FIELDS_API_YAML_LEAVES_OUT:
                variant["properties"][name] = sgsl["properties"][name]
    return patched


class OfficialClient:
    def __init__(self, url: str) -> None:
        self.client = thalex.Thalex(types.SimpleNamespace(value=url))
        self.ids = itertools.count(1)
        self.sent: dict[int, str] = {}
        self.received: list[dict] = []
        self.notifications: list[dict] = []

    async def connect(self) -> OfficialClient:
        await self.client.connect()
        original = self.client.ws.send

        async def send(message: str) -> None:
            request = json.loads(message)
            self.sent[request.get("id")] = request["method"]
            await original(message)

        self.client.ws.send = send
        return self

    async def login(self, key: KeyFiles) -> dict:
        return await self.result("login", key.kid, key.private_pem)

    async def call(self, name: str, *args: Any, timeout: float = 5.0, **kwargs: Any) -> dict:
        """Call ``thalex.Thalex.<name>`` and return the whole answer."""
        rid = next(self.ids)
        await getattr(self.client, name)(*args, id=rid, **kwargs)
        while True:
            message = await self._next(timeout)
            if "channel_name" not in message and message.get("id") == rid:
                return message

    async def result(self, name: str, *args: Any, **kwargs: Any) -> Any:
        answer = await self.call(name, *args, **kwargs)
        assert "result" in answer, answer
        return answer["result"]

    async def error(self, name: str, *args: Any, **kwargs: Any) -> dict:
        answer = await self.call(name, *args, **kwargs)
        assert "error" in answer, answer
        return answer["error"]

    async def _next(self, timeout: float) -> dict:
        message = json.loads(await asyncio.wait_for(self.client.receive(), timeout))
        self.received.append(message)
        if "channel_name" in message:
            self.notifications.append(message)
        return message

    async def wait_for(
        self, channel: str, predicate: Callable[[Any], bool] = lambda n: True, timeout: float = 5.0
    ) -> Any:
        """The first (already received or future) notification of ``channel`` matching ``predicate``."""
        for message in self.notifications:
            if message["channel_name"] == channel and predicate(message["notification"]):
                self.notifications.remove(message)
                return message["notification"]
        deadline = asyncio.get_running_loop().time() + timeout
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

    def seen(self, channel: str) -> list[Any]:
        """Every notification of ``channel`` received so far (consumed or not)."""
        return [m["notification"] for m in self.received if m.get("channel_name") == channel]

    async def close(self) -> None:
        await self.client.disconnect()


def problems(api: dict, *clients: OfficialClient) -> list[str]:
    """Everything the clients received that api.yaml (strict) does not allow."""
    api = with_bot_ids(api)
    found: list[str] = []
    for client in clients:
        for message in client.received:
            if "channel_name" in message:
                channel = message["channel_name"]
                validator = _validator(api, _payload_schema(api, channel))
                found += [f"{channel}: {p}" for p in _errors(validator, message["notification"])]
            elif "error" in message:
                error_schema = _validator(api, {"$ref": "#/components/schemas/ErrorResponse"})
                found += _errors(error_schema, {"error": message["error"]})
            else:
                method = client.sent[message["id"]]
                validator = _validator(api, _result_schema(api, method))
                found += [f"{method}: {p}" for p in _errors(validator, message["result"])]
    return found


def methods_answered(*clients: OfficialClient) -> set[str]:
    return {c.sent[m["id"]] for c in clients for m in c.received if "result" in m and "channel_name" not in m}
