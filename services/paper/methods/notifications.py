"""The notifications inbox: ``private/notifications_inbox``, ``private/mark_inbox_notification_as_read``."""

from __future__ import annotations

from services.paper.accounts import Event
from services.paper.errors import INVALID_REQUEST, RpcError
from services.paper.params import flag, limit, string
from services.paper.rpc import METHODS, Call


@METHODS.method("private/notifications_inbox")
async def notifications_inbox(call: Call) -> dict:
    """The latest notifications, newest first."""
    size = limit(call.params, maximum=None)
    return {"notifications": list(reversed(call.session.account.inbox))[:size]}


@METHODS.method("private/mark_inbox_notification_as_read")
async def mark_inbox_notification_as_read(call: Call) -> None:
    """Mark one notification (un)read; ``user.inbox_notifications`` carries the update."""
    notification_id = string(call.params, "notification_id", required=True)
    read = flag(call.params, "read", default=True)
    account = call.session.account
    item = next((n for n in account.inbox if n["id"] == notification_id), None)
    if item is None:
        raise RpcError(INVALID_REQUEST, f"unknown notification {notification_id}")
    item["read"] = read
    call.publish([Event("inbox", account.account_id, None, dict(item))])
