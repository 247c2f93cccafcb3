"""``session.mm_protection``: the session's market-maker protection groups (refill, executions, cancel)."""

from __future__ import annotations

from services.paper.channels.registry import CHANNELS, ROUTES, Family

CHANNELS.register(Family("session.mm_protection", True))

ROUTES.route("mm_protection", "session.mm_protection", scope="session")
