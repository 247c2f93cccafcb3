"""Every result and notification the paper exchange emits validates against Thalex's api.yaml.

Validation is strict: besides the schema itself, objects may carry no field that api.yaml does not
name (``additionalProperties: false`` is added to every plain object schema), so a typo in a field
name fails here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from services.paper.keys import KeyFiles
from services.paper.testing import PaperHandle

from .conftest import PERP, RawClient

def _find_api_yaml() -> Path:
    """``shared/thalex-api/api.yaml`` beside the checkout (or beside any folder above it, e.g. a worktree)."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        candidate = folder / "shared" / "thalex-api" / "api.yaml"
        if candidate.exists():
            return candidate
    return here.parents[2] / ".." / "shared" / "thalex-api" / "api.yaml"


API_YAML = _find_api_yaml()
CHANNEL_PAYLOADS = {
    "ticker": "ticker.<instrument>.<delay>_payload",
    "book": "book.<instrument>.<grouping>.<nlevels>.<delay>_payload",
    "price_index": "price_index.<underlying>_payload",
}


def _strict(node: Any) -> Any:
    """Forbid fields api.yaml does not name in every plain object schema."""
    if isinstance(node, dict):
        node = {key: _strict(value) for key, value in node.items()}
        if "properties" in node and not ({"allOf", "oneOf", "anyOf"} & node.keys()):
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@pytest.fixture(scope="module")
def api() -> dict:
    if not API_YAML.exists():
        pytest.skip(f"Thalex api.yaml not found at {API_YAML} (the shared folder is a sibling of the repo)")
    document = yaml.safe_load(API_YAML.read_text())
    strict = copy.deepcopy(document)
    strict["components"]["schemas"] = _strict(document["components"]["schemas"])
    return strict


def _validator(api: dict, schema: dict) -> Draft202012Validator:
    return Draft202012Validator({"components": api["components"], **schema})


def _result_schema(api: dict, method: str) -> dict:
    success = api["paths"][method]["rpc"]["responses"]["default"]["content"]["application/json"]["schema"][
        "oneOf"
    ][0]
    return _strict(success["allOf"][1]["properties"]["result"])


def _payload_schema(api: dict, channel: str) -> dict:
    key = CHANNEL_PAYLOADS.get(channel.split(".")[0], f"{channel}_payload")
    return api["components"]["schemas"][key]["properties"]["notification"]


def _errors(validator: Draft202012Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]


