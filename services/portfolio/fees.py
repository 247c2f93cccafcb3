"""Fee estimates from the configured schedule (pure).

Fees already paid come from the exchange's trades; the schedule only estimates
what has not happened yet (the close) and the fee of a trade that reported none.

Fee base (the USD notional a rate applies to):

* perpetuals, futures, combinations, and instruments whose type is not known
  yet: size x the trade price — for a close, the exit price walked from the
  book, because that is the price the closing trade will print at;
* options: Thalex charges option fees (2.5 bps) on the underlying, so size x
  the underlying's index (the tick's, else the newest the guardian has from
  any source: another instrument on the underlying, `price_index.<underlying>`;
  for a past trade its own `index` first). Only when no index is known at all,
  size x the option's own price (the mark for a close, the trade price for a
  past trade): far too low, so it is the last resort.
* a premium cap (`premium_cap`, per product or instrument; Thalex's published
  schedule has none) limits an option's fee to that share of its premium,
  size x price (the exit price for a close).

Every trading-fee estimate is at least `minimum_fee_usd` (per trade; per
position closed). Settlement and liquidation fees are rates of price x amount
with no minimum (a worthless option settles for nothing and pays nothing).
"""

from __future__ import annotations

from services.common.config import FeeRates, TradingFees
from services.common.contracts import InstrumentType, Liquidity


def rates_for(schedule: TradingFees, instrument: str, instrument_type: InstrumentType | None) -> FeeRates:
    """The rates that apply to one instrument: its own, else its product's, else the top-level rates."""
    if instrument in schedule.instruments:
        return schedule.instruments[instrument]
    if instrument_type is not None and instrument_type in schedule.products:
        return schedule.products[instrument_type]
    return FeeRates(maker_fee_rate=schedule.maker_fee_rate, taker_fee_rate=schedule.taker_fee_rate)


def close_fee_base(
    size: float,
    exit_price: float,
    mark: float,
    instrument_type: InstrumentType | None,
    index: float | None,
) -> float:
    """The notional a close of `size` (> 0) pays its fee on."""
    if instrument_type is InstrumentType.OPTION:
        return size * (index if index is not None else mark)
    return size * exit_price


def trade_fee_base(
    amount: float,
    price: float,
    instrument_type: InstrumentType | None,
    index: float | None,
) -> float:
    """The notional a past trade of `amount` at `price` paid its fee on."""
    if instrument_type is InstrumentType.OPTION and index is not None:
        return amount * index
    return amount * price


def premium_cap_of(
    instrument_type: InstrumentType | None, premium_cap: float | None, size: float, price: float
) -> float | None:
    """The most an option's fee may be (`premium_cap` x size x price); None: not capped."""
    if instrument_type is not InstrumentType.OPTION or premium_cap is None:
        return None
    return premium_cap * size * price


def estimated_fee(base: float, rate: float, minimum_fee_usd: float, cap: float | None = None) -> float:
    """A fee on `base` at `rate`, capped at `cap` (if any), never below the exchange's minimum."""
    fee = base * rate
    if cap is not None:
        fee = min(fee, cap)
    return max(minimum_fee_usd, fee)


def rate_for_liquidity(liquidity: Liquidity | None, maker_rate: float, taker_rate: float) -> float:
    """The rate a past trade most likely paid: maker if it says so, else taker (the cautious guess)."""
    return maker_rate if liquidity is Liquidity.MAKER else taker_rate
