"""Settings: the TOML file plus secrets from the environment, validated once at start-up.

Every problem becomes a ConfigError naming the dotted key (``chains[0].assets[1].contract``)
so `watcher check-config` can tell the operator exactly what to fix. Secrets never live in
the file: the file names environment variables, and the values are injected from the
environment before validation (a secret written in the file is itself an error).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import math
import os
import re
import tomllib
import typing
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    Strict,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from watcher.addresses import check_xpub, normalize_address, to_checksum
from watcher.domain import DECIMAL_TEXT, usd_rate_problem
from watcher.rates.quoting import rate_graph
from watcher.redaction import strip_credentials
from watcher.schemas import EventTypeName

__all__ = [
    "ApiKeySettings",
    "AssetSettings",
    "ChainSettings",
    "CheckoutSettings",
    "ConfigError",
    "HttpSettings",
    "InvoiceSettings",
    "RateSettings",
    "RetentionSettings",
    "Settings",
    "WebhookSettings",
    "describe",
    "load_settings",
    "settings_from_dict",
    "strip_credentials",
]

EVENT_TYPES: frozenset[str] = frozenset(typing.get_args(EventTypeName))
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"

StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]


class ConfigError(Exception):
    """A configuration problem, with the dotted key it concerns (exit code 2 in the CLI).
    `problems` holds every problem found in one pass, the first one being `key`/`message`,
    so an operator fixes them all in one go rather than one per run."""

    def __init__(self, key: str, message: str, more: Sequence[tuple[str, str]] = ()) -> None:
        self.problems = [(key, message), *more]
        super().__init__("\n".join(f"{k}: {m}" for k, m in self.problems))
        self.key = key
        self.message = message


class _KeyedError(ValueError):
    """Raised inside validators to point below the validator's own location (e.g. a duplicate
    symbol found by the chain validator belongs to ``assets[2].symbol``)."""

    def __init__(self, message: str, *path: str | int) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


_MODEL = ConfigDict(frozen=True, extra="forbid")


def _inject_secret(
    data: Any,
    info: ValidationInfo,
    field: str,
    env_field: str,
    default_var: str | None,
    valid: Callable[[str], bool],
    wanted: str,
) -> Any:
    """Put the secret from the variable named by ``env_field`` into ``field`` before validation,
    and reject it in the file. Messages describe ``wanted`` and never echo the value."""
    if not isinstance(data, Mapping):
        return data
    if field in data:
        raise _KeyedError(
            f"secrets never live in the file; put the value in the environment variable named by {env_field}",
            field,
        )
    var = data.get(env_field, default_var)
    if not isinstance(var, str) or not re.match(_ENV_NAME, var):
        return data  # field validation reports the missing or malformed name
    ctx = info.context
    env = ctx["env"] if isinstance(ctx, Mapping) and "env" in ctx else os.environ
    value = env.get(var)
    if value is None:
        raise _KeyedError(f"environment variable {var} is not set; it must hold {wanted}", env_field)
    if not valid(value):
        raise _KeyedError(f"environment variable {var} must hold {wanted}", env_field)
    return {**data, field: value}


def _int_or_word(value: Any, word: str, minimum: int, what: str) -> int | str:
    if isinstance(value, str) and value == word:
        return word
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f'must be {what}, or "{word}"')
    return value


def _first_duplicate(values: list[Any]) -> tuple[int, int] | None:
    """(index of the repeat, index of the first occurrence), so the error points at the repeat."""
    seen: dict[Any, int] = {}
    for i, v in enumerate(values):
        if v is not None and (j := seen.setdefault(v, i)) != i:
            return i, j
    return None


def _decimal(value: Any, low: Decimal, high: Decimal | None, low_ok: bool) -> Decimal:
    """Money is never a float: a TOML float has already lost precision, so demand a string."""
    if isinstance(value, float):
        raise ValueError(
            'must be a quoted decimal string such as "1.05", not a float (money is never a float)'
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ValueError('must be a decimal string such as "1.05"')
    if isinstance(value, str) and not DECIMAL_TEXT.fullmatch(value.strip()):
        raise ValueError('must be a decimal string such as "1.05" (ASCII digits, no separators)')
    try:
        result = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        raise ValueError('must be a decimal string such as "1.05"') from None
    if (
        not result.is_finite()
        or result < low
        or (result == low and not low_ok)
        or (high is not None and result > high)
    ):
        raise ValueError(
            f"must be {'at least' if low_ok else 'greater than'} {low}"
            + (f" and at most {high}" if high is not None else "")
        )
    return result


def _address(value: Any) -> str | None:
    if value is None:
        return None
    address = normalize_address(value)
    if address == "0x" + "0" * 40:
        raise ValueError("must not be the zero address")
    return address


def _url(value: Any, schemes: tuple[str, ...]) -> str:
    """Check scheme and host; the URL itself is never echoed since it may hold credentials."""
    wanted = "URL with scheme " + " or ".join(schemes)
    if not isinstance(value, str):
        raise ValueError(f"must be a {wanted}")
    try:
        parts = urlsplit(value.strip())
        _ = parts.port
    except ValueError:
        raise ValueError(f"must be a valid {wanted}") from None
    if parts.scheme.lower() not in schemes or not parts.hostname:
        raise ValueError(f"must be a {wanted} and a host")
    return value.strip()


def _split_listen(value: Any) -> tuple[str, int]:
    """HOST:PORT, with an IPv6 host in brackets ([::1]:8080), as for any socket address."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})|([^\[\]:]+):(\d{1,5})", value if isinstance(value, str) else "")
    if not m:
        raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080")
    host, port = (m[1], int(m[2])) if m[1] else (m[3], int(m[4]))
    if m[1]:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("has a bad IPv6 address in brackets") from None
    elif not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
        raise ValueError("has a bad host name")
    if not 1 <= port <= 65535:
        raise ValueError("port must be in 1..65535")
    return host, port


