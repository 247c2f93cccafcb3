"""`thalex-tp contract`: the wire contract as an AsyncAPI 3.0 document, generated with FastStream.

A FastStream application that is never started declares what docs/streams.md describes: one
publisher per stream (its payload model from `services.common.contracts`, its writer) and one
subscriber per consumer group (the reading service, the model it validates). FastStream turns
that into AsyncAPI, the schemas coming from the pydantic models themselves, so the document
cannot drift from the code: `docs/asyncapi.yaml` is this command's output, and a test fails
when it differs (regenerate: `thalex-tp contract > docs/asyncapi.yaml`).

The services do not use FastStream (the bus reads with its own loop, docs/streams.md says why);
only this command and examples/faststream_bot.py do, through the `faststream` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from services.common.contracts import (
    CONTRACT_VERSION,
    Command,
    Control,
    ControlAnswer,
    DeadLetter,
    Document,
    Fill,
    Notification,
    Positions,
    Report,
    Snapshot,
    Tick,
)
from services.common.streams import Names

EXIT_OK = 0
EXIT_MISSING = 2
SERVER_URL = "redis://redis:6379/0"
"""The compose deployment's Redis (deploy/docker-compose.yml); only a label here, never connected."""


@dataclass(frozen=True)
class Stream:
    """One stream of the contract: its name under the namespace, document, writer and meaning."""

    suffix: str
    model: type[Document]
    writer: str
    meaning: str


@dataclass(frozen=True)
class Group:
    """One consumer group: which service reads which stream, and what it does with an entry."""

    suffix: str
    group: str
    model: type[Document]
    purpose: str


STREAMS = (
    Stream("fills", Fill, "ingest", "The account's trades, exactly one entry per Thalex trade_id."),
    Stream("ticks", Tick, "ingest", "Latest prices of an instrument; top book levels for instruments held."),
    Stream("positions", Positions, "ingest", "The exchange's own portfolio, for reconciliation."),
    Stream("snapshots", Snapshot, "portfolio", "Fee-aware P&L of the whole account in the current epoch."),
    Stream("commands", Command, "takeprofit", "Close `fraction` of the listed positions, at most once."),
    Stream("reports", Report, "executor; ingest (halt_violation only)",
           "One step of executing a command, up to completed or failed; who broke a halt."),
    Stream("control", Control, "the operator (thalex-tp halt, resume, close-all)", "An operator's order."),
    Stream("control:answers", ControlAnswer, "takeprofit",
           "Take-profit's answer to each operator control: accepted or refused, and why."),
    Stream("notifications", Notification, "notify", "Every notification notify decided to send, per event."),
    Stream("deadletter", DeadLetter, "any service", "An input that could not be used, with the reason."),
)

GROUPS = (
    Group("fills", "portfolio", Fill, "folds each fill into the ledger once (de-duplicated by trade_id)"),
    Group("ticks", "portfolio", Tick, "reprices the positions held"),
    Group("positions", "portfolio", Positions, "reconciles the ledger with the exchange"),
    Group("reports", "portfolio", Report, "ends the epoch when a full closure completed"),
    Group("snapshots", "takeprofit", Snapshot, "checks the barriers; may decide a closure"),
    Group("control", "takeprofit", Control, "halt, resume, close-all"),
    Group("reports", "takeprofit", Report, "learns a closure's outcome; lifts or keeps the halt"),
    Group("commands", "executor", Command, "closes the positions on the exchange, once per command_id"),
    Group("snapshots", "notify", Snapshot, "warns when net_after_close nears a barrier; drift adopted"),
    Group("commands", "notify", Command, "tells the trader a decision was taken"),
    Group("reports", "notify", Report,
          "tells the trader a closure completed or failed, what it cost, and who broke a halt"),
)

