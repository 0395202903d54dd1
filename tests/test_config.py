"""Config validation: the example loads, and every mistake names its key."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from watcher.config import ConfigError, describe, load_settings, settings_from_dict, strip_credentials

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "watcher.example.toml"
API_KEY = "test-api-key-0123456789abcdefGHIJKL"
HOOK_SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
ENV = {"WATCHER_API_KEY": API_KEY, "WATCHER_WEBHOOK_SECRET": HOOK_SECRET}
XPUB = (
    "xpub6Ce9NcJvTk36xtLSrJLZqE7wtgA5deCeYs7rSQtreh4cj6ByPtrg9sD7V2FNFLPnf8heNP3FGkeV9qwf"
    "zvZNSd54JoNXVsXFYSYwHsnJxqP"
)
USDT = "0xdAC17F958D2ee523a2206206994597C13D831ec7"


def base() -> dict[str, Any]:
    return {
        "database": ":memory:",
        "http": {"listen": "127.0.0.1:8080"},
        "webhooks": [{"url": "https://shop.example/hook", "secret_env": "WATCHER_WEBHOOK_SECRET"}],
        "chains": [
            {
                "name": "ethereum",
                "chain_id": 1,
                "rpc_urls": ["https://rpc.example"],
                "poll_interval_seconds": 2.0,
                "confirmations": 12,
                "deposit_xpub": XPUB,
                "assets": [
                    {"symbol": "USDT", "kind": "erc20", "contract": USDT, "decimals": 6, "usd_rate": "1"},
                    {"symbol": "ETH", "kind": "native"},
                ],
            }
        ],
    }


def test_example_file_loads() -> None:
    s = load_settings(EXAMPLE, env=ENV)
    assert s.http.api_key == API_KEY and s.webhooks[0].secret == HOOK_SECRET
    eth = s.chains[0]
    assert eth.name == "ethereum" and eth.chain_id == 1 and eth.confirmations == 12
    assert eth.assets[0].contract == USDT.lower() and eth.assets[0].usd_rate == Decimal("1")
    assert eth.assets[2].kind == "native" and eth.assets[2].decimals == 18
    assert s.chains[1].confirmations == "finalized" and eth.start_block == "latest"
    assert (s.http.host, s.http.port) == ("127.0.0.1", 8080)


def test_base_dict_is_valid_and_frozen() -> None:
    s = settings_from_dict(base(), env=ENV)
    assert s.chains[0].assets[1].decimals == 18
    with pytest.raises(ValidationError):
        s.database = "other"  # type: ignore[misc]


def test_ipv6_listen() -> None:
    data = base()
    data["http"]["listen"] = "[::1]:9000"
    http = settings_from_dict(data, env=ENV).http
    assert (http.host, http.port) == ("::1", 9000)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets a dotted path like 'chains.0.assets.1.contract' (None deletes,
    an index one past a list's end appends)."""

    def apply(data: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        node: Any = data
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(value)
        else:
            node[last] = value

    return apply


def _dup_chain(data: dict[str, Any]) -> None:
    other = copy.deepcopy(data["chains"][0])
    other["chain_id"] = 10
    data["chains"].append(other)


def _dup_symbol(data: dict[str, Any]) -> None:
    data["chains"][0]["assets"].append(
        {"symbol": "usdt", "kind": "erc20", "contract": "0x" + "ab" * 20, "decimals": 6}
    )


CASES: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown top-level key", _set("colour", "blue"), "colour"),
    ("unknown chain key", _set("chains.0.rpc_url", "https://x.example"), "chains[0].rpc_url"),
    ("unknown asset key", _set("chains.0.assets.0.address", USDT), "chains[0].assets[0].address"),
    ("bad address", _set("chains.0.assets.0.contract", "0x1234"), "chains[0].assets[0].contract"),
    (
        "bad checksum",
        _set("chains.0.assets.0.contract", "0xDac17F958D2ee523a2206206994597C13D831ec7"),
        "chains[0].assets[0].contract",
    ),
    ("bad merchant", _set("chains.0.merchant_address", "0xzz"), "chains[0].merchant_address"),
    ("duplicate symbol", _dup_symbol, "chains[0].assets[2].symbol"),
    ("duplicate chain name", _dup_chain, "chains[1].name"),
    ("float usd_rate", _set("chains.0.assets.0.usd_rate", 1.0), "chains[0].assets[0].usd_rate"),
    ("zero usd_rate", _set("chains.0.assets.0.usd_rate", "0"), "chains[0].assets[0].usd_rate"),
    ("erc20 without contract", _set("chains.0.assets.0.contract", None), "chains[0].assets[0].contract"),
    ("native with contract", _set("chains.0.assets.1.contract", USDT), "chains[0].assets[1].contract"),
    ("confirmations 0", _set("chains.0.confirmations", 0), "chains[0].confirmations"),
    ("confirmations soon", _set("chains.0.confirmations", "soon"), "chains[0].confirmations"),
    ("bad chain name", _set("chains.0.name", "Ethereum Main"), "chains[0].name"),
    ("bad rpc url", _set("chains.0.rpc_urls", ["https://ok.example", "ftp://x"]), "chains[0].rpc_urls[1]"),
    ("no rpc urls", _set("chains.0.rpc_urls", []), "chains[0].rpc_urls"),
    ("http ws_url", _set("chains.0.ws_url", "https://x.example"), "chains[0].ws_url"),
    ("bad xpub", _set("chains.0.deposit_xpub", "xpub123"), "chains[0].deposit_xpub"),
    ("bad listen", _set("http.listen", "localhost"), "http.listen"),
    ("listen port range", _set("http.listen", "127.0.0.1:70000"), "http.listen"),
    ("api_key in file", _set("http.api_key", API_KEY), "http.api_key"),
    ("secret in file", _set("webhooks.0.secret", HOOK_SECRET), "webhooks[0].secret"),
    ("unknown event", _set("webhooks.0.events", ["*", "invoice.payed"]), "webhooks[0].events[1]"),
    (
        "same webhook url twice",
        _set("webhooks", [{"url": "https://shop.example/hook", "secret_env": "WATCHER_WEBHOOK_SECRET"}] * 2),
        "webhooks[1].url",
    ),
    (
        "bad tolerance",
        _set("invoices", {"payment_tolerance_percent": "101"}),
        "invoices.payment_tolerance_percent",
    ),
    (
        "tolerance of the whole amount",
        _set("invoices", {"payment_tolerance_percent": "100"}),
        "invoices.payment_tolerance_percent",
    ),
    ("no chains", _set("chains", []), "chains"),
    ("http not a table", _set("http", "127.0.0.1:8080"), "http"),
    (
        "second native coin",
        _set("chains.0.assets.2", {"symbol": "WETH", "kind": "native"}),
        "chains[0].assets[2].kind",
    ),
]


