"""The executor's wave logic, pure: planning, settling, verifying — by hand and as properties.

The properties run whole closures through the pure core (`sort_legs` → `plan_wave` →
`settle_wave` → `next_step` → `verify_flat`) against a simulated book: every order fills what the
book shows at its limit (what `plan.hedge_wave` assumes), reduce-only, the book refilled between
waves. Checked after every wave, on legs of one underlying (perpetuals, futures and options of
either sign, long and short):

* no order ever grows a position or takes it through zero;
* the net delta still to close on the underlying (for a full closure: the positions' net delta)
  stays within its hedge bound (its value at the decision, at least one minimum order's delta)
  at every wave boundary — or, when it already was outside, does not move further out;
* on a book that can absorb the position, the closure converges to flat and verifies `completed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.contracts import (
    CloseReason,
    Command,
    ExchangeError,
    InstrumentInfo,
    InstrumentType,
    Legs,
    PositionToClose,
    ReportStatus,
    Side,
)
from services.common.thalex.models import ThalexOrderFill, ThalexOrderStatus, ThalexTrade
from services.executor.plan import (
    EPS,
    CommandWave,
    LegFill,
    LegState,
    Progress,
    Stage,
    book_depth,
    close_side,
    order_amount,
)
from services.executor.settle import (
    BACKOFF_START,
    RETRY_PAUSE,
    Outcome,
    Step,
    Verdict,
    count_trades,
    fail,
    next_step,
    settle_wave,
    verify_flat,
)
from services.executor.waves import (
    Buffers,
    DecisionWave,
    Order,
    Quote,
    expand_claim,
    not_fresh_full,
    plan_decision_wave,
    plan_wave,
    sort_legs,
    wave_from_command,
    wave_refusal,
    wave_sent,
)

BUFFERS = Buffers(0.005, 0.05)


def decision_wave(cmd: Command, infos: dict[str, InstrumentInfo], buffers: Buffers, now: float,
                  max_age: float) -> list[Order] | None:
    """The first wave as the executor plans it (checked on bounds, then priced); None: the usual path."""
    if wave_refusal(cmd, infos, buffers, now, max_age) is not None:
        return None
    return DecisionWave(cmd, infos, buffers, now).orders()
TICK, LOT = 0.1, 0.01
MARK = 100.0
NOW = 1_000.0


def spec(kind: InstrumentType = InstrumentType.PERPETUAL, lot: float = LOT,
         minimum: float = LOT) -> InstrumentInfo:
    return InstrumentInfo(type=kind, product="FBTCUSD", underlying="BTCUSD", tick_size=TICK,
                          volume_tick_size=lot, min_order_amount=minimum)


def command(positions: dict[str, float], fraction: float = 1.0, marks: dict[str, float] | None = None,
            created: float = NOW) -> Command:
    return Command(command_id="c1", epoch=1, reason=CloseReason.TAKE_PROFIT, fraction=fraction,
                   legs=Legs.of(PositionToClose(instrument=k, amount=v, exit_price=(marks or {}).get(k),
                                                mark=(marks or {}).get(k)) for k, v in positions.items()),
                   snapshot_seq=1, net_pnl=1.0, threshold=1.0, created_ts=created, deadline_ts=created + 30)


def progress_of(positions: dict[str, float], fraction: float = 1.0) -> Progress:
    listed = {k: round(v * fraction, 2) for k, v in positions.items()}
    progress = Progress.start(command(listed, fraction), NOW, BUFFERS.base, 30.0)
    progress.to(Stage.CLOSING)
    return progress


@dataclass
class Book:
    """One instrument's simulated book: `levels` a side, `depth` each, a tick apart, refilled each wave."""

    depth: float
    levels: int = 3

    def side(self, buying: bool) -> list[list[float]]:
        step = TICK if buying else -TICK
        first = MARK + step / 2
        return [[round(first + step * n, 6), self.depth] for n in range(self.levels)]

    def quote(self, delta: float) -> Quote:
        bids, asks = self.side(False), self.side(True)
        return Quote(mark=MARK, best_bid=bids[0][0], best_ask=asks[0][0], delta=delta, bids=bids, asks=asks)

    def fill(self, order: Order, position: float) -> float:
        """What an IOC reduce-only order fills: the book at its limit, never past the position."""
        levels = self.side(order.side is Side.BUY)
        return max(0.0, min(order.amount, book_depth(levels, order.side, order.price), abs(position)))


