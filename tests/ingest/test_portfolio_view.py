"""The portfolio read line by line: one unreadable line costs only itself, and never makes a position flat.

Found by review: one option line without `mark_price` made ingest dead-letter the whole bootstrap
portfolio; the perpetual's next delta was then published as the whole portfolio, the short option
missing — flat to the portfolio, its prices no longer followed, every health check green.
"""

from __future__ import annotations

from services.ingest.follow import Follow
from services.ingest.portfolio_view import UNNAMED, PortfolioView

PERP = "BTC-PERPETUAL"
CALL = "BTC-29DEC23-50000-C"


def line(instrument: str, position: float, **more: object) -> dict:
    return {"instrument_name": instrument, "position": position, "mark_price": 100.0} | more


def held(view: PortfolioView) -> dict[str, float]:
    return {name: p.position for name, p in view.lines.items()}


def test_an_option_line_without_a_mark_stays_in_the_whole_portfolio() -> None:
    view = PortfolioView()
    unmarked = {"instrument_name": CALL, "position": -1.0, "average_price": 1_500.0}
    whole = view.merge([line(PERP, 2.0), unmarked], whole=True)
    assert (whole.refused, whole.absent_is_flat) == ([], True)
    view.merge([line(PERP, 3.0)], whole=False)  # the perpetual's next delta
    assert view.complete and held(view) == {PERP: 3.0, CALL: -1.0}
    assert view.lines[CALL].mark_price is None


def test_one_unreadable_line_is_refused_alone_and_its_instrument_is_never_taken_as_flat() -> None:
    view = PortfolioView()
    view.merge([line(PERP, 2.0), line(CALL, -1.0)], whole=True)
    merged = view.merge([line(PERP, 3.0), {"instrument_name": CALL, "mark_price": 5.0}], whole=False)
    assert [p.instrument for p in merged.read] == [PERP]
    (refused,) = merged.refused
    assert refused.instrument == CALL and "position: Field required" in refused.reason
    assert not view.complete and held(view) == {PERP: 3.0, CALL: -1.0}  # its last known line is kept
    assert view.why_incomplete() == f"{CALL}: PortfolioEntry: position: Field required"
    view.merge([line(PERP, 4.0)], whole=False)  # another instrument's line heals nothing
    assert not view.complete
    view.merge([line(CALL, -2.0)], whole=False)
    assert view.complete and held(view) == {PERP: 4.0, CALL: -2.0}


def test_in_a_whole_portfolio_an_unreadable_line_keeps_its_instruments_last_line() -> None:
    view = PortfolioView()
    view.merge([line(PERP, 2.0), line(CALL, -1.0), line("ETH-PERPETUAL", 1.0)], whole=True)
    merged = view.merge([line(PERP, 2.0), {"instrument_name": CALL, "position": "many"}], whole=True)
    assert merged.absent_is_flat  # ETH-PERPETUAL is gone: flat; CALL is not known, not flat
    assert held(view) == {PERP: 2.0, CALL: -1.0} and list(view.unreadable) == [CALL]


def test_a_line_without_a_name_keeps_every_known_line_until_a_whole_portfolio_reads_cleanly() -> None:
    view = PortfolioView()
    view.merge([line(PERP, 2.0), line(CALL, -1.0)], whole=True)
    merged = view.merge([line(PERP, 2.5), {"position": 7.0}], whole=True)
    assert not merged.absent_is_flat  # the nameless line may be CALL: nothing is flat for it
    assert held(view) == {PERP: 2.5, CALL: -1.0} and list(view.unreadable) == [UNNAMED]
    view.merge([line(PERP, 2.5), line(CALL, -1.0)], whole=False)  # changed lines cannot vouch for the rest
    assert not view.complete
    view.merge([line(PERP, 2.5)], whole=True)
    assert view.complete and held(view) == {PERP: 2.5}


def test_a_message_that_is_not_a_list_makes_the_view_incomplete() -> None:
    view = PortfolioView()
    view.merge([line(PERP, 2.0)], whole=True)
    merged = view.merge({"instrument_name": PERP}, whole=False)
    assert merged.refused[0].reason == "portfolio: expected an array, got dict"
    assert not view.complete and held(view) == {PERP: 2.0}


def test_an_unreadable_line_keeps_its_instrument_followed() -> None:
    follow = Follow([], 300.0, "raw", 10)
    follow.on_portfolio([(PERP, 2.0), (CALL, -1.0)], 0.0, complete=True)
    follow.on_portfolio([(PERP, 2.0)], 1.0, complete=True, unreadable=[CALL, "BTC-NEW"])
    assert follow.positions == {PERP: 2.0, CALL: -1.0}  # not flattened by the whole portfolio
    assert "BTC-NEW" in follow.instruments(1.0)  # never seen before: followed, its size unknown


def test_an_open_position_without_any_price_is_refused_alone_never_valued_from_zero() -> None:
    """Neither average, start nor mark price: "sold at 0" would read the short call as a loss of its
    whole mark (or a long as a windfall that fires the take profit) — refused, and the view withheld."""
    view = PortfolioView()
    merged = view.merge([line(PERP, 2.0), {"instrument_name": CALL, "position": -1.0}], whole=True)
    (refused,) = merged.refused
    assert refused.instrument == CALL and "cannot be valued" in refused.reason
    assert not view.complete
