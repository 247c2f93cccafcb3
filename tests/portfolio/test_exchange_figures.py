"""Hand-worked examples: the exchange's own figures win (issue "Money correctness II").

Each test writes its arithmetic out; docs/money.md says how each rule reads api.yaml.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.config import ConfigError, FeeRates, TradingFees, load_config
from services.common.contracts import InstrumentType, Liquidity, Tick, TradeType
from services.portfolio.fees import rates_for
from services.portfolio.ledger import FillOutcome, Ledger, funding_period
from tests.portfolio.factories import (
    BTC_CALL,
    BTC_FUTURE,
    BTC_PERP,
    ETH_FUTURE,
    config,
    exchange_position,
    fill,
    ledger,
    positions,
    tick,
)

approx = pytest.approx

SETTLEMENT_1 = 1_704_096_000.0
"""2024-01-01 08:00:00 UTC: Thalex's daily settlement."""
SETTLEMENT_2 = SETTLEMENT_1 + 86_400
CAPPED = TradingFees(products={
    **TradingFees().products,
    InstrumentType.OPTION: FeeRates(maker_fee_rate=0.00025, taker_fee_rate=0.00025, premium_cap=0.125),
})


def row(book: Ledger, instrument: str):  # type: ignore[no-untyped-def]
    (found,) = [p for p in book.snapshot(1, 0, 1e12).positions if p.instrument == instrument]
    return found


def index_tick(underlying: str, price: float, ts: float) -> Tick:
    """What ingest writes for `price_index.<underlying>`: the underlying's own tick."""
    return Tick(instrument=underlying, mark=price, index=price, exchange_ts=ts, ingest_ts=ts)


# --------------------------------------------------------- 1. a fee of 0 is a fee


def test_options_expiring_worthless_pay_what_the_exchange_says_nothing() -> None:
    book = ledger()
    # ten calls bought at 500; the exchange charged 2.5 bps of the index notional 10 * 101000 = 252.5
    book.apply_fill(fill(BTC_CALL, "buy", 10, 500, fee=252.5, ts=1))
    # expiry: settled at 0 (worthless), fee 0 — no fee_rate, no order, as an expiration trade comes
    book.apply_fill(fill(BTC_CALL, "sell", 10, 0, fee=0.0, trade_type=TradeType.EXPIRATION, ts=2))
    snap = book.snapshot(1, 2, 10)
    # realised (0 - 500) * 10 = -5000; fees 252.5 + 0 (the old ledger added 252.5 more: an estimate)
    assert snap.realized_pnl == approx(-5_000)
    assert snap.fees_paid == approx(252.5)
    assert snap.fees_estimated is None
    assert snap.net_pnl == approx(-5_252.5)
    assert row(book, BTC_CALL).position == 0


def test_an_expiration_without_fee_is_estimated_at_the_settlement_fee() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_CALL, "buy", 10, 500, fee=252.5, ts=1))
    book.apply_fill(fill(BTC_CALL, "buy", 5, 500, fee=126.25, ts=1))
    # settled in the money at 2000 without a fee: final settlement 1 bps of 2000 * 10 = 2.0 (flagged)
    book.apply_fill(fill(BTC_CALL, "sell", 10, 2_000, fee=None, trade_type=TradeType.EXPIRATION, ts=2))
    # worthless and without a fee: 1 bps of 0 = 0, no minimum (a settlement is not an order)
    book.apply_fill(fill(BTC_CALL, "sell", 5, 0, fee=None, trade_type=TradeType.EXPIRATION, ts=3))
    snap = book.snapshot(1, 3, 10)
    assert snap.fees_paid == approx(252.5 + 126.25 + 2.0 + 0.0)
    assert snap.fees_estimated == approx(2.0)
    # realised (2000 - 500) * 10 + (0 - 500) * 5 = 15000 - 2500 = 12500
    assert snap.realized_pnl == approx(12_500)


# --------------------------------------------------- 2. a trade without its fee


