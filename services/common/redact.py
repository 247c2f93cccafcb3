"""One redaction rule for everything the guardian prints or logs.

Secrets reach output by accident: a Redis URL with a password in an error message, a PEM pasted
into `private_key_file` and echoed back by the config check, a traceback quoting a token. Every
output path runs its text through `redact` — `check-config`, the configuration's error messages,
the services' log lines (`RedactingFormatter`, installed by `service_main`), the `/health` reasons
and the operator's `status` — so the rule lives here once:

* the password of a URL's user info (`scheme://user:secret@host` → `scheme://user:***@host`), also
  when the password itself contains `@` (the user info ends at the *last* `@` before the host, as
  redis-py reads it); a URL with a bare `secret@host` loses it whole;
* secret-looking query parameters (`?password=…`, `&token=…`, `key`, `secret`, `auth`, `pass`, `pwd`);
* key material anywhere: a PEM block (`-----BEGIN … KEY-----` … `-----END …-----`, or up to the
  next quote or the end of the text when it was cut off); the lines of a key body without its
  armour; and any base64 run of 32 characters or more that looks random (about 40 % capitals,
  with digits or `+`/`/`: a key fragment, a JWT). Hex digests such as the command signature are
  single-case, and paths and names are mostly lower case: they stay readable.

Regular expressions written by hand: no library covers the three shapes together, and the rule is
small enough to read in full.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

_PEM = re.compile(r"-----BEGIN [A-Z0-9 ]*-----(?:.*?-----END [A-Z0-9 ]*-----|[^'\"]*)", re.DOTALL)
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s'\"<>]*)@"
                           r"(?=[^\s@/'\"<>]*(?:[/?#\s'\"<>]|$))")
_QUERY_SECRET = re.compile(r"(?P<key>[?&;](?:password|passwd|pass|pwd|secret|token|auth|api_key|key)=)"
                           r"[^&;#\s'\"<>]*", re.IGNORECASE)
_BASE64_BLOCK = re.compile(r"(?:[A-Za-z0-9+/]{40,}={0,2}(?:\r?\n|\\n)){2,}[A-Za-z0-9+/]*={0,2}")
"""Lines of a key body without its armour, the short last line included."""
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{32,}={0,2}")


def redact(text: str) -> str:
    """`text` with passwords, tokens and key material replaced by `***` (see the module docstring)."""
    if not text:
        return text
    text = _PEM.sub("[key material redacted]", text)
    text = _URL_USERINFO.sub(_userinfo, text)
    text = _QUERY_SECRET.sub(lambda m: m.group("key") + MASK, text)
    text = _BASE64_BLOCK.sub(_key_like, text)
    return _BASE64_RUN.sub(_key_like, text)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match.group("userinfo").partition(":")
    kept = f"{user}:{MASK}" if colon else MASK
    return f"{match.group('scheme')}{kept}@"


def _key_like(match: re.Match[str]) -> str:
    """Random base64 is about 40 % capitals, with digits; words, paths and names are mostly lower case."""
    run = match.group(0)
    upper = sum(c.isupper() for c in run)
    digits = sum(c.isdigit() for c in run)
    lower = sum(c.islower() for c in run)
    symbols = digits or "+" in run or "/" in run or len(run) >= 48
    random_looking = lower and symbols and upper >= 0.15 * len(run)
    return "[key material redacted]" if random_looking else run


class RedactingFormatter(logging.Formatter):
    """A log formatter whose every line — message, arguments and traceback — has passed `redact`.

    A formatter rather than a filter: a filter sees the message before the traceback is
    formatted, and a secret quoted in an exception's text would slip through.
    """

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def install_redaction(logger: logging.Logger | None = None) -> None:
    """Make every handler of `logger` (the root logger by default) redact what it writes."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        current = handler.formatter
        if isinstance(current, RedactingFormatter):
            continue
        fmt = current._fmt if current is not None else None  # keep the configured format
        datefmt = current.datefmt if current is not None else None
        handler.setFormatter(RedactingFormatter(fmt, datefmt))


__all__ = ["MASK", "RedactingFormatter", "install_redaction", "redact"]
