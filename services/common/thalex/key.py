"""A Thalex API key as a service holds it, and the refusals that must stop the service.

Two ways a key can be wrong, both fatal (exit 2 naming the cause, never a retry loop):

* the file does not hold a usable RSA private key: found at start-up, before any connection,
  by signing a login token the way the official client does (`ThalexKey.load`);
* the exchange refuses the login (unknown key id, a key that does not match, a locked account:
  `FATAL_LOGIN_CODES`): `LoginRejected`, raised by the session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import jwt
from thalex.thalex import _make_auth_token

from services.common.config import ConfigError, Problem, require_key

FATAL_LOGIN_CODES = frozenset({19, 26, 28})
"""authentication failed, account locked, unauthorized: retrying cannot help."""


@dataclass(frozen=True)
class ThalexKey:
    """A key id and its private key (never shown: `repr` leaves it out), named by its config section."""

    section: str
    """The config section that names the key (`thalex`, `executor`): errors point at its keys."""
    key_id: str
    private_key: str = field(repr=False)
    path: Path
    hint: str = ""
    """What kind of key the service needs, for the refusal's message."""

    @classmethod
    def load(cls, section: str, key_id: str | None, private_key_file: Path | None,
             hint: str = "") -> ThalexKey:
        """Read the key file and check it can sign a login; `ConfigError` (exit 2) names what is wrong."""
        key_id, pem = require_key(section, key_id, private_key_file)
        assert private_key_file is not None
        try:
            _make_auth_token(key_id, pem)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise ConfigError([Problem(
                f"{section}.private_key_file", str(private_key_file),
                f"not a usable RSA private key in PEM form ({type(exc).__name__}: {exc}); "
                "the exchange could never accept a login signed with it")], section) from None
        return cls(section, key_id, pem, private_key_file, hint)


class LoginRejected(ConfigError):
    """The exchange refused the key: stop with exit 2 naming the key id; do not retry."""

    def __init__(self, key: ThalexKey, url: str, code: int | None, message: str) -> None:
        self.key_id, self.code, self.message = key.key_id, code, message
        self.reason = message + (f" (error {code})" if code is not None else "")
        hint = f" ({key.hint})" if key.hint else ""
        super().__init__([Problem(f"{key.section}.key_id", key.key_id, (
            f"the exchange at {url} refused the login of this key: {self.reason}; check the key id, "
            f"{key.section}.private_key_file and that the key is enabled{hint}"))], f"{key.section} login")
