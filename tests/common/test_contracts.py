"""Every wire document: a valid example round-trips; each invalid case names its field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from services.common import contracts as c
from services.common.bus import ALT_DATA_FIELD, DATA_FIELD, MalformedEntry, encode_document, validate_entry

TS = 1_700_000_000.0

VALID: dict[type[BaseModel], dict[str, Any]] = {
    c.Fill: dict(
        trade_id="T1",
        order_id="O1",
        client_order_id=7,
        instrument="BTC-PERPETUAL",
        side="buy",
        price=65000.5,
        amount=0.01,
        fee=0.325,
        fee_rate=0.0005,
        liquidity="taker",
        position_after=0.01,
        funding_mark=0.12,
        label="tp-e1-take_profit",
        trade_type="normal",
        exchange_ts=TS,
        ingest_ts=TS + 0.01,
    ),
    c.Tick: dict(
        instrument="BTC-PERPETUAL",
        mark=65000.0,
        best_bid=64999.0,
        best_ask=65001.0,
        bids=[[64999.0, 1.0], [64990.0, 2.0]],
        asks=[[65001.0, 0.5]],
        index=64998.0,
        funding_mark=0.1,
        exchange_ts=TS,
        ingest_ts=TS,
    ),
    c.Positions: dict(
        positions=[
            dict(
                instrument="BTC-PERPETUAL",
                position=-0.5,
                mark_price=65000.0,
                average_price=64000.0,
                realised_pnl=1.0,
                unrealised_pnl=-500.0,
                unrealised_perpetual_funding=0.2,
            )
        ],
        exchange_ts=TS,
        ingest_ts=TS,
    ),
    c.InstrumentInfo: dict(
        type="future",
        product="FBTCUSD",
        underlying="BTCUSD",
        tick_size=1.0,
        volume_tick_size=0.001,
        min_order_amount=0.001,
        expiry_ts=TS + 86400,
    ),
    c.Snapshot: dict(
        seq=3,
        epoch=1,
        ts=TS,
        positions=[
            dict(
                instrument="BTC-PERPETUAL",
                position=0.5,
                avg_entry=64000.0,
                mark=65000.0,
                exit_price=64990.0,
                exit_price_source="book",
                realized_pnl=0.0,
                unrealized_pnl=500.0,
                funding_pnl=-0.1,
                fees_paid=0.16,
                est_close_fee=16.25,
                est_slippage=5.0,
                opened_ts=TS - 60,
                underlying="BTCUSD",
                instrument_type="perpetual",
            )
        ],
        realized_pnl=0.0,
        unrealized_pnl=500.0,
        funding_pnl=-0.1,
        fees_paid=0.16,
        est_close_fees=16.25,
        est_slippage=5.0,
        gross_pnl=499.9,
        net_pnl=499.74,
        net_after_close=476.865,
        oldest_position_ts=TS - 60,
        stale_instruments=[],
        drift=[dict(instrument="ETH-PERPETUAL", ledger_position=0.0, exchange_position=1.0, since=TS)],
    ),
    c.Command: dict(
        command_id="e1-take_profit-s3",
        epoch=1,
        reason="take_profit",
        fraction=1.0,
        legs=dict(instrument=["BTC-PERPETUAL", "BTC-27DEC26"], amount=[0.5, -0.2]),
        groups=[dict(underlying="BTCUSD", instruments=["BTC-PERPETUAL", "BTC-27DEC26"])],
        snapshot_seq=3,
        net_pnl=1.2,
        threshold=1.1,
        created_ts=TS,
        deadline_ts=TS + 30,
    ),
    c.Report: dict(
        command_id="e1-take_profit-s3",
        status="filled",
        epoch=1,
        fraction=1.0,
        instrument="BTC-PERPETUAL",
        order_id="O9",
        label="tp-e1-take_profit-s3",
        amount=0.5,
        filled=0.5,
        avg_price=64990.0,
        fee=16.2,
        error=dict(code=4, message="throttle exceeded"),
        orders=[dict(instrument="BTC-PERPETUAL", side="sell", amount=0.5, price=64670.0, label="tp-x")],
        ts=TS,
    ),
    c.Control: dict(action="close_all", by="operator@host", ts=TS),
    c.ControlAnswer: dict(
        control_id="1700000000000-0",
        action="close_all",
        by="operator@host",
        outcome="refused",
        reason="no_positions",
        detail="there is no open position to close",
        halt="take_profit",
        ts=TS,
    ),
    c.Notification: dict(
        id="decision:e1-take_profit-s3-n1",
        kind="decision",
        severity="info",
        title="Take profit: closing everything",
        text="net after close +1.12 vs target +1.10",
        facts={"figure": 1.12, "threshold": 1.1, "command_id": "e1-take_profit-s3-n1"},
        ts=TS,
    ),
    c.Halt: dict(reason="take_profit", command_id="e1-take_profit-s3", since=TS, until=TS + 60),
    c.HaltAck: dict(command_id="e1-take_profit-s3", ts=TS),
    c.DeadLetter: dict(
        service="portfolio", source_stream="tp:fills", entry_id="1-0", raw="{oops", error="not JSON", ts=TS
    ),
}


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_valid_document_round_trips_through_json(model: type[BaseModel]) -> None:
    doc = model.model_validate(VALID[model])
    text = doc.model_dump_json()
    versions = {c.Snapshot: c.SNAPSHOT_VERSION, c.Command: c.COMMAND_VERSION}
    assert json.loads(text)["v"] == versions.get(model, 1)
    assert model.model_validate_json(text) == doc


def test_a_v1_snapshot_is_read_as_a_full_one_with_its_derived_figures() -> None:
    """A reader of v2 still reads what an old portfolio wrote: every row, so the figures follow."""
    doc = dict(VALID[c.Snapshot], v=1)
    snap = c.Snapshot.model_validate_json(json.dumps(doc), strict=True)
    assert snap.full and snap.open_positions == sum(1 for p in snap.positions if p.position != 0)
    with pytest.raises(ValidationError, match="always full"):
        c.Snapshot.model_validate_json(json.dumps(dict(doc, full=False)), strict=True)
    with pytest.raises(ValidationError, match="snapshot version"):
        c.Snapshot.model_validate_json(json.dumps(dict(doc, v=3)), strict=True)


# (model, field path to change, bad value, the field the error must name)
INVALID: list[tuple[type[BaseModel], str, Any, str]] = [
    (c.Fill, "v", 2, "v"),
    (c.Fill, "side", "long", "side"),
    (c.Fill, "amount", 0, "amount"),
    (c.Fill, "amount", -0.01, "amount"),
    (c.Fill, "price", float("nan"), "price"),
    (c.Fill, "price", -1.0, "price"),
    (c.Fill, "fee", float("inf"), "fee"),
    (c.Fill, "trade_id", "", "trade_id"),
    (c.Fill, "trade_id", None, "trade_id"),
    (c.Fill, "liquidity", "both", "liquidity"),
    (c.Fill, "trade_type", "gift", "trade_type"),
    (c.Fill, "surprise", 1, "surprise"),
    (c.Tick, "mark", float("-inf"), "mark"),
    (c.Tick, "bids", [[1.0, 0.0]], "bids"),
    (c.Tick, "bids", [[1.0, 1.0], [2.0, 1.0]], "bids sorted"),
    (c.Tick, "asks", [[2.0, 1.0], [1.0, 1.0]], "asks sorted"),
    (c.Tick, "mark_ts", -1.0, "mark_ts"),
    (c.Tick, "mark_ts", TS + 0.001, "mark_ts must not be later than exchange_ts"),
    (
        c.Positions,
        "positions",
        [{"instrument": "X", "position": float("nan"), "mark_price": 1, "average_price": 1}],
        "positions.0.position",
    ),
    (c.InstrumentInfo, "type", "swap", "type"),
    (c.InstrumentInfo, "tick_size", 0, "tick_size"),
    (c.InstrumentInfo, "min_order_amount", 0.0001, "min_order_amount must be >= volume_tick_size"),
    (c.Snapshot, "seq", -1, "seq"),
    (c.Snapshot, "net_after_close", float("nan"), "net_after_close"),
    (c.Snapshot, "positions", [{"instrument": "X"}], "positions.0.position"),
    (c.Command, "reason", "feeling_lucky", "reason"),
    (c.Command, "fraction", 0, "fraction"),
    (c.Command, "fraction", 1.5, "fraction"),
    (c.Command, "legs", {"instrument": ["X", "Y"], "amount": [1.0, 0.0]},
     "legs amount[1] (Y) must not be zero"),
    (c.Command, "legs", {"instrument": ["X", "Y"], "amount": [1.0]},
     "legs.amount has 1 entries for 2 instruments"),
    (c.Command, "legs", {"instrument": ["X"], "amount": [1.0], "mark": [1.0, 2.0]},
     "legs.mark has 2 entries"),
    (c.Command, "legs", {"instrument": ["X", "X"], "amount": [1.0, 2.0]},
     "legs.instrument lists an instrument twice"),
    (c.Command, "legs", {"instrument": [""], "amount": [1.0]}, "legs.instrument.0"),
    (c.Command, "legs", {"instrument": ["X"], "amount": [1.0], "exit_price": [-1.0]}, "legs.exit_price.0"),
    (c.Command, "positions", [{"instrument": "X", "amount": 1.0}],
     "positions a v2 command lists its legs in"),
    (c.Command, "v", 3, "unsupported command version 3"),
    (c.Command, "deadline_ts", TS - 1, "deadline_ts must be after created_ts"),
    (c.Command, "command_id", "", "command_id"),
    (c.Report, "status", "done", "status"),
    (c.Report, "label", "x" * 33, "label"),
    (c.Report, "error", {"code": "four"}, "error.code"),
    (c.Control, "action", "panic", "action"),
    (c.Control, "by", "", "by"),
    (c.Halt, "since", -5, "since"),
    (c.HaltAck, "ts", None, "ts"),
    (c.DeadLetter, "error", "", "error"),
]


@pytest.mark.parametrize(
    ("model", "field", "value", "named"), INVALID, ids=[f"{m.__name__}.{f}={v!r}" for m, f, v, _ in INVALID]
)
def test_invalid_document_is_rejected_naming_the_field(
    model: type[BaseModel], field: str, value: Any, named: str
) -> None:
    data = dict(VALID[model])
    data[field] = value
    with pytest.raises(ValidationError) as info:
        model.model_validate(data)
    message = str(info.value)
    assert named.split(" ")[0] in message
    if " " in named:  # a rule between fields: its words appear
        assert named.split(" ", 1)[1] in message


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_required_fields_are_required(model: type[BaseModel]) -> None:
    required = [name for name, f in model.model_fields.items() if f.is_required()]
    for name in required:
        data = {k: v for k, v in VALID[model].items() if k != name}
        with pytest.raises(ValidationError, match=name):
            model.model_validate(data)


def test_a_tick_says_when_its_mark_was_marked_and_one_of_an_older_ingest_still_reads() -> None:
    """`mark_ts` (the re-issued mark's own time) is optional: a tick written before the field
    existed is read as before, its mark as new as the tick."""
    older = validate_entry(c.Tick, {DATA_FIELD.encode(): json.dumps(VALID[c.Tick]).encode()})
    assert older.mark_ts is None and older.mark_time == TS
    reissued = c.Tick.model_validate({**VALID[c.Tick], "mark_ts": TS - 0.02})
    assert reissued.mark_time == TS - 0.02 and reissued.exchange_ts == TS
    assert "mark_ts" not in encode_document(older) and '"mark_ts":' in encode_document(reissued)


def test_fill_signed_amount_follows_the_side() -> None:
    buy = c.Fill.model_validate(VALID[c.Fill])
    sell = c.Fill.model_validate({**VALID[c.Fill], "side": "sell"})
    assert (buy.signed_amount, sell.signed_amount) == (0.01, -0.01)


@pytest.mark.parametrize("model", list(VALID), ids=lambda m: m.__name__)
def test_a_stream_entry_validates_like_the_document(model: type[BaseModel]) -> None:
    """`validate_entry`'s one-pass JSON validation gives what `json.loads` + `model_validate` gives."""
    text = json.dumps(VALID[model])
    for fields in (
        {DATA_FIELD.encode(): text.encode()},
        {DATA_FIELD: text},
        {ALT_DATA_FIELD.encode(): text.encode()},
    ):
        assert validate_entry(model, fields) == model.model_validate(json.loads(text))


@pytest.mark.parametrize(
    ("model", "field", "value", "named"), INVALID, ids=[f"{m.__name__}.{f}={v!r}" for m, f, v, _ in INVALID]
)
def test_a_bad_stream_entry_is_malformed_naming_the_field(
    model: type[BaseModel], field: str, value: Any, named: str
) -> None:
    data = dict(VALID[model])
    data[field] = value
    with pytest.raises(MalformedEntry, match=f"{model.__name__} invalid: .*{named.split(' ')[0]}"):
        validate_entry(model, {DATA_FIELD.encode(): json.dumps(data).encode()})
    with pytest.raises(MalformedEntry, match="not valid JSON"):
        validate_entry(model, {DATA_FIELD.encode(): b"{oops"})
    with pytest.raises(MalformedEntry, match="must be a JSON object"):
        validate_entry(model, {DATA_FIELD.encode(): b"[1, 2]"})


# On the wire nothing becomes a number that was not one: pydantic's lax mode would read `true` as 1
# and "0.05" as 0.05 (issue 21, item 8).
NOT_NUMBERS: list[tuple[type[BaseModel], str, Any]] = [
    (c.Fill, "v", True),
    (c.Fill, "v", 1.0),
    (c.Fill, "v", "1"),
    (c.Fill, "amount", True),
    (c.Fill, "fee", "0.05"),
    (c.Fill, "price", "65000"),
    (c.Fill, "exchange_ts", False),
    (c.Tick, "mark", True),
    (c.Tick, "bids", [["64999", 1.0]]),
    (c.Snapshot, "seq", True),
    (c.Snapshot, "net_after_close", "-450"),
    (c.Command, "fraction", True),
    (c.Command, "epoch", "1"),
    (c.Report, "filled", "0.5"),
    (c.InstrumentInfo, "volume_tick_size", "0.001"),
    (c.Control, "ts", True),
]


@pytest.mark.parametrize(("model", "field", "value"), NOT_NUMBERS,
                         ids=[f"{m.__name__}.{f}={v!r}" for m, f, v in NOT_NUMBERS])
def test_on_the_wire_a_bool_or_a_string_is_never_a_number(model: type[BaseModel], field: str,
                                                          value: Any) -> None:
    data = {**VALID[model], field: value}
    with pytest.raises(MalformedEntry, match=f"{model.__name__} invalid: .*{field}"):
        validate_entry(model, {DATA_FIELD.encode(): json.dumps(data).encode()})


def test_integers_still_count_as_numbers_on_the_wire() -> None:
    data = {**VALID[c.Fill], "price": 65000, "amount": 1, "fee": 0, "exchange_ts": 1_700_000_000}
    fill = validate_entry(c.Fill, {DATA_FIELD.encode(): json.dumps(data).encode()})
    assert (fill.price, fill.amount, fill.fee) == (65000.0, 1.0, 0.0)


def test_a_deeply_nested_entry_is_malformed_with_its_real_reason() -> None:
    deep = '{"v": 1, "trade_id": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(MalformedEntry, match=r"not valid JSON: .*recursion"):
        validate_entry(c.Fill, {DATA_FIELD.encode(): deep.encode()})


def test_an_unknown_version_says_so() -> None:
    with pytest.raises(MalformedEntry, match="unsupported contract version 2"):
        validate_entry(c.Fill, {DATA_FIELD.encode(): json.dumps({**VALID[c.Fill], "v": 2}).encode()})


def test_a_v1_command_lists_its_legs_as_objects_and_reads_as_columns() -> None:
    """Written before the legs were columns (still read: a closure in flight across the upgrade)."""
    v1 = {**{k: v for k, v in VALID[c.Command].items() if k != "legs"}, "v": 1,
          "positions": [{"instrument": "BTC-PERPETUAL", "amount": 0.5, "mark": 60_000.0},
                        {"instrument": "BTC-27DEC26", "amount": -0.2}]}
    command = validate_entry(c.Command, {DATA_FIELD.encode(): json.dumps(v1).encode()})
    assert command.legs is None and command.closing() == c.Legs(
        instrument=["BTC-PERPETUAL", "BTC-27DEC26"], amount=[0.5, -0.2], mark=[60_000.0, None])
    assert [leg.instrument for leg in command.closing().rows()] == ["BTC-PERPETUAL", "BTC-27DEC26"]
    with pytest.raises(MalformedEntry, match="amount must not be zero"):
        validate_entry(c.Command, {DATA_FIELD.encode(): json.dumps(
            {**v1, "positions": [{"instrument": "X", "amount": 0}]}).encode()})
    with pytest.raises(MalformedEntry, match="a v1 command lists its legs in `positions`"):
        both = {**v1, "legs": VALID[c.Command]["legs"]}
        validate_entry(c.Command, {DATA_FIELD.encode(): json.dumps(both).encode()})
    upgraded = command.upgraded()  # what the executor acts on, once the v1 signature is verified
    assert (upgraded.v, upgraded.positions, upgraded.legs) == (2, None, command.closing())
    assert c.Command.model_validate_json(upgraded.model_dump_json(exclude_none=True)) == upgraded
    assert upgraded.upgraded() is upgraded


def test_legs_read_off_their_columns_in_order() -> None:
    legs = c.Legs(instrument=["A", "B"], amount=[1.0, -2.0], exit_price=[10.0, None],
                  exit_within_depth=[True, None])
    assert list(legs.rows()) == [c.LegToClose("A", 1.0, 10.0, None, True),
                                 c.LegToClose("B", -2.0, None, None, None)]
    assert c.Legs.of(legs.rows()) == legs and len(legs) == 2
    assert c.Legs.of([]) == c.Legs(instrument=[], amount=[]) and not c.Legs.of([])
