"""Configuration: defaults, overrides, and every rule refusing a bad value with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli import main
from services.common.config import ConfigError, load_config
from services.common.contracts import InstrumentType
from services.portfolio.fees import rates_for


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tp.toml"
    path.write_text(text)
    return path


def test_defaults_follow_the_seed_and_thalex_schedule() -> None:
    settings = load_config(None)
    tp = settings.portfolio_take_profit
    assert (tp.enable_portfolio_tp, tp.min_profit_usd, tp.profit_after_fees) == (True, 1.1, True)
    assert (tp.check_interval_seconds, tp.max_position_age_hours, tp.emergency_close_threshold) == (
        2.0,
        24,
        -10.0,
    )
    assert (tp.partial_profit_threshold, tp.position_correlation_check, tp.fee_estimation_buffer) == (
        0.5,
        True,
        1.1,
    )
    fees = settings.trading_fees
    assert (fees.maker_fee_rate, fees.taker_fee_rate, fees.minimum_fee_usd) == (0.0001, 0.0005, 0.0001)
    option = rates_for(fees, "BTC-27DEC26-100000-C", InstrumentType.OPTION)
    assert (option.maker_fee_rate, option.taker_fee_rate) == (0.00025, 0.00025)
    assert settings.executor.close_price_buffer == 0.005 and settings.executor.deadline_seconds == 30
    assert settings.redis.namespace == "tp" and settings.names.fills == "tp:fills"


def test_per_instrument_rates_win_over_product_rates(tmp_path: Path) -> None:
    path = write(tmp_path, """
