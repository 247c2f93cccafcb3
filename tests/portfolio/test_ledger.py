"""Hand-worked examples of the ledger's money rules (arithmetic in the comments)."""

from __future__ import annotations

import json

import pytest

from services.common.config import FeeRates, TradingFees
from services.common.contracts import Drift, ExitPriceSource, Liquidity
from services.portfolio.ledger import (
    ClosedLeg,
    FillOutcome,
    Ledger,
    check_close_cost,
    estimated_close_cost,
)
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


def only(snapshot_positions: list, instrument: str):  # type: ignore[no-untyped-def]
    (row,) = [p for p in snapshot_positions if p.instrument == instrument]
    return row


# ------------------------------------------------------------------- positions


def test_long_then_partial_close() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 0.5, 40_000, fee=1.00, ts=1))
    book.apply_fill(fill(BTC_FUTURE, "buy", 0.5, 42_000, fee=1.05, ts=2))
    # avg entry = (0.5*40000 + 0.5*42000) / 1.0 = 41000
    book.apply_fill(fill(BTC_FUTURE, "sell", 0.4, 43_000, fee=0.86, ts=3))
    # realised = (43000 - 41000) * 0.4 = 800; 0.6 left, still at 41000
    book.apply_tick(tick(BTC_FUTURE, 42_500, best_bid=42_490, best_ask=42_510, ts=4))
    snap = book.snapshot(seq=1, now=5, stale_after_seconds=10)
    row = only(snap.positions, BTC_FUTURE)
    assert row.position == approx(0.6)
    assert row.avg_entry == approx(41_000)
    assert row.realized_pnl == approx(800)
    # unrealised = (42500 - 41000) * 0.6 = 900
    assert row.unrealized_pnl == approx(900)
    assert row.fees_paid == approx(2.91)  # 1.00 + 1.05 + 0.86
    assert row.funding_pnl == 0
    # no depth: top of book, best bid for a long; slippage = (42500 - 42490) * 0.6 = 6
    assert row.exit_price == 42_490
    assert row.exit_price_source is ExitPriceSource.TOP_OF_BOOK
    assert row.est_slippage == approx(6)
    # close fee = 0.6 * 42490 * 5 bps (future taker) = 12.747
    assert row.est_close_fee == approx(12.747)
    assert row.opened_ts == 1
    assert row.underlying == "BTCUSD" and row.instrument_type == "future"
    # gross = 800 + 900 = 1700; net = 1700 - 2.91 = 1697.09
    assert snap.gross_pnl == approx(1_700)
    assert snap.net_pnl == approx(1_697.09)
    # net after close = 1697.09 - 12.747 * 1.1 - 6 = 1677.0683 (buffer once, raw fee in the snapshot)
    assert snap.est_close_fees == approx(12.747)
    assert snap.net_after_close == approx(1_677.0683)


def test_short_walks_the_asks() -> None:
    book = ledger()
    book.apply_fill(fill(ETH_FUTURE, "sell", 2, 3_000, fee=0.30, ts=1))
    book.apply_fill(fill(ETH_FUTURE, "buy", 0.5, 2_900, fee=0.07, ts=2))
    # realised = (2900 - 3000) * 0.5 * (-1) = +50; -1.5 left at 3000
    book.apply_tick(tick(ETH_FUTURE, 2_950, asks=[(2_951, 1.0), (2_953, 1.0)], ts=3))
    row = only(book.snapshot(1, 3, 10).positions, ETH_FUTURE)
    assert row.position == approx(-1.5)
    assert row.avg_entry == 3_000
    assert row.realized_pnl == approx(50)
    # unrealised = (2950 - 3000) * (-1.5) = +75
    assert row.unrealized_pnl == approx(75)
    # buy 1.0 @ 2951 + 0.5 @ 2953 = 4427.5 -> vwap 2951.6667
    assert row.exit_price == approx(4_427.5 / 1.5)
    assert row.exit_price_source is ExitPriceSource.BOOK
    # slippage = (vwap - mark) * |q| = 4427.5 - 2950 * 1.5 = 2.5
    assert row.est_slippage == approx(2.5)
    # close fee = 4427.5 * 5 bps = 2.21375
    assert row.est_close_fee == approx(2.21375)


