"""The operator's controls: `status`, `halt`, `resume`, `close-all`, `history`.

They talk to the guardian only through Redis, like the services do: reading
the latest snapshot, the halt hash and the streams, and writing `tp:control`.
`halt`, `resume` and `close-all` then wait (bounded by `--timeout`) for
take-profit's answer on `tp:control:answers` and say what happened; they exit
non-zero when it was refused (3) or not answered (4), so a script or a tired
trader never takes a refused command for a done one.
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
from services.common.config import ConfigError, EmergencyBasis, Settings, load_config, redacted
from services.common.contracts import (
    CONTROL_MAX_AGE_SECONDS,
    Command,
    Control,
    ControlAction,
    ControlAnswer,
    ControlOutcome,
    Halt,
    HaltAck,
    HaltViolation,
    Report,
    ReportStatus,
    Snapshot,
    halt_from_hash,
)
from services.common.exit_cost import exit_cost_warning
from services.common.service import read_secret
from services.common.snapshots import view_from

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_REFUSED = 3
EXIT_UNANSWERED = 4
EXIT_NOT_GUARDING = 5
GUARDIAN = ("ingest", "portfolio", "takeprofit", "executor")
"""The services the guardian cannot guard without (notify only tells)."""
HEALTH_REPORT_MAX_AGE_SECONDS = 5.0
"""A service writes its health every second; a report older than this is a service that stopped."""
DEFAULT_ANSWER_TIMEOUT_SECONDS = 10.0
ANSWER_POLL_SECONDS = 0.05
LAG_COUNT_LIMIT = 1000
VIOLATIONS_READ = 1000
"""The latest `tp:reports` entries `status` reads for who broke a halt."""
VIOLATIONS_SHOWN = 5
"""Halt violations `status` names one by one (the latest); the rest are counted by kind."""
"""Where XINFO cannot tell a group's lag (Redis < 7), at most this many entries are counted."""


class OperatorError(Exception):
    """Something the operator must fix; the message says what."""


def _parser(prog: str, text: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"thalex-tp {prog}", description=text)
    parser.add_argument("--config", help="TOML configuration file (default: built-in defaults + TP_* env)")
    return parser


