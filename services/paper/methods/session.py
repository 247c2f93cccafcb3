"""Session management: ``public/login`` and ``private/set_cancel_on_disconnect``."""

from __future__ import annotations

from services.paper.engine import account_number
from services.paper.errors import AUTHENTICATION_FAILED, INVALID_REQUEST, RpcError
from services.paper.keys import LoginError, verify_token
from services.paper.rpc import METHODS, Call


@METHODS.method("public/login")
async def login(call: Call) -> dict:
    """Tokens are checked against the wall clock (clients sign with real time, whatever the paper's clock)."""
    exchange, conn = call.exchange, call.conn
    try:
        key = verify_token(call.params.get("token"), exchange.keys, exchange.wall_clock())
    except LoginError as exc:
        raise RpcError(AUTHENTICATION_FAILED, f"authentication failed: {exc}") from exc
    account = call.params.get("account")
    if account is not None and account != account_number(key.account):
        raise RpcError(AUTHENTICATION_FAILED, "authentication failed: the key has no such account")
    if conn.session is not None:
        exchange.fanout.publish(exchange.engine.close_session(conn.session, call.now))
    conn.key = key
    conn.session = exchange.engine.open_session(key.account, key.read_only)
    return {"account_number": conn.session.account.number}


@METHODS.method("private/set_cancel_on_disconnect")
async def set_cancel_on_disconnect(call: Call) -> dict:
    timeout = call.params.get("timeout_secs")
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout <= 0:
        raise RpcError(INVALID_REQUEST, "timeout_secs must be a positive integer")
    return {"message_rate": call.exchange.engine.set_cancel_on_disconnect(call.session)}