def test_flip_realises_the_closed_part_and_opens_the_rest_at_the_fill_price() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 100, ts=1))
    book.apply_fill(fill(BTC_FUTURE, "sell", 3, 110, ts=7))
    # closes 1 long: realised (110 - 100) * 1 = 10; opens 2 short at 110, opened at the flip
    book.apply_tick(tick(BTC_FUTURE, 105, ts=8))
    row = only(book.snapshot(1, 8, 10).positions, BTC_FUTURE)
    assert row.position == -2
    assert row.avg_entry == 110
    assert row.realized_pnl == approx(10)
    assert row.unrealized_pnl == approx(10)  # (105 - 110) * (-2)
    assert row.opened_ts == 7


def test_full_close_is_exactly_flat() -> None:
    book = ledger()
    for _ in range(3):
        book.apply_fill(fill(BTC_FUTURE, "buy", 0.1, 100))
    book.apply_fill(fill(BTC_FUTURE, "sell", 0.3, 101))
    # 0.1 + 0.1 + 0.1 - 0.3 is 5.6e-17 in floats: float noise, counted as flat
    row = only(book.snapshot(1, 1, 10).positions, BTC_FUTURE)
    assert row.position == 0.0
    assert row.avg_entry == 0.0
    assert row.opened_ts is None
    assert row.realized_pnl == approx(0.3)  # (101 - 100) * 0.3
    assert row.est_close_fee == 0.0


# ------------------------------------------------------------------------ fees


def test_fees_actual_when_reported_schedule_only_when_not() -> None:
    book = ledger()
    # maker rebate reported by the exchange: counted as it is (negative cost)
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=-0.3, fee_rate=-0.00005, liquidity=Liquidity.MAKER))
    # a zero fee is the exchange's figure, with or without its fee_rate: 0
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=0.0, fee_rate=0.0))
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=0.0))
    assert book.snapshot(1, 1, 10).fees_estimated is None
    # not reported, maker: schedule 1 bp of 2 * 3000 = 0.6
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=None, liquidity=Liquidity.MAKER))
    # not reported, liquidity unknown: the taker rate, 5 bps of 6000 = 3.0
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=None))
    # not reported but its rate is: fee_rate x notional = 2 bps of 6000 = 1.2
    book.apply_fill(fill(ETH_FUTURE, "buy", 2, 3_000, fee=None, fee_rate=0.0002))
    snap = book.snapshot(2, 1, 10)
    row = only(snap.positions, ETH_FUTURE)
    assert row.fees_paid == approx(-0.3 + 0 + 0 + 0.6 + 3.0 + 1.2)
    # flagged: 0.6 + 3.0 + 1.2 = 4.8 of the 4.5 paid are estimates (the rebate is the exchange's)
    assert row.fees_estimated == approx(4.8)
    assert snap.fees_estimated == approx(4.8)


def test_estimated_fee_never_below_the_minimum() -> None:
    book = ledger()
    # 0.01 * 10 * 5 bps = 0.00005 < minimum 0.0001
    book.apply_fill(fill(ETH_FUTURE, "buy", 0.01, 10, fee=None))
    book.apply_tick(tick(ETH_FUTURE, 10))
    row = only(book.snapshot(1, 1000, 10).positions, ETH_FUTURE)
    assert row.fees_paid == 0.0001
    assert row.est_close_fee == 0.0001


def test_per_instrument_fee_rates_override_the_product() -> None:
    fees = TradingFees(instruments={BTC_FUTURE: FeeRates(maker_fee_rate=0.0, taker_fee_rate=0.001)})
    book = ledger(fees=fees)
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000))
    book.apply_tick(tick(BTC_FUTURE, 50_000, best_bid=50_000))
    assert book.totals().est_close_fees == approx(50.0)  # 10 bps of 50000


