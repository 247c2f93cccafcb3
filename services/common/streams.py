"""Stream and key names, under a configurable namespace.

Several accounts can share one Redis by giving each guardian its own namespace
(`tp` by default): every name below is `<namespace>:<suffix>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMESPACE_RULE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True, slots=True)
class Names:
    """Every Redis stream and key of one guardian."""

    namespace: str = "tp"

    def __post_init__(self) -> None:
        if not NAMESPACE_RULE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} must be 1-64 characters of A-Z a-z 0-9 _ . -"
            )

    def key(self, suffix: str) -> str:
        """Any other key of this guardian (service state, leases, checkpoints)."""
        return f"{self.namespace}:{suffix}"

    @property
    def fills(self) -> str:
        return self.key("fills")

    @property
    def ticks(self) -> str:
        return self.key("ticks")

    @property
    def positions(self) -> str:
        return self.key("positions")

    @property
    def instruments(self) -> str:
        return self.key("instruments")

    @property
    def snapshots(self) -> str:
        return self.key("snapshots")

    @property
    def snapshot_positions(self) -> str:
        """Hash instrument -> the current `SnapshotPosition` (portfolio, with each snapshot)."""
        return self.key("snapshot:positions")

    @property
    def commands(self) -> str:
        return self.key("commands")

    @property
    def reports(self) -> str:
        return self.key("reports")

    @property
    def control(self) -> str:
        return self.key("control")

    @property
    def control_answers(self) -> str:
        """Take-profit's answer to each `control` entry (accepted or refused, and why)."""
        return self.key("control:answers")

    @property
    def halt(self) -> str:
        return self.key("halt")

    @property
    def halt_acks(self) -> str:
        return self.key("halt:acks")

    @property
    def notifications(self) -> str:
        """Every notification the notify service produced (sent or not): the demo shows them."""
        return self.key("notifications")

    def notify_key(self, suffix: str) -> str:
        """The notify service's own keys: state, and per target its outbox, due times, sent ids."""
        return self.key(f"notify:{suffix}")

    @property
    def breaker(self) -> str:
        """Take-profit's circuit breaker, as JSON (its checkpoint holds the same; `status` reads this)."""
        return self.key("takeprofit:breaker")

    @property
    def deadletter(self) -> str:
        return self.key("deadletter")
