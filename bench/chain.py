"""The benchmark chain: built once per profile on anvil, dumped, and loaded from the cache.

Every profile's chain holds BLOCKS blocks of TRANSFERS_PER_BLOCK ERC-20 transfers (each its
own transaction, as most transfers are on a real chain) of two TestToken deployments, and
NATIVE_TRANSFERS plain coin transfers. A profile says which share of the token transfers go
to our deposit addresses and how many invoices there are. Every choice comes from a seeded
`random.Random` and block times are fixed, so a rebuild gives the same blocks.

Our deposit addresses are `AddressDeriver(XPUB).derive(i)` for i < invoices: a fresh store
that creates that many invoices, one token option each, gets exactly these addresses (indexes
are allocated 0, 1, 2... in creation order). Invoice i is in token `i % 2`. The transfers to
us go to the first `paid` addresses in a shuffled round-robin, so each gets the same number
(1% and 100%: exactly one payment per paid invoice), always in the invoice's token. The
other transfers, and the coin transfers, go to OTHER_ADDRESSES addresses that are nobody's.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector, keccak

from tests.anvil import ANVIL, Anvil
from watcher.addresses import AddressDeriver, account_xpub_from_mnemonic
from watcher.contracts import load_artifact

# Kept between runs; BENCH_CACHE moves it (as for bench/watchset.py), e.g. to share one between checkouts.
CACHE = Path(os.environ.get("BENCH_CACHE") or Path(__file__).resolve().parent / ".cache")
FORMAT = 2  # bump when the way a chain is built changes: old caches are rebuilt

SEED = 5
BLOCKS = 2000
TRANSFERS_PER_BLOCK = 25
NATIVE_TRANSFERS = 300
OTHER_ADDRESSES = 20_000
DECIMALS = 6
GENESIS_TIME = 1_700_000_000  # block times are fixed: genesis + 12 s per block
BLOCK_INTERVAL = 12
# Not anvil's mnemonic: no deposit address is a funded dev account.
MNEMONIC = "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about"
XPUB = account_xpub_from_mnemonic(MNEMONIC)
PAYERS = 10  # anvil's dev accounts send everything
ANVIL_VERSION = subprocess.run([ANVIL, "--version"], capture_output=True, text=True).stdout.split("\n")[0]


@dataclass(frozen=True)
class Profile:
    name: str
    share: float  # of the token transfers that go to our deposit addresses
    invoices: int  # open invoices, one deposit address each
    paid: int  # how many of them (the first ones) receive the transfers to us


PROFILES = {
    # 500 of 2,000 invoices paid once each: with only those 500 (under the follower's topic
    # filter limit of 1,000) the node filters by recipient, so that is run too.
    "1%": Profile("1%", 0.01, invoices=2000, paid=500),
    "100%": Profile("100%", 1.0, invoices=50_000, paid=50_000),  # every transfer pays one invoice
    # Not run by default: 25 payments on each invoice (each payment_detected carries them all).
    "100%x25": Profile("100%x25", 1.0, invoices=2000, paid=2000),
}
DEFAULT_PROFILES = ("1%", "100%")


@dataclass(frozen=True)
class Transfer:
    token: int | None  # 0 or 1; None for the coin
    payer: int
    to: str
    value: int


def params(profile: Profile) -> dict[str, Any]:
    return {
        "format": FORMAT,
        **asdict(profile),
        "seed": SEED,
        "blocks": BLOCKS,
        "transfers_per_block": TRANSFERS_PER_BLOCK,
        "native_transfers": NATIVE_TRANSFERS,
        "other_addresses": OTHER_ADDRESSES,
        "xpub": XPUB,
        "anvil": ANVIL_VERSION,
    }


def cache_paths(profile: Profile) -> dict[str, Path]:
    """The metadata, our deposit addresses, and anvil's state (gzipped) of a profile's chain."""
    key = hashlib.sha256(json.dumps(params(profile), sort_keys=True).encode()).hexdigest()[:12]
    stem = f"chain-{profile.name.replace('%', 'pct')}-{key}"
    return {
        "meta": CACHE / f"{stem}.json",
        "deposits": CACHE / f"{stem}.deposits.json",
        "state": CACHE / f"{stem}.state.json.gz",
    }


def plan(profile: Profile) -> tuple[list[list[Transfer]], list[str]]:
    """Every block's transfers, and our deposit addresses (invoice i gets address i)."""
    rng = random.Random(f"{SEED}/{profile.name}")
    deriver = AddressDeriver(XPUB)
    ours = [deriver.derive(i) for i in range(profile.invoices)]
    others = ["0x" + keccak(text=f"bench-other-{i}")[-20:].hex() for i in range(OTHER_ADDRESSES)]
    order = list(range(profile.paid))
    rng.shuffle(order)
    tokens_total = BLOCKS * TRANSFERS_PER_BLOCK
    to_us = set(rng.sample(range(tokens_total), round(tokens_total * profile.share)))
    native_blocks = set(rng.sample(range(BLOCKS), NATIVE_TRANSFERS))
    blocks: list[list[Transfer]] = []
    paid = 0
    for b in range(BLOCKS):
        block = []
        for k in range(TRANSFERS_PER_BLOCK):
            value = rng.randrange(100, 50_000) * 10 ** (DECIMALS - 2)  # 1.00 to 499.99 units
            payer = rng.randrange(PAYERS)
            if b * TRANSFERS_PER_BLOCK + k in to_us:
                index = order[paid % len(order)]
                paid += 1
                block.append(Transfer(index % 2, payer, ours[index], value))  # in the invoice's own token
            else:
                block.append(Transfer(rng.randrange(2), payer, rng.choice(others), value))
        if b in native_blocks:
            block.append(
                Transfer(None, rng.randrange(PAYERS), rng.choice(others), rng.randrange(1, 10**6) * 10**12)
            )
        blocks.append(block)
    return blocks, ours