@pytest.mark.parametrize(("mutate", "key"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_settings_name_the_key(mutate: Callable[[dict[str, Any]], None], key: str) -> None:
    data = base()
    mutate(data)
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data, env=ENV)
    assert info.value.key == key, str(info.value)
    assert str(info.value) == f"{key}: {info.value.message}"


def test_float_usd_rate_says_quote_it() -> None:
    data = base()
    data["chains"][0]["assets"][0]["usd_rate"] = 1.05
    with pytest.raises(ConfigError, match="quoted"):
        settings_from_dict(data, env=ENV)


@pytest.mark.parametrize(
    ("env", "key", "variable"),
    [
        ({"WATCHER_WEBHOOK_SECRET": HOOK_SECRET}, "http.api_key_env", "WATCHER_API_KEY"),
        ({"WATCHER_API_KEY": API_KEY}, "webhooks[0].secret_env", "WATCHER_WEBHOOK_SECRET"),
        (
            {**ENV, "WATCHER_WEBHOOK_SECRET": base64.b64encode(bytes(32)).decode()},
            "webhooks[0].secret_env",
            "WATCHER_WEBHOOK_SECRET",
        ),
        (
            {**ENV, "WATCHER_WEBHOOK_SECRET": "whsec_" + base64.b64encode(bytes(8)).decode()},
            "webhooks[0].secret_env",
            "WATCHER_WEBHOOK_SECRET",
        ),
        ({**ENV, "WATCHER_API_KEY": "short"}, "http.api_key_env", "WATCHER_API_KEY"),
    ],
    ids=[
        "api key missing",
        "webhook secret missing",
        "secret without whsec_",
        "secret too short",
        "api key too short",
    ],
)
def test_secret_env_problems(env: dict[str, str], key: str, variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(base(), env=env)
    assert info.value.key == key
    assert variable in info.value.message
    assert API_KEY not in str(info.value) and "short" not in str(info.value)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "watcher.toml"
    path.write_text(text)
    return path


def test_api_key_written_in_toml_file(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace('api_key_env = "WATCHER_API_KEY"', f'api_key = "{API_KEY}"')
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text), env=ENV)
    assert info.value.key == "http.api_key" and "environment" in info.value.message


def test_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = _write(tmp_path, 'database = "x"\nlog_level = \n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env=ENV)
    assert info.value.key == str(path) and "line 2" in info.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "nope.toml", env=ENV)
    assert info.value.key == str(tmp_path / "nope.toml") and "not found" in info.value.message


def test_private_xpub_rejected() -> None:
    from bip_utils import Bip39SeedGenerator, Bip44, Bip44Coins

    seed = Bip39SeedGenerator("test test test test test test test test test test test junk").Generate()
    xprv = Bip44.FromSeed(seed, Bip44Coins.ETHEREUM).Purpose().Coin().Account(0).PrivateKey().ToExtended()
    data = base()
    data["chains"][0]["deposit_xpub"] = xprv
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data, env=ENV)
    assert info.value.key == "chains[0].deposit_xpub" and xprv not in str(info.value)


