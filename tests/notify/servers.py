"""Real HTTP servers on loopback standing in for the notification targets and a service's /health."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from services.common.redis_server import free_port


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class StandIn:
    """A target on 127.0.0.1:`port` recording every POST; `answers` are the statuses to give, in order."""

    port: int = field(default_factory=free_port)
    answers: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    health: dict[str, Any] | None = None
    """When set, GET /health answers this JSON (200 if healthy, else 503)."""
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _post(self, request: web.Request) -> web.Response:
        self.received.append(
            Received(request.path, dict(request.headers), await request.read(), time.monotonic())
        )
        status = self.answers.pop(0) if self.answers else 200
        if request.path.endswith("/sendMessage"):  # Telegram's Bot API answers JSON
            ok = status == 200
            return web.json_response(
                {"ok": ok, "result": {"message_id": len(self.received)}}
                if ok
                else {"ok": False, "error_code": status, "description": "Bad Request"},
                status=status,
            )
        return web.Response(status=status, text="ok" if status == 200 else "no")

    async def _get_health(self, request: web.Request) -> web.Response:
        body = self.health or {}
        return web.json_response(body, status=200 if body.get("healthy") else 503)

    async def start(self) -> StandIn:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._post)
        app.router.add_get("/health", self._get_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> list[str]:
        return [r.headers.get("X-Thalex-TP-Notification-Id", "") for r in self.received]


async def wait_until(check: Any, within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
