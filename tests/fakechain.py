"""A ChainReader that can mine, fork, lag and lie, for follower unit tests.

eth-tester and anvil prove the real path; FakeChain makes a chain's awkward moments read
like stories and records exactly what the follower asked the node for. It answers at the
`ChainReader` level (watcher/chain/reader.py), so its faults are what the real reader would
hand the follower from a misbehaving node:

- `visible_head`: the whole node behind (eth_blockNumber answers this);
- `backend_head`: a load balancer whose head is honest but whose headers and logs come from
  a backend that has blocks only up to there: ranges clamped silently (geth), headers
  `null`, logs by hash refused (EIP-234: "unknown block");
- `logs_head`: the same for logs only (headers honest);
- `headers_head`: the same for headers only (logs and head honest): `null` for the newest
  headers, as a node a few blocks behind answers;
- `null_headers`: heights whose headers are `null` whatever else is asked, e.g. the heights
  a reorg walk asks for, routed to a backend behind while the scan's newer block is not;
- `range_limit`: a range's logs answered for its first `range_limit` blocks only, silently,
  while the header that closes the batch is honest (a provider that serves each call of a
  batch from another backend, or truncates);
- `header_cap` / `batch_cap`: a provider refusing longer batches of headers / of anything
  (headers, full blocks, blocks' logs, receipts): an RpcError (-32600), as the reader raises
  once it cannot page any further;
- `lie_about_log_hashes`: logs that name a block hash that is not the block's;
- `serves_side_blocks`: logs by hash still answered for the blocks a fork replaced (geth
  keeps them), each batch closed, as the real reader closes it, by the header of its newest
  block as the chain has it now (BlockUnknown when that is not the block asked for);
- `blooms = False`: headers without a logsBloom (nothing can be skipped).

`FakeNativeChain` adds the native coin: transactions with values, receipts and traces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from watcher.bloom import bloom_mask
from watcher.chain import TRANSFER_TOPIC, BlockUnknown, FoundLogs, RpcError, address_topic
from watcher.chain.traces import InternalTransfer
from watcher.domain import BlockRef, FullBlock, NativeTransaction, Transfer

TOKEN = "0x" + "aa" * 20
PAYER = "0x" + "bb" * 20
BATCH_TOO_LARGE = -32600


class FakeChain:
    def __init__(self) -> None:
        self.salt = "a"
        self.blocks: list[BlockRef] = []
        self.logs: dict[int, list[Transfer]] = {}
        self.visible_head: int | None = None  # a lagging node: pretend the head is lower
        self.backend_head: int | None = None  # a lagging backend behind an honest head (headers and logs)
        self.logs_head: int | None = None  # ...or one that lags for logs only
        self.headers_head: int | None = None  # ...or for headers only
        self.null_headers: frozenset[int] = frozenset()  # these heights' headers land on a backend behind
        self.range_limit: int | None = None  # a range's logs cut short after this many blocks
        self.header_cap: int | None = None
        self.batch_cap: int | None = None
        self.lie_about_log_hashes = False
        self.serves_side_blocks = False  # logs by hash of the blocks a fork replaced (see above)
        self.side_logs: dict[str, list[Transfer]] = {}  # the replaced blocks' logs, by their hash
        self.header_requests: list[list[int]] = []
        self.log_requests: list[tuple] = []
        self.blooms = True  # headers carry a logsBloom
        self.mine()  # genesis

    def _hash(self, n: int, parent: str) -> str:
        return "0x" + hashlib.sha256(f"{self.salt}:{n}:{parent}".encode()).hexdigest()

    def mine(self, *payments: tuple[str, int], token: str = TOKEN) -> BlockRef:
        n = len(self.blocks)
        parent = self.blocks[-1].hash if self.blocks else "0x" + "00" * 32
        bloom = 0
        for to, _ in payments:  # as a node sets it: the log's address and each of its topics
            for item in (token, TRANSFER_TOPIC, address_topic(PAYER), address_topic(to)):
                bloom |= bloom_mask(item)
        block = BlockRef(n, self._hash(n, parent), parent, 1_000_000 + n * 12, bloom if self.blooms else None)
        self.blocks.append(block)
        self.logs[n] = [
            Transfer(f"0x{n:032x}{i:032x}", i, n, block.hash, token, PAYER, to, amount)
            for i, (to, amount) in enumerate(payments)
        ]
        return block

    def fork(self, at: int) -> None:
        """Drop every block above `at`; new blocks get other hashes."""
        for block in self.blocks[at + 1 :]:
            self.side_logs[block.hash] = self.logs.get(block.number, [])
        self.blocks = self.blocks[: at + 1]
        self.logs = {n: v for n, v in self.logs.items() if n <= at}
        self.salt += "'"

    def lag(self, blocks: int) -> None:
        """A load-balanced backend `blocks` behind the current head for headers and logs."""
        self.backend_head = len(self.blocks) - 1 - blocks

    def _capped(self, method: str, count: int, cap: int | None = None) -> None:
        for limit in (cap, self.batch_cap):
            if limit is not None and count > limit:
                raise RpcError(method, "batch size too large", BATCH_TOO_LARGE)

    def _has(self, n: int) -> bool:
        return 0 <= n < len(self.blocks) and (self.backend_head is None or n <= self.backend_head)

    def _has_header(self, n: int) -> bool:
        return (
            self._has(n)
            and (self.headers_head is None or n <= self.headers_head)
            and n not in self.null_headers
        )

    def _has_logs(self, n: int) -> bool:
        return self._has(n) and (self.logs_head is None or n <= self.logs_head)

    # ChainReader
    async def chain_id(self) -> int:
        return 1

    async def block_number(self) -> int:
        head = len(self.blocks) - 1
        return head if self.visible_head is None else min(head, self.visible_head)

    async def headers(self, numbers: Sequence[int]) -> list[BlockRef | None]:
        self.header_requests.append(list(numbers))
        self._capped("eth_getBlockByNumber", len(numbers), self.header_cap)
        return [self.blocks[n] if self._has_header(n) else None for n in numbers]

    async def range_logs(self, first, last, query, through=None) -> FoundLogs:
        """As the real reader: the span's logs (clamped to what the backend has, silently, as
        geth does) and the header of `last` from the same backend, which must be there."""
        self.log_requests.append(("range", first, last))
        if not self._has_logs(last):
            raise BlockUnknown("eth_getBlockByNumber", f"the node answering has no block {last} yet")
        if through is not None and self.blocks[last].hash != through.hash:
            raise BlockUnknown("eth_getBlockByNumber", f"another block {last}")
        top = min(n for n in (last, self.backend_head, self.logs_head) if n is not None)
        if self.range_limit is not None:
            top = min(top, first + self.range_limit - 1)
        return FoundLogs(
            await self.transfer_logs(first, top, query.tokens, query.recipients) if query.tokens else []
        )

    async def block_logs(self, wanted) -> FoundLogs:
        self._capped("eth_getLogs", len(wanted))
        found = FoundLogs()
        for block, query in wanted:
            self.log_requests.append(("hash", block.number))
            if self.serves_side_blocks and block.hash in self.side_logs:
                found.transfers += [
                    t
                    for t in self.side_logs[block.hash]
                    if t.token in query.tokens
                    and (query.recipients is None or t.to_address in query.recipients)
                ]
                continue
            if not self._has_logs(block.number) or self.blocks[block.number].hash != block.hash:
                raise RpcError("eth_getLogs", f"unknown block {block.hash}", -32000)
            if query.tokens:
                found.transfers += await self.transfer_logs(
                    block.number, block.number, query.tokens, query.recipients
                )
        if self.serves_side_blocks and wanted:
            newest = max((block for block, _ in wanted), key=lambda b: b.number)
            if not self._has_header(newest.number) or self.blocks[newest.number].hash != newest.hash:
                raise BlockUnknown("eth_getLogs", f"block {newest.number} is not {newest.hash} here")
        return found

    async def finalized_number(self) -> int:
        return len(self.blocks) - 1

    async def transfer_logs(self, from_block, to_block, tokens, recipients) -> list[Transfer]:
        out = []
        for n in range(from_block, to_block + 1):
            for t in self.logs.get(n, []):
                if t.token in tokens and (recipients is None or t.to_address in recipients):
                    out.append(
                        t if not self.lie_about_log_hashes else replace(t, block_hash="0x" + "ee" * 32)
                    )
        return out


class FakeNativeChain(FakeChain):
    """FakeChain whose blocks also carry native-coin transactions, receipts and traces."""

    def __init__(self) -> None:
        self.native: dict[int, list[tuple[str, str, int, bool]]] = {}  # block -> (tx, to, value, succeeded)
        self.inner: dict[int, list[InternalTransfer]] = {}
        self.traces_from_another_block = False
        self.full_block_requests: list[list[int]] = []
        self.receipt_requests: list[list[str]] = []
        super().__init__()

    def mine_native(self, *txs: tuple[str, int, bool], inner: tuple[str, int] | None = None) -> BlockRef:
        block = self.mine()
        n = block.number
        self.native[n] = [
            (f"0x{n:032x}{i + 100:032x}", to, value, ok) for i, (to, value, ok) in enumerate(txs)
        ]
        if inner is not None:
            to, value = inner
            wallet_tx = f"0x{n:032x}{999:032x}"
            self.native[n].append(
                (wallet_tx, "0x" + "77" * 20, 0, True)
            )  # the wallet call itself: no value to us
            self.inner[n] = [InternalTransfer(wallet_tx, 0, n, "0x" + "77" * 20, to, value)]
        return block

    async def full_blocks(self, numbers: Sequence[int]) -> list[FullBlock | None]:
        self.full_block_requests.append(list(numbers))
        self._capped("eth_getBlockByNumber", len(numbers))
        out: list[FullBlock | None] = []
        for n in numbers:
            if not self._has_header(n):
                out.append(None)
                continue
            txs = self.native.get(n, [])
            moved = tuple(NativeTransaction(h, PAYER, to, v) for h, to, v, _ in txs if v)
            out.append(FullBlock(self.blocks[n], moved, frozenset(h for h, *_ in txs)))
        return out

    async def successful_transactions(self, candidates: dict[str, tuple[int, str]]) -> set[str]:
        self.receipt_requests.append(sorted(candidates))
        self._capped("eth_getBlockReceipts", len({n for n, _ in candidates.values()}))
        for tx, (n, block_hash) in candidates.items():
            if not self._has(n) or self.blocks[n].hash != block_hash:
                raise RpcError("eth_getTransactionReceipt", f"receipt of {tx} names another block than {n}")
        ok = {h for txs in self.native.values() for h, _, _, good in txs if good}
        return {h for h in candidates if h in ok}

    async def probe_tracer(self, block_number: int) -> str | None:
        return "debug_traceBlockByNumber"

    async def internal_transfers(self, numbers: Sequence[int], method: str) -> list[InternalTransfer]:
        out = [t for n in numbers for t in self.inner.get(n, [])]
        if self.traces_from_another_block:
            out = [replace(t, tx_hash="0x" + "99" * 32) for t in out]
        return out