def exposure(progress: Progress, positions: dict[str, float], deltas: dict[str, float]) -> float:
    """The net delta still to close (a full closure: the positions' net delta)."""
    return sum(leg.remaining(positions[n], progress.full) * deltas[n] for n, leg in progress.legs.items())


def run_wave(progress: Progress, positions: dict[str, float], deltas: dict[str, float],
             books: dict[str, Book], infos: dict[str, InstrumentInfo], trade_no: list[int]) -> list[Order]:
    """One wave through the pure core; applies the fills to `positions`; returns the orders sent."""
    remaining, _ = sort_legs(progress, positions, infos, NOW)
    if not remaining:
        return []
    quotes = {n: books[n].quote(deltas[n]) for n in remaining}
    orders = plan_wave(progress, remaining, positions, quotes, infos)
    wave_sent(progress, orders, NOW)
    outcomes = []
    for order in orders:
        filled = books[order.instrument].fill(order, positions[order.instrument])
        filled = math.floor(filled / LOT + 1e-9) * LOT
        trade_no[0] += 1
        trade_id, order_id = f"t{trade_no[0]}", f"o{trade_no[0]}"
        fills = [ThalexOrderFill(trade_id=trade_id, price=order.price, amount=filled)] if filled else []
        answer = ThalexOrderStatus(order_id=order_id, filled_amount=filled, fills=fills)
        outcomes.append(Outcome(order, answer))
        positions[order.instrument] -= math.copysign(filled, positions[order.instrument])
        positions[order.instrument] = round(positions[order.instrument], 9)
    settle_wave(progress, outcomes, {}, BUFFERS, NOW)
    return orders


# Strategies: legs of one underlying, each a perpetual/future (delta 1) or an option (delta of either sign)

LOTS = st.integers(min_value=1, max_value=300).map(lambda n: n * LOT)
LEG = st.tuples(LOTS, st.booleans(),
                st.one_of(st.just(1.0), st.floats(0.1, 0.9), st.floats(-0.9, -0.1)),
                st.integers(min_value=1, max_value=200).map(lambda n: n * LOT))
"""(size, long?, delta, book depth per level per wave)"""


Scenario = tuple[dict[str, float], dict[str, float], dict[str, Book], dict[str, InstrumentInfo]]
"""Positions, deltas, books and instrument data by instrument."""


def scenario(legs: list[tuple[float, bool, float, float]]) -> Scenario:
    positions, deltas, books, infos = {}, {}, {}, {}
    for n, (size, long, delta, depth) in enumerate(legs):
        name = f"BTC-L{n}"
        positions[name] = size if long else -size
        deltas[name] = delta
        books[name] = Book(depth)
        infos[name] = spec(InstrumentType.PERPETUAL if delta == 1.0 else InstrumentType.OPTION)
    return positions, deltas, books, infos


@settings(max_examples=200, deadline=None)
@given(legs=st.lists(LEG, min_size=1, max_size=4), fraction=st.sampled_from([1.0, 0.5]))
def test_waves_never_grow_or_flip_a_position_and_keep_the_hedge_bound(
        legs: list[tuple[float, bool, float, float]], fraction: float) -> None:
    positions, deltas, books, infos = scenario(legs)
    progress = progress_of(positions, fraction)
    trade_no = [0]
    for _ in range(60):
        before = dict(positions)
        exposure_before = exposure(progress, positions, deltas)
        orders = run_wave(progress, positions, deltas, books, infos, trade_no)
        for order in orders:
            held = before[order.instrument]
            assert order.side is close_side(held), (order, held)  # never grows a position
            assert order.amount <= abs(held) + EPS  # never takes it through zero
        for name, held in positions.items():
            assert abs(held) <= abs(before[name]) + EPS and held * before[name] >= 0
        if "BTCUSD" in progress.hedge_bounds:
            quantum = max(infos[n].min_order_amount * abs(deltas[n]) for n in positions)
            bound = max(progress.hedge_bounds["BTCUSD"], quantum)
            assert abs(exposure(progress, positions, deltas)) <= max(bound, abs(exposure_before)) + 1e-9
        if not orders and not progress.open_legs():
            break
    listed = {leg.instrument: abs(leg.listed) for leg in progress.legs.values()}
    for name, held in positions.items():  # a partial closure never closes more than it lists
        assert abs(scenario(legs)[0][name]) - abs(held) <= listed[name] + EPS