def test_addresses_stored_lowercase() -> None:
    data = base()
    data["chains"][0]["merchant_address"] = USDT.upper().replace("0X", "0x")
    s = settings_from_dict(data, env=ENV)
    assert s.chains[0].merchant_address == USDT.lower()


def test_describe_hides_secrets_and_credentials() -> None:
    data = base()
    data["chains"][0]["rpc_urls"] = ["https://alice:hunter2@rpc.example/v2/abcDEF0123456789xyzABC99"]
    s = settings_from_dict(data, env=ENV)
    text = describe(s)
    for secret in (API_KEY, HOOK_SECRET, "hunter2", "alice", "abcDEF0123456789xyzABC99"):
        assert secret not in text
    assert "https://rpc.example/v2/***" in text and "ethereum" in text and "USDT" in text
    assert USDT in text and "https://shop.example/hook" in text
    assert API_KEY not in repr(s) and HOOK_SECRET not in repr(s)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pass@rpc.example:8545/", "https://rpc.example:8545/"),
        ("https://rpc.example/", "https://rpc.example/"),
        (
            "wss://mainnet.infura.io/ws/v3/0123456789abcdef0123456789abcdef",
            "wss://mainnet.infura.io/ws/v3/***",
        ),
        ("https://rpc.example/?apikey=s3cret&chain=1", "https://rpc.example/?apikey=***&chain=1"),
    ],
)
def test_strip_credentials(url: str, expected: str) -> None:
    assert strip_credentials(url) == expected


@pytest.mark.parametrize("rate", ["1e999999999", "1e-999999999", "1_000", "\u0661", "0", "1e13"])
def test_a_usd_rate_that_cannot_quote_is_refused_naming_the_key(rate):
    """Quoting is exact: a rate of a billion digits would stall every create, and "1_000" or
    another script's digits are not what an operator means by a decimal."""
    data = base()
    data["chains"][0]["assets"][0]["usd_rate"] = rate
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(data, env=ENV)
    assert refused.value.key == "chains[0].assets[0].usd_rate"


