"""CPU a full closure of N legs costs before its first order, piece by piece (issue 22).

    .venv/bin/python bench/command_costs.py [--legs 1 100 1000] [--runs 10]

Pure code, no I/O, `time.process_time` (CPU, not wall: less sensitive to a shared machine), the
mean of `--runs`: take-profit deciding on a header with N open option rows (its legs kept ready,
as after the rows were folded), building, signing and encoding the command (once, and as before
issue 22's sixth pass), its checkpoint with that closure in flight, and keeping legs ready (20
changed rows; all of them at a restart); the executor validating the command from the wire (its
legs as columns, `tp:commands` v2, and the same command as v1, a row per leg, as before issue 22's
eighth pass), verifying its signature (over the entry's bytes, and over the command written again), checking
the first wave (on bounds, against pricing every leg) and pricing its head order, the compact
claim, and the full progress built once the first order is written (with the wave's compact
`order_sent` intent); how long after a wave of N orders is handed over its first send starts,
with every send set up first (`asyncio.gather` of all) and with the first one ahead (the
executor's `_send_decision_wave`), wall time; and one snapshot row
built by the validating constructor against `model_construct`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from timeit import Timer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.bus import encode_document, read_document
from services.common.contracts import (
    Command,
    ExitPriceSource,
    InstrumentInfo,
    InstrumentType,
    PositionToClose,
    Snapshot,
    SnapshotPosition,
)
from services.common.signing import sign_command, signed_text, verify_command
from services.executor.plan import CommandWave, Progress
from services.executor.waves import Buffers, DecisionWave, expand_claim, wave_from_command, wave_refusal
from services.takeprofit.rules import Decision, RulesEngine, build_command
from tests.takeprofit.factories import NOW, cfg, pos, snap

KEY = b"k" * 32
OPTION = InstrumentInfo(type=InstrumentType.OPTION, product="OBTCUSD", underlying="BTCUSD", tick_size=5.0,
                        volume_tick_size=0.01, min_order_amount=0.01)
BUFFERS = Buffers(0.005, 0.05)


def cpu_ms(work: Callable[[], object], runs: int) -> float:
    return Timer(work, timer=time.process_time).timeit(runs) / runs * 1000


def command_of(legs: int) -> Command:
    """Take-profit's emergency stop on a book of `legs` option rows, as it builds and signs it."""
    engine, crossing = book(legs)
    decision = engine.on_snapshot(crossing, NOW + 1)
    assert decision is not None
    return sign_command(build_command(decision, NOW + 1, 30.0), KEY)


def book(legs: int) -> tuple[RulesEngine, Snapshot]:
    """An engine holding `legs` open option rows (each held whole by the book), and the crossing header."""
    rows = [pos(f"BTC-X{i}-100000-C", 0.1, instrument_type=InstrumentType.OPTION)
            .model_copy(update={"exit_within_depth": True}) for i in range(legs)]
    engine = RulesEngine(cfg(confirm_snapshots=1, partial_close_fraction=0.0))
    engine.on_snapshot(snap(1, 0.5, positions=rows).model_copy(update={"open_positions": legs}), NOW)
    return engine, snap(2, 2.0, positions=[]).model_copy(
        update={"full": False, "open_positions": legs, "ts": NOW + 1})


def take_profit(legs: int, runs: int) -> str:
    engine, crossing = book(legs)
    ready = [restarted(engine) for _ in range(runs)]  # a restart builds every leg once (`legs.py`)
    deciding = iter(ready)

    def decide() -> Decision | None:
        return next(deciding).on_snapshot(crossing, NOW + 1)
    decide_ms = cpu_ms(decide, runs)
    deciding_again = restarted(engine)
    decision = deciding_again.on_snapshot(crossing, NOW + 1)
    assert decision is not None
    built = build_command(decision, NOW + 1, 30.0)
    build = cpu_ms(lambda: build_command(decision, NOW + 1, 30.0), runs)
    changed = [p.model_copy(update={"exit_price": 998.0}) for p in list(engine.view.rows.values())[:20]]
    checkpoint = restarted(engine)  # with the closure in flight: checkpointed with every batch until it ends
    assert checkpoint.on_snapshot(crossing, NOW + 1) is not None
    return (f"decide {decide_ms:.3f}, build {build:.3f}, sign and encode "
            f"{cpu_ms(lambda: signed_text(built, KEY), runs):.3f} (signed and encoded apart: sign "
            f"{cpu_ms(lambda: sign_command(built, KEY), runs):.3f}, encode "
            f"{cpu_ms(lambda: encode_document(built), runs):.3f}), checkpoint "
            f"{cpu_ms(checkpoint.to_state, runs):.3f} ({len(checkpoint.to_state()) / 1000:.1f} KB); "
            f"legs kept ready: 20 changed rows {cpu_ms(lambda: engine.legs.refresh(changed), runs):.3f}, "
            f"all at a restart {cpu_ms(lambda: restarted(engine), runs):.3f}")