def test_a_trade_without_fee_is_booked_with_an_estimate_and_flagged() -> None:
    book = ledger()
    # no fee, no order id: booked all the same
    assert book.apply_fill(fill(BTC_FUTURE, "buy", 0.5, 40_000, fee=None, order_id=None,
                                liquidity=Liquidity.TAKER)) is FillOutcome.APPLIED
    # taker 5 bps of 0.5 * 40000 = 20000 -> 10.0
    # an option trade without fee but with its fee_rate and index: 2.5 bps of 2 * 100000 = 50.0
    book.apply_fill(fill(BTC_CALL, "buy", 2, 1_500, fee=None, fee_rate=0.00025, index=100_000))
    snap = book.snapshot(1, 1, 10)
    assert row(book, BTC_FUTURE).fees_estimated == approx(10.0)
    assert row(book, BTC_CALL).fees_estimated == approx(50.0)
    assert snap.fees_paid == approx(60.0) and snap.fees_estimated == approx(60.0)
    assert book.position(BTC_FUTURE) == 0.5


def test_an_option_trade_without_fee_or_index_uses_the_underlyings_newest_index() -> None:
    book = ledger()
    book.apply_tick(tick(BTC_PERP, 100_500, index=100_000, ts=5))
    # schedule 2.5 bps on 2 * 100000 (the perpetual's index, same underlying) = 50.0
    book.apply_fill(fill(BTC_CALL, "buy", 2, 1_500, fee=None, ts=6))
    assert row(book, BTC_CALL).fees_paid == approx(50.0)


# ------------------------------------------ 3. funding across the daily settlement


def test_a_perpetual_held_across_two_settlements_keeps_its_funding() -> None:
    """What the exchange settles each day plus its unrealised funding is the ledger's funding P&L."""
    assert funding_period(SETTLEMENT_1) == funding_period(SETTLEMENT_1 - 1) + 1
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, funding_mark=0.5, ts=SETTLEMENT_1 - 3_600))
    # E = 0.5 * 1 = 0.5
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=3.0, ts=SETTLEMENT_1 - 1))
    # unrealised = 3.0 * 1 - 0.5 = 2.5
    assert book.totals().funding_pnl == approx(2.5)

    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.01, ts=SETTLEMENT_1 + 1))
    # 08:00 settled at the day's last mark 3.0: realised 3.0 * 1 - 0.5 = 2.5 (Thalex's
    # realized_funding_pnl of that day); E = 0 and the mark starts again: unrealised 0.01 * 1 - 0
    # = 0.01, the exchange's unrealised_perpetual_funding. Total 2.51: nothing lost at 08:00.
    assert book.totals().funding_pnl == approx(2.51)
    (first,) = book.take_settlements()
    assert (first.funding_mark, first.position, first.realized, first.periods) == (3.0, 1, approx(2.5), 1)
    assert book.to_state()["positions"][BTC_PERP][5] == 0.0  # E, as the exchange's: reset

    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, funding_mark=0.4, ts=SETTLEMENT_1 + 3_600))
    # E = 0 + 0.4 * 1 = 0.4; q = 2
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=1.2, ts=SETTLEMENT_2 - 1))
    # funding = 2.5 + (1.2 * 2 - 0.4) = 4.5
    assert book.totals().funding_pnl == approx(4.5)
    restored = Ledger.from_state(json.loads(json.dumps(book.to_state())), config())
    for same in (book, restored):
        same.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.02, ts=SETTLEMENT_2 + 5))
        # second settlement: 1.2 * 2 - 0.4 = 2.0 realised; unrealised 0.02 * 2 = 0.04
        # funding = 2.5 + 2.0 + 0.04 = 4.54 = the days the exchange settled (2.5 + 2.0) + its unrealised
        # (cumulative check: settled marks 3.0 + 1.2, now 0.02 -> C = 4.22;
        #  4.22 * 2 - (0.5 * 1 + (3.0 + 0.4) * 1) = 8.44 - 3.9 = 4.54)
        assert same.totals().funding_pnl == approx(4.54)
        assert [s.realized for s in same.take_settlements()] == [approx(2.0)]
    assert restored.snapshot(2, 0, 1e12) == book.snapshot(2, 0, 1e12)

    # a fill of the settled day that arrives after the settlement: sold 1 at 07:59:50 at mark 1.1
    book.apply_fill(fill(BTC_PERP, "sell", 1, 50_000, funding_mark=1.1, ts=SETTLEMENT_2 - 10))
    # Thalex booked it first: realised 1.1 - 0.4 / 2 = 0.9, then settled 1.2 * 1 - 0.2 = 1.0 (1.9).
    # The ledger settled q = 2 (2.0) and books the fill at 1.1 - 1.2 = -0.1 of the new day:
    # -0.1 * 1 - 0 = -0.1, so 2.0 - 0.1 = 1.9 as well. funding = 2.5 + 1.9 + 0.02 * 1 = 4.42
    assert book.totals().funding_pnl == approx(4.42)


