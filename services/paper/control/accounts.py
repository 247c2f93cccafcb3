"""Control of accounts and the exchange's notices: balances, inbox notifications, banners."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.paper.control.registry import CONTROLS, account_of
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.params import choice, number, string

if TYPE_CHECKING:
    from services.paper.connection import Connection
    from services.paper.server import PaperExchange


def _account(exchange: PaperExchange, params: dict) -> str:
    account_id = account_of(exchange, params.get("key_id"))
    if account_id is None:
        raise RpcError(INVALID_REQUEST, "key_id is required")
    return account_id


@CONTROLS.method("paper/set_balance")
async def set_balance(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Set the USDT balance of the key's account (recorded as a deposit or withdrawal); margin
    breaches it causes are handled at once. ``{balance, margin, required_margin}``."""
    account = exchange.engine.account(_account(exchange, params))
    balance = number(params, "balance", required=True)
    change = (balance or 0.0) - account.cash
    if change:
        kind = "deposit" if change > 0 else "withdrawal"
        exchange.engine.transfer(account, change, kind, f"paper/set_balance {kind}", exchange.clock())
    exchange.fanout.after_market_change(exchange.clock())
    summary = exchange.engine.account_summary(account)
    return {
        "balance": account.cash,
        "margin": summary["margin"],
        "required_margin": summary["required_margin"],
    }


@CONTROLS.method("paper/notify")
async def notify(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Post a notification to the key's account inbox (``user.inbox_notifications`` delivers it)."""
    account = exchange.engine.account(_account(exchange, params))
    event = exchange.engine.post_notification(
        account,
        string(params, "category") or "info",
        string(params, "title") or "Paper exchange",
        string(params, "message", required=True) or "",
        choice(params, "display_type", ("success", "failure", "info", "warning", "critical"), "info")
        or "info",
        exchange.clock(),
    )
    exchange.fanout.publish([event])
    return event.payload


@CONTROLS.method("paper/set_banners")
async def set_banners(exchange: PaperExchange, params: dict, requester: Connection | None) -> dict:
    """Replace the banners (``[{severity, message, title?}]``); ``banners`` subscribers get the list."""
    banners = params.get("banners")
    if not isinstance(banners, list) or not all(
        isinstance(b, dict) and isinstance(b.get("message"), str) for b in banners
    ):
        raise RpcError(INVALID_REQUEST, "banners must be a list of {severity, message, title?}")
    exchange.banners = []
    for number_, banner in enumerate(banners, 1):
        severity = choice(banner, "severity", ("info", "warning", "critical"), "info")
        wire = {"id": number_, "time": exchange.clock(), "severity": severity, "message": banner["message"]}
        if isinstance(banner.get("title"), str):
            wire["title"] = banner["title"]
        exchange.banners.append(wire)
    for channel in exchange.subscriptions.of_family("banners"):
        exchange.fanout.broadcast(channel, exchange.banners)
    return {"banners": exchange.banners}