@settings(max_examples=150, deadline=None)
@given(legs=st.lists(LEG, min_size=1, max_size=4))
def test_waves_converge_to_flat_and_verify_completed_on_a_book_that_absorbs_the_position(
        legs: list[tuple[float, bool, float, float]]) -> None:
    positions, deltas, books, infos = scenario(legs)
    for name, book in books.items():  # one wave's book can absorb the whole leg
        book.depth = max(book.depth, abs(positions[name]))
    progress = progress_of(positions)
    trade_no = [0]
    for _ in range(len(legs) * 4 + 4):
        run_wave(progress, positions, deltas, books, infos, trade_no)
        if next_step(progress, NOW) is Step.VERIFY:
            break
    else:
        pytest.fail(f"not converged: {positions}")
    verdict, reopened, reports = verify_flat(progress, positions, infos, NOW)
    assert verdict is Verdict.COMPLETED and not reopened, positions
    assert all(abs(p) < LOT for p in positions.values())
    assert reports[-1].status is ReportStatus.COMPLETED


@settings(max_examples=100, deadline=None)
@given(legs=st.lists(LEG, min_size=1, max_size=4))
def test_waves_converge_on_thin_books_too(legs: list[tuple[float, bool, float, float]]) -> None:
    """Books that take a fraction of the position per wave (refilled): flat within the waves needed."""
    positions, deltas, books, infos = scenario(legs)
    progress = progress_of(positions)
    waves_needed = max(math.ceil(abs(positions[n]) / (books[n].depth * books[n].levels)) for n in positions)
    trade_no = [0]
    for _ in range(4 * len(legs) * waves_needed + 8):
        run_wave(progress, positions, deltas, books, infos, trade_no)
        if next_step(progress, NOW) is Step.VERIFY:
            break
    else:
        pytest.fail(f"not converged: {positions}")
    assert verify_flat(progress, positions, infos, NOW)[0] is Verdict.COMPLETED


# By hand


def test_a_thin_book_fills_part_the_remainder_waits_a_pause_and_a_wider_buffer() -> None:
    progress = progress_of({"PERP": 0.35})
    order = Order("PERP", Side.SELL, 0.35, 99.6)
    fill = ThalexOrderFill(trade_id="t1", price=99.9, amount=0.1)
    answer = ThalexOrderStatus(order_id="o1", filled_amount=0.1, fills=[fill])
    settled = settle_wave(progress, [Outcome(order, answer)], {"t1": 0.005}, BUFFERS, NOW)
    (report,) = settled.reports
    assert (report.status, report.filled, report.fee) == (ReportStatus.PARTIALLY_FILLED, 0.1, 0.005)
    assert report.avg_price == pytest.approx(99.9)
    assert settled.pause == RETRY_PAUSE and settled.filled_orders == 1
    assert progress.legs["PERP"].buffer == pytest.approx(0.01)  # 0.005 + one step of 0.005
    assert progress.legs["PERP"].closed == 0.1


def test_what_each_refusal_means() -> None:
    progress = progress_of({"A": 1.0, "B": 1.0, "C": 1.0, "D": 1.0})
    progress.legs["A"].orders_sent = 2

    def refused(name: str, code: int) -> Outcome:
        return Outcome(Order(name, Side.SELL, 1.0, 99.0), error=ExchangeError(code=code, message=f"e{code}"))

    settled = settle_wave(progress, [refused("A", 4), refused("B", 41), refused("C", 37), refused("D", 24)],
                          {}, BUFFERS, NOW)
    # throttled: back off 50 ms x 2^(orders sent = 2) = 200 ms, buffer unchanged
    assert settled.pause == pytest.approx(BACKOFF_START * 4) and progress.legs["A"].buffer == BUFFERS.base
    assert settled.retries == ["throttle", "widen"]
    assert progress.legs["B"].buffer == pytest.approx(0.01)  # no liquidity: widened
    assert progress.legs["C"].error is not None and progress.legs["C"].state is LegState.OPEN  # re-read
    assert progress.legs["D"].state is LegState.STOPPED  # anything else: the leg stops, reported
    (report,) = settled.reports
    assert report.instrument == "D" and report.error is not None and report.error.code == 24


