"""A command's lease and progress in Redis, and the reports written with them.

The lease (`SET NX PX`, value = a fencing token unique to this attempt) says who works a
command; every progress write checks the token in the same Lua call that writes it and appends
the reports, so an executor that lost its lease can neither overwrite the new owner's progress
nor publish for it. Keys (under the namespace): `executor:lease:<command_id>`,
`executor:progress:<command_id>` (JSON, `PROGRESS_TTL_SECONDS`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from services.common.bus import DATA_FIELD, encode_document, raise_if_cancelled
from services.common.contracts import Report, ReportStatus
from services.common.streams import Names
from services.executor.plan import Progress

log = logging.getLogger(__name__)

LEASE_SECONDS = 3.0
"""A dead executor's lease expires this fast; a live one renews it every third of it."""
PROGRESS_TTL_SECONDS = 30 * 24 * 3600
"""How long a command's progress is kept: a replay within this window is reported `duplicate`."""
LEASE_WAIT_SECONDS = 0.1

SAVE_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
for i = 6, #ARGV do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', ARGV[5], ARGV[i])
end
return 1
"""
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
ACQUIRE_SCRIPT = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local held = redis.call('GET', KEYS[2])
  if held then return {0, held} end
  return {0}
end
local current = redis.call('GET', KEYS[2])
if current then return {1, current} end
if ARGV[3] == '' then return {1} end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[4])
for i = 7, #ARGV do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', ARGV[6], ARGV[i])
end
return {2}
"""
"""Take the lease and read the progress in one round trip; a command seen for the first time gets
its progress created and `received` published in the same call (only by the lease's holder).
The reports are written as the bus writes every document (`DATA_FIELD`, `encode_document`)."""
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class Claim:
    """The lease on a command and its progress as read under it."""

    token: str
    progress: Progress | None
    created: bool
    """The progress was created (and `received` published) by this claim."""


class LeaseLost(RuntimeError):
    """Another executor owns the command now; this one must stop touching it."""


@dataclass
class Work:
    """One command in the hands of this executor: its progress, lease token and reports to publish."""

    progress: Progress
    token: str
    created_ts: float
    reports: list[Report] = field(default_factory=list)
    clearing_rounds: int = 0
    """Clearing rounds sent for this command by this process (`clearing.py`)."""
    lease_lost: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, status: ReportStatus, **fields: Any) -> None:
        self.reports.append(self.progress.report(status, time.time(), **fields))

    def check(self) -> None:
        """Stop touching the command once another executor holds its lease."""
        if self.lease_lost.is_set():
            raise LeaseLost(self.progress.command_id)


class Store:
    """A command's progress and lease in Redis (see the module docstring)."""

    def __init__(self, redis: Redis, names: Names, maxlen: int, owner: str) -> None:
        self.redis = redis
        self.names = names
        self.maxlen = maxlen
        self.owner = owner
        self._save = redis.register_script(SAVE_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)

    def _progress_key(self, command_id: str) -> str:
        return self.names.key(f"executor:progress:{command_id}")

    def _lease_key(self, command_id: str) -> str:
        return self.names.key(f"executor:lease:{command_id}")

    async def load(self, command_id: str) -> Progress | None:
        raw = await self.redis.get(self._progress_key(command_id))
        return None if raw is None else Progress.model_validate_json(raw)

    async def known(self, command_id: str) -> bool:
        """Whether the command has a progress here (worked on now or before), whatever its state."""
        return await self.redis.get(self._progress_key(command_id)) is not None

    async def acquire(self, command_id: str) -> str | None:
        """Wait for the lease; None when the command is finished meanwhile (a duplicate)."""
        claimed = await self.claim(command_id)
        return None if claimed is None else claimed.token

    async def claim(self, command_id: str,
                    fresh: Callable[[], tuple[Progress, list[Report]]] | None = None) -> Claim | None:
        """Wait for the lease and read the progress, one Redis round trip per attempt.

        None when the command is finished (terminal progress: a duplicate), whether the lease
        was free or not. With `fresh`, a command without progress gets `fresh()`'s progress
        and reports written in the same Lua call as the lease (`created`), so the first
        `received` costs no extra round trip.
        """
        token = f"{self.owner}:{uuid.uuid4().hex}"
        keys = [self._lease_key(command_id), self._progress_key(command_id), self.names.reports]
        while True:
            args: list[Any] = [token, int(LEASE_SECONDS * 1000), "", PROGRESS_TTL_SECONDS, self.maxlen,
                               DATA_FIELD]
            created: Progress | None = None
            if fresh is not None:
                created, reports = fresh()
                args[2] = created.model_dump_json()
                args.extend(encode_document(r) for r in reports)
            reply = await self._acquire(keys=keys, args=args)
            status = int(reply[0])
            progress = Progress.model_validate_json(reply[1]) if len(reply) > 1 else None
            if status == 2:
                assert created is not None
                return Claim(token, created, created=True)
            if status == 1:
                if progress is not None and progress.terminal:
                    await self.release(command_id, token)
                    return None
                return Claim(token, progress, created=False)
            if progress is not None and progress.terminal:
                return None
            await asyncio.sleep(LEASE_WAIT_SECONDS)

    async def renew(self, command_id: str, token: str) -> bool:
        return bool(await self._renew(keys=[self._lease_key(command_id)],
                                      args=[token, int(LEASE_SECONDS * 1000)]))

    async def release(self, command_id: str, token: str) -> None:
        await self._release(keys=[self._lease_key(command_id)], args=[token])

    async def save(self, progress: Progress, token: str, reports: Iterable[Report] = ()) -> None:
        """Progress and reports in one Lua call, only while `token` holds the lease (`LeaseLost` if not)."""
        ok = await self._save(
            keys=[self._lease_key(progress.command_id), self._progress_key(progress.command_id),
                  self.names.reports],
            args=[token, progress.model_dump_json(), PROGRESS_TTL_SECONDS, self.maxlen, DATA_FIELD,
                  *(encode_document(r) for r in reports)],
        )
        if not ok:
            raise LeaseLost(progress.command_id)

    async def commit(self, work: Work) -> None:
        """Save the work's progress with its reports; what the progress holds unpublished goes first."""
        reports = [*work.progress.take_unpublished(), *work.reports]
        work.reports = []
        await self.save(work.progress, work.token, reports)

    async def keep_lease(self, work: Work) -> None:
        """Renew the work's lease every third of its life until cancelled; mark it lost when it is."""
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                if not await self.renew(work.progress.command_id, work.token):
                    work.lease_lost.set()
                    return
            except Exception:
                raise_if_cancelled()
                log.exception("renewing the lease of %s failed", work.progress.command_id)