# --------------------------------------------------------------------- funding


def test_perpetual_funding_as_thalex_defines_it() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, funding_mark=0.01, ts=1))
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, funding_mark=0.03, ts=2))
    # entry value E = 0.01*1 + 0.03*1 = 0.04
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.05, ts=3))
    # unrealised funding = 0.05 * 2 - 0.04 = 0.06
    assert only(book.snapshot(1, 3, 10).positions, BTC_PERP).funding_pnl == approx(0.06)

    book.apply_fill(fill(BTC_PERP, "sell", 1, 50_000, funding_mark=0.06, ts=4))
    # closes half: releases 0.04 * 1/2 = 0.02, realises 0.06 * 1 - 0.02 = 0.04; E = 0.02
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.07, ts=5))
    # funding = 0.04 realised + (0.07 * 1 - 0.02) = 0.09
    #         = fm_now*q - sum(fm_i*s_i) = 0.07 - (0.01 + 0.03 - 0.06)
    assert only(book.snapshot(1, 5, 10).positions, BTC_PERP).funding_pnl == approx(0.09)

    book.apply_fill(fill(BTC_PERP, "sell", 3, 50_000, funding_mark=0.08, ts=6))
    # flip: realises 0.08 * 1 - 0.02 = 0.06 (total 0.10); opens -2 with E = 0.08 * (-2) = -0.16
    book.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.09, ts=7))
    snap = book.snapshot(1, 7, 10)
    # funding = 0.10 + (0.09 * (-2) + 0.16) = 0.08 = -0.18 - (0.01 + 0.03 - 0.06 - 0.24)
    assert only(snap.positions, BTC_PERP).funding_pnl == approx(0.08)
    assert snap.funding_pnl == approx(0.08)
    assert snap.gross_pnl == approx(0.08)  # every trade at 50000: no price P&L


# --------------------------------------------------------------------- options


def test_option_close_fee_on_the_underlying_index() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_CALL, "buy", 2, 1_500, fee=5.0))
    book.apply_tick(tick(BTC_CALL, 1_600, bids=[(1_590, 5)], index=100_000))
    row = only(book.snapshot(1, 1000, 10).positions, BTC_CALL)
    assert row.unrealized_pnl == approx(200)  # (1600 - 1500) * 2
    assert row.exit_price == 1_590
    assert row.est_slippage == approx(20)  # (1600 - 1590) * 2
    # 2.5 bps of the underlying notional 2 * 100000 = 50
    assert row.est_close_fee == approx(50)
    assert row.instrument_type == "option"


def test_option_close_fee_on_mark_without_index() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_CALL, "buy", 2, 1_500, fee=5.0))
    book.apply_tick(tick(BTC_CALL, 1_600, bids=[(1_590, 5)]))
    # 2.5 bps of the mark notional 2 * 1600 = 0.8 (not of the exit price)
    assert only(book.snapshot(1, 1000, 10).positions, BTC_CALL).est_close_fee == approx(0.8)


# ------------------------------------------------------------- whole portfolio


def test_two_legs_in_profit_that_only_the_fee_aware_figure_rejects() -> None:
    target = 1.10
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, fee=0.0))
    book.apply_fill(fill(ETH_FUTURE, "sell", 10, 3_000, fee=0.0))
    book.apply_tick(tick(BTC_FUTURE, 50_010, best_bid=50_005, best_ask=50_015))
    book.apply_tick(tick(ETH_FUTURE, 3_000.8, best_bid=3_000.6, best_ask=3_001))
    snap = book.snapshot(1, 1000, 10)
    # BTC +10 (50010 - 50000), ETH -8 ((3000.8 - 3000) * -10): gross 2.0 > target
    assert snap.gross_pnl == approx(2.0)
    assert snap.net_pnl == approx(2.0) and snap.net_pnl > target
    # closing: fees 1 * 50005 * 5 bps + 10 * 3001 * 5 bps = 25.0025 + 15.005 = 40.0075
    assert snap.est_close_fees == approx(40.0075)
    # slippage: (50010 - 50005) * 1 + (3001 - 3000.8) * 10 = 5 + 2 = 7
    assert snap.est_slippage == approx(7.0)
    # net after close = 2.0 - 40.0075 * 1.1 - 7 = -49.00825: no take profit
    assert snap.net_after_close == approx(-49.00825)
    assert snap.net_after_close < target


