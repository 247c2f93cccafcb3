"""The paper's margin model: a documented simplification of Thalex's portfolio margin.

Thalex (thalex.com, "Portfolio margin") computes the initial margin requirement per underlying
as the worst loss over about 50 price and volatility scenarios, plus a roll contingency for
offsetting deltas in different maturities and an option contingency for short strikes; the
maintenance requirement is 70 % of it. The paper keeps that structure with fewer scenarios:

* loss margin: the worst loss over index moves of -20 % .. +20 % in 5 % steps (coverage 1,
  implied volatility unchanged); perpetuals and futures move with the index, options are
  re-priced with Black-76 on the moved forward;
* roll contingency: 4 % of the index times the delta-one roll position (the smaller of the
  long and the short delta-one contracts, netted per maturity; the perpetual is a maturity);
  options roll contingency 0;
* option contingency: 0.25 % of the index per short option contract;
* open orders: an underlying's requirement is the largest of its positions alone, its
  positions with every open buy order filled at its limit price, and with every open sell
  order filled (Thalex assumes filled the orders that would lose in a scenario);
* maintenance = 70 % of initial. Margin balance = cash + unrealised P&L (perpetual funding
  included) + the session's realised P&L net of its fees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from services.paper.market import Market, black_scholes

if TYPE_CHECKING:
    from services.paper.accounts import Account, Order
    from services.paper.instruments import Instrument

SCENARIO_MOVES = (-0.20, -0.15, -0.10, -0.05, 0.0, 0.05, 0.10, 0.15, 0.20)
ROLL_CONTINGENCY = 0.04
OPTION_CONTINGENCY = 0.0025
MAINTENANCE_SHARE = 0.7


@dataclass(frozen=True)
class Exposure:
    """A position (at its mark) or an open order (at its limit) in one outright instrument."""

    instrument: Instrument
    amount: float
    """Signed: long > 0."""
    price: float
    open_order: bool = False


@dataclass
class Scenario:
    move: float
    pnl: float
    positions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class UnderlyingMargin:
    underlying: str
    loss: float = 0.0
    roll_position: float = 0.0
    roll_contingency: float = 0.0
    option_short_cash: float = 0.0
    option_contingency: float = 0.0
    scenarios: list[Scenario] = field(default_factory=list)
    used: int = 0
    index: float = 0.0

    @property
    def required(self) -> float:
        return self.loss + self.roll_contingency + self.option_contingency

    def summary_wire(self) -> dict[str, Any]:
        """The lightweight breakdown of ``private/required_margin_for_order``."""
        return {
            "underlying": self.underlying,
            "required_margin": self.required,
            "loss_margin": self.loss,
            "roll_contingency_margin": self.roll_contingency,
            "d1_roll_contingency_margin": self.roll_contingency,
            "options_roll_contingency_margin": 0.0,
            "options_contingency_margin": self.option_contingency,
        }

    def to_wire(self) -> dict[str, Any]:
        """One underlying of ``PortfolioMarginBreakdown``."""
        roll_cash = self.roll_position * self.index
        common = {
            "loss_margin": self.loss,
            "roll_cash_position": roll_cash,
            "roll_contingency_margin": self.roll_contingency,
            "d1_roll_cash_position": roll_cash,
            "d1_roll_contingency_margin": self.roll_contingency,
            "options_roll_cash_position": 0.0,
            "options_roll_contingency_margin": 0.0,
            "options_short_cash_position": self.option_short_cash,
            "options_contingency_margin": self.option_contingency,
        }
        scenarios = []
        for number, scenario in enumerate(self.scenarios):
            loss = -scenario.pnl
            scenarios.append(
                {
                    "underlying_change_pct": round(scenario.move * 100, 10),
                    "vol_change_pct_point": 0.0,
                    "pnl": scenario.pnl,
                    "coverage_factor": 1.0,
                    "required_margin": loss + self.roll_contingency + self.option_contingency,
                    **common,
                    "loss_margin": loss,
                    "positions": scenario.positions,
                    "assets": [],
                    "highlight": number == self.used,
                }
            )
        return {
            "underlying": self.underlying,
            "required_margin": self.required,
            "scenario_margin": self.loss,
            "scenario_used": self.used,
            "scenarios": scenarios,
            **common,
        }


@dataclass
class AccountMargin:
    underlyings: dict[str, UnderlyingMargin]

    @property
    def required(self) -> float:
        return sum(u.required for u in self.underlyings.values())

    @property
    def maintenance(self) -> float:
        return MAINTENANCE_SHARE * self.required


def evaluate(market: Market, underlying: str, exposures: list[Exposure]) -> UnderlyingMargin:
    """The requirement of one underlying for exactly these exposures."""
    result = UnderlyingMargin(underlying, index=market.index[underlying])
    marks = {e.instrument.name: market.mark(e.instrument.name) for e in exposures}
    worst = None
    for move in SCENARIO_MOVES:
        scenario = Scenario(move, 0.0)
        for e in exposures:
            mark = marks[e.instrument.name]
            moved = _scenario_price(market, e.instrument, mark.price, mark.forward, move)
            instrument_pnl = moved - e.price
            pnl = e.amount * instrument_pnl
            scenario.pnl += pnl
            row = {
                "instrument_name": e.instrument.name,
                "position": e.amount,
                "instrument_pnl": instrument_pnl,
                "pnl": pnl,
                "current_price": e.price,
                "scenario_price": moved,
                "open_order": e.open_order,
            }
            if e.open_order:
                row["assumed_filled"] = True
            scenario.positions.append(row)
        result.scenarios.append(scenario)
        if worst is None or -scenario.pnl > -result.scenarios[worst].pnl:
            worst = len(result.scenarios) - 1
    result.used = worst or 0
    result.loss = max(0.0, -result.scenarios[result.used].pnl) if result.scenarios else 0.0
    result.roll_position = _roll_position(exposures)
    result.roll_contingency = ROLL_CONTINGENCY * result.index * result.roll_position
    shorts = sum(-e.amount for e in exposures if e.instrument.kind == "option" and e.amount < 0)
    result.option_short_cash = shorts * result.index
    result.option_contingency = OPTION_CONTINGENCY * result.option_short_cash
    return result


def _scenario_price(
    market: Market, inst: Instrument, mark: float, forward: float | None, move: float
) -> float:
    if inst.kind != "option" or forward is None:
        return mark * (1.0 + move)
    years = max(0.0, (inst.expiry_ts or 0) - market.now) / (365.0 * 24 * 3600)
    is_call = inst.option_type == "call"
    base, _ = black_scholes(forward, inst.strike or 0.0, years, market.volatility, is_call)
    moved, _ = black_scholes(forward * (1.0 + move), inst.strike or 0.0, years, market.volatility, is_call)
    return max(0.0, mark + moved - base)


def _roll_position(exposures: list[Exposure]) -> float:
    """Offsetting delta-one contracts across maturities: min(longs, shorts) of the per-maturity nets."""
    nets: dict[int, float] = {}
    for e in exposures:
        if e.instrument.kind in ("perpetual", "future"):
            maturity = e.instrument.expiry_ts or 0
            nets[maturity] = nets.get(maturity, 0.0) + e.amount
    longs = sum(n for n in nets.values() if n > 0)
    shorts = sum(-n for n in nets.values() if n < 0)
    return min(longs, shorts)


def hypothetical(market: Market, inst: Instrument, amount: float, price: float | None) -> list[Exposure]:
    """``amount`` (signed) of ``inst`` bought or sold at ``price`` (the mark when None), as exposures in
    outrights: a combination's legs at their marks, the first leg carrying the difference between
    ``price`` and the combination's mark."""
    if not inst.is_combination:
        return [Exposure(inst, amount, market.mark(inst.name).price if price is None else price, True)]
    legs = [(market.instruments[leg], quantity) for leg, quantity in inst.legs if leg in market.instruments]
    if len(legs) != len(inst.legs):
        return []
    prices = [market.mark(leg.name).price for leg, _ in legs]
    if price is not None:
        prices[0] += (price - sum(p * q for p, (_, q) in zip(prices, legs, strict=True))) / legs[0][1]
    return [
        Exposure(leg, amount * quantity, p, True) for (leg, quantity), p in zip(legs, prices, strict=True)
    ]


