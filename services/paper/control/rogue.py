"""``paper/start_rogue_bot``: a bot that keeps re-opening a position on an account after it is closed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.control.automation import _key_account
from services.paper.control.registry import CONTROLS

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


@CONTROLS.method("paper/start_rogue_bot")
async def start_rogue_bot(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """``key_id``, ``instrument_name``, ``position`` (signed), ``modes``?, ``delay``?, ``label``?"""
    key_id, account = _key_account(exchange, params)
    inst = exchange.instrument_named(params.get("instrument_name"))
    rogue, events = exchange.automation.rogues.start(
        key_id, account.account_id, inst, params, exchange.clock()
    )
    exchange.fanout.publish(events)
    return rogue


@CONTROLS.method("paper/rogue_bots")
async def rogue_bots(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    return {"rogue_bots": exchange.automation.rogues.listing()}


@CONTROLS.method("paper/stop_rogue_bot")
async def stop_rogue_bot(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    rogue, events = exchange.automation.rogues.stop(params.get("rogue_id"), exchange.clock())
    exchange.fanout.publish(events)
    return rogue
