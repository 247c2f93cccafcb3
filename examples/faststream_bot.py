"""A bot written as a FastStream app that follows the guardian — for bots that are FastStream apps already.

It reads two of thalex-tp's streams and keeps one habit of a good neighbour:

* `tp:commands` — the guardian decided a closure: stand down at once (pull your quotes) and
  acknowledge in `tp:halt:acks`, so `thalex-tp status` shows the operator you did;
* `tp:reports` — how the closure went: `completed` (the guardian lifts `tp:halt` after its
  cool-down), or `failed` (`tp:halt` stays until an operator runs `thalex-tp resume`);
* `tp:halt` (a hash, not a stream) is the state of record: it is read at start and every
  `--halt-poll` seconds, so a halt the streams did not show this bot is still obeyed.

Your quoting goes where `stand_down()` and `may_quote()` are; examples/quoter.py shows the same
habits on the official `thalex` client.

    pip install 'thalex-tp[faststream]'    # FastStream 0.7 with Redis
    python examples/faststream_bot.py --redis-url redis://quoter:PASSWORD@127.0.0.1:6379/0 --name my-bot

Delivery semantics, and why this bot is built the way it is (FastStream 0.7.8; re-check after an
upgrade, see the maintainers' notes in docs/streams.md):

1. **Plain JSON.** The guardian writes one JSON document in the field `__data__`, with no
   envelope. FastStream 0.7's default format is its own binary envelope, so the subscribers
   below pass `message_format=PlainJSON` (a few lines): the body is the document, nothing else.
2. **No consumer group: a plain XREAD from `$`.** This bot observes; it is not one of the
   guardian's consumers. Without a group it needs no write access to the guardian's streams
   (no XGROUP CREATE, no XACK), leaves no pending entries behind when it dies, and never
   reads an old closure as if it were new. The price: only entries written while it runs are
   seen (none from before the start, none from a restart's gap), at most once — hence the
   `tp:halt` read at start and by the poll: react fast on the stream, trust the hash.
3. **If you use a group anyway** (`StreamSub(..., group=..., consumer=...)`): FastStream creates
   it at `$` (a `last_id="0"` only works on a group it creates; on every restart after that it
   re-reads its own pending entries forever and never reads new ones, faststream#2694); it never
   re-reads its own pending entries after a crash (#2197): an entry read but not acked before a
   crash is never delivered to that consumer again; it never claims or dead-letters; a lost
   group (NOGROUP, e.g. Redis restarted without its data) stops the app — run it under a
   supervisor that restarts it (systemd, Docker's restart policy).
4. **Read errors** (Redis restarting) pause a subscriber 5 s, then it goes on from its last id.
5. **Redis ACL.** In the compose deployment bots connect as the user `quoter`. This bot needs
   `XREAD` on `tp:commands` and `tp:reports`, `HGETALL` on `tp:halt` and `HSET` on
   `tp:halt:acks` (docs/operations.md, "Your bots").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from typing import Any

import redis.asyncio as redis
from faststream import FastStream
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.parser import MessageFormat
from pydantic import BaseModel, ConfigDict

log = logging.getLogger("faststream_bot")
NOT_YET = object()


class PlainJSON(MessageFormat):
    """The guardian's wire format: the bare JSON document in `__data__`, no envelope, no headers."""

    __slots__ = ()

    @classmethod
    async def encode(cls, *, message: Any, reply_to: str | None, headers: dict[str, Any] | None,
                     correlation_id: str, serializer: Any = None, codec: Any = None) -> bytes:
        if isinstance(message, BaseModel):
            return message.model_dump_json(exclude_none=True).encode()
        return json.dumps(message).encode()

    @classmethod
    def parse(cls, data: bytes) -> tuple[bytes, dict[str, Any]]:
        return data, {"content-type": "application/json"}


class Document(BaseModel):
    """Read only what the bot uses, ignore the rest: a field the guardian adds later breaks nothing."""

    model_config = ConfigDict(extra="ignore")

    v: int