def _event(value: Any) -> str:
    if value != "*" and value not in EVENT_TYPES:
        raise ValueError(
            f'unknown event type {value!r}; use "*" or one of: ' + ", ".join(sorted(EVENT_TYPES))
        )
    return str(value)


def _listen(value: Any) -> str:
    _split_listen(value)
    return str(value)


def _xpub(value: Any) -> str | None:
    if value is None:
        return None
    check_xpub(value)  # bip_utils parses it at the first derivation
    return str(value).strip()


# Field types whose validators own the whole check, so messages say what to write instead.
Address = Annotated[str | None, PlainValidator(_address)]
HttpUrl = Annotated[str, PlainValidator(lambda v: _url(v, ("http", "https")))]
WsUrl = Annotated[str | None, PlainValidator(lambda v: None if v is None else _url(v, ("ws", "wss")))]
Confirmations = Annotated[
    int | Literal["finalized"],
    PlainValidator(lambda v: _int_or_word(v, "finalized", 1, "an integer of at least 1")),
]
StartBlock = Annotated[
    int | Literal["latest"],
    PlainValidator(lambda v: _int_or_word(v, "latest", 0, "a block number (0 or more)")),
]


def _usd_rate(value: Any) -> Decimal | None:
    if value is None:
        return None
    rate = _decimal(value, Decimal(0), None, False)
    if (problem := usd_rate_problem(rate)) is not None:
        raise ValueError(problem)
    return rate


UsdRate = Annotated[Decimal | None, PlainValidator(_usd_rate)]
# Below 100: a tolerance of the whole amount would call an unpaid invoice paid.
Percent = Annotated[Decimal, PlainValidator(lambda v: _decimal(v, Decimal(0), Decimal("99.99"), True))]
EnvName = Annotated[str, Field(pattern=_ENV_NAME)]


