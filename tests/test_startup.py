"""Start-up: the API answers before the nodes are checked, and the import stays light.

The daemon binds its listener once the config is read and the database is open; the work
that talks to the nodes (chain id, genesis, the live prices' first round) runs after, and
until it is done `/healthz` says `starting`, `/readyz` is 503 naming the step and the `/v1`
routes answer 503 with Retry-After (watcher/startup.py). How long the start takes is a
benchmark's business (`python -m bench watchset --startup-only`, BENCHMARKS.md); these tests
hold what can be held without a clock: the order of things, and what is not imported.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import aiohttp
from anvil import ROOT
from anvil_harness import DEPOSIT_MNEMONIC
from faultproxy import Fault, FaultProxy
from test_anvil_crash import operate, write_config

from watcher.addresses import account_xpub_from_mnemonic, check_xpub, to_checksum

# What `watcher run` must not import before it serves: each is loaded where it is used.
LAZY = (
    "web3",  # the price feeds' first read (watcher/chain/web3provider.py)
    "eth_account",
    "eth_abi",  # the payment page's wallet calls
    "eth_utils",
    "bip_utils",  # the first address derivation
    "apscheduler",  # once the API serves
    "jinja2",  # the payment page
    "segno",
    "swagger_ui",  # /docs reads its files, never imports it
    "eth_tester",  # the sandbox
    "eth_hash",  # keccak comes from safe-pysha3 (watcher/keccak.py)
    "Crypto",  # eth-hash's keccak backend (pycryptodome), which loads cffi and parses C at import
    "cffi",
    "rich",  # structlog's rich tracebacks, which the watcher never shows (watcher/logs.py)
)


def test_the_daemon_imports_no_heavy_library_before_it_serves():
    """`import watcher.cli, watcher.service` and a config with a deposit xpub and checksummed
    addresses, in a fresh interpreter: none of LAZY is in sys.modules, and the API's pydantic
    models are not built yet (they are at first use)."""
    xpub = account_xpub_from_mnemonic(DEPOSIT_MNEMONIC)
    script = f"""
