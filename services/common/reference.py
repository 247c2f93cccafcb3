"""Reference data read from Redis hashes (`tp:instruments`): one bad value never blocks the others.

A stream entry that cannot be read is dead-lettered by the bus; a hash value has no entry to ack,
and its readers look it up while handling something else (a fill, a snapshot). Before this module a
bad `tp:instruments` value raised inside those handlers: take-profit failed on every snapshot and
the portfolio dead-lettered real fills as poison. `ReferenceReader` reads values one at a time: a
good one is returned, a bad one is written to `tp:deadletter` (source: the hash, entry id: the
field) and logged — once per distinct bad value, so a reader that looks again every few seconds
does not flood the dead letters — and left out, so the caller treats that instrument as unknown.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Generic, TypeVar

from pydantic import BaseModel

from services.common.bus import Bus, MalformedEntry, read_document

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class ReferenceReader(Generic[M]):
    """Validates the values of one hash field by field (see the module docstring)."""

    def __init__(self, bus: Bus, key: str, model: type[M]) -> None:
        self.bus = bus
        self.key = key
        self.model = model
        self.bad: dict[str, bytes | str] = {}
        """Field → the bad value last dead-lettered for it (cleared when a good value replaces it)."""

    async def documents(self, values: Mapping[str, bytes | str | None]) -> dict[str, M]:
        """The fields whose value is a valid document; absent (None) and bad ones are left out."""
        good: dict[str, M] = {}
        for name, raw in values.items():
            if raw is None:
                continue
            try:
                good[name] = read_document(self.model, raw)
            except MalformedEntry as exc:
                await self._reject(name, raw, str(exc))
                continue
            self.bad.pop(name, None)
        return good

    async def _reject(self, name: str, raw: bytes | str, why: str) -> None:
        if self.bad.get(name) == raw:
            return
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        await self.bus.deadletter(self.key, name, text, f"{why} (left out: {name} is treated as unknown)")
        self.bad[name] = raw
        log.error("%s %s is unusable and left out (dead-lettered): %s", self.key, name, why)


__all__ = ["ReferenceReader"]