def test_a_reduce_only_rejection_closes_the_leg_when_flat_and_stops_it_when_not() -> None:
    infos = {"A": spec(), "B": spec()}
    progress = progress_of({"A": 1.0, "B": 1.0})
    for leg in progress.legs.values():
        leg.error = ExchangeError(code=37, message="invalid state")
    remaining, _ = sort_legs(progress, {"A": 0.0, "B": 1.0}, infos, NOW)
    assert remaining == {}
    assert progress.legs["A"].state is LegState.CLOSED and progress.legs["B"].state is LegState.STOPPED


def test_the_last_lot_of_a_partial_closure_is_sent_despite_float_sums() -> None:
    """Found by the hedge property: 0.66 listed, 0.06 x 10 + 0.05 filled sums to 0.6500000000000001,
    so 0.009999999999999898 was left, floored to 0 lots and reported as dust: one lot never closed."""
    progress = progress_of({"A": -1.32}, 0.5)
    leg = progress.legs["A"]
    leg.position_before = -1.32
    for n, amount in enumerate([0.06] * 10 + [0.05]):
        progress.record_fill("A", f"t{n}", LegFill(order_id="o1", price=100.0, amount=amount))
    remaining, reports = sort_legs(progress, {"A": -0.67}, {"A": spec()}, NOW)
    assert remaining == {"A": pytest.approx(-0.01)} and reports == []
    assert order_amount(remaining["A"], -0.67, spec()) == 0.01


def test_dust_below_the_minimum_order_is_reported_once_not_looped_on() -> None:
    progress = progress_of({"A": 1.0})
    remaining, reports = sort_legs(progress, {"A": 0.004}, {"A": spec(minimum=0.01, lot=0.001)}, NOW)
    assert remaining == {} and progress.legs["A"].state is LegState.DUST
    (report,) = reports
    assert report.error is not None and report.error.code == 14
    assert "below min_order_amount" in report.error.message


def test_a_closure_that_leaves_dust_completes_and_names_it() -> None:
    """The dust loop's first step: 0.1005 closed by a 0.1 fill leaves 0.0005 (minimum order 0.001), and
    B, off the tick (an RFQ fill), keeps 0.0004 of a 0.001 tick. Nothing can be sent for either: the
    closure is complete, and its `completed` says what it left."""
    infos = {"A": spec(lot=0.0001, minimum=0.001), "B": spec(lot=0.001, minimum=0.001), "C": spec()}
    progress = progress_of({"A": 0.1005, "B": 0.2004, "C": 0.3})
    positions = {"A": 0.0005, "B": 0.0004, "C": 0.0}
    remaining, reports = sort_legs(progress, positions, infos, NOW)
    assert remaining == {} and [r.instrument for r in reports] == ["A"]
    assert (progress.legs["A"].state, progress.legs["B"].state) == (LegState.DUST, LegState.CLOSED)
    assert next_step(progress, NOW) is Step.VERIFY
    verdict, _, (report,) = verify_flat(progress, positions, infos, NOW)
    assert verdict is Verdict.COMPLETED and report.status is ReportStatus.COMPLETED
    assert report.error == ExchangeError(code=14, message=(
        "completed; left open as dust, below what an order may close: A 0.0005 (minimum order 0.001, "
        "volume tick 0.0001); B 0.0004 (minimum order 0.001, volume tick 0.001)"))


def test_a_flat_closure_completes_without_an_error() -> None:
    progress = progress_of({"A": 0.5})
    progress.legs["A"].state = LegState.CLOSED
    progress.to(Stage.VERIFYING)
    verdict, _, (report,) = verify_flat(progress, {"A": 0.0}, {"A": spec()}, NOW)
    assert verdict is Verdict.COMPLETED and report.error is None