[trading_fees.products.perpetual]
maker_fee_rate = 0.00005
taker_fee_rate = 0.00015
[trading_fees.instruments."BTC-PERPETUAL"]
maker_fee_rate = 0.0
taker_fee_rate = 0.0002
""")
    fees = load_config(path).trading_fees
    assert rates_for(fees, "BTC-PERPETUAL", InstrumentType.PERPETUAL).taker_fee_rate == 0.0002
    assert rates_for(fees, "ETH-PERPETUAL", InstrumentType.PERPETUAL).taker_fee_rate == 0.00015
    assert rates_for(fees, "UNKNOWN", None).taker_fee_rate == 0.0005


def test_a_partial_threshold_at_or_below_zero_is_accepted_only_with_the_partial_close_off(
    tmp_path: Path
) -> None:
    path = write(tmp_path, "[portfolio_take_profit]\npartial_close_fraction = 0\n"
                           "partial_profit_threshold = -3\n")
    assert load_config(path).portfolio_take_profit.partial_profit_threshold == -3


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[portfolio_take_profit]\nmin_profit_usd = 2.0\n[redis]\nnamespace = 'acct1'\n")
    monkeypatch.setenv("TP_PORTFOLIO_TAKE_PROFIT__MIN_PROFIT_USD", "3.5")
    settings = load_config(path)
    assert settings.portfolio_take_profit.min_profit_usd == 3.5
    assert settings.redis.namespace == "acct1"


# (file text, key that must be named, words of the rule)
RULES = [
    ("[portfolio_take_profit]\nmin_profit_usd = 0", "portfolio_take_profit.min_profit_usd", "greater than 0"),
    (
        "[portfolio_take_profit]\ncheck_interval_seconds = 0.5",
        "portfolio_take_profit.check_interval_seconds",
        "greater than or equal to 1",
    ),
    (
        "[portfolio_take_profit]\npartial_profit_threshold = 1.1",
        "portfolio_take_profit.partial_profit_threshold",
        "must be < min_profit_usd",
    ),
    (
        "[portfolio_take_profit]\nemergency_close_threshold = 0",
        "portfolio_take_profit.emergency_close_threshold",
        "less than 0",
    ),
    (
        "[portfolio_take_profit]\ntrailing_activation_usd = 1.5",
        "portfolio_take_profit.trailing_activation_usd",
        "must be < min_profit_usd",
    ),
    (
        "[portfolio_take_profit]\ntrailing_activation_usd = 0.4\ntrailing_retrace_usd = 0.5",
        "portfolio_take_profit.trailing_activation_usd",
        "could close at a loss",
    ),
    ("[trading_fees]\nmaker_fee_rate = -0.0001", "trading_fees.maker_fee_rate", "within [0, 0.01]"),
    ("[trading_fees]\ntaker_fee_rate = 0.011", "trading_fees.taker_fee_rate", "within [0, 0.01]"),
    (
        "[trading_fees.products.option]\nmaker_fee_rate = 0.02\ntaker_fee_rate = 0.0",
        "trading_fees.products.option.maker_fee_rate",
        "within [0, 0.01]",
    ),
    (
        "[trading_fees.instruments.X]\nmaker_fee_rate = 0.0\ntaker_fee_rate = 1",
        "trading_fees.instruments.X.taker_fee_rate",
        "within [0, 0.01]",
    ),
    ("[trading_fees]\nfee_estimation_buffer = 0.99", "trading_fees.fee_estimation_buffer", ">= 1"),
    (
        "[portfolio_take_profit]\nfee_estimation_buffer = 0.5",
        "portfolio_take_profit.fee_estimation_buffer",
        ">= 1",
    ),
    (
        "[portfolio_take_profit]\nfee_estimation_buffer = 1.2\n[trading_fees]\nfee_estimation_buffer = 1.3",
        "trading_fees.fee_estimation_buffer",
        "must equal portfolio_take_profit.fee_estimation_buffer",
    ),
    (
        "[portfolio_take_profit]\npartial_profit_threshold = -3",
        "portfolio_take_profit.partial_profit_threshold",
        "must be > 0 while partial_close_fraction > 0",
    ),
    ("[executor]\nmax_index_deviation = 0.002", "executor.max_index_deviation",
     "greater than or equal to 0.02"),
    (
        "[executor]\nmax_index_deviation = 0.03",  # the default max_close_price_buffer is 0.05
        "executor.max_index_deviation",
        "must be >= max_close_price_buffer (0.05)",
    ),
    ("[portfolio_take_profit]\nmin_proft_usd = 2", "portfolio_take_profit.min_proft_usd", "unknown key"),
    ("[portfolio_take_profits]\nmin_profit_usd = 2", "portfolio_take_profits", "unknown key"),
    (
        "[trading_fees.instruments.X]\nmaker_fee_rate = 0.0001",
        "trading_fees.instruments.X.taker_fee_rate",
        "required key is missing",
    ),
    ("[portfolio_take_profit]\nmin_profit_usd = nan", "portfolio_take_profit.min_profit_usd", "finite"),
    (
        "[portfolio_take_profit]\nenable_portfolio_tp = 'maybe'",
        "portfolio_take_profit.enable_portfolio_tp",
        "valid boolean",
    ),
    ("[portfolio_take_profit]\nemergency_stop_basis = 'gross'", "portfolio_take_profit.emergency_stop_basis",
     "'net_pnl' or 'net_after_close'"),
    ("[thalex]\nnetwork = 'mainnet'", "thalex.network", "'test', 'prod' or a ws://"),
    ("[redis]\nurl = 'http://localhost'", "redis.url", "redis://"),
    ("[redis]\nnamespace = 'a b'", "redis.namespace", "1-64 characters"),
    ("[executor]\nclose_price_buffer = 0", "executor.close_price_buffer", "greater than 0"),
    (
        "[executor]\nclose_price_buffer = 0.1\nmax_close_price_buffer = 0.05",
        "executor.max_close_price_buffer",
        ">= close_price_buffer",
    ),
    ("[executor]\ndeadline_seconds = -1", "executor.deadline_seconds", "greater than 0"),
    ("[portfolio]\nbaseline = 'yesterday'", "portfolio.baseline", "'entry' or 'mark_at_start'"),
    ("[ingest]\nhistory_recheck_seconds = 0", "ingest.history_recheck_seconds", "greater than 0"),
    ("this is not toml", "--config", "not valid TOML"),
    # issue 21, item 8: a boolean is not a number, nor a number a boolean
    ("[portfolio_take_profit]\nmin_profit_usd = true", "portfolio_take_profit.min_profit_usd",
     "must be a number, not true/false"),
    ("[executor]\ndeadline_seconds = false", "executor.deadline_seconds", "must be a number"),
    ("[portfolio]\nbatch_size = true", "portfolio.batch_size", "must be a number"),
    ("[portfolio_take_profit]\nenable_portfolio_tp = 1", "portfolio_take_profit.enable_portfolio_tp",
     "must be true or false"),
    ("[executor]\ndry_run = 0", "executor.dry_run", "must be true or false"),
    # issue 19, item 1: each removal before a closure is a strict boolean, and misspelt is unknown
    ("[executor]\ncancel_bots = 'maybe'", "executor.cancel_bots", "valid boolean"),
    ("[executor]\ncancel_mass_quotes = 1", "executor.cancel_mass_quotes", "must be true or false"),
    ("[executor]\ncancel_conditional_order = false", "executor.cancel_conditional_order", "unknown key"),
    ("[thalex]\nprivate_key_file = '-----BEGIN PRIVATE KEY-----MIIEvQIBADANBgkqhkiG9w0BAQEFAASC'",
     "thalex.private_key_file", "looks like the key itself"),
]


@pytest.mark.parametrize(("text", "key", "rule"), RULES, ids=[r[1] for r in RULES])
def test_every_rule_exits_2_naming_key_and_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, rule: str
) -> None:
    path = write(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    line = next((ln for ln in err.splitlines() if f"- {key} " in ln or f"- {key}:" in ln), None)
    assert line is not None, f"{key} not named in:\n{err}"
    assert rule in line


def test_every_problem_is_listed_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path, "[portfolio_take_profit]\nmin_profit_usd = -1\ncheck_interval_seconds = 0\n[redis]\nx = 1"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert {p.key for p in info.value.problems} == {
        "portfolio_take_profit.min_profit_usd", "portfolio_take_profit.check_interval_seconds", "redis.x"
    }


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.toml")]) == 2
    assert "file does not exist" in capsys.readouterr().err


def test_check_config_prints_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    """The real console command, as a user runs it."""
    path = write(tmp_path, "[redis]\nurl = 'redis://tp-ingest:hunter2@redis:6379/0'\n")
    done = subprocess.run([sys.executable, "-m", "services.cli", "check-config", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout
    effective = json.loads(done.stdout)
    assert effective["redis"]["url"] == "redis://tp-ingest:***@redis:6379/0"
    assert effective["portfolio_take_profit"]["min_profit_usd"] == 1.1


def test_bad_config_from_console_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[portfolio_take_profit]\nmin_profit_usd = 0\n")
    done = subprocess.run([sys.executable, "-m", "services.cli", "check-config", str(path)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "portfolio_take_profit.min_profit_usd" in done.stderr


def test_readme_documents_every_config_key() -> None:
    """Each key of every section has a row in the README's configuration reference."""
    from services.common.config import Settings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = []
    for section, info in Settings.model_fields.items():
        assert f"`[{section}]`" in readme, f"section [{section}] not documented"
        for key in info.annotation.model_fields:  # type: ignore[union-attr]
            if f"| `{key}`" not in readme and f"| `{key}." not in readme:
                missing.append(f"{section}.{key}")
    assert not missing, f"undocumented config keys: {missing}"


