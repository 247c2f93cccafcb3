"""Reading request parameters the way Thalex refuses them: a wrong type or a missing one is error 6."""

from __future__ import annotations

import math
from typing import Any

from services.paper.errors import INVALID_REQUEST, RpcError


def number(params: dict[str, Any], name: str, required: bool = False) -> float | None:
    """A finite JSON number (booleans are not numbers); None when absent and not required."""
    value = params.get(name)
    if value is None:
        if required:
            raise RpcError(INVALID_REQUEST, f"missing parameter {name}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RpcError(INVALID_REQUEST, f"{name} must be a number")
    return float(value)


def positive(params: dict[str, Any], name: str, default: float | None = None) -> float:
    """A number > 0 (``default`` when absent)."""
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RpcError(INVALID_REQUEST, f"{name} must be a positive number")
    if value <= 0:
        raise RpcError(INVALID_REQUEST, f"{name} must be a positive number")
    return float(value)


def choice(params: dict[str, Any], name: str, allowed: tuple[str, ...], default: str | None) -> str | None:
    value = params.get(name, default)
    if value is None:
        return None
    if value not in allowed:
        raise RpcError(INVALID_REQUEST, f"{name} must be one of {', '.join(allowed)}")
    return str(value)


def flag(params: dict[str, Any], name: str, default: bool = False) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise RpcError(INVALID_REQUEST, f"{name} must be a boolean")
    return value


def string(params: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = params.get(name)
    if value is None:
        if required:
            raise RpcError(INVALID_REQUEST, f"missing parameter {name}")
        return None
    if not isinstance(value, str):
        raise RpcError(INVALID_REQUEST, f"{name} must be a string")
    return value


def limit(params: dict[str, Any], default: int = 1000, maximum: int | None = 1000) -> int:
    """``limit`` of the history methods: an integer from 1 (to ``maximum``)."""
    value: Any = params.get("limit", default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum and value > maximum):
        bound = f" and {maximum}" if maximum else ""
        raise RpcError(INVALID_REQUEST, f"limit must be an integer between 1{bound}")
    return value
