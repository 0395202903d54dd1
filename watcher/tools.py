"""The operator's commands besides `run`: `xpub`, `addresses`, `router-deploy-tx`, `balances`,
and the node checks of `check-config`. Each prints for a person and exits 0, 2 (bad input
or configuration) or 1 (anything else, said in one line)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import IO

from bip_utils import Bip39MnemonicValidator

from .addresses import AddressDeriver, account_xpub_from_mnemonic, parse_xpub, to_checksum
from .chain import HttpTransport, RpcError
from .config import ChainSettings, ConfigError, Settings, load_settings, strip_credentials
from .contracts import load_artifact
from .domain import format_units

NETWORK_WARNING = (
    "warning: this machine is connected to a network. A mnemonic typed on a networked machine can\n"
    "be stolen (malware, clipboard, shell history of a mistyped command). For real money, run\n"
    "`watcher xpub` on an offline machine and carry only the xpub (it can receive, never spend).\n"
)


class ToolError(Exception):
    """A problem the operator must fix, said in one line (exit 2)."""


# --------------------------------------------------------------------------- xpub


def has_network() -> bool:
    """True when the machine can route to a public address (IPv4 or IPv6). A UDP socket's
    connect() only looks up the route; nothing is sent."""
    for family, address in ((socket.AF_INET, ("192.0.2.1", 9)), (socket.AF_INET6, ("2001:db8::1", 9))):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(address)
                local = s.getsockname()[0]
        except OSError:
            continue
        if not local.startswith("127.") and local != "::1":
            return True
    return False


def read_secret_line(stream: IO[str], prompt: str) -> str:
    """One line of a secret from standard input: prompted without echo on a terminal, read as
    is from a pipe or file. Never from argv or the environment (both are visible to other
    processes and end up in shell histories and logs)."""
    if stream.isatty():
        return getpass.getpass(prompt)
    line = stream.readline()
    return line.rstrip("\r\n")


def xpub_from_stdin(stream: IO[str], *, account: int = 0, passphrase: bool = False) -> tuple[str, str]:
    """(account xpub, first deposit address) for the mnemonic on `stream`."""
    words = " ".join(read_secret_line(stream, "BIP-39 mnemonic (not echoed): ").split()).lower()
    if not words:
        raise ToolError("no mnemonic on standard input")
    if not Bip39MnemonicValidator().IsValid(words):
        count = len(words.split())
        raise ToolError(
            f"that is not a valid BIP-39 mnemonic ({count} words; a word is misspelt, "
            "missing or out of order, or the checksum does not match)"
        )
    secret = read_secret_line(stream, "BIP-39 passphrase (not echoed): ") if passphrase else ""
    xpub = account_xpub_from_mnemonic(words, account, passphrase=secret)
    return xpub, AddressDeriver(xpub).derive(0)


def run_xpub(
    account: int,
    passphrase: bool,
    *,
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    network: Callable[[], bool] = has_network,
) -> int:
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    if network():
        err.write(NETWORK_WARNING)
    xpub, first = xpub_from_stdin(stdin, account=account, passphrase=passphrase)
    out.write(xpub + "\n")
    err.write(
        f"account m/44'/60'/{account}'; its first deposit address, m/44'/60'/{account}'/0/0, "
        f"is {to_checksum(first)}: check it in your wallet\n"
    )
    return 0


# --------------------------------------------------------------------------- addresses


def account_path(xpub: str) -> str:
    """`m/44'/60'/N'` for an account-level xpub, else the xpub's own text (shortened)."""
    node = parse_xpub(xpub)
    index = node.Index()
    if node.Depth().ToInt() == 3 and index.IsHardened():
        return f"m/44'/60'/{index.ToInt() - 2**31}'"
    return f"{xpub[:12]}...{xpub[-6:]}"


def deposit_addresses(
    settings: Settings, count: int, chain: str | None = None
) -> Iterator[tuple[str, str, str]]:
    """(chain name, derivation path, EIP-55 address) of the first `count` deposit addresses."""
    chains = [c for c in settings.chains if chain is None or c.name == chain]
    if chain is not None and not chains:
        known = ", ".join(c.name for c in settings.chains)
        raise ToolError(f"--chain {chain}: no such chain in the config (chains: {known})")
    with_xpub = [c for c in chains if c.deposit_xpub]
    if not with_xpub:
        raise ToolError("no chain of the config has a deposit_xpub (the address rail needs one)")
    for c in with_xpub:
        assert c.deposit_xpub is not None
        deriver, base = AddressDeriver(c.deposit_xpub), account_path(c.deposit_xpub)
        for i in range(count):
            yield c.name, f"{base}/0/{i}", to_checksum(deriver.derive(i))


class _NoSecretsNeeded(Mapping[str, str]):
    """The environment, with a stand-in for each secret that is not set: commands that never
    use the API key or a webhook secret should not demand them."""

    # Valid as an API key (32+ characters, not a pattern) and as a webhook secret; never used.
    STAND_IN = (
        "whsec_" + base64.b64encode(hashlib.sha256(b"watcher: no secret needed here").digest()).decode()
    )

    def __getitem__(self, name: str) -> str:
        return os.environ.get(name, self.STAND_IN)

    def get(self, name: str, default: object = None) -> str:
        return self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(os.environ)

    def __len__(self) -> int:
        return len(os.environ)


