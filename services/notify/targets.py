"""The places notifications go: a generic webhook, Telegram, Slack and Discord incoming webhooks.

Each target turns a `Notification` into one HTTP request (`request`, pure) and an HTTP answer
into an outcome (`classify`, pure); `send` does the request with aiohttp. Secrets are read from
their files once, at start (`load_targets`), and never logged: an error message has them
replaced by `***` (`scrub`).

What is retried, and what is not (at most once per target):

* the request never reached the target (connection refused, DNS, connect timeout) -> retried;
* the target answered 429 or 5xx (it did not take it) -> retried, after its `Retry-After`;
* the target answered another 4xx (bad token, unknown chat, wrong URL) -> dropped and logged:
  sending it again cannot help;
* the request was sent but no answer came in time -> NOT retried: it may have arrived, and a
  second copy could be a second "closure failed" on the trader's phone. Logged as unconfirmed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from services.common.config import HTTP_URL, ConfigError, NotifyTarget, Problem
from services.common.contracts import Notification, NotificationKind, Severity

SIGNATURE_HEADER = "X-Thalex-TP-Signature-256"
"""`sha256=<hex HMAC-SHA256 of the raw body with the target's secret>` (generic webhook)."""
EVENT_ID_HEADER = "X-Thalex-TP-Notification-Id"
"""The notification's id: a receiver may de-duplicate on it."""
DISCORD_LIMIT = 2000
TELEGRAM_LIMIT = 4096
MARKS = {Severity.INFO: "", Severity.WARNING: "⚠️ ", Severity.CRITICAL: "🚨 "}


class Outcome(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    REJECTED = "rejected"
    UNCONFIRMED = "unconfirmed"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    why: str = ""
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class HttpRequest:
    url: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Target:
    """One configured target with its secrets loaded."""

    name: str
    type: str
    url: str
    """Where to POST (for Telegram: the sendMessage URL, which holds the bot token)."""
    chat_id: str | None = None
    hmac_key: bytes | None = None
    kinds: frozenset[NotificationKind] | None = None
    secrets: tuple[str, ...] = ()
    """Every secret string of this target, to scrub from anything logged."""

    def wants(self, kind: NotificationKind) -> bool:
        return self.kinds is None or kind in self.kinds

    def request(self, note: Notification) -> HttpRequest:
        """The HTTP request delivering `note` to this target (pure)."""
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: note.id}
        if self.type == "webhook":
            body = note.model_dump_json().encode()
            if self.hmac_key is not None:
                digest = hmac.new(self.hmac_key, body, hashlib.sha256).hexdigest()
                headers[SIGNATURE_HEADER] = f"sha256={digest}"
            return HttpRequest(self.url, body, headers)
        line = f"{MARKS[note.severity]}{note.title}"
        if self.type == "telegram":
            text = f"{line}\n{note.text}"[:TELEGRAM_LIMIT]
            payload: dict[str, Any] = {"chat_id": self.chat_id, "text": text,
                                       "disable_web_page_preview": True}
        elif self.type == "slack":
            payload = {"text": f"*{line}*\n{note.text}"}
        else:
            payload = {"content": f"**{line}**\n{note.text}"[:DISCORD_LIMIT]}
        return HttpRequest(self.url, json.dumps(payload).encode(), headers)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def classify(status: int, headers: dict[str, str], body: str) -> Result:
    """What an HTTP answer means for the notification (pure)."""
    if 200 <= status < 300:
        return Result(Outcome.SENT)
    retry_after = _retry_after(headers, body)
    if status == 429 or status >= 500 or status == 408:
        return Result(Outcome.RETRY, f"HTTP {status}", retry_after)
    return Result(Outcome.REJECTED, f"HTTP {status}: {body[:200]}")


def _retry_after(headers: dict[str, str], body: str) -> float | None:
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            return None
    try:  # Telegram: {"ok": false, "parameters": {"retry_after": 5}}
        parameters = json.loads(body).get("parameters") or {}
        return float(parameters["retry_after"]) if "retry_after" in parameters else None
    except (ValueError, AttributeError, TypeError):
        return None


async def send(session: aiohttp.ClientSession, target: Target, note: Notification,
               timeout_seconds: float) -> Result:
    """POST one notification; never raises for a network failure (see the module docstring)."""
    request = target.request(note)
    timeout = aiohttp.ClientTimeout(total=timeout_seconds, sock_connect=min(5.0, timeout_seconds))
    try:
        async with session.post(request.url, data=request.body, headers=request.headers,
                                timeout=timeout) as answer:
            body = await answer.text()
            return classify(answer.status, dict(answer.headers), body)
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        return Result(Outcome.RETRY, target.scrub(f"{type(exc).__name__}: {exc}"))
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Result(Outcome.UNCONFIRMED, target.scrub(f"{type(exc).__name__}: {exc}"))


def _secret(path: Any, key: str, problems: list[Problem]) -> str:
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(Problem(key, str(path), f"cannot read the file: {exc.strerror}"))
        return ""
    except UnicodeDecodeError:  # a binary file given by mistake: exit 2 naming it, not a traceback
        problems.append(Problem(key, str(path), "is not a text (UTF-8) file"))
        return ""
    if not value:
        problems.append(Problem(key, str(path), "the file is empty"))
    return value


def _webhook_url(path: Any, key: str, problems: list[Problem]) -> str:
    """The URL in `url_file`, checked as the URL in the file would be (`NotifyTarget.url`): a URL
    without its scheme failed every POST, each notification dropped as "unconfirmed", health green."""
    url = _secret(path, key, problems)
    if url and not HTTP_URL.match(url):
        problems.append(Problem(key, str(path), "holds no http:// or https:// URL (the scheme and host "
                                                "are needed)"))
    return url


def load_targets(configured: list[NotifyTarget]) -> list[Target]:
    """Read every target's secret files; raises `ConfigError` naming each one that cannot be read."""
    problems: list[Problem] = []
    targets = []
    for i, t in enumerate(configured):
        key = f"notify.targets.{i}"
        kinds = None if t.events is None else frozenset(t.events)
        if t.type == "telegram":
            token = _secret(t.bot_token_file, f"{key}.bot_token_file", problems)
            chat = _secret(t.chat_id_file, f"{key}.chat_id_file", problems)
            targets.append(Target(t.name, t.type, f"{t.base_url.rstrip('/')}/bot{token}/sendMessage",
                                  chat_id=chat, kinds=kinds, secrets=(token,)))
            continue
        url = t.url or _webhook_url(t.url_file, f"{key}.url_file", problems)
        hmac_key = _secret(t.secret_file, f"{key}.secret_file", problems) if t.secret_file else None
        secrets = tuple(s for s in (hmac_key, url if t.url_file else None) if s)
        targets.append(Target(t.name, t.type, url, hmac_key=hmac_key.encode() if hmac_key else None,
                              kinds=kinds, secrets=secrets))
    if problems:
        raise ConfigError(problems, "notify targets")
    return targets
