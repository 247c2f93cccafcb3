"""An options market maker's book on the paper exchange: hundreds of positions, ticks on all of them.

Shared by the fault test with 1,000 positions and the benchmarks (`bench/latency.py --positions`,
`bench/throughput_pipeline.py`):

* `paper_module(extra)`: the argv that runs the stock paper exchange with `extra` more BTC options
  (it lists 28 instruments; this file is that process's entry point);
* `open_positions`: N positions spread over the perpetuals, futures and options it lists (`paper/trades`,
  200 a call: one portfolio notification per call, not per position);
* `TickLoad`: ticks on the positions' instruments at a given rate, spread evenly, while a test or a
  trial runs (`paper/resend_market_data`: raw tickers and books sent again, and no price moves,
  so no figure does either).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[2]))

from tests.e2e.harness import PERP, TRADER_KEY, Pipeline, eventually_value  # noqa: E402

STOCK_INSTRUMENTS = 20
"""Instruments of the stock paper exchange that `open_positions` may use besides the extra options."""
TICKS_PER_SECOND = 2_000
"""The tick load of issue 22: ticker messages a second, on every open position."""
SLICES_PER_SECOND = 50
"""How often `TickLoad` sends its next slice (20 ms apart: 40 instruments a slice at 2,000 a second)."""
TRADES_PER_CALL = 200
"""`paper/trades` per control call: the portfolio lines and summary go out once per call, and the
answer (every trade) stays a modest message."""


def paper_module(extra: int) -> list[str]:
    """`Pipeline.paper_module` for a paper exchange with `extra` more BTC options."""
    return [str(HERE), "--extra", str(extra)]


def serve_paper(argv: list[str]) -> int:
    """`--extra N <paper args>`: the stock paper exchange plus N extra BTC options."""
    extra = int(argv[argv.index("--extra") + 1])
    rest = [a for i, a in enumerate(argv) if a != "--extra" and (i == 0 or argv[i - 1] != "--extra")]
    from services.paper import cli
    from services.paper.market import Instrument

    original = cli.PaperExchange.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        market = self.market
        template = next(
            i for i in market.instruments.values() if i.kind == "option" and i.underlying == "BTCUSD"
        )
        index = market.index["BTCUSD"]
        for n in range(extra):  # in the money (a worthless option's book is priced at 0: held as suspect)
            call = n % 2 == 1
            strike = round(index / 50) * 50 + (-1 if call else 1) * (1_000 + 50 * (n // 2))
            name = f"BTC-X{n}-{strike}-{'C' if call else 'P'}"
            market.instruments[name] = Instrument(
                name, template.product, "option", "BTCUSD", template.tick_size, template.volume_tick_size,
                template.min_order_amount, template.create_time, template.expiry_ts,
                "call" if call else "put", float(strike))

    cli.PaperExchange.__init__ = init  # type: ignore[method-assign]
    return cli.paper_main(rest)


async def instruments(pipeline: Pipeline) -> dict[str, float]:
    """Instrument name -> its minimum order amount, as the paper exchange lists them (no combinations:
    buying one trades its legs, a future spread sells the perpetual)."""
    import websockets
    async with websockets.connect(pipeline.paper_url, max_size=None) as ws:
        await ws.send(json.dumps({"method": "public/instruments", "params": {}, "id": 1}))
        while True:
            answer = json.loads(await ws.recv())
            if answer.get("id") == 1:
                return {i["instrument_name"]: float(i["min_order_amount"]) for i in answer["result"]
                        if i.get("type") in ("perpetual", "future", "option")}  # a combination trades legs


def position_names(listed: dict[str, float], count: int) -> list[str]:
    """The instruments `open_positions` buys for `count` positions (`listed`: `instruments()`)."""
    names = [PERP, *(n for n in listed if n != PERP and "-" in n)][:count]
    if len(names) < count:
        raise RuntimeError(f"the paper lists only {len(names)} instruments; start it with more (--extra)")
    return names


async def open_positions(pipeline: Pipeline, count: int, *, first: int = 0, wait: bool = True,
                         key: str = TRADER_KEY) -> dict[str, float]:
    """Buy instruments `first` .. `count - 1` of the list (the BTC perpetual, then every other one
    listed) on the guardian's account, each its minimum order amount (0.01 of the perpetual); with
    `wait`, until the portfolio shows `count` open positions. Returns instrument -> amount bought."""
    listed = await instruments(pipeline)
    names = position_names(listed, count)
    bought = {name: 0.01 if name == PERP else listed[name] for name in names[first:]}
    batch = [{"instrument_name": name, "direction": "buy", "amount": amount}
             for name, amount in bought.items()]
    for start in range(0, len(batch), TRADES_PER_CALL):
        await pipeline.control("paper/trades",
                               {"key_id": key, "trades": batch[start:start + TRADES_PER_CALL]})
    if wait:
        await wait_open(pipeline, count // 2)
    return bought


async def wait_open(pipeline: Pipeline, at_least: int = 1, within: float = 180.0) -> int:
    """Until the portfolio's newest snapshot shows as many open positions as the exchange holds (at
    least `at_least`); returns that count."""
    seen: list[int] = []

    async def shown() -> int | None:
        held = sum(1 for amount in (await pipeline.exchange_positions()).values() if abs(amount) > 1e-9)
        snap = await pipeline.latest_snapshot()
        seen[:] = [held, -1 if snap is None else snap["open_positions"]]
        return held if held >= at_least and seen[1] == held else None
    try:
        return await eventually_value(shown, within=within, interval=0.5)
    except AssertionError:
        raise AssertionError(f"exchange holds {seen[0]} positions, the portfolio shows {seen[1]}") from None


class TickLoad:
    """Ticks on the named instruments, `per_second` ticker messages a second spread evenly, until stopped.

    Every 1/`SLICES_PER_SECOND` s the next instruments of the list (round robin) have their raw
    ticker and book sent again, prices unchanged (`paper/resend_market_data`), as Thalex's
    per-instrument feeds arrive: a steady stream, not one burst of every instrument at once. When the
    list is shorter than a slice, tickers of the BTC perpetual (`paper/burst_ticks`) make up the rate.
    """

    def __init__(self, pipeline: Pipeline, names: list[str], per_second: int = TICKS_PER_SECOND) -> None:
        if not names:
            raise ValueError("a tick load needs instruments")
        self.pipeline = pipeline
        self.names = names
        self.per_second = per_second
        self.task: asyncio.Task[None] | None = None
        self.sent = 0
        self.stopping = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop after the slice in flight. The flag, not only the cancel: Python 3.11's `wait_for`
        (under `PaperControl.call`) can swallow a cancel that lands as its answer arrives, and a load
        that missed it ran on while `stop` waited for it forever (a bench hung after its trials)."""
        self.stopping = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    async def _run(self) -> None:
        await self.pipeline.control("paper/pause")
        per_slice = max(1, round(self.per_second / SLICES_PER_SECOND))
        resent = min(per_slice, len(self.names))
        burst = per_slice - resent
        period = 1.0 / SLICES_PER_SECOND
        first, next_at = 0, time.perf_counter()
        while not self.stopping:
            chunk = [self.names[(first + i) % len(self.names)] for i in range(resent)]
            first = (first + resent) % len(self.names)
            await self.pipeline.control("paper/resend_market_data", {"instruments": chunk})
            if burst:
                await self.pipeline.control("paper/burst_ticks", {"instrument_name": PERP, "count": burst})
            self.sent += per_slice
            next_at += period
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))


if __name__ == "__main__":
    sys.exit(serve_paper(sys.argv[1:]))