def test_a_week_of_settlements_agrees_with_the_exchange_after_every_one() -> None:
    """Thalex's books kept beside the ledger: each day the funding mark climbs from 0 by `rate` an
    hour; at 08:00 the exchange realises `mark * q - E` (its DailyMark.realized_funding_pnl) and resets
    E and the mark. After every settlement: ledger funding = all the exchange settled + closing trades'
    realised funding + its unrealised funding, and the ledger's E is the exchange's."""
    book = ledger()
    q = entry = settled = 0.0  # the exchange's position, perpetual_funding_entry_value, realised funding
    for day in range(7):
        start = SETTLEMENT_1 + day * 86_400
        rate = 0.01 * (day + 1) * (-1) ** day  # funding rate changes sign every day
        for hour, size in ((1, 0.5), (9, -0.2), (17, 0.3 if day % 2 else -0.8)):
            mark = rate * hour
            book.apply_fill(fill(BTC_PERP, "buy" if size > 0 else "sell", abs(size), 50_000,
                                 funding_mark=mark, ts=start + hour * 3_600))
            if q == 0 or (q > 0) == (size > 0):
                entry += mark * size
            elif abs(size) <= abs(q):  # reduce: realise the closed share (perpetual_funding_pnl)
                share = abs(size) / abs(q)
                settled += share * (mark * q - entry)
                entry *= 1 - share
            else:  # flip
                settled += mark * q - entry
                entry = mark * (q + size)
            q += size
        last = rate * 23.9
        book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=last, ts=start + 23.9 * 3_600))
        settled += last * q - entry  # 08:00 the next day: realized_funding_pnl
        entry = 0.0
        book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.0, ts=start + 86_400))
        unrealised = 0.0 * q - entry
        assert book.totals().funding_pnl == approx(settled + unrealised, abs=1e-9), day
        assert book.to_state()["positions"][BTC_PERP][5] == approx(entry, abs=1e-12)
        assert book.position(BTC_PERP) == approx(q)
    assert len(book.take_settlements()) == 7


def test_a_day_without_any_input_settles_at_the_last_known_mark() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 2, 50_000, funding_mark=0.5, ts=SETTLEMENT_1 - 60))
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.7, ts=SETTLEMENT_1 - 30))
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.1, ts=SETTLEMENT_2 + 60))
    # settled at 0.7: 0.7 * 2 - 1.0 = 0.4; the day in between is unknown (not counted); now 0.1 * 2
    (settled,) = book.take_settlements()
    assert settled.periods == 2 and settled.realized == approx(0.4)
    assert book.totals().funding_pnl == approx(0.4 + 0.2)


def test_a_settlement_before_an_adopted_report_is_booked_first() -> None:
    book = ledger(drift_grace_seconds=0.0)
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, funding_mark=0.5, ts=SETTLEMENT_1 - 60))
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.9, ts=SETTLEMENT_1 - 10))
    # no tick since; the report after 08:00 has 2 (a buy the ledger missed) and E = 0.05 (of the new day)
    report = positions(SETTLEMENT_1 + 30, exchange_position(BTC_PERP, 2, 50_000, 50_000,
                                                            perpetual_funding_entry_value=0.05))
    book.reconcile(report, now=SETTLEMENT_1 + 30)
    # settled first: 0.9 * 1 - 0.5 = 0.4; then E = 0.05 adopted; mark 0 (new day): 0 * 2 - 0.05
    assert book.totals().funding_pnl == approx(0.4 - 0.05)


