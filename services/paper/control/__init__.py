"""The ``paper/*`` control API (``--control``); importing a module registers its control methods."""

from services.paper.control import accounts, clock, faults, flow, logs, market  # noqa: F401
from services.paper.control.registry import CONTROLS

__all__ = ["CONTROLS"]
