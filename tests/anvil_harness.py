"""The real daemon against real anvil nodes (one per chain), driven over HTTP.

Like `harness.Harness`, but the chains are separate anvil processes reached over JSON-RPC
(HTTP and, when asked, WebSocket), with TestToken, PaymentRouter and TestWallet deployed
and automining off, so a test decides what goes into which block. There are no sandbox
routes: payments are real transactions sent from anvil's unlocked dev accounts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from anvil import Anvil
from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector
from harness import Harness

from watcher.addresses import account_xpub_from_mnemonic
from watcher.contracts import load_artifact

# Deposit addresses come from a mnemonic other than anvil's, so none is a funded dev account.
DEPOSIT_MNEMONIC = (
    "abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon abandon about"
)
MERCHANT = "0x" + "4d" * 20
TOKEN_DECIMALS = 6
# anvil's first dev accounts (unlocked, funded): payers.
PAYERS = [
    "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266",
    "0x70997970c51812dc3a010c7d01b50e0d17dc79c8",
    "0x3c44cdddb6a900fa2b585dd299e03d12fa4293bc",
    "0x90f79bf6eb2c4f870365e785982e1f101e93b906",
]


def calldata(signature: str, types: list[str], args: list[Any]) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, args)).hex()


@dataclass
class AnvilChain:
    """One anvil node with our contracts; blocking helpers (call them through `run`)."""

    node: Anvil
    name: str
    token: str = ""
    router: str = ""
    wallet: str = ""
    contracts: dict[str, str] = field(default_factory=dict)

    def setup(self) -> AnvilChain:
        self.node.rpc("evm_setAutomine", False)
        self.token = self.deploy(
            "TestToken", ["string", "string", "uint8"], ["Test USD", "TUSD", TOKEN_DECIMALS]
        )
        self.router = self.deploy("PaymentRouter", [], [])
        self.wallet = self.deploy("TestWallet", [], [])
        for payer in PAYERS:
            self.send(
                PAYERS[0],
                self.token,
                calldata("mint(address,uint256)", ["address", "uint256"], [payer, 10**15]),
            )
        self.node.mine(1)
        return self

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    def send(self, sender: str, to: str | None, data: str = "0x", value: int = 0, gas: int = 500_000) -> str:
        tx: dict[str, Any] = {"from": sender, "data": data, "value": hex(value), "gas": hex(gas)}
        if to is not None:
            tx["to"] = to
        return self.node.rpc("eth_sendTransaction", tx)

    def receipt(self, tx: str) -> dict:
        return self.node.rpc("eth_getTransactionReceipt", tx)

    def deploy(self, name: str, types: list[str], args: list[Any]) -> str:
        artifact = load_artifact(name)
        tx = self.send(PAYERS[0], None, artifact["bytecode"] + encode(types, args).hex(), gas=5_000_000)
        self.node.mine(1)
        receipt = self.receipt(tx)
        if receipt is None or int(receipt["status"], 16) != 1:
            raise RuntimeError(f"deploying {name} failed: {receipt}")
        return receipt["contractAddress"].lower()

    def transfer_token(self, to: str, amount: int, sender: str = PAYERS[1]) -> str:
        return self.send(
            sender, self.token, calldata("transfer(address,uint256)", ["address", "uint256"], [to, amount])
        )

    def transfer_native(self, to: str, amount: int, sender: str = PAYERS[1]) -> str:
        return self.send(sender, to, value=amount, gas=21_000)

    def pay_router(self, call: dict[str, str], sender: str = PAYERS[2]) -> str:
        amount = int(call["amount"])
        native = int(call["token"], 16) == 0
        if not native:
            self.send(
                sender,
                self.token,
                calldata("approve(address,uint256)", ["address", "uint256"], [self.router, amount]),
            )
        data = calldata(
            "pay(bytes32,bytes32,address,address,uint256)",
            ["bytes32", "bytes32", "address", "address", "uint256"],
            [
                bytes.fromhex(call["invoice_id_hash"][2:]),
                bytes.fromhex(call["payment_id_hash"][2:]),
                call["token"],
                call["recipient"],
                amount,
            ],
        )
        return self.send(sender, self.router, data, value=amount if native else 0)

    def wallet_forward(self, to: str, amount: int, sender: str = PAYERS[3]) -> str:
        """The coin paid from inside a contract (a smart-contract wallet's inner CALL)."""
        return self.send(sender, self.wallet, calldata("forward(address)", ["address"], [to]), value=amount)

    def mint_tokens(self, to: str, amount: int, sender: str = PAYERS[0]) -> str:
        return self.send(
            sender, self.token, calldata("mint(address,uint256)", ["address", "uint256"], [to, amount])
        )

    def wallet_transfer_tokens(self, payouts: list[tuple[str, int]], sender: str = PAYERS[3]) -> str:
        """One transaction paying each (recipient, amount) in TUSD from the wallet's own balance
        (mint it some first): a batch payout, one Transfer log per recipient, in order."""
        return self.send(
            sender,
            self.wallet,
            calldata(
                "transferTokens(address,address[],uint256[])",
                ["address", "address[]", "uint256[]"],
                [self.token, [to for to, _ in payouts], [amount for _, amount in payouts]],
            ),
        )

    def mine(self, blocks: int = 1) -> None:
        self.node.mine(blocks)

    def head(self) -> int:
        return self.node.head()


class AnvilHarness(Harness):
    """`await harnesses(AnvilHarness, nodes=[anvil_node(), ...])`: one chain per node."""

    follower_process = False  # True: the chains are followed from a child process, as `watcher run` does

    def __init__(
        self,
        tmp_path: Any,
        *,
        nodes: list[Anvil],
        ws: bool = False,
        rpc_urls: dict[str, list[str]] | None = None,
        internal_transfers: str = "auto",
        poll_interval: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(tmp_path, **kwargs)
        self.poll_interval = poll_interval
        self.nodes = nodes
        self.ws = ws
        self.rpc_urls = rpc_urls or {}
        self.internal_transfers = internal_transfers
        self.chains: list[AnvilChain] = []

    async def start(self) -> AnvilHarness:
        import aiohttp

        await self.receiver.start()
        for i, node in enumerate(self.nodes):
            self.chains.append(await asyncio.to_thread(AnvilChain(node, f"anvil{i}").setup))
        self.http = aiohttp.ClientSession()
        await self.start_service()
        return self

    @property
    def anvil(self) -> AnvilChain:
        return self.chains[0]

    def chain_settings_for(self, chain: AnvilChain) -> dict:
        settings: dict[str, Any] = {
            "name": chain.name,
            "chain_id": chain.node.chain_id,
            "rpc_urls": self.rpc_urls.get(chain.name, [chain.node.url]),
            "poll_interval_seconds": self.poll_interval,
            "confirmations": self.confirmations,
            "start_block": 0,
            "deposit_xpub": account_xpub_from_mnemonic(DEPOSIT_MNEMONIC),
            "router_address": chain.router,
            "merchant_address": MERCHANT,
            "internal_transfers": self.internal_transfers,
            "assets": [
                {
                    "symbol": "TUSD",
                    "kind": "erc20",
                    "contract": chain.token,
                    "decimals": TOKEN_DECIMALS,
                    "usd_rate": "1",
                },
                {"symbol": "ETH", "kind": "native", "usd_rate": "2000"},
            ],
        }
        if self.ws:
            settings["ws_url"] = chain.node.ws_url
        return settings

    def chains_settings(self) -> list[dict]:
        return [self.chain_settings_for(c) for c in self.chains]

    async def start_service(self) -> None:
        from watcher.service import Service

        self.service = Service(
            self.settings(),
            expiry_interval=self.expiry_interval,
            clock=self.clock,
            dispatcher_process=self.dispatcher_process,
            follower_process=self.follower_process,
        )
        await self.service.start()

    async def _close(self) -> None:
        await self.stop_service()
        if self.http is not None:
            await self.http.close()
        await self.receiver.stop()

    # The sandbox's routes do not exist here: pay and mine on the node itself.

    async def pay(self, invoice_id: str, amount: str | None = None, option_id: str | None = None) -> str:
        raise NotImplementedError("pay with AnvilChain's helpers: anvil has no sandbox routes")

    async def mine(self, blocks: int = 1, chain: AnvilChain | None = None) -> int:
        chain = chain or self.anvil
        await chain.run(chain.mine, blocks)
        return await chain.run(chain.head)

    async def settle(self, chain: AnvilChain | None = None) -> None:
        """Wait until the chain's follower has processed its head and the outbox is empty."""
        chain = chain or self.anvil
        head = await chain.run(chain.head)
        store = self.service.store

        def caught_up() -> bool:
            cursor = store.cursor(chain.name)
            return cursor is not None and cursor.number >= head and store.outbox.next_delivery_at() is None

        await self.wait_for(caught_up, what=f"{chain.name} follower at head {head} and outbox empty")