@pytest.mark.parametrize(
    "url",
    [
        "https://shop.example/hook",
        "http://127.0.0.1:9000/hook",
        "http://localhost/hook",
        "http://[::1]:8000/h",
        "http://127.8.9.10/hook",
        "HTTPS://shop.example/hook",
    ],
)
def test_a_webhook_url_is_https_or_a_loopback_host(url: str) -> None:
    data = base()
    data["webhooks"][0]["url"] = url
    assert settings_from_dict(data, env=ENV).webhooks[0].url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://shop.example/hook",
        "http://10.0.0.5/hook",
        "http://localhost.shop.example/hook",
        "http://[::2]/hook",
        "ftp://shop.example/hook",
    ],
)
def test_plain_http_to_another_host_is_refused_saying_why(url: str) -> None:
    data = base()
    data["webhooks"][0]["url"] = url
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(data, env=ENV)
    assert refused.value.key == "webhooks[0].url"
    if url.startswith("http:"):
        assert "https" in refused.value.message and "loopback" in refused.value.message
    assert url not in str(refused.value)  # a URL may hold credentials: never echoed


def test_several_webhook_secrets_while_rotating() -> None:
    new = "whsec_" + base64.b64encode(b"\x07" * 32).decode()
    s = settings_from_dict(base(), env={**ENV, "WATCHER_WEBHOOK_SECRET": f"{HOOK_SECRET}  {new}"})
    assert s.webhooks[0].secret.split() == [HOOK_SECRET, new]


@pytest.mark.parametrize(
    "value",
    [
        f"{HOOK_SECRET} whsec_short",
        f"{HOOK_SECRET} {HOOK_SECRET}",
        " ",
        " ".join([HOOK_SECRET[:-4] + f"{i:03d}=" for i in range(6)]),
    ],
)
def test_a_bad_secret_among_several_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(base(), env={**ENV, "WATCHER_WEBHOOK_SECRET": value})
    assert refused.value.key == "webhooks[0].secret_env"
    assert HOOK_SECRET not in str(refused.value)


READ_KEY = "rk_" + "Zq8Xw2Lm5Np9Rt3Vb7Hc1Jd4Kf6Gs0Ya"


def with_keys(*keys: dict) -> dict[str, Any]:
    data = base()
    data["http"]["api_keys"] = list(keys)
    return data


def test_named_keys_with_scopes_and_a_connection_limit() -> None:
    data = with_keys({"name": "dashboard", "key_env": "READ_KEY", "scope": "read"})
    data["http"]["max_connections"] = 50
    s = settings_from_dict(data, env={**ENV, "READ_KEY": READ_KEY})
    [key] = s.http.api_keys
    assert (key.name, key.scope, key.key) == ("dashboard", "read", READ_KEY)
    assert s.http.max_connections == 50 and settings_from_dict(base(), env=ENV).http.max_connections == 1000
    text = describe(s)
    assert (
        "API key dashboard from $READ_KEY, scope read" in text
        and READ_KEY not in text
        and API_KEY not in text
    )
    assert READ_KEY not in repr(s)


@pytest.mark.parametrize(
    "value",
    [
        "a" * 40,  # one character
        "k3y" * 14,  # a pattern repeated
        "sk_live_" + "0123" * 8,  # a prefix and a pattern: four different characters
        "sk_test_0123456789abcdef",  # 24 characters
        "Zq8Xw2Lm5Np9Rt3Vb7Hc1Jd4Kf6Gs0Y",  # 31 characters
        "Zq8Xw2Lm5Np9 t3Vb7Hc1Jd4Kf6Gs0Ya",  # a space
        "Zq8Xw2Lm5Np9Rt3Vb7Hc1Jd4Kf6Gs0Yä",  # not ASCII
    ],
)
@pytest.mark.parametrize("where", ["api_key_env", "api_keys"])
def test_a_short_or_predictable_key_is_refused(value: str, where: str) -> None:
    if where == "api_key_env":
        data, env, key = base(), {**ENV, "WATCHER_API_KEY": value}, "http.api_key_env"
    else:
        data = with_keys({"name": "dashboard", "key_env": "READ_KEY", "scope": "read"})
        env, key = {**ENV, "READ_KEY": value}, "http.api_keys[0].key_env"
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(data, env=env)
    assert refused.value.key == key
    assert "32" in refused.value.message and value not in str(refused.value)


