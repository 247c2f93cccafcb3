"""The bus: Redis Streams, plain JSON, at-least-once.

Wire format: every entry holds one JSON document in field `__data__` (the field
FastStream uses, so a FastStream app can still read and write it); `redis-cli
XRANGE` or any Redis client reads it; a hand-written producer may XADD a
document in `__data__` or in `data`.

At-least-once is the project's guarantee and lives here once, in `StreamConsumer`:

* the group is created at `0` (never `$`) before the reader starts, and
  recreated at `0` if it is lost with a Redis restart;
* on start a consumer first re-reads and finishes **its own** pending entries
  (`XREADGROUP ... 0`), in order, before any new entry is handled;
* a reader task then blocks on `XREADGROUP ... >` and hands each batch to the
  handler as soon as Redis answers;
* entries left pending by a consumer that died (or by a failed handler) are
  re-claimed with `XAUTOCLAIM` after `claim_idle_seconds` and handled again,
  one at a time so one poison entry cannot hold a batch hostage;
* an entry delivered more than `max_deliveries` times is handled once more, alone;
  if the handler fails on it with an error of its own (not Redis or the network:
  `TRANSIENT_ERRORS`), it is dead-lettered with that error as the reason. An entry
  whose handling keeps failing on Redis (down, at `maxmemory`, a read-only
  replica) is never dead-lettered: it waits, pending, and the service's health
  says so (`StreamConsumer.problem`);
* an entry that is not valid JSON or fails its contract model (validated strictly:
  no bool or string becomes a number) is acked and written to `tp:deadletter` with
  the reason, and processing goes on; so is one whose JSON is too deeply nested;
* the handler receives a Redis transaction (`MULTI`) pipeline: it queues its
  effects there (state, checkpoints, published documents) and the consumer
  queues the `XACK` in the same transaction, so an ack is never saved without
  the effects, nor the effects without the ack;
* after a failed batch the service's `on_failure` hook reloads its checkpoint;
  if that fails too (Redis still away) the reload is due (`Bus.restore_due`)
  and runs before the next batch of any consumer of the service.

Why redis-py and not FastStream's subscriber (which DESIGN.md names): FastStream
0.7 reads only new entries and never redelivers, claims or dead-letters
(the FastStream notes beside DESIGN.md), so everything above but the read loop was ours
already; and its read loop (message building, middlewares, dependency
injection, a deep copy of the subscription per read) added 0.12 ms per hop to a
bare redis-py loop on a quiet machine and 0.4-0.55 ms on a busy one; this loop
adds 0.01-0.03 ms (0.15 ms at most on a busy one) (`bench/bus_hop.py`,
docs/performance.md). Every reaction crosses three hops.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT, FieldT
from redis.utils import HIREDIS_AVAILABLE

from services.common.contracts import DeadLetter, Document
from services.common.metrics import BUS_CLAIMED, BUS_DEADLETTERS, BUS_HANDLER_FAILURES, BUS_STREAM_LAG
from services.common.streams import Names

log = logging.getLogger(__name__)

READ_RETRY_SECONDS = 0.2
"""A reader whose read failed (Redis restarting) tries again after this long."""
STOP_TIMEOUT_SECONDS = 5.0


class GroupLost(Exception):
    """The consumer group was gone (a Redis restart without persistence) and has been recreated."""


class Transient(Exception):
    """Raised by a handler: this failure is not the entry's fault (retry it; never dead-letter it)."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError, Transient)
"""Failures of Redis, the network or a dependency: an entry failing with one of these is not poison."""

PROBLEM_TEXT_LIMIT = 300
"""Characters of an error kept as the reason a consumer is failing (health, log)."""


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library turned into an ordinary exception.

    redis-py answers a cancellation that hits it mid-command with its own ConnectionError or
    TimeoutError; a loop that logs and retries on those would then never end, and stopping the
    service would wait for it forever (seen in CI). Call first in every such `except`.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
DATA_FIELD = "__data__"
ALT_DATA_FIELD = "data"

M = TypeVar("M", bound=BaseModel)


