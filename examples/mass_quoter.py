"""A perpetual market maker quoting the way Thalex market makers do: mass quotes under protection.

`examples/quoter.py` places plain limit orders. A real Thalex market maker quotes with
`private/mass_quote` (one bid and one ask per instrument, replaced atomically) under
market-maker protection (`private/set_mm_protection`: after `trade_amount` of its quotes have
traded, the exchange pulls every quote of the session in the product, and the quoter must refill
the protection before quoting again). Mass quotes are not orders: `private/cancel_all` leaves them,
which is why the guardian's executor also sends `private/cancel_mass_quote` before a closure —
but a quoter that keeps quoting would rebuild the position the guardian is closing, and a guardian
that keeps closing it pays a taker fee each time (issue 19). So this quoter obeys the guardian, with
the same three habits as `examples/quoter.py`:

1. **Check `tp:halt` before every quote cycle** (one HGETALL) and again right before sending.
   While a halt is set (a closure, its cool-down, an operator halt, a failed closure, the circuit
   breaker) quote nothing and pull the quotes: a mass quote with both amounts 0 removes this
   session's quotes on the instrument and keeps its protection group.
2. **Acknowledge the halt** in `tp:halt:acks`, so `thalex-tp status` shows the operator who stood down.
3. **Set cancel-on-disconnect**, so a crashed quoter leaves no live quotes behind.

Run it against the paper exchange:

    python examples/mass_quoter.py --url ws://127.0.0.1:8765/ws/api/v2 --key-id demo-quoter \\
        --key-file keys/demo-quoter.pem --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import time
import types
from pathlib import Path
from typing import Any

import redis.asyncio as redis
import thalex

log = logging.getLogger("mass_quoter")


class MassQuoter:
    """One double-sided mass quote around the index, under protection, standing down on `tp:halt`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = thalex.Thalex(types.SimpleNamespace(value=args.url))
        self.redis = redis.Redis.from_url(args.redis_url)
        self.halt_key = f"{args.namespace}:halt"
        self.acks_key = f"{args.namespace}:halt:acks"
        self.index: float | None = None
        self.tick_size = 1.0
        self.product = ""
        self.quoted: tuple[float, float] | None = None
        """(bid, ask) of the quote resting now; None when there is none (pulled, traded, or refused)."""
        self.protected = False
        self.acked_halt: str | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.next_id = 100

    async def request(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one request through the official client and wait for its answer."""
        self.next_id += 1
        request_id = self.next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await getattr(self.client, method)(id=request_id, **params)
        return await asyncio.wait_for(future, timeout=10)

    async def receive(self) -> None:
        """Route answers to their requests; keep the index fresh; notice quotes that left the book."""
        while True:
            message = json.loads(await self.client.receive())
            if "id" in message and message["id"] in self.pending:
                self.pending.pop(message["id"]).set_result(message)
            elif message.get("channel_name", "").startswith("price_index."):
                self.index = float(message["notification"]["price"])
            elif message.get("channel_name") == "session.orders":
                if any(o.get("status") in ("filled", "cancelled") for o in message["notification"]):
                    self.quoted = None  # traded or pulled (protection, a bulk cancel): quote again
            elif message.get("channel_name") == "session.mm_protection":
                self.protected = False if _exhausted(message["notification"]) else self.protected

    async def run(self) -> None:
        await self.client.connect()
        receiver = asyncio.create_task(self.receive())
        key = await asyncio.to_thread(Path(self.args.key_file).read_text, encoding="utf-8")
        answer = await self.request("login", key_id=self.args.key_id, private_key=key)
        if "error" in answer:
            raise SystemExit(
                f"mass_quoter: login failed for key id {self.args.key_id}: {answer['error']['message']}"
            )
        await self.request("set_cancel_on_disconnect", timeout_secs=5)
        instrument = (await self.request("instrument", instrument_name=self.args.instrument))["result"]
        self.tick_size = float(instrument["tick_size"])
        self.product = instrument.get("product") or f"F{instrument['underlying']}"
        await self.request("public_subscribe", channels=[f"price_index.{instrument['underlying']}"])
        await self.request("private_subscribe", channels=["session.orders", "session.mm_protection"])
        log.info("%s mass-quoting %s (size %s, %s bps each side, protection %s of %s)", self.args.name,
                 self.args.instrument, self.args.size, self.args.spread_bps, self.args.trade_amount,
                 self.product)
        try:
            while True:
                await self.cycle()
                await asyncio.sleep(self.args.interval)
        finally:
            receiver.cancel()

    async def cycle(self) -> None:
        """One quote cycle; the halt check comes first, always."""
        halt = await self.redis.hgetall(self.halt_key)
        if halt:
            await self.stand_down({k.decode(): v.decode() for k, v in halt.items()})
            return
        if self.acked_halt is not None:
            log.info("halt lifted: quoting again")
            self.acked_halt = None
        if self.index is None:
            return
        spread = self.args.spread_bps / 10_000
        bid = self._round(self.index * (1 - spread), down=True)
        ask = self._round(self.index * (1 + spread), down=False)
        near = self.args.requote_bps / 10_000
        if self.quoted is not None and all(
            abs(old - new) / new <= near for old, new in zip(self.quoted, (bid, ask), strict=True)
        ):
            return
        await self.quote(bid, ask)

    async def protect(self) -> bool:
        """(Re)fill this session's protection group of the product; needed before the first quote,
        after it was used up, and after any `cancel_mass_quote` on the account."""
        answer = await self.request("set_mm_protection", product=self.product,
                                    trade_amount=self.args.trade_amount,
                                    quote_amount=max(self.args.size, self.args.trade_amount))
        self.protected = "result" in answer
        if not self.protected:
            log.warning("set_mm_protection refused: %s", answer.get("error"))
        return self.protected

    async def quote(self, bid: float, ask: float) -> None:
        if not self.protected and not await self.protect():
            return
        if await self.redis.exists(self.halt_key):  # re-checked right before sending: the race is ~1 ms
            return
        size = self.args.size
        sides = thalex.SideQuote(bid, size), thalex.SideQuote(ask, size)
        answer = await self.request(
            "mass_quote",
            quotes=[thalex.Quote(self.args.instrument, *sides)],
            label=f"mq-{self.args.name}"[:32],
            post_only=True,
        )
        result = answer.get("result") or {}
        if result.get("n_fail", 1) == 0:
            self.quoted = (bid, ask)
            return
        self.quoted = None
        errors = result.get("errors") or [answer.get("error")]
        if any("protection" in str((e or {}).get("message", "")) for e in errors):
            self.protected = False  # used up or reset by a bulk cancel: refilled before the next quote
        log.info("mass quote refused: %s", errors)

    async def stand_down(self, halt: dict[str, str]) -> None:
        """Pull this session's quotes (amounts 0: the protection group stays) and acknowledge."""
        command_id = halt.get("command_id", "")
        if self.quoted is not None:
            price = self.index or 1.0
            await self.request("mass_quote", quotes=[thalex.Quote(
                self.args.instrument, thalex.SideQuote(self._round(price, True), 0),
                thalex.SideQuote(self._round(price, False), 0))])
            self.quoted = None
        seen = command_id or halt.get("reason")
        if self.acked_halt != seen:
            self.acked_halt = seen
            ack = {"v": 1, "ts": time.time(), **({"command_id": command_id} if command_id else {})}
            await self.redis.hset(self.acks_key, self.args.name, json.dumps(ack))
            log.info("halt (%s %s): quotes pulled, acknowledged", halt.get("reason"), command_id)

    def _round(self, price: float, down: bool) -> float:
        steps = price / self.tick_size
        return round((math.floor(steps) if down else math.ceil(steps)) * self.tick_size, 10)


def _exhausted(notification: Any) -> bool:
    """A `session.mm_protection` notice that this session's group is used up or was reset."""
    rows = notification if isinstance(notification, list) else [notification]
    return any(isinstance(r, dict) and float(r.get("remaining_amount", 1.0) or 0.0) <= 0.0 for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="A perpetual market maker on mass quotes under protection that obeys thalex-tp."
    )
    parser.add_argument("--url", required=True, help="exchange websocket URL")
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--key-file", required=True, help="the trading key's private PEM")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="tp", help="the guardian's [redis] namespace")
    parser.add_argument("--name", default="mass-quoter", help="this bot's name in tp:halt:acks")
    parser.add_argument("--instrument", default="BTC-PERPETUAL")
    parser.add_argument("--size", type=float, default=0.01,
                        help="each side's amount")
    parser.add_argument("--trade-amount", type=float, default=0.01,
                        help="protection: how much of the quotes may trade before the exchange pulls them "
                             "(Thalex: at most quote_amount, which is the larger of this and --size)")
    parser.add_argument("--spread-bps", type=float, default=5.0, help="distance of each quote from the index")
    parser.add_argument("--requote-bps", type=float, default=2.0,
                        help="requote when the target moved this far")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between quote cycles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mass_quoter %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(MassQuoter(args).run())


if __name__ == "__main__":
    main()
