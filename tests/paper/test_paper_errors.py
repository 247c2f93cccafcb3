"""Every error case of the brief answers with Thalex's code (NOTES.md)."""

from __future__ import annotations

import json
import time

import jwt
import pytest

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, RawClient


@pytest.mark.asyncio
async def test_malformed_requests_are_error_6(connect) -> None:
    client: RawClient = await connect()
    await client.ws.send("{not json")
    answer = await client.answer(None)
    assert answer["error"]["code"] == 6
    await client.ws.send(json.dumps({"method": "public/ticker", "params": [1, 2], "id": 9}))
    assert (await client.answer(9))["error"]["code"] == 6
    assert await client.error_code("public/ticker", {"instrument_name": 5}) == 6
    assert await client.error_code("public/subscribe", {"channels": "ticker.BTC-PERPETUAL.raw"}) == 6


@pytest.mark.asyncio
async def test_private_before_login_is_7_and_unknown_method_is_31(connect) -> None:
    client: RawClient = await connect()
    for method in ("private/portfolio", "private/insert", "private/subscribe", "private/whatever"):
        assert await client.error_code(method, {}) == 7
    assert await client.error_code("public/no_such_method") == 31
    assert await client.error_code("paper_not_a_namespace/x") == 31


@pytest.mark.asyncio
async def test_login_with_wrong_signature_or_unknown_kid_or_stale_token_is_19(
    connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    forged = jwt.encode(
        {"iat": time.time()}, keys["other"].private_pem, algorithm="RS512", headers={"kid": "trader"}
    )
    assert await client.error_code("public/login", {"token": forged}) == 19
    unknown = jwt.encode(
        {"iat": time.time()}, keys["trader"].private_pem, algorithm="RS512", headers={"kid": "nobody"}
    )
    assert await client.error_code("public/login", {"token": unknown}) == 19
    stale = jwt.encode(
        {"iat": time.time() - 3600}, keys["trader"].private_pem, algorithm="RS512", headers={"kid": "trader"}
    )
    assert await client.error_code("public/login", {"token": stale}) == 19
    assert await client.error_code("public/login", {"token": "garbage"}) == 19
    assert await client.error_code("private/portfolio") == 7
    await client.login(keys["trader"])
    assert await client.result("private/portfolio") == []


@pytest.mark.asyncio
async def test_order_validation_codes(connect, keys: dict[str, KeyFiles]) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/set_cancel_on_disconnect", {"timeout_secs": 5})
    base = {"direction": "buy", "instrument_name": PERP, "amount": 0.1, "price": 90000}
    assert await client.error_code("private/insert", {**base, "instrument_name": "BTC-NOPE"}) == 5
    assert await client.error_code("private/insert", {**base, "amount": 0.00005}) == 14  # volume tick 0.0001
    assert await client.error_code("private/insert", {**base, "amount": 0}) == 14
    assert await client.error_code("private/insert", {**base, "price": 90000.5}) == 15  # tick 1
    assert await client.error_code("private/insert", {**base, "price": -5}) == 13
    assert (
        await client.error_code(
            "private/insert", {**base, "order_type": "market", "time_in_force": "good_till_cancelled"}
        )
        == 25
    )
    assert (
        await client.error_code("private/insert", {**base, "order_type": "market", "collar": "ignore"}) == 6
    )
    assert await client.error_code("private/insert", {**base, "direction": "up"}) == 6
    assert await client.error_code("private/insert", {**base, "label": "x" * 33}) == 6
    first = await client.result("private/insert", {**base, "client_order_id": 42})
    assert first["status"] == "open"
    assert await client.error_code("private/insert", {**base, "client_order_id": 42}) == 2
    assert await client.error_code("private/cancel", {"order_id": "FFFF"}) == 1
    assert await client.error_code("private/cancel", {}) == 6
    assert await client.error_code("private/amend", {"client_order_id": 99, "price": 1, "amount": 1}) == 1
    assert await client.error_code("private/trade_history", {"limit": 5000}) == 6


@pytest.mark.asyncio
async def test_reduce_only_rejection_and_collar_reject_codes(connect, keys: dict[str, KeyFiles]) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/set_cancel_on_disconnect", {"timeout_secs": 5})
    # No position: a reduce-only order cannot reduce anything (37, invalid state).
    assert (
        await client.error_code(
            "private/sell",
            {"instrument_name": PERP, "amount": 0.1, "order_type": "market", "reduce_only": True},
        )
        == 37
    )
    # Collar of the perpetual: mark 100000 +- 2 % -> a bid above 102000 breaches it (43).
    assert (
        await client.error_code(
            "private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 105000, "collar": "reject"}
        )
        == 43
    )
    # The default collar for limit orders is reject.
    assert (
        await client.error_code("private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 105000})
        == 43
    )
    assert (
        await client.error_code(
            "private/buy",
            {"instrument_name": PERP, "amount": 0.1, "order_type": "market", "collar": "reject"},
        )
        == 43
    )


@pytest.mark.asyncio
async def test_read_only_key_reads_and_subscribes_but_cannot_trade_28(
    connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["reader"])
    assert (
        await client.error_code(
            "private/insert", {"direction": "buy", "instrument_name": PERP, "amount": 0.1, "price": 90000}
        )
        == 28
    )
    assert await client.error_code("private/amend", {"order_id": "1", "price": 1, "amount": 1}) == 28
    assert await client.error_code("private/cancel", {"order_id": "1"}) == 28
    assert await client.error_code("private/cancel_all") == 28
    assert await client.result("private/portfolio") == []
    assert await client.result("private/subscribe", {"channels": ["account.portfolio"]}) == [
        "account.portfolio"
    ]
    assert await client.result("public/subscribe", {"channels": [f"ticker.{PERP}.1000ms"]}) == [
        f"ticker.{PERP}.1000ms"
    ]


@pytest.mark.asyncio
async def test_throttle_is_10_per_second_and_50_with_cancel_on_disconnect(
    connect, keys: dict[str, KeyFiles]
) -> None:
    plain: RawClient = await connect()
    await plain.login(keys["trader"])
    codes = [await plain.error_code("private/cancel", {"order_id": "none"}) for _ in range(11)]
    assert codes == [1] * 10 + [4]
    cod: RawClient = await connect()
    await cod.login(keys["trader"])
    assert await cod.result("private/set_cancel_on_disconnect", {"timeout_secs": 5}) == {"message_rate": 50}
    codes = [await cod.error_code("private/cancel", {"order_id": "none"}) for _ in range(51)]
    assert codes == [1] * 50 + [4]
    # Bulk cancels are not order messages.
    assert await cod.result("private/cancel_all") == 0


@pytest.mark.asyncio
async def test_injected_failures_and_order_log(
    paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await paper.control(
        "paper/fail_next",
        {"count": 2, "code": 20, "message": "temporary failure", "methods": ["private/insert"]},
    )
    order = {"direction": "buy", "instrument_name": PERP, "amount": 0.1, "price": 90000, "label": "q"}
    assert await client.error_code("private/insert", order) == 20
    assert await client.result("private/portfolio") == []  # other methods unaffected
    assert await client.error_code("private/insert", order) == 20
    assert (await client.result("private/insert", order))["status"] == "open"
    await paper.control("paper/fail_next", {"count": 1, "code": 4, "key_id": "other"})
    assert (await client.result("private/insert", order))["status"] == "open"
    log = (await paper.control("paper/order_log", {"key_id": "trader", "method": "private/insert"}))["orders"]
    assert [row["outcome"].get("error", {}).get("code") for row in log] == [20, 20, None, None]
    assert all(row["params"]["label"] == "q" and row["time"] <= row["done_time"] for row in log)
    assert log[2]["outcome"]["result"]["status"] == "open"


@pytest.mark.asyncio
async def test_what_the_paper_cannot_do_answers_thalex_errors(connect, keys: dict[str, KeyFiles]) -> None:
    """Funds never move on the paper: wallet transfers answer 28 (no permission), its lists are empty."""
    client: RawClient = await connect()
    await client.login(keys["trader"])
    assert await client.result("private/crypto_deposits") == {"confirmed": [], "unconfirmed": []}
    assert await client.result("private/crypto_withdrawals") == []
    for method in ("private/withdraw", "private/btc_deposit_address", "private/internal_transfer"):
        assert await client.error_code(method, {}) == 28
    # combination orders: legs and an instrument name at once, or legs that are no combination
    legs = [{"instrument_name": PERP, "quantity": 1}, {"instrument_name": "ETH-PERPETUAL", "quantity": -1}]
    order = {"direction": "buy", "amount": 0.1, "order_type": "market"}
    assert await client.error_code("private/insert", {**order, "legs": legs}) == 6  # two underlyings
    assert await client.error_code("private/insert", {**order, "legs": legs, "instrument_name": PERP}) == 6
    assert (
        await client.error_code(
            "private/insert", {**order, "legs": [{"instrument_name": PERP, "quantity": 0.5}, legs[1]]}
        )
        == 6
    )
