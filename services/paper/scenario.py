"""Scripted control steps (``--scenario FILE``) for demos and reproducible runs.

A scenario is JSON or TOML. JSON: a list of steps, or ``{"steps": [...]}``; TOML: ``[[steps]]``
tables. Each step is ``{"at": seconds after start, "method": "paper/...", "params": {...}}``;
``repeat`` (default 1) and ``every`` (seconds) run a step several times. Steps run in time order
through the same control methods as the websocket ``paper/*`` calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.paper.errors import RpcError

log = logging.getLogger(__name__)

ControlCall = Callable[[str, dict], Awaitable[Any]]


class ScenarioError(ValueError):
    """The scenario file does not have the documented shape."""


@dataclass(frozen=True)
class Step:
    at: float
    method: str
    params: dict = field(default_factory=dict)


def parse_scenario(data: Any) -> list[Step]:
    """Validate the decoded document and expand repeats into a time-ordered list of steps."""
    raw = data.get("steps") if isinstance(data, dict) else data
    if not isinstance(raw, list):
        raise ScenarioError("a scenario is a list of steps or an object with a 'steps' list")
    steps: list[Step] = []
    for number, item in enumerate(raw, 1):
        if not isinstance(item, dict):
            raise ScenarioError(f"step {number} must be an object")
        at, method, params = item.get("at", 0.0), item.get("method"), item.get("params", {})
        repeat, every = item.get("repeat", 1), item.get("every", 0.0)
        if not isinstance(method, str) or not method.startswith("paper/"):
            raise ScenarioError(f"step {number}: method must be a paper/* control method")
        if not isinstance(at, (int, float)) or at < 0:
            raise ScenarioError(f"step {number}: at must be a non-negative number of seconds")
        if not isinstance(params, dict):
            raise ScenarioError(f"step {number}: params must be an object")
        if not isinstance(repeat, int) or repeat < 1 or not isinstance(every, (int, float)) or every < 0:
            raise ScenarioError(f"step {number}: repeat must be >= 1 and every >= 0")
        steps.extend(Step(float(at) + i * float(every), method, params) for i in range(repeat))
    return sorted(steps, key=lambda step: step.at)


def load_scenario(path: Path | str) -> list[Step]:
    path = Path(path)
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    return parse_scenario(data)


async def run_scenario(steps: list[Step], call: ControlCall) -> None:
    """Run each step at its time; a failing step is logged and the scenario goes on."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for step in steps:
        await asyncio.sleep(max(0.0, start + step.at - loop.time()))
        try:
            await call(step.method, step.params)
            log.info("scenario step at %.2fs: %s done", step.at, step.method)
        except RpcError as exc:
            log.warning("scenario step at %.2fs: %s failed: %s", step.at, step.method, exc)