# --------------------------------------------------------------------------- issue 21, items 7 and 8

def check_config(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`thalex-tp check-config` as a user runs it (a process: a traceback would show as rc 1)."""
    import os
    environ = {k: v for k, v in os.environ.items() if not k.upper().startswith("TP_")}
    return subprocess.run([sys.executable, "-m", "services.cli", "check-config", *argv], capture_output=True,
                          text=True, check=False, env={**environ, **(env or {})})


ENVIRONMENT = [
    ({"TP_PORTFOLIO_TAKEPROFIT__MIN_PROFIT_USD": "5"}, "TP_PORTFOLIO_TAKEPROFIT__MIN_PROFIT_USD",
     "no section 'portfolio_takeprofit'"),
    ({"TP_PORTFOLIO_TAKE_PROFIT__MIN_PROFT_USD": "5"}, "TP_PORTFOLIO_TAKE_PROFIT__MIN_PROFT_USD",
     "unknown key 'min_proft_usd'"),
    ({"TP_INGEST__WATCH_LIST": "BTC-PERPETUAL"}, "TP_INGEST__WATCH_LIST", "not valid JSON"),
    ({"TP_INGEST__WATCH_LIST": '["BTC-PERPETUAL"'}, "TP_INGEST__WATCH_LIST", "not valid JSON"),
    ({"TP_INGEST__WATCH_LIST": '{"a": 1}'}, "TP_INGEST__WATCH_LIST", "must be a JSON list"),
    ({"TP_REDIS": '{"url": '}, "TP_REDIS", "not valid JSON"),
    ({"TP_LOG_LEVEL": "LOUD"}, "TP_LOG_LEVEL", "unknown log level"),
    ({"TP_PORTFOLIO_TAKE_PROFIT__MIN_PROFIT_USD": "true"}, "portfolio_take_profit.min_profit_usd",
     "valid number"),
]


@pytest.mark.parametrize(("env", "named", "rule"), ENVIRONMENT, ids=[e[1] + "=" + next(iter(e[0].values()))
                                                                      for e in ENVIRONMENT])
def test_environment_keys_are_validated_like_file_keys(env: dict[str, str], named: str, rule: str) -> None:
    done = check_config([], env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    line = next((ln for ln in done.stderr.splitlines() if f"- {named} " in ln or f"- {named}:" in ln), None)
    assert line is not None, done.stderr
    assert rule in line


def test_environment_only_variables_are_not_settings() -> None:
    done = check_config([], {"TP_LOG_LEVEL": "debug", "TP_REPLICA": "2", "TP_HEALTH_PORT": "9101",
                             "TP_SECRETS_DIR": "/tmp", "TP_REDIS__NAMESPACE": "acct"})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["redis"]["namespace"] == "acct"


def test_a_directory_or_a_binary_file_as_config_exits_2_naming_it(tmp_path: Path) -> None:
    binary = tmp_path / "config.toml"
    binary.write_bytes(bytes(range(256)))
    for path, rule in ((tmp_path, "is a directory"), (binary, "is not a text (UTF-8) file")):
        done = check_config([str(path)])
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"- --config = '{path}': {rule}" in done.stderr


def test_a_service_with_an_unknown_log_level_exits_2_naming_it() -> None:
    import os
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("TP_")}
    done = subprocess.run([sys.executable, "-m", "services.portfolio"], capture_output=True, text=True,
                          check=False, env={**env, "TP_LOG_LEVEL": "LOUD"}, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "TP_LOG_LEVEL = 'LOUD': unknown log level" in done.stderr


REDACTED_URLS = [
    ("redis://tp-ingest:p@ss@word@redis:6379/0", "redis://tp-ingest:***@redis:6379/0", "ss@word"),
    ("redis://redis:6379/0?password=hunter2", "redis://redis:6379/0?password=***", "hunter2"),
    ("rediss://:s3cret@redis:6380/1", "rediss://:***@redis:6380/1", "s3cret"),
    ("unix:///run/redis.sock?db=0&password=hunter2", "unix:///run/redis.sock?db=0&password=***", "hunter2"),
]


@pytest.mark.parametrize(("url", "shown", "secret"), REDACTED_URLS, ids=[u[2] for u in REDACTED_URLS])
def test_check_config_never_prints_a_password(tmp_path: Path, url: str, shown: str, secret: str) -> None:
    done = check_config([str(write(tmp_path, f"[redis]\nurl = '{url}'\n"))])
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout
    assert json.loads(done.stdout)["redis"]["url"] == shown


def test_an_invalid_url_is_named_without_its_password(tmp_path: Path) -> None:
    done = check_config([str(write(tmp_path, "[redis]\nurl = 'http://admin:hunter2@redis:6379/0'\n"))])
    assert done.returncode == 2
    assert "hunter2" not in done.stderr and "redis.url = 'http://admin:***@redis:6379/0'" in done.stderr


def test_a_pem_pasted_into_private_key_file_is_refused_and_never_echoed(tmp_path: Path) -> None:
    from services.paper.keys import generate_key
    generate_key(tmp_path / "keys", "k")
    pem = (tmp_path / "keys" / "k.pem").read_text()
    body = pem.splitlines()[1]
    path = write(tmp_path, f'[executor]\nkey_id = "k"\nprivate_key_file = """{pem}"""\n')
    done = check_config([str(path)])
    assert done.returncode == 2, done.stdout
    assert body not in done.stderr and body[:20] not in done.stderr and "BEGIN" not in done.stderr
    assert "executor.private_key_file" in done.stderr and "looks like the key itself" in done.stderr
    env_done = check_config([], {"TP_THALEX__PRIVATE_KEY_FILE": pem})
    assert env_done.returncode == 2 and body[:20] not in env_done.stderr


def test_a_key_file_that_is_not_text_exits_2_naming_the_key(tmp_path: Path) -> None:
    from services.common.config import require_key
    key = tmp_path / "key.pem"
    key.write_bytes(b"\xff\xfe\x00binary")
    key.chmod(0o600)
    with pytest.raises(ConfigError) as info:
        require_key("thalex", "k", key)
    assert str(info.value).endswith(f"thalex.private_key_file = {str(key)!r}: is not a text (UTF-8) file: "
                                    "a key or password file holds text (PEM, hex)")
    with pytest.raises(ConfigError, match=r"thalex\.private_key_file .*is a directory"):
        require_key("thalex", "k", tmp_path)


def test_a_trading_key_readable_by_others_is_refused_and_a_read_only_key_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A trading key can move money: readable by other users of the machine it is refused (outside
    a container's /run/secrets); any other secret is used with a warning."""
    from services.common.config import require_key
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n")
    key.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        require_key("executor", "k", key)
    assert "executor.private_key_file" in str(info.value) and "mode 0644" in str(info.value)
    assert "chmod 600" in str(info.value)
    with caplog.at_level("WARNING"):
        assert require_key("thalex", "k", key)[0] == "k"
    assert any("thalex.private_key_file: readable by group or others (mode 0644)" in r.getMessage()
               for r in caplog.records)
    key.chmod(0o600)
    caplog.clear()
    assert require_key("executor", "k", key)[1].startswith("-----BEGIN")
    assert not caplog.records


def test_an_unreadable_redis_password_file_exits_2_naming_it(tmp_path: Path) -> None:
    from services.common.service import read_secret
    with pytest.raises(ConfigError, match=r"redis\.password_file .*file does not exist"):
        read_secret(tmp_path / "missing.txt")


HEX_PASSWORD = "8a9f1015aa0b6350" * 4
"""What deploy/make-secrets.sh makes: single-case hex, which `redact` leaves alone (a digest's look)."""


@pytest.mark.parametrize("where", ["file", "environment"])
def test_a_secret_under_a_misspelt_key_is_named_never_printed(tmp_path: Path, where: str) -> None:
    """`password =` where only `password_file` exists: the key is named, the value never shown."""
    if where == "file":
        done = check_config([str(write(tmp_path, f"[redis]\npassword = '{HEX_PASSWORD}'\n"))])
        named = "redis.password: unknown key"
    else:
        done = check_config([], {"TP_REDIS__PASSWORD": HEX_PASSWORD, "TP_REDIS_PASWORD": "Tr0ub4dor&3-horse"})
        named = "TP_REDIS__PASSWORD: unknown key 'password' of [redis]"
    assert done.returncode == 2
    assert named in done.stderr, done.stderr
    assert HEX_PASSWORD not in done.stderr + done.stdout and "Tr0ub4dor" not in done.stderr + done.stdout


@pytest.mark.parametrize(("url", "fragment"), [
    ("redis://ingest:Xk9#Lq2v7pZ@127.0.0.1:6379/0", "Xk9"),  # '#' starts a fragment: port 'Xk9'
    ("redis://ingest:ab/cd9Q@127.0.0.1:6379/0", "ab/cd9Q"),  # '/' ends the host: a base64 password
    ("redis://ingest:s3cr?et@127.0.0.1:6379/0", "s3cr"),
    ("redis://127.0.0.1:notaport/0", "notaport"),
    ("redis://127.0.0.1:6379/0?socket_timeout=abc", None),
    ("redis://127.0.0.1:6379/abc", None),  # redis-py would quietly use database 0
])
def test_a_redis_url_redis_py_cannot_read_exits_2_without_a_traceback_or_the_password(
    tmp_path: Path, url: str, fragment: str | None
) -> None:
    """Before, check-config said OK and every service then died with a traceback quoting the part of the
    password before the '#', '/' or '?' (exit 1: systemd restarted it every 5 s, journal and all)."""
    for done in (check_config([], {"TP_REDIS__URL": url}),
                 subprocess.run([sys.executable, "-m", "services.cli", "takeprofit"], capture_output=True,
                                text=True, env={**os.environ, "TP_REDIS__URL": url}, timeout=60)):
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert "redis.url" in out and "Traceback" not in out, out
        assert fragment is None or fragment not in out, out