import json, sys
import watcher.cli, watcher.service, watcher.logs
from watcher.config import settings_from_dict
from watcher import schemas
settings_from_dict(
    {{
        "database": "/tmp/unused.db",
        "http": {{"listen": "127.0.0.1:8080", "api_key_env": "K"}},
        "chains": [
            {{
                "name": "c", "chain_id": 1, "rpc_urls": ["http://127.0.0.1:1"],
                "poll_interval_seconds": 1, "confirmations": 3,
                "deposit_xpub": {xpub!r},
                "merchant_address": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
                "assets": [{{"symbol": "T", "kind": "erc20", "decimals": 6, "usd_rate": "1",
                            "contract": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"}}],
            }}
        ],
    }},
    env={{"K": "sk_" + "Zq8vT2mN4pXw7rLc9bHd3kFj6gSa1eYu"}},
)
print(json.dumps({{
    "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & set({list(LAZY)!r})),
    "models_built": schemas.Invoice.__pydantic_complete__,
}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == {"loaded": [], "models_built": False}


# The daemon as `watcher run` starts it (watcher.cli.main), in a fresh interpreter: a thread
# polls /healthz and, at the first answer, notes what the process has done so far; once the
# service has built aiohttp's TLS contexts, it notes them too and stops the daemon.
_FIRST_ANSWER_PROBE = """
import gc, importlib.metadata, json, os, signal, sys, threading, time, urllib.request

scans = []
distributions = importlib.metadata.distributions
def counted(**kwargs):
    scans.append(1)
    return distributions(**kwargs)
importlib.metadata.distributions = counted
gen2 = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and gen2.append(1))
config, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
facts = {}

def probe():
    try:
        look()
    except Exception as exc:
        facts["error"] = repr(exc)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)

def look():
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
            break
        except OSError:
            time.sleep(0.005)
    facts["at_first_answer"] = {
        "metadata_scans": len(scans),
        "full_collections": len(gen2),
        "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(LAZY)),
    }
    from watcher import clienttls
    deadline = time.monotonic() + 10
    while not clienttls.built_late() and time.monotonic() < deadline:
        time.sleep(0.01)
    import aiohttp.connector as connector
    facts["tls"] = {
        "built_late": clienttls.built_late(),
        "verified_cas": connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
        "system_cas": __import__("ssl").create_default_context().cert_store_stats()["x509_ca"],
    }

threading.Thread(target=probe, daemon=True).start()
from watcher import cli
code = cli.main(["run", "--config", config])
with open(out, "w") as f:
    json.dump({"exit": code, **facts}, f)
"""


def test_the_daemon_serves_before_the_work_it_can_do_later(tmp_path):
    """`watcher run`, up to its first answer: no scan of the installed packages' metadata
    (pydantic's and sqlite-utils' plugins, eth-hash's version), no full pass of the collector
    over what the imports made, none of LAZY (a config with checksummed addresses: keccak is
    used). The TLS contexts of aiohttp's client are built after that, from the system's CAs."""
    from anvil import free_port

    port = free_port()
    xpub = account_xpub_from_mnemonic(DEPOSIT_MNEMONIC)
    config = tmp_path / "watcher.toml"
    config.write_text(
        f"""database = "{tmp_path / "watcher.db"}"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"
api_key_env = "WATCHER_API_KEY"

[[chains]]
name = "c"
chain_id = 1
rpc_urls = ["http://127.0.0.1:1"]
poll_interval_seconds = 1
confirmations = 3
deposit_xpub = "{xpub}"
merchant_address = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"

[[chains.assets]]
symbol = "T"
kind = "erc20"
contract = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
decimals = 6
usd_rate = "1"
"""
    )
    out = tmp_path / "facts.json"
    script = f"LAZY = {list(LAZY)!r}\n" + _FIRST_ANSWER_PROBE
    env = {**os.environ, "WATCHER_API_KEY": "sk_" + "Zq8vT2mN4pXw7rLc9bHd3kFj6gSa1eYu"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(config), str(port), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    facts = json.loads(out.read_text())
    assert facts["exit"] == 0, result.stderr[-3000:]
    assert "error" not in facts
    assert facts["at_first_answer"] == {"metadata_scans": 0, "full_collections": 0, "loaded": []}
    tls = facts["tls"]
    assert tls["built_late"] is True
    assert tls["verified_cas"] == tls["system_cas"] > 0


def test_aiohttp_imported_for_the_daemon_trusts_no_certificate_until_its_contexts_are_built():
    """Until build_contexts, aiohttp's verifying context still verifies (a connection made too
    early fails its handshake; it never goes out unverified); then both are aiohttp's own."""
    script = """
import json, ssl, sys
from watcher import clienttls
clienttls.import_aiohttp()
import aiohttp.connector as c
def describe():
    v, u = c._SSL_CONTEXT_VERIFIED, c._SSL_CONTEXT_UNVERIFIED
    return [v.verify_mode == ssl.CERT_REQUIRED, v.check_hostname, v.cert_store_stats()["x509_ca"],
            u.verify_mode == ssl.CERT_NONE, u.check_hostname]
before = describe()
clienttls.build_contexts()
system = ssl.create_default_context().cert_store_stats()["x509_ca"]
print(json.dumps({"before": before, "after": describe(), "system": system}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["before"] == [True, True, 0, True, False]
    assert found["after"] == [True, True, found["system"], True, False]
    assert found["system"] > 0


def _base58check(payload: bytes) -> str:
    from bip_utils import Base58Encoder

    return Base58Encoder.CheckEncode(payload)


def _bip_utils_accepts(xpub: str) -> bool | str:
    """What bip_utils (which derives the addresses) says: True, "private", or False."""
    from bip_utils import Bip32Secp256k1

    try:
        node = Bip32Secp256k1.FromExtendedKey(xpub)
    except Exception:
        return False
    return True if node.IsPublicOnly() else "private"


def _ours(xpub: str) -> bool | str:
    try:
        check_xpub(xpub)
    except ValueError as exc:
        return "private" if "private" in str(exc) else False
    return True


def test_the_configs_xpub_check_agrees_with_bip_utils():
    """The config checks deposit_xpub without bip_utils (its import is a quarter of a second of
    start-up); what it accepts and refuses must be what bip_utils, which derives, accepts."""
    from bip_utils import Base58Decoder, Bip32Secp256k1, Bip39SeedGenerator

    good = account_xpub_from_mnemonic(DEPOSIT_MNEMONIC)
    raw = bytearray(Base58Decoder.CheckDecode(good))
    master = Bip32Secp256k1.FromSeed(Bip39SeedGenerator(DEPOSIT_MNEMONIC).Generate())
    cases = {
        "account xpub": good,
        "master xpub": master.PublicKey().ToExtended(),
        "xprv": master.PrivateKey().ToExtended(),
        "tpub version": _base58check(bytes.fromhex("043587cf") + raw[4:]),
        "bad checksum": good[:-1] + ("2" if good[-1] != "2" else "3"),
        "truncated": _base58check(bytes(raw[:-1])),
        "key prefix 04": _base58check(bytes(raw[:45]) + b"\x04" + bytes(raw[46:])),
        "depth 0 with a parent": _base58check(bytes(raw[:4]) + b"\x00" + bytes(raw[5:])),
        "not base58": good[:10] + "0OIl" + good[14:],
        "empty": "",
    }
    rng = random.Random(13)
    for i in range(40):  # x coordinates: about half are on the curve
        x = rng.getrandbits(256).to_bytes(32, "big")
        cases[f"random x {i}"] = _base58check(bytes(raw[:45]) + bytes([2 + i % 2]) + x)
    cases["x above p"] = _base58check(bytes(raw[:45]) + b"\x02" + b"\xff" * 32)
    verdicts = {name: (_ours(key), _bip_utils_accepts(key)) for name, key in cases.items()}
    assert {name: v for name, v in verdicts.items() if v[0] != v[1]} == {}
    # The cases cover each answer (not all refusals by one rule).
    assert {v[0] for v in verdicts.values()} == {True, False, "private"}
    assert sum(v[0] is True for name, v in verdicts.items() if name.startswith("random")) >= 5


def test_eip55_checksums_are_eth_utils_ones():
    from eth_utils import to_checksum_address

    rng = random.Random(55)
    for _ in range(300):
        address = "0x" + rng.getrandbits(160).to_bytes(20, "big").hex()
        assert to_checksum(address) == to_checksum_address(address)
        assert to_checksum(to_checksum_address(address)) == to_checksum_address(address)


async def test_the_api_answers_while_a_slow_node_is_checked_and_serves_once_it_answers(anvil_node, tmp_path):
    """The real daemon, its node behind a proxy that holds eth_chainId for 3 s at start-up.
    Meanwhile the API answers: /healthz 200 `starting`, /readyz 503 naming the check it waits
    for, a /v1 route 503 problem+json with Retry-After (and creates nothing). Once the node
    answers: READY, /readyz 200, invoices created. Without the early listener, the first
    answer came only after the check: nothing answered `starting`."""
    node = anvil_node()
    op = await operate(node, tmp_path)
    proxy = FaultProxy(node.url)
    await proxy.start()
    try:
        write_config(
            op.config,
            database=op.database,
            listen=op.listen,
            webhook_url=op.receiver.url,
            chain=op.chain,
            rpc_urls=[proxy.url],
        )
        proxy.inject(Fault("timeout", method="eth_chainId", times=1, delay=3.0))
        base = op.daemon.base_url
        log = op.daemon.spawn()
        health = await _first_health(op.http, base, op.daemon, log, past=CA_STEP)
        assert health == {
            "status": "starting",
            "waiting_for": "checking the nodes of anvil0: chain id and genesis",
        }
        deadline = time.monotonic() + 10  # its first question, held (it may be on its way still)
        while proxy.injected[("timeout", "eth_chainId")] == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert proxy.injected[("timeout", "eth_chainId")] == 1

        async with op.http.get(base + "/readyz") as r:
            assert r.status == 503
            body = await r.json()
        assert body["reasons"][0] == {
            "check": "start-up",
            "reason": "starting: checking the nodes of anvil0: chain id and genesis",
        }
        for method, path, kwargs in (
            ("GET", "/v1/invoices", {}),
            ("POST", "/v1/invoices", {"json": {"amount": "10", "assets": ["TUSD"]}}),
            ("GET", "/v1/chains", {}),
        ):
            async with op.http.request(method, base + path, **kwargs) as r:
                assert r.status == 503, (path, r.status, await r.text())
                assert r.headers["Retry-After"] == "1"
                assert r.content_type == "application/problem+json"
                problem = await r.json()
            assert problem["type"] == "urn:watcher:problem:starting"
            assert "checking the nodes of anvil0" in problem["detail"]
        async with op.http.get(base + "/metrics") as r:
            assert r.status == 200  # monitoring reads the daemon while it starts

        # The node answers after its 3 s: the start-up ends and everything serves.
        deadline = time.monotonic() + 60
        while True:
            async with op.http.get(base + "/readyz") as r:
                if r.status == 200:
                    break
                reasons = (await r.json())["reasons"]
            assert time.monotonic() < deadline, reasons
            await asyncio.sleep(0.1)
        async with op.http.get(base + "/healthz") as r:
            assert await r.json() == {"status": "ok"}
        invoice = await op.api("POST", "/v1/invoices", json={"amount": "10", "assets": ["TUSD"]})
        listed = await op.api("GET", "/v1/invoices")
        assert [i["id"] for i in listed["data"]] == [invoice["id"]]  # the refused POST made none
        assert "watcher_started" in log.read_text()
        assert op.daemon.terminate() == 0
    finally:
        await op.close()
        await proxy.close()


# The step before the nodes' checks (aiohttp's TLS contexts, built once the API serves): a
# few tens of milliseconds, which an early /healthz may see.
CA_STEP = "reading the system's CA certificates (TLS to the nodes and endpoints)"


async def _first_health(http: aiohttp.ClientSession, base: str, daemon, log, past: str | None = None) -> dict:
    """/healthz's first 200 body (the daemon spawned just before) that does not wait for `past`."""
    deadline = time.monotonic() + 30
    while True:
        assert daemon.process.poll() is None, log.read_text()[-3000:]
        try:
            async with http.get(base + "/healthz") as r:
                if r.status == 200:
                    body = await r.json()
                    if past is None or body.get("waiting_for") != past:
                        return body
        except aiohttp.ClientError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.02)
