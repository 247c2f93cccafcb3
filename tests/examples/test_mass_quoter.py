"""examples/mass_quoter.py (a real process, the official `thalex` client) against the paper exchange.

It sets market-maker protection, quotes both sides with `private/mass_quote`, quotes again after a
fill, and on `tp:halt` pulls its quotes, acknowledges in `tp:halt:acks` and sends no quote until the
halt is gone (issue 19, item 5).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from services.common.contracts import Halt, halt_to_hash
from services.common.streams import Names
from services.paper.testing import PaperHandle, make_keys, running_paper_exchange
from tests.support import eventually

REPO = Path(__file__).resolve().parents[2]
PERP = "BTC-PERPETUAL"
KEY = "mm-quoter"


def start_quoter(paper_url: str, keys: Path, redis_url: str, namespace: str,
                 log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "examples/mass_quoter.py", "--url", paper_url, "--key-id", KEY, "--key-file",
             str(keys / f"{KEY}.pem"), "--redis-url", redis_url, "--namespace", namespace, "--name", "mq",
             "--size", "0.01", "--trade-amount", "0.01", "--interval", "0.1"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def resting_quotes(paper: PaperHandle) -> list[Any]:
    """The account's mass quotes resting now (amount left > 0)."""
    account = paper.exchange.engine.accounts.get(paper.exchange.keys[KEY].account)
    if account is None:  # made at the first login
        return []
    return [o for o in account.orders.values() if o.mass_quote and o.remaining > 0]


async def test_the_mass_quoter_quotes_under_protection_and_stands_down_on_the_halt(
    redis_url: str, names: Names, redis: Redis, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, KEY)
    async with running_paper_exchange(keys, seed=7) as paper:
        await paper.control("paper/pause")
        log = tmp_path / "quoter.log"
        quoter = start_quoter(paper.url, keys, redis_url, names.namespace, log)
        try:
            async def two_sides() -> bool:
                assert quoter.poll() is None, log.read_text()
                return {o.direction for o in resting_quotes(paper)} == {"buy", "sell"}

            await eventually(two_sides, within=30, interval=0.1)
            rows = (await paper.control("paper/order_log", {"key_id": KEY}))["orders"]
            methods = [r["method"] for r in rows]
            assert methods.index("private/set_mm_protection") < methods.index("private/mass_quote")
            assert "private/insert" not in methods  # quotes, not orders

            # a fill uses up the protection (0.01 of 0.01): the exchange pulls the other side too; the
            # quoter refills the protection and quotes both sides again
            filled = await paper.control("paper/fill_orders", {"key_id": KEY, "instrument_name": PERP,
                                                               "direction": "buy"})
            assert filled["trades"]
            await eventually(two_sides, within=10, interval=0.1)
            rows = (await paper.control("paper/order_log", {"key_id": KEY}))["orders"]
            assert [r["method"] for r in rows].count("private/set_mm_protection") >= 2

            halt = Halt(reason="take_profit", command_id="e1-take_profit-s9-n1", since=time.time())
            fields: dict[Any, Any] = halt_to_hash(halt)
            await redis.hset(names.halt, mapping=fields)
            halted_at = time.time()

            async def stood_down() -> bool:
                ack = await redis.hget(names.halt_acks, "mq")
                return not resting_quotes(paper) and ack is not None \
                    and json.loads(ack)["command_id"] == halt.command_id

            await eventually(stood_down, within=10, interval=0.1)
            await asyncio.sleep(1.0)  # ten quote cycles of the halted quoter
            log_rows = (await paper.control("paper/order_log", {"key_id": KEY, "since": halted_at + 0.05}))
            quotes = [r for r in log_rows["orders"] if r["method"] == "private/mass_quote"]
            assert all(level["a"] == 0 for r in quotes for q in r["params"]["quotes"]
                       for level in (q.get("b"), q.get("a")) if level), quotes  # only the pull
            assert not resting_quotes(paper)

            await redis.delete(names.halt)
            await eventually(two_sides, within=10, interval=0.1)
        finally:
            quoter.terminate()
            quoter.wait(10)

