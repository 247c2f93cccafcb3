"""Authentic commands (issue 21, item 6): sign, verify, refuse anything forged or altered."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.bus import DATA_FIELD, encode_document, validate_entry
from services.common.contracts import CloseReason, Command, Legs, PositionToClose
from services.common.signing import (
    ForgedCommand,
    canonical_command,
    command_signature,
    is_authentic,
    sign_command,
    signed_text,
    sorted_command,
    verify_command,
)

KEY = b"0123456789abcdef0123456789abcdef"
TS = 1_700_000_000.0


def command(**changes: object) -> Command:
    """A command; `positions=` rows become a v2 command's `legs` unless `v=1` asks for the old form."""
    values: dict[str, object] = dict(
        command_id="e3-take_profit-s41-n1", epoch=3, reason=CloseReason.TAKE_PROFIT, fraction=1.0,
        positions=[PositionToClose(instrument="BTC-PERPETUAL", amount=0.01, exit_price=60_000.5,
                                   mark=60_010.0)],
        snapshot_seq=41, net_pnl=1.25, threshold=1.1, created_ts=TS, deadline_ts=TS + 30)
    values.update(changes)
    if values.get("v") != 1:
        values["legs"] = Legs.of(values.pop("positions"))  # type: ignore[arg-type]
    return Command(**values)  # type: ignore[arg-type]


def on_the_wire(doc: Command) -> Command:
    """What the executor reads: the published JSON, validated strictly."""
    return validate_entry(Command, {DATA_FIELD.encode(): encode_document(doc).encode()})


def test_a_signed_command_verifies_after_the_wire() -> None:
    signed = sign_command(command(), KEY)
    assert signed.signature is not None and signed.signature.startswith("hmac-sha256-v2:")
    verify_command(on_the_wire(signed), KEY)
    assert is_authentic(on_the_wire(signed), KEY)


def test_the_signature_covers_the_json_of_everything_else() -> None:
    """Worked by hand: the signed text (fields in `Command`'s order), then HMAC-SHA256 of it under the key."""
    import hashlib
    import hmac
    doc = command(positions=[PositionToClose(instrument="BTC-PERPETUAL", amount=0.01)], groups=None)
    text = canonical_command(doc).decode()
    assert text == ('{"v":2,"command_id":"e3-take_profit-s41-n1","epoch":3,"reason":"take_profit",'
                    '"fraction":1.0,"legs":{"instrument":["BTC-PERPETUAL"],"amount":[0.01]},'
                    '"snapshot_seq":41,"net_pnl":1.25,"threshold":1.1,"created_ts":1700000000.0,'
                    '"deadline_ts":1700000030.0}')
    expected = hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()
    assert command_signature(doc, KEY) == "hmac-sha256-v2:" + expected
    assert canonical_command(sign_command(doc, KEY)) == text.encode()  # the signature is not signed


def test_a_command_signed_in_the_sorted_form_before_issue_22_still_verifies() -> None:
    """An executor upgraded before take-profit: the older `hmac-sha256:` signature (keys sorted), on
    the command form of its time (v1: one object per leg in `positions`)."""
    import hashlib
    import hmac
    doc = command(v=1, positions=[PositionToClose(instrument="BTC-PERPETUAL", amount=0.01)], groups=None)
    text = sorted_command(doc).decode()
    assert text == ('{"command_id":"e3-take_profit-s41-n1","created_ts":1700000000.0,'
                    '"deadline_ts":1700000030.0,'
                    '"epoch":3,"fraction":1.0,"net_pnl":1.25,"positions":[{"amount":0.01,'
                    '"instrument":"BTC-PERPETUAL"}],"reason":"take_profit","snapshot_seq":41,"threshold":1.1,"v":1}')
    old = doc.model_copy(update={
        "signature": "hmac-sha256:" + hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()})
    verify_command(on_the_wire(old), KEY)
    altered = on_the_wire(old).model_copy(update={"threshold": 0.5})
    assert not is_authentic(altered, KEY)
    # the v2 digest under the old prefix (or the reverse) is no signature of either form
    swapped = doc.model_copy(update={"signature": "hmac-sha256:" + hmac.new(
        KEY, canonical_command(doc), hashlib.sha256).hexdigest()})
    assert not is_authentic(on_the_wire(swapped), KEY)


FORGERIES = [
    ("unsigned", lambda signed: command(), "is not signed"),
    ("bigger amount", lambda signed: signed.model_copy(update={"legs": Legs.of([
        PositionToClose(instrument="BTC-PERPETUAL", amount=0.02, exit_price=60_000.5, mark=60_010.0)])}),
     "invalid signature"),
    ("another instrument", lambda signed: signed.model_copy(update={"legs": Legs.of([
        PositionToClose(instrument="ETH-PERPETUAL", amount=0.01, exit_price=60_000.5, mark=60_010.0)])}),
     "invalid signature"),
    ("later deadline", lambda signed: signed.model_copy(update={"deadline_ts": TS + 3600}),
     "invalid signature"),
    ("other reason", lambda signed: signed.model_copy(update={"reason": CloseReason.EMERGENCY_STOP}),
     "invalid signature"),
    ("another key", lambda signed: sign_command(command(), b"x" * 32), "invalid signature"),
    ("a copied signature", lambda signed: command(command_id="forged-1").model_copy(
        update={"signature": signed.signature}), "invalid signature"),
]


