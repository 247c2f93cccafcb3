"""Authentic commands: take-profit signs every `Command`, the executor acts only on a valid signature.

Before this, the Redis ACL was the only barrier between anyone who could `XADD tp:commands` and
the account: a forged command listing 0.0001 BTC made the executor cancel every order and close
the whole position (issue 21, item 6). Now a command carries

    "signature": "hmac-sha256-v2:<64 hex digits>"

an HMAC-SHA256 (RFC 2104, the standard library's `hmac`) over the command's JSON as pydantic
writes it — every field but `signature`, `null`s left out, fields in the order `Command` declares
them, no spaces (`model_dump_json`) — with a secret that only take-profit and the executor hold
(`[commands] signing_key_file`, a file like every secret; at least 32 bytes, e.g. `openssl rand
-hex 32`). The signed form is computed from the validated document, not from the text on the wire,
so both sides agree however the JSON was spaced; any change to any field (an amount, an
instrument, the deadline) breaks the signature.

Issue 22 changed the signed form: the first one (`hmac-sha256:`, still verified) sorted the keys
with `json.dumps`, 1.3 ms for a 1,000-leg command on each side; pydantic's own writer takes 0.3 ms
(`bench/command_costs.py`). The prefix names the form, so an executor upgraded first verifies both.

The executor's side, in full::

    key = require_command_key(settings)              # at start: exit 2 naming the key if unusable
    try:
        verify_command(command, key)                 # before anything touches the exchange
    except ForgedCommand as exc:
        ...                                          # refuse it: a `failed` report with exc.reason

A valid signature proves take-profit wrote the command; it does not make an old command new (the
executor's own checks — at most once per `command_id`, the deadline — still apply).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from services.common.config import ConfigError, Problem, Settings, read_secret_file
from services.common.contracts import Command

SIGNATURE_PREFIX = "hmac-sha256-v2:"
"""What take-profit signs: the command's JSON as pydantic writes it (`canonical_command`)."""
SORTED_PREFIX = "hmac-sha256:"
"""The form before issue 22 (keys sorted by `json.dumps`): verified still, never written."""
MIN_KEY_BYTES = 32
KEY_SETTING = "commands.signing_key_file"
HOW_TO_MAKE_A_KEY = ("make one with `openssl rand -hex 32 > FILE && chmod 600 FILE` and give the same "
                     "file to takeprofit and the executor (docker compose: deploy/make-secrets.sh "
                     "writes secrets/command_key.txt)")


class ForgedCommand(Exception):
    """A command the executor must not act on; `reason` says why (for the `failed` report)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonical_command(command: Command) -> bytes:
    """The bytes the signature covers: every field but `signature`, nulls omitted, declaration order."""
    return command.model_dump_json(exclude={"signature"}, exclude_none=True).encode()


def sorted_command(command: Command) -> bytes:
    """The bytes a `hmac-sha256:` signature (before issue 22) covers: the same fields, keys sorted."""
    data = command.model_dump(mode="json", exclude={"signature"}, exclude_none=True)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.encode()


def command_signature(command: Command, key: bytes, prefix: str = SIGNATURE_PREFIX) -> str:
    """`<prefix><hex>` of the command's signed form under `key` (the form the prefix names)."""
    signed = sorted_command(command) if prefix == SORTED_PREFIX else canonical_command(command)
    return prefix + hmac.new(key, signed, hashlib.sha256).hexdigest()


def sign_command(command: Command, key: bytes) -> Command:
    """The same command, carrying its signature (what take-profit publishes)."""
    return command.model_copy(update={"signature": command_signature(command, key)})


