"""Strict validation against Thalex's api.yaml: every result, error and notification.

Strict means: besides the schema itself, objects may carry no field that api.yaml does not name
(``additionalProperties: false`` is added to every plain object schema), so a typo in a field name
fails. Two relaxations, where api.yaml contradicts itself:

* where a field's description says it may be ``null`` (a ticker's best bid on an empty book, the
  top of the book in price history at resolutions other than one minute), ``null`` is accepted
  beside the declared type;
* an array whose ``minItems`` exceeds the items its ``prefixItems`` describe (the index price
  history: five described, example with five, ``minItems: 6``) needs only the described ones;
* the ``Bot`` variants of DHedge and DFollow list neither ``bot_id`` nor ``status`` nor
  ``stop_reason``, yet ``cancel_bot`` takes "the bot_id returned when creating the bot, or calling
  private/bots" and ``account.bots`` lists stopped bots: those two variants accept these three fields,
  typed as in the other variants.
"""

from __future__ import annotations

import copy
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

NULL_ALLOWED = re.compile(r"`null`|\bor null\b|be null", re.IGNORECASE)
PATTERN_CHANNELS = (
    "ticker",
    "book",
    "lwt",
    "recent_trades",
    "price_index",
    "underlying_statistics",
    "base_price",
    "index_components",
)


def find_api_yaml() -> Path | None:
    """``shared/thalex-api/api.yaml`` beside the checkout or beside any folder above it (a worktree)."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        candidate = folder / "shared" / "thalex-api" / "api.yaml"
        if candidate.exists():
            return candidate
    return None


def strict(node: Any) -> Any:
    """Forbid fields api.yaml does not name in every plain object schema; allow a documented null."""
    if isinstance(node, dict):
        node = {key: strict(value) for key, value in node.items()}
        if "properties" in node and not ({"allOf", "oneOf", "anyOf"} & node.keys()):
            node.setdefault("additionalProperties", False)
        described = str(node.get("description", ""))
        if isinstance(node.get("prefixItems"), list) and node.get("minItems", 0) > len(node["prefixItems"]):
            node["minItems"] = len(node["prefixItems"])
        if isinstance(node.get("type"), str) and node["type"] != "null" and NULL_ALLOWED.search(described):
            node["type"] = [node["type"], "null"]
        return node
    if isinstance(node, list):
        return [strict(item) for item in node]
    return node


@cache
def _load() -> dict | None:
    path = find_api_yaml()
    if path is None:
        return None
    document = yaml.safe_load(path.read_text())
    document = copy.deepcopy(document)
    document["components"]["schemas"] = strict(document["components"]["schemas"])
    _bot_ids_for_every_strategy(document["components"]["schemas"]["Bot"]["oneOf"])
    return document


BOT_FIELDS_API_YAML_LEAVES_OUT = ("bot_id", "status", "stop_reason")


def _bot_ids_for_every_strategy(variants: list[dict]) -> None:
    """DHedge and DFollow bots carry the id, status and stop reason every other bot carries."""
    sgsl = next(v for v in variants if v["title"] == "SGSL")
    for variant in variants:
        if variant["title"] in ("DHedge", "DFollow"):
            for name in BOT_FIELDS_API_YAML_LEAVES_OUT:
                variant["properties"][name] = sgsl["properties"][name]


def api() -> dict:
    document = _load()
    if document is None:
        pytest.fail("Thalex api.yaml not found: expected shared/thalex-api/api.yaml beside the checkout")
    return document


def _validator(schema: dict) -> Draft202012Validator:
    return Draft202012Validator({"components": api()["components"], **schema})


def result_schema(method: str) -> dict:
    success = api()["paths"][method]["rpc"]["responses"]["default"]["content"]["application/json"]["schema"][
        "oneOf"
    ][0]
    return strict(success["allOf"][1]["properties"]["result"])


def payload_schema(channel: str) -> dict:
    """The notification schema of a channel name (``ticker.BTC-PERPETUAL.raw`` -> the ticker payload)."""
    schemas = api()["components"]["schemas"]
    prefix = channel.split(".")[0]
    if prefix in PATTERN_CHANNELS:
        key = next(k for k in schemas if k.startswith(prefix + ".") and k.endswith("_payload"))
    else:
        key = f"{channel}_payload"
    return schemas[key]["properties"]["notification"]


def channel_family(channel: str) -> str:
    prefix = channel.split(".")[0]
    return prefix if prefix in PATTERN_CHANNELS else channel


def errors(schema: dict, instance: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _validator(schema).iter_errors(instance)
    ]


def message_problems(message: dict, method: str | None) -> list[str]:
    """Everything wrong with one message the exchange sent (``method``: what the answer answers)."""
    if "channel_name" in message:
        if set(message) != {"channel_name", "notification"}:
            return [f"notification with fields {sorted(message)}"]
        channel = message["channel_name"]
        return [f"{channel}: {p}" for p in errors(payload_schema(channel), message["notification"])]
    if "error" in message:
        if set(message) != {"id", "error"} or set(message["error"]) != {"code", "message"}:
            return [f"error answer with fields {sorted(message)}"]
        return errors({"$ref": "#/components/schemas/ErrorResponse"}, {"error": message["error"]})
    if set(message) != {"id", "result"}:
        return [f"answer with fields {sorted(message)}"]
    if method is None:
        return [f"an answer to no request: {message}"]
    return [f"{method}: {p}" for p in errors(result_schema(method), message["result"])]
