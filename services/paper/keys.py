"""API keys of the paper exchange: generation, loading and ``public/login`` token checks.

Key directory layout (one key id ``NAME`` per triple):

* ``NAME.pem``      RSA private key (PKCS#8 PEM, mode 0600) — what a client logs in with;
* ``NAME.pub.pem``  the public key the paper exchange verifies with;
* ``NAME.json``     ``{"kid": NAME, "read_only": bool}`` — permissions of the key.

The exchange only needs the public files; a directory with only ``*.pub.pem`` (+ json) works.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

log = logging.getLogger(__name__)

MAX_TOKEN_AGE = 60.0
MAX_CLOCK_SKEW = 30.0


@dataclass(frozen=True)
class ApiKey:
    """A public key the exchange accepts, with its permission."""

    kid: str
    public_key: rsa.RSAPublicKey
    read_only: bool
    account: str
    """The account the key acts for; several keys (e.g. read-only and trading) may share one."""


@dataclass(frozen=True)
class KeyFiles:
    """Where ``generate_key`` wrote a key pair; ``private_pem`` is what ``Thalex.login`` takes."""

    kid: str
    private_key_path: Path
    public_key_path: Path
    meta_path: Path
    read_only: bool

    @property
    def private_pem(self) -> str:
        return self.private_key_path.read_text()


class LoginError(Exception):
    """The token does not prove a registered key (error 19)."""


def generate_key(
    directory: Path | str, kid: str, read_only: bool = False, account: str | None = None
) -> KeyFiles:
    """Write a fresh 2048-bit RSA key pair and its permission file for key id ``kid``."""
    if not kid or "/" in kid or kid.startswith("."):
        raise ValueError(f"invalid key id {kid!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_path = directory / f"{kid}.pem"
    public_path = directory / f"{kid}.pub.pem"
    meta_path = directory / f"{kid}.json"
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_bytes)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    meta_path.write_text(json.dumps({"kid": kid, "read_only": read_only, "account": account or kid}) + "\n")
    return KeyFiles(kid, private_path, public_path, meta_path, read_only)


def load_keys(directory: Path | str) -> dict[str, ApiKey]:
    """Every ``*.pub.pem`` in ``directory``; a key without a json file may trade."""
    keys: dict[str, ApiKey] = {}
    for public_path in sorted(Path(directory).glob("*.pub.pem")):
        kid = public_path.name[: -len(".pub.pem")]
        public_key = serialization.load_pem_public_key(public_path.read_bytes())
        if not isinstance(public_key, rsa.RSAPublicKey):
            log.warning("skipping %s: not an RSA public key", public_path.name)
            continue
        meta_path = public_path.with_name(f"{kid}.json")
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        keys[kid] = ApiKey(kid, public_key, bool(meta.get("read_only", False)), str(meta.get("account", kid)))
    return keys


def verify_token(token: object, keys: dict[str, ApiKey], now: float | None = None) -> ApiKey:
    """Check a login JWT: RS512, a known ``kid`` header, a valid signature and a fresh ``iat``."""
    if not isinstance(token, str):
        raise LoginError("token must be a string")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise LoginError(f"malformed token: {exc}") from exc
    key = keys.get(str(header.get("kid")))
    if key is None:
        raise LoginError("unknown key id")
    try:
        claims = jwt.decode(
            token, key.public_key, algorithms=["RS512"], options={"require": ["iat"], "verify_iat": False}
        )
    except jwt.PyJWTError as exc:
        raise LoginError(f"invalid token: {exc}") from exc
    iat = claims.get("iat")
    now = time.time() if now is None else now
    if not isinstance(iat, (int, float)) or iat < now - MAX_TOKEN_AGE or iat > now + MAX_CLOCK_SKEW:
        raise LoginError("token expired or issued in the future")
    return key