def test_totals_are_the_snapshot_sums() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, fee=2.5))
    book.apply_fill(fill(BTC_PERP, "sell", 0.3, 50_100, fee=1.5, funding_mark=0.2))
    for i in range(1_000):
        book.apply_tick(tick(BTC_FUTURE, 50_000 + i * 0.37, best_bid=49_990 + i * 0.37, ts=1_000 + i))
        perp_mark = 50_100 - i * 0.11
        book.apply_tick(
            tick(BTC_PERP, perp_mark, asks=[(perp_mark + 10, 0.1)], funding_mark=0.2 + i / 1e4, ts=1_000 + i)
        )
    snap = book.snapshot(1, 2_000, 10)
    totals = book.totals()
    for field in ("realized_pnl", "unrealized_pnl", "funding_pnl", "fees_paid", "est_close_fees",
                  "est_slippage", "gross_pnl", "net_pnl", "net_after_close"):
        assert getattr(totals, field) == approx(getattr(snap, field), rel=1e-12, abs=1e-9)


def test_stale_instruments_and_oldest_position() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, ts=100))
    book.apply_fill(fill(ETH_FUTURE, "buy", 1, 3_000, ts=200))
    book.apply_fill(fill(BTC_CALL, "buy", 1, 3_000, ts=300))
    book.apply_tick(tick(BTC_FUTURE, 50_000, ts=1_000))
    book.apply_tick(tick(ETH_FUTURE, 3_000, ts=1_008))
    snap = book.snapshot(1, now=1_015, stale_after_seconds=10)
    # BTC future ticked 15 s ago; the call never ticked (valued at its entry, flagged)
    assert snap.stale_instruments == sorted([BTC_FUTURE, BTC_CALL])
    assert snap.oldest_position_ts == 100
    assert snap.last_input_ts == 1_008


def test_an_older_tick_is_ignored() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000))
    assert book.apply_tick(tick(BTC_FUTURE, 50_100, ts=10))
    assert not book.apply_tick(tick(BTC_FUTURE, 49_000, ts=9))
    assert book.totals().unrealized_pnl == approx(100)


def test_a_position_beyond_the_carried_depth_is_listed() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 3, 50_000))
    book.apply_tick(tick(BTC_FUTURE, 50_100, bids=[(50_090, 1), (50_080, 1)]))
    row = only(book.snapshot(1, 1000, 10).positions, BTC_FUTURE)
    # 1 @ 50090 + 1 @ 50080 + 1 more at the worst carried level 50080 = 150250 -> 50083.33
    assert row.exit_price == approx(150_250 / 3)
    assert row.exit_price_source is ExitPriceSource.BOOK
    assert book.beyond_depth() == [BTC_FUTURE]
    assert row.exit_within_depth is False  # the executor must size this close from a fresh book
    book.apply_tick(tick(BTC_FUTURE, 50_100, bids=[(50_090, 5)], ts=1_001))
    assert book.beyond_depth() == []
    assert only(book.snapshot(2, 1001, 10).positions, BTC_FUTURE).exit_within_depth is True
    book.apply_tick(tick(BTC_FUTURE, 50_100, best_bid=50_090, ts=1_002))  # top of book: depth unknown
    assert only(book.snapshot(3, 1002, 10).positions, BTC_FUTURE).exit_within_depth is False


def test_empty_book_side_is_valued_at_mark_and_flagged() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000))
    book.apply_tick(tick(BTC_FUTURE, 50_100, bids=[], best_ask=50_200, asks=[(50_200, 1)]))
    row = only(book.snapshot(1, 1000, 10).positions, BTC_FUTURE)
    assert row.exit_price_source is ExitPriceSource.MARK
    assert row.exit_price == 50_100
    assert row.est_slippage == 0


