"""The curve of issue 22: what a batch costs, and ticks/s, with 1 / 100 / 1,000 / 5,000 open positions.

    .venv/bin/python bench/batch_curve.py [--positions 1 100 1000 5000] [--changed 20] [--ticks 100000]

Snapshots v2 carry the totals and only the rows a batch changed (docs/streams.md), so a batch
should cost what it changed, not what is held. Per number of open positions N (perpetuals, one
tick changes one position), with a batch of ticks that changes `--changed` positions:

1. the portfolio's CPU per batch, pure (no Redis): applying the ticks, building the snapshot it
   publishes (v2: `Ledger.publish`, a delta) and encoding it with its changed rows for the
   transaction — against the v1 form (`Ledger.snapshot`, every row) in the same run;
2. take-profit's CPU per snapshot: validating the entry, folding it (`SnapshotView`), evaluating
   it (`RulesEngine.on_snapshot`) and checkpointing (`to_state`) — against the v1 form;
3. `--ticks` ticks drained by the real portfolio process (`python -m services.portfolio`) from a
   backlog in a real Redis (`bench/portfolio_throughput.py`, part 3): ticks/s and snapshots.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from portfolio_throughput import INFO, instrument, opening_fill, service_throughput, ticks_for

from services.common.bus import encode_document, encode_document_bytes, entry_fields, validate_entry
from services.common.config import PortfolioTakeProfit, Settings
from services.common.contracts import Snapshot
from services.common.snapshots import encode_snapshot
from services.portfolio.ledger import Ledger, LedgerConfig
from services.takeprofit.rules import RulesEngine

TP = PortfolioTakeProfit(min_profit_usd=1e9, partial_close_fraction=0.0, emergency_close_threshold=-1e9,
                         max_position_age_hours=1e6)


def per_call_ms(call: Any, seconds: float = 0.5) -> float:
    once = timeit.timeit(call, number=1)
    number = max(5, int(seconds / max(once, 1e-6)))
    return min(timeit.repeat(call, number=number, repeat=3)) / number * 1000


def ledger_with(n: int, now: float) -> Ledger:
    ledger = Ledger(LedgerConfig.from_settings(Settings()))
    for i in range(n):
        ledger.set_instrument(instrument(i), INFO)
        ledger.apply_fill(opening_fill(i, now))
    for t in ticks_for(n, n, now):
        ledger.apply_tick(t)
    ledger.publish(0, now, 1e9)  # the full one after a start
    return ledger


def portfolio_batch(n: int, changed: int) -> tuple[float, float, Snapshot, Snapshot]:
    """(ms per batch v2, ms per batch v1, a v2 snapshot, a v1 snapshot)."""
    now = time.time()
    ledger = ledger_with(n, now)
    stream = ticks_for(n, 200 * changed, now + 1)  # consecutive ticks are on distinct positions
    batches = [stream[k:k + changed] for k in range(0, 200 * changed, changed)]
    state = {"seq": 1, "k": 0}

    def one(full: bool) -> Snapshot:
        batch = batches[state["k"] % len(batches)]
        state["k"] += 1
        for t in batch:  # a new mark every time: each tick changes its position's row (at 5,000
            # positions the stream visits each one once, at the prices it was opened with)
            ledger.apply_tick(t.model_copy(update={"exchange_ts": t.exchange_ts + state["k"],
                                                   "mark": t.mark + 1e-6 * state["k"]}))
        state["seq"] += 1
        snap = ledger.snapshot(state["seq"], now, 1e9) if full else ledger.publish(state["seq"], now, 1e9)
        if full:
            encode_document(snap)
        else:  # as the service writes it: each row encoded once, for the rows' hash and the entry
            encode_snapshot(snap, [encode_document_bytes(p) for p in snap.positions])
        return snap

    v2 = per_call_ms(lambda: one(False))
    v1 = per_call_ms(lambda: one(True))
    one(False)  # the rows the v1 runs changed
    return v2, v1, one(False), one(True)


def takeprofit_snapshot(delta: Snapshot, full: Snapshot) -> tuple[float, float]:
    """(ms per snapshot v2, v1): validate, fold, evaluate, checkpoint."""
    engine = RulesEngine(TP)
    engine.on_snapshot(full, full.ts + 1)
    seq = {"n": full.seq}

    def one(snap: Snapshot) -> None:
        seq["n"] += 1
        fields = entry_fields(snap.model_copy(update={"seq": seq["n"]}))
        doc = validate_entry(Snapshot, fields)
        engine.view.fold(doc)
        engine.on_snapshot(doc, doc.ts + 1)
        engine.to_state()

    return per_call_ms(lambda: one(delta)), per_call_ms(lambda: one(full))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, nargs="+", default=[1, 100, 1000, 5000])
    parser.add_argument("--changed", type=int, default=20)
    parser.add_argument("--ticks", type=int, default=100_000)
    parser.add_argument("--skip-service", action="store_true")
    args = parser.parse_args()
    print(f"per batch changing min(N, {args.changed}) positions; v1 = every row in every snapshot (before)")
    print(f"{'N':>6} | {'portfolio v2 ms':>15} {'v1 ms':>8} | {'take-profit v2 ms':>17} {'v1 ms':>8} | "
          f"{'entry KB v2':>11} {'v1':>7} | service ticks/s")
    for n in args.positions:
        changed = min(n, args.changed)
        p2, p1, delta, full = portfolio_batch(n, changed)
        t2, t1 = takeprofit_snapshot(delta, full)
        size2, size1 = len(encode_document(delta)) / 1024, len(encode_document(full)) / 1024
        rate = "" if args.skip_service else \
            f"{asyncio.run(service_throughput(args.ticks, 500, n)):,.0f}"
        print(f"{n:>6} | {p2:15.3f} {p1:8.3f} | {t2:17.3f} {t1:8.3f} | {size2:11.1f} {size1:7.1f} | {rate}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
