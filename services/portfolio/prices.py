"""Glitch-proof prices: a tick whose figures jump implausibly is held until the exchange confirms it.

Issue 21, item 5: one contract-valid tick with mark 0 and bids at 0 fired an emergency stop 20 ms
later. Ingest cannot judge a price (it does not know the ledger); take-profit only sees the
valuation. The portfolio sees every tick beside the last one it trusted, so the check lives here,
pure, in front of the ledger: `PriceGuard.check(tick)` returns the tick to apply, or None when it
holds it back. A held tick changes no figure — the instrument keeps its last plausible prices and
is listed in the snapshot's `suspect_instruments` (take-profit treats it like a stale price: no
profit barrier fires on it; the emergency stop decides on the last plausible prices). An
emergency stop therefore never fires on one unconfirmed tick.

What is implausible, with `max_move` = `[portfolio] suspect_price_move` (default 0.2 = 20 %):

* **against the index** (perpetuals and futures, whose mark follows the index): the mark more than
  `max_move` away from the tick's own index. Not confirmable: a perpetual marked 20 % off its
  index is a broken figure, not a market; the instrument stays held (and goes stale, which
  `/health` shows) until a tick agrees with its index again. Options are not compared with the
  index (it is the underlying's price, not the option's).
* **against the other side of the book**: a bid or ask level priced at 0, or (perpetuals and
  futures) a best bid or ask more than `max_move` from the mark.
* **against the previous mark**: the mark moved more than `max_move` from the last accepted tick's,
  and the index (when both ticks have one) did not move at least half as far the same way.

The last two are confirmable: the next tick with a **newer mark** that tells the same story (its
mark, best bid and best ask within `max_move / 4` of the held tick's) is accepted — a real jump costs
one ticker of delay (~100 ms at Thalex's default ticker rate), a glitch costs nothing. A newer mark
means a new ticker: ingest re-issues the last ticker's mark with every book change, and such a tick
carries the mark's own time (`Tick.mark_ts`); the held mark sent again beside an unrelated book
change is a repetition, not the exchange's confirmation, so it stays held (as the newest held tick,
its book with it) however many book changes come. While held, nothing of the instrument is applied:
if no new ticker comes, it goes stale after `stale_after_seconds` like any silent price, and the
portfolio's `/health` says "prices suspect" for a position it values throughout. A tick without
`mark_ts` (written by an ingest older than the field) counts as a new mark, as it did before. A
tick that is plausible against the last accepted one ends the suspicion and is applied as usual.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.contracts import InstrumentType, Tick

DEFAULT_MAX_MOVE = 0.2
CONFIRM_SHARE = 0.25
"""A confirming tick is within `max_move × CONFIRM_SHARE` of the held one."""
_INDEXED = (InstrumentType.PERPETUAL, InstrumentType.FUTURE)


@dataclass(frozen=True, slots=True)
class Held:
    """A tick held back, and why."""

    tick: Tick
    reason: str
    confirmable: bool


class PriceGuard:
    """Decides, tick by tick, whether a price can be trusted (see the module docstring)."""

    def __init__(self, max_move: float = DEFAULT_MAX_MOVE) -> None:
        if not 0.0 < max_move <= 1.0:
            raise ValueError("max_move must be within (0, 1]")
        self.max_move = max_move
        self.accepted: dict[str, Tick] = {}
        self.held: dict[str, Held] = {}
        self.types: dict[str, InstrumentType] = {}

    def set_type(self, instrument: str, kind: InstrumentType) -> None:
        self.types[instrument] = kind

    def trust(self, tick: Tick) -> None:
        """Take `tick` as the last plausible price without checking it (a restored checkpoint)."""
        self.accepted[tick.instrument] = tick
        self.held.pop(tick.instrument, None)

    @property
    def suspects(self) -> list[str]:
        """Instruments whose latest tick is held back, sorted."""
        return sorted(self.held)

    def check(self, tick: Tick) -> Tick | None:
        """`tick` if it may be applied; None when it is held back (`held[instrument]` says why)."""
        name = tick.instrument
        last = self.accepted.get(name)
        if last is not None and tick.exchange_ts < last.exchange_ts:
            return tick  # older than what is held: the ledger ignores it anyway
        absolute = self._absurd(tick)
        if absolute is not None:
            self.held[name] = Held(tick, absolute, confirmable=False)
            return None
        relative = None if last is None else self._jump(last, tick)
        if relative is None:
            self.accepted[name] = tick
            self.held.pop(name, None)
            return tick
        before = self.held.get(name)
        if before is not None and before.confirmable and self._confirms(before.tick, tick):
            self.accepted[name] = tick
            del self.held[name]
            return tick
        self.held[name] = Held(tick, relative, confirmable=True)
        return None

    def _confirms(self, held: Tick, tick: Tick) -> bool:
        """`tick` is the exchange telling the held story again: a later tick with a newer mark.

        The newer mark is what makes it a second word from the exchange: ingest re-issues the last
        ticker's mark with every book change (`mark_ts`), and that re-issue is the held figure
        repeated, not confirmed — a glitching option mark followed by an unrelated book change would
        otherwise be applied (and could fire the emergency stop). A tick without `mark_ts` (from an
        older ingest) is taken as a new mark, as before the field existed.
        """
        return (held.exchange_ts < tick.exchange_ts and held.mark_time < tick.mark_time
                and self._same_story(held, tick))

    def _absurd(self, tick: Tick) -> str | None:
        """A reason no later tick can confirm: a perpetual or future marked far off its index."""
        if self.types.get(tick.instrument) in _INDEXED and tick.index:
            off = abs(tick.mark / tick.index - 1.0)
            if off > self.max_move:
                return f"mark {tick.mark:g} is {off:.0%} from the index {tick.index:g}"
        return None

    def _jump(self, last: Tick, tick: Tick) -> str | None:
        """A reason the next tick may confirm: a zero-priced level, a book far off the mark, a jump."""
        for side, levels in (("bid", tick.bids), ("ask", tick.asks)):
            if levels and any(price == 0.0 for price, _ in levels):
                return f"a {side} level priced at 0"
        if self.types.get(tick.instrument) in _INDEXED and tick.mark > 0:
            for side, best in (("bid", tick.best_bid), ("ask", tick.best_ask)):
                off = None if best is None else abs(best / tick.mark - 1.0)
                if off is not None and off > self.max_move:
                    return f"best {side} {best:g} is {off:.0%} from the mark {tick.mark:g}"
        if last.mark == 0.0:
            return None if tick.mark == 0.0 else f"mark {tick.mark:g} after 0"
        move = tick.mark / last.mark - 1.0
        if abs(move) <= self.max_move:
            return None
        if last.index and tick.index:
            index_move = tick.index / last.index - 1.0
            if index_move * move > 0 and abs(index_move) >= abs(move) / 2:
                return None  # the index moved with it: the market moved
        return f"mark {tick.mark:g} moved {move:+.0%} from {last.mark:g}"

    def _same_story(self, held: Tick, tick: Tick) -> bool:
        """The next tick repeats the held one's figures (within `max_move × CONFIRM_SHARE`)."""
        tolerance = self.max_move * CONFIRM_SHARE
        pairs = ((held.mark, tick.mark), (held.best_bid, tick.best_bid), (held.best_ask, tick.best_ask))
        for a, b in pairs:
            if (a is None) != (b is None):
                return False
            if a is not None and b is not None and abs(a - b) > tolerance * max(abs(a), abs(b), 1e-12):
                return False
        return True


__all__ = ["DEFAULT_MAX_MOVE", "Held", "PriceGuard"]
