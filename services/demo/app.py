"""`thalex-tp demo`: start everything, script a market, show the guardian locking in profit.

Started as separate processes, like in production: a Redis (the one at
`REDIS_URL`, else one started here), the paper exchange with freshly made keys
(one account; a read-only key for ingest, trading keys for the executor and the
quoter), the four services and notify, and `examples/quoter.py`. A director then plays the
market through the paper exchange's control API: simulated sellers hit the
quoter's bid, the index climbs until the take-profit fires; after the closure
and the cool-down, buyers lift its ask and the index falls, and so on.

At the end (`--duration`, Ctrl-C or SIGTERM) every child is stopped and a
summary printed: epochs closed, P&L banked, fees, and whether the quoter stayed
out of the market while halted.

`--rogue-bot` adds a bot on the same account that does not listen to the halt (the paper's rogue
bot: it re-opens its position after every closure, by turns with a plain order, a mass quote and
a grid bot), with a 5 s cool-down: the guardian's closures of what it rebuilt are counted, the
circuit breaker opens after `breaker_max_repeat_closures` of them, and the summary shows the
closing fees against their documented bound (docs/operations.md, "A bot that does not listen").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from services.common.bus import entry_document
from services.common.config import Settings, load_config
from services.common.contracts import (
    ORDER_KINDS,
    CloseReason,
    Command,
    HaltAck,
    InstrumentType,
    Notification,
    Report,
    ReportStatus,
    Snapshot,
    halt_from_hash,
)
from services.common.redis_server import RedisServer, free_port
from services.common.snapshots import read_view
from services.demo.view import DemoState, operator_hint, render
from services.paper.keys import generate_key
from services.paper.testing import ControlClient

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
QUOTER = REPO / "examples" / "quoter.py"
INSTRUMENT = "BTC-PERPETUAL"
ACCOUNT = "demo"
NAMESPACE = "demo"
QUOTER_KEY = "demo-quoter"
QUOTER_SIZE = 0.05
ROGUE_KEY = "demo-rogue"
ROGUE_POSITION = 0.1
"""The long the rogue bot keeps re-opening (twice the quoter's size: its P&L drives the closures)."""
ROGUE_COOLDOWN_SECONDS = 5
SERVICES = ("ingest", "portfolio", "takeprofit", "executor", "notify")
"""Started in this order; notify runs with no target (it writes tp:notifications, the view shows them)."""
HALT_RACE_GRACE_SECONDS = 0.05
"""A quote already on its way when the halt was written may still arrive this late."""


@dataclass
class Child:
    """One process the demo started and must stop."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def status(self) -> str:
        code = self.process.poll()
        return "running" if code is None else f"exited {code}"


@dataclass
class Demo:
    args: argparse.Namespace
    workdir: Path
    children: list[Child] = field(default_factory=list)
    redis_server: RedisServer | None = None
    settings: Settings | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ start-up

    def start_redis(self) -> str:
        if url := os.environ.get("REDIS_URL"):
            return url
        self.redis_server = RedisServer(self.workdir / "redis", prefer_bundled=True)
        self.redis_server.start()
        return self.redis_server.url

    def make_keys(self) -> Path:
        keys = self.workdir / "keys"
        generate_key(keys, "demo-ingest", read_only=True, account=ACCOUNT)
        generate_key(keys, "demo-executor", account=ACCOUNT)
        generate_key(keys, QUOTER_KEY, account=ACCOUNT)
        if self.args.rogue_bot:
            generate_key(keys, ROGUE_KEY, account=ACCOUNT)
        return keys

    @staticmethod
    def make_command_key(keys: Path) -> Path:
        """The secret take-profit signs commands with and the executor checks (owner-only, like the keys)."""
        path = keys / "command_key.txt"
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(secrets.token_hex(32) + "\n")
        return path

    def write_config(self, redis_url: str, paper_url: str, keys: Path) -> Path:
        config = self.workdir / "demo.toml"
        ports = [free_port() for _ in SERVICES]
        config.write_text(f"""# written by `thalex-tp demo`
[redis]
url = "{redis_url}"
namespace = "{NAMESPACE}"

[thalex]
network = "{paper_url}"
key_id = "demo-ingest"
private_key_file = "{keys / 'demo-ingest.pem'}"

[executor]
key_id = "demo-executor"
private_key_file = "{keys / 'demo-executor.pem'}"
deadline_seconds = 20

[commands]
signing_key_file = "{self.make_command_key(keys)}"

[portfolio_take_profit]
cooldown_seconds = {ROGUE_COOLDOWN_SECONDS if self.args.rogue_bot else 10}
partial_close_fraction = 0
check_interval_seconds = 1

[ingest]
watch_list = ["{INSTRUMENT}"]
ticker_delay = "raw"

[metrics]
{chr(10).join(f"{name}_port = {port}" for name, port in zip(SERVICES, ports, strict=True))}
""")
        return config

    def spawn(self, name: str, argv: list[str]) -> Child:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1"}
        env.pop("REDIS_URL", None)
        # Own session: a Ctrl-C reaches only the demo, which then stops children in order.
        with open(log_path, "ab") as log:  # the child writes to its own copy of the descriptor
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                       start_new_session=True)
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    async def wait_for_port(self, port: int, child: Child, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if child.process.poll() is not None:
                raise RuntimeError(f"{child.name} exited early; see {child.log_path}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{child.name} did not listen on port {port}; see {child.log_path}")

    async def start(self) -> tuple[str, Path]:
        redis_url = self.start_redis()
        keys = self.make_keys()
        paper_port = free_port()
        paper_url = f"ws://127.0.0.1:{paper_port}/ws/api/v2"
        config = self.write_config(redis_url, paper_url, keys)
        # the guardian's configuration for the paper too: its option fees follow [trading_fees]
        paper_args = [
            sys.executable,
            "-m",
            "services.paper",
            "--host",
            "127.0.0.1",
            "--port",
            str(paper_port),
            "--keys",
            str(keys),
            "--control",
            "--seed",
            str(self.args.seed),
            "--reconnect-grace",
            "0",
            "--config",
            str(config),
        ]
        if self.args.scenario:
            paper_args += ["--scenario", str(await asyncio.to_thread(Path(self.args.scenario).resolve))]
        paper = self.spawn("paper", paper_args)
        await self.wait_for_port(paper_port, paper)
        self.settings = load_config(config)
        for name in SERVICES:
            self.spawn(name, [sys.executable, "-m", f"services.{name}", "--config", str(config)])
        for name in SERVICES:
            child = next(c for c in self.children if c.name == name)
            await self.wait_for_port(getattr(self.settings.metrics, f"{name}_port"), child)
        self.spawn(
            "quoter",
            [
                sys.executable,
                str(QUOTER),
                "--url",
                paper_url,
                "--key-id",
                QUOTER_KEY,
                "--key-file",
                str(keys / f"{QUOTER_KEY}.pem"),
                "--redis-url",
                redis_url,
                "--namespace",
                NAMESPACE,
                "--name",
                "demo-quoter",
                "--instrument",
                INSTRUMENT,
                "--size",
                str(QUOTER_SIZE),
            ],
        )
        return paper_url, config

    # ------------------------------------------------------------------ running

    async def read_state(self, redis: Redis) -> DemoState:
        assert self.settings is not None
        names = self.settings.names
        state = DemoState(
            processes={c.name: c.status() for c in self.children}, config=str(self.workdir / "demo.toml")
        )
        view, header = await read_view(redis, names)  # v2 snapshots carry only the changed rows
        if header is not None:
            state.snapshot = view.full_snapshot(header)
        halt: Any = await redis.hgetall(names.halt)  # redis-py's result types are wider than what it returns
        acks: Any = await redis.hgetall(names.halt_acks)
        commands: Any = await redis.xrevrange(names.commands, count=5)
        reports: Any = await redis.xrevrange(names.reports, count=200)
        state.halt = halt_from_hash(halt)
        state.acks = {k.decode(): HaltAck.model_validate_json(v) for k, v in acks.items()}
        state.commands = [Command.model_validate(entry_document(f)[1]) for _, f in commands][::-1]
        for _, fields in reports:
            report = Report.model_validate(entry_document(fields)[1])
            if report.status is ReportStatus.HALT_VIOLATION and report.violation is not None:
                state.violations.insert(0, report.violation)  # who broke a halt: not a step of a closure
                continue
            state.reports.setdefault(report.command_id, []).insert(0, report)
        breaker: Any = await redis.get(names.breaker)
        state.breaker = json.loads(breaker) if breaker else None
        notes: Any = await redis.xrevrange(names.notifications, count=3)
        state.notifications = [Notification.model_validate(entry_document(f)[1]) for _, f in notes][::-1]
        return state

    async def show(self, redis: Redis, halts: dict[str, tuple[float, float | None]]) -> None:
        """Refresh the screen (or log what changed, with --no-ui); remember halt windows."""
        assert self.settings is not None
        last_line = ""
        last_progress = 0.0
        while not self.stop.is_set():
            state = await self.read_state(redis)
            if state.halt is not None and state.halt.command_id:
                known = halts.get(state.halt.command_id, (state.halt.since, None))
                halts[state.halt.command_id] = (known[0], state.halt.until or known[1])
            if self.args.no_ui:
                line = self._progress_line(state)
                if line != last_line or time.monotonic() - last_progress > 5:
                    print(line, flush=True)
                    last_line, last_progress = line, time.monotonic()
            else:
                screen = render(
                    state, self.settings.portfolio_take_profit, self.settings.fee_estimation_buffer
                )
                sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(screen) + "\n")
                sys.stdout.flush()
            dead = [c for c in self.children if c.process.poll() is not None]
            if dead:
                print(f"demo: {dead[0].name} stopped unexpectedly; see {dead[0].log_path}", file=sys.stderr)
                self.stop.set()
            await asyncio.sleep(0.1 if self.args.no_ui else 0.5)

    @staticmethod
    def _progress_line(state: DemoState) -> str:
        snap = state.snapshot
        parts = [time.strftime("%H:%M:%S")]
        if snap is not None:
            position = sum(p.position for p in snap.positions)
            parts.append(
                f"epoch {snap.epoch} net_after_close {snap.net_after_close:+.2f} position {position:+.3f}"
            )
        if state.halt is not None:
            parts.append(f"HALT {state.halt.reason} {state.halt.command_id or ''}")
        for command in state.commands[-1:]:
            steps = state.reports.get(command.command_id, [])
            parts.append(
                f"last decision {command.command_id} -> {steps[-1].status.value if steps else 'sent'}"
            )
        return " | ".join(parts)

    async def direct(self, paper_url: str, redis: Redis) -> None:
        """Play the market: fill one side of the quoter, move the index until the guardian takes profit."""
        control = ControlClient(paper_url)
        try:
            await self._direct(control, redis)
        finally:
            await control.close()

    async def _direct(self, control: ControlClient, redis: Redis) -> None:
        assert self.settings is not None
        names = self.settings.names
        await control.call("paper/pause")
        if self.args.rogue_bot:
            await control.start_rogue_bot(ROGUE_KEY, INSTRUMENT, ROGUE_POSITION)
        quiet_since = 0.0
        for cycle in itertools.count():
            side, step = ("buy", 0.02) if cycle % 2 == 0 else ("sell", -0.02)
            while not self.stop.is_set():  # wait until the quoter quotes again after the last halt
                placed = await control.call(
                    "paper/order_log",
                    {"key_id": QUOTER_KEY, "since": quiet_since, "method": "private/insert"},
                )
                if placed["orders"] and not await redis.exists(names.halt):
                    break
                await asyncio.sleep(0.5)
            if self.stop.is_set():
                return
            await asyncio.sleep(1.0)
            filled = await control.call(
                "paper/fill_orders", {"key_id": QUOTER_KEY, "instrument_name": INSTRUMENT, "direction": side}
            )
            if not filled["trades"]:  # the quotes were pulled meanwhile (an operator halt): start over
                quiet_since = time.time()
                continue
            for _ in range(60):
                if self.stop.is_set() or await redis.exists(names.halt):
                    break
                await asyncio.sleep(1.0)
                await control.call("paper/move_index", {"underlying": "BTCUSD", "pct": step})
            if not await redis.exists(names.halt):
                continue  # no closure came (the fill left the quoter flat): its quotes still rest
            quiet_since = time.time()  # halted now: any insert from here on comes after the halt lifts
            while True:  # until the halt lifts (or the demo stops)
                if self.stop.is_set() or not await redis.exists(names.halt):
                    break
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ the end

    async def summarize(
        self, redis: Redis, paper_url: str, halts: dict[str, tuple[float, float | None]]
    ) -> dict[str, Any]:
        assert self.settings is not None
        names = self.settings.names
        entries: Any = await asyncio.gather(
            *(redis.xrange(s) for s in (names.snapshots, names.commands, names.reports))
        )
        snapshots = [Snapshot.model_validate(entry_document(f)[1]) for _, f in entries[0]]
        commands = [Command.model_validate(entry_document(f)[1]) for _, f in entries[1]]
        reports = [Report.model_validate(entry_document(f)[1]) for _, f in entries[2]]
        completed = {r.command_id for r in reports if r.status is ReportStatus.COMPLETED}
        last_of_epoch: dict[int, Snapshot] = {}
        first_of_epoch: dict[int, Snapshot] = {}
        for snap in snapshots:
            last_of_epoch[snap.epoch] = snap
            first_of_epoch.setdefault(snap.epoch, snap)
        closures = []
        for command in commands:
            done = command.command_id in completed
            following = first_of_epoch.get(command.epoch + 1)
            banked = last_of_epoch.get(command.epoch)
            closures.append(
                {
                    "command_id": command.command_id,
                    "reason": command.reason.value,
                    "completed": done,
                    "figure": command.net_pnl,
                    # None: the demo stopped before the next epoch's first snapshot
                    "flat_after": None
                    if following is None
                    else all(abs(p.position) < 1e-9 for p in following.positions),
                    "banked_net_pnl": banked.net_pnl if banked and done else None,
                    "fees": banked.fees_paid if banked and done else None,
                }
            )
        sent: Any = await redis.xrange(names.notifications)
        notes = [Notification.model_validate(entry_document(f)[1]) for _, f in sent]
        violations = await self._quoter_orders_while_halted(paper_url, halts, commands, reports)
        broken = [r.violation for r in reports if r.status is ReportStatus.HALT_VIOLATION and r.violation]
        closed = [c for c in closures if c["completed"] and c["reason"] != CloseReason.CIRCUIT_BREAKER]
        rogue = None
        if self.args.rogue_bot:
            rogue = await self._rogue_summary(redis, paper_url, commands, reports)
        return {
            "rogue_bot": rogue,
            "epochs_closed": len(closed),
            "pnl_banked_usd": sum(c["banked_net_pnl"] or 0.0 for c in closed),
            "fees_usd": sum(c["fees"] or 0.0 for c in closed),
            "closures": closures,
            "quoter_orders_while_halted": violations,
            # issue 19: everything ingest saw on the account during a halt that was not the guardian's,
            # whoever sent it (the demo's quoter, a rogue bot, a Thalex bot, a stop)
            "orders_while_halted": sum(v.kind in ORDER_KINDS for v in broken),
            "halt_violations": [v.model_dump(mode="json", exclude_none=True) for v in broken],
            "notifications": [{"kind": n.kind.value, "title": n.title} for n in notes],
            "children": {c.name: c.status() for c in self.children},
        }

    async def _rogue_summary(self, redis: Redis, paper_url: str, commands: list[Command],
                             reports: list[Report]) -> dict[str, Any]:
        """What the rogue bot made the guardian do: the breaker, the closing fees and their bound.

        Bound (docs/operations.md): (1 + L + E) x f, f = the largest closure's notional x the taker
        rate, L = breaker_max_repeat_closures, E = emergency stops while the breaker was open.
        """
        assert self.settings is not None
        raw: Any = await redis.get(self.settings.names.breaker)
        breaker = json.loads(raw) if raw else {}
        closing = {c.command_id: c for c in commands if c.closing()}
        fees = sum(r.fee or 0.0 for r in reports if r.command_id in closing
                   and r.status in (ReportStatus.FILLED, ReportStatus.PARTIALLY_FILLED))
        notional = max((sum(abs(p.amount) * (p.mark or p.exit_price or 0.0) for p in c.closing().rows())
                        for c in closing.values()), default=0.0)
        prices = [r.avg_price for r in reports if r.command_id in closing and r.avg_price]
        if prices and not notional:  # commands decided on stale prices carry none: the fills' prices
            notional = max(abs(p.amount) for c in closing.values() for p in c.closing().rows()) * max(prices)
        taker = self.settings.trading_fees.products[InstrumentType.PERPETUAL].taker_fee_rate
        limit = self.settings.portfolio_take_profit.breaker_max_repeat_closures
        stops = int(breaker.get("emergency_stops_while_open", 0))
        control = ControlClient(paper_url)
        try:
            rogues = (await control.call("paper/rogue_bots"))["rogue_bots"]
        finally:
            await control.close()
        return {
            "breaker_opened": breaker.get("opened_ts") is not None,
            "repeat_closures": int(breaker.get("repeats_when_opened", len(breaker.get("repeats", [])))),
            "emergency_stops_while_open": stops,
            "closures": len(closing),
            "closing_fees_usd": fees,
            "closing_fee_bound_usd": (1 + limit + stops) * notional * taker,
            "reopened": rogues[0]["reopened"] if rogues else {},
        }

    async def _quoter_orders_while_halted(
        self,
        paper_url: str,
        halts: dict[str, tuple[float, float | None]],
        commands: list[Command],
        reports: list[Report],
    ) -> list[dict[str, Any]]:
        """Quoter inserts/amends the exchange received inside a halt window (beyond the race grace)."""
        windows = []
        for command in commands:
            end = halts.get(command.command_id, (command.created_ts, None))[1]
            if end is None:  # no cool-down seen: the halt held at least until the closure ended
                done = [
                    r.ts
                    for r in reports
                    if r.command_id == command.command_id
                    and r.status in (ReportStatus.COMPLETED, ReportStatus.FAILED)
                ]
                end = max(done) if done else time.time()
            windows.append((command.created_ts + HALT_RACE_GRACE_SECONDS, end))
        control = ControlClient(paper_url)
        try:
            rows = (await control.call("paper/order_log", {"key_id": QUOTER_KEY}))["orders"]
        finally:
            await control.close()
        return [
            row
            for row in rows
            if row.get("method") in ("private/insert", "private/amend", "private/buy", "private/sell")
            and any(start <= row["time"] <= end for start, end in windows)
        ]

    async def shutdown(self) -> None:
        """Stop children in the reverse order of their start: the quoter and services before the exchange."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(child.process.wait, 10)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    await asyncio.to_thread(child.process.wait)
        if self.redis_server is not None:
            self.redis_server.stop()


async def _run(args: argparse.Namespace) -> int:
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="thalex-tp-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    demo = Demo(args, workdir)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: its terminal closed
        loop.add_signal_handler(sig, demo.stop.set)
    halts: dict[str, tuple[float, float | None]] = {}
    summary: dict[str, Any] | None = None
    exit_code = 0
    try:
        paper_url, config = await demo.start()
        assert demo.settings is not None
        if args.no_ui:
            print(operator_hint(str(config)), flush=True)
        redis = Redis.from_url(demo.settings.redis.url)
        tasks = [asyncio.create_task(demo.show(redis, halts))]
        if not args.scenario:
            tasks.append(asyncio.create_task(demo.direct(paper_url, redis)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(demo.stop.wait(), timeout=args.duration or None)
        demo.stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if any(c.process.poll() is not None for c in demo.children):
            exit_code = 1
        summary = await demo.summarize(redis, paper_url, halts)
        await redis.aclose()
    except Exception as exc:  # start-up failures: say what and where the logs are
        print(f"demo: {exc}", file=sys.stderr)
        exit_code = 1
    finally:
        await demo.shutdown()
    if summary is not None:
        print("\n=== thalex-tp demo summary ===")
        print(
            f"epochs closed: {summary['epochs_closed']}   P&L banked: {summary['pnl_banked_usd']:+.4f} USD   "
            f"fees: {summary['fees_usd']:.4f} USD"
        )
        for closure in summary["closures"]:
            print(
                f"  {closure['command_id']}: {closure['reason']} at {closure['figure']:+.4f} -> "
                f"{'completed' if closure['completed'] else 'not completed'}"
                f"{', flat afterwards' if closure['flat_after'] else ''}"
            )
        print(f"orders on the account while halted, not the guardian's: {summary['orders_while_halted']} "
              f"(seen by ingest; halt violations of every kind: {len(summary['halt_violations'])}); "
              f"the demo quoter's own: {len(summary['quoter_orders_while_halted'])}")
        if summary["rogue_bot"] is not None:
            print(_rogue_lines(summary["rogue_bot"]))
        print(
            f"notifications: {len(summary['notifications'])} "
            "(sent to the [notify] targets; the demo has none)"
        )
        if args.summary_json:
            await asyncio.to_thread(Path(args.summary_json).write_text, json.dumps(summary, indent=2))
    removed = not keep and exit_code == 0
    if removed:
        shutil.rmtree(workdir, ignore_errors=True)
    print(_where_things_are(workdir, keep, removed))
    return exit_code


def _rogue_lines(rogue: dict[str, Any]) -> str:
    reopened = ", ".join(f"{mode} {n}" for mode, n in rogue["reopened"].items())
    breaker = (f"OPEN after {rogue['repeat_closures']} repeat closures" if rogue["breaker_opened"]
               else f"closed ({rogue['repeat_closures']} repeat closures counted)")
    return (f"rogue bot (ignores the halt) re-opened its position: {reopened}\n"
            f"circuit breaker: {breaker}; emergency stops while open: {rogue['emergency_stops_while_open']}\n"
            f"closures: {rogue['closures']}, closing fees {rogue['closing_fees_usd']:.4f} USD "
            f"(bound (1 + L + E) x f = {rogue['closing_fee_bound_usd']:.4f} USD, docs/operations.md)")


def _where_things_are(workdir: Path, keep: bool, removed: bool) -> str:
    """The summary's last line: never a directory that no longer exists."""
    if removed:
        return (
            "keys, config and logs were in a temporary directory, now removed; "
            "`thalex-tp demo --workdir DIR` keeps them (and `thalex-tp status --config DIR/demo.toml` "
            "talks to a running demo)"
        )
    kept = "kept" if keep else "kept because something went wrong"
    return (
        f"keys, config and logs {kept} in {workdir} (operator commands while it runs: "
        f"thalex-tp status --config {workdir / 'demo.toml'})"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="thalex-tp demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=0.0, help="seconds to run (default: until Ctrl-C)")
    parser.add_argument(
        "--scenario", help="a paper-exchange scenario file to play instead of the built-in director"
    )
    parser.add_argument(
        "--no-ui", action="store_true", help="plain log lines instead of the live view (for CI)"
    )
    parser.add_argument("--workdir", help="keep keys, config and logs here (default: a temporary directory)")
    parser.add_argument("--summary-json", help="also write the summary to this file")
    parser.add_argument("--seed", type=int, default=7, help="paper exchange seed")
    parser.add_argument("--rogue-bot", action="store_true",
                        help="add a bot that ignores the halt (plain orders, mass quotes, a grid bot): see "
                             "the circuit breaker open and the closing fees bounded")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not QUOTER.exists():
        print(
            f"demo: {QUOTER} not found (the demo runs from a source checkout: pip install -e .)",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_run(args))
