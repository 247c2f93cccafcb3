"""Mass quotes under market-maker protection, driven through the official client; every message is
checked strictly against api.yaml.

The ``paper`` fixture pins BTC-PERPETUAL's mark at 100000 with a book of 1.0-lots one tick apart (asks
100001..., bids 99999...). Keys mm1..mm3 are three sessions of one account ("desk").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import thalex

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle, make_keys

from .conftest import PERP, problems
from .official import Official

FUTURES = thalex.Product.BTC_FUTURES


@pytest.fixture
def keys(keys_dir: Path) -> dict[str, KeyFiles]:
    return {
        "mm1": make_keys(keys_dir, "mm1", account="desk"),
        "mm2": make_keys(keys_dir, "mm2", account="desk"),
        "mm3": make_keys(keys_dir, "mm3", account="desk"),
        "desk-read": make_keys(keys_dir, "desk-read", read_only=True, account="desk"),
    }


class Levels:
    """A DoubleSidedQuote the official client sends as given (multi-level sides, empty arrays)."""

    def __init__(self, instrument: str, **sides: Any) -> None:
        self.quote = {"i": instrument, **sides}

    def dumps(self) -> dict:
        return self.quote


def quote(instrument: str, bid: tuple[float, float] | None, ask: tuple[float, float] | None) -> thalex.Quote:
    return thalex.Quote(
        instrument, thalex.SideQuote(*bid) if bid else None, thalex.SideQuote(*ask) if ask else None
    )


async def _future(client: Official) -> str:
    instruments = await client.result("instruments")
    return next(
        i["instrument_name"] for i in instruments if i["type"] == "future" and i["underlying"] == "BTCUSD"
    )


@pytest.mark.asyncio
async def test_mass_quotes_need_protection_replace_side_by_side_and_fill_like_orders(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    mm1: Official = await official(keys["mm1"])
    channels = ["session.orders", "account.orders", "account.trade_history", "account.portfolio"]
    await mm1.result("private_subscribe", [*channels, "session.mm_protection"])
    for snapshot in ("session.orders", "account.orders", "account.portfolio"):
        assert await mm1.notification(snapshot) == []

    # Without protection every side fails (code 37 "invalid state" is our choice: Thalex does not publish it).
    result = await mm1.result("mass_quote", [quote(PERP, (99990, 0.5), (100010, 0.5))])
    assert (result["n_success"], result["n_fail"]) == (0, 2)
    assert [(e["code"], e["side"]) for e in result["errors"]] == [(37, "bid"), (37, "ask")]

    await mm1.result("set_mm_protection", FUTURES, trade_amount=0.8, quote_amount=1.0)
    refill = {"product": "FBTCUSD", "remaining_amount": 0.8, "reason": "refill"}
    assert await mm1.notification("session.mm_protection") == [refill]

    # A level above the protection's quote_amount fails alone (50: total order size too large).
    result = await mm1.result("mass_quote", [quote(PERP, (99990, 1.2), None)])
    assert (
        result["n_fail"] == 1 and result["errors"][0]["code"] == 50 and result["errors"][0]["price"] == 99990
    )

    result = await mm1.result("mass_quote", [quote(PERP, (99990, 0.5), (100010, 0.5))], label="mmq")
    assert result == {"n_success": 2, "n_fail": 0, "errors": []}
    inserted = await mm1.notification("account.orders")
    assert [(o["direction"], o["price"], o["amount"], o["status"], o["label"]) for o in inserted] == [
        ("buy", 99990, 0.5, "open", "mmq"),
        ("sell", 100010, 0.5, "open", "mmq"),
    ]
    assert all(o["persistent"] and o["change_reason"] == "insert" for o in inserted)
    bid_id, ask_id = (o["order_id"] for o in inserted)
    assert [o["order_id"] for o in await mm1.notification("session.orders")] == [bid_id, ask_id]

    # Same bid (price and amount): kept with its priority; a new ask price replaces the ask.
    await mm1.result("mass_quote", [quote(PERP, (99990, 0.5), (100020, 0.5))], label="mmq")
    changes = await mm1.notification("account.orders")
    assert [(o["order_id"] == ask_id, o["change_reason"], o["price"]) for o in changes] == [
        (True, "cancel", 100010),
        (False, "insert", 100020),
    ]
    assert changes[0]["delete_reason"] == "client_cancel"
    ask_id = changes[1]["order_id"]

    # A side left out is not touched; several levels replace a side; an empty array removes a side.
    await mm1.result("mass_quote", [Levels(PERP, b=[[99980, 0.2], [99970, 0.3]])], label="mmq")
    changes = await mm1.notification("account.orders")
    assert [(o["change_reason"], o["price"]) for o in changes] == [
        ("cancel", 99990),
        ("insert", 99980),
        ("insert", 99970),
    ]
    await mm1.result("mass_quote", [Levels(PERP, b=[[99990, 0.5]], a=[])], label="mmq")
    changes = await mm1.notification("account.orders")
    assert [(o["change_reason"], o["price"]) for o in changes] == [
        ("cancel", 99980),
        ("cancel", 99970),
        ("insert", 99990),
        ("cancel", 100020),
    ]
    bid_id = changes[2]["order_id"]

    # Mass quotes are not orders: cancel_all leaves them; open_orders lists them. cancel_session is
    # refused here: api.yaml allows it only on a cancel-on-disconnect session (37 is our choice).
    assert await mm1.result("cancel_all") == 0
    assert await mm1.error("cancel_session") == 37
    assert [o["order_id"] for o in await mm1.result("open_orders")] == [bid_id]
    assert await mm1.error("cancel", order_id=bid_id) == 1

    # The book trades through the bid: a maker fill reported as for orders, on every account channel.
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 99980})
    filled = await mm1.notification("account.orders", lambda n: n[0]["change_reason"] == "fill")
    assert filled[0]["order_id"] == bid_id and filled[0]["status"] == "filled"
    assert [(f["price"], f["amount"], f["maker_taker"]) for f in filled[0]["fills"]] == [
        (99990, 0.5, "maker")
    ]
    (trade,) = await mm1.notification("account.trade_history")
    # maker fee 1 bp of 99990 * 0.5 = 4.9995
    assert (trade["trade_type"], trade["label"], trade["order_id"], trade["maker_taker"]) == (
        "normal",
        "mmq",
        bid_id,
        "maker",
    )
    assert trade["fee"] == pytest.approx(4.9995) and trade["position_after"] == 0.5
    line = await mm1.notification("account.portfolio", lambda n: n[0]["position"] == 0.5)
    assert line[0]["average_price"] == 99990
    executions = {"product": "FBTCUSD", "remaining_amount": 0.3, "reason": "executions"}
    assert await mm1.notification("session.mm_protection") == [executions]
    await mm1.settle()
    assert problems(mm1) == []


@pytest.mark.asyncio
async def test_cancel_mass_quote_from_a_third_session_removes_the_quotes_of_both_others(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    mm1, mm2, mm3 = [await official(keys[k]) for k in ("mm1", "mm2", "mm3")]
    future = await _future(mm1)
    option = next(
        i["instrument_name"]
        for i in await mm1.result("instruments")
        if i["type"] == "option" and i["underlying"] == "BTCUSD"
    )
    for client in (mm1, mm2):
        await client.result("private_subscribe", ["session.mm_protection", "session.orders"])
        await client.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
        await client.notification("session.mm_protection")
    await mm1.result("set_mm_protection", thalex.Product.BTC_OPTIONS, trade_amount=1.0, quote_amount=1.0)
    await mm3.result("private_subscribe", ["account.orders"])
    await mm3.notification("account.orders")  # the (empty) snapshot

    assert (await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), (100100, 0.1))]))["n_success"] == 2
    assert (await mm2.result("mass_quote", [quote(future, (90000, 0.1), None)]))["n_success"] == 1
    await mm1.result("mass_quote", [Levels(option, b=[[5, 0.1]])])
    inserts = [o for n in [await mm3.notification("account.orders") for _ in range(3)] for o in n]
    assert len(inserts) == 4

    # Only the options product first, then everything of every session.
    assert await mm3.result("cancel_mass_quote", thalex.Product.BTC_OPTIONS) is None
    (gone,) = await mm3.notification("account.orders")
    assert (gone["instrument_name"], gone["delete_reason"]) == (option, "client_bulk_cancel")
    assert await mm3.result("cancel_mass_quote") is None
    gone = await mm3.notification("account.orders")
    assert sorted((o["instrument_name"], o["delete_reason"], o["status"]) for o in gone) == sorted(
        [
            (PERP, "client_bulk_cancel", "cancelled"),
            (PERP, "client_bulk_cancel", "cancelled"),
            (future, "client_bulk_cancel", "cancelled"),
        ]
    )
    assert await mm3.result("open_orders") == []

    # Both sessions' protection groups were deleted (client_cancel) and must be set again.
    deleted = {"product": "OBTCUSD", "remaining_amount": 0.0, "reason": "client_cancel"}
    assert await mm1.notification("session.mm_protection", lambda n: n[0]["reason"] == "client_cancel") == [
        deleted
    ]
    deleted = {**deleted, "product": "FBTCUSD"}
    for client in (mm1, mm2):
        assert await client.notification(
            "session.mm_protection", lambda n: n[0]["reason"] == "client_cancel"
        ) == [deleted]
    result = await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), None)])
    assert result["n_fail"] == 1 and result["errors"][0]["code"] == 37
    await mm1.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    assert (await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), None)]))["n_success"] == 1
    for client in (mm1, mm2, mm3):
        await client.settle(0.1)
    assert problems(mm1, mm2, mm3) == []


@pytest.mark.asyncio
async def test_protection_pulls_the_sessions_quotes_after_the_configured_executions(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    mm1: Official = await official(keys["mm1"])
    future = await _future(mm1)
    await mm1.result(
        "private_subscribe", ["session.mm_protection", "account.orders", "account.trade_history"]
    )
    await mm1.notification("account.orders")
    await mm1.result("set_mm_protection", FUTURES, trade_amount=0.3, quote_amount=0.3)
    await mm1.notification("session.mm_protection")
    quotes = [quote(PERP, (99900, 0.2), (100100, 0.2)), quote(future, (90000, 0.2), (120000, 0.2))]
    assert (await mm1.result("mass_quote", quotes, label="mmp"))["n_success"] == 4
    orders = await mm1.notification("account.orders")
    ids = {(o["instrument_name"], o["direction"]): o["order_id"] for o in orders}

    # First execution 0.2 of 0.3: remaining 0.1, the quotes stay.
    await paper.control("paper/fill_orders", {"order_id": ids[(PERP, "buy")]})
    assert await mm1.notification("session.mm_protection") == [
        {"product": "FBTCUSD", "remaining_amount": 0.1, "reason": "executions"}
    ]
    assert len(await mm1.result("open_orders")) == 3

    # Second execution 0.2 overshoots to -0.1: every other quote of the product is pulled (mm_protection).
    await paper.control("paper/fill_orders", {"order_id": ids[(future, "buy")]})
    assert await mm1.notification("session.mm_protection") == [
        {"product": "FBTCUSD", "remaining_amount": -0.1, "reason": "executions"}
    ]
    pulled = await mm1.notification(
        "account.orders", lambda n: any(o.get("delete_reason") == "mm_protection" for o in n)
    )
    assert sorted(o["order_id"] for o in pulled if o.get("delete_reason") == "mm_protection") == sorted(
        [ids[(PERP, "sell")], ids[(future, "sell")]]
    )
    assert await mm1.result("open_orders") == []
    trades = (await mm1.result("trade_history", sort=thalex.Sort.ASC))["trades"]
    assert [(t["instrument_name"], t["amount"], t["label"]) for t in trades] == [
        (PERP, 0.2, "mmp"),
        (future, 0.2, "mmp"),
    ]

    # The group needs refilling before quoting again.
    result = await mm1.result("mass_quote", quotes)
    assert result["n_fail"] == 4 and {e["code"] for e in result["errors"]} == {37}
    await mm1.result("set_mm_protection", FUTURES, trade_amount=0.3, quote_amount=0.3)
    assert await mm1.notification("session.mm_protection", lambda n: n[0]["reason"] == "refill") == [
        {"product": "FBTCUSD", "remaining_amount": 0.3, "reason": "refill"}
    ]
    assert (await mm1.result("mass_quote", quotes))["n_success"] == 4
    await mm1.settle()
    assert problems(mm1) == []


@pytest.mark.asyncio
async def test_quotes_of_a_cancel_on_disconnect_session_vanish_with_it_others_stay(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    mm1, mm2, mm3 = [await official(keys[k]) for k in ("mm1", "mm2", "mm3")]
    await mm1.result("set_cancel_on_disconnect", 5)
    for client in (mm1, mm2):
        await client.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), None)])
    await mm2.result("mass_quote", [quote(PERP, None, (100100, 0.1))])
    await mm3.result("private_subscribe", ["account.orders"])
    assert len(await mm3.notification("account.orders")) == 2  # snapshot: both quotes, change_reason existing

    await mm1.client.disconnect()
    (gone,) = await mm3.notification("account.orders")
    assert (gone["direction"], gone["delete_reason"], gone["persistent"]) == ("buy", "session_end", False)
    await mm2.client.disconnect()
    await mm3.settle(0.3)
    (left,) = await mm3.result("open_orders")
    assert (left["direction"], left["persistent"]) == ("sell", True)
    await mm3.result("cancel_mass_quote")
    assert (await mm3.notification("account.orders"))[0]["delete_reason"] == "client_bulk_cancel"

    # A level the margin check refuses (500 BTC bid on a 1M account) fails alone, with 24.
    await mm3.result("set_mm_protection", FUTURES, trade_amount=1000.0, quote_amount=1000.0)
    result = await mm3.result("mass_quote", [quote(PERP, (99000, 500), None)])
    assert (result["n_fail"], result["errors"][0]["code"], result["errors"][0]["side"]) == (1, 24, "bid")

    reader = await official(keys["desk-read"])
    for name, args in (
        ("mass_quote", ([quote(PERP, (99900, 0.1), None)],)),
        ("cancel_mass_quote", ()),
        ("set_mm_protection", (FUTURES, 1.0, 1.0)),
    ):
        assert await reader.error(name, *args) == 28
    assert problems(mm1, mm2, mm3, reader) == []


@pytest.mark.asyncio
async def test_cancel_session_ends_the_session_s_orders_quotes_and_protection_as_a_disconnect_would(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    """api.yaml: only on a cancel-on-disconnect session, "the same result as closing the connection":
    non-persistent orders (mass quotes among them) deleted with ``session_end``, protection groups reset."""
    mm1, mm2, mm3 = [await official(keys[k]) for k in ("mm1", "mm2", "mm3")]
    await mm3.result("private_subscribe", ["account.orders"])
    await mm3.notification("account.orders")  # the (empty) snapshot
    await mm1.result("private_subscribe", ["session.mm_protection"])
    kept = await mm1.result("buy", PERP, 0.1, price=99000, label="before")  # persistent: inserted before
    await mm1.result("set_cancel_on_disconnect", 5)
    await mm1.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    await mm1.notification("session.mm_protection")
    assert (await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), (100100, 0.1))]))["n_success"] == 2
    plain = await mm1.result("buy", PERP, 0.1, price=99100, label="plain")
    await mm2.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    assert (await mm2.result("mass_quote", [quote(PERP, (99800, 0.1), None)]))["n_success"] == 1
    for _ in range(4):  # kept, the two quotes (one notification), plain, mm2's quote
        await mm3.notification("account.orders")

    assert await mm1.result("cancel_session") is None
    gone = await mm3.notification("account.orders")
    assert sorted((o["price"], o["change_reason"], o["delete_reason"], o["status"]) for o in gone) == [
        (99100, "cancel", "session_end", "cancelled"),
        (99900, "cancel", "session_end", "cancelled"),
        (100100, "cancel", "session_end", "cancelled"),
    ]
    assert plain["order_id"] in {o["order_id"] for o in gone}
    left = await mm3.result("open_orders")
    assert sorted((o["order_id"] == kept["order_id"], o["price"]) for o in left) == [
        (False, 99800),  # the other session's quote
        (True, 99000),  # the persistent order of the session
    ]

    # The group is gone (told as at a session end) and must be set again, as after a reconnect.
    assert await mm1.notification("session.mm_protection") == [
        {"product": "FBTCUSD", "remaining_amount": 0.0, "reason": "session_end"}
    ]
    result = await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), (100100, 0.1))])
    assert (result["n_success"], result["n_fail"]) == (0, 2)
    assert [(e["code"], e["side"]) for e in result["errors"]] == [(37, "bid"), (37, "ask")]
    assert (await mm2.result("mass_quote", [quote(PERP, (99700, 0.1), None)]))["n_success"] == 1
    await mm1.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    assert (await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), None)]))["n_success"] == 1
    for client in (mm1, mm2, mm3):
        await client.settle(0.1)
    assert problems(mm1, mm2, mm3) == []


@pytest.mark.asyncio
async def test_cancel_session_without_cancel_on_disconnect_is_refused_and_removes_nothing(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    mm1: Official = await official(keys["mm1"])
    await mm1.result("private_subscribe", ["account.orders"])
    await mm1.notification("account.orders")
    order = await mm1.result("buy", PERP, 0.1, price=99000)
    await mm1.notification("account.orders")
    assert await mm1.error("cancel_session") == 37
    await mm1.settle()
    assert mm1.of("account.orders")[2:] == []  # the snapshot and the insert only
    assert [o["order_id"] for o in await mm1.result("open_orders")] == [order["order_id"]]
    assert problems(mm1) == []


@pytest.mark.asyncio
async def test_unfilled_quotes_stay_out_of_the_order_history_filled_ones_enter_it(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    """api.yaml: "Unfilled market maker orders are excluded" (account.order_history) / "are not
    included" (private/order_history)."""
    mm1: Official = await official(keys["mm1"])
    await mm1.result("private_subscribe", ["account.order_history", "account.orders"])
    await mm1.notification("account.orders")
    await mm1.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), (100100, 0.1))])
    await mm1.result("mass_quote", [quote(PERP, (99890, 0.1), (100110, 0.1))])  # replaces both
    await mm1.result("mass_quote", [Levels(PERP, b=[], a=[])])  # removes both
    await mm1.settle()
    assert mm1.of("account.order_history") == []
    assert (await mm1.result("order_history"))["orders"] == []

    # A quote that trades is an order of the history like any other.
    await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), None)])
    (placed,) = await mm1.notification(
        "account.orders", lambda n: len(n) == 1 and n[0]["change_reason"] == "insert"
    )
    await paper.control("paper/fill_orders", {"order_id": placed["order_id"]})
    (row,) = await mm1.notification("account.order_history")
    assert (row["order_id"], row["status"], row["filled_amount"]) == (placed["order_id"], "filled", 0.1)
    assert [o["order_id"] for o in (await mm1.result("order_history"))["orders"]] == [placed["order_id"]]
    await mm1.settle()
    assert problems(mm1) == []