def test_verify_reopens_a_leg_that_is_not_flat_while_time_is_left_then_fails() -> None:
    infos = {"A": spec()}
    progress = progress_of({"A": 1.0})
    progress.legs["A"].state = LegState.CLOSED
    progress.to(Stage.VERIFYING)
    verdict, reopened, reports = verify_flat(progress, {"A": 0.3}, infos, NOW)
    assert (verdict, reopened, reports) == (Verdict.CLOSE_AGAIN, ["A"], [])
    assert progress.stage is Stage.CLOSING
    progress.legs["A"].state = LegState.CLOSED
    progress.to(Stage.VERIFYING)
    verdict, _, reports = verify_flat(progress, {"A": 0.3}, infos, progress.deadline_ts)
    assert verdict is Verdict.FAILED and reports[-1].status is ReportStatus.FAILED


def test_failing_names_every_leg_left_and_needs_no_instrument_data() -> None:
    progress = progress_of({"A": 0.5, "B": -0.2, "C": 0.1})
    progress.legs["C"].state = LegState.DUST
    progress.error = ExchangeError(code=19, message="the exchange refused the login of key id 'k'")
    (report,) = fail(progress, {}, {}, NOW)
    assert report.status is ReportStatus.FAILED and report.error is not None and report.error.code == 19
    assert report.error.message == ("A: 0.5 left (19 the exchange refused the login of key id 'k'); "
                                    "B: 0.2 left (19 the exchange refused the login of key id 'k')")
    assert progress.stage is Stage.FAILED


def test_no_liquidity_before_the_deadline_is_error_41_per_leg() -> None:
    progress = progress_of({"A": 0.5})
    (report,) = fail(progress, {"A": 0.5}, {"A": spec()}, NOW)
    assert report.error == ExchangeError(code=41, message=(
        "A: 0.5 left (41 no liquidity within the price buffer before the deadline)"))


def test_trades_found_by_label_are_counted_once_per_trade_and_reported_per_order() -> None:
    progress = progress_of({"A": 1.0})

    def trade(trade_id: str, order_id: str, amount: float, label: str | None = None) -> ThalexTrade:
        return ThalexTrade(trade_id=trade_id, order_id=order_id, instrument_name="A", direction="sell",
                           price=100.0, amount=amount, time=NOW, fee=0.01, label=label or progress.label)

    reports = count_trades(progress, [trade("t1", "o1", 0.3), trade("t2", "o1", 0.2),
                                      trade("t3", "o2", 0.5, label="someone-else")], NOW)
    (report,) = reports
    assert (report.order_id, report.filled, report.fee) == ("o1", 0.5, 0.02)
    assert count_trades(progress, [trade("t1", "o1", 0.3)], NOW) == []  # seen before: counted once


def test_the_first_wave_is_priced_from_the_command_only_when_it_may_be() -> None:
    infos = {"A": spec(), "B": spec()}
    fresh = command({"A": 0.5}, marks={"A": 100.0})
    (order,) = decision_wave(fresh, infos, BUFFERS, NOW + 0.5, 1.0) or []
    # a sell 0.5 % through the exit price 100.0: 99.5, on the 0.1 tick
    assert (order.side, order.amount, order.price) == (Side.SELL, 0.5, 99.5)
    assert decision_wave(fresh, infos, BUFFERS, NOW + 1.5, 1.0) is None  # too old
    partial = command({"A": 0.5}, fraction=0.5, marks={"A": 100.0})
    assert decision_wave(partial, infos, BUFFERS, NOW, 1.0) is None
    assert decision_wave(command({"A": 0.5}), infos, BUFFERS, NOW, 1.0) is None  # no prices
    hedged = command({"A": 0.5, "B": -0.5}, marks={"A": 100.0, "B": 100.0})
    assert decision_wave(hedged, infos, BUFFERS, NOW, 1.0) is None  # one underlying, depth unknown: read it


def within_depth(cmd: Command, *instruments: str) -> Command:
    return cmd.model_copy(update={"legs": Legs.of(
        p._replace(exit_within_depth=p.instrument in instruments) for p in cmd.closing().rows())})


def first_leg(cmd: Command, **changes: float) -> Command:
    """`cmd` with its only leg changed."""
    (leg,) = cmd.closing().rows()
    return cmd.model_copy(update={"legs": Legs.of([leg._replace(**changes)])})


