"""Command lines ``thalex-tp keygen`` and ``thalex-tp paper``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from services.paper.keys import generate_key, load_keys
from services.paper.scenario import Step, load_scenario, run_scenario
from services.paper.server import PaperExchange

log = logging.getLogger(__name__)


def keygen_main(argv: list[str]) -> int:
    """Write ``DIR/NAME.pem`` (0600), ``DIR/NAME.pub.pem`` and ``DIR/NAME.json`` (permissions)."""
    parser = argparse.ArgumentParser(
        prog="thalex-tp keygen", description="Create an API key for the paper exchange."
    )
    parser.add_argument("--kid", required=True, help="key id (the JWT 'kid' header)")
    parser.add_argument("--out", required=True, type=Path, help="directory for the key files")
    parser.add_argument(
        "--read-only", action="store_true", help="the key may read and subscribe but not trade"
    )
    parser.add_argument(
        "--account", help="account the key acts for (default: its own); give a read-only and a "
        "trading key the same account, as on Thalex"
    )
    args = parser.parse_args(argv)
    try:
        files = generate_key(args.out, args.kid, args.read_only, args.account)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"thalex-tp keygen: {exc}\n")
    print(
        f"private key {files.private_key_path}, public key {files.public_key_path}"
        f"{' (read-only)' if files.read_only else ''}"
    )
    return 0


def paper_main(argv: list[str]) -> int:
    """Run the paper exchange until SIGINT/SIGTERM, then close gracefully (reconnect notice first)."""
    parser = argparse.ArgumentParser(
        prog="thalex-tp paper", description="Run the Thalex-compatible paper exchange."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument(
        "--keys", required=True, type=Path, help="directory of *.pub.pem keys (thalex-tp keygen)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the index random walk")
    parser.add_argument("--scenario", type=Path, help="JSON or TOML list of timed control steps")
    parser.add_argument("--control", action="store_true", help="enable the paper/* control methods")
    parser.add_argument("--tick-interval", type=float, default=0.25, help="seconds between random-walk steps")
    parser.add_argument(
        "--reconnect-grace",
        type=float,
        default=10.0,
        help="seconds between the reconnect notice and closing connections on shutdown",
    )
    parser.add_argument(
        "--index-vol", type=float, default=0.6, help="annualised volatility of the index walk"
    )
    parser.add_argument(
        "--option-vol", type=float, default=0.5, help="implied volatility used to price options"
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.keys.is_dir():
        parser.exit(2, f"thalex-tp paper: --keys {args.keys} is not a directory\n")
    keys = load_keys(args.keys)
    if not keys:
        log.warning("no *.pub.pem keys in %s: nobody can log in", args.keys)
    try:
        steps = load_scenario(args.scenario) if args.scenario else []
    except (OSError, ValueError) as exc:
        parser.exit(2, f"thalex-tp paper: --scenario {args.scenario}: {exc}\n")
    exchange = PaperExchange(
        keys,
        seed=args.seed,
        control=args.control or bool(steps),
        host=args.host,
        port=args.port,
        tick_interval=args.tick_interval,
        reconnect_grace=args.reconnect_grace,
        index_vol=args.index_vol,
        option_vol=args.option_vol,
    )
    asyncio.run(_serve(exchange, steps))
    return 0


async def _serve(exchange: PaperExchange, steps: list[Step]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    url = await exchange.start()
    log.info(
        "paper exchange ready at %s (keys: %s; control %s)",
        url,
        ", ".join(sorted(exchange.keys)) or "none",
        "on" if exchange.control_enabled else "off",
    )
    scenario = asyncio.create_task(run_scenario(steps, exchange.control)) if steps else None
    await stop.wait()
    log.info("shutting down: reconnect notice sent, closing in %.1fs", exchange.reconnect_grace)
    if scenario is not None:
        scenario.cancel()
    await exchange.stop()
