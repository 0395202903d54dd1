"""The sandbox: an in-process eth-tester chain with our contracts, and its API routes.

The chain is reached through `EthTesterTransport`, which answers JSON-RPC the way a node
does (hex quantities, camelCase keys), so the watcher's own reader and follower run on it
unchanged. All eth-tester calls go through one worker thread: eth-tester is not
thread-safe, and mining must not stall the event loop that serves the API.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, TypeVar

from aiohttp import web
from eth_abi import encode
from eth_tester import EthereumTester, PyEVMBackend
from eth_tester.exceptions import BlockNotFound, TransactionFailed, TransactionNotFound
from eth_tester.exceptions import ValidationError as EthTesterValidationError
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address

from . import schemas
from .addresses import account_xpub_from_mnemonic
from .api import Problem, invalid, json_response, read_json
from .chain import METHOD_NOT_FOUND, RpcError
from .checkout.public import remaining_atomic
from .config import ConfigError
from .contracts import load_artifact
from .domain import DECIMAL_TEXT
from .openapi import Operation
from .store import Store

T = TypeVar("T")

SANDBOX_MNEMONIC = "test test test test test test test test test test test junk"
SANDBOX_NETWORK = "sandbox"
TOKEN_SYMBOL = "TUSD"
TOKEN_DECIMALS = 6
PAYER_FUNDS = 10**12 * 10**TOKEN_DECIMALS
NATIVE_FUNDS = 10_000 * 10**18  # of the 1,000,000 ETH each eth-tester account holds, what a payment may spend
NATIVE_SYMBOL = "ETH"
# The sandbox's ETH/USD price: a TestPriceFeed (AggregatorV3Interface) on its chain, read as a
# Chainlink feed is on a real one. Its answer is set once at start, so it is accepted for a week.
ETH_USD_FEED_DECIMALS = 8
ETH_USD_PRICE = 2000 * 10**ETH_USD_FEED_DECIMALS
ETH_USD_MAX_AGE_SECONDS = 7 * 86400
# Receives contract-rail payments: an address no sandbox account controls, so the router's
# transfers to it are visible on their own.
SANDBOX_MERCHANT = "0x" + keccak(text="watcher sandbox merchant")[-20:].hex()


def _hex(value: int) -> str:
    return hex(value)


def _block_json(block: dict, full: bool = False) -> dict:
    out: dict[str, Any] = {
        "number": _hex(block["number"]),
        "hash": block["hash"],
        "parentHash": block["parent_hash"],
        "timestamp": _hex(block["timestamp"]),
        "logsBloom": "0x" + format(block["logs_bloom"], "0512x"),
    }
    if full:
        out["transactions"] = [
            {
                "hash": tx["hash"],
                "from": tx["from"].lower(),
                "to": tx["to"].lower() if tx.get("to") else None,
                "value": _hex(tx["value"]),
            }
            for tx in block["transactions"]
        ]
    return out


def _receipt_json(receipt: dict) -> dict:
    return {
        "transactionHash": receipt["transaction_hash"],
        "blockHash": receipt["block_hash"],
        "blockNumber": _hex(receipt["block_number"]),
        "status": _hex(receipt["status"]),
    }


def _log_json(log: dict) -> dict:
    return {
        "address": log["address"].lower(),
        "topics": [t if isinstance(t, str) else "0x" + t.hex() for t in log["topics"]],
        "data": log["data"] if isinstance(log["data"], str) else "0x" + log["data"].hex(),
        "blockNumber": _hex(log["block_number"]),
        "blockHash": log["block_hash"],
        "transactionHash": log["transaction_hash"],
        "transactionIndex": _hex(log["transaction_index"]),
        "logIndex": _hex(log["log_index"]),
        "removed": False,
    }


class EthTesterTransport:
    """A JSON-RPC transport answered by an in-process eth-tester, in node-shaped JSON."""

    url = "eth-tester://in-process"

    def __init__(self, chain: SandboxChain) -> None:
        self.chain = chain

    def _answer(self, method: str, params: list) -> Any:
        t = self.chain.tester
        if method == "eth_chainId":
            return _hex(self.chain.chain_id)
        if method == "eth_blockNumber":
            return _hex(t.get_block_by_number("latest")["number"])
        if method == "eth_getBlockByNumber":
            return self._block(params[0], bool(params[1]) if len(params) > 1 else False)
        if method == "eth_getTransactionReceipt":
            try:
                return _receipt_json(t.get_transaction_receipt(params[0]))
            except TransactionNotFound:
                return None
        if method == "eth_getLogs":
            return self._logs(params[0])
        if method == "eth_getBalance":
            return _hex(
                t.get_balance(to_checksum_address(params[0]), params[1] if len(params) > 1 else "latest")
            )
        if method == "eth_call":
            call = {
                "from": self.chain.payers[0],
                "gas": 1_000_000,
                "value": 0,
                "to": to_checksum_address(params[0]["to"]),
                "data": params[0].get("data", "0x"),
            }
            block = params[1] if len(params) > 1 else "latest"
            try:
                return t.call(call, int(block, 16) if block.startswith("0x") else block)
            except Exception as exc:  # a revert, as a node answers it
                raise RpcError(method, f"execution reverted: {exc}", 3) from None
        # Like a node without the method (eth_getBlockReceipts, tracers): the reader falls back.
        raise RpcError(method, "the method does not exist / is not available", METHOD_NOT_FOUND)

    def _block(self, tag: str, full: bool) -> dict | None:
        try:
            block = self.chain.tester.get_block_by_number(
                int(tag, 16) if tag.startswith("0x") else tag, full_transactions=full
            )
        except BlockNotFound:
            return None
        return _block_json(block, full)

    def _logs(self, query: dict) -> list[dict]:
        t = self.chain.tester
        address = query.get("address")
        if "blockHash" in query:  # EIP-234: one block by its hash; a node without it errs
            try:
                first = last = t.get_block_by_hash(query["blockHash"])["number"]
            except BlockNotFound:
                raise RpcError("eth_getLogs", f"unknown block {query['blockHash']}", -32000) from None
        else:
            first, last = int(query["fromBlock"], 16), int(query["toBlock"], 16)
        logs = t.get_logs(
            from_block=first,
            to_block=last,
            address=[to_checksum_address(a) for a in address] if isinstance(address, list) else address,
            topics=query.get("topics"),
        )
        return [_log_json(entry) for entry in logs]

    async def call(self, method: str, params: list) -> Any:
        return await self.chain.run(self._answer, method, params)

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]:
        return await self.chain.run(lambda: [self._answer(m, p) for m, p in calls])

    async def close(self) -> None:
        return None


def _calldata(signature: str, types: list[str], args: list[Any]) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, args)).hex()


class PaymentRefused(Exception):
    """A sandbox payment that would revert, or did."""


@dataclass(frozen=True)
class Deployed:
    token: str  # lowercase
    router: str
    payer: str  # checksummed eth-tester account
    eth_usd_feed: str  # TestPriceFeed, lowercase


class SandboxChain:
    """An eth-tester chain with TestToken and PaymentRouter deployed and a funded payer."""

    network = SANDBOX_NETWORK

    def __init__(self) -> None:
        self.tester = EthereumTester(PyEVMBackend())
        self.tester.disable_auto_mine_transactions()
        self.chain_id = int(self.tester.backend.chain.chain_id)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eth-tester")
        # eth-tester keeps one pending transaction per sender (a second one replaces the first),
        # so payments rotate over its funded accounts and a block is mined when all are busy.
        self.payers: list[str] = list(self.tester.get_accounts())
        self._pending_senders: set[str] = set()
        self.deployed = self._deploy()
        self.transport = EthTesterTransport(self)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # -- synchronous helpers, called through run() once the daemon is up

    def _send(
        self, sender: str, to: str | None, data: str = "0x", value: int = 0, gas: int = 3_000_000
    ) -> str:
        if sender in self._pending_senders:
            self.mine(1)  # never let a pending transaction be silently replaced
        tx: dict[str, Any] = {"from": sender, "data": data, "value": value, "gas": gas}
        if to is not None:
            tx["to"] = to_checksum_address(to)
        tx_hash = self.tester.send_transaction(tx)
        self._pending_senders.add(sender)
        return tx_hash

    def preflight(self, sender: str, to: str, data: str = "0x", value: int = 0) -> None:
        """Run a payment as a call first: one that would revert (the payer lacks the tokens or
        the allowance) raises PaymentRefused and is never sent."""
        try:
            self.tester.call(
                {
                    "from": sender,
                    "to": to_checksum_address(to),
                    "data": data,
                    "value": value,
                    "gas": 3_000_000,
                },
                "latest",
            )
        except TransactionFailed as exc:
            raise PaymentRefused(f"the transfer would revert on chain ({exc}); nothing was sent") from None

    def receipt_status(self, tx_hash: str) -> int | None:
        """1 or 0 once the transaction is mined, None while it is pending."""
        try:
            return int(self.tester.get_transaction_receipt(tx_hash)["status"])
        except TransactionNotFound:
            return None

    def free_payer(self) -> str:
        """A funded account with no pending transaction (mining a block if there is none)."""
        for payer in self.payers:
            if payer not in self._pending_senders:
                return payer
        self.mine(1)
        return self.payers[0]

    def deploy_contract(self, name: str, types: list[str], args: list[Any], sender: str | None = None) -> str:
        artifact = load_artifact(name)
        sender = sender or self.tester.get_accounts()[0]
        tx = self._send(sender, None, artifact["bytecode"] + encode(types, args).hex())
        self.mine(1)
        receipt = self.tester.get_transaction_receipt(tx)
        if receipt["status"] != 1 or not receipt["contract_address"]:
            raise RuntimeError(f"deploying {name} failed")
        return receipt["contract_address"].lower()

    def _deploy(self) -> Deployed:
        payer = self.tester.get_accounts()[0]
        token = self.deploy_contract(
            "TestToken", ["string", "string", "uint8"], ["Test USD", TOKEN_SYMBOL, TOKEN_DECIMALS]
        )
        router = self.deploy_contract("PaymentRouter", [], [])
        feed = self.deploy_contract(
            "TestPriceFeed",
            ["uint8", "string", "int256"],
            [ETH_USD_FEED_DECIMALS, "ETH / USD", ETH_USD_PRICE],
        )
        for account in self.payers:
            self._send(
                account,
                token,
                _calldata("mint(address,uint256)", ["address", "uint256"], [account, PAYER_FUNDS]),
            )
        self.mine(1)
        return Deployed(token, router, payer, feed)

    def transfer_token(self, token: str, to: str, amount: int, sender: str | None = None) -> str:
        """Send an ERC-20 transfer (mined with the next block)."""
        data = _calldata(
            "transfer(address,uint256)", ["address", "uint256"], [to_checksum_address(to), amount]
        )
        sender = sender or self.free_payer()
        self.preflight(sender, token, data)
        return self._send(sender, token, data, gas=200_000)

    def transfer_native(self, to: str, amount: int, sender: str | None = None) -> str:
        """Send the coin itself (mined with the next block)."""
        return self._send(sender or self.free_payer(), to, value=amount, gas=21_000)

    def pay_router(self, call: dict[str, str], sender: str | None = None) -> str:
        """Pay through the PaymentRouter as a wallet would: approve (tokens), then `pay`."""
        sender = sender or self.free_payer()
        amount = int(call["amount"])
        native = int(call["token"], 16) == 0
        if not native:
            approve = _calldata(
                "approve(address,uint256)",
                ["address", "uint256"],
                [to_checksum_address(call["router"]), amount],
            )
            self._send(sender, call["token"], approve, gas=100_000)
            self.mine(1)  # one pending transaction per sender: the approval goes first
        data = _calldata(
            "pay(bytes32,bytes32,address,address,uint256)",
            ["bytes32", "bytes32", "address", "address", "uint256"],
            [
                bytes.fromhex(call["invoice_id_hash"][2:]),
                bytes.fromhex(call["payment_id_hash"][2:]),
                to_checksum_address(call["token"]),
                to_checksum_address(call["recipient"]),
                amount,
            ],
        )
        self.preflight(sender, call["router"], data, amount if native else 0)
        return self._send(sender, call["router"], data, value=amount if native else 0, gas=200_000)

    def mine(self, blocks: int = 1) -> list[str]:
        hashes = list(self.tester.mine_blocks(blocks))
        self._pending_senders.clear()
        return hashes

    def head(self) -> int:
        return int(self.tester.get_block_by_number("latest")["number"])

    @property
    def genesis_hash(self) -> str:
        """Block 0, dated when this chain was made: no two sandbox chains share it."""
        return str(self.tester.get_block_by_number(0)["hash"]).lower()


def claim_database(path: str, chain: SandboxChain, *, clock: Callable[[], float] = time.time) -> str:
    """Make `path` a database for `chain`, and say how, for the banner.

    The sandbox's chain lives in memory and is new at every start, so a database that followed
    an earlier one cannot go on with it: its checkpoint, blocks and payments belong to a chain
    that is gone, and the watcher would refuse the new one (another genesis). Such a database
    is moved aside, with its WAL files, to PATH.<UTC time>.old, and a fresh one is started; one
    that has followed no chain yet is kept."""
    if not os.path.exists(path):
        return "new"
    try:
        store = Store(path, clock=clock)
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            "--database", f"{path} is not a watcher database ({exc}); give another path"
        ) from None
    try:
        stored = store.genesis_hash(SANDBOX_NETWORK)
        followed = store.cursor(SANDBOX_NETWORK) is not None
    finally:
        store.close()
    if stored == chain.genesis_hash or (stored is None and not followed):
        return "kept: it has followed no sandbox chain yet"
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(clock()))
    aside = f"{path}.{stamp}.old"
    n = 1
    while any(os.path.exists(aside + suffix) for suffix in ("", "-wal", "-shm")):
        n += 1
        aside = f"{path}.{stamp}-{n}.old"
    for suffix in (
        "-wal",
        "-shm",
        "",
    ):  # the WAL first: one left at `path` would be read into the new database
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return f"new: the database there followed an earlier sandbox chain, which is gone; moved to {aside}"


def sandbox_settings_data(
    chain: SandboxChain, *, confirmations: int | str = 3, poll_interval: float = 0.5
) -> dict:
    """The one chain of the sandbox, as a config section."""
    return {
        "name": SANDBOX_NETWORK,
        "chain_id": chain.chain_id,
        "rpc_urls": ["http://127.0.0.1/in-process-sandbox"],
        "poll_interval_seconds": poll_interval,
        "confirmations": confirmations,
        "start_block": 0,
        "deposit_xpub": account_xpub_from_mnemonic(SANDBOX_MNEMONIC),
        "router_address": chain.deployed.router,
        "merchant_address": SANDBOX_MERCHANT,
        "assets": [
            {
                "symbol": TOKEN_SYMBOL,
                "kind": "erc20",
                "contract": chain.deployed.token,
                "decimals": TOKEN_DECIMALS,
                "usd_rate": "1",
            },
            # No usd_rate: ETH is priced live from the chain's ETH/USD feed (sandbox_rates_data), or
            # by the request's quote_rates.
            {"symbol": NATIVE_SYMBOL, "kind": "native"},
        ],
    }


def sandbox_rates_data(chain: SandboxChain) -> list[dict]:
    """The sandbox's `[[rates]]`: ETH/USD from its TestPriceFeed, read like a Chainlink feed."""
    return [
        {
            "pair": f"{NATIVE_SYMBOL}/USD",
            "source": "chainlink",
            "chain": SANDBOX_NETWORK,
            "feed": chain.deployed.eth_usd_feed,
            "max_age_seconds": ETH_USD_MAX_AGE_SECONDS,
            "refresh_seconds": 5,
        }
    ]