@pytest.mark.parametrize(
    ("keys", "env", "key", "words"),
    [
        (
            [
                {"name": "a", "key_env": "READ_KEY", "scope": "read"},
                {"name": "a", "key_env": "K2", "scope": "write"},
            ],
            {"K2": READ_KEY[::-1]},
            "http.api_keys[1].name",
            "duplicate name",
        ),
        (
            [{"name": "a", "key_env": "WATCHER_API_KEY", "scope": "read"}],
            {},
            "http.api_keys[0].key_env",
            "same key",
        ),
        (
            [
                {"name": "a", "key_env": "READ_KEY", "scope": "read"},
                {"name": "b", "key_env": "READ_KEY", "scope": "write"},
            ],
            {},
            "http.api_keys[1].key_env",
            "same key",
        ),
        ([{"name": "a", "key_env": "READ_KEY", "scope": "admin"}], {}, "http.api_keys[0].scope", ""),
        ([{"name": "a", "key_env": "NOPE", "scope": "read"}], {}, "http.api_keys[0].key_env", "not set"),
        (
            [{"name": "a", "key": READ_KEY, "scope": "read"}],
            {},
            "http.api_keys[0].key",
            "never live in the file",
        ),
    ],
)
def test_api_keys_mistakes_name_their_key(keys, env, key, words) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_from_dict(with_keys(*keys), env={**ENV, "READ_KEY": READ_KEY, **env})
    assert refused.value.key == key and words in refused.value.message
    assert READ_KEY not in str(refused.value)


def test_max_connections_is_a_positive_integer() -> None:
    for value in (0, -1, "10", 1.5):
        data = base()
        data["http"]["max_connections"] = value
        with pytest.raises(ConfigError) as refused:
            settings_from_dict(data, env=ENV)
        assert refused.value.key == "http.max_connections"


def test_every_mistake_is_reported_at_once_and_a_misspelt_key_gets_a_suggestion():
    data = base()
    data["log_levle"] = "info"  # misspelt top-level key
    data["http"]["listen"] = "nope"  # bad value
    chain = data["chains"][0]
    chain["confirmation"] = chain.pop("confirmations")  # misspelt, so the real one is missing
    chain["merchant_address"] = "0x123"  # bad address
    chain["assets"][0]["usd_rat"] = chain["assets"][0].pop("usd_rate")
    chain["assets"][1]["colour"] = "blue"  # unknown, nothing close
    with pytest.raises(ConfigError) as caught:
        settings_from_dict(data, ENV)
    problems = dict(caught.value.problems)
    assert problems == {
        "log_levle": "unknown key, did you mean 'log_level'?",
        "http.listen": "must be HOST:PORT, e.g. 127.0.0.1:8080 or [::1]:8080",
        "chains[0].confirmation": "unknown key, did you mean 'confirmations'?",
        "chains[0].confirmations": "required key is missing",
        "chains[0].merchant_address": "must be a 0x-prefixed 40-digit hex address",
        "chains[0].assets[0].usd_rat": "unknown key, did you mean 'usd_rate'?",
        "chains[0].assets[1].colour": "unknown key",
    }
    assert str(caught.value).count("\n") == len(problems) - 1, "one line per problem"
    # The first problem stays the error's key and message (what a reload logs).
    assert (caught.value.key, caught.value.message) == caught.value.problems[0]
    # A secret never appears, nor a value from the file.
    assert "nope" not in str(caught.value) and API_KEY not in str(caught.value)


def test_the_command_line_prints_every_problem_on_its_own_line(tmp_path):
    import subprocess
    import sys

    text = (
        EXAMPLE.read_text()
        .replace("log_level = ", "log_levl = ", 1)
        .replace("confirmations = 12", "confirmations = 0", 1)
    )
    text = text.replace("decimals = 6\nusd_rate", "decimal = 6\nusd_rate", 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "watcher.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV | {"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert "watcher: configuration error: log_levl: unknown key, did you mean 'log_level'?" in lines
    assert any(line.startswith("watcher: configuration error: chains[0].confirmations:") for line in lines)
    assert (
        "watcher: configuration error: chains[0].assets[0].decimal: unknown key, did you mean 'decimals'?"
        in lines
    )
