"""What each of Thalex's server-side bot strategies wants, given the market and the account (pure).

A strategy parses and checks its ``create_bot`` parameters (api.yaml's limits; 6 when one is broken),
echoes them in the ``Bot`` object, and on every step answers with a :class:`Plan`: the resting quotes
it wants and/or a position to trade to aggressively, and whether it stops once that position is
reached. :mod:`services.paper.bots` carries the plans out. Where api.yaml leaves a strategy's rule
open, the choice made here is written in the class docstring (and in docs/paper.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from services.paper.accounts import EPS, Account
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.market import Instrument, Market, align_down, align_up, is_aligned
from services.paper.marketdata import TradeStats

Quote = tuple[str, float, float]
"""A resting order a bot wants: (direction, price, amount)."""


@dataclass
class Plan:
    quotes: list[Quote] = field(default_factory=list)
    target: float | None = None
    """Trade aggressively until the position in the bot's instrument is this."""
    stop: str | None = None
    """Stop with this reason once ``target`` is reached (exit prices: ``strategy``)."""


@dataclass
class View:
    """What a strategy reads: prices of the market and positions of the account."""

    market: Market
    stats: TradeStats
    account: Account
    instrument: Instrument
    now: float

    def position(self, name: str | None = None) -> float:
        pos = self.account.positions.get(name or self.instrument.name)
        return pos.position if pos else 0.0

    def mark(self, name: str | None = None) -> float:
        return self.market.mark(name or self.instrument.name).price

    def signal(self, signal: str) -> float | None:
        """The price a ``signal`` names: ``mark``, ``index`` or ``last`` (None before the first trade)."""
        if signal == "mark":
            return self.mark()
        if signal == "index":
            return self.market.index[self.instrument.underlying]
        return self.stats.last_price.get(self.instrument.name)

    def delta(self, name: str) -> float:
        """Delta of one contract (1 for perpetuals and futures)."""
        return self.market.mark(name).delta