def new_api_key() -> str:
    return "sk_sandbox_" + secrets.token_urlsafe(24)


def new_webhook_secret() -> str:
    import base64

    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


# --------------------------------------------------------------------------- routes


async def pay_invoice(chain: SandboxChain, store: Store, invoice_id: str, body: dict) -> str:
    """A real payment of one of the invoice's options from the sandbox payer (the pay route's
    work, also behind the payment page's "simulate payment" button); raises Problem."""
    unknown = set(body) - {"payment_option_id", "amount"}
    if unknown:
        raise invalid(sorted(unknown)[0], "unknown field")
    invoice = store.get_invoice(invoice_id)
    if invoice is None:
        raise Problem(404, "Not found", f"no invoice {invoice_id!r}", slug="not-found")
    option = _option_to_pay(invoice, body.get("payment_option_id"))
    atomic = _amount_to_pay(invoice, option, body)
    try:
        if option["rail"] == "contract":
            tx = await chain.run(chain.pay_router, {**option["contract_call"], "amount": str(atomic)})
        elif option["token_contract"]:
            tx = await chain.run(
                chain.transfer_token, option["token_contract"].lower(), option["destination_address"], atomic
            )
        else:
            tx = await chain.run(chain.transfer_native, option["destination_address"], atomic)
    except EthTesterValidationError as exc:  # e.g. the payer's balance is spent: the chain refuses
        raise Problem(
            409, "Conflict", f"the sandbox chain refused the payment: {exc}", slug="state-conflict"
        ) from None
    except PaymentRefused as exc:  # it would revert: nothing was sent
        raise Problem(409, "Conflict", str(exc), slug="payment-reverted") from None
    return tx