# ---------------------------------------------------------------------- epochs


def test_after_a_completed_closure_a_flat_book_shows_nothing() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000, fee=2.5, ts=1))
    book.apply_fill(fill(BTC_FUTURE, "sell", 1, 50_010, fee=2.5, ts=2))
    before = book.snapshot(1, 3, 10)
    assert before.realized_pnl == approx(10) and before.fees_paid == approx(5)
    assert book.advance_epoch(now=4, completed_epoch=0)
    snap = book.snapshot(2, 5, 10)
    # the seed bug: take profit firing again on a flat book. Now every figure is 0.
    assert snap.epoch == 1
    assert snap.positions == []
    for field in ("realized_pnl", "unrealized_pnl", "funding_pnl", "fees_paid", "est_close_fees",
                  "est_slippage", "gross_pnl", "net_pnl", "net_after_close"):
        assert getattr(snap, field) == 0
    assert book.totals().net_after_close == 0
    # a second `completed` for epoch 0 must not advance again
    assert not book.advance_epoch(now=6, completed_epoch=0)
    assert book.epoch == 1


def test_dust_is_carried_into_the_new_epoch_at_mark() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, fee=2.5, funding_mark=0.1, ts=1))
    book.apply_fill(fill(BTC_PERP, "sell", 0.999, 50_500, fee=2.5, funding_mark=0.2, ts=2))
    book.apply_tick(tick(BTC_PERP, 50_400, best_bid=50_390, funding_mark=0.3, ts=3))
    book.advance_epoch(now=4)
    snap = book.snapshot(2, 5, 10)
    row = only(snap.positions, BTC_PERP)
    assert row.position == approx(0.001)
    assert row.avg_entry == 50_400  # re-based at mark
    assert row.realized_pnl == row.unrealized_pnl == row.funding_pnl == row.fees_paid == 0
    assert row.opened_ts == 1  # its age is real
    assert snap.gross_pnl == 0
    # what remains is the cost of getting out of the dust
    # fee 0.001 * 50390 * 5 bps = 0.025195; slippage (50400 - 50390) * 0.001 = 0.01
    assert snap.net_after_close == approx(-0.025195 * 1.1 - 0.01)
    book.apply_tick(tick(BTC_PERP, 50_500, funding_mark=0.4, ts=6))
    # the new epoch counts from the mark: (50500 - 50400) * 0.001 = 0.1; funding (0.4 - 0.3) * 0.001
    assert book.totals().gross_pnl == approx(0.1 + 0.0001)


def test_seed_from_exchange_entry_and_mark_at_start() -> None:
    report = positions(
        500,
        exchange_position(BTC_PERP, 0.5, 48_000, 50_000, perpetual_funding_entry_value=0.02,
                          unrealised_perpetual_funding=0.01),
        exchange_position(ETH_FUTURE, -2, 3_100, 3_000),
    )
    by_entry = ledger()
    by_entry.seed_from_exchange(report, "entry", now=600)
    snap = by_entry.snapshot(1, 600, 1_000)
    assert only(snap.positions, BTC_PERP).unrealized_pnl == approx(1_000)  # (50000 - 48000) * 0.5
    assert only(snap.positions, ETH_FUTURE).unrealized_pnl == approx(200)  # (3000 - 3100) * -2
    assert snap.oldest_position_ts == 600
    by_entry.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.06, ts=601))
    # Thalex: 0.06 * 0.5 - 0.02 = 0.01 (what the exchange reported as unrealised funding)
    assert only(by_entry.snapshot(2, 601, 10).positions, BTC_PERP).funding_pnl == approx(0.01)

    by_mark = ledger()
    by_mark.seed_from_exchange(report, "mark_at_start", now=600)
    by_mark.apply_tick(tick(BTC_PERP, 50_000, funding_mark=0.06, ts=601))
    assert by_mark.totals().gross_pnl == approx(0)
    # fills the report already contains are refused; later ones count
    assert by_mark.apply_fill(fill(BTC_PERP, "buy", 0.1, 50_000, ts=499)) is FillOutcome.BEFORE_HORIZON
    assert by_mark.apply_fill(fill(BTC_PERP, "buy", 0.1, 50_000, ts=501)) is FillOutcome.APPLIED
    assert by_mark.position(BTC_PERP) == approx(0.6)