def test_a_hedged_first_wave_is_priced_from_the_command_when_the_book_held_every_leg_whole() -> None:
    """An options book: every leg on one underlying. When the decision's book held each leg whole at
    its exit price, the whole book goes in the first wave (if every order fills what that book showed,
    the underlying is flat after it: net delta 0, within any hedge bound); one leg beyond the book's
    depth (or not known) sends the whole underlying down the usual path, sized from a fresh read."""
    infos = {"A": spec(), "B": spec(), "C": spec().model_copy(update={"underlying": "ETHUSD"})}
    book = command({"A": 0.5, "B": -0.3, "C": 0.2}, marks={"A": 100.0, "B": 100.0, "C": 100.0})
    orders = decision_wave(within_depth(book, "A", "B", "C"), infos, BUFFERS, NOW, 1.0) or []
    # A: sell 0.5 at 100 x (1 - 0.005) = 99.5; B: buy 0.3 at 100 x 1.005 = 100.5; C alone on ETHUSD
    assert [(o.instrument, o.side, o.amount, o.price) for o in orders] == [
        ("A", Side.SELL, 0.5, 99.5), ("B", Side.BUY, 0.3, 100.5), ("C", Side.SELL, 0.2, 99.5)]
    # B's size was beyond the carried depth: A and B go the usual way, and so does the rest
    assert decision_wave(within_depth(book, "A", "C"), infos, BUFFERS, NOW, 1.0) is None
    # C is alone on its underlying: its own depth does not matter (no hedge to keep)
    assert decision_wave(within_depth(book, "A", "B"), infos, BUFFERS, NOW, 1.0) is not None
    far = command({"A": 0.5}, marks={"A": 100.0})
    far = first_leg(far, mark=120.0)
    assert decision_wave(far, infos, BUFFERS, NOW, 1.0) is None  # 99.5 is 17 % from 120: past the ceiling


def test_why_a_first_wave_is_not_priced_from_the_command_names_the_leg() -> None:
    """The executor logs the reason when it takes the usual path (slower to the first order)."""
    infos = {"A": spec(), "B": spec()}
    fresh = command({"A": 0.5}, marks={"A": 100.0})
    assert wave_from_command(fresh, infos, BUFFERS, NOW + 1.5, 1.0) == "decided 1.500 s ago (over 1 s)"
    partial = command({"A": 0.5}, fraction=0.5, marks={"A": 100.0})
    assert wave_from_command(partial, infos, BUFFERS, NOW, 1.0) == "a partial closure (0.5)"
    assert wave_from_command(command({"A": 0.5}), infos, BUFFERS, NOW, 1.0) == \
        "A has no exit price and mark in the command (stale at the decision)"
    hedged = command({"A": 0.5, "B": -0.5}, marks={"A": 100.0, "B": 100.0})
    assert wave_from_command(within_depth(hedged, "A"), infos, BUFFERS, NOW, 1.0) == \
        "B is hedged and the decision's book did not hold it whole (exit_within_depth)"
    far = first_leg(fresh, mark=120.0)
    # 100 x (1 - 0.005) = 99.5 is 20.5 from the mark 120, over 5 % of it (6.0)
    assert wave_from_command(far, infos, BUFFERS, NOW, 1.0) == \
        "A: a limit of 99.5 is over 5.0% from the mark 120"
    dust = command({"A": 0.004}, marks={"A": 100.0})  # under the 0.01 lot
    assert wave_from_command(dust, infos, BUFFERS, NOW, 1.0) == "A: 0.004 is below the minimum order"


def test_a_command_past_its_deadline_never_gets_its_first_wave_from_the_command() -> None:
    """Nor the clearing round sent with the claim: the executor does not act on it at all
    (`plan.too_late`), however fresh its decision."""
    infos = {"A": spec()}
    late = command({"A": 0.5}, marks={"A": 100.0}).model_copy(update={"deadline_ts": NOW + 0.5})
    assert decision_wave(late, infos, BUFFERS, NOW + 0.4, 1.0) is not None  # decided 0.4 s ago, in time
    assert decision_wave(late, infos, BUFFERS, NOW + 0.5, 1.0) is None
    assert not_fresh_full(late, NOW + 0.75, 1.0) == "its deadline passed 0.250 s ago"
    assert wave_from_command(late, infos, BUFFERS, NOW + 0.75, 1.0) == "its deadline passed 0.250 s ago"