class Params:
    """Reads ``create_bot`` parameters, refusing what api.yaml does not allow (6)."""

    def __init__(self, params: dict[str, Any], inst: Instrument) -> None:
        self.params = params
        self.inst = inst

    def number(self, name: str, default: float | None = None, *, required: bool = True) -> float:
        value = self.params.get(name)
        if value is None:
            if default is not None or not required:
                return default if default is not None else math.nan
            raise RpcError(INVALID_REQUEST, f"missing parameter {name}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RpcError(INVALID_REQUEST, f"{name} must be a number")
        return float(value)

    def optional(self, name: str) -> float | None:
        value = self.number(name, required=False)
        return None if math.isnan(value) else value

    def price(self, name: str, value: float | None = None) -> float:
        price = self.number(name) if value is None else value
        if price <= 0 or not is_aligned(price, self.inst.tick_size):
            raise RpcError(
                INVALID_REQUEST, f"{name} must be a positive multiple of the tick size {self.inst.tick_size}"
            )
        return round(price, 10)

    def prices(self, name: str, minimum: int, maximum: int) -> list[float]:
        values = self.params.get(name)
        if not isinstance(values, list) or not minimum <= len(values) <= maximum:
            raise RpcError(INVALID_REQUEST, f"{name} must be a list of {minimum} to {maximum} prices")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise RpcError(INVALID_REQUEST, f"{name} must be a list of prices")
        return sorted(self.price(name, float(v)) for v in values)

    def size(self, name: str, max_ticks: int, value: float | None = None, *, signed: bool = False) -> float:
        size = self.number(name) if value is None else value
        vts = self.inst.volume_tick_size
        if not is_aligned(size, vts) or (not signed and size < self.inst.min_order_amount - EPS):
            raise RpcError(
                INVALID_REQUEST, f"{name} must be a positive multiple of the volume tick size {vts}"
            )
        if abs(size) > max_ticks * vts + EPS:
            raise RpcError(INVALID_REQUEST, f"{name} must not be greater than {max_ticks} volume ticks")
        return round(size, 10)

    def choice(self, name: str, allowed: tuple[str, ...]) -> str:
        value = self.params.get(name)
        if value not in allowed:
            raise RpcError(INVALID_REQUEST, f"{name} must be one of {', '.join(allowed)}")
        return str(value)

    def spacing(self, name: str, levels: list[float], low: int, high: int) -> None:
        """Neighbouring levels ``low`` to ``high`` ticks apart."""
        tick = self.inst.tick_size
        for a, b in itertools.pairwise(levels):
            if not low * tick - EPS <= b - a <= high * tick + EPS:
                raise RpcError(INVALID_REQUEST, f"{name} levels must be {low} to {high} ticks apart")

    def exits(self, lowest: float, highest: float) -> tuple[float, float]:
        """The exit prices: above ``highest`` and below ``lowest``, within 200 ticks of them."""
        up, down = self.price("upside_exit_price"), self.price("downside_exit_price")
        reach = 200 * self.inst.tick_size + EPS
        if not highest < up <= highest + reach:
            raise RpcError(
                INVALID_REQUEST, "upside_exit_price must be above the highest level, within 200 ticks"
            )
        if not lowest - reach <= down < lowest:
            raise RpcError(
                INVALID_REQUEST, "downside_exit_price must be below the lowest level, within 200 ticks"
            )
        return up, down


class Strategy:
    """A bot strategy: its parameters (echoed in the ``Bot`` object) and its plan on every step."""

    name: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def plan(self, view: View) -> Plan:
        raise NotImplementedError


def _steps(position: float, base: float, step: float) -> int:
    """Whole steps of ``step`` the position is from ``base`` (+ long, - short; partial steps don't count)."""
    ratio = (position - base) / step
    return math.floor(ratio + 1e-9) if ratio >= 0 else math.ceil(ratio - 1e-9)


def _exit_plan(view: View, up: float, down: float, base: float) -> Plan | None:
    """Levels and grid: the mark beyond an exit price cancels the quotes and trades into ``base_position``."""
    mark = view.mark()
    if mark > up + EPS or mark < down - EPS:
        return Plan(target=base, stop="strategy")
    return None


@dataclass
class Sgsl(Strategy):
    """Start-gain stop-loss: above ``entry_price`` hold ``target_position``, below ``exit_price`` hold
    ``exit_position``; in between keep the last decided target (none before the first crossing)."""

    name: ClassVar[str] = "sgsl"
    signal: str
    entry_price: float
    target_position: float
    exit_price: float
    exit_position: float
    decided: float | None = None

    @classmethod
    def parse(cls, p: Params, view: View) -> Sgsl:
        signal = p.choice("signal", ("last", "index", "mark"))
        entry, exit_ = p.number("entry_price"), p.number("exit_price")
        if entry < exit_ + 5 * p.inst.tick_size - EPS:
            raise RpcError(INVALID_REQUEST, "entry_price must be at least 5 ticks above exit_price")
        target = p.size("target_position", 10**9, signed=True)
        exit_position = p.size("exit_position", 10**9, signed=True)
        if abs(target - exit_position) > 500 * p.inst.volume_tick_size + EPS:
            raise RpcError(
                INVALID_REQUEST, "target_position may be at most 500 volume ticks from exit_position"
            )
        return cls(signal, entry, target, exit_, exit_position)

    def fields(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "entry_price": self.entry_price,
            "target_position": self.target_position,
            "exit_price": self.exit_price,
            "exit_position": self.exit_position,
        }

    def plan(self, view: View) -> Plan:
        price = view.signal(self.signal)
        if price is not None and price > self.entry_price:
            self.decided = self.target_position
        elif price is not None and price < self.exit_price:
            self.decided = self.exit_position
        return Plan(target=self.decided)


@dataclass
class Ocq(Strategy):
    """One-click quoter: a bid at signal + ``bid_offset`` and an ask at signal + ``ask_offset`` of
    ``quote_size``, cut so a fill cannot take the position beyond ``min_position``/``max_position``.
    With ``target_position`` and ``exit_offset``, the side that brings the position back to the target
    is quoted at signal + ``exit_offset`` for at most the distance to the target."""

    name: ClassVar[str] = "ocq"
    signal: str
    bid_offset: float
    ask_offset: float
    quote_size: float
    min_position: float
    max_position: float
    exit_offset: float | None = None
    target_position: float | None = None

    @classmethod
    def parse(cls, p: Params, view: View) -> Ocq:
        signal = p.choice("signal", ("index", "mark"))
        bid_offset, ask_offset = p.number("bid_offset"), p.number("ask_offset")
        if bid_offset >= ask_offset:
            raise RpcError(INVALID_REQUEST, "bid_offset must be smaller than ask_offset")
        exit_offset = p.optional("exit_offset")
        if exit_offset is not None and not bid_offset <= exit_offset <= ask_offset:
            raise RpcError(INVALID_REQUEST, "exit_offset must be between bid_offset and ask_offset")
        size = p.size("quote_size", 250)
        low, high = p.number("min_position"), p.number("max_position")
        if low >= high:
            raise RpcError(INVALID_REQUEST, "min_position must be smaller than max_position")
        target = p.optional("target_position")
        if target is not None and not low <= target <= high:
            raise RpcError(INVALID_REQUEST, "target_position must be between min_position and max_position")
        return cls(signal, bid_offset, ask_offset, size, low, high, exit_offset, target)

    def fields(self) -> dict[str, Any]:
        return {
            "signal": self.signal,
            "bid_offset": self.bid_offset,
            "ask_offset": self.ask_offset,
            "quote_size": self.quote_size,
            "min_position": self.min_position,
            "max_position": self.max_position,
        }

    def plan(self, view: View) -> Plan:
        price = view.signal(self.signal)
        if price is None:
            return Plan()
        inst, pos = view.instrument, view.position()
        tick, vts = inst.tick_size, inst.volume_tick_size
        bid = (align_down(price + self.bid_offset, tick), min(self.quote_size, self.max_position - pos))
        ask = (align_up(price + self.ask_offset, tick), min(self.quote_size, pos - self.min_position))
        if self.target_position is not None and self.exit_offset is not None:
            gap = pos - self.target_position
            if gap > EPS:
                ask = (align_up(price + self.exit_offset, tick), min(ask[1], gap))
            elif gap < -EPS:
                bid = (align_down(price + self.exit_offset, tick), min(bid[1], -gap))
        quotes: list[Quote] = []
        for direction, (quote_price, amount) in (("buy", bid), ("sell", ask)):
            size = align_down(max(amount, 0.0), vts)
            if size >= inst.min_order_amount - EPS and quote_price > 0:
                quotes.append((direction, quote_price, size))
        return Plan(quotes)


@dataclass
class Levels(Strategy):
    """Fixed bid and ask levels of ``step_size``. Each whole step the position is long of
    ``base_position`` takes the best remaining bid level away (each step short, the best ask level),
    so the position stays between ``-len(asks)`` and ``len(bids)`` steps of the base; beyond an exit
    price the bot trades into ``base_position`` and stops (``strategy``)."""

    name: ClassVar[str] = "levels"
    bids: list[float]
    asks: list[float]
    step_size: float
    base_position: float
    upside_exit_price: float
    downside_exit_price: float

    @classmethod
    def parse(cls, p: Params, view: View) -> Levels:
        bids, asks = p.prices("bids", 0, 5), p.prices("asks", 0, 5)
        if not bids and not asks:
            raise RpcError(INVALID_REQUEST, "give at least one bid or ask level")
        p.spacing("bids", bids, 2, 100)
        p.spacing("asks", asks, 2, 100)
        gap = (10 if p.inst.kind == "option" else 50) * p.inst.tick_size
        if bids and asks and asks[0] - bids[-1] < gap - EPS:
            raise RpcError(INVALID_REQUEST, f"best bid and best ask must be at least {gap} apart")
        step = p.size("step_size", 100)
        base = p.size("base_position", 10**9, signed=True) if "base_position" in p.params else view.position()
        levels = bids + asks
        up, down = p.exits(min(levels), max(levels))
        return cls(bids, asks, step, base, up, down)

    def fields(self) -> dict[str, Any]:
        return {
            "bids": self.bids,
            "asks": self.asks,
            "step_size": self.step_size,
            "base_position": self.base_position,
            "upside_exit_price": self.upside_exit_price,
            "downside_exit_price": self.downside_exit_price,
        }

    def plan(self, view: View) -> Plan:
        exit_plan = _exit_plan(view, self.upside_exit_price, self.downside_exit_price, self.base_position)
        if exit_plan is not None:
            return exit_plan
        steps = _steps(view.position(), self.base_position, self.step_size)
        bids = sorted(self.bids, reverse=True)[max(steps, 0) :]
        asks = self.asks[max(-steps, 0) :]
        return Plan([("buy", p, self.step_size) for p in bids] + [("sell", p, self.step_size) for p in asks])


@dataclass
class Grid(Strategy):
    """A grid of levels: at ``base_position`` bids on every level below ``target_mean_price`` (default:
    the mark at creation) and asks on every level above. Each whole step bought, the grid's split
    moves one level down and the level just bought stays empty, so the level above it sells the step
    back (and the other way round when short) — "buy low, sell high" as Thalex describes its grid bot.
    Beyond an exit price the bot trades into ``base_position`` and stops (``strategy``)."""

    name: ClassVar[str] = "grid"
    grid: list[float]
    step_size: float
    base_position: float
    upside_exit_price: float
    downside_exit_price: float
    mean_price: float

    @classmethod
    def parse(cls, p: Params, view: View) -> Grid:
        grid = p.prices("grid", 2, 8)
        p.spacing("grid", grid, 5, 100)
        step = p.size("step_size", 100)
        base = p.size("base_position", 10**9, signed=True) if "base_position" in p.params else view.position()
        up, down = p.exits(grid[0], grid[-1])
        mean = p.number("target_mean_price", view.mark())
        return cls(grid, step, base, up, down, mean)

    def fields(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "step_size": self.step_size,
            "base_position": self.base_position,
            "upside_exit_price": self.upside_exit_price,
            "downside_exit_price": self.downside_exit_price,
        }

    def plan(self, view: View) -> Plan:
        exit_plan = _exit_plan(view, self.upside_exit_price, self.downside_exit_price, self.base_position)
        if exit_plan is not None:
            return exit_plan
        split = sum(1 for level in self.grid if level < self.mean_price)
        steps = _steps(view.position(), self.base_position, self.step_size)
        k = split - steps
        if steps > 0:
            bid_levels, ask_levels = self.grid[: max(k, 0)], self.grid[max(k + 1, 0) :]
        elif steps < 0:
            bid_levels, ask_levels = self.grid[: max(k - 1, 0)], self.grid[min(k, len(self.grid)) :]
        else:
            bid_levels, ask_levels = self.grid[:split], self.grid[split:]
        quotes = [("buy", p, self.step_size) for p in bid_levels] + [
            ("sell", p, self.step_size) for p in ask_levels
        ]
        return Plan(quotes)


@dataclass
class Hedger:
    """Shared by DHedge and DFollow: correct a delta ``period`` seconds after it left the threshold band
    (at once beyond ``tolerance``), by trading the bot's instrument."""

    threshold: float
    period: float
    tolerance: float | None
    outside_since: float | None = None

    def target(self, view: View, deviation: float) -> float | None:
        """The position in the bot's instrument that removes ``deviation`` (delta above target), when due."""
        if abs(deviation) <= self.threshold + EPS:
            self.outside_since = None
            return None
        if self.outside_since is None:
            self.outside_since = view.now
        urgent = self.tolerance is not None and abs(deviation) > self.tolerance + EPS
        if not urgent and view.now - self.outside_since < self.period - EPS:
            return None
        hedge_delta = view.delta(view.instrument.name)
        if abs(hedge_delta) < 0.05:
            return None
        return view.position() - deviation / hedge_delta

    @staticmethod
    def parse_common(p: Params) -> tuple[float, float, float | None]:
        threshold = p.number("threshold", 0.0)
        if not 0 <= threshold <= 0.3:
            raise RpcError(INVALID_REQUEST, "threshold must be between 0 and 0.3")
        period = p.number("period")
        if not 1 <= period <= 3600:
            raise RpcError(INVALID_REQUEST, "period must be between 1 and 3600 seconds")
        tolerance = p.optional("tolerance")
        if tolerance is not None and tolerance <= 0:
            raise RpcError(INVALID_REQUEST, "tolerance must be positive")
        return threshold, period, tolerance


def _require_delta(p: Params, view: View) -> None:
    if abs(view.delta(p.inst.name)) < 0.25:
        raise RpcError(
            INVALID_REQUEST, f"{p.inst.name} must be an outright instrument with at least 0.25 delta"
        )


@dataclass
class DHedge(Strategy):
    """Delta hedger: the account's delta in the underlying (or only ``position``'s instrument plus the
    hedge) is brought back to ``target_delta`` by trading the bot's instrument."""

    name: ClassVar[str] = "dhedge"
    target_delta: float
    hedger: Hedger
    position: str | None = None

    @classmethod
    def parse(cls, p: Params, view: View, instruments: dict[str, Instrument]) -> DHedge:
        _require_delta(p, view)
        position = p.params.get("position")
        if position is not None and position not in instruments:
            raise RpcError(INVALID_REQUEST, f"position must name an outright instrument, not {position}")
        target = p.number("target_delta", 0.0)
        if not -10 <= target <= 10:
            raise RpcError(INVALID_REQUEST, "target_delta must be between -10 and 10")
        return cls(target, Hedger(*Hedger.parse_common(p)), position)

    def fields(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "target_delta": self.target_delta,
            "threshold": self.hedger.threshold,
            "period": self.hedger.period,
        }
        if self.position is not None:
            wire["position"] = self.position
        return wire

    def plan(self, view: View) -> Plan:
        if self.position is not None:
            names = {self.position, view.instrument.name}
        else:
            underlying = view.instrument.underlying
            names = {
                n for n, pos in view.account.positions.items() if pos.instrument.underlying == underlying
            }
        delta = sum(
            view.position(name) * view.delta(name) for name in names if name in view.market.instruments
        )
        return Plan(target=self.hedger.target(view, delta - self.target_delta))


@dataclass
class DFollow(Strategy):
    """Delta follower: the position in the bot's instrument follows the delta of ``target_amount``
    contracts of ``target_instrument``."""

    name: ClassVar[str] = "dfollow"
    target_instrument: str
    target_amount: float
    hedger: Hedger

    @classmethod
    def parse(cls, p: Params, view: View, instruments: dict[str, Instrument]) -> DFollow:
        _require_delta(p, view)
        target = p.params.get("target_instrument")
        if target not in instruments or instruments[target].kind != "option":
            raise RpcError(INVALID_REQUEST, "target_instrument must name an outright option")
        amount = p.number("target_amount")
        if not 0.1 <= amount <= 1000:
            raise RpcError(INVALID_REQUEST, "target_amount must be between 0.1 and 1000")
        return cls(str(target), amount, Hedger(*Hedger.parse_common(p)))

    def fields(self) -> dict[str, Any]:
        return {
            "target_instrument": self.target_instrument,
            "target_amount": self.target_amount,
            "threshold": self.hedger.threshold,
            "period": self.hedger.period,
        }

    def plan(self, view: View) -> Plan:
        if self.target_instrument not in view.market.instruments:
            return Plan()
        wanted = view.delta(self.target_instrument) * self.target_amount
        following = view.position() * view.delta(view.instrument.name)
        return Plan(target=self.hedger.target(view, following - wanted))
