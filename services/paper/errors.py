"""Thalex's error object and the codes the paper exchange answers with (NOTES.md has the list)."""

from __future__ import annotations

from typing import Any

ORDER_NOT_FOUND = 1
DUPLICATE_ORDER_ID = 2
THROTTLE_EXCEEDED = 4
UNKNOWN_INSTRUMENT = 5
INVALID_REQUEST = 6
NOT_LOGGED_IN = 7
INVALID_PRICE = 13
INVALID_AMOUNT = 14
PRICE_NOT_ALIGNED = 15
AUTHENTICATION_FAILED = 19
TEMPORARY_FAILURE = 20
INSUFFICIENT_MARGIN = 24
INVALID_TIME_IN_FORCE = 25
ACCOUNT_LOCKED = 26
UNAUTHORIZED = 28
UNKNOWN_METHOD = 31
INVALID_STATE = 37
COLLAR_BREACH = 43


class RpcError(Exception):
    """A Thalex error object ``{code, message}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}