class Command(Document):
    command_id: str
    reason: str
    fraction: float
    legs: dict[str, list[Any]] | None = None
    """v2: the positions to close as columns (`instrument`, `amount`, ...)."""
    positions: list[dict[str, Any]] | None = None
    """v1 (before issue 22's eighth pass): one object per position."""

    def held(self) -> str:
        if self.legs is not None:
            pairs = zip(self.legs.get("instrument", []), self.legs.get("amount", []), strict=False)
        else:
            pairs = ((p.get("instrument"), p.get("amount")) for p in self.positions or [])
        return ", ".join(f"{instrument} {amount}" for instrument, amount in pairs)


class Report(Document):
    command_id: str
    status: str
    error: dict[str, Any] | None = None


class Bot:
    """Your bot: quotes while the guardian lets it, stands down when it closes."""

    def __init__(self, client: redis.Redis, namespace: str, name: str) -> None:
        self.client = client
        self.halt_key = f"{namespace}:halt"
        self.acks_key = f"{namespace}:halt:acks"
        self.name = name
        self.standing_down = False
        self.acked: object = NOT_YET  # the command_id (None: an operator halt) last acknowledged

    async def stand_down(self, command_id: str | None, why: str) -> None:
        """Pull every quote, then acknowledge (once per closure)."""
        if not self.standing_down:
            log.warning("standing down: %s", why)
            self.standing_down = True  # your bot: cancel its orders here
        if command_id != self.acked:
            ack: dict[str, Any] = {"v": 1, "ts": time.time()}
            if command_id:
                ack["command_id"] = command_id
            await self.client.hset(self.acks_key, self.name, json.dumps(ack))
            self.acked = command_id

    async def check_halt(self) -> None:
        """`tp:halt` is the state of record: set means stand down, gone means quote again."""
        halt = {str(k): str(v) for k, v in (await self.client.hgetall(self.halt_key)).items()}  # decoded
        if halt:
            await self.stand_down(halt.get("command_id"), f"tp:halt is set ({halt.get('reason')})")
        elif self.standing_down:
            log.warning("tp:halt lifted: quoting again")
            self.standing_down = False
            self.acked = NOT_YET

    def may_quote(self) -> bool:
        return not self.standing_down


def build(args: argparse.Namespace) -> FastStream:
    broker = RedisBroker(args.redis_url)
    app = FastStream(broker)
    bot = Bot(redis.Redis.from_url(args.redis_url, decode_responses=True), args.namespace, args.name)
    commands = StreamSub(f"{args.namespace}:commands", polling_interval=1000)
    reports = StreamSub(f"{args.namespace}:reports", polling_interval=1000)
    poller: list[asyncio.Task[None]] = []

    @broker.subscriber(stream=commands, message_format=PlainJSON)
    async def on_command(command: Command) -> None:
        """The guardian decided a closure."""
        await bot.stand_down(command.command_id, f"tp:commands: {command.reason} {command.command_id} "
                                                 f"(fraction {command.fraction}: {command.held()})")

    @broker.subscriber(stream=reports, message_format=PlainJSON)
    async def on_report(report: Report) -> None:
        """How the closure goes."""
        if report.status == "completed":
            log.warning("tp:reports: closure %s completed; quoting resumes when tp:halt is lifted",
                        report.command_id)
        elif report.status == "failed":
            log.error("tp:reports: closure %s FAILED (%s); tp:halt stays until an operator resumes",
                      report.command_id, report.error)

    async def poll_halt() -> None:
        while True:
            try:
                await bot.check_halt()
            except redis.RedisError as exc:
                log.error("cannot read %s: %s (retrying)", bot.halt_key, exc)
            await asyncio.sleep(args.halt_poll)

    @app.after_startup
    async def started() -> None:
        await bot.check_halt()
        poller.append(asyncio.create_task(poll_halt()))
        log.info("listening to %s and %s as %s", commands.name, reports.name, args.name)

    @app.on_shutdown
    async def stopping() -> None:
        for task in poller:
            task.cancel()
        await bot.client.aclose()

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="tp", help="the guardian's [redis] namespace (paper: paper)")
    parser.add_argument("--name", default="faststream-bot", help="this bot's name in tp:halt:acks")
    parser.add_argument("--halt-poll", type=float, default=1.0, help="seconds between reads of tp:halt")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(build(args).run())


if __name__ == "__main__":
    main()
