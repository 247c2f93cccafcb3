"""Order-message pacing: Thalex's per-connection rate limit, kept on our side.

Thalex counts insert/amend/cancel messages per connection (10/s, 50/s on a session with
cancel-on-disconnect) and answers error 4 past the limit, with a penalty; pacing ourselves
keeps every message useful. Bulk cancels (`cancel_all`) are not order messages.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

ORDER_WINDOW_SECONDS = 1.0
WINDOW_MARGIN_SECONDS = 0.02
"""Our window is a little longer than the exchange's, so network jitter cannot push us over."""


class OrderPacer:
    """At most `rate` order messages in any rolling second, first come first served."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.pace(rate)
        self.clock = clock
        self.sent: deque[float] = deque()
        self.lock = asyncio.Lock()

    def pace(self, rate: float) -> None:
        """Pace at `rate` from now on (what the exchange granted this connection may be less than asked)."""
        self.limit = max(1, int(rate))

    async def acquire(self) -> None:
        """Wait until one more order message fits in the window, and count it."""
        async with self.lock:
            window = ORDER_WINDOW_SECONDS + WINDOW_MARGIN_SECONDS
            while True:
                now = self.clock()
                while self.sent and self.sent[0] <= now - window:
                    self.sent.popleft()
                if len(self.sent) < self.limit:
                    self.sent.append(now)
                    return
                await asyncio.sleep(self.sent[0] + window - now)
