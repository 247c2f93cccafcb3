"""`thalex-tp check-config --service`: what the service will check, checked before it starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main
from services.paper.keys import generate_key

REPO = Path(__file__).resolve().parents[2]
Capture = pytest.CaptureFixture[str]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    directory = tmp_path / "keys"
    generate_key(directory, "ro", read_only=True, account="a")
    generate_key(directory, "trade", account="a")
    (directory / "command_key.txt").write_text("ab" * 32 + "\n")  # take-profit signs, the executor checks
    for secret in (*directory.glob("*.pem"), directory / "command_key.txt"):
        secret.chmod(0o600)
    return directory


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tp.toml"
    path.write_text(text)
    return str(path)


def good(keys: Path) -> str:
    return f"""[thalex]
key_id = "ro"
private_key_file = "{keys / 'ro.pem'}"
[executor]
key_id = "trade"
private_key_file = "{keys / 'trade.pem'}"
[commands]
signing_key_file = "{keys / 'command_key.txt'}"
"""


def test_every_service_passes_with_its_keys_in_place(tmp_path: Path, keys: Path, capsys: Capture) -> None:
    assert main(["check-config", config(tmp_path, good(keys)), "--service", "all"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["thalex"]["key_id"] == "ro"
    assert "ERROR" not in err


def test_the_shipped_compose_template_is_refused_for_its_placeholders(capsys: Capture) -> None:
    assert main(["check-config", str(REPO / "deploy" / "thalex-tp.toml")]) == 2
    err = capsys.readouterr().err
    assert "thalex.key_id = 'CHANGE-ME-read-only-key-id': a placeholder" in err
    assert "executor.key_id = 'CHANGE-ME-trading-key-id'" in err


def test_ingest_needs_its_key_file_holding_a_key(tmp_path: Path, keys: Path, capsys: Capture) -> None:
    text = good(keys).replace(str(keys / "ro.pem"), str(keys / "missing.pem"))
    assert main(["check-config", config(tmp_path, text), "--service", "ingest"]) == 2
    err = capsys.readouterr().err
    assert "thalex.private_key_file" in err and "file does not exist" in err
    (keys / "garbage.pem").write_text("not a key")
    (keys / "garbage.pem").chmod(0o600)
    text = good(keys).replace(str(keys / "ro.pem"), str(keys / "garbage.pem"))
    assert main(["check-config", config(tmp_path, text), "--service", "ingest"]) == 2
    assert "not a PEM private key" in capsys.readouterr().err
    # the executor's key is none of ingest's business
    text = good(keys).replace(str(keys / "trade.pem"), str(keys / "missing.pem"))
    assert main(["check-config", config(tmp_path, text), "--service", "ingest"]) == 0
    assert main(["check-config", config(tmp_path, text), "--service", "executor"]) == 2


def test_a_key_readable_by_others_is_a_warning(tmp_path: Path, keys: Path, capsys: Capture) -> None:
    (keys / "ro.pem").chmod(0o644)
    assert main(["check-config", config(tmp_path, good(keys)), "--service", "ingest"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: thalex.private_key_file" in err and "mode 0644" in err and "chmod 600" in err


def test_a_trading_key_readable_by_others_is_an_error(tmp_path: Path, keys: Path, capsys: Capture) -> None:
    """The executor refuses it at start (issue 21: a trading key can move money)."""
    (keys / "trade.pem").chmod(0o644)
    assert main(["check-config", config(tmp_path, good(keys)), "--service", "executor"]) == 2
    err = capsys.readouterr().err
    assert "ERROR: executor.private_key_file" in err and "mode 0644" in err
    assert "the executor refuses it" in err


def test_the_executor_without_a_key_is_an_error_unless_dry_run(tmp_path: Path, capsys: Capture) -> None:
    assert main(["check-config", config(tmp_path, ""), "--service", "executor"]) == 2
    assert "executor.key_id = '': required by this service" in capsys.readouterr().err
    dry = config(tmp_path, "[executor]\ndry_run = true\n")
    assert main(["check-config", dry, "--service", "executor"]) == 0
    assert "no order will be sent" in capsys.readouterr().err


def test_one_key_for_ingest_and_executor_is_a_warning(tmp_path: Path, keys: Path, capsys: Capture) -> None:
    text = good(keys).replace('key_id = "trade"', 'key_id = "ro"')
    assert main(["check-config", config(tmp_path, text), "--service", "executor"]) == 0
    assert "READ-ONLY" in capsys.readouterr().err


def test_notify_checks_every_targets_secret_files(tmp_path: Path, capsys: Capture) -> None:
    token = tmp_path / "token"
    token.write_text("1:A")
    token.chmod(0o600)
    text = f"""[[notify.targets]]
name = "phone"
type = "telegram"
bot_token_file = "{token}"
chat_id_file = "{tmp_path / 'no-chat'}"
"""
    assert main(["check-config", config(tmp_path, text), "--service", "notify"]) == 2
    err = capsys.readouterr().err
    assert "notify.targets.0.chat_id_file" in err and "file does not exist" in err
    assert "bot_token_file" not in err
    assert main(["check-config", config(tmp_path, ""), "--service", "notify"]) == 0
    assert "no target" in capsys.readouterr().err


@pytest.mark.parametrize(("target", "content", "rule"), [
    ("telegram", b"\xff\xfe\x00binary", "is not a text (UTF-8) file"),
    ("telegram", b"\n", "the file is empty"),
    ("webhook", b"hooks.slack.com/services/T0/B0/XXXX\n", "holds no http:// or https:// URL"),
])
def test_notify_checks_what_its_secret_files_hold_as_notify_does_at_start(
        tmp_path: Path, capsys: Capture, target: str, content: bytes, rule: str) -> None:
    """check-config said OK to files notify then refused with exit 2 (or, before, dropped every
    notification): it checks what they hold the same way."""
    secret = tmp_path / "secret"
    secret.write_bytes(content)
    secret.chmod(0o600)
    chat = tmp_path / "chat"
    chat.write_text("42\n")
    chat.chmod(0o600)
    fields = (f'bot_token_file = "{secret}"\nchat_id_file = "{chat}"' if target == "telegram"
              else f'url_file = "{secret}"')
    text = f'[[notify.targets]]\nname = "phone"\ntype = "{target}"\n{fields}\n'
    assert main(["check-config", config(tmp_path, text), "--service", "notify"]) == 2
    err = capsys.readouterr().err
    key = "bot_token_file" if target == "telegram" else "url_file"
    assert f"notify.targets.0.{key}" in err and rule in err, err
    assert "hooks.slack.com" not in err


def test_an_unknown_service_is_a_usage_error(capsys: Capture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["check-config", "--service", "quoter"])
    assert exit_info.value.code == 2