def calldata(signature: str, types: list[str], args: list[Any]) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, args)).hex()


def rpc_batch(url: str, calls: list[tuple[str, list]]) -> list[Any]:
    body = json.dumps(
        [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
    )
    request = urllib.request.Request(url, data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answers = sorted(json.loads(response.read()), key=lambda a: a["id"])
    for answer in answers:
        if "error" in answer:
            raise RuntimeError(f"{calls[answer['id']][0]}: {answer['error']}")
    return [a["result"] for a in answers]


def build(profile: Profile, log: Any = print) -> dict[str, Any]:
    """Build the profile's chain on a fresh anvil and write the cache; returns the metadata."""
    paths = cache_paths(profile)
    started = time.monotonic()
    blocks, ours = plan(profile)
    node = Anvil(args=("--timestamp", str(GENESIS_TIME), "--no-mining", "--accounts", str(PAYERS)))
    try:
        node.rpc("anvil_setBlockTimestampInterval", BLOCK_INTERVAL)
        payers = node.rpc("eth_accounts")[:PAYERS]
        bytecode = load_artifact("TestToken")["bytecode"]
        hashes = rpc_batch(
            node.url,
            [
                (
                    "eth_sendTransaction",
                    [
                        {
                            "from": payers[0],
                            "gas": hex(3_000_000),
                            "data": bytecode
                            + encode(["string", "string", "uint8"], [name, symbol, DECIMALS]).hex(),
                        }
                    ],
                )
                for name, symbol in (("Bench USD A", "BUSDA"), ("Bench USD B", "BUSDB"))
            ],
        )
        node.mine(1)
        tokens = [node.rpc("eth_getTransactionReceipt", h)["contractAddress"].lower() for h in hashes]
        rpc_batch(
            node.url,
            [
                (
                    "eth_sendTransaction",
                    [
                        {
                            "from": payers[0],
                            "to": t,
                            "gas": hex(100_000),
                            "data": calldata("mint(address,uint256)", ["address", "uint256"], [p, 10**30]),
                        }
                    ],
                )
                for t in tokens
                for p in payers
            ],
        )
        node.mine(1)
        first = node.head() + 1
        for n, block in enumerate(blocks):
            calls = []
            for t in block:
                if t.token is None:
                    tx = {"from": payers[t.payer], "to": t.to, "value": hex(t.value), "gas": hex(21_000)}
                else:
                    tx = {
                        "from": payers[t.payer],
                        "to": tokens[t.token],
                        "gas": hex(100_000),
                        "data": calldata(
                            "transfer(address,uint256)", ["address", "uint256"], [t.to, t.value]
                        ),
                    }
                calls.append(("eth_sendTransaction", [tx]))
            rpc_batch(node.url, calls)
            node.mine(1)
            if n % 500 == 499:
                log(f"  {profile.name}: {n + 1}/{len(blocks)} blocks ({time.monotonic() - started:.0f} s)")
        last = node.head()
        logs_per_token = {}
        for i, token in enumerate(tokens):
            [found] = rpc_batch(  # (not node.rpc: a busy machine takes more than its 10 s here)
                node.url,
                [("eth_getLogs", [{"fromBlock": hex(first), "toBlock": hex(last), "address": token}])],
            )
            planned = sum(1 for block in blocks for t in block if t.token == i)
            if len(found) != planned:
                raise RuntimeError(
                    f"token {i}: {len(found)} logs on the chain, {planned} planned (a transfer failed)"
                )
            logs_per_token[token] = planned
        head_hash = node.rpc("eth_getBlockByNumber", hex(last), False)["hash"]
        [state] = rpc_batch(node.url, [("anvil_dumpState", [])])  # 0x + gzip of what --load-state reads
    finally:
        node.stop()
    index_of = {a: i for i, a in enumerate(ours)}
    deposits = [
        {"index": i, "address": a, "token": tokens[i % 2], "transfers": 0, "received_atomic": 0}
        for i, a in enumerate(ours)
    ]
    for block in blocks:
        for t in block:
            if t.token is not None and t.to in index_of:
                deposits[index_of[t.to]]["transfers"] += 1
                deposits[index_of[t.to]]["received_atomic"] += t.value
    for d in deposits:
        d["received_atomic"] = str(d["received_atomic"])
    meta = {
        "params": params(profile),
        "files": {k: v.name for k, v in paths.items()},
        "chain_id": 31337,
        "first_block": first,
        "last_block": last,
        "head_hash": head_hash,
        "tokens": tokens,
        "logs_per_token": logs_per_token,
        "token_transfers": sum(logs_per_token.values()),
        "native_transfers": sum(1 for block in blocks for t in block if t.token is None),
        "xpub": XPUB,
        "deposit_addresses": len(ours),
        "paid_addresses": sum(1 for d in deposits if d["transfers"]),
        "transfers_to_ours": sum(d["transfers"] for d in deposits),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    CACHE.mkdir(parents=True, exist_ok=True)
    paths["state"].write_bytes(bytes.fromhex(state[2:]))
    paths["deposits"].write_text(json.dumps(deposits))
    paths["meta"].write_text(json.dumps(meta, indent=1))  # last: its presence means the rest is there
    return meta


def load_meta(profile: Profile) -> dict[str, Any] | None:
    paths = cache_paths(profile)
    if not all(p.exists() for p in paths.values()):
        return None
    return json.loads(paths["meta"].read_text())


def load_deposits(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Our deposit addresses in index order: address, token, transfers to it, atomic sum."""
    return json.loads((CACHE / meta["files"]["deposits"]).read_text())


def ensure(profile: Profile, *, rebuild: bool = False, log: Any = print) -> dict[str, Any]:
    """The cached chain's metadata, building it first when there is none (or when asked)."""
    meta = None if rebuild else load_meta(profile)
    if meta is None:
        log(f"building the {profile.name} chain (once; cached under bench/{CACHE.name}/)...")
        meta = build(profile, log)
        log(
            f"  built in {meta['build_seconds']} s: blocks {meta['first_block']}-{meta['last_block']}, "
            f"{meta['token_transfers']:,} token transfers, {meta['native_transfers']} native"
        )
    return meta


class CachedNode:
    """An anvil loaded from a profile's cache (the state is unpacked to a temp file for it)."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-anvil-"))
        state = self.tmp / "state.json"
        with gzip.open(CACHE / meta["files"]["state"]) as src, state.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        self.node = Anvil(args=("--load-state", str(state)))
        head = self.node.rpc("eth_getBlockByNumber", hex(meta["last_block"]), False)
        if head is None or head["hash"] != meta["head_hash"] or self.node.head() != meta["last_block"]:
            self.stop()
            raise RuntimeError("the cached chain did not load as built: rebuild with --rebuild")

    @property
    def url(self) -> str:
        return self.node.url

    def stop(self) -> None:
        self.node.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> CachedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
