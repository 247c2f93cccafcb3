"""One configuration makes the paper exchange's option fee and the ledger's estimate agree.

The paper (through the official `thalex` client) charges an option trade; the ledger estimates the
same trade as if its fee had not been reported. With the guardian's `[trading_fees]` handed to the
paper (`thalex-tp paper --config`), capped or not, the two are the same figure.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest
import thalex

from services.common.config import load_config
from services.common.contracts import Fill, InstrumentInfo, InstrumentType
from services.paper.cli import option_fee_cap, paper_main
from services.paper.testing import make_keys, running_paper_exchange
from services.portfolio.ledger import Ledger, LedgerConfig

CAPPED = """
[trading_fees.products.option]
maker_fee_rate = 0.00025
taker_fee_rate = 0.00025
premium_cap = 0.125
"""


async def paper_option_trade(tmp_path: Path, cap: float | None, mark: float) -> dict[str, Any]:
    """Buy one option at the paper exchange (index 100000, option marked at `mark`); its `Trade`."""
    key = make_keys(tmp_path / "keys", "trader")
    async with running_paper_exchange(tmp_path / "keys") as paper:
        paper.exchange.engine.option_fee_cap = cap  # what `thalex-tp paper --config` sets
        await paper.control("paper/pause")
        await paper.control("paper/set_index", {"underlying": "BTCUSD", "price": 100_000})
        option = next(i for i in paper.exchange.market.instruments.values()
                      if i.kind == "option" and i.underlying == "BTCUSD")
        await paper.control("paper/set_mark", {"instrument_name": option.name, "price": mark})
        await paper.control("paper/set_book", {"instrument_name": option.name, "level_amount": 1.0,
                                               "growth": 0.0})
        client = thalex.Thalex(types.SimpleNamespace(value=paper.url))  # type: ignore[arg-type]
        await client.connect()
        try:
            await client.login(key.kid, key.private_pem, id=1)
            await answer(client, 1)
            await client.insert(thalex.Direction.BUY, option.name, 1.0, order_type=thalex.OrderType.MARKET,
                                id=2)
            await answer(client, 2)
            await client.trade_history(id=3)
            (trade,) = (await answer(client, 3))["trades"]
        finally:
            await client.disconnect()
    return dict(trade)


async def answer(client: thalex.Thalex, rid: int) -> Any:
    while True:
        message = json.loads(await client.receive())
        if message.get("id") == rid:
            assert "result" in message, message
            return message["result"]


def ledger_estimate(config_file: Path, trade: dict[str, Any]) -> float:
    settings = load_config(config_file)
    book = Ledger(LedgerConfig.from_settings(settings))
    book.set_instrument(trade["instrument_name"], InstrumentInfo(
        type=InstrumentType.OPTION, product="OBTCUSD", underlying="BTCUSD", tick_size=5.0,
        volume_tick_size=0.01, min_order_amount=0.01))
    book.apply_fill(Fill(trade_id=trade["trade_id"], instrument=trade["instrument_name"], side="buy",
                         price=trade["price"], amount=trade["amount"], index=trade["index"],
                         liquidity=trade["maker_taker"], exchange_ts=trade["time"], ingest_ts=trade["time"]))
    estimated = book.snapshot(1, 0, 1e12).fees_estimated
    assert estimated is not None
    return estimated


@pytest.mark.parametrize(("text", "mark", "expected"), [
    # 2.5 bps of the index notional 1 * 100000 = 25; the ask one tick (5) above 100 is 105:
    # 12.5 % of 105 = 13.125 < 25 -> capped at 13.125 when configured
    (CAPPED, 100, 13.125),
    # Thalex's published schedule (the default): no cap, 25
    ("", 100, 25.0),
    # in the money, 3005: 25 < 12.5 % of 3005 = 375.625 -> 25 either way
    (CAPPED, 3_000, 25.0),
])
async def test_one_configuration_gives_the_paper_and_the_ledger_one_option_fee(
    tmp_path: Path, text: str, mark: float, expected: float
) -> None:
    config_file = tmp_path / "guardian.toml"
    config_file.write_text(text)
    trade = await paper_option_trade(tmp_path, option_fee_cap(load_config(config_file)), mark)
    assert trade["fee"] == pytest.approx(expected)
    assert ledger_estimate(config_file, trade) == pytest.approx(trade["fee"])


def test_the_paper_refuses_a_bad_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keys").mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text(CAPPED.replace("0.125", "2"))
    with pytest.raises(SystemExit) as stopped:
        paper_main(["--keys", str(tmp_path / "keys"), "--config", str(bad)])
    assert stopped.value.code == 2
    assert "trading_fees.products.option.premium_cap" in capsys.readouterr().err