def _option_to_pay(invoice: dict, option_id: Any) -> dict:
    """The option named, or the invoice's first; a Problem when there is none to pay."""
    if option_id is not None and not isinstance(option_id, str):
        raise invalid("payment_option_id", "must be a string")
    options = invoice["payment_options"]
    if not options:
        raise Problem(409, "Conflict", "the invoice has no payment option to pay", slug="state-conflict")
    option = options[0] if option_id is None else next((o for o in options if o["id"] == option_id), None)
    if option is None:
        raise invalid("payment_option_id", "is not an option of this invoice")
    return option


def _amount_to_pay(invoice: dict, option: dict, body: dict) -> int:
    """Atomic units: the amount given, or what remains to be paid, within the payer's funds."""
    funds = PAYER_FUNDS if option["token_contract"] else NATIVE_FUNDS
    if "amount" in body:
        return _units_to_atomic(body["amount"], option["decimals"], funds)
    atomic = remaining_atomic(invoice, option)
    if atomic <= 0:
        raise Problem(
            409, "Conflict", "nothing remains to be paid; give an amount to pay more", slug="state-conflict"
        )
    if atomic > funds:
        raise Problem(
            409,
            "Conflict",
            "what remains is more than the sandbox payer holds; give a smaller amount",
            slug="state-conflict",
        )
    return atomic