def test_a_cheap_option_a_tick_under_its_mark_still_goes_in_the_first_wave() -> None:
    """Seen at 100 options on the paper: a put marked 44.2336 on a 5 USD tick, best bid 40 (the exit).
    40 x (1 - 0.005) = 39.8, up to the tick: 40, which is 4.2336 from the mark: over 5 % of it
    (2.2117) but within that plus one tick (7.2117), and the usual path would sell at 40 too."""
    option = spec(InstrumentType.OPTION).model_copy(update={"tick_size": 5.0})
    put = first_leg(command({"P": 0.5}), exit_price=40.0, mark=44.2336)
    (order,) = decision_wave(put, {"P": option}, BUFFERS, NOW, 1.0) or []
    assert (order.side, order.amount, order.price) == (Side.SELL, 0.5, 40.0)
    worse = first_leg(put, exit_price=35.0)
    # 35 x 0.995 = 34.825, up to 35: 9.2336 from the mark, over 7.2117: the usual path reads the book
    assert wave_from_command(worse, {"P": option}, BUFFERS, NOW, 1.0) == \
        "P: a limit of 35 is over 5.0% and a tick from the mark 44.2336"


def test_a_perpetual_marked_at_half_a_dollar_gets_no_tick_of_slack() -> None:
    """Issue 21's wild mark (BTC at 0.5, bids empty: the exit is the mark) on a 1 USD tick: a sell at
    0.5 x 0.995 = 0.4975, at least one tick: 1.0, which is 0.5 from the mark, over 5 % of it (0.025).
    An option would get a tick more (1.025); a perpetual none: this wave has no index bound, so the
    usual path (bounded by the index) reads the market instead."""
    perp = spec().model_copy(update={"tick_size": 1.0})
    wild = first_leg(command({"A": 0.5}), exit_price=0.5, mark=0.5)
    assert wave_from_command(wild, {"A": perp}, BUFFERS, NOW, 1.0) == \
        "A: a limit of 1 is over 5.0% from the mark 0.5"


