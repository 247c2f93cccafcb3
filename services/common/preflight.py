"""What each service will need from a valid configuration, checked before it is started.

`thalex-tp check-config --service NAME` runs these: a configuration can be valid (every value
within its rule) and still leave a service unable to start, or able to start with a key any user
of the machine can read. Errors are what would stop the service (or make it trade on a value
nobody chose, such as a `CHANGE-ME` left from a template); warnings are what a careful trader
fixes before real money rides on it.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from services.common.config import CONTAINER_SECRETS, HTTP_URL, Settings

SERVICES = ("ingest", "portfolio", "takeprofit", "executor", "notify")
PLACEHOLDER = re.compile(r"change[-_ ]?me|replace[-_ ]?me|your[-_ ]key|<[^<>]+>", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Finding:
    level: Literal["error", "warning"]
    key: str
    value: str
    rule: str

    def __str__(self) -> str:
        return f"{self.level.upper()}: {self.key} = {self.value!r}: {self.rule}"


def placeholders(settings: Settings) -> list[Finding]:
    """Every string value that is still a template's placeholder (an error for every service)."""
    found: list[Finding] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(f"{prefix}.{i}", item)
        elif isinstance(value, str) and PLACEHOLDER.search(value):
            found.append(Finding("error", prefix, value, "a placeholder from a template: put the real value"))

    walk("", settings.model_dump(mode="json"))
    return found


def secret_file(key: str, path: Path | None, *, required: bool, pem: bool = False,
                trading: bool = False) -> list[Finding]:
    """A file holding a secret: present, readable, not readable by group or others.

    A trading key readable by others is an error, as the executor refuses it at start
    (`config.check_secret_file`), unless it is a container's secret mount (/run/secrets).
    """
    if path is None:
        return [Finding("error", key, "", "required by this service")] if required else []
    if not path.is_file():
        return [Finding("error", key, str(path), "file does not exist")]
    if not os.access(path, os.R_OK):
        return [Finding("error", key, str(path), "file is not readable by this user")]
    findings = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 and trading and not path.resolve().is_relative_to(CONTAINER_SECRETS):
        rule = f"trading key readable by group or others (mode {mode:04o}): the executor refuses it; " \
            "chmod 600 it"
        findings.append(Finding("error", key, str(path), rule))
    elif mode & 0o077:
        findings.append(Finding("warning", key, str(path), f"readable by group or others (mode {mode:04o}); "
                                                           f"chmod 600 it (or 640 for a service group)"))
    if pem and not _is_private_key(path):
        findings.append(Finding("error", key, str(path), "not a PEM private key"))
    return findings


def _is_private_key(path: Path) -> bool:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return False
    return True


def _required(key: str, value: str | None) -> list[Finding]:
    return [] if value else [Finding("error", key, "", "required by this service")]


def service_findings(settings: Settings, service: str) -> list[Finding]:
    """What `service` needs beyond valid values (`SERVICES`)."""
    findings = secret_file("redis.password_file", settings.redis.password_file, required=False)
    if service == "ingest":
        findings += _required("thalex.key_id", settings.thalex.key_id)
        findings += secret_file("thalex.private_key_file", settings.thalex.private_key_file, required=True,
                                pem=True)
    elif service == "executor":
        ex = settings.executor
        if ex.dry_run and not ex.key_id:
            findings.append(Finding("warning", "executor.dry_run", "true",
                                    "no trading key configured: fine for a dry run, required to trade"))
        else:
            findings += _required("executor.key_id", ex.key_id)
            findings += secret_file("executor.private_key_file", ex.private_key_file, required=True, pem=True,
                                    trading=True)
        if ex.key_id and ex.key_id == settings.thalex.key_id:
            findings.append(Finding("warning", "executor.key_id", ex.key_id,
                                    "the same key as ingest's: ingest should hold a READ-ONLY key, "
                                    "and only the executor a trading one"))
        if ex.dry_run:
            findings.append(Finding("warning", "executor.dry_run", "true", "no order will be sent"))
    elif service == "notify":
        findings += _notify_findings(settings)
    if service in ("takeprofit", "executor"):  # take-profit signs every command, the executor checks
        key = settings.commands.signing_key_file
        if service == "executor" and settings.executor.dry_run and key is None:
            findings.append(Finding("warning", "commands.signing_key_file", "",
                                    "no command key: fine for a dry run (nothing is sent), required to "
                                    "trade"))
        else:
            findings += secret_file("commands.signing_key_file", key, required=True)
    return findings


def _notify_findings(settings: Settings) -> list[Finding]:
    targets = settings.notify.targets
    if not targets:
        return [Finding("warning", "notify.targets", "[]", "no target: notifications are sent to no one")]
    findings: list[Finding] = []
    for i, target in enumerate(targets):
        for field in ("url_file", "secret_file", "bot_token_file", "chat_id_file"):
            path = getattr(target, field)
            if path is not None:
                key = f"notify.targets.{i}.{field}"
                found = secret_file(key, path, required=True)
                if not any(f.level == "error" for f in found):
                    found += _notify_secret_content(key, path, url=field == "url_file")
                findings += found
    return findings


def _notify_secret_content(key: str, path: Path, *, url: bool) -> list[Finding]:
    """What notify checks in the file at start (`notify.targets.load_targets`), checked here too, so
    `check-config --service notify` does not say OK to a file notify then refuses with exit 2."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return [Finding("error", key, str(path), "is not a text (UTF-8) file")]
    except OSError as exc:
        return [Finding("error", key, str(path), f"cannot be read: {exc.strerror or exc}")]
    if not text:
        return [Finding("error", key, str(path), "the file is empty")]
    if url and not HTTP_URL.match(text):
        return [Finding("error", key, str(path), "holds no http:// or https:// URL (the scheme and host are "
                                                  "needed)")]
    return []


def check(settings: Settings, services: list[str]) -> list[Finding]:
    """Placeholders, then each service's needs (each finding once)."""
    findings = placeholders(settings)
    for service in services:
        for finding in service_findings(settings, service):
            if finding not in findings:
                findings.append(finding)
    return findings