# ------------------------------------------------- 4. the late trade of an adoption


def test_drift_adopted_then_the_late_trade_books_what_it_really_made() -> None:
    book = ledger(drift_grace_seconds=0.0)
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, ts=100))
    # the exchange sold 0.6 at 50400 at t=150 (fill in flight); its report at t=160: 0.4 left, mark 50200
    book.reconcile(positions(160, exchange_position(BTC_FUTURE, 0.4, 50_000, 50_200)), now=160)
    # adopted: the missing 0.6 realised at the exchange's mark: (50200 - 50000) * 0.6 = 120
    assert book.totals().realized_pnl == approx(120)
    late = fill(BTC_FUTURE, "sell", 0.6, 50_400, fee=15.12, ts=150)
    assert book.apply_fill(late) is FillOutcome.APPLIED
    # corrected by (50400 - 50200) * 0.6 = 120: realised 240 = (50400 - 50000) * 0.6, Thalex's position_pnl
    assert book.totals().realized_pnl == approx(240)
    assert book.totals().fees_paid == approx(15.12)  # 5 bps of 0.6 * 50400
    assert book.position(BTC_FUTURE) == approx(0.4)  # not moved a second time
    assert book.apply_fill(late) is FillOutcome.DUPLICATE
    assert book.totals().realized_pnl == approx(240)


def test_a_late_flip_corrects_only_the_part_it_closed() -> None:
    book = ledger(drift_grace_seconds=0.0)
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, ts=100))
    # missed: sold 1.5 at 49800 (closes the long, opens 0.5 short at 49800); report mark 49900
    book.reconcile(positions(160, exchange_position(BTC_FUTURE, -0.5, 49_800, 49_900)), now=160)
    # adopted: the long 1 realised at the mark (49900 - 50000) * 1 = -100; short 0.5 at 49800
    assert book.totals().realized_pnl == approx(-100)
    book.apply_fill(fill(BTC_FUTURE, "sell", 1.5, 49_800, ts=150))
    # the closing 1 (of 1.5) corrected: (49800 - 49900) * 1 = -100 -> -200 = (49800 - 50000) * 1;
    # the 0.5 it opened is in the exchange's average price already
    assert book.totals().realized_pnl == approx(-200)
    assert book.position(BTC_FUTURE) == approx(-0.5)
    book.apply_tick(tick(BTC_FUTURE, 49_700, ts=170))
    assert book.totals().unrealized_pnl == approx(50)  # (49700 - 49800) * -0.5


def test_a_book_change_re_issuing_an_old_index_does_not_outrank_a_newer_one() -> None:
    """Ingest re-issues the last ticker (its mark and index) with every book change, stamped with the
    book's time and the ticker's own as `mark_ts`: the index is as old as the ticker, so a newer
    `price_index` keeps pricing the option (before, the re-issue won on its fresh book time)."""
    book = ledger()
    book.apply_fill(fill(BTC_CALL, "buy", 1, 2_500, fee=25.0, ts=1))
    book.apply_tick(tick(BTC_CALL, 2_600, bids=[(2_590, 5)], ts=2))
    book.apply_tick(tick(BTC_PERP, 100_300, index=100_400, ts=4))
    book.apply_tick(index_tick("BTCUSD", 101_000, ts=6))
    # price_index.BTCUSD at 6 is newer than the perpetual's ticker at 4: 2.5 bps of 101000 = 25.25
    assert row(book, BTC_CALL).est_close_fee == approx(25.25)
    re_issued = tick(BTC_PERP, 100_300, index=100_400, ts=10).model_copy(update={"mark_ts": 4.0})
    book.apply_tick(re_issued)
    assert row(book, BTC_CALL).est_close_fee == approx(25.25)
    book.apply_tick(tick(BTC_PERP, 100_350, index=100_600, ts=11))  # a new ticker: its index is newest
    assert row(book, BTC_CALL).est_close_fee == approx(25.15)  # 2.5 bps of 100600



# ----------------------------------------------- 5. an option tick without index


