"""What a subscribe answer means: the channels it lists are held, every other one asked for is not.

api.yaml (`public/subscribe`, `private/subscribe`): the result is the "List of successfully
subscribed channels. Note that this method returns successfully even if no channels were valid;
check the return value." An answer without an error proves nothing: a channel it leaves out is
not subscribed, and no notification of it will ever come. Whoever subscribes must compare.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from services.common.thalex.requests import NO_CODE, ThalexError


class Requester(Protocol):
    async def request(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


class ChannelsRefused(ThalexError):
    """A subscribe answer left out channels the service cannot do without (they are in `channels`)."""

    def __init__(self, method: str, channels: Sequence[str]) -> None:
        super().__init__(method, NO_CODE, f"the exchange left {', '.join(channels)} out of its answer")
        self.channels = list(channels)


def left_out(requested: Iterable[str], answer: Any) -> list[str]:
    """The requested channels the answer does not list, in request order.

    An answer that is not a list holds nothing: every channel asked for is left out (better a
    channel asked for twice than one believed held that never speaks).
    """
    held = {name for name in answer if isinstance(name, str)} if isinstance(answer, list) else set()
    return [channel for channel in dict.fromkeys(requested) if channel not in held]


async def subscribe(link: Requester, channels: Sequence[str], *, private: bool) -> list[str]:
    """Subscribe `channels`; returns those the exchange left out of its answer (not subscribed).

    An error answer still raises `ThalexError` (api.yaml says the call does not fail for a bad
    channel, but a malformed request or a lost login does).
    """
    answer = await link.request("private_subscribe" if private else "public_subscribe", list(channels))
    return left_out(channels, answer)


__all__ = ["ChannelsRefused", "left_out", "subscribe"]
