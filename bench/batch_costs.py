"""What one batch costs in CPU besides the handler's own logic: decoding an entry, checkpointing state.

    .venv/bin/python bench/batch_costs.py [--positions 1000] [--trade-ids 10000]

Pure CPU, no Redis, no processes. Prints, for a tick and for a snapshot of `--positions` positions:

1. validating a stream entry: `bus.validate_entry` (pydantic parses and validates the JSON in one
   pass) against the former way, `json.loads` then `model_validate`;
2. take-profit's checkpoint, which carries the last snapshot: `RulesEngine.to_state` (pydantic's
   JSON) against `json.dumps(model_dump())`;
3. the portfolio's ledger checkpoint with `--positions` instruments and `--trade-ids` remembered
   trade ids: `pydantic_core.to_json` (what the service writes) against `json.dumps`;
4. take-profit's whole snapshot handler when it decides (one position): rules, command, lease,
   checkpoint and halt queued on a transaction pipeline that is never sent — the handler's own
   CPU, hot, to set against its 0.3-0.4 ms of wall time at a move (docs/performance.md);
5. issue 21's checks on the reaction's path: the portfolio's `PriceGuard.check` of one plausible
   tick (every tick), and signing / verifying one command (take-profit, the executor).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pydantic_core
from portfolio_throughput import INFO, instrument, opening_fill, ticks_for

from services.common.bus import DATA_FIELD, Bus, Delivery, encode_document, validate_entry
from services.common.config import Settings
from services.common.contracts import (
    CloseReason,
    Command,
    InstrumentInfo,
    InstrumentType,
    PositionToClose,
    Side,
    Snapshot,
    Tick,
)
from services.common.signing import sign_command, verify_command
from services.executor.plan import close_price, reference_price
from services.executor.waves import Quote, wave_price
from services.portfolio.ledger import Ledger, LedgerConfig
from services.portfolio.prices import PriceGuard
from services.takeprofit.app import TakeProfitService
from services.takeprofit.rules import External, RulesEngine


def per_call_ms(call: Any, seconds: float = 1.0) -> float:
    """Milliseconds per call, timed over about `seconds` (at least 5 calls)."""
    once = timeit.timeit(call, number=1)
    number = max(5, int(seconds / max(once, 1e-6)))
    return min(timeit.repeat(call, number=number, repeat=3)) / number * 1000


def row(what: str, now_ms: float, before_ms: float) -> None:
    print(f"  {what:<58} {now_ms:9.4f} ms   before {before_ms:9.4f} ms   ({before_ms / now_ms:4.1f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--positions", type=int, default=1000)
    parser.add_argument("--trade-ids", type=int, default=10_000)
    args = parser.parse_args()
    now = time.time()
    ledger = Ledger(LedgerConfig.from_settings(Settings()))
    for i in range(args.positions):
        ledger.set_instrument(instrument(i), INFO)
    for k in range(max(args.trade_ids, args.positions)):
        fill = opening_fill(k % args.positions, now)
        ledger.apply_fill(fill.model_copy(update={"trade_id": f"t{k}", "exchange_ts": now + k * 1e-3}))
    for tick in ticks_for(args.positions, args.positions, now):
        ledger.apply_tick(tick)
    snapshot = ledger.snapshot(1, now, 3600.0)
    tick = ticks_for(1, 1, now)[0]

    print("1) validating one stream entry (now: validate_entry; before: json.loads + model_validate)")
    for name, model, doc in (
        ("tick", Tick, tick),
        (f"snapshot, {args.positions} positions", Snapshot, snapshot),
    ):
        text = encode_document(doc)
        fields = {DATA_FIELD.encode(): text.encode()}
        row(f"{name} ({len(text):,} bytes)", per_call_ms(lambda m=model, f=fields: validate_entry(m, f)),
            per_call_ms(lambda m=model, t=text: m.model_validate(json.loads(t))))

    engine = RulesEngine(Settings().portfolio_take_profit)
    engine.on_snapshot(snapshot, now, External())
    print("2) take-profit's checkpoint (carries the last snapshot)")
    row(f"RulesEngine.to_state, {args.positions} positions", per_call_ms(engine.to_state),
        per_call_ms(lambda: json.dumps(engine._s.model_dump(mode="json"))))

    state = ledger.to_state(with_ticks=False)
    size = len(pydantic_core.to_json(state))
    print(
        f"3) the portfolio's ledger checkpoint ({args.positions} instruments, "
        f"{min(args.trade_ids, LedgerConfig.from_settings(Settings()).dedup_window):,} remembered trade ids, "
        f"{size / 1000:,.0f} KB)"
    )
    row(
        "to_state + pydantic_core.to_json",
        per_call_ms(
            lambda: pydantic_core.to_json(ledger.to_state(with_ticks=False), inf_nan_mode="constants")
        ),
        per_call_ms(lambda: json.dumps(ledger.to_state(with_ticks=False))),
    )

    print("4) take-profit's snapshot handler when it decides (one position, pipeline never sent)")
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"),  # noqa: SIM115 - open until exit
                        format="%(asctime)s takeprofit %(levelname)s %(name)s: %(message)s")
    print(
        f"  {'TakeProfitService.on_snapshots, median of 2,000':<58} "
        f"{asyncio.run(deciding_handler_ms()):9.4f} ms"
    )

    print("5) issue 21's checks on the reaction's path")
    guard = PriceGuard()
    guard.set_type(tick.instrument, InstrumentType.PERPETUAL)
    guard.trust(tick)
    later = tick.model_copy(update={"exchange_ts": tick.exchange_ts + 1.0})
    print(f"  {'PriceGuard.check, one plausible tick':<58} {per_call_ms(lambda: guard.check(later)):9.4f} ms")
    position = PositionToClose(instrument=tick.instrument, amount=0.01, exit_price=1.0, mark=1.0)
    command = Command(command_id="e1-take_profit-s1-n1", epoch=1, reason=CloseReason.TAKE_PROFIT,
                      positions=[position], snapshot_seq=1, net_pnl=1.2, threshold=1.1, created_ts=now,
                      deadline_ts=now + 30)
    key = b"k" * 32
    signed = sign_command(command, key)
    print(f"  {'sign_command, one position':<58} {per_call_ms(lambda: sign_command(command, key)):9.4f} ms")
    verifying = per_call_ms(lambda: verify_command(signed, key))
    print(f"  {'verify_command, one position':<58} {verifying:9.4f} ms")
    perpetual = InstrumentInfo(type=InstrumentType.PERPETUAL, product="FBTCUSD", underlying="BTCUSD",
                               tick_size=1.0, volume_tick_size=0.001, min_order_amount=0.001)
    quote = Quote(mark=100_000.0, best_bid=99_990.0, best_ask=100_010.0, delta=1.0, index=100_000.0)
    unbounded = per_call_ms(lambda: close_price(Side.SELL, reference_price(
        Side.SELL, quote.best_bid, quote.best_ask, quote.mark), 0.005, 1.0))
    bounded = per_call_ms(lambda: wave_price(Side.SELL, quote, perpetual, 0.005, 0.1))
    print(f"  {'one leg of a wave priced, no index bound (before)':<58} {unbounded:9.4f} ms")
    print(f"  {'one leg of a wave priced with the index bound (wave_price)':<58} {bounded:9.4f} ms")
    return 0


async def deciding_handler_ms(calls: int = 2000) -> float:
    """Median ms of one deciding `on_snapshots`, a fresh engine each call (no cool-down).

    Its DECISION log line is formatted and written as in the service (to /dev/null: `main`).
    """
    settings = Settings()
    settings = settings.model_copy(update={"portfolio_take_profit": settings.portfolio_take_profit.model_copy(
        update={"cooldown_seconds": 0.0})})
    bus = Bus("redis://127.0.0.1:1", settings.names, "takeprofit")  # never connected: nothing is sent
    service = TakeProfitService(settings, bus, "bench", command_key=b"k" * 32)  # signing is part of the cost
    one = ledger_with_one_position()
    service.volume_ticks = {p.instrument: 0.001 for p in one.positions}
    times = []
    for seq in range(calls):
        service.engine = RulesEngine(settings.portfolio_take_profit)
        service.lease_held = False
        snap = one.model_copy(update={"seq": seq + 1, "ts": time.time(), "net_after_close": 1.5})
        pipe = bus.redis.pipeline(transaction=True)
        start = time.perf_counter()
        await service.on_snapshots([Delivery("1-0", snap, 1, encode_document(snap))], pipe)
        times.append(time.perf_counter() - start)
        assert service.lease_held, "the benchmark must time a deciding snapshot"
        await pipe.reset()
    return statistics.median(times) * 1000


def ledger_with_one_position() -> Snapshot:
    now = time.time()
    ledger = Ledger(LedgerConfig.from_settings(Settings()))
    ledger.set_instrument(instrument(0), INFO)
    ledger.apply_fill(opening_fill(0, now))
    for tick in ticks_for(1, 1, now):
        ledger.apply_tick(tick)
    return ledger.snapshot(1, now, 3600.0)


if __name__ == "__main__":
    sys.exit(main())