legs_from_a_command = st.lists(st.tuples(
    st.sampled_from([InstrumentType.OPTION, InstrumentType.PERPETUAL, InstrumentType.FUTURE]),
    st.sampled_from([0.0005, 0.1, 1.0, 5.0]),  # tick
    st.sampled_from([(0.01, 0.01), (0.001, 0.01), (0.1, 0.1)]),  # volume tick, minimum order
    st.floats(0.0005, 3.0) | st.sampled_from([0.01, 0.02, 0.03, 0.1]),  # size: near the minimum too
    st.booleans(),  # long or short
    st.floats(0.01, 200_000.0),  # mark
    st.floats(-0.2, 0.2) | st.sampled_from([0.0, 0.045, 0.05, 0.055, -0.05]),  # exit price off the mark
), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(legs=legs_from_a_command, base=st.sampled_from([0.005, 0.01, 0.0]),
       ceiling=st.sampled_from([0.05, 0.02]))
def test_the_check_on_bounds_says_what_pricing_every_leg_says(
        legs: list[tuple[InstrumentType, float, tuple[float, float], float, bool, float, float]], base: float,
        ceiling: float) -> None:
    """`wave_refusal` passes a leg on bounds (its limit within the ceiling by more than a tick) and
    prices only the others: it must refuse exactly when `wave_from_command`, which prices every
    leg, does, with the same reason — whatever the ticks, sizes and prices (near the ceiling and the
    minimum order included)."""
    positions, infos = [], {}
    for n, (kind, tick, (lot, minimum), size, long, mark, off) in enumerate(legs):
        name = f"L{n}"
        infos[name] = InstrumentInfo(type=kind, product="P", underlying=f"U{n}", tick_size=tick,
                                     volume_tick_size=lot, min_order_amount=minimum)
        positions.append(PositionToClose(instrument=name, amount=size if long else -size,
                                         exit_price=max(tick, mark * (1 + off)), mark=mark))
    cmd = command({}).model_copy(update={"legs": Legs.of(positions)})
    buffers = Buffers(base, ceiling)
    priced = wave_from_command(cmd, infos, buffers, NOW, 1.0)
    assert wave_refusal(cmd, infos, buffers, NOW, 1.0) == (priced if isinstance(priced, str) else None)
    if isinstance(priced, list):
        wave = DecisionWave(cmd, infos, buffers, NOW)
        assert wave.orders() == priced and wave.head() == priced[0]


def test_an_amount_on_the_volume_tick_and_at_least_the_minimum_is_sent_whole() -> None:
    """`wave_refusal`'s bound on amounts, by hand (lot 0.01, minimum 0.01; lot 0.1 for the float sum):
    0.01 is one lot; 0.1 + 0.2 = 0.30000000000000004 is three lots of 0.1 within float noise; 0.0105
    is off the tick and 0.005 under the minimum — those two are priced exactly instead."""
    from services.executor.waves import _sent_whole
    assert _sent_whole(0.01, spec()) and _sent_whole(-0.01, spec())
    assert _sent_whole(0.1 + 0.2, spec(lot=0.1, minimum=0.1))
    assert not _sent_whole(0.0105, spec()) and not _sent_whole(0.005, spec())
    assert order_amount(0.1 + 0.2, 0.1 + 0.2, spec(lot=0.1, minimum=0.1)) == 0.3  # what is sent: 3 lots


def test_a_cancel_only_command_has_an_empty_first_wave() -> None:
    empty = DecisionWave(command({}), {}, BUFFERS, NOW)
    assert wave_refusal(command({}), {}, BUFFERS, NOW, 1.0) is None
    assert empty.head() is None and empty.orders() == []


def test_a_compact_claim_expands_to_what_the_full_claim_held_whatever_the_legs() -> None:
    """The claim on the way to a first wave priced from the command holds only the promise (when it
    was priced, at which buffers): the legs, `received` and each order's `order_sent` follow from the
    command — the same whether built as the first order leaves or priced again after a crash."""
    marks = {f"O{i}": 100.0 + i for i in range(1_000)}
    cmd = within_depth(command({name: 0.5 for name in marks}, marks=marks), *marks)  # one underlying
    infos = {name: spec(InstrumentType.OPTION) for name in marks}
    wave = wave_from_command(cmd, infos, BUFFERS, NOW + 0.2, 1.0)
    assert isinstance(wave, list) and len(wave) == 1_000
    # what the claim held before: the whole progress with the wave planned in it
    full = Progress.start(cmd, NOW + 0.3, BUFFERS.base, 30.0)
    full.outbox = [full.report(ReportStatus.RECEIVED, NOW + 0.3)]
    plan_decision_wave(full, wave, NOW + 0.3)  # the first order leaves once the claim is won

    promise = CommandWave(priced_ts=NOW + 0.2, buffer=BUFFERS.base, ceiling=BUFFERS.ceiling)
    claim = Progress.claimed(cmd, NOW + 0.3, 30.0, promise)
    assert len(claim.model_dump_json()) < 600 and len(full.model_dump_json()) > 190_000
    resumed = Progress.model_validate_json(claim.model_dump_json())  # as read back after a crash
    again = wave_from_command(cmd, infos, Buffers(promise.buffer, promise.ceiling), promise.priced_ts, 1.0)
    expand_claim(resumed, cmd, again)
    assert resumed == full
    statuses = [r.status for r in resumed.take_unpublished()]
    assert statuses == [ReportStatus.RECEIVED] + [ReportStatus.ORDER_SENT] * 1_000


def test_a_compact_claim_that_cannot_be_priced_again_counts_every_leg_as_sent() -> None:
    """The instrument data changed between the crash and the restart: no `order_sent` to publish, but
    every leg counts its order (the resumed command then counts what the orders did, by label)."""
    cmd = command({"A": 0.5, "B": -0.2}, marks={"A": 100.0, "B": 100.0})
    claim = Progress.claimed(cmd, NOW, 30.0, CommandWave(priced_ts=NOW, buffer=0.005, ceiling=0.05))
    expand_claim(claim, cmd, "A: 0.5 is below the minimum order")
    assert {n: (leg.listed, leg.position_before, leg.orders_sent) for n, leg in claim.legs.items()} == {
        "A": (0.5, 0.5, 1), "B": (-0.2, -0.2, 1)}
    assert [r.status for r in claim.take_unpublished()] == [ReportStatus.RECEIVED]
    assert claim.command_wave is None and claim.first_order_ts == NOW
