"""Each target's outbox in Redis: what is still to be sent, when, and what was sent (at most once).

Keys, per target (`<ns>:notify:` + suffix):

* `outbox:<target>` — hash: notification id -> `Entry` (the notification, attempts, first
  queued, `waiting` or `sending`);
* `due:<target>` — sorted set: notification id -> when to try next;
* `done:<target>` — sorted set: notification id -> when it was settled (sent, rejected, given up
  or unconfirmed); the last `DONE_KEPT` are kept. An id in it is never queued or sent again.

Entries are queued on the consumer's transaction (with the ack), so a notification exists in
the outbox exactly when its input was handled. The sender marks an entry `sending` before the
request and settles it after: an entry found `sending` at start-up belongs to a request that
was under way when the process died. It may have reached the target, so it is settled as
unconfirmed, never sent again (at most once). One notify process per guardian: the sender is not
coordinated across replicas.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from services.common.contracts import Notification
from services.common.streams import Names

DONE_KEPT = 10_000


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    note: Notification
    attempts: int = 0
    first_ts: float
    state: Literal["waiting", "sending"] = "waiting"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Outbox:
    """One target's outbox (see the module docstring)."""

    def __init__(self, redis: Redis, names: Names, target: str) -> None:
        self.redis = redis
        self.outbox = names.notify_key(f"outbox:{target}")
        self.due = names.notify_key(f"due:{target}")
        self.done = names.notify_key(f"done:{target}")

    async def settled(self, ids: list[str]) -> set[str]:
        """Which of `ids` were already settled (never queue those again)."""
        if not ids:
            return set()
        scores = await self.redis.zmscore(self.done, ids)
        return {i for i, score in zip(ids, scores, strict=True) if score is not None}

    def queue(self, pipe: Pipeline, note: Notification, now: float) -> None:
        """Queue `note` on the handler's transaction; a no-op for an id already in the outbox."""
        pipe.hsetnx(self.outbox, note.id, Entry(note=note, first_ts=now).model_dump_json())
        pipe.zadd(self.due, {note.id: now}, nx=True)

    async def claim(self, now: float) -> Entry | None:
        """The next entry due, marked `sending`; None when nothing is due."""
        while True:
            ids = await self.redis.zrangebyscore(self.due, "-inf", now, start=0, num=1)
            if not ids:
                return None
            note_id = _text(ids[0])
            raw = await self.redis.hget(self.outbox, note_id)
            if raw is None:  # settled meanwhile (a duplicate queued while it was being sent)
                await self.redis.zrem(self.due, note_id)
                continue
            entry = Entry.model_validate_json(raw)
            entry = entry.model_copy(update={"attempts": entry.attempts + 1, "state": "sending"})
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.outbox, note_id, entry.model_dump_json())
                pipe.zrem(self.due, note_id)
                await pipe.execute()
            return entry

    async def settle(self, note_id: str, now: float) -> None:
        """Sent, rejected, given up or unconfirmed: out of the outbox, never again."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.outbox, note_id)
            pipe.zrem(self.due, note_id)
            pipe.zadd(self.done, {note_id: now})
            pipe.zremrangebyrank(self.done, 0, -DONE_KEPT - 1)
            await pipe.execute()

    async def retry(self, entry: Entry, at: float) -> None:
        """Back to waiting, due again at `at`."""
        waiting = entry.model_copy(update={"state": "waiting"})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.outbox, entry.note.id, waiting.model_dump_json())
            pipe.zadd(self.due, {entry.note.id: at})
            await pipe.execute()

    async def entries(self) -> list[Entry]:
        return [Entry.model_validate_json(raw) for raw in (await self.redis.hgetall(self.outbox)).values()]

    async def settle_interrupted(self, now: float) -> list[Entry]:
        """Settle the entries a dead process was sending (they may have arrived); returns them."""
        interrupted = [e for e in await self.entries() if e.state == "sending"]
        for entry in interrupted:
            await self.settle(entry.note.id, now)
        return interrupted