class AssetSettings(BaseModel):
    """One payable asset on a chain: an ERC-20 token or the chain's native coin."""

    model_config = _MODEL
    symbol: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,19}$")]
    kind: Literal["erc20", "native"]
    contract: Address = None
    decimals: Annotated[StrictInt, Field(ge=0, le=36)]
    usd_rate: UsdRate = None

    @model_validator(mode="before")
    @classmethod
    def _native_decimals(cls, data: Any) -> Any:
        """Every EVM native coin has 18 decimals, so only tokens must state theirs."""
        if isinstance(data, Mapping) and data.get("kind") == "native" and "decimals" not in data:
            return {**data, "decimals": 18}
        return data

    @model_validator(mode="after")
    def _contract_fits_kind(self) -> AssetSettings:
        if self.kind == "erc20" and self.contract is None:
            raise _KeyedError("is required for an erc20 asset", "contract")
        if self.kind == "native" and self.contract is not None:
            raise _KeyedError("must be absent for a native asset (it has no contract)", "contract")
        return self


class ChainSettings(BaseModel):
    """One EVM chain to watch, its RPC endpoints and the assets accepted on it."""

    model_config = _MODEL
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
    chain_id: Annotated[StrictInt, Field(gt=0)]
    rpc_urls: Annotated[tuple[HttpUrl, ...], Field(min_length=1)]
    ws_url: WsUrl = None
    poll_interval_seconds: Annotated[float, Strict(), Field(gt=0, le=3600)]
    confirmations: Confirmations
    start_block: StartBlock = "latest"
    deposit_xpub: Annotated[str | None, PlainValidator(_xpub)] = None
    merchant_address: Address = None
    router_address: Address = None
    internal_transfers: Literal["auto", "on", "off"] = "auto"
    # JSON-RPC batch ceiling (providers cap batches); at least 2: logs go with the header that proves them
    max_batch: Annotated[StrictInt, Field(ge=2, le=10_000)] = 100
    trust_logs_bloom: StrictBool = (
        True  # false: ask every block near the head for its logs (chains with incomplete blooms)
    )
    assets: Annotated[tuple[AssetSettings, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique_assets(self) -> ChainSettings:
        """Two entries for one symbol or token would make a transfer count twice or be ambiguous."""
        if dup := _first_duplicate([a.symbol.upper() for a in self.assets]):
            raise _KeyedError(
                f"duplicate symbol on this chain (also assets[{dup[1]}]; symbols are "
                "compared case-insensitively)",
                "assets",
                dup[0],
                "symbol",
            )
        if dup := _first_duplicate([a.contract for a in self.assets]):
            raise _KeyedError(f"same token contract as assets[{dup[1]}]", "assets", dup[0], "contract")
        if dup := _first_duplicate([a.kind if a.kind == "native" else None for a in self.assets]):
            raise _KeyedError(
                f"a chain has one native coin and assets[{dup[1]}] is it", "assets", dup[0], "kind"
            )
        return self


MAX_WEBHOOK_SECRETS = 5  # a rotation needs two; more is a mistake (and a signature per secret)


def _one_webhook_secret(value: str) -> bool:
    """Standard Webhooks: "whsec_" + base64 of the HMAC key; a short key is a weak signature."""
    try:
        return value.startswith("whsec_") and 24 <= len(base64.b64decode(value[6:], validate=True)) <= 64
    except (binascii.Error, ValueError):
        return False


def _valid_webhook_secret(value: str) -> bool:
    """One secret, or several separated by spaces while rotating (each attempt is signed with each)."""
    parts = value.split()
    return (
        1 <= len(parts) <= MAX_WEBHOOK_SECRETS
        and len(set(parts)) == len(parts)
        and all(map(_one_webhook_secret, parts))
    )


LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: traffic that never leaves the machine."""
    if not host:
        return False
    if host.lower().rstrip(".") in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _https_or_loopback(value: Any, why: str) -> str:
    """An https URL, or plain http to this machine only (`why` says what is at stake)."""
    url = _url(value, ("http", "https"))
    parts = urlsplit(url)
    if parts.scheme.lower() == "http" and not is_loopback_host(parts.hostname):
        raise ValueError(
            "must be an https URL: plain http is allowed only for a loopback host (localhost, "
            f"127.0.0.1, [::1]), {why}"
        )
    return url


def _webhook_url(value: Any) -> str:
    """A webhook carries signed invoice data (emails, amounts, metadata) that anyone on the path
    could read or, without TLS, change."""
    return _https_or_loopback(
        value,
        "since a webhook carries invoice data that anyone on the path could read or change; "
        "terminate TLS in front of the receiver",
    )


WebhookUrl = Annotated[str, PlainValidator(_webhook_url)]


class WebhookSettings(BaseModel):
    """One webhook endpoint; its signing secret comes from the environment variable secret_env."""

    model_config = _MODEL
    url: WebhookUrl
    secret_env: EnvName
    events: Annotated[tuple[Annotated[str, PlainValidator(_event)], ...], Field(min_length=1)] = ("*",)
    secret: str = Field(repr=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_secret(cls, data: Any, info: ValidationInfo) -> Any:
        return _inject_secret(
            data,
            info,
            "secret",
            "secret_env",
            None,
            _valid_webhook_secret,
            "the webhook secret: whsec_<base64 key> with a key of 24 to 64 bytes; while rotating, "
            f"up to {MAX_WEBHOOK_SECRETS} different ones separated by spaces",
        )


MIN_API_KEY_LENGTH = 32
_API_KEY_WANTED = (
    f"an API key: at least {MIN_API_KEY_LENGTH} random printable ASCII characters without spaces "
    "(e.g. openssl rand -hex 32), not a repeated pattern or a handful of different characters"
)


def api_key_problem(value: str) -> str | None:
    """Why `value` is too weak to guard the API, or None. Length, then a rough entropy estimate:
    a repeated unit ("abcabc..."), fewer than 10 distinct characters, or under 3 bits of Shannon
    entropy per character is a key a guesser or a shoulder would find."""
    if not (value.isascii() and value.isprintable()) or any(c.isspace() for c in value):
        return "must be printable ASCII without spaces"
    if len(value) < MIN_API_KEY_LENGTH:
        return f"is shorter than {MIN_API_KEY_LENGTH} characters"
    counts = Counter(value)
    bits = -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())
    if (value + value).find(value, 1) < len(value) or len(counts) < 10 or bits < 3.0:
        return "has too little entropy (a repeated pattern or too few different characters)"
    return None


class ApiKeySettings(BaseModel):
    """One more bearer token for /v1, named (for the logs) and scoped: `read` keys may only GET."""

    model_config = _MODEL
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    key_env: EnvName
    scope: Literal["read", "write"]
    key: str = Field(repr=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _resolve_key(cls, data: Any, info: ValidationInfo) -> Any:
        return _inject_secret(
            data, info, "key", "key_env", None, lambda v: api_key_problem(v) is None, _API_KEY_WANTED
        )


class _ListenAddress:
    """`host` and `port` of a model's `listen` ("host:port", IPv6 in brackets)."""

    listen: str

    @property
    def host(self) -> str:
        """Host without IPv6 brackets, ready for socket binding."""
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


class HttpSettings(_ListenAddress, BaseModel):
    """Where the API listens, the bearer tokens (from the environment) it takes, and how many
    connections it serves at once."""

    model_config = _MODEL
    listen: Annotated[str, PlainValidator(_listen)] = "127.0.0.1:8080"
    api_key_env: EnvName = "WATCHER_API_KEY"
    api_key: str = Field(repr=False, exclude=True)
    api_keys: tuple[ApiKeySettings, ...] = ()
    max_connections: Annotated[StrictInt, Field(ge=1, le=1_000_000)] = 1000

    @model_validator(mode="before")
    @classmethod
    def _resolve_api_key(cls, data: Any, info: ValidationInfo) -> Any:
        return _inject_secret(
            data,
            info,
            "api_key",
            "api_key_env",
            "WATCHER_API_KEY",
            lambda v: api_key_problem(v) is None,
            _API_KEY_WANTED,
        )

    @model_validator(mode="after")
    def _distinct_keys(self) -> HttpSettings:
        """A name shows in the logs and a key decides the scope: each must be unambiguous."""
        if dup := _first_duplicate([k.name for k in self.api_keys]):
            raise _KeyedError(f"duplicate name (also api_keys[{dup[1]}])", "api_keys", dup[0], "name")
        if dup := _first_duplicate([self.api_key, *(k.key for k in self.api_keys)]):
            other = "api_key_env" if dup[1] == 0 else f"api_keys[{dup[1] - 1}].key_env"
            raise _KeyedError(
                f"holds the same key as {other}; give each key its own value",
                "api_keys",
                dup[0] - 1,
                "key_env",
            )
        return self


def _public_base_url(value: Any) -> str:
    """Where payers reach the page: http(s), a host, no credentials, query or fragment, and
    no trailing slash (`checkout_url` appends `/pay/{id}`)."""
    url = _url(value, ("http", "https"))
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials: payers see it")
    if parts.query or parts.fragment:
        raise ValueError("must have no query or fragment (checkout URLs append /pay/<invoice id>)")
    return url.rstrip("/")


class CheckoutSettings(_ListenAddress, BaseModel):
    """The hosted payment page: its own public listener, and the URL payers reach it by."""

    model_config = _MODEL
    listen: Annotated[str, PlainValidator(_listen)]
    public_base_url: Annotated[str, PlainValidator(_public_base_url)]
    brand_name: Annotated[str, Field(min_length=1, max_length=120)] | None = None
    # Live status streams (Server-Sent Events): at most this many open at once, and per
    # invoice, each closed after this long (the page reconnects and resumes).
    max_streams: Annotated[StrictInt, Field(ge=1, le=100_000)] = 10_000
    max_streams_per_invoice: Annotated[StrictInt, Field(ge=1, le=1000)] = 20
    stream_timeout_seconds: Annotated[StrictInt, Field(ge=10, le=86_400)] = 1800


class InvoiceSettings(BaseModel):
    """Defaults applied to new invoices."""

    model_config = _MODEL
    default_expiry_minutes: Annotated[StrictInt, Field(ge=1, le=525600)] = 20
    payment_tolerance_percent: Percent = Decimal("0")


class RetentionSettings(BaseModel):
    """How long the store keeps what it no longer needs (pruned by bounded background jobs)."""

    model_config = _MODEL
    idempotency_keys_hours: Annotated[StrictInt, Field(ge=1, le=24 * 3650)] = 24
    delivered_events_days: Annotated[StrictInt, Field(ge=1, le=36500)] = 30
    watch_closed_invoices_days: Annotated[StrictInt, Field(ge=0, le=36500)] = 365  # 0: forever


# A fiat code (ISO 4217 style): what a pair is quoted in, and what an invoice may be in.
FIAT_CODE = re.compile(r"[A-Z]{3}")
_PAIR_SIDE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,19}")
# Chainlink heartbeats run from minutes to a day; an HTTP source is asked at most once a minute.
MIN_HTTP_REFRESH_SECONDS = 60
MIN_CHAINLINK_REFRESH_SECONDS = 5
# `json_path`: dotted keys and list indices, e.g. "data.amount" or "result.0.price".
_JSON_PATH = re.compile(r"[^.\s]{1,100}(\.[^.\s]{1,100}){0,15}")


def _pair(value: Any) -> str:
    """BASE/QUOTE in upper case: the base an asset symbol or a fiat code, the quote a fiat code."""
    if not isinstance(value, str) or value.count("/") != 1:
        raise ValueError('must be "BASE/QUOTE", e.g. "ETH/USD" or "EUR/USD"')
    base, quote = (part.strip().upper() for part in value.split("/"))
    if not _PAIR_SIDE.fullmatch(base) or not FIAT_CODE.fullmatch(quote):
        raise ValueError('must be "BASE/QUOTE": an asset symbol or fiat code, then a three-letter fiat code')
    if base == quote:
        raise ValueError("must name two different things")
    return f"{base}/{quote}"


def _rate_url(value: Any) -> str:
    """A price read over the open network could be changed on its way, and with it every invoice
    quoted from it."""
    return _https_or_loopback(value, "since anyone on the path could change the price")


class RateSettings(BaseModel):
    """One live price source for a pair (contract section 9): a Chainlink feed read on a
    configured chain's own nodes, or a number in an HTTP source's JSON. Several for one pair
    give their median."""

    # Python's re for `json_path`'s pattern: pydantic's default engine (Rust's regex) compiles
    # its counted repeats of a Unicode class into an automaton, 0.02-0.05 s at every start-up;
    # the same verdicts and messages (both search, unanchored).
    model_config = ConfigDict(**_MODEL, regex_engine="python-re")
    pair: Annotated[str, PlainValidator(_pair)]
    source: Literal["chainlink", "http"]
    max_age_seconds: Annotated[StrictInt, Field(ge=1, le=7 * 86400)]
    refresh_seconds: Annotated[StrictInt, Field(ge=MIN_CHAINLINK_REFRESH_SECONDS, le=86400)] = 60
    # chainlink
    chain: str | None = None
    feed: Address = None
    sequencer_uptime_feed: Address = None  # L2s: no quote while the sequencer is down or just back
    # http
    url: Annotated[str | None, PlainValidator(lambda v: None if v is None else _rate_url(v))] = None
    json_path: Annotated[str, Field(pattern=_JSON_PATH.pattern)] | None = None

    @model_validator(mode="after")
    def _fits_source(self) -> RateSettings:
        own = (
            ("chain", "feed", "sequencer_uptime_feed") if self.source == "chainlink" else ("url", "json_path")
        )
        other = (
            ("url", "json_path") if self.source == "chainlink" else ("chain", "feed", "sequencer_uptime_feed")
        )
        for key in other:
            if getattr(self, key) is not None:
                raise _KeyedError(f"belongs to a source of another kind, not {self.source!r}", key)
        for key in own[:2]:
            if getattr(self, key) is None:
                raise _KeyedError(f"is required for a {self.source} source", key)
        if self.source == "http" and self.refresh_seconds < MIN_HTTP_REFRESH_SECONDS:
            raise _KeyedError(
                f"must be at least {MIN_HTTP_REFRESH_SECONDS} for an http source (at most once a minute)",
                "refresh_seconds",
            )
        return self

    @property
    def base(self) -> str:
        return self.pair.split("/")[0]

    @property
    def quote(self) -> str:
        return self.pair.split("/")[1]

    def label(self) -> str:
        """How logs, /v1/rates and check-config name the source (no credentials)."""
        if self.source == "chainlink":
            return f"chainlink {self.chain} {to_checksum(self.feed or '')}"
        return f"http {strip_credentials(self.url or '')}"


def _check_rates(rates: Sequence[RateSettings], chains: Sequence[ChainSettings]) -> None:
    """Each source reads a configured chain, each pair means something (an asset or a fiat code on
    either side, never an asset as what is quoted), and no source is listed twice."""
    names = [c.name for c in chains]
    symbols = {a.symbol.upper() for c in chains for a in c.assets}
    for i, rate in enumerate(rates):
        if rate.chain is not None and rate.chain not in names:
            raise _KeyedError(
                f"is not a configured chain (configured: {', '.join(names)})", "rates", i, "chain"
            )
        if rate.quote in symbols:
            raise _KeyedError(
                f"quotes in {rate.quote}, a configured asset: a pair is quoted in a fiat code",
                "rates",
                i,
                "pair",
            )
        if rate.base not in symbols and not FIAT_CODE.fullmatch(rate.base):
            raise _KeyedError(
                f"{rate.base} is neither a configured asset symbol nor a three-letter fiat code",
                "rates",
                i,
                "pair",
            )
    keys = [(r.pair, r.chain, r.feed, r.url, r.json_path) for r in rates]
    if dup := _first_duplicate(keys):
        raise _KeyedError(f"the same source as rates[{dup[1]}]", "rates", dup[0])


class Settings(BaseModel):
    """The whole validated configuration; immutable so a reload swaps it as one object."""

    model_config = _MODEL
    database: Annotated[str, Field(min_length=1)] = "/var/lib/watcher/watcher.db"
    log_format: Literal["json", "console"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: HttpSettings = Field(default_factory=dict, validate_default=True)
    checkout: CheckoutSettings | None = None
    invoices: InvoiceSettings = Field(default_factory=InvoiceSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    webhooks: tuple[WebhookSettings, ...] = ()
    chains: Annotated[tuple[ChainSettings, ...], Field(min_length=1)]
    rates: tuple[RateSettings, ...] = ()

    @model_validator(mode="after")
    def _unique_chains(self) -> Settings:
        for field in ("name", "chain_id"):
            if dup := _first_duplicate([getattr(c, field) for c in self.chains]):
                raise _KeyedError(f"duplicate {field} (also chains[{dup[1]}])", "chains", dup[0], field)
        # One delivery per event and URL: the same URL twice would ask for two, with two secrets.
        if dup := _first_duplicate([w.url for w in self.webhooks]):
            raise _KeyedError(f"duplicate url (also webhooks[{dup[1]}])", "webhooks", dup[0], "url")
        # The page's listener is public: sharing the API's would expose /v1 and /metrics to payers.
        if self.checkout is not None and _split_listen(self.checkout.listen) == _split_listen(
            self.http.listen
        ):
            raise _KeyedError("must differ from http.listen (the API is not public)", "checkout", "listen")
        _check_rates(self.rates, self.chains)
        return self


def _dotted(loc: tuple[str | int, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key or "(top level)"


_PLAIN_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "too_short": "must not be empty",
    "tuple_type": "must be a list",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The settings model of the table at `loc` (`("chains", 0, "assets", 1)`), or None."""
    model: type[BaseModel] = Settings
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        inner = [
            a
            for a in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        inner += [
            b
            for a in typing.get_args(field.annotation)
            for b in typing.get_args(a)
            if isinstance(b, type) and issubclass(b, BaseModel)
        ]
        if not inner:
            return None
        model = inner[0]
    return model


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    """ "unknown key", with the nearest key the table does take when the name looks misspelt."""
    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return "unknown key"
    keys = [name for name, f in model.model_fields.items() if not f.exclude]
    close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.6)
    return f"unknown key, did you mean {close[0]!r}?" if close else "unknown key"


def _problem(err: Any) -> tuple[str, str]:
    loc, message = tuple(err["loc"]), err["msg"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, _KeyedError):
        loc, message = loc + cause.path, cause.message
    elif err["type"] == "value_error" and cause is not None:
        message = str(cause)
    elif err["type"] == "extra_forbidden":
        message = _unknown_key(loc)
    else:
        message = _PLAIN_MESSAGES.get(err["type"], message)
    return _dotted(loc), message


def _config_error(exc: ValidationError) -> ConfigError:
    """Every pydantic error as one ConfigError; input values are never copied into it."""
    errors = exc.errors(include_url=False, include_input=False)
    problems: list[tuple[str, str]] = []
    for err in errors:
        loc = tuple(err["loc"])
        # A list whose items failed is also "too short" to pydantic: the items are the news.
        if err["type"] == "too_short" and any(
            tuple(e["loc"])[: len(loc)] == loc and len(e["loc"]) > len(loc) for e in errors
        ):
            continue
        if (problem := _problem(err)) not in problems:
            problems.append(problem)
    return ConfigError(*problems[0], problems[1:])


def settings_from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Validate settings given as a dict (the parsed TOML, or built in code by the sandbox)."""
    if not isinstance(data, Mapping):
        raise ConfigError("(top level)", "must be a table of settings")
    try:
        return Settings.model_validate(dict(data), context={"env": os.environ if env is None else env})
    except ValidationError as exc:
        raise _config_error(exc) from None


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the TOML file; every failure is a ConfigError (exit 2 in the CLI)."""
    where = os.fspath(path)
    try:
        text = Path(where).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(where, "file not found") from None
    except UnicodeDecodeError:
        raise ConfigError(where, "is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(where, f"cannot read the file: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"TOML syntax error: {exc}") from None
    return settings_from_dict(data, env)


def describe(settings: Settings) -> str:
    """What the watcher would do with these settings, for `watcher check-config`.
    Shows only the names of secret-holding variables, never their values."""
    inv = settings.invoices
    lines = [
        f"database: {settings.database}",
        f"logging: {settings.log_format}, level {settings.log_level}",
        f"http: listen {settings.http.listen} (API key from ${settings.http.api_key_env}, scope write; "
        f"at most {settings.http.max_connections} connections)",
        *(f"http: API key {k.name} from ${k.key_env}, scope {k.scope}" for k in settings.http.api_keys),
        f"invoices: expire after {inv.default_expiry_minutes} min, "
        f"tolerance {inv.payment_tolerance_percent}%",
        f"retention: idempotency keys {settings.retention.idempotency_keys_hours} h, delivered events "
        f"{settings.retention.delivered_events_days} days, closed invoices watched "
        + (
            f"{settings.retention.watch_closed_invoices_days} days"
            if settings.retention.watch_closed_invoices_days
            else "forever"
        ),
    ]
    if settings.checkout is not None:
        c = settings.checkout
        lines.append(
            f"checkout: listen {c.listen}, pages at {c.public_base_url}/pay/<invoice id>"
            + (f", brand {c.brand_name!r}" if c.brand_name else "")
        )
    else:
        lines.append("checkout: none (invoices have no checkout_url)")
    for chain in settings.chains:
        lines.append(f"chain {chain.name} (chain id {chain.chain_id})")
        lines.append("  rpc: " + ", ".join(strip_credentials(u) for u in chain.rpc_urls))
        mode = f"ws {strip_credentials(chain.ws_url)}" if chain.ws_url else "polling"
        lines.append(f"  head: {mode}, poll every {chain.poll_interval_seconds:g} s")
        lines.append(
            f"  confirmations: {chain.confirmations}; start block: {chain.start_block}; "
            f"JSON-RPC batches of at most {chain.max_batch}"
        )
        if chain.deposit_xpub:
            x = chain.deposit_xpub
            lines.append(f"  deposit xpub: {x[:12]}...{x[-6:]} (address rail)")
        if chain.merchant_address:
            lines.append(f"  merchant: {to_checksum(chain.merchant_address)}")
        if chain.router_address:
            rail = "contract rail" if chain.merchant_address else "contract rail needs merchant_address too"
            lines.append(f"  router: {to_checksum(chain.router_address)} ({rail})")
        if any(a.kind == "native" for a in chain.assets):
            lines.append(
                f"  native deposits: full blocks; inner transfers (tracer): {chain.internal_transfers}"
            )
        for a in chain.assets:
            where = to_checksum(a.contract) if a.contract else "native coin"
            rate = f", usd_rate {a.usd_rate}" if a.usd_rate is not None else ", no usd_rate"
            lines.append(f"  asset {a.symbol} ({a.kind}): {where}, decimals {a.decimals}{rate}")
    lines += describe_rates(settings)
    if not settings.webhooks:
        lines.append("webhooks: none")
    for hook in settings.webhooks:
        lines.append(
            f"webhook {strip_credentials(hook.url)}: events {', '.join(hook.events)} "
            f"(secret from ${hook.secret_env})"
        )
    return "\n".join(lines)


def describe_rates(settings: Settings) -> list[str]:
    """check-config's lines for the live prices: each pair, its sources, and what each asset is
    priced with (and the invoice currencies they reach)."""
    if not settings.rates:
        return ["rates: no live prices ([[rates]]): assets quote from usd_rate or the request's quote_rates"]
    lines = []
    pairs = dict.fromkeys(r.pair for r in settings.rates)
    for pair in pairs:
        sources = [r for r in settings.rates if r.pair == pair]
        lines.append(f"rate {pair}: median of {len(sources)} source(s), refused past a 2% disagreement")
        for r in sources:
            extra = (
                f", sequencer uptime feed {to_checksum(r.sequencer_uptime_feed)}"
                if r.sequencer_uptime_feed
                else ""
            )
            path = f", json_path {r.json_path}" if r.json_path else ""
            lines.append(
                f"  {r.label()}{path}{extra}: max age {r.max_age_seconds} s, read every {r.refresh_seconds} s"
            )
    lines.append("invoice currencies: " + ", ".join(sorted(rate_graph(settings).currencies)))
    live = {r.base for r in settings.rates}
    for chain in settings.chains:
        for a in chain.assets:
            if a.symbol.upper() in live:
                lines.append(
                    f"  asset {chain.name}:{a.symbol}: live ({a.symbol.upper()} pairs; usd_rate never used)"
                )
    return lines
