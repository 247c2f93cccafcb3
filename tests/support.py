"""Helpers the service tests share: configs, running services in-process or as processes."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from redis.asyncio import Redis

from services.common.bus import DATA_FIELD, encode_document, entry_document
from services.common.config import Settings
from services.common.contracts import Snapshot
from services.common.service import Build, Health, make_bus
from services.common.snapshots import Fold, SnapshotView
from services.common.streams import Names

M = TypeVar("M", bound=BaseModel)
REPO = Path(__file__).resolve().parents[1]


def settings_for(redis_url: str, names: Names, **sections: dict[str, Any]) -> Settings:
    """Defaults, this test's Redis and namespace, plus section overrides."""
    redis_section = {"url": redis_url, "namespace": names.namespace, **sections.pop("redis", {})}
    return Settings(redis=redis_section, **sections)


def write_config(path: Path, settings: Settings) -> Path:
    """A TOML file equivalent to `settings` (for services run as processes)."""
    import json

    def toml_value(value: Any) -> str:
        return json.dumps(value)

    lines: list[str] = []

    def emit(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in data.items() if isinstance(v, dict)}
        if scalars:
            lines.append(f"[{prefix}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        for key, table in tables.items():
            emit(f'{prefix}."{key}"' if "-" in key else f"{prefix}.{key}", table)

    for section, data in settings.model_dump(mode="json", exclude_unset=True).items():
        emit(section, data)
    path.write_text("\n".join(lines) + "\n")
    return path


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 10.0, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition {check.__name__} not met within {within} s")


async def read_stream(redis: Redis, stream: str, model: type[M]) -> list[M]:
    """Every document of a stream; snapshots folded into their full form (v2 carry changed rows only)."""
    docs = [model.model_validate(entry_document(fields)[1]) for _, fields in await redis.xrange(stream)]
    if model is not Snapshot:
        return docs
    return cast(list[M], full_snapshots(cast(list[Snapshot], docs)))


def full_snapshots(snapshots: list[Snapshot]) -> list[Snapshot]:
    """Each snapshot with every position, as a v2 reader folds them (the first must be full)."""
    view = SnapshotView()
    out = []
    for snap in snapshots:
        folded = view.fold(snap)
        assert folded is not Fold.GAP, f"snapshot #{snap.seq} does not follow #{view.seq}"
        out.append(view.full_snapshot(snap))
    return out


async def xadd(redis: Redis, stream: str, doc: BaseModel) -> str:
    entry_id = await redis.xadd(stream, {DATA_FIELD: encode_document(doc)})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


@asynccontextmanager
async def in_process(build: Build, settings: Settings, service: str) -> AsyncIterator[Any]:
    """Run a service inside the test's event loop; yields what `build` returned."""
    bus = make_bus(settings, service)
    runnable = build(settings, bus, Health(), f"{service}-test")
    await bus.start()
    task = asyncio.create_task(runnable.run())
    try:
        yield runnable
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.stop()


class ServiceProcess:
    """A service run as a real process (`python -m services.<name>`), for kill -9 tests."""

    def __init__(self, service: str, config: Path, log_path: Path, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.service, self.config, self.log_path = service, config, log_path
        self.extra_args = extra_args or []
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:  # the child writes to its own copy of the descriptor
            self.process = self._spawn(log)

    def _spawn(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                f"services.{self.service}",
                "--config",
                str(self.config),
                "--metrics-port",
                "0",
                *self.extra_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO,
        )

    def kill(self) -> None:
        """kill -9: no cleanup, no final ack."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int | None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode if self.process else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def read_output_until(process: subprocess.Popen[bytes], text: str, within: float = 30.0) -> str:
    """What `process` wrote (stdout) until a line holds `text`, or `within` seconds passed.

    For a service that goes on running: a fixed sleep is too short on a loaded machine, where
    importing the service alone can take seconds."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and not any(text in line for line in lines):
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline().decode()
            if not line:
                break
            lines.append(line)
    return "".join(lines)
