"""Command lines ``thalex-tp keygen`` and ``thalex-tp paper``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal
from pathlib import Path

from services.common.config import ConfigError, Settings, load_config
from services.common.contracts import InstrumentType
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


def _iso_time(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


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
    parser.add_argument(
        "--start-time",
        type=_iso_time,
        help="the paper's clock starts here (ISO 8601, e.g. 2026-03-27T07:55:00Z) instead of now",
    )
    parser.add_argument(
        "--clock-speed",
        type=float,
        default=1.0,
        help="the paper's time runs this many times as fast as real time",
    )
    parser.add_argument(
        "--config", type=Path, help="the guardian's configuration: option fees are capped as its "
        "[trading_fees.products.option] premium_cap says (none by default), so both agree"
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
        start_time=args.start_time,
    )
    if args.clock_speed < 0:
        parser.exit(2, "thalex-tp paper: --clock-speed must be >= 0\n")
    exchange.clock.set_speed(args.clock_speed)
    if args.config is not None:
        try:
            exchange.engine.option_fee_cap = option_fee_cap(load_config(args.config))
        except ConfigError as exc:
            parser.exit(2, f"thalex-tp paper: --config {args.config}: {exc}\n")
    asyncio.run(_serve(exchange, steps))
    return 0


def option_fee_cap(settings: Settings) -> float | None:
    """The premium cap of option fees in the guardian's `[trading_fees]` (None: not capped)."""
    rates = settings.trading_fees.products.get(InstrumentType.OPTION)
    return rates.premium_cap if rates is not None else None


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