async def wait_for_receipt(chain: SandboxChain, tx_hash: str, timeout: float) -> int | None:
    """The transaction's receipt status once the miner has mined it; None if it is still
    pending after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (status := await chain.run(chain.receipt_status, tx_hash)) is None:
        if asyncio.get_running_loop().time() > deadline:
            return None
        await asyncio.sleep(0.05)
    return status


def add_sandbox_routes(
    app: web.Application,
    chain: SandboxChain,
    store: Store,
    on_mined: Callable[[], None],
    *,
    block_time: float = 0.0,
) -> None:
    """`block_time` > 0: blocks are mined by the daemon, so the pay route waits for the receipt
    (and answers 409 on a revert); 0: blocks come only from /v1/sandbox/mine, so it cannot."""

    async def pay(request: web.Request) -> web.Response:
        body = await read_json(request, required=False)
        if not isinstance(body, dict):
            raise invalid("body", "must be a JSON object")
        tx = await pay_invoice(chain, store, request.match_info["id"], body)
        if block_time > 0 and await wait_for_receipt(chain, tx, max(5.0, 3 * block_time)) == 0:
            raise Problem(
                409,
                "Conflict",
                f"the payment {tx} reverted on chain: nothing was paid",
                slug="payment-reverted",
            )
        return json_response({"transaction_hash": tx})

    async def mine(request: web.Request) -> web.Response:
        body = await read_json(request, required=False)
        if not isinstance(body, dict):
            raise invalid("body", "must be a JSON object")
        unknown = set(body) - {"blocks"}
        if unknown:
            raise invalid(sorted(unknown)[0], "unknown field")
        blocks = body.get("blocks", 1)
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= 1000:
            raise invalid("blocks", "must be a whole number from 1 to 1000")
        hashes = await chain.run(chain.mine, blocks)
        on_mined()
        return json_response({"blocks": len(hashes), "head_block": await chain.run(chain.head)})

    app.router.add_post("/v1/sandbox/invoices/{id}/pay", pay)
    app.router.add_post("/v1/sandbox/mine", mine)


# Declarations for /openapi.json; present only in sandbox mode, like the routes.
OPERATIONS = [
    Operation(
        "POST",
        "/v1/sandbox/invoices/{id}/pay",
        "Sandbox: pay an option with a real token transfer",
        {200: schemas.SandboxPayment},
        body=schemas.SandboxPayIn,
        body_required=False,
        tags=("sandbox",),
        problems=(404, 409),
    ),
    Operation(
        "POST",
        "/v1/sandbox/mine",
        "Sandbox: mine blocks",
        {200: schemas.SandboxMined},
        body=schemas.SandboxMineIn,
        body_required=False,
        tags=("sandbox",),
    ),
]


def _units_to_atomic(value: Any, decimals: int, funds_atomic: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise invalid("amount", 'must be a decimal string of the asset\'s units, such as "10.5"')
    if isinstance(value, str) and not DECIMAL_TEXT.fullmatch(value.strip()):
        raise invalid("amount", 'must be a decimal string of the asset\'s units, such as "10.5"')
    try:
        number = Decimal(value) if not isinstance(value, str) else Decimal(value.strip())
    except InvalidOperation:
        raise invalid("amount", 'must be a decimal string of the asset\'s units, such as "10.5"') from None
    if not number.is_finite() or number <= 0:
        raise invalid("amount", "must be above 0")
    # Bound the size before exact arithmetic: Fraction("1e-999999999") would build a 10^999999999.
    if number > Decimal(funds_atomic).scaleb(-decimals):
        raise invalid("amount", "is more than the sandbox payer holds")
    if number.quantize(Decimal(1).scaleb(-decimals)) != number:
        raise invalid("amount", f"has more than {decimals} decimal places")
    atomic = Fraction(number) * 10**decimals
    if atomic.denominator != 1:
        raise invalid("amount", f"has more than {decimals} decimal places")
    return int(atomic)
