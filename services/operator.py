"""The operator's controls: `status`, `halt`, `resume`, `close-all`, `history`.

They talk to the guardian only through Redis, like the services do: reading
the latest snapshot, the halt hash and the streams, and writing `tp:control`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import redis
from pydantic import BaseModel, ValidationError

from services.common.bus import entry_document, entry_fields
from services.common.config import ConfigError, Settings, load_config
from services.common.contracts import (
    Command,
    Control,
    ControlAction,
    Halt,
    HaltAck,
    Report,
    Snapshot,
    halt_from_hash,
)
from services.common.service import read_secret

EXIT_UNREACHABLE = 1


class OperatorError(Exception):
    """Something the operator must fix; the message says what."""


def _parser(prog: str, text: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"thalex-tp {prog}", description=text)
    parser.add_argument("--config", help="TOML configuration file (default: built-in defaults + TP_* env)")
    return parser


def _connect(settings: Settings) -> redis.Redis:
    client = redis.Redis.from_url(
        settings.redis.url,
        socket_timeout=3,
        socket_connect_timeout=3,
        **({"username": settings.redis.username} if settings.redis.username else {}),
        **({"password": p} if (p := read_secret(settings.redis.password_file)) else {}),
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise OperatorError(f"cannot reach Redis at {settings.redis.url}: {exc}. "
                            "Is the guardian's Redis running, and is [redis] url right?") from None
    return client


def _run(argv: list[str], prog: str, text: str, add_args: Callable[[argparse.ArgumentParser], None],
         action: Callable[[argparse.Namespace, Settings, redis.Redis], int]) -> int:
    parser = _parser(prog, text)
    add_args(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return ConfigError.exit_code
    try:
        return action(args, settings, _connect(settings))
    except OperatorError as exc:
        print(f"thalex-tp {prog}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _operator() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def _send_control(client: redis.Redis, settings: Settings, action: ControlAction) -> Control:
    control = Control(action=action, by=_operator(), ts=time.time())
    client.xadd(settings.names.control, entry_fields(control),
                maxlen=settings.redis.stream_maxlen, approximate=True)
    return control


def _latest(client: redis.Redis, stream: str, model: type[BaseModel], count: int = 1) -> list[Any]:
    docs = []
    rows: Any = client.xrevrange(
        stream, count=count
    )  # redis-py's result types are wider than what it returns
    for _, fields in rows:
        try:
            docs.append(model.model_validate(entry_document(fields)[1]))
        except (ValueError, ValidationError):
            continue
    return docs


def read_halt(client: redis.Redis, settings: Settings) -> Halt | None:
    """The `tp:halt` hash as a document, or None when no halt is set."""
    fields: Any = client.hgetall(settings.names.halt)
    return halt_from_hash(fields)


def _money(value: float) -> str:
    return f"{value:+,.4f}"


def format_status(snapshot: Snapshot | None, halt: Halt | None, acks: dict[str, HaltAck],
                  lags: dict[str, int | None], settings: Settings, now: float) -> str:
    """The status screen, as plain text (pure: easy to test)."""
    lines = []
    tp = settings.portfolio_take_profit
    if snapshot is None:
        lines.append("No snapshot yet: is `thalex-tp portfolio` running and ingest publishing?")
    else:
        age = now - snapshot.ts
        lines.append(f"epoch {snapshot.epoch}  snapshot #{snapshot.seq}  {age:.1f} s old")
        lines.append("")
        lines.append(f"{'instrument':<24}{'position':>12}{'entry':>14}{'mark':>14}{'exit':>14}{'P&L':>12}{'fees':>10}")
        for p in snapshot.positions:
            pnl = p.realized_pnl + p.unrealized_pnl + p.funding_pnl
            flag = " (mark: book side empty)" if p.exit_price_source == "mark" else ""
            lines.append(f"{p.instrument:<24}{p.position:>12.4f}{p.avg_entry:>14.2f}{p.mark:>14.2f}"
                         f"{p.exit_price:>14.2f}{pnl:>12.4f}{p.fees_paid:>10.4f}{flag}")
        lines.append("")
        for label, value in (("realized", snapshot.realized_pnl), ("unrealized", snapshot.unrealized_pnl),
                             ("funding", snapshot.funding_pnl), ("gross", snapshot.gross_pnl),
                             ("fees paid", -snapshot.fees_paid), ("net", snapshot.net_pnl),
                             ("est. close fees", -snapshot.est_close_fees * settings.fee_estimation_buffer),
                             ("est. slippage", -snapshot.est_slippage),
                             ("net after close", snapshot.net_after_close)):
            lines.append(f"  {label:<18}{_money(value):>14}")
        lines.append("")
        figure = snapshot.net_after_close if tp.profit_after_fees else snapshot.net_pnl
        lines.append("barriers (distance to go):")
        lines.append(f"  take profit      {_money(tp.min_profit_usd - figure):>14}  (at {tp.min_profit_usd})")
        if tp.partial_close_fraction > 0:
            lines.append(f"  partial          {_money(tp.partial_profit_threshold - figure):>14}"
                         f"  (at {tp.partial_profit_threshold}, closes {tp.partial_close_fraction:.0%})")
        lines.append(
            f"  emergency stop   {_money(snapshot.net_after_close - tp.emergency_close_threshold):>14}"
            f"  (at {tp.emergency_close_threshold})"
        )
        if snapshot.oldest_position_ts is not None:
            hours = (now - snapshot.oldest_position_ts) / 3600
            lines.append(
                f"  max age          {tp.max_position_age_hours - hours:>13.2f}h  "
                f"(at {tp.max_position_age_hours} h)"
            )
        if snapshot.stale_instruments:
            lines.append(f"STALE prices (profit barriers wait): {', '.join(snapshot.stale_instruments)}")
        for drift in snapshot.drift:
            lines.append(
                f"DRIFT {drift.instrument}: ledger {drift.ledger_position} "
                f"vs exchange {drift.exchange_position}"
            )
    lines.append("")
    if halt is None:
        lines.append("halt: none (quoters may trade)")
    else:
        until = (
            "until resume"
            if halt.until is None
            else f"until {time.strftime('%H:%M:%S', time.localtime(halt.until))}"
        )
        lines.append(f"halt: {halt.reason} {halt.command_id or ''} {until}")
        seen = [name for name, ack in acks.items() if ack.command_id == halt.command_id]
        lines.append(f"  acknowledged by: {', '.join(seen) if seen else 'no quoter yet'}")
        unseen = [name for name in acks if name not in seen]
        if unseen:
            lines.append(f"  not yet acknowledged: {', '.join(unseen)}")
    lines.append("stream lag (entries not yet read by each group): " +
                 (", ".join(f"{k}={'?' if v is None else v}" for k, v in lags.items()) or "no consumers yet"))
    return "\n".join(lines)


def _lags(client: redis.Redis, settings: Settings) -> dict[str, int | None]:
    lags: dict[str, int | None] = {}
    for stream in (settings.names.fills, settings.names.ticks, settings.names.positions,
                   settings.names.snapshots, settings.names.commands, settings.names.reports):
        try:
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:
            continue
        for group in groups:
            name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
            lags[f"{stream.split(':', 1)[1]}/{name}"] = group.get("lag")
    return lags


def _acks(client: redis.Redis, settings: Settings) -> dict[str, HaltAck]:
    acks = {}
    stored: Any = client.hgetall(settings.names.halt_acks)
    for name, raw in stored.items():
        try:
            acks[name.decode()] = HaltAck.model_validate_json(raw)
        except ValidationError:
            continue
    return acks


def status_main(argv: list[str]) -> int:
    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        snapshots = _latest(client, settings.names.snapshots, Snapshot)
        print(format_status(snapshots[0] if snapshots else None, read_halt(client, settings),
                            _acks(client, settings), _lags(client, settings), settings, time.time()))
        return 0

    return _run(argv, "status", "The current snapshot, distance to each barrier, halt state, stream lag.",
                lambda p: None, action)


def halt_main(argv: list[str]) -> int:
    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        control = _send_control(client, settings, ControlAction.HALT)
        print(f"halt requested by {control.by}: no closures or quoting until `thalex-tp resume`")
        return 0

    return _run(argv, "halt", "Stop trading (quoters stand down) until resume.", lambda p: None, action)


def resume_main(argv: list[str]) -> int:
    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        control = _send_control(client, settings, ControlAction.RESUME)
        print(f"resume requested by {control.by}")
        return 0

    return _run(argv, "resume", "Lift an operator halt.", lambda p: None, action)


def close_all_main(argv: list[str]) -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        if not args.yes:
            if not sys.stdin.isatty():
                raise OperatorError("refusing to close everything without confirmation; pass --yes")
            answer = input("Close EVERY position of the account now, at market through the book? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing done")
                return 0
        control = _send_control(client, settings, ControlAction.CLOSE_ALL)
        print(f"close-all requested by {control.by}; follow it with `thalex-tp history`")
        return 0

    return _run(argv, "close-all", "Close every position now (reason: manual).", add, action)


def history_main(argv: list[str]) -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", type=int, default=10, help="how many recent decisions (default 10)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        commands: list[Command] = _latest(client, settings.names.commands, Command, count=args.n)
        reports: list[Report] = _latest(client, settings.names.reports, Report, count=5000)
        by_command: dict[str, list[Report]] = {}
        for report in reversed(reports):
            by_command.setdefault(report.command_id, []).append(report)
        rows = []
        for command in reversed(commands):
            steps = by_command.get(command.command_id, [])
            outcome = steps[-1].status.value if steps else "no report yet"
            rows.append(
                {
                    "command_id": command.command_id,
                    "reason": command.reason.value,
                    "figure": command.net_pnl,
                    "threshold": command.threshold,
                    "fraction": command.fraction,
                    "positions": len(command.positions),
                    "created": command.created_ts,
                    "outcome": outcome,
                    "fees": sum(r.fee or 0.0 for r in steps if r.status in ("filled", "partially_filled")),
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no decisions yet")
        else:
            for row in rows:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(row["created"])))
                print(f"{when}  {row['command_id']:<32} {row['reason']:<20} figure {row['figure']:+.4f} "
                      f"vs {row['threshold']:+.4f}  {row['positions']} positions  -> {row['outcome']}"
                      f"  fees {row['fees']:.4f}")
        return 0

    return _run(argv, "history", "Recent decisions and their outcomes.", add, action)