@pytest.mark.asyncio
async def test_every_result_and_notification_matches_api_yaml(
    api: dict, paper: PaperHandle, connect, keys: dict[str, KeyFiles]
) -> None:
    client: RawClient = await connect()
    await client.login(keys["trader"])
    await client.result("private/set_cancel_on_disconnect", {"timeout_secs": 10})
    instruments = await client.result("public/instruments")
    by_type = {i["type"]: i["instrument_name"] for i in instruments if i["underlying"] == "BTCUSD"}
    option, future = by_type["option"], by_type["future"]
    await client.result(
        "private/subscribe",
        {
            "channels": [
                "account.orders",
                "session.orders",
                "account.portfolio",
                "account.trade_history",
                "account.summary",
            ]
        },
    )
    await client.result(
        "public/subscribe",
        {
            "channels": [
                f"ticker.{PERP}.raw",
                f"ticker.{option}.100ms",
                f"ticker.{future}.200ms",
                f"book.{PERP}.none.5.raw",
                f"book.{PERP}.10.all.100ms",
                "price_index.BTCUSD",
                "price_index.ETHUSD",
            ]
        },
    )
    for name in (PERP, option, future):
        await client.result("public/instrument", {"instrument_name": name})
        await client.result("public/ticker", {"instrument_name": name})
        await client.result("public/book", {"instrument_name": name})
    await client.result("public/index", {"underlying": "ETHUSD"})
    await client.result(
        "private/insert",
        {
            "direction": "buy",
            "instrument_name": PERP,
            "amount": 1.5,
            "order_type": "market",
            "label": "schema",
            "client_order_id": 1,
        },
    )
    await client.result("private/buy", {"instrument_name": option, "amount": 0.5, "order_type": "market"})
    resting = await client.result(
        "private/sell", {"instrument_name": PERP, "amount": 1.0, "price": 100500, "client_order_id": 2}
    )
    await client.result("private/amend", {"client_order_id": 2, "price": 100400, "amount": 0.8})
    await paper.control("paper/fill_orders", {"order_id": resting["order_id"], "amount": 0.3})
    await client.result("private/cancel", {"order_id": resting["order_id"]})
    await client.result("private/buy", {"instrument_name": PERP, "amount": 0.1, "price": 90000})
    await client.result("private/cancel_session")
    await client.result("private/buy", {"instrument_name": future, "amount": 0.1, "price": 90000})
    await client.result("private/cancel_all")
    await client.result(
        "private/sell", {"instrument_name": PERP, "amount": 3.0, "order_type": "market", "reduce_only": True}
    )
    await client.result("private/open_orders")
    await client.result("private/portfolio")
    await client.result("private/trade_history", {"limit": 2})
    await client.result("private/account_summary")
    await paper.control("paper/move_index", {"underlying": "BTCUSD", "pct": 2})
    await paper.control("paper/set_mark", {"instrument_name": PERP, "price": 103000})
    await paper.control("paper/set_book", {"instrument_name": PERP, "bids": False})
    await client.drain(0.3)
    await client.result("unsubscribe", {"channels": ["price_index.ETHUSD"]})
    await client.error_code("private/insert", {"direction": "buy", "instrument_name": "NOPE", "amount": 1})
    await paper.control("paper/reconnect_notice")
    await client.wait_for("system")
    await client.drain(0.3)

    methods_seen: set[str] = set()
    channels_seen: set[str] = set()
    problems: list[str] = []
    for message in client.received:
        if "channel_name" in message:
            assert set(message) == {"channel_name", "notification"}
            channel = message["channel_name"]
            channels_seen.add(channel.split(".")[0] if channel.split(".")[0] in CHANNEL_PAYLOADS else channel)
            validator = _validator(api, _payload_schema(api, channel))
            problems += [f"{channel}: {p}" for p in _errors(validator, message["notification"])]
        elif "error" in message:
            assert set(message) == {"id", "error"} and set(message["error"]) == {"code", "message"}
            error_only = {"error": message["error"]}
            problems += _errors(_validator(api, {"$ref": "#/components/schemas/ErrorResponse"}), error_only)
        else:
            assert set(message) == {"id", "result"}
            method = client.sent[message["id"]]
            methods_seen.add(method)
            problems += [
                f"{method}: {p}"
                for p in _errors(_validator(api, _result_schema(api, method)), message["result"])
            ]
    assert problems == []
    assert methods_seen >= {
        "public/login",
        "private/set_cancel_on_disconnect",
        "public/instruments",
        "public/instrument",
        "public/ticker",
        "public/index",
        "public/book",
        "public/subscribe",
        "private/subscribe",
        "unsubscribe",
        "private/insert",
        "private/buy",
        "private/sell",
        "private/amend",
        "private/cancel",
        "private/cancel_all",
        "private/cancel_session",
        "private/open_orders",
        "private/portfolio",
        "private/trade_history",
        "private/account_summary",
    }
    assert channels_seen >= {
        "account.orders",
        "session.orders",
        "account.portfolio",
        "account.trade_history",
        "account.summary",
        "ticker",
        "book",
        "price_index",
        "system",
    }
    trades = [
        t
        for m in client.received
        if m.get("channel_name") == "account.trade_history"
        for t in m["notification"]
    ]
    perp_trades = [t for t in trades if t["instrument_name"] == PERP]
    assert all("funding_mark" in t for t in perp_trades)
    assert {t["maker_taker"] for t in perp_trades} == {"maker", "taker"}
    assert any(t.get("label") == "schema" and t.get("client_order_id") == 1 for t in perp_trades)