def signed_text(command: Command, key: bytes) -> tuple[Command, bytes]:
    """The signed command and its stream text (exactly `encode_document` of it), serialized once.

    `sign_command` then `encode_document` wrote the 1,000-leg command twice (0.82 + 0.70 ms before
    the legs were columns: `bench/command_costs.py`); here the signed form is written once and the
    entry's text is that form with the signature added as its last field (where `Command` declares it).
    """
    signed = canonical_command(command)
    signature = SIGNATURE_PREFIX + hmac.new(key, signed, hashlib.sha256).hexdigest()
    text = b"".join((signed[:-1], b',"signature":"', signature.encode(), b'"}'))
    return command.model_copy(update={"signature": signature}), text


def verify_command(command: Command, key: bytes, text: str | bytes | None = None) -> None:
    """Raise `ForgedCommand` unless `command` carries a valid signature under `key`.

    `text`, the entry `command` was read from: when it is take-profit's (`signed_text`: the signed
    form with the signature added last), the signature is checked over those bytes as they came
    (0.10 ms at 1,000 legs) instead of over the command written again (0.74 ms; both
    `bench/command_costs.py`). Bytes whose HMAC
    matches are bytes take-profit signed, and `command` was read from exactly them. Any other text
    (spaced, keys reordered, hand-written) is checked as before, over the command written again.
    Compared in constant time (`hmac.compare_digest`): how long a refusal takes says nothing about
    how close a forgery came.
    """
    if command.signature is None:
        raise ForgedCommand(f"command {command.command_id} is not signed: refused (only take-profit, which "
                            f"signs every command with {KEY_SETTING}, may send commands)")
    if text is not None and _signed_as_written(command.signature, key, text):
        return
    prefix = SORTED_PREFIX if command.signature.startswith(SORTED_PREFIX) else SIGNATURE_PREFIX
    if not hmac.compare_digest(command.signature.encode(), command_signature(command, key, prefix).encode()):
        raise ForgedCommand(f"command {command.command_id} has an invalid signature: refused (forged or "
                            f"altered, or signed with another {KEY_SETTING})")


def _signed_as_written(signature: str, key: bytes, text: str | bytes) -> bool:
    """Whether `text` is `signed_text`'s form and its signed part carries `signature` under `key`."""
    wire = text.encode() if isinstance(text, str) else text
    suffix = b',"signature":"' + signature.encode() + b'"}'
    if not signature.startswith(SIGNATURE_PREFIX) or not wire.endswith(suffix):
        return False
    signed = wire[:-len(suffix)] + b"}"
    expected = SIGNATURE_PREFIX + hmac.new(key, signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(signature.encode(), expected.encode())


def is_authentic(command: Command, key: bytes) -> bool:
    """`verify_command` as a yes/no."""
    try:
        verify_command(command, key)
    except ForgedCommand:
        return False
    return True


def load_command_key(path: Path) -> bytes:
    """The secret from its file (surrounding whitespace stripped), or `ConfigError` naming the key."""
    text = read_secret_file(KEY_SETTING, path).strip()
    key = text.encode()
    if len(key) < MIN_KEY_BYTES:
        rule = f"holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed: {HOW_TO_MAKE_A_KEY}"
        raise ConfigError([Problem(KEY_SETTING, str(path), rule)], KEY_SETTING)
    return key


def require_command_key(settings: Settings) -> bytes:
    """The command key of a service that signs or verifies commands; `ConfigError` when it has none.

    Not optional: without it the executor could not tell take-profit's commands from anyone else's,
    and a guardian that cannot do so must not start (exit 2) rather than run unauthenticated.
    """
    path = settings.commands.signing_key_file
    if path is None:
        raise ConfigError([Problem(KEY_SETTING, None, f"required by takeprofit and the executor: "
                                   f"{HOW_TO_MAKE_A_KEY}")], KEY_SETTING)
    return load_command_key(path)


__all__ = [
    "SIGNATURE_PREFIX",
    "SORTED_PREFIX",
    "ForgedCommand",
    "canonical_command",
    "command_signature",
    "is_authentic",
    "load_command_key",
    "require_command_key",
    "sign_command",
    "signed_text",
    "sorted_command",
    "verify_command",
]
