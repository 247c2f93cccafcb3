"""Wallet methods. The paper's accounts hold paper USDT and no crypto: the deposit and withdrawal
lists answer from that state (empty), and moving funds in or out answers what Thalex answers a key
without the permission to: error 28 (``paper/set_balance`` changes a balance instead)."""

from __future__ import annotations

from services.paper.errors import UNAUTHORIZED, RpcError
from services.paper.rpc import METHODS, Call

FUNDS_MOVEMENTS = (
    "private/btc_deposit_address",
    "private/eth_deposit_address",
    "private/verify_withdrawal",
    "private/withdraw",
    "private/verify_internal_transfer",
    "private/internal_transfer",
)


@METHODS.method("private/crypto_withdrawals")
async def crypto_withdrawals(call: Call) -> list[dict]:
    return []


@METHODS.method("private/crypto_deposits")
async def crypto_deposits(call: Call) -> dict:
    return {"confirmed": [], "unconfirmed": []}


async def _no_funds_movements(call: Call) -> None:
    raise RpcError(UNAUTHORIZED, f"unauthorized: paper keys may not move funds ({call.method})")


for _name in FUNDS_MOVEMENTS:
    METHODS.method(_name)(_no_funds_movements)
