"""The ``paper/*`` control API (``--control``); importing a module registers its control methods."""

from services.paper.control import accounts, automation, clock, faults, flow, logs, market, rogue  # noqa: F401
from services.paper.control.registry import CONTROLS

__all__ = ["CONTROLS"]