def load_without_secrets(path: str) -> Settings:
    return load_settings(path, env=_NoSecretsNeeded())


def run_addresses(path: str, count: int, chain: str | None, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    settings = load_without_secrets(path)
    rows = list(deposit_addresses(settings, count, chain))
    width = max(len(r[0]) for r in rows)
    pwidth = max(len(r[1]) for r in rows)
    for name, path_, address in rows:
        out.write(f"{name:<{width}}  {path_:<{pwidth}}  {address}\n")
    return 0


# --------------------------------------------------------------------------- router


def router_creation_data() -> str:
    """The PaymentRouter's creation bytecode (its constructor takes no arguments)."""
    return load_artifact("PaymentRouter")["bytecode"]


def run_router_deploy_tx(out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    out, err = out or sys.stdout, err or sys.stderr
    out.write(router_creation_data() + "\n")
    err.write(
        "Send this as the data of a contract-creation transaction (no `to`, value 0) from any funded\n"
        'account, e.g. `cast send --rpc-url $RPC --ledger --create "$(watcher router-deploy-tx)"`.\n'
        "Set chains[].router_address to the contract address in its receipt; `watcher check-config`\n"
        "then checks that the address holds this router's code.\n"
    )
    return 0


async def _code_at(chain: ChainSettings, address: str) -> str | None:
    """The code at `address`, from the first of the chain's rpc_urls that answers; None if none does."""
    for url in chain.rpc_urls:
        transport = HttpTransport(url, timeout=5.0, retry_delays=(0.2,))
        try:
            code = await transport.call("eth_getCode", [address, "latest"])
            if isinstance(code, str):
                return code.lower()
        except RpcError:
            continue
        finally:
            await transport.close()
    return None


async def check_routers(settings: Settings) -> list[str]:
    """One line per configured router_address; raises ConfigError for one that does not hold
    our PaymentRouter's runtime code."""
    expected = load_artifact("PaymentRouter")["deployedBytecode"].lower()
    lines = []
    for i, chain in enumerate(settings.chains):
        if chain.router_address is None:
            continue
        key = f"chains[{i}].router_address"
        code = await _code_at(chain, chain.router_address)
        if code is None:
            lines.append(
                f"warning: {key} not checked: no rpc_url of chain {chain.name} answered "
                f"({', '.join(strip_credentials(u) for u in chain.rpc_urls)})"
            )
        elif code in ("0x", "0x0", ""):
            raise ConfigError(
                key,
                f"holds no contract on chain {chain.name} (not deployed there, or another chain's address)",
            )
        elif code != expected:
            raise ConfigError(
                key,
                f"holds a contract on chain {chain.name} that is not the watcher's PaymentRouter "
                "(its code differs; deploy the router with `watcher router-deploy-tx`)",
            )
        else:
            router = to_checksum(chain.router_address)
            lines.append(f"chain {chain.name}: router {router} holds the PaymentRouter's code")
    return lines


# --------------------------------------------------------------------------- balances


def fetch_balances(settings: Settings, timeout: float = 60.0) -> list[dict]:
    """Every page of the running watcher's GET /v1/deposit-balances."""
    host, port = settings.http.host, settings.http.port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # a wildcard listener answers on loopback
    base = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1/deposit-balances"
    rows: list[dict] = []
    while True:
        request = urllib.request.Request(
            f"{base}?limit=200&offset={len(rows)}",
            headers={"Authorization": f"Bearer {settings.http.api_key}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                page = json.loads(r.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            with contextlib.suppress(ValueError):  # not a problem document: the text as it came
                detail = json.loads(detail).get("detail", detail)
            raise RuntimeError(f"the watcher answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RuntimeError(
                f"cannot reach the watcher's API at {base} (is it running?): {getattr(exc, 'reason', exc)}"
            ) from None
        rows.extend(page["data"])
        if not page["data"] or len(rows) >= page["total"]:
            return rows


def format_balances(rows: list[dict], settings: Settings) -> str:
    if not rows:
        return "no deposit address holds funds"
    coin = {c.name: next((a for a in c.assets if a.kind == "native"), None) for c in settings.chains}
    table = [("network", "index", "address", "asset", "amount", "gas (coin)")]
    for r in rows:
        native = coin.get(r["network"])
        gas = format_units(int(r["native_balance_atomic"]), native.decimals if native else 18)
        table.append((r["network"], str(r["derivation_index"]), r["address"], r["asset"], r["amount"], gas))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in table
    )


def run_balances(path: str, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    settings = load_settings(path)
    out.write(format_balances(fetch_balances(settings), settings) + "\n")
    return 0


def run_check_config(
    path: str, describe: Callable[[Settings], str], *, offline: bool, out: IO[str] | None = None
) -> int:
    out = out or sys.stdout
    settings = load_settings(path)
    text = describe(settings)
    if not offline:
        extra = asyncio.run(check_routers(settings))
        if extra:
            text += "\n" + "\n".join(extra)
    out.write(text + "\n")
    return 0
