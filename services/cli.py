"""`thalex-tp`: one console command, one subcommand per process or operator action.

Each subcommand's implementation lives in its own package; this module only
routes, so a newcomer finds every entry point here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from services.common.config import ConfigError, load_config, redacted
from services.common.preflight import SERVICES, check
from services.common.redact import redact

EXIT_OK = 0
EXIT_CONFIG = 2

SubcommandMain = Callable[[list[str]], int]

# subcommand -> (module exposing it, function name, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "ingest": ("services.ingest.app", "main", "publish the account's fills and ticks onto Redis"),
    "portfolio": ("services.portfolio.app", "main", "fee-aware P&L snapshots of the whole account"),
    "takeprofit": ("services.takeprofit.app", "main", "decide closures from snapshots"),
    "executor": ("services.executor.app", "main", "close positions on the exchange, at most once"),
    "notify": ("services.notify.app", "main", "tell the trader: webhooks, Telegram, Slack, Discord"),
    "paper": ("services.paper.cli", "paper_main", "run the Thalex-compatible paper exchange"),
    "keygen": ("services.paper.cli", "keygen_main", "make an RSA key pair for the paper exchange"),
    "demo": ("services.demo.app", "main", "run everything on the paper exchange and watch a take-profit"),
    "status": ("services.operator", "status_main", "show the current snapshot, barriers and halt state"),
    "halt": ("services.operator", "halt_main", "tell the guardian to stop trading until resume"),
    "resume": ("services.operator", "resume_main", "lift an operator halt"),
    "close-all": ("services.operator", "close_all_main", "close every position now (manual)"),
    "history": ("services.operator", "history_main", "recent decisions and their outcomes"),
    "contract": ("services.contract", "main", "print the wire contract as an AsyncAPI document"),
}


def check_config_main(argv: list[str]) -> int:
    """Print the effective configuration (secrets redacted) or every problem."""
    parser = argparse.ArgumentParser(
        prog="thalex-tp check-config",
        description="Validate a configuration file and print the result. Placeholders such as CHANGE-ME "
                    "are errors. With --service, also check what that service needs: its keys present, "
                    "readable, and not readable by others (a warning).")
    parser.add_argument("file", nargs="?", help="TOML file (default: built-in defaults + TP_* env)")
    parser.add_argument("--service", choices=[*SERVICES, "all"],
                        help="also check what this service needs to start (all: every service)")
    args = parser.parse_args(argv)
    try:
        settings = load_config(args.file)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    services = [] if args.service is None else list(SERVICES) if args.service == "all" else [args.service]
    findings = check(settings, services)
    errors = [f for f in findings if f.level == "error"]
    for finding in findings:
        print(redact(f"  - {finding}"), file=sys.stderr)
    if errors:
        checked = f" for {', '.join(services)}" if services else ""
        print(f"check-config: {len(errors)} error(s){checked}; fix them before starting", file=sys.stderr)
        return EXIT_CONFIG
    print(json.dumps(redacted(settings), indent=2, sort_keys=True))
    return EXIT_OK


def _resolve(name: str) -> SubcommandMain | None:
    module_name, function, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    return getattr(module, function, None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"check-config": "validate a configuration file", **{k: v[2] for k, v in SUBCOMMANDS.items()}}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: thalex-tp <command> [options]\n\ncommands:")
        for name, text in commands.items():
            print(f"  {name:<13} {text}")
        print("\n`thalex-tp <command> --help` for a command's options.")
        return EXIT_OK if argv else EXIT_CONFIG
    name, rest = argv[0], argv[1:]
    if name == "check-config":
        return check_config_main(rest)
    if name not in SUBCOMMANDS:
        print(f"thalex-tp: unknown command {name!r}; `thalex-tp --help` lists them", file=sys.stderr)
        return EXIT_CONFIG
    entry = _resolve(name)
    if entry is None:
        print(f"thalex-tp {name}: not yet available in this version", file=sys.stderr)
        return 1
    try:
        return entry(rest)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