@pytest.mark.parametrize(("name", "forge", "why"), FORGERIES, ids=[f[0] for f in FORGERIES])
def test_a_forged_or_altered_command_is_refused(name: str, forge, why: str) -> None:  # type: ignore[no-untyped-def]
    forged = on_the_wire(forge(sign_command(command(), KEY)))
    with pytest.raises(ForgedCommand, match=why) as info:
        verify_command(forged, KEY)
    assert forged.command_id in info.value.reason
    assert not is_authentic(forged, KEY)


def test_a_malformed_signature_never_reaches_the_executor() -> None:
    data = json.loads(encode_document(command()))
    data["signature"] = "hmac-sha256-v2:not-hex"
    with pytest.raises(ValueError, match="signature"):
        validate_entry(Command, {DATA_FIELD.encode(): json.dumps(data).encode()})


amounts = st.floats(min_value=1e-8, max_value=1e6, allow_nan=False).filter(lambda x: x != 0)


@settings(max_examples=200, deadline=None)
@given(amount=amounts, sign=st.sampled_from([1.0, -1.0]), pnl=st.floats(-1e6, 1e6, allow_nan=False),
       fraction=st.floats(0.01, 1.0),
       instrument=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=30)
       .filter(str.strip))  # an instrument name is never only whitespace (NonEmptyStr)
def test_any_command_signed_verifies_after_the_wire_and_any_change_is_caught(
        amount: float, sign: float, pnl: float, fraction: float, instrument: str) -> None:
    doc = command(positions=[PositionToClose(instrument=instrument, amount=sign * amount)], net_pnl=pnl,
                  fraction=fraction)
    signed = on_the_wire(sign_command(doc, KEY))
    verify_command(signed, KEY)
    altered = signed.model_copy(update={"net_pnl": pnl + 1.0})
    assert not is_authentic(altered, KEY)


def test_signed_text_is_the_signed_command_written_once() -> None:
    """Worked by hand: the entry's text is the signed form with `,"signature":"…"` before its last brace."""
    doc = command(positions=[PositionToClose(instrument="BTC-PERPETUAL", amount=0.01)], groups=None)
    signed, text = signed_text(doc, KEY)
    assert signed == sign_command(doc, KEY)
    assert text == canonical_command(doc)[:-1] + f',"signature":"{signed.signature}"}}'.encode()
    assert text == encode_document(signed).encode()


def test_the_entry_is_checked_as_it_came_and_anything_altered_is_refused() -> None:
    """The executor checks the signature over the entry's bytes when they are take-profit's form; an
    entry altered after signing (0.01 → 0.02), or re-spaced, is checked over the command written
    again: the altered one is refused, the re-spaced one verifies."""
    signed, text = signed_text(command(), KEY)
    verify_command(validate_entry(Command, {DATA_FIELD.encode(): text}), KEY, text)
    altered = text.replace(b'"amount":[0.01]', b'"amount":[0.02]')
    assert altered != text
    with pytest.raises(ForgedCommand, match="invalid signature"):
        verify_command(validate_entry(Command, {DATA_FIELD.encode(): altered}), KEY, altered)
    spaced = json.dumps(json.loads(text), indent=1)
    verify_command(validate_entry(Command, {DATA_FIELD.encode(): spaced.encode()}), KEY, spaced)
    with pytest.raises(ForgedCommand, match="invalid signature"):
        verify_command(signed, b"another key, 32 bytes at least..", text)


legs = st.lists(st.builds(PositionToClose, instrument=st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1, max_size=20).filter(str.strip),
    amount=amounts, exit_price=st.none() | st.floats(0, 1e6), mark=st.none() | st.floats(0, 1e6),
    exit_within_depth=st.none() | st.booleans()), max_size=8, unique_by=lambda p: p.instrument.strip())


@settings(max_examples=200, deadline=None)
@given(positions=legs, command_id=st.text(min_size=1, max_size=30).filter(str.strip))
def test_any_legs_signed_and_written_once_read_back_verified_and_the_same(
        positions: list[PositionToClose], command_id: str) -> None:
    """Take-profit's text (`signed_text`) is `encode_document` of `sign_command`, the executor reads
    it back as the same command, verified over its bytes, and its legs are the rows it was built
    from, in order (a column every leg leaves out is left out)."""
    doc = command(positions=positions, command_id=command_id)
    signed, text = signed_text(doc, KEY)
    assert signed == sign_command(doc, KEY)
    assert text == encode_document(signed).encode()
    read = validate_entry(Command, {DATA_FIELD.encode(): text})
    verify_command(read, KEY, text)
    assert read == signed
    assert [tuple(leg) for leg in read.closing().rows()] == [
        (p.instrument.strip(), p.amount, p.exit_price, p.mark, p.exit_within_depth) for p in positions]


def test_a_v1_command_signed_before_the_legs_were_columns_still_verifies_and_lists_its_legs() -> None:
    """A closure in flight across the upgrade: take-profit wrote it as v1 (`positions`, one object per
    leg, signed in the `hmac-sha256-v2:` form); the upgraded executor reads, verifies and closes it."""
    old = command(v=1, positions=[
        PositionToClose(instrument="BTC-PERPETUAL", amount=0.01, exit_price=60_000.5, mark=60_010.0),
        PositionToClose(instrument="ETH-PERPETUAL", amount=-0.2)])
    _, text = signed_text(old, KEY)
    assert b'"v":1,' in text and b'"positions":[{"instrument":"BTC-PERPETUAL"' in text
    read = validate_entry(Command, {DATA_FIELD.encode(): text})
    verify_command(read, KEY, text)
    assert read.closing() == Legs(instrument=["BTC-PERPETUAL", "ETH-PERPETUAL"], amount=[0.01, -0.2],
                                  exit_price=[60_000.5, None], mark=[60_010.0, None])
