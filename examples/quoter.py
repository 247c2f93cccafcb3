"""A small perpetual market maker that obeys the guardian — the pattern for plugging in any bot.

It quotes one bid and one ask around the index on the official `thalex` client
and amends them when the index moves. What makes it a good citizen next to
thalex-tp is three habits, each a few lines below:

1. **Check `tp:halt` before every quote cycle** (one HGETALL). While a halt is
   set — a closure running, its cool-down, an operator halt, a failed closure —
   quote nothing and pull the quotes you have.
2. **Acknowledge the halt** in the `tp:halt:acks` hash (`HSET tp:halt:acks
   <your name> {"v":1,"command_id":...,"ts":...}`), so `thalex-tp status` shows
   the operator which bots have stood down.
3. **Set cancel-on-disconnect**, so a crashed bot leaves no live orders behind.

The executor also cancels every open order of the account before closing, as a
backstop for a bot that ignores the halt — but a bot that keeps quoting would
rebuild the position the guardian is closing.

Run it (the demo does):

    python examples/quoter.py --url ws://127.0.0.1:8765/ws/api/v2 --key-id demo-quoter \\
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

log = logging.getLogger("quoter")


class Quoter:
    """Two-sided quotes around the index, standing down whenever the guardian says so."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = thalex.Thalex(types.SimpleNamespace(value=args.url))
        self.redis = redis.Redis.from_url(args.redis_url)
        self.halt_key = f"{args.namespace}:halt"
        self.acks_key = f"{args.namespace}:halt:acks"
        self.index: float | None = None
        self.tick_size = 1.0
        self.quotes: dict[str, dict[str, Any]] = {}  # side -> {"order_id", "price"}
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
        """Route answers to their requests; keep the index fresh."""
        while True:
            message = json.loads(await self.client.receive())
            if "id" in message and message["id"] in self.pending:
                self.pending.pop(message["id"]).set_result(message)
            elif message.get("channel_name", "").startswith("price_index."):
                self.index = float(message["notification"]["price"])
            elif message.get("channel_name") == "session.orders":
                for order in message["notification"]:
                    self._forget_if_done(order)

    def _forget_if_done(self, order: dict[str, Any]) -> None:
        if order.get("status") in ("filled", "cancelled"):
            for side, quote in list(self.quotes.items()):
                if quote["order_id"] == order.get("order_id"):
                    del self.quotes[side]

    async def run(self) -> None:
        await self.client.connect()
        receiver = asyncio.create_task(self.receive())
        key = await asyncio.to_thread(Path(self.args.key_file).read_text, encoding="utf-8")
        answer = await self.request("login", key_id=self.args.key_id, private_key=key)
        if "error" in answer:
            raise SystemExit(
                f"quoter: login failed for key id {self.args.key_id}: {answer['error']['message']}"
            )
        await self.request("set_cancel_on_disconnect", timeout_secs=5)
        instrument = await self.request("instrument", instrument_name=self.args.instrument)
        self.tick_size = float(instrument["result"]["tick_size"])
        underlying = instrument["result"]["underlying"]
        await self.request("public_subscribe", channels=[f"price_index.{underlying}"])
        await self.request("private_subscribe", channels=["session.orders"])
        log.info("%s quoting %s (size %s, %s bps each side)", self.args.name, self.args.instrument,
                 self.args.size, self.args.spread_bps)
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
        targets = {"buy": self._round(self.index * (1 - spread), down=True),
                   "sell": self._round(self.index * (1 + spread), down=False)}
        for side, price in targets.items():
            quote = self.quotes.get(side)
            if quote is None:
                await self.place(side, price)
            elif abs(quote["price"] - price) / price > self.args.requote_bps / 10_000:
                await self.amend(side, price)

    async def stand_down(self, halt: dict[str, str]) -> None:
        command_id = halt.get("command_id", "")
        if self.quotes:
            await self.request("cancel_session")
            self.quotes.clear()
        if self.acked_halt != (command_id or halt.get("reason")):
            self.acked_halt = command_id or halt.get("reason")
            ack = {"v": 1, "ts": time.time(), **({"command_id": command_id} if command_id else {})}
            await self.redis.hset(self.acks_key, self.args.name, json.dumps(ack))
            log.info("halt (%s %s): quotes pulled, acknowledged", halt.get("reason"), command_id)

    async def place(self, side: str, price: float) -> None:
        if await self.redis.exists(self.halt_key):  # re-checked right before sending: the race is ~1 ms
            return
        answer = await self.request(
            "insert",
            direction=thalex.Direction(side),
            instrument_name=self.args.instrument,
            amount=self.args.size,
            price=price,
            order_type=thalex.OrderType.LIMIT,
            post_only=True,
            label=f"quoter-{self.args.name}"[:32],
        )
        if "result" in answer and answer["result"].get("status") in ("open", "partially_filled"):
            self.quotes[side] = {"order_id": answer["result"]["order_id"], "price": price}

    async def amend(self, side: str, price: float) -> None:
        if await self.redis.exists(self.halt_key):
            return
        quote = self.quotes[side]
        answer = await self.request("amend", order_id=quote["order_id"], price=price, amount=self.args.size)
        if "result" in answer and answer["result"].get("status") in ("open", "partially_filled"):
            quote["price"] = price
        else:
            self.quotes.pop(side, None)

    def _round(self, price: float, down: bool) -> float:
        steps = price / self.tick_size
        return round((math.floor(steps) if down else math.ceil(steps)) * self.tick_size, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description="A perpetual market maker that obeys thalex-tp's halt.")
    parser.add_argument("--url", required=True, help="exchange websocket URL")
    parser.add_argument("--key-id", required=True)
    parser.add_argument("--key-file", required=True, help="the trading key's private PEM")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--namespace", default="tp", help="the guardian's [redis] namespace")
    parser.add_argument("--name", default="quoter", help="this bot's name in tp:halt:acks")
    parser.add_argument("--instrument", default="BTC-PERPETUAL")
    parser.add_argument("--size", type=float, default=0.01)
    parser.add_argument("--spread-bps", type=float, default=5.0, help="distance of each quote from the index")
    parser.add_argument("--requote-bps", type=float, default=2.0, help="amend when the target moved this far")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between quote cycles")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s quoter %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Quoter(args).run())


if __name__ == "__main__":
    main()