def order_exposures(market: Market, order: Order, remaining: float | None = None) -> list[Exposure]:
    """An open order as exposures at its limit price."""
    amount = order.remaining if remaining is None else remaining
    sign = 1.0 if order.direction == "buy" else -1.0
    return hypothetical(market, order.instrument, sign * amount, order.price)


def account_margin(
    market: Market,
    account: Account,
    extra: list[Exposure] | None = None,
    without: str | None = None,
    extra_buys: bool = True,
) -> AccountMargin:
    """The account's requirement; ``extra`` adds a hypothetical order (a buy order's exposures unless
    ``extra_buys`` is False), ``without`` leaves one open order out."""
    positions: dict[str, list[Exposure]] = {}
    buys: dict[str, list[Exposure]] = {}
    sells: dict[str, list[Exposure]] = {}
    for pos in account.positions.values():
        if abs(pos.position) > 1e-12 and pos.instrument.name in market.instruments:
            exposure = Exposure(pos.instrument, pos.position, market.mark(pos.instrument.name).price)
            positions.setdefault(pos.instrument.underlying, []).append(exposure)
    orders = [o for o in account.orders.values() if o.order_id != without and not o.reduce_only]
    for order in orders:
        side = buys if order.direction == "buy" else sells
        for exposure in order_exposures(market, order):
            side.setdefault(exposure.instrument.underlying, []).append(exposure)
    for exposure in extra or []:
        side = buys if extra_buys else sells
        side.setdefault(exposure.instrument.underlying, []).append(exposure)
    result: dict[str, UnderlyingMargin] = {}
    for underlying in sorted(set(positions) | set(buys) | set(sells)):
        held = positions.get(underlying, [])
        candidates = [held]
        if underlying in buys:
            candidates.append(held + buys[underlying])
        if underlying in sells:
            candidates.append(held + sells[underlying])
        result[underlying] = max(
            (evaluate(market, underlying, c) for c in candidates), key=lambda m: m.required
        )
    return AccountMargin(result)