def _connect(settings: Settings) -> redis.Redis:
    credentials = {"username": settings.redis.username, "password": read_secret(settings.redis.password_file)}
    client = redis.Redis.from_url(settings.redis.url, socket_timeout=3, socket_connect_timeout=3,
                                  **{k: v for k, v in credentials.items() if v})
    try:
        client.ping()
    except redis.RedisError as exc:
        raise OperatorError(f"cannot reach Redis at {redacted(settings)['redis']['url']}: {exc}. "
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


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _send_control(client: redis.Redis, settings: Settings, action: ControlAction) -> tuple[Control, str, str]:
    """XADD the control; returns it, its entry id, and the last answer id before it (to read from)."""
    latest = client.xrevrange(settings.names.control_answers, count=1)
    after = _text(latest[0][0]) if latest else "0-0"
    control = Control(action=action, by=_operator(), ts=time.time())
    entry_id = client.xadd(settings.names.control, entry_fields(control),
                           maxlen=settings.redis.stream_maxlen, approximate=True)
    return control, _text(entry_id), after


def await_answer(client: redis.Redis, settings: Settings, control_id: str, after: str,
                 timeout: float) -> ControlAnswer | None:
    """Take-profit's answer to the control `control_id`, or None if none came within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        entries: Any = client.xrange(settings.names.control_answers, min=f"({after}", max="+", count=100)
        for entry_id, fields in entries:
            after = _text(entry_id)
            try:
                answer = ControlAnswer.model_validate(entry_document(fields)[1])
            except (ValueError, ValidationError):
                continue
            if answer.control_id == control_id:
                return answer
        if time.monotonic() >= deadline:
            return None
        time.sleep(ANSWER_POLL_SECONDS)


def report_answer(prog: str, answer: ControlAnswer | None, control_id: str, timeout: float,
                  settings: Settings) -> int:
    """Print what became of a control and return the exit code (0 accepted, 3 refused, 4 no answer)."""
    if answer is None:
        print(f"thalex-tp {prog}: NO ANSWER from take-profit within {timeout:g} s: nothing is known to have "
              f"happened. Is `thalex-tp takeprofit` running (`thalex-tp status`, its /health)? The request "
              f"stays queued in {settings.names.control} (entry {control_id}): take-profit applies a halt "
              f"whenever it reads it, and refuses a close-all or resume older than "
              f"{CONTROL_MAX_AGE_SECONDS:.0f} s.", file=sys.stderr)
        return EXIT_UNANSWERED
    if answer.outcome is ControlOutcome.REFUSED:
        print(f"thalex-tp {prog}: REFUSED by take-profit ({answer.reason}): {answer.detail}. "
              f"Nothing was done. [control {control_id}]", file=sys.stderr)
        return EXIT_REFUSED
    follow = ""
    if answer.command_id:
        follow = f" Follow it with `thalex-tp history` (command {answer.command_id})."
    print(f"{prog}: accepted by take-profit: {answer.detail}.{follow} [control {control_id}]")
    return EXIT_OK


def _say_if_not_closing(prog: str, client: redis.Redis, settings: Settings) -> None:
    """A close-all accepted while the executor is set not to close (dry run) closes nothing: say so."""
    raw = client.get(settings.names.key("executor:health"))
    try:
        set_not_to = dict(json.loads(raw).get("not_guarding") or {}) if raw else {}
    except (ValueError, TypeError, AttributeError):
        return
    for why in set_not_to.values():
        print(f"thalex-tp {prog}: BUT NOTHING WILL BE CLOSED: {why}", file=sys.stderr)


def _control(prog: str, action: ControlAction, args: argparse.Namespace, settings: Settings,
             client: redis.Redis) -> int:
    control, control_id, after = _send_control(client, settings, action)
    print(f"{prog} sent by {control.by}; waiting up to {args.timeout:g} s for take-profit's answer ...",
          file=sys.stderr)
    answer = await_answer(client, settings, control_id, after, args.timeout)
    return report_answer(prog, answer, control_id, args.timeout, settings)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _add_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=_positive, default=DEFAULT_ANSWER_TIMEOUT_SECONDS,
                        help="seconds to wait for take-profit's answer (default %(default)s); "
                             "exit 4 when none comes")


def _latest(client: redis.Redis, stream: str, model: type[BaseModel], count: int = 1) -> list[Any]:
    docs = []
    rows: Any = client.xrevrange(stream, count=count)  # redis-py's result types are wider than its results
    for _, fields in rows:
        try:
            docs.append(model.model_validate(entry_document(fields)[1]))
        except (ValueError, ValidationError):
            continue
    return docs


def read_halt(client: redis.Redis, settings: Settings) -> Halt | None:
    """The `tp:halt` hash as a document, or None when no halt is set (raises on an unreadable one)."""
    fields: Any = client.hgetall(settings.names.halt)
    return halt_from_hash(fields)


def _halt_or_why_not(client: redis.Redis, settings: Settings) -> Halt | str | None:
    """The halt, None, or a sentence saying why `tp:halt` cannot be read (status must not crash)."""
    raw: Any = client.hgetall(settings.names.halt)
    try:
        return halt_from_hash(raw)
    except (ValueError, ValidationError) as exc:
        shown = {_text(k): _text(v)[:80] for k, v in raw.items()}
        why = str(exc).splitlines()[0]
        return f"{settings.names.halt} holds {shown}, which is not a halt ({why})"


def _money(value: float) -> str:
    return f"{value:+,.4f}"


def _pnl_lines(snapshot: Snapshot, settings: Settings) -> list[str]:
    """The P&L breakdown. Costs are shown as costs (+ = you pay), as in the snapshot and Grafana."""
    buffer = settings.fee_estimation_buffer
    rows = (("realized", snapshot.realized_pnl, ""), ("unrealized", snapshot.unrealized_pnl, ""),
            ("funding", snapshot.funding_pnl, ""), ("gross", snapshot.gross_pnl, ""),
            ("fees paid", snapshot.fees_paid, "cost"),
            ("net", snapshot.net_pnl, "= gross - fees paid"),
            ("est. close fees", snapshot.est_close_fees * buffer,
             f"cost (taker estimate x buffer {buffer:g})"),
            ("est. slippage", snapshot.est_slippage, "cost (- when the book pays better than mark)"),
            ("net after close", snapshot.net_after_close, "= net - est. close fees - est. slippage"))
    return [f"  {label:<18}{_money(value):>14}  {note}".rstrip() for label, value, note in rows]


def _barrier_lines(snapshot: Snapshot, settings: Settings, now: float) -> list[str]:
    tp = settings.portfolio_take_profit
    figure = snapshot.net_after_close if tp.profit_after_fees else snapshot.net_pnl
    lines = ["barriers (distance to go):",
             f"  take profit      {_money(tp.min_profit_usd - figure):>14}  (at {tp.min_profit_usd})"]
    if tp.partial_close_fraction > 0:
        lines.append(f"  partial          {_money(tp.partial_profit_threshold - figure):>14}"
                     f"  (at {tp.partial_profit_threshold}, closes {tp.partial_close_fraction:.0%})")
    on_pnl = tp.emergency_stop_basis is EmergencyBasis.NET_PNL
    emergency = snapshot.net_pnl if on_pnl else snapshot.net_after_close
    lines.append(f"  emergency stop   {_money(emergency - tp.emergency_close_threshold):>14}"
                 f"  (at {tp.emergency_close_threshold} of {tp.emergency_stop_basis.value})")
    if snapshot.oldest_position_ts is not None:
        hours = (now - snapshot.oldest_position_ts) / 3600
        lines.append(f"  max age          {tp.max_position_age_hours - hours:>13.2f}h"
                     f"  (at {tp.max_position_age_hours} h)")
    warning = exit_cost_warning(snapshot, tp)
    if warning is not None:
        lines.append(f"EXIT COST WARNING: {warning.sentence()}")
    if snapshot.dust:
        lines.append(f"DUST no order can close (valued; no closure is decided on it alone, the time limit "
                     f"ignores it): {', '.join(snapshot.dust)}")
    if snapshot.stale_instruments:
        lines.append(f"STALE prices (profit barriers wait): {', '.join(snapshot.stale_instruments)}")
    for drift in snapshot.drift:
        lines.append(f"DRIFT {drift.instrument}: ledger {drift.ledger_position} "
                     f"vs exchange {drift.exchange_position}")
    return lines


def _violation_lines(halt: Halt | str | None, violations: list[HaltViolation]) -> list[str]:
    """Who broke the halt in force, or the last one (issue 19): counts by kind, the latest few named."""
    if not violations:
        return []
    since = halt.since if isinstance(halt, Halt) else violations[-1].halt_since
    these = [v for v in violations if v.halt_since == since]
    if not these:
        return []
    which = "this halt" if isinstance(halt, Halt) else f"the last halt ({these[-1].halt_reason})"
    kinds: dict[str, int] = {}
    for v in these:
        kinds[v.kind.value] = kinds.get(v.kind.value, 0) + 1
    lines = [f"  BROKEN: {len(these)} order(s)/bot(s)/trade(s) on the account during {which} were not the "
             f"guardian's: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))]
    lines += [f"    {v.describe()}" for v in these[-VIOLATIONS_SHOWN:]]
    return lines


def _halt_lines(halt: Halt | str | None, acks: dict[str, HaltAck],
                violations: list[HaltViolation] | None = None) -> list[str]:
    if halt is None:
        return ["halt: none (quoters may trade)", *_violation_lines(halt, violations or [])]
    if isinstance(halt, str):
        return [f"halt: UNREADABLE: {halt}. Quoters may misread it; take-profit rewrites it whenever it "
                "handles an input."]
    until = "until resume"
    if halt.until is not None:
        until = f"until {time.strftime('%H:%M:%S', time.localtime(halt.until))}"
    lines = [f"halt: {halt.reason} {halt.command_id or ''} {until}"]
    seen = [name for name, ack in acks.items() if ack.command_id == halt.command_id]
    lines.append(f"  acknowledged by: {', '.join(seen) if seen else 'no quoter yet'}")
    unseen = [name for name in acks if name not in seen]
    if unseen:
        lines.append(f"  not yet acknowledged: {', '.join(unseen)}")
    return lines + _violation_lines(halt, violations or [])


def _lag_text(value: int | None) -> str:
    if value is None:
        return "?"
    return f">={value}" if value >= LAG_COUNT_LIMIT else str(value)


def breaker_lines(breaker: dict[str, Any] | None, settings: Settings) -> list[str]:
    """Take-profit's circuit breaker (`<ns>:takeprofit:breaker`): open or closed, and what it counted."""
    tp = settings.portfolio_take_profit
    if not breaker:
        return ["circuit breaker: closed (take-profit has not written it yet)"]
    opened = breaker.get("opened_ts")
    if opened is None:
        count = len(breaker.get("repeats", []))
        return [f"circuit breaker: closed ({count} repeat closure(s) of rebuilt positions counted, opens "
                f"past {tp.breaker_max_repeat_closures} within {tp.breaker_window_seconds:g} s)"]
    since = time.strftime("%H:%M:%S", time.localtime(opened))
    return [f"CIRCUIT BREAKER OPEN since {since}: {breaker.get('repeats_when_opened', 0)} repeat closures of "
            "positions rebuilt during a halt; no profit/age/expiry closure until `thalex-tp resume`",
            f"  emergency stop: armed on net P&L ({breaker.get('emergency_stops_while_open', 0)} fired while "
            f"open); orders and quotes cancelled {breaker.get('cancels_while_open', 0)} time(s). "
            "Stop the bot that does not listen to the halt, then resume."]


def format_status(snapshot: Snapshot | None, halt: Halt | str | None, acks: dict[str, HaltAck],
                  lags: dict[str, int | None], settings: Settings, now: float,
                  breaker: dict[str, Any] | None = None,
                  violations: list[HaltViolation] | None = None) -> str:
    """The status screen, as plain text (pure: easy to test). `halt` may be a sentence: unreadable;
    `violations` are the latest `halt_violation` reports' findings, oldest first."""
    lines = []
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
        lines.extend(_pnl_lines(snapshot, settings))
        lines.append("")
        lines.extend(_barrier_lines(snapshot, settings, now))
    lines.append("")
    lines.extend(_halt_lines(halt, acks, violations))
    lines.extend(breaker_lines(breaker, settings))
    lines.append("stream lag (entries not yet read by each group): " +
                 (", ".join(f"{k}={_lag_text(v)}" for k, v in lags.items()) or "no consumers yet"))
    return "\n".join(lines)


def group_lag(client: redis.Redis, stream: str, group: dict[Any, Any]) -> int | None:
    """Entries of `stream` not yet delivered to `group`.

    Redis >= 7 says it (XINFO GROUPS `lag`); Redis 6.2 (the demo's bundled server) does not, so
    it is counted: none when the group has been delivered the stream's last id, else the entries
    after its `last-delivered-id`, at most `LAG_COUNT_LIMIT`. None when neither is possible.
    """
    lag = group.get("lag")
    if lag is not None:
        return int(lag)
    last_delivered = _text(group.get("last-delivered-id", "0-0"))
    try:
        info = client.xinfo_stream(stream)
        if _text(info.get("last-generated-id")) == last_delivered:
            return 0
        return len(client.xrange(stream, min=f"({last_delivered}", max="+", count=LAG_COUNT_LIMIT) or [])
    except redis.ResponseError:  # no permission (an ACL user without XRANGE on the stream), or gone
        return None


def _lags(client: redis.Redis, settings: Settings) -> dict[str, int | None]:
    lags: dict[str, int | None] = {}
    for stream in (settings.names.fills, settings.names.ticks, settings.names.positions,
                   settings.names.snapshots, settings.names.commands, settings.names.reports):
        try:
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:
            continue
        for group in groups:
            lags[f"{stream.split(':', 1)[1]}/{_text(group['name'])}"] = group_lag(client, stream, group)
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


def _violations(client: redis.Redis, settings: Settings) -> list[HaltViolation]:
    """What broke a halt lately (ingest's `halt_violation` reports), oldest first."""
    reports: list[Report] = _latest(client, settings.names.reports, Report, count=VIOLATIONS_READ)
    return [r.violation for r in reversed(reports)
            if r.status is ReportStatus.HALT_VIOLATION and r.violation is not None]


def _breaker(client: redis.Redis, settings: Settings) -> dict[str, Any] | None:
    raw: Any = client.get(settings.names.breaker)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def service_problems(raw: Any, now: float) -> list[str]:
    """Why one service is not guarding, from its `<ns>:<service>:health` value; empty when it is."""
    if raw is None:
        return ["no health report: not running, or it cannot write to Redis"]
    try:
        report = json.loads(raw)
        ts, healthy, reasons = float(report["ts"]), report["healthy"], dict(report["reasons"])
    except (ValueError, TypeError, KeyError):
        return [f"unreadable health report {_text(raw)[:80]!r} (a service older than thalex-tp status?)"]
    age = now - ts
    if age > HEALTH_REPORT_MAX_AGE_SECONDS:
        return [f"last health report {age:.0f} s ago: stopped, stuck, or it cannot write to Redis"]
    set_not_to = [f"{what}: {why}" for what, why in sorted(dict(report.get("not_guarding") or {}).items())]
    if healthy is True:
        return set_not_to
    return [f"{check}: {why}" for check, why in sorted(reasons.items())] + set_not_to or \
        ["not healthy yet (starting)"]


def guarding_lines(reports: dict[str, Any], now: float) -> list[str]:
    """The status screen's first lines: GUARDING, or NOT GUARDING with every reason (pure)."""
    problems = [f"  {service}: {why}"
                for service, raw in reports.items() for why in service_problems(raw, now)]
    if not problems:
        return [f"GUARDING: {', '.join(reports)} healthy"]
    return ["NOT GUARDING: the guardian cannot guard (alert GuardianCannotGuard):", *problems]


def _health_reports(client: redis.Redis, settings: Settings) -> dict[str, Any]:
    return {service: client.get(settings.names.key(f"{service}:health")) for service in GUARDIAN}


def _snapshot(client: redis.Redis, settings: Settings) -> Snapshot | None:
    """The newest snapshot with every position: a v2 one carries only the changed rows, so the rows
    come from the portfolio's hash, read in the same transaction (`services.common.snapshots`)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(settings.names.snapshot_positions)
        pipe.xrevrange(settings.names.snapshots, count=1)
        rows, latest = pipe.execute()
    view, header = view_from(rows, latest)
    return None if header is None else view.full_snapshot(header)


def status_main(argv: list[str]) -> int:
    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        guarding = guarding_lines(_health_reports(client, settings), time.time())
        print("\n".join(guarding))
        print()
        print(format_status(_snapshot(client, settings), _halt_or_why_not(client, settings),
                            _acks(client, settings), _lags(client, settings), settings, time.time(),
                            breaker=_breaker(client, settings), violations=_violations(client, settings)))
        return EXIT_OK if guarding[0].startswith("GUARDING") else EXIT_NOT_GUARDING

    return _run(argv, "status", "Whether the guardian is guarding (exit 5 if not), the current snapshot, "
                "distance to each barrier, halt state, stream lag.", lambda p: None, action)


def halt_main(argv: list[str]) -> int:
    return _run(argv, "halt", "Stop trading (quoters stand down) until resume. Waits for take-profit's "
                "answer; exit 3 if refused, 4 if unanswered.", _add_timeout,
                lambda args, settings, client: _control("halt", ControlAction.HALT, args, settings, client))


def resume_main(argv: list[str]) -> int:
    return _run(argv, "resume", "Lift an operator halt (and the halt a failed closure left). Waits for "
                "take-profit's answer; exit 3 if refused, 4 if unanswered.", _add_timeout,
                lambda args, settings, client: _control("resume", ControlAction.RESUME, args, settings,
                                                        client))


def close_all_main(argv: list[str]) -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        _add_timeout(parser)

    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        if not args.yes:
            if not sys.stdin.isatty():
                raise OperatorError("refusing to close everything without confirmation; pass --yes")
            answer = input("Close EVERY position of the account now, at market through the book? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("nothing done")
                return 0
        code = _control("close-all", ControlAction.CLOSE_ALL, args, settings, client)
        if code == EXIT_OK:
            _say_if_not_closing("close-all", client, settings)
        return code

    return _run(argv, "close-all", "Close every position now (reason: manual). Waits for take-profit's "
                "answer; exit 3 if refused, 4 if unanswered.", add, action)


def _decision_rows(commands: list[Command], reports: list[Report]) -> list[dict[str, Any]]:
    by_command: dict[str, list[Report]] = {}
    broken: dict[str, int] = {}
    for report in reversed(reports):
        if report.status is ReportStatus.HALT_VIOLATION:  # not a step of the closure: counted apart
            broken[report.command_id] = broken.get(report.command_id, 0) + 1
            continue
        by_command.setdefault(report.command_id, []).append(report)
    rows = []
    for command in commands:
        steps = by_command.get(command.command_id, [])
        outcome = steps[-1].status.value if steps else "no report yet"
        rows.append({"kind": "decision", "command_id": command.command_id, "reason": command.reason.value,
                     "figure": command.net_pnl, "threshold": command.threshold,
                     "fraction": command.fraction, "positions": len(command.closing()),
                     "created": command.created_ts, "outcome": outcome,
                     "halt_violations": broken.get(command.command_id, 0),
                     "fees": sum(r.fee or 0.0 for r in steps if r.status in ("filled", "partially_filled"))})
    return rows


def _refusal_rows(answers: list[ControlAnswer]) -> list[dict[str, Any]]:
    return [{"kind": "refused", "action": a.action.value, "by": a.by, "reason": a.reason, "detail": a.detail,
             "control_id": a.control_id, "created": a.ts, "outcome": "refused"}
            for a in answers if a.outcome is ControlOutcome.REFUSED]


def format_history_row(row: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["created"]))
    if row["kind"] == "refused":
        return (f"{when}  {row['action']:<32} by {row['by']}  REFUSED ({row['reason']}): {row['detail']}")
    return (f"{when}  {row['command_id']:<32} {row['reason']:<20} figure {row['figure']:+.4f} "
            f"vs {row['threshold']:+.4f}  {row['positions']} positions  -> {row['outcome']}"
            f"  fees {row['fees']:.4f}"
            + (f"  HALT BROKEN {row['halt_violations']}x" if row.get("halt_violations") else ""))


def history_main(argv: list[str]) -> int:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", type=_at_least_one, default=10,
                            help="how many recent decisions and refused commands (default 10)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")

    def action(args: argparse.Namespace, settings: Settings, client: redis.Redis) -> int:
        commands: list[Command] = _latest(client, settings.names.commands, Command, count=args.n)
        reports: list[Report] = _latest(client, settings.names.reports, Report, count=5000)
        answers: list[ControlAnswer] = _latest(client, settings.names.control_answers, ControlAnswer,
                                               count=max(100, 10 * args.n))
        rows = sorted(_decision_rows(commands, reports) + _refusal_rows(answers), key=lambda r: r["created"])
        rows = rows[-args.n:]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print("no decisions yet")
        else:
            for row in rows:
                print(format_history_row(row))
        return 0

    return _run(argv, "history", "Recent decisions, their outcomes, and refused operator commands.", add,
                action)
