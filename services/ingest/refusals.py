"""Public channels the exchange would not subscribe on this connection, and when to ask again (pure).

Thalex answers a subscribe with the channels it subscribed and leaves the others out, without an
error (api.yaml: "check the return value"; `services/common/thalex/channels.py`). What ingest does
about a public channel left out depends on what it prices:

* a feed of an open position (its ticker or book, an option's index; `Follow.guards`): asked for
  again with backoff (1 s, doubling, at most 30 s) until it is held, and named by /health
  (`subscriptions`) meanwhile — without it the exit is priced at the top of the book or the mark,
  or not at all;
* any other (a watch-list instrument that does not exist, a flat one still followed): a warning,
  and not asked for again on this connection. If the account comes to hold it, it is asked for
  again at once.

Time is passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from services.ingest.follow import Feed

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


@dataclass(slots=True)
class Refusal:
    """One channel left out: what it feeds, since when, how often, and when to ask again."""

    feed: Feed
    target: str
    since: float
    attempts: int
    retry_at: float


class Refusals:
    """The public channels refused on the current connection (cleared on a new one)."""

    def __init__(self, first: float = RETRY_FIRST_SECONDS, cap: float = RETRY_MAX_SECONDS) -> None:
        self.first = first
        self.cap = cap
        self.channels: dict[str, Refusal] = {}

    def refuse(self, channel: str, feed: Feed, target: str, now: float) -> bool:
        """Note that `channel` was left out at `now`; True the first time (say it once, not per retry)."""
        known = self.channels.get(channel)
        if known is None:
            self.channels[channel] = Refusal(feed, target, now, 1, now + self.first)
            return True
        known.attempts += 1
        known.retry_at = now + min(self.cap, self.first * 2.0 ** min(known.attempts - 1, 30))
        return False

    def held(self, channel: str) -> Refusal | None:
        """`channel` is subscribed now; its refusal (None if it had none) is forgotten."""
        return self.channels.pop(channel, None)

    def due(self, channel: str, guarding: bool, now: float) -> bool:
        """May `channel` be asked for at `now`? Never refused: yes. Refused: only when it prices an open
        position (`guarding`) and its backoff has passed."""
        refusal = self.channels.get(channel)
        return refusal is None or (guarding and now >= refusal.retry_at)

    def keep_only(self, wanted: Iterable[str]) -> None:
        """Forget refusals of channels no longer followed (a later want of them asks afresh)."""
        keep = set(wanted)
        for channel in [c for c in self.channels if c not in keep]:
            del self.channels[channel]

    def unpriced(self, guards: Callable[[Feed, str], bool], now: float) -> list[str]:
        """Why open positions lack a feed: each refused channel that prices one, in the trader's words."""
        return [f"{channel} of held {refusal.target} refused {now - refusal.since:.0f} s ago "
                f"({refusal.attempts} tries), retrying"
                for channel, refusal in sorted(self.channels.items()) if guards(refusal.feed, refusal.target)]

    def clear(self) -> None:
        self.channels.clear()


__all__ = ["RETRY_FIRST_SECONDS", "RETRY_MAX_SECONDS", "Refusal", "Refusals"]