def test_an_option_tick_without_index_is_charged_on_the_underlyings_index() -> None:
    """The audited case: 0.65 USD estimated against the 25 USD the close really costs."""
    book = ledger()
    book.apply_fill(fill(BTC_CALL, "buy", 1, 2_500, fee=25.0, ts=1))
    book.apply_tick(tick(BTC_CALL, 2_600, bids=[(2_590, 5)], ts=2))
    # no index anywhere: the premium, 2.5 bps of 1 * 2600 = 0.65 (far too low, the last resort)
    assert row(book, BTC_CALL).est_close_fee == approx(0.65)
    assert book.moves_snapshot("BTCUSD")  # an index of BTCUSD would change the estimate
    book.apply_tick(index_tick("BTCUSD", 100_000, ts=3))
    # price_index.BTCUSD: 2.5 bps of 1 * 100000 = 25
    assert row(book, BTC_CALL).est_close_fee == approx(25.0)
    book.apply_tick(tick(BTC_PERP, 100_300, index=100_400, ts=4))
    # the perpetual's tick is newer: 2.5 bps of 100400 = 25.1
    assert row(book, BTC_CALL).est_close_fee == approx(25.1)
    book.apply_tick(tick(BTC_CALL, 2_600, bids=[(2_590, 5)], index=99_000, ts=5))
    # the option's own index wins: 2.5 bps of 99000 = 24.75; other indexes no longer move it
    assert row(book, BTC_CALL).est_close_fee == approx(24.75)
    assert not book.moves_snapshot("BTCUSD")
    restored = Ledger.from_state(json.loads(json.dumps(book.to_state())), config())
    assert restored.snapshot(1, 0, 1e12) == book.snapshot(1, 0, 1e12)


# ------------------------------------------------------ 6. option fee caps


def test_a_capped_and_an_uncapped_option_fee() -> None:
    capped = ledger(fees=CAPPED)
    uncapped = ledger()
    for book in (capped, uncapped):
        book.apply_fill(fill(BTC_CALL, "buy", 1, 3_000, fee=25.0, ts=1))
        book.apply_tick(tick(BTC_CALL, 3_000, bids=[(2_995, 5)], index=100_000, ts=2))
    # in the money: 2.5 bps of 100000 = 25 < 12.5 % of the premium 2995 = 374.375: not capped
    assert row(capped, BTC_CALL).est_close_fee == approx(25.0)
    assert row(uncapped, BTC_CALL).est_close_fee == approx(25.0)
    for book in (capped, uncapped):
        book.apply_tick(tick(BTC_CALL, 100, bids=[(95, 5)], index=100_000, ts=3))
    # far out of the money, exit at 95: 25 > 12.5 % * 95 = 11.875 -> capped (the paper charges this
    # with the same setting); Thalex's published schedule has no cap: 25
    assert row(capped, BTC_CALL).est_close_fee == approx(11.875)
    assert row(uncapped, BTC_CALL).est_close_fee == approx(25.0)
    # a past option trade without fee is capped the same way: 12.5 % of 2 * 95 = 23.75 < 2.5 bps * 200000
    capped.apply_fill(fill(BTC_CALL, "sell", 2, 95, fee=None, ts=4))
    assert row(capped, BTC_CALL).fees_estimated == approx(23.75)


def test_fee_settings_are_validated_naming_the_key(tmp_path: Path) -> None:
    toml = tmp_path / "fees.toml"
    toml.write_text("[trading_fees.products.future]\nmaker_fee_rate = 0.0001\ntaker_fee_rate = 0.0005\n"
                    "premium_cap = 0.1\n")
    with pytest.raises(ConfigError, match=r"products.future.premium_cap = 0.1: applies to options only"):
        load_config(toml)
    toml.write_text("[trading_fees]\nliquidation_fee_rate = 0.5\n")
    with pytest.raises(ConfigError, match=r"trading_fees.liquidation_fee_rate = 0.5: must be a fee rate"):
        load_config(toml)
    fees = load_config(None).trading_fees
    # Thalex's published schedule: final settlement 1 bps, liquidation 50 bps, no option premium cap
    assert (fees.settlement_fee_rate, fees.liquidation_fee_rate) == (0.0001, 0.005)
    assert rates_for(fees, BTC_CALL, InstrumentType.OPTION).premium_cap is None