DESCRIPTION = """\
The Redis Streams between thalex-tp's services. docs/streams.md is the contract of record;
services/common/contracts.py enforces it and this document is generated from it.

Encoding: every entry holds one JSON document in the field `__data__`, no envelope and no
headers (FastStream 0.7 writes a binary envelope by default: a FastStream app reading these
streams needs a plain-JSON message format, see examples/faststream_bot.py). Every document
carries "v": {version}; unknown fields and NaN/Infinity are rejected; optional fields are
omitted when absent. Names are `<namespace>:<stream>`, namespace `{namespace}` here (`tp` live,
`paper` for the compose paper profile).

Delivery: each reading service has its own consumer group, created at the start of the stream;
at least once, acked in the same Redis transaction as the handler's effects, own pending
entries first after a restart, idle entries of a dead consumer re-claimed, a malformed or
poison entry dead-lettered. Fills are de-duplicated by trade_id, commands run at most once per
command_id.

Keys that are not streams (so not channels below): `{namespace}:instruments` (hash, writer ingest:
instrument name -> InstrumentInfo JSON), `{namespace}:halt` (hash, writer takeprofit: one field
per Halt field; quoters stand down while it exists; ingest reads it to report who breaks it),
`{namespace}:halt:acks` (hash, writers: your quoters: quoter name -> HaltAck JSON).
"""


def _reader(model: type[Document], purpose: str) -> Callable[[Any], Awaitable[None]]:
    """A handler FastStream can describe (payload type, docstring); it never runs."""

    async def handle(document: Any) -> None:
        raise RuntimeError("the contract application is for documentation only; it is never started")

    handle.__annotations__ = {"document": model, "return": None}
    handle.__doc__ = purpose
    return handle


def specification(names: Names, server_url: str = SERVER_URL) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (as plain data) of the contract under `names`' namespace."""
    from faststream.redis import RedisBroker, StreamSub
    from faststream.specification import AsyncAPI

    broker = RedisBroker(server_url, protocol_version="6.2+", description="Redis (streams and hashes)")
    channels: list[str] = []  # in the order of docs/streams.md: each stream, then its readers
    for stream in STREAMS:
        address = names.key(stream.suffix)
        broker.publisher(stream=address, schema=stream.model, title=address,
                         description=f"{stream.meaning} Writer: {stream.writer}.")
        channels.append(address)
        for group in (g for g in GROUPS if g.suffix == stream.suffix):
            title = f"{address} (group {group.group})"
            sub = StreamSub(address, group=group.group, consumer=f"{group.group}-<replica>")
            broker.subscriber(stream=sub, title=title, description=f"{group.group} {group.purpose}.")(
                _reader(group.model, group.purpose))
            channels.append(title)
    document: dict[str, Any] = AsyncAPI(
        broker, title="thalex-tp wire contract", version=str(CONTRACT_VERSION),
        description=DESCRIPTION.format(version=CONTRACT_VERSION, namespace=names.namespace),
        schema_version="3.0.0",
    ).to_specification().to_jsonable()
    components = document["components"]
    for message in components["messages"].values():
        message.pop("correlationId", None)  # FastStream's header; the wire carries no headers
    # FastStream keeps subscribers in a WeakSet: put everything in a stable order
    document["channels"] = {c: document["channels"][c] for c in channels}
    document["operations"] = {c: document["operations"][c] for c in channels}
    components["messages"] = dict(sorted(components["messages"].items(),
                                         key=lambda item: channels.index(item[0].rpartition(":")[0])))
    components["schemas"] = dict(sorted(components["schemas"].items()))
    return document


def render(document: dict[str, Any], as_json: bool = False) -> str:
    """The document as YAML (multi-line text as literal blocks, so the description reads as written)."""
    if as_json:
        return json.dumps(document, indent=2) + "\n"
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return str(yaml.dump(document, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=110))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="thalex-tp contract",
        description="Print the wire contract as an AsyncAPI 3.0 document (generated with FastStream).")
    parser.add_argument("--json", action="store_true", help="JSON instead of YAML")
    parser.add_argument("--namespace", default=Names().namespace, help="the names' namespace (default: tp)")
    args = parser.parse_args(argv)
    try:
        text = render(specification(Names(args.namespace)), args.json)
    except ImportError as exc:
        print(f"thalex-tp contract needs FastStream ({exc.name} is missing): "
              "pip install 'thalex-tp[faststream]'", file=sys.stderr)
        return EXIT_MISSING
    sys.stdout.write(text)
    return EXIT_OK