def _text(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def encode_document(doc: BaseModel) -> str:
    """The exact text stored in `__data__` for a document."""
    return doc.model_dump_json(exclude_none=True)


def encode_document_bytes(doc: BaseModel) -> bytes:
    """`encode_document` as UTF-8, straight from pydantic-core's serializer (same options, same text).

    1.2 µs for a tick instead of `model_dump_json`'s 2.1 µs (its Python wrapper and the decode to
    `str`): the portfolio pays it for every tick and every changed row it writes.
    """
    return doc.__pydantic_serializer__.to_json(doc, exclude_none=True)


POSITIONS_SLOT = b'"positions":['
"""Where a document's positions go when it was encoded with none (`with_positions`)."""


def with_positions(head: bytes, texts: Iterable[bytes]) -> bytes:
    """`head`, a document encoded with `positions: []`, with its positions' own texts spliced in.

    pydantic writes a list of models as their texts joined by commas, so this is the document
    encoded whole, without encoding each position again (the portfolio's snapshot rows, take-profit's
    closing legs). The first `"positions":[` must be the field's: the caller's fields before it are
    numbers, enums, bools or JSON strings (in which a quote is always escaped).
    """
    at = head.index(POSITIONS_SLOT) + len(POSITIONS_SLOT)
    return b"".join((head[:at], b",".join(texts), head[at:]))


def entry_fields(doc: BaseModel) -> dict[FieldT, EncodableT]:
    """The fields of the stream entry that carries `doc`: the one way every producer writes one."""
    return {DATA_FIELD: encode_document(doc)}


class MalformedEntry(ValueError):
    """An entry that cannot become a contract document; the message says why."""


DATA_FIELD_BYTES = DATA_FIELD.encode()
ALT_DATA_FIELD_BYTES = ALT_DATA_FIELD.encode()


def entry_document(fields: Mapping[Any, Any] | None) -> tuple[str, Any]:
    """Extract `(raw_text, parsed_json)` from an entry's fields.

    Accepts the document in `__data__` (our producers, FastStream) or `data`
    (hand-written producers). Raises `MalformedEntry` with the reason.
    """
    text = _text(_data_of(fields))
    try:
        return text, json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedEntry(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedEntry("not valid JSON: nested too deeply") from None


def _data_of(fields: Mapping[Any, Any] | None) -> Any:
    """The raw document of an entry (`__data__`, else `data`), or `MalformedEntry` saying why not."""
    if not fields:
        raise MalformedEntry("entry has no fields (trimmed or deleted before it was handled)")
    for key in (DATA_FIELD_BYTES, DATA_FIELD, ALT_DATA_FIELD_BYTES, ALT_DATA_FIELD):
        raw = fields.get(key)
        if raw is not None:
            return raw
    raise MalformedEntry(f"entry has neither a '{DATA_FIELD}' nor a '{ALT_DATA_FIELD}' field")


def validate_entry(model: type[M], fields: Mapping[Any, Any] | None) -> M:
    """Turn an entry into a contract document or raise `MalformedEntry` naming the fields.

    Parsed and validated in one pass by pydantic (`model_validate_json`: about 2.7 times faster
    than `json.loads` + `model_validate` on a 1,000-position snapshot), strictly: on the wire no
    bool or string becomes a number. A bad entry's reason comes from that same pass, so nothing
    about it (its depth, its encoding) can make the reason itself fail.
    """
    return read_document(model, _data_of(fields))


def read_document(model: type[M], raw: str | bytes) -> M:
    """One wire document (a stream entry's data, a value of a hash such as `tp:instruments`).

    Raises `MalformedEntry` with the reason: not JSON (or nested too deeply), not an object, or
    which fields break which rule.
    """
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise MalformedEntry(_describe(model, exc)) from None
    except (ValueError, RecursionError) as exc:  # pydantic-core guards depth itself; belt and braces
        raise MalformedEntry(f"cannot be read: {type(exc).__name__}: {exc}") from None


def _describe(model: type[BaseModel], error: ValidationError) -> str:
    errors = error.errors(include_url=False)
    first = errors[0] if errors else None
    if first is not None and first["type"] == "json_invalid":
        return f"not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    if first is not None and not first["loc"] and first["type"] in ("model_type", "model_attributes_type"):
        return f"document must be a JSON object, got {_json_type(first.get('input'))}"
    problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<document>'}: {err['msg']}"
                         for err in errors)
    return f"{model.__name__} invalid: {problems}"


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _error_text(exc: BaseException) -> str:
    """An error as a short reason: its type and message, bounded."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text[:PROBLEM_TEXT_LIMIT]


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return 0, 0


def raw_text(fields: Mapping[Any, Any] | None) -> str:
    """The entry as text, for the dead-letter record."""
    if not fields:
        return ""
    decoded = {_text(k): _text(v) for k, v in fields.items()}
    if set(decoded) <= {DATA_FIELD, ALT_DATA_FIELD} and len(decoded) == 1:
        return str(next(iter(decoded.values())))
    return json.dumps(decoded)


class _HiredisPacking:
    """Commands packed by hiredis, as redis-py's synchronous client already does when it is installed.

    redis-py's asyncio connection packs in pure Python: an HSET of 100 snapshot rows took 138 µs
    there against 38 µs with hiredis (`bench/portfolio_throughput.py`'s profile: packing was 7.5 % of
    the portfolio's CPU at batch 100). Same bytes on the wire (same encoding of str, int and float;
    a bool is refused as before, as `DataError`).
    """

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        packed: list[bytes] = self._packer.pack(*args)  # type: ignore[arg-type]
        return packed


_hiredis_classes: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _pack_with_hiredis(redis: Redis) -> None:
    """Let the client's connections pack with hiredis (whatever class the URL chose: TCP, unix, TLS)."""
    if not HIREDIS_AVAILABLE:
        return
    pool = redis.connection_pool
    base = pool.connection_class
    if issubclass(base, _HiredisPacking):
        return
    packing = _hiredis_classes.get(base)
    if packing is None:
        packing = _hiredis_classes[base] = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    pool.connection_class = packing


@dataclass(frozen=True, slots=True)
class Delivery(Generic[M]):
    """One valid document handed to a handler, with where it came from."""

    entry_id: str
    doc: M
    deliveries: int
    """How many times the entry has been delivered, this time included."""
    text: str | bytes
    """The document as the entry holds it (the executor checks a command's signature over it)."""


Handler = Callable[[list[Delivery[M]], Pipeline], Awaitable[None]]
"""Handles a batch; queues its effects on the pipeline; raises to leave it pending."""


class Bus:
    """One service's connection to Redis and its stream consumers."""

    def __init__(self, url: str, names: Names, service: str, *, maxlen: int = 1_000_000,
                 username: str | None = None, password: str | None = None) -> None:
        self.names = names
        self.service = service
        self.maxlen = maxlen
        credentials: dict[str, Any] = {k: v for k, v in (("username", username), ("password", password)) if v}
        self.redis: Redis = Redis.from_url(url, **credentials)
        _pack_with_hiredis(self.redis)
        self.consumers: list[StreamConsumer[Any]] = []
        self.before_start: list[Callable[[], Awaitable[None]]] = []
        """Run after connecting, before any entry is handled (e.g. load a checkpoint)."""
        self.restore_due: Callable[[], Awaitable[None]] | None = None
        """A restore that failed (Redis still away): memory may be ahead of Redis until it runs."""

    def must_restore(self, restore: Callable[[], Awaitable[None]]) -> None:
        """Memory may be ahead of Redis: nothing is handled before `restore` has run."""
        self.restore_due = restore

    async def restore_if_due(self) -> None:
        """Run the pending restore (call under the service's lock); raises if it fails again."""
        if self.restore_due is not None:
            await self.restore_due()
            self.restore_due = None

    async def publish(self, stream: str, doc: Document) -> None:
        """XADD `doc` as plain JSON (approximately capped) now."""
        await self.redis.xadd(stream, entry_fields(doc), maxlen=self.maxlen, approximate=True)

    def queue_publish(self, pipe: Pipeline, stream: str, doc: Document, maxlen: int | None = None) -> None:
        """Queue an XADD on a transaction pipeline (no await: pipelines buffer)."""
        self.queue_publish_encoded(pipe, stream, encode_document(doc), maxlen)

    def queue_publish_encoded(self, pipe: Pipeline, stream: str, text: str | bytes,
                              maxlen: int | None = None) -> None:
        """`queue_publish` of a document already encoded (`text` is exactly `encode_document`'s)."""
        pipe.xadd(stream, {DATA_FIELD: text}, maxlen=maxlen or self.maxlen, approximate=True)

    def queue_deadletter(self, pipe: Pipeline, source_stream: str, entry_id: str, raw: str,
                         error: str) -> None:
        """Queue a `tp:deadletter` record and count it."""
        letter = DeadLetter(service=self.service, source_stream=source_stream, entry_id=entry_id,
                            raw=raw[:65536], error=error[:4096], ts=time.time())
        self.queue_publish(pipe, self.names.deadletter, letter)
        BUS_DEADLETTERS.labels(self.service, source_stream).inc()
        log.warning("dead-lettered %s %s: %s", source_stream, entry_id, error)

    async def deadletter(self, source_stream: str, entry_id: str, raw: str, error: str) -> None:
        """Write one dead letter now (for inputs that never were stream entries)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            self.queue_deadletter(pipe, source_stream, entry_id, raw, error)
            await pipe.execute()

    def consumer(self, stream: str, group: str, consumer: str, model: type[M], handler: Handler[M],
                 **options: Any) -> StreamConsumer[M]:
        """Register an at-least-once consumer of `stream` (see `StreamConsumer`)."""
        sc = StreamConsumer(self, stream=stream, group=group, consumer=consumer, model=model,
                            handler=handler, **options)
        self.consumers.append(sc)
        return sc

    async def start(self) -> None:
        """Connect, recover every consumer's pending entries, then read new ones."""
        await self.redis.ping()
        for hook in self.before_start:
            await hook()
        for sc in self.consumers:
            await sc.ensure_group()
            await sc.recover_own_pending()  # before the reader starts: old entries first
        for sc in self.consumers:
            sc.start_background()

    async def stop(self) -> None:
        """Stop reading and close."""
        for sc in self.consumers:
            await sc.stop_background()
        await self.redis.aclose()


@dataclass
class StreamConsumer(Generic[M]):
    """At-least-once consumption of one stream by one member of a group."""

    bus: Bus
    stream: str
    group: str
    consumer: str
    model: type[M]
    handler: Handler[M]
    batch_size: int = 100
    max_deliveries: int = 5
    claim_idle_seconds: float = 30.0
    claim_interval_seconds: float = 5.0
    block_ms: int = 100
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises handling; pass one lock to several consumers that share state."""
    on_failure: Callable[[], Awaitable[None]] | None = None
    """Called (under the lock) after a failed batch: restore the state from the last checkpoint."""
    retry_idle_seconds: float = 2.0
    """An own entry pending this long was in a failed batch: retry it at the next claim interval."""
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, init=False)
    _stopping: bool = field(default=False, init=False)
    _in_hand: set[str] = field(default_factory=set, init=False)
    """Entries the reader holds and has not settled yet (waiting for the lock, or being handled)."""
    failing: dict[str, str] = field(default_factory=dict, init=False)
    """Entries whose handling failed and that are still pending → why (until acked or dead-lettered)."""

    @property
    def is_consuming(self) -> bool:
        """The reader and the claimer are alive (for the health endpoint)."""
        return bool(self._tasks) and all(not t.done() for t in self._tasks)

    def problem(self) -> str | None:
        """Why this consumer is not doing its job, or None: a dead reader, or entries it fails on.

        An entry stays here from the failed attempt until it is acked (handled, or dead-lettered
        as poison), so a handler that fails on every entry — or on one real fill, again and
        again — is visible for as long as it lasts, not only at the moment it raised.
        """
        if not self.is_consuming:
            return f"the reader of {self.stream} is not running"
        if not self.failing:
            return None
        oldest = min(self.failing, key=_entry_order)
        count = len(self.failing)
        what = "1 entry" if count == 1 else f"{count} entries"
        return f"{what} of {self.stream} failing (oldest {oldest}): {self.failing[oldest]}"

    async def ensure_group(self) -> None:
        """Create the group at the start of the stream (never `$`)."""
        try:
            await self.bus.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created group %s on %s at 0", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def start_background(self) -> None:
        self._stopping = False
        self._tasks.append(asyncio.create_task(self._read_forever(), name=f"read:{self.stream}"))
        self._tasks.append(asyncio.create_task(self._claim_forever(), name=f"claim:{self.stream}"))

    async def stop_background(self) -> None:
        # The flag, not only the cancel: a cancellation can be swallowed on its way through
        # redis-py, and a loop would then run on and this wait never end.
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TIMEOUT_SECONDS)
            if stuck:  # a handler that swallowed its cancellation: do not hang the shutdown on it
                log.warning("%d task(s) of %s did not stop within %.0f s", len(stuck), self.stream,
                            STOP_TIMEOUT_SECONDS)
        for task in self._tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: never "exception was never retrieved"
        self._tasks.clear()

    async def _read_forever(self) -> None:
        """Hand each batch of new (`>`) entries to `handle` as soon as XREADGROUP returns it.

        Rides out a Redis restart: retries every `READ_RETRY_SECONDS` (one warning per outage)
        and recreates a group the restart lost.
        """
        outage = False
        while not self._stopping:
            try:
                reply = await self._read_new()
            except (RedisConnectionError, RedisTimeoutError, OSError, GroupLost) as exc:
                raise_if_cancelled()
                if not outage or isinstance(exc, GroupLost):
                    log.warning("reading %s failed (%s); retrying every %.1f s", self.stream, exc,
                                READ_RETRY_SECONDS)
                outage = True
                await asyncio.sleep(READ_RETRY_SECONDS)
                continue
            if outage:
                log.info("reading %s again", self.stream)
                outage = False
            for _, entries in reply:
                batch = [(_text(i), fields) for i, fields in entries]
                self._in_hand.update(entry_id for entry_id, _ in batch)
                try:
                    await self.handle(batch, deliveries={})
                finally:  # a failed batch stays pending: `retry_failed_own` takes it from here
                    self._in_hand.difference_update(entry_id for entry_id, _ in batch)

    async def _read_new(self) -> Any:
        """The next batch of new entries ([] after `block_ms` without any); recreates a lost group."""
        try:
            return await self.bus.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                                   count=self.batch_size, block=self.block_ms) or []
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        await self.ensure_group()
        raise GroupLost(f"group {self.group} on {self.stream} was gone (Redis restarted?): recreated at 0")

    async def handle(self, entries: Sequence[tuple[str, Mapping[Any, Any] | None]],
                     deliveries: Mapping[str, int]) -> bool:
        """Validate, dead-letter, run the handler and ack in one transaction.

        Returns False when the handler or the transaction failed: the entries
        stay pending and are retried (`retry_failed_own`), and the service's
        `on_failure` hook restores its state from the last committed checkpoint,
        so what the failed batch changed in memory is forgotten with it. An entry
        past `max_deliveries` is always handled alone, so a poison verdict names one entry.
        """
        if len(entries) > 1 and any(deliveries.get(i, 1) > self.max_deliveries for i, _ in entries):
            results = [await self.handle([entry], deliveries) for entry in entries]
            return all(results)
        async with self.lock:
            try:
                await self.bus.restore_if_due()
                return await self._handle_locked(entries, deliveries)
            except Exception as exc:
                raise_if_cancelled()
                self._note_failure([entry_id for entry_id, _ in entries], exc)
                log.exception("handling %d entries of %s failed; they stay pending", len(entries),
                              self.stream)
                await self._forget_failed_batch()
                return False

    async def _forget_failed_batch(self) -> None:
        """Restore the service's state (`on_failure`): what a failed handler changed in memory is gone."""
        if self.on_failure is not None:
            try:
                await self.on_failure()
            except Exception:  # Redis still away: the next batch restores first
                self.bus.must_restore(self.on_failure)
                log.exception("could not restore the checkpoint after the failure")

    async def _handle_locked(self, entries: Sequence[tuple[str, Mapping[Any, Any] | None]],
                             deliveries: Mapping[str, int]) -> bool:
        good: list[Delivery[M]] = []
        letters: list[tuple[str, str, str]] = []
        handler_failed = False
        for entry_id, fields in entries:
            try:
                text = _data_of(fields)
                doc = read_document(self.model, text)
                good.append(Delivery(entry_id, doc, deliveries.get(entry_id, 1), text))
            except MalformedEntry as exc:
                letters.append((entry_id, raw_text(fields), str(exc)))
        async with self.bus.redis.pipeline(transaction=True) as pipe:
            if good:
                try:
                    await self.handler(good, pipe)
                except Exception as exc:
                    raise_if_cancelled()
                    poison = self._poison(good, exc)
                    if poison is None and not letters:
                        raise
                    handler_failed = True
                    await pipe.reset()  # type: ignore[no-untyped-call]
                    if poison is not None:  # past max_deliveries, alone, and it is its own fault
                        letters.append((good[0].entry_id, good[0].doc.model_dump_json(), poison))
                    else:  # still settle the malformed ones; the valid ones stay pending
                        self._note_failure([d.entry_id for d in good], exc)
                        log.exception("handler failed on %s entries %s..%s; left pending",
                                      self.stream, good[0].entry_id, good[-1].entry_id)
                    good = []
            for entry_id, raw, error in letters:
                self.bus.queue_deadletter(pipe, self.stream, entry_id, raw, error)
            ack_ids = [d.entry_id for d in good] + [entry_id for entry_id, _, _ in letters]
            pipe.xack(self.stream, self.group, *ack_ids)
            await pipe.execute()
        if handler_failed:  # what it changed before raising was not committed: forget it
            await self._forget_failed_batch()
        if self.failing:
            for entry_id in ack_ids:
                self.failing.pop(entry_id, None)
        return not (entries and len(ack_ids) < len(entries))

    def _poison(self, good: list[Delivery[M]], exc: Exception) -> str | None:
        """The dead-letter reason if `good` is one entry past `max_deliveries` failing of its own accord."""
        if len(good) != 1 or good[0].deliveries <= self.max_deliveries or isinstance(exc, TRANSIENT_ERRORS):
            return None
        return (f"delivered {good[0].deliveries} times without being handled (poison entry); "
                f"the handler fails on it alone: {_error_text(exc)}")

    def _note_failure(self, entry_ids: Sequence[str], exc: BaseException) -> None:
        BUS_HANDLER_FAILURES.labels(self.bus.service, self.stream).inc()
        why = _error_text(exc)
        for entry_id in entry_ids:
            self.failing[entry_id] = why

    async def retry_failed_own(self) -> int:
        """Retry this consumer's own entries whose handling failed, without waiting for `claim_idle`.

        An own pending entry idle longer than `retry_idle_seconds` that the reader
        does not hold (`_in_hand`: read, waiting for the lock or being handled) is
        one whose batch failed, or one read by a reader that died. Every such entry
        is retried, one at a time, page after page. Returns how many were retried.
        """
        retried = 0
        after = "-"
        idle_ms = int(self.retry_idle_seconds * 1000)
        while not self._stopping:
            async with self.lock:
                rows = await self.bus.redis.xpending_range(
                    self.stream, self.group, min=after, max="+", count=self.batch_size,
                    consumername=self.consumer)
                if after == "-":
                    self._forget_settled(rows)
                if not rows:
                    return retried
                after = "(" + _text(rows[-1]["message_id"])
                rows = [r for r in rows if int(r["time_since_delivered"]) >= idle_ms
                        and _text(r["message_id"]) not in self._in_hand]
                entries: list[tuple[str, Any]] = []
                counts: dict[str, int] = {}
                if rows:
                    ids = [_text(r["message_id"]) for r in rows]
                    claimed: Any = await self.bus.redis.xclaim(self.stream, self.group, self.consumer,
                                                               min_idle_time=idle_ms, message_ids=ids)
                    counts = {_text(r["message_id"]): int(r["times_delivered"]) + 1 for r in rows}
                    entries = [(_text(i), fields) for i, fields in claimed]
            for entry in entries:  # one at a time: isolate a poison entry
                await self.handle([entry], counts)
            retried += len(entries)
        return retried

    def _forget_settled(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Entries noted as failing that are no longer pending (trimmed, deleted, acked elsewhere)."""
        if self.failing and len(rows) < self.batch_size:
            pending = {_text(r["message_id"]) for r in rows}
            for entry_id in [i for i in self.failing if i not in pending]:
                del self.failing[entry_id]

    async def _claim_forever(self) -> None:
        while not self._stopping:
            # entries failing: retry them as soon as they count as failed, not a claim interval later
            await asyncio.sleep(min(self.retry_idle_seconds, self.claim_interval_seconds) if self.failing
                                else self.claim_interval_seconds)
            if self._stopping:
                return
            try:
                self._keep_reading()
                await self.retry_failed_own()
                await self.claim_abandoned()
                await self.record_lag()
            except Exception:
                raise_if_cancelled()
                log.exception("claiming pending entries of %s failed; will retry", self.stream)

    async def record_lag(self) -> int | None:
        """Export how many entries the group has not been delivered yet (`tp_bus_stream_lag_entries`).

        XINFO GROUPS `lag` (Redis >= 7); None, and the gauge left alone, when Redis cannot tell
        (older Redis, or entries deleted inside the group's unread range).
        """
        for group in await self.bus.redis.xinfo_groups(self.stream):
            if _text(group.get("name")) == self.group:
                lag = group.get("lag")
                if lag is None:
                    return None
                BUS_STREAM_LAG.labels(self.bus.service, self.stream).set(int(lag))
                return int(lag)
        return None

    async def recover_own_pending(self) -> None:
        """Finish what this consumer had read but not acked before it stopped."""
        after = "0"
        while True:
            reply: Any = await self.bus.redis.xreadgroup(self.group, self.consumer, {self.stream: after},
                                                    count=self.batch_size)
            entries = reply[0][1] if reply else []
            if not entries:
                return
            batch = [(_text(i), fields) for i, fields in entries]
            counts = await self._delivery_counts([i for i, _ in batch])
            log.info("re-reading %d own pending entries of %s from %s", len(batch), self.stream, batch[0][0])
            await self.handle(batch, counts)
            after = batch[-1][0]

    async def claim_abandoned(self) -> int:
        """Take over entries idle longer than `claim_idle_seconds`; returns how many."""
        claimed_total = 0
        start = "0-0"
        while True:
            next_start, entries, *_ = await self.bus.redis.xautoclaim(
                self.stream, self.group, self.consumer,
                min_idle_time=int(self.claim_idle_seconds * 1000), start_id=start, count=self.batch_size,
            )
            batch = [(_text(i), fields) for i, fields in entries]
            if batch:
                claimed_total += len(batch)
                BUS_CLAIMED.labels(self.bus.service, self.stream).inc(len(batch))
                counts = await self._delivery_counts([i for i, _ in batch])
                for entry in batch:  # one at a time: isolate a poison entry
                    await self.handle([entry], counts)
            start = _text(next_start)
            if start == "0-0":
                return claimed_total

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        if not ids:
            return {}
        rows = await self.bus.redis.xpending_range(self.stream, self.group, min=ids[0], max=ids[-1],
                                                   count=len(ids) * 4 + 10, consumername=self.consumer)
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _keep_reading(self) -> None:
        """Restart a reader that died of an unexpected error (its health shows it meanwhile)."""
        reader = self._tasks[0]
        if reader.done() and not self._stopping:
            error = None if reader.cancelled() else reader.exception()
            log.error("the reader of %s stopped; restarting it", self.stream, exc_info=error)
            self._tasks[0] = asyncio.create_task(self._read_forever(), name=f"read:{self.stream}")
