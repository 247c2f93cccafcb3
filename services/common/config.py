"""Configuration: one TOML file plus environment overrides, validated at start-up.

Every key of the seed's `portfolio_take_profit` and `trading_fees` sections is
here with its seed default, plus the sections the services need. A value that
breaks a rule stops the service with exit code 2 and a message naming the key,
the value and the rule (`ConfigError`); unknown keys are rejected, because a
typo such as `min_proft_usd` silently ignored would leave real money guarded by
a default the trader never chose.

Environment overrides use the prefix `TP_` and `__` between levels, for example
`TP_REDIS__URL=redis://10.0.0.5:6379/0` or
`TP_PORTFOLIO_TAKE_PROFIT__MIN_PROFIT_USD=2.5`. They are held to the file's rules:
a variable naming an unknown section or key is an error like a typo in the file
(`ENVIRONMENT_ONLY` lists the few `TP_*` variables that are not settings), and a
list or table given in the environment must be JSON.

Types are strict where a file has types: `min_profit_usd = true` is refused (a
boolean is not a number), as is `enable_portfolio_tp = 1`. The environment only
has strings, which are parsed as before ("2.5" is a number there).

Every message quoting a value passes `services.common.redact.redact` first: a
password in a URL or a key pasted where a file name belongs never reaches the
terminal or the log.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import stat
import tomllib
import types
import typing
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)
from redis.connection import parse_url

from services.common.contracts import InstrumentType, NotificationKind
from services.common.redact import redact
from services.common.streams import NAMESPACE_RULE, Names

HTTP_URL = re.compile(r"^https?://[^\s/]+")
"""A URL notify can POST to or read: a scheme and a host (a target's `url`, `url_file`, `health_urls`)."""

log = logging.getLogger(__name__)

DEFAULT_FEE_ESTIMATION_BUFFER = 1.1
FEE_RATE_RULE = "must be a fee rate within [0, 0.01]"


def _fee_rate(value: float) -> float:
    if not 0.0 <= value <= 0.01:
        raise ValueError(FEE_RATE_RULE)
    return value


def _buffer(value: float) -> float:
    if value < 1.0:
        raise ValueError("must be >= 1 (a buffer may only make estimates more cautious)")
    return value


FeeRate = Annotated[float, AfterValidator(_fee_rate)]
Buffer = Annotated[float, AfterValidator(_buffer)]
KEY_IN_PLACE_OF_A_FILE = ("looks like the key itself, not a file name: put the key in a file and name the "
                          "file here")


def _secret_file_name(value: Path) -> Path:
    if "-----BEGIN" in str(value) or "\n" in str(value):
        raise ValueError(KEY_IN_PLACE_OF_A_FILE)
    return value


SecretFile = Annotated[Path, AfterValidator(_secret_file_name)]
"""The name of a file holding a secret (a key, a password), never the secret itself."""


class Section(BaseModel):
    """A config section: unknown keys are an error, numbers must be finite and not booleans."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any) -> Any:
        """`min_profit_usd = true` would become 1.0, and `enable_portfolio_tp = 0` false: refuse both."""
        if isinstance(data, dict):
            kinds = _field_kinds(cls)
            for key, value in data.items():
                kind = kinds.get(key)
                if kind == "number" and isinstance(value, bool):
                    raise _RuleError(key, value, "must be a number, not true/false")
                if kind == "boolean" and isinstance(value, int | float) and not isinstance(value, bool):
                    raise _RuleError(key, value, "must be true or false")
        return data


def _field_kinds(model: type[BaseModel]) -> dict[str, str]:
    """Field name → "number" or "boolean" for the fields a TOML boolean or number could be mistaken for."""
    kinds: dict[str, str] = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
        if annotation is bool:
            kinds[name] = "boolean"
        elif annotation in (int, float):
            kinds[name] = "number"
    return kinds


class EmergencyBasis(StrEnum):
    """The figure the emergency stop judges (README, "The emergency stop means loss")."""

    NET_PNL = "net_pnl"
    """The loss market moves and fees have caused: opening a position never trips it by itself."""
    NET_AFTER_CLOSE = "net_after_close"
    """That loss less the estimated cost of getting out: a large position trips it as it opens."""


class PortfolioTakeProfit(Section):
    """The barriers (seed section `portfolio_take_profit`, seed defaults)."""

    enable_portfolio_tp: bool = True
    min_profit_usd: Annotated[float, Field(gt=0)] = 1.1
    profit_after_fees: bool = True
    check_interval_seconds: Annotated[float, Field(ge=1.0)] = 2.0
    max_position_age_hours: Annotated[float, Field(gt=0)] = 24.0
    emergency_close_threshold: Annotated[float, Field(lt=0)] = -10.0
    emergency_stop_basis: EmergencyBasis = EmergencyBasis.NET_PNL
    """`net_pnl` (default) or `net_after_close`: what the emergency stop compares with its threshold."""
    partial_profit_threshold: float = 0.5
    """Net after close at which a partial take profit closes `partial_close_fraction`; > 0 while it is on."""
    position_correlation_check: bool = True
    fee_estimation_buffer: Buffer = DEFAULT_FEE_ESTIMATION_BUFFER
    partial_close_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    """Share of every position a partial take profit closes; 0 turns it off."""
    close_before_expiry_minutes: Annotated[float, Field(ge=0.0)] = 30.0
    trailing_activation_usd: Annotated[float, Field(ge=0.0)] = 0.0
    """Profit at which the trailing take profit arms; 0 turns it off."""
    trailing_retrace_usd: Annotated[float, Field(gt=0.0)] = 0.5
    cooldown_seconds: Annotated[float, Field(ge=0.0)] = 30.0
    confirm_snapshots: Annotated[int, Field(ge=1)] = 1
    emergency_stop_when_disabled: bool = True
    """Keep the emergency stop armed when `enable_portfolio_tp` is false."""
    breaker_max_repeat_closures: Annotated[int, Field(ge=1)] = 3
    """Closures of positions rebuilt during a halt or cool-down allowed within the window; the next
    one opens the circuit breaker (docs/operations.md, "The circuit breaker")."""
    breaker_window_seconds: Annotated[float, Field(gt=0.0)] = 600.0

    @model_validator(mode="after")
    def _ordered_barriers(self) -> PortfolioTakeProfit:
        if self.partial_close_fraction > 0 and self.partial_profit_threshold <= 0:
            raise _RuleError(
                "partial_profit_threshold",
                self.partial_profit_threshold,
                "must be > 0 while partial_close_fraction > 0: a partial take profit at or below zero "
                "would close part of every position at a loss, once per epoch",
            )
        if self.partial_profit_threshold >= self.min_profit_usd:
            raise _RuleError(
                "partial_profit_threshold",
                self.partial_profit_threshold,
                f"must be < min_profit_usd ({self.min_profit_usd})",
            )
        if self.trailing_activation_usd > 0:
            if self.trailing_activation_usd >= self.min_profit_usd:
                raise _RuleError(
                    "trailing_activation_usd",
                    self.trailing_activation_usd,
                    f"must be < min_profit_usd ({self.min_profit_usd}): the take profit fires first",
                )
            if self.trailing_activation_usd <= self.trailing_retrace_usd:
                raise _RuleError(
                    "trailing_activation_usd",
                    self.trailing_activation_usd,
                    f"must be > trailing_retrace_usd ({self.trailing_retrace_usd}), "
                    "or the trailing stop could close at a loss",
                )
        return self


class FeeRates(Section):
    """Maker/taker rates for one product or one instrument (fractions, 0.0005 = 5 bps)."""

    maker_fee_rate: FeeRate
    taker_fee_rate: FeeRate
    premium_cap: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    """An option's fee never exceeds this share of its premium (price x amount); None: no cap.

    Thalex's published schedule has none (options 2.5 bps of the index notional, flat)."""


def _published_product_rates() -> dict[InstrumentType, FeeRates]:
    """Thalex's tier-1 schedule (NOTES.md): futures/perps 1/5 bps, options 2.5 bps."""
    return {
        InstrumentType.PERPETUAL: FeeRates(maker_fee_rate=0.0001, taker_fee_rate=0.0005),
        InstrumentType.FUTURE: FeeRates(maker_fee_rate=0.0001, taker_fee_rate=0.0005),
        InstrumentType.OPTION: FeeRates(maker_fee_rate=0.00025, taker_fee_rate=0.00025),
    }


class TradingFees(Section):
    """The fee schedule used to *estimate* trades that have not happened yet.

    Lookup order (`services/portfolio/fees.rates_for`): `instruments[name]`, then
    `products[type]`, then the top-level rates. Fees already paid come from the exchange's
    trades; these rates estimate the close, and a past trade's fee only when it reported none.
    """

    maker_fee_rate: FeeRate = 0.0001
    taker_fee_rate: FeeRate = 0.0005
    minimum_fee_usd: Annotated[float, Field(ge=0.0)] = 0.0001
    fee_estimation_buffer: Buffer = DEFAULT_FEE_ESTIMATION_BUFFER
    settlement_fee_rate: FeeRate = 0.0001
    """Final settlement at expiry: 1 bps of the amount settled (price x amount)."""
    liquidation_fee_rate: FeeRate = 0.005
    """Liquidation: 50 bps of the liquidation trade (price x amount), on top of its trading fee."""
    products: dict[InstrumentType, FeeRates] = Field(default_factory=_published_product_rates)
    instruments: dict[str, FeeRates] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _premium_cap_on_options_only(self) -> TradingFees:
        for product, rates in self.products.items():
            if rates.premium_cap is not None and product is not InstrumentType.OPTION:
                raise _RuleError(f"trading_fees.products.{product.value}.premium_cap", rates.premium_cap,
                                 "applies to options only (their fee is on the index notional)")
        return self


class Network(StrEnum):
    TEST = "test"
    PROD = "prod"


WS_URL = re.compile(r"^wss?://[^\s/]+(/\S*)?$")


class Thalex(Section):
    """Where the exchange is, and the read-only key ingest logs in with."""

    network: str = "ws://127.0.0.1:8765/ws/api/v2"
    """`test`, `prod`, or a websocket URL (the paper exchange)."""
    key_id: str | None = None
    private_key_file: SecretFile | None = None
    account: str | None = None

    @field_validator("network")
    @classmethod
    def _known_network(cls, value: str) -> str:
        if value in (Network.TEST, Network.PROD) or WS_URL.match(value):
            return value
        raise ValueError("must be 'test', 'prod' or a ws:// / wss:// URL")

    @property
    def url(self) -> str:
        """The websocket URL to connect to."""
        if self.network == Network.TEST:
            return "wss://testnet.thalex.com/ws/api/v2"
        if self.network == Network.PROD:
            return "wss://thalex.com/ws/api/v2"
        return self.network


class Redis(Section):
    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "tp"
    username: str | None = None
    password_file: SecretFile | None = None
    """A file (e.g. a Docker secret) holding the ACL password of this service's user."""
    stream_maxlen: Annotated[int, Field(ge=1000)] = 1_000_000
    """Approximate cap of every stream (XADD MAXLEN ~) but the snapshots."""
    snapshot_maxlen: Annotated[int, Field(ge=100)] = 10_000
    """Approximate cap of `tp:snapshots`: only recent ones matter (a reader that falls further behind
    re-reads the positions from `tp:snapshot:positions`, docs/streams.md)."""

    @field_validator("url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
        try:  # as redis-py will read it, so a service never starts on a URL that fails at its first use
            parse_url(value)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError):  # its text may quote the password: not repeated
            raise _RuleError("url", NOT_SHOWN, "not a Redis URL redis-py can read: its host, port, database "
                             "or options cannot be read (a password holding / # ? @ or % must be "
                             "percent-encoded, e.g. / as %2F; or put it in password_file)") from None
        database = urlsplit(value).path
        tcp = not value.startswith("unix://")
        if tcp and database not in ("", "/") and not re.fullmatch(r"/\d+", database):
            raise ValueError(f"the database after the host must be a number, e.g. /0 (not {database!r}: "
                             "redis-py would quietly use database 0)")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        if not NAMESPACE_RULE.match(value):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ . -")
        return value

    @property
    def names(self) -> Names:
        return Names(self.namespace)


MIN_INDEX_DEVIATION = 0.02
"""The tightest index bound accepted: a perpetual trades 1-2 % off its index in a sell-off."""


class Executor(Section):
    """The closing hand: the only section that names a trading key."""

    key_id: str | None = None
    private_key_file: SecretFile | None = None
    close_price_buffer: Annotated[float, Field(gt=0.0, le=0.2)] = 0.005
    """How far through the best opposite price a close is priced (0.005 = 0.5%)."""
    max_close_price_buffer: Annotated[float, Field(gt=0.0, le=0.5)] = 0.05
    """The widest a retry may price through the book."""
    max_index_deviation: Annotated[float, Field(ge=MIN_INDEX_DEVIATION, le=0.5)] = 0.1
    """A perpetual's or future's close is never priced further than this from its index (0.1 = 10%).

    At least `MIN_INDEX_DEVIATION` and `max_close_price_buffer`: tighter than a sell-off's basis,
    every close of a perpetual would be priced above its best bid and fail, the emergency stop's too."""
    deadline_seconds: Annotated[float, Field(gt=0.0)] = 30.0
    dry_run: bool = False
    cancel_open_orders: bool = True
    """`private/cancel_all` before closing: the account's orders cannot rebuild the position."""
    cancel_mass_quotes: bool = True
    """`private/cancel_mass_quote` before closing: every session's mass quotes (cancel_all leaves them)."""
    cancel_conditional_orders: bool = True
    """`private/cancel_all_conditional_orders` before closing: no stop or bracket re-opens the position."""
    cancel_bots: bool = True
    """`private/cancel_all_bots` before closing: Thalex's server-side bots stop trading the account."""
    order_rate_per_second: Annotated[float, Field(gt=0.0, le=50.0)] = 45.0
    """Order messages per second (Thalex allows 50 on a cancel-on-disconnect session)."""

    @model_validator(mode="after")
    def _buffers_ordered(self) -> Executor:
        if self.max_close_price_buffer < self.close_price_buffer:
            raise _RuleError(
                "max_close_price_buffer",
                self.max_close_price_buffer,
                f"must be >= close_price_buffer ({self.close_price_buffer})",
            )
        if self.max_index_deviation < self.max_close_price_buffer:
            raise _RuleError(
                "max_index_deviation",
                self.max_index_deviation,
                f"must be >= max_close_price_buffer ({self.max_close_price_buffer}): the index bound "
                "would stop a retry short of the price it is allowed to pay",
            )
        return self


class Commands(Section):
    """How take-profit's commands are tied to it (`services.common.signing`)."""

    signing_key_file: SecretFile | None = None
    """A file holding the secret take-profit signs every command with and the executor checks
    (HMAC-SHA256, at least 32 bytes). Required by both; no other service should see it."""


class Portfolio(Section):
    stale_after_seconds: Annotated[float, Field(gt=0.0)] = 10.0
    """A position whose instrument had no tick for this long is stale."""
    baseline: Literal["entry", "mark_at_start"] = "entry"
    """How positions carried into the first epoch are valued."""
    drift_grace_seconds: Annotated[float, Field(ge=0.0)] = 5.0
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    dedup_window: Annotated[int, Field(ge=100, le=1_000_000)] = 10_000
    """Trade ids remembered to refuse a duplicated fill (checkpointed with the ledger)."""
    suspect_price_move: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    """A tick whose mark is this far from its index, its previous mark or its book is held as suspect
    until the exchange confirms it with a newer mark (services/portfolio/prices.py)."""


class Ingest(Section):
    watch_list: list[str] = Field(default_factory=list)
    ticker_delay: Literal["raw", "100ms", "200ms", "500ms", "1000ms", "5000ms", "60000ms"] = "100ms"
    book_levels: Annotated[int, Field(ge=1, le=50)] = 10
    unsubscribe_after_flat_seconds: Annotated[float, Field(ge=0.0)] = 300.0
    idle_timeout_seconds: Annotated[float, Field(gt=0.0)] = 15.0
    reconnect_max_seconds: Annotated[float, Field(gt=0.0)] = 30.0
    history_recheck_seconds: Annotated[float, Field(gt=0.0)] = 30.0
    """After each (re)connect's gap fill, read the trade history once more this much later."""


class Metrics(Section):
    host: str = "127.0.0.1"
    ingest_port: Annotated[int, Field(ge=0, le=65535)] = 9101
    portfolio_port: Annotated[int, Field(ge=0, le=65535)] = 9102
    takeprofit_port: Annotated[int, Field(ge=0, le=65535)] = 9103
    executor_port: Annotated[int, Field(ge=0, le=65535)] = 9104
    notify_port: Annotated[int, Field(ge=0, le=65535)] = 9105


TARGET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
NOTIFY_TARGET_FIELDS: dict[str, tuple[set[str], set[str]]] = {
    # type: (required, allowed besides name/type/events)
    "webhook": (set(), {"url", "url_file", "secret_file"}),
    "telegram": ({"bot_token_file", "chat_id_file"}, {"bot_token_file", "chat_id_file", "base_url"}),
    "slack": ({"url_file"}, {"url_file"}),
    "discord": ({"url_file"}, {"url_file"}),
}
WATCHABLE_SERVICES = ("ingest", "portfolio", "takeprofit", "executor")


class NotifyTarget(Section):
    """Where notifications go. Secrets (tokens, webhook URLs that embed one, HMAC keys) come from files."""

    name: str
    type: Literal["webhook", "telegram", "slack", "discord"]
    url: str | None = None
    """webhook: the endpoint (use `url_file` instead when the URL itself is a secret)."""
    url_file: Path | None = None
    """webhook, slack, discord: a file holding the URL (an incoming-webhook URL is a secret)."""
    secret_file: Path | None = None
    """webhook: a file holding the HMAC-SHA256 key; the body's signature goes in a header."""
    bot_token_file: Path | None = None
    chat_id_file: Path | None = None
    base_url: str = "https://api.telegram.org"
    """telegram: the Bot API's address (a test stands a local server in)."""
    events: list[NotificationKind] | None = None
    """Which notification kinds this target gets; absent: all of them."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not TARGET_NAME.match(value):
            raise ValueError("must be 1-64 characters of A-Z a-z 0-9 _ . -")
        return value

    @field_validator("url", "base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not HTTP_URL.match(value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> NotifyTarget:
        required, allowed = NOTIFY_TARGET_FIELDS[self.type]
        given = {k for k in self.model_fields_set if k not in ("name", "type", "events")}
        for key in sorted(given - allowed):
            raise _RuleError(key, getattr(self, key), f"not used by a {self.type} target")
        for key in sorted(required - given):
            raise _RuleError(key, None, f"required for a {self.type} target")
        if self.type == "webhook" and (self.url is None) == (self.url_file is None):
            raise _RuleError("url", self.url, "a webhook target needs exactly one of url or url_file")
        return self


class Notify(Section):
    """`thalex-tp notify`: tell the trader. Sends nothing until a target is configured."""

    targets: list[NotifyTarget] = Field(default_factory=list)
    near_barrier_share: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.8
    """Warn once when net_after_close has gone this share of the way from 0 to the take-profit
    target, or to the emergency stop."""
    rearm_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5
    """A warning is given again only after the figure fell back below this share (or a new epoch)."""
    unhealthy_after_seconds: Annotated[float, Field(gt=0.0)] = 60.0
    """Notify when a watched service's /health has been failing (or unreachable) this long."""
    health_interval_seconds: Annotated[float, Field(gt=0.0)] = 5.0
    health_urls: dict[str, str] | None = None
    """service -> its /health URL; absent: the four services on [metrics] host and ports."""
    rate_per_minute: Annotated[float, Field(gt=0.0, le=600.0)] = 20.0
    """Per target: notifications sent per minute at most, after a burst of `rate_burst`."""
    rate_burst: Annotated[int, Field(ge=1, le=100)] = 5
    retry_max_seconds: Annotated[float, Field(gt=0.0)] = 300.0
    """Ceiling of the exponential backoff (from 1 s) while a target is down."""
    give_up_after_seconds: Annotated[float, Field(gt=0.0)] = 86400.0
    """A notification not delivered this long after it was due is dropped (logged, counted)."""
    request_timeout_seconds: Annotated[float, Field(gt=0.0, le=120.0)] = 10.0
    delivery_alarm_seconds: Annotated[float, Field(gt=0.0)] = 300.0
    """/health turns red while a notification has waited this long for its target."""
    closure_settle_seconds: Annotated[float, Field(ge=0.0)] = 15.0
    """After `completed`, how long to wait for the closed epoch's final snapshot (the P&L banked)."""

    @field_validator("targets")
    @classmethod
    def _unique_names(cls, targets: list[NotifyTarget]) -> list[NotifyTarget]:
        names = [t.name for t in targets]
        if len(set(names)) != len(names):
            raise ValueError(f"target names must be unique: {names}")
        return targets

    @field_validator("health_urls")
    @classmethod
    def _health_urls(cls, urls: dict[str, str] | None) -> dict[str, str] | None:
        for service, url in (urls or {}).items():
            if service not in WATCHABLE_SERVICES:
                raise ValueError(f"unknown service {service!r}; one of {', '.join(WATCHABLE_SERVICES)}")
            if not HTTP_URL.match(url):
                raise ValueError(f"{service}: must be an http:// URL")
        return urls


class Settings(BaseSettings):
    """The whole configuration of one guardian."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix="TP_",
        env_nested_delimiter="__",
        allow_inf_nan=False,
        validate_default=True,
    )

    portfolio_take_profit: PortfolioTakeProfit = Field(default_factory=PortfolioTakeProfit)
    trading_fees: TradingFees = Field(default_factory=TradingFees)
    thalex: Thalex = Field(default_factory=Thalex)
    redis: Redis = Field(default_factory=Redis)
    executor: Executor = Field(default_factory=Executor)
    commands: Commands = Field(default_factory=Commands)
    portfolio: Portfolio = Field(default_factory=Portfolio)
    ingest: Ingest = Field(default_factory=Ingest)
    metrics: Metrics = Field(default_factory=Metrics)
    notify: Notify = Field(default_factory=Notify)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Environment beats the TOML file; the file beats the defaults."""
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _one_fee_buffer(self) -> Settings:
        """The seed had `fee_estimation_buffer` in two sections: they must agree.

        One effective value is applied once in `net_after_close`; two different
        values would leave the trader guessing which one guards the money.
        """
        tp_set = "fee_estimation_buffer" in self.portfolio_take_profit.model_fields_set
        fees_set = "fee_estimation_buffer" in self.trading_fees.model_fields_set
        tp_value = self.portfolio_take_profit.fee_estimation_buffer
        fees_value = self.trading_fees.fee_estimation_buffer
        if tp_set and fees_set and not math.isclose(tp_value, fees_value):
            raise _RuleError(
                "trading_fees.fee_estimation_buffer",
                fees_value,
                f"must equal portfolio_take_profit.fee_estimation_buffer ({tp_value})",
            )
        return self

    @property
    def fee_estimation_buffer(self) -> float:
        """The one buffer applied to estimated closing fees."""
        if "fee_estimation_buffer" in self.trading_fees.model_fields_set:
            return self.trading_fees.fee_estimation_buffer
        return self.portfolio_take_profit.fee_estimation_buffer

    @property
    def names(self) -> Names:
        return self.redis.names


class _RuleError(ValueError):
    """A rule between keys, carrying the key it blames."""

    def __init__(self, key: str, value: Any, rule: str) -> None:
        super().__init__(rule)
        self.key, self.value, self.rule = key, value, rule


NOT_SHOWN = object()
"""A problem's value that is never printed: what was put under an unknown key (a `password = …` where
only `password_file` exists is a secret; the key's name is all a spelling mistake needs), or a Redis
URL that cannot be read (its password may be what breaks it, where `redact` cannot find its end)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule: which key, what value (unless `NOT_SHOWN`), which rule."""

    key: str
    value: Any
    rule: str

    def __str__(self) -> str:
        if self.value is NOT_SHOWN:
            return redact(f"{self.key}: {self.rule}")
        return redact(f"{self.key} = {self.value!r}: {self.rule}")


class ConfigError(Exception):
    """The configuration cannot be used; every problem is listed."""

    exit_code = 2

    def __init__(self, problems: list[Problem], source: str) -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(redact(f"invalid configuration ({source}):\n{lines}"))


def _problems_from(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        ctx_error = (item.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _RuleError):
            prefix = loc[:-1] if loc and loc[-1] == ctx_error.key else loc
            key = ".".join([*prefix, ctx_error.key]) if "." not in ctx_error.key else ctx_error.key
            problems.append(Problem(key, ctx_error.value, ctx_error.rule))
            continue
        rule = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            rule = "unknown key (check the spelling; see the README's configuration reference)"
            value = NOT_SHOWN
        elif item["type"] == "missing":
            rule = "required key is missing"
        problems.append(Problem(".".join(loc) or "<root>", value, rule))
    return problems


ENVIRONMENT_ONLY = frozenset({"TP_LOG_LEVEL", "TP_REPLICA", "TP_HEALTH_PORT", "TP_SECRETS_DIR", "TP_VERSION"})
"""`TP_*` variables that are not settings: log level, replica name, the container healthcheck's
port, and for docker compose the secrets directory (`deploy/make-secrets.sh`) and image tag."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def load_config(path: str | Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Read the TOML file (if any), apply `TP_*` environment overrides, validate.

    Raises `ConfigError` listing every problem.
    """
    source = str(path) if path else "built-in defaults"
    data = _read_toml(path, source) if path is not None else {}
    problems = environment_problems(os.environ if environ is None else environ)
    if problems:
        raise ConfigError(problems, source)
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(_problems_from(exc), source) from None
    except SettingsError as exc:  # the environment could not be parsed (caught above in most forms)
        raise ConfigError([Problem("environment", None, str(exc))], source) from None


def _read_toml(path: str | Path, source: str) -> dict[str, Any]:
    """The file's tables, or `ConfigError` naming `--config` and what is wrong with the file."""
    def refuse(rule: str) -> ConfigError:
        return ConfigError([Problem("--config", str(path), rule)], source)

    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise refuse("file does not exist") from None
    except IsADirectoryError:
        raise refuse("is a directory, not a TOML file") from None
    except PermissionError:
        raise refuse("cannot be read (permission denied)") from None
    except UnicodeDecodeError:
        raise refuse("is not a text (UTF-8) file: is it really the TOML configuration?") from None
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise refuse(f"not valid TOML: {exc}") from None


def environment_problems(environ: typing.Mapping[str, str]) -> list[Problem]:
    """`TP_*` variables that name no setting, or hold a list or table that is not JSON.

    pydantic-settings reads only the variables that match a field, so a misspelt section
    (`TP_PORTFOLIO_TAKEPROFIT__MIN_PROFIT_USD`) would be ignored without a word, and a broken
    JSON list would end in a traceback.
    """
    problems = []
    for name, value in sorted(environ.items()):
        upper = name.upper()
        if not upper.startswith("TP_"):
            continue
        if upper == "TP_LOG_LEVEL":
            if value.strip().upper() not in LOG_LEVELS:
                problems.append(Problem(name, value, f"unknown log level; one of {', '.join(LOG_LEVELS)}"))
            continue
        if upper in ENVIRONMENT_ONLY:
            continue
        problem = _environment_problem(name, value, upper[3:].lower().split("__"))
        if problem is not None:
            problems.append(problem)
    return problems


def _environment_problem(name: str, value: str, path: list[str]) -> Problem | None:
    sections = Settings.model_fields
    section = sections.get(path[0])
    if section is None or not path[0]:
        return Problem(name, NOT_SHOWN, "unknown setting: no section "
                       f"'{path[0]}' (sections: {', '.join(sections)}); TP_<SECTION>__<KEY>, e.g. "
                       "TP_PORTFOLIO_TAKE_PROFIT__MIN_PROFIT_USD")
    model = section.annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    if len(path) == 1:
        return _json_problem(name, value, dict)
    field = model.model_fields.get(path[1])
    if field is None:
        return Problem(name, NOT_SHOWN, f"unknown key '{path[1]}' of [{path[0]}] (check the spelling; see "
                       "the README's configuration reference)")
    if len(path) == 2:
        origin = typing.get_origin(field.annotation) or field.annotation
        if origin in (list, dict) or (isinstance(origin, type) and issubclass(origin, BaseModel)):
            return _json_problem(name, value, list if origin is list else dict)
    return None


def _json_problem(name: str, value: str, expected: type) -> Problem | None:
    what = "a JSON list, e.g. '[\"BTC-PERPETUAL\"]'" if expected is list else \
        "a JSON object, e.g. '{\"key\": 1}'"
    try:
        parsed = json.loads(value)
    except ValueError:
        return Problem(name, value, f"not valid JSON: lists and tables are written in the environment as "
                       f"{what}")
    if not isinstance(parsed, expected):
        return Problem(name, value, f"must be {what}")
    return None


def require_key(section: str, key_id: str | None, private_key_file: Path | None) -> tuple[str, str]:
    """Load a Thalex API key for a service that needs one.

    The private key comes from a file (or Docker secret) only and is returned
    to the caller, never logged. A trading key (`executor`) readable by others is
    refused (see `check_secret_file`).
    """
    problems = []
    if not key_id:
        problems.append(Problem(f"{section}.key_id", key_id, "required key is missing"))
    if private_key_file is None:
        problems.append(Problem(f"{section}.private_key_file", None, "required key is missing"))
    if problems:
        raise ConfigError(problems, section)
    assert key_id is not None and private_key_file is not None
    text = read_secret_file(f"{section}.private_key_file", private_key_file, trading=section == "executor")
    return key_id, text


def read_secret_file(key: str, path: Path, *, trading: bool = False) -> str:
    """A secret's text from its file, or `ConfigError` naming `key` (never quoting the content)."""
    def refuse(rule: str) -> ConfigError:
        return ConfigError([Problem(key, str(path), rule)], key)

    if "-----BEGIN" in str(path) or "\n" in str(path):
        raise refuse(KEY_IN_PLACE_OF_A_FILE)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise refuse("file does not exist") from None
    except IsADirectoryError:
        raise refuse("is a directory, not a key file") from None
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    check_secret_file(key, path, trading=trading)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("is not a text (UTF-8) file: a key or password file holds text (PEM, hex)") from None


CONTAINER_SECRETS = Path("/run/secrets")
"""Where Docker and Kubernetes mount secrets: the container is the boundary there, and the mode
is the orchestrator's (docker compose's file secrets keep the host file's mode)."""


def check_secret_file(key: str, path: Path, *, trading: bool = False) -> None:
    """Warn about a secret readable by group or others; refuse such a trading key.

    A trading key can close and open positions: one that other users of the machine can read is
    refused (exit 2). Every other secret (read-only key, Redis password, the command signing key)
    only draws a warning: none moves money by itself, and refusing it would stop a guardian that is
    otherwise guarding. Files under /run/secrets are left alone: that is a container's secret mount,
    the container is the boundary, and docker compose's file secrets keep the host file's mode
    (deploy/make-secrets.sh makes them 0644 in a 0700 directory so the non-root service can read them).
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if not mode & (stat.S_IRWXG | stat.S_IRWXO) or path.resolve().is_relative_to(CONTAINER_SECRETS):
        return
    advice = f"readable by group or others (mode {mode:04o}); `chmod 600 {path}`"
    if trading:
        raise ConfigError([Problem(key, str(path), f"trading key {advice}")], key)
    log.warning("%s: %s", key, advice)


def redacted(settings: Settings) -> dict[str, Any]:
    """The effective configuration, safe to print: every string has passed `redact`."""
    data = _redact_strings(settings.model_dump(mode="json"))
    data["fee_estimation_buffer (effective)"] = settings.fee_estimation_buffer
    assert isinstance(data, dict)
    return data


def _redact_strings(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_strings(item) for item in value]
    return value


__all__ = [
    "ConfigError",
    "FeeRates",
    "Problem",
    "Settings",
    "check_secret_file",
    "environment_problems",
    "load_config",
    "read_secret_file",
    "redacted",
    "require_key",
]