@pytest.mark.asyncio
async def test_account_persistent_orders_carries_no_mass_quote(
    paper: PaperHandle, official, keys: dict[str, KeyFiles]
) -> None:
    """api.yaml: "persistent (non-market-maker) orders only" — the quotes of a session without
    cancel-on-disconnect are persistent and still left out, on the channel and in its snapshot."""
    mm1: Official = await official(keys["mm1"])
    mm2: Official = await official(keys["mm2"])
    await mm1.result("private_subscribe", ["account.persistent_orders", "account.orders"])
    assert await mm1.notification("account.persistent_orders") == []
    await mm1.notification("account.orders")
    await mm1.result("set_mm_protection", FUTURES, trade_amount=1.0, quote_amount=1.0)
    await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), (100100, 0.1))])
    inserted = await mm1.notification("account.orders")
    assert [(o["change_reason"], o["persistent"]) for o in inserted] == [("insert", True)] * 2
    await mm1.result("mass_quote", [Levels(PERP, b=[], a=[])])
    await mm1.notification("account.orders")
    order = await mm1.result("buy", PERP, 0.1, price=99000)
    only = await mm1.notification("account.persistent_orders")
    assert [o["order_id"] for o in only] == [order["order_id"]]

    await mm1.result("mass_quote", [quote(PERP, (99900, 0.1), None)])
    await mm2.result("private_subscribe", ["account.persistent_orders"])
    snapshot = await mm2.notification("account.persistent_orders")
    assert [(o["order_id"], o["change_reason"]) for o in snapshot] == [(order["order_id"], "existing")]
    await mm1.settle()
    assert len(mm1.of("account.persistent_orders")) == 2  # the snapshot and the plain order's insert
    assert problems(mm1, mm2) == []
