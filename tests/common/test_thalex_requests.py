"""Requests and answers on one Thalex connection (no exchange needed: answers are fed by hand)."""

from __future__ import annotations

import asyncio

import pytest

from services.common.thalex.requests import NO_CODE, ConnectionLost, Requests, ThalexError


async def test_an_answer_resolves_its_request_by_id() -> None:
    requests = Requests(timeout=1.0)
    sent: list[int] = []

    async def send(rid: int) -> None:
        sent.append(rid)

    first = asyncio.create_task(requests.call("public/ticker", send))
    second = asyncio.create_task(requests.call("private/portfolio", send))
    await asyncio.sleep(0)
    assert sent == [1, 2]
    assert requests.answer({"id": 2, "result": ["positions"]})
    assert requests.answer({"id": 1, "result": {"mark_price": 1.0}})
    assert await first == {"mark_price": 1.0} and await second == ["positions"]
    assert not requests.answer({"id": 1, "result": "late"})  # nobody waits any more


async def test_an_error_answer_raises_with_method_code_and_message() -> None:
    requests = Requests(timeout=1.0)

    async def send(rid: int) -> None:
        requests.answer({"id": rid, "error": {"code": 4, "message": "throttle exceeded"}})

    with pytest.raises(ThalexError) as caught:
        await requests.call("private/insert", send)
    assert (caught.value.method, caught.value.code, caught.value.message) == (
        "private/insert", 4, "throttle exceeded")


async def test_an_error_without_code_gets_no_code() -> None:
    requests = Requests(timeout=1.0)

    async def send(rid: int) -> None:
        requests.answer({"id": rid, "error": "boom"})

    with pytest.raises(ThalexError) as caught:
        await requests.call("public/login", send)
    assert caught.value.code == NO_CODE and caught.value.message == "boom"


async def test_closing_fails_every_waiter_and_refuses_new_requests() -> None:
    requests = Requests(timeout=5.0)

    async def send(rid: int) -> None:
        return None

    waiting = asyncio.create_task(requests.call("private/cancel_all", send))
    await asyncio.sleep(0)
    requests.close("connection closed")
    with pytest.raises(ConnectionLost, match="private/cancel_all: connection closed"):
        await waiting
    with pytest.raises(ConnectionLost, match="already closed"):
        await requests.call("public/ticker", send)


async def test_silence_and_a_failed_send_are_a_lost_connection() -> None:
    requests = Requests(timeout=0.05)

    async def silent(rid: int) -> None:
        return None

    async def broken(rid: int) -> None:
        raise OSError("socket closed")

    with pytest.raises(ConnectionLost, match=r"no answer within 0\.05 s"):
        await requests.call("public/system_info", silent)
    with pytest.raises(ConnectionLost, match="socket closed"):
        await requests.call("private/insert", broken)