def test_a_seeded_position_the_exchange_reported_without_a_mark_is_valued_from_its_average_until_it_ticks(
) -> None:
    """api.yaml requires no `mark_price`: `mark_at_start` starts such a line from its `average_price`
    (the only price the exchange gave), and it has no price (stale) until its first tick."""
    report = positions(500, exchange_position(BTC_PERP, 0.5, 48_000, 50_000),
                       exchange_position(ETH_FUTURE, -2, 3_100, None))
    book = ledger()
    book.seed_from_exchange(report, "mark_at_start", now=600)
    assert book.position(ETH_FUTURE) == -2
    snap = book.snapshot(1, 600, 1_000)
    assert only(snap.positions, ETH_FUTURE).unrealized_pnl == 0
    assert ETH_FUTURE in snap.stale_instruments
    book.apply_tick(tick(ETH_FUTURE, 3_000, ts=601))
    assert only(book.snapshot(2, 601, 10).positions, ETH_FUTURE).unrealized_pnl == approx(200)


# -------------------------------------------------------------- reconciliation


def test_a_close_the_exchange_reports_without_a_mark_is_realised_at_the_ledgers_mark() -> None:
    book = ledger(drift_grace_seconds=0.0)
    book.apply_fill(fill(BTC_FUTURE, "buy", 2, 50_000))
    book.apply_tick(tick(BTC_FUTURE, 50_100))
    (drift,) = book.reconcile(positions(2_000, exchange_position(BTC_FUTURE, 0.5, 50_000, None)), now=2_000)
    assert (drift.ledger_position, drift.exchange_position) == (2, 0.5)
    assert book.totals().realized_pnl == approx(150)  # (50100 - 50000) * 1.5


def test_a_position_the_ledger_lacks_is_adopted_after_the_grace_period_then_healed() -> None:
    book = ledger(drift_grace_seconds=5.0)
    report = positions(100, exchange_position(BTC_FUTURE, 1.0, 50_000, 50_200))
    assert book.reconcile(report, now=100) == []  # first seen: a fill may be in flight
    assert book.reconcile(report, now=103) == []
    assert book.snapshot(1, 103, 10).drift == []
    drift = book.reconcile(report, now=105)
    assert drift == [Drift(instrument=BTC_FUTURE, ledger_position=0.0, exchange_position=1.0, since=100)]
    # adopted: the exchange's position and average price
    assert book.position(BTC_FUTURE) == 1.0
    snap = book.snapshot(2, 105, 10)
    assert snap.drift == drift
    row = only(snap.positions, BTC_FUTURE)
    assert row.avg_entry == 50_000 and row.opened_ts == 105
    # listed until a report agrees
    assert book.reconcile(positions(110, exchange_position(BTC_FUTURE, 1.0, 50_000, 50_200)), now=110) == []
    assert book.snapshot(3, 110, 10).drift == []


def test_a_position_the_exchange_no_longer_has_is_realised_at_its_mark() -> None:
    book = ledger(drift_grace_seconds=0.0)
    book.apply_fill(fill(BTC_FUTURE, "buy", 2, 50_000))
    book.apply_tick(tick(BTC_FUTURE, 50_100))
    report = positions(2_000, exchange_position(BTC_FUTURE, 0.5, 50_000, 50_300))
    (drift,) = book.reconcile(report, now=2_000)
    assert (drift.ledger_position, drift.exchange_position) == (2, 0.5)
    # the missing 1.5 is realised at the exchange's mark: (50300 - 50000) * 1.5 = 450
    assert book.totals().realized_pnl == approx(450)
    assert book.position(BTC_FUTURE) == 0.5
    book.reconcile(positions(2_001), now=2_001)  # the exchange now says flat: adopted at once
    assert book.position(BTC_FUTURE) == 0
    assert book.totals().realized_pnl == approx(450 + 50)  # (50100 - 50000) * 0.5 at our mark