# ------------------------------------------------ 7. every trade type and fee


def test_a_liquidation_pays_its_trading_fee_and_its_liquidation_fee() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, fee=25.0, ts=1))
    # liquidated: sold 0.5 at 45000, fee 5 bps = 11.25, liquidation_fee 50 bps = 112.5
    book.apply_fill(fill(BTC_PERP, "sell", 0.5, 45_000, fee=11.25, liquidation_fee=112.5,
                         trade_type=TradeType.LIQUIDATION, order_id=None, ts=2))
    # and the other 0.5 without liquidation_fee: estimated at 50 bps of 0.5 * 45000 = 112.5 (flagged)
    book.apply_fill(fill(BTC_PERP, "sell", 0.5, 45_000, fee=11.25, trade_type=TradeType.LIQUIDATION, ts=3))
    snap = book.snapshot(1, 3, 10)
    # realised (45000 - 50000) * 1 = -5000; fees 25 + 11.25 + 112.5 + 11.25 + 112.5 = 272.5
    assert snap.realized_pnl == approx(-5_000)
    assert snap.fees_paid == approx(272.5)
    assert snap.fees_estimated == approx(112.5)
    assert book.position(BTC_PERP) == 0


def test_a_future_expires_at_its_settlement_price() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "sell", 2, 50_000, fee=50.0, ts=1))
    # expiry: bought back 2 at the delivery price 51000, final settlement fee 1 bps of 102000 = 10.2
    book.apply_fill(fill(BTC_FUTURE, "buy", 2, 51_000, fee=10.2, trade_type=TradeType.EXPIRATION, ts=2))
    snap = book.snapshot(1, 2, 10)
    assert snap.realized_pnl == approx(-2_000)  # (51000 - 50000) * 2 * (-1)
    assert snap.fees_paid == approx(60.2)
    assert book.position(BTC_FUTURE) == 0


BOOKED_AS_TRADES = [TradeType.COMBO, TradeType.RFQ, TradeType.BLOCK, TradeType.INTERNAL_TRANSFER,
                    TradeType.AMEND, TradeType.DELETE, TradeType.NORMAL]


@pytest.mark.parametrize("kind", BOOKED_AS_TRADES)
def test_legs_and_other_trades_are_booked_on_their_instrument(kind: TradeType) -> None:
    """combo / rfq legs come as one trade per leg, on the leg's instrument, in the leg's direction."""
    book = ledger()
    # a roll / spread: two legs of one order
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_500, fee=12.6, trade_type=kind, ts=1))
    book.apply_fill(fill(BTC_PERP, "sell", 1, 50_000, fee=12.5, trade_type=kind, ts=1))
    book.apply_tick(tick(BTC_FUTURE, 50_700, ts=2))
    book.apply_tick(tick(BTC_PERP, 50_100, ts=2))
    snap = book.snapshot(1, 2, 10)
    assert (book.position(BTC_FUTURE), book.position(BTC_PERP)) == (1, -1)
    # unrealised (50700 - 50500) * 1 + (50100 - 50000) * -1 = 200 - 100 = 100; fees 25.1
    assert snap.unrealized_pnl == approx(100)
    assert snap.fees_paid == approx(25.1)


def test_a_daily_mark_entry_moves_no_position() -> None:
    book = ledger()
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=3.0, ts=1))
    # legacy futures-style settlement entry at mark 3100: a settlement, not an exchange of contracts
    book.apply_fill(fill(ETH_FUTURE, "sell", 2, 3_100, fee=None, trade_type=TradeType.DAILY_MARK, ts=2))
    book.apply_tick(tick(ETH_FUTURE, 3_100, ts=3))
    snap = book.snapshot(1, 3, 10)
    # position and average cost untouched: unrealised (3100 - 3000) * 2 = 200, nothing realised;
    # daily settlement is free: no estimate
    assert book.position(ETH_FUTURE) == 2
    assert snap.unrealized_pnl == approx(200) and snap.realized_pnl == 0
    assert snap.fees_paid == approx(3.0) and snap.fees_estimated is None