def restarted(engine: RulesEngine) -> RulesEngine:
    """The engine as restored from its checkpoint, with the same positions view."""
    again = RulesEngine.from_state(engine.config, engine.to_state())
    again.view = engine.view
    return again


def executor(legs: int, runs: int) -> str:
    command = command_of(legs)
    wire = encode_document(command).encode()  # take-profit's text (`signed_text`): the same bytes
    rows = [PositionToClose(**leg._asdict()) for leg in command.closing().rows()]
    as_rows = encode_document(command.model_copy(update={"v": 1, "legs": None, "positions": rows})).encode()
    infos = dict.fromkeys(command.closing().instrument, OPTION)
    now = command.created_ts
    first = DecisionWave(command, infos, BUFFERS, now)
    wave = first.orders()
    promise = CommandWave(priced_ts=now, buffer=BUFFERS.base, ceiling=BUFFERS.ceiling)

    def claim() -> str:
        return Progress.claimed(command, now, 30.0, promise).model_dump_json()

    def expanded() -> str:
        progress = Progress.claimed(command, now, 30.0, promise)
        expand_claim(progress, command, wave)
        return progress.model_dump_json()
    return (f"validate {cpu_ms(lambda: read_document(Command, wire), runs):.3f} (v1, a row per leg: "
            f"{cpu_ms(lambda: read_document(Command, as_rows), runs):.3f}; its legs as columns "
            f"{cpu_ms(lambda: read_document(Command, as_rows).closing(), runs):.3f}), verify "
            f"{cpu_ms(lambda: verify_command(command, KEY, wire), runs):.3f} (written again: "
            f"{cpu_ms(lambda: verify_command(command, KEY), runs):.3f}), first wave checked "
            f"{cpu_ms(lambda: wave_refusal(command, infos, BUFFERS, now, 1.0), runs):.3f} (every leg priced: "
            f"{cpu_ms(lambda: wave_from_command(command, infos, BUFFERS, now, 1.0), runs):.3f}), its head "
            f"{cpu_ms(first.head, runs):.3f}, claim "
            f"{cpu_ms(claim, runs):.3f} ms; after the first order: the full progress "
            f"{cpu_ms(expanded, runs):.3f} ms; command {len(wire) / 1000:.1f} KB, claim "
            f"{len(claim()) / 1000:.1f} KB, full progress {len(expanded()) / 1000:.1f} KB; as v1 rows "
            f"{len(as_rows) / 1000:.1f} KB")


def first_send(legs: int, runs: int) -> str:
    """ms from handing over a wave of `legs` sends to the first one starting, both ways (mean of `runs`)."""
    async def one(head_first: bool) -> float:
        started: list[float] = []

        async def send(_: int) -> None:
            if not started:
                started.append(time.perf_counter())
            await asyncio.sleep(0)
        begin = time.perf_counter()
        if head_first:
            head = asyncio.ensure_future(send(0))
            await asyncio.sleep(0)
            await asyncio.gather(head, *(send(i) for i in range(1, legs)))
        else:
            await asyncio.gather(*(send(i) for i in range(legs)))
        return (started[0] - begin) * 1000

    def mean(head_first: bool) -> float:
        return sum(asyncio.run(one(head_first)) for _ in range(runs)) / runs
    return (f"first send starts after: every send set up first {mean(False):.3f}, "
            f"first ahead {mean(True):.3f} ms")


def row(runs: int) -> str:
    fields = dict(instrument="BTC-X1-100000-C", position=0.1, avg_entry=1000.0, mark=1001.0,
                  exit_price=999.0, exit_price_source=ExitPriceSource.BOOK, exit_within_depth=True,
                  realized_pnl=0.0, unrealized_pnl=0.1, funding_pnl=0.0, fees_paid=0.03, est_close_fee=0.03,
                  est_slippage=0.2, opened_ts=1.7e9, underlying="BTCUSD",
                  instrument_type=InstrumentType.OPTION, expiry_ts=1.8e9, volume_tick_size=0.01)
    many = runs * 1000
    validated = cpu_ms(lambda: SnapshotPosition(**fields), many) * 1000
    constructed = cpu_ms(lambda: SnapshotPosition.model_construct(**fields), many) * 1000
    return f"row: validating constructor {validated:.2f} us, model_construct {constructed:.2f} us"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--legs", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    for legs in args.legs:
        print(f"{legs:>5} legs  take-profit (ms CPU): {take_profit(legs, args.runs)}")
        print(f"{legs:>5} legs  executor (ms CPU): {executor(legs, args.runs)}")
        print(f"{legs:>5} legs  executor (ms wall): {first_send(legs, args.runs)}")
    print(row(args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