def test_drift_within_half_a_volume_tick_or_healed_within_grace_is_not_listed() -> None:
    book = ledger(drift_grace_seconds=5.0)
    book.apply_fill(fill(BTC_FUTURE, "buy", 1.0, 50_000))
    assert book.reconcile(positions(1, exchange_position(BTC_FUTURE, 1.0004, 50_000, 50_000)), now=1) == []
    assert book.reconcile(positions(2, exchange_position(BTC_FUTURE, 1.1, 50_000, 50_000)), now=2) == []
    book.apply_fill(fill(BTC_FUTURE, "buy", 0.1, 50_000, ts=1_001))  # the fill that was in flight
    assert book.reconcile(positions(8, exchange_position(BTC_FUTURE, 1.1, 50_000, 50_000)), now=8) == []
    assert book.position(BTC_FUTURE) == approx(1.1)


# ----------------------------------------------------------- state, dedup


def test_state_round_trip_gives_identical_snapshots_and_remembers_trade_ids() -> None:
    book = ledger(drift_grace_seconds=0.0)
    first = fill(BTC_PERP, "buy", 0.7, 50_000, fee=1.7, funding_mark=0.01, ts=1)
    book.apply_fill(first)
    book.apply_fill(fill(BTC_CALL, "sell", 3, 1_234.5, fee=None, ts=2))
    book.apply_fill(fill("SOL-PERPETUAL", "buy", 10, 150.25, fee=0.3, ts=3))  # instrument unknown
    book.apply_tick(tick(BTC_PERP, 50_123.25, bids=[(50_120, 0.3), (50_110, 0.2)], funding_mark=0.015, ts=4))
    book.apply_tick(tick(BTC_CALL, 1_250, best_ask=1_260, index=101_000.5, ts=5))
    book.reconcile(positions(6, exchange_position(BTC_FUTURE, 0.2, 49_000, 49_500)), now=6)

    state = json.loads(json.dumps(book.to_state()))
    restored = Ledger.from_state(state, config(drift_grace_seconds=0.0))
    assert restored.snapshot(7, 10, 10) == book.snapshot(7, 10, 10)
    assert restored.to_state() == state
    assert restored.apply_fill(first) is FillOutcome.DUPLICATE
    for same in (book, restored):
        same.apply_fill(fill(BTC_PERP, "sell", 1, 50_200, fee=2, funding_mark=0.02, ts=8, trade_id="T-next"))
    assert restored.snapshot(8, 10, 10) == book.snapshot(8, 10, 10)


def test_duplicate_trade_id_is_ignored() -> None:
    book = ledger()
    once = fill(BTC_FUTURE, "buy", 1, 50_000, fee=2.5)
    assert book.apply_fill(once) is FillOutcome.APPLIED
    assert book.apply_fill(once) is FillOutcome.DUPLICATE
    assert book.position(BTC_FUTURE) == 1
    assert book.totals().fees_paid == 2.5


def test_dedup_memory_is_bounded_and_never_counts_twice() -> None:
    book = ledger(dedup_window=3)
    fills = [fill(BTC_FUTURE, "buy", 1, 100, ts=float(ts), trade_id=f"T{ts}") for ts in range(1, 6)]
    for f in fills:
        assert book.apply_fill(f) is FillOutcome.APPLIED
    state = book.to_state()
    assert [trade_id for trade_id, _ in state["seen"]] == ["T3", "T4", "T5"]
    assert state["horizon"] == 2.0  # newest exchange_ts forgotten
    assert book.apply_fill(fills[0]) is FillOutcome.BEFORE_HORIZON  # forgotten: refused, not re-counted
    assert book.apply_fill(fills[3]) is FillOutcome.DUPLICATE
    # newer than everything forgotten, so it cannot be a forgotten one
    late = fill(BTC_FUTURE, "buy", 1, 100, ts=2.5, trade_id="T-late")
    assert book.apply_fill(late) is FillOutcome.APPLIED
    assert book.position(BTC_FUTURE) == 6


def test_a_version_1_checkpoint_is_still_read() -> None:
    """Before issue 20 a position's state had 7 fields and there were no adoption lots."""
    book = ledger()
    book.apply_fill(fill(BTC_PERP, "buy", 1, 50_000, fee=2.5, funding_mark=0.1, ts=1))
    book.apply_tick(tick(BTC_PERP, 50_100, funding_mark=0.3, ts=2))
    state = json.loads(json.dumps(book.to_state()))
    old = state | {"version": 1, "positions": {n: p[:7] for n, p in state["positions"].items()}}
    del old["adopted_lots"]
    restored = Ledger.from_state(old, config())
    # the funding mark comes back from the latest tick: (0.3 - 0.1) * 1 = 0.2
    assert restored.snapshot(1, 2, 10) == book.snapshot(1, 2, 10)
    assert restored.totals().funding_pnl == approx(0.2)


def test_state_version_is_checked() -> None:
    state = ledger().to_state()
    state["version"] = 99
    with pytest.raises(ValueError, match="version"):
        Ledger.from_state(state, config())


# ------------------------------------------------------------------ calibration


def test_close_cost_check_compares_estimate_with_what_closing_cost() -> None:
    book = ledger()
    book.apply_fill(fill(BTC_FUTURE, "buy", 1, 50_000))
    book.apply_fill(fill(ETH_FUTURE, "sell", 10, 3_000))
    book.apply_tick(tick(BTC_FUTURE, 50_010, best_bid=50_005))
    book.apply_tick(tick(ETH_FUTURE, 3_000, best_ask=3_001))
    snap = book.snapshot(1, 1000, 10)
    estimated = estimated_close_cost(snap, 1.1)
    assert estimated == approx(snap.net_pnl - snap.net_after_close)
    check = check_close_cost(
        estimated,
        [
            # sold 1 at 50000 (10 under the decision mark), paid 25
            ClosedLeg(position=1, mark_at_decision=50_010, avg_price=50_000, fee=25.0),
            # bought back 10 at 3001.5 (1.5 over mark), paid 15.0075
            ClosedLeg(position=-10, mark_at_decision=3_000, avg_price=3_001.5, fee=15.0075),
        ],
    )
    assert check.actual == approx(25 + 10 + 15.0075 + 15)
    assert check.error == approx(check.actual - estimated)


def test_a_fill_arriving_after_its_position_was_adopted_is_not_counted_twice() -> None:
    """Seen in the demo: a fill reached the portfolio after the grace period, the exchange's
    position had been adopted, and the late fill moved the position a second time."""
    book = ledger(drift_grace_seconds=0.0)
    book.apply_tick(tick(BTC_PERP, 100_000))
    # the exchange reports a short 0.05 at t=1,000 that the ledger has not seen a fill for
    book.reconcile(positions(1_000, exchange_position(BTC_PERP, -0.05, 100_050, 100_000)), now=1_000)
    assert book.position(BTC_PERP) == approx(-0.05)
    # the fill behind it arrives late (trade time 999 <= report 1,000): its fee counts, its amount not again
    late = fill(BTC_PERP, "sell", 0.05, 100_050, fee=-0.5, ts=999)
    assert book.apply_fill(late) is FillOutcome.APPLIED
    assert book.position(BTC_PERP) == approx(-0.05)
    assert book.totals().fees_paid == approx(-0.5)
    # a later trade (after the adopted report) moves the position as usual
    book.apply_fill(fill(BTC_PERP, "buy", 0.05, 100_000, ts=1_001))
    assert book.position(BTC_PERP) == approx(0.0)
    restored = Ledger.from_state(book.to_state(), book._config)
    assert restored.to_state() == book.to_state()
