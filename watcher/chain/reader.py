"""The typed reader: the `ChainReader` protocol and its JSON-RPC implementation.

Only this package sees what nodes send (hex strings, camelCase keys); everything past it is
`int` and lowercase `0x` strings in our own types. The hot path decodes logs by hand
(a Transfer's `to` and `value` are a slice and an `int(x, 16)`), which is what lets the
watcher keep near the node's own speed rather than paying for web3's generic formatting.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, Container, Protocol, Sequence, TypeVar

import structlog

from ..contracts import PAYMENT_RECEIVED_TOPIC
from ..domain import BlockRef, FullBlock, NativeTransaction, RouterPayment, Transfer
from . import traces
from .traces import InternalTransfer
from .transport import METHOD_NOT_FOUND, RpcError, Transport

log = structlog.get_logger("watcher.chain")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
L = TypeVar("L", Transfer, RouterPayment)  # what a log decodes to

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

# Full blocks per JSON-RPC batch: providers cap batches (often at 100), and a full block of a
# busy chain is hundreds of kilobytes; a batch must come back within the request timeout.
BLOCK_BATCH = 25
# Blocks traced per batch: a block's call traces can run to megabytes.
TRACE_BATCH = 5


class ChainReader(Protocol):
    """What the follower needs of a chain."""

    async def chain_id(self) -> int: ...

    async def block_number(self) -> int: ...

    async def headers(self, numbers: Sequence[int]) -> list[BlockRef | None]: ...

    async def finalized_number(self) -> int: ...

    async def transfer_logs(
        self, from_block: int, to_block: int, tokens: Sequence[str], recipients: Sequence[str] | None,
        keep: Container[str] | None = None,
    ) -> list[Transfer]: ...

    async def router_payments(
        self, from_block: int, to_block: int, routers: Sequence[str], payment_ids: Sequence[str] | None
    ) -> list[RouterPayment]: ...

    async def full_blocks(self, numbers: Sequence[int]) -> list[FullBlock | None]: ...

    async def successful_transactions(self, candidates: dict[str, tuple[int, str]]) -> set[str]: ...

    async def probe_tracer(self, block_number: int) -> str | None: ...

    async def internal_transfers(self, numbers: Sequence[int], method: str) -> list[InternalTransfer]: ...


def _int(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) < 3 or not _HEX.issuperset(value[2:].lower()):
        raise RpcError(what, f"expected a hex quantity, got {value!r}")
    return int(value, 16)


_HEX = frozenset("0123456789abcdef")


def _hash(value: Any, what: str) -> str:
    """A 32-byte hex word (a hash or a topic), lowercase."""
    if not isinstance(value, str) or len(value) != 66 or not value.startswith("0x") or not _HEX.issuperset(value[2:].lower()):
        raise RpcError(what, f"expected a 32-byte hash, got {value!r}")
    return value.lower()


def decode_header(raw: Any) -> BlockRef:
    """Only what the follower needs; a malformed block is an RpcError."""
    if not isinstance(raw, dict):
        raise RpcError("eth_getBlockByNumber", "block is not an object")
    return BlockRef(
        number=_int(raw.get("number"), "block.number"),
        hash=_hash(raw.get("hash"), "block.hash"),
        parent_hash=_hash(raw.get("parentHash"), "block.parentHash"),
        timestamp=_int(raw.get("timestamp"), "block.timestamp"),
    )


def decode_transfer_log(raw: Any) -> Transfer | None:
    """A standard ERC-20 Transfer (three topics, 32-byte data); anything else is None.

    A log that is not even log-shaped is the node's fault: RpcError, never a crash."""
    try:
        return _decode_transfer_log(raw)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise RpcError("eth_getLogs", f"malformed log: {type(exc).__name__}: {exc}") from None


def _decode_transfer_log(raw: dict) -> Transfer | None:
    topics = raw.get("topics") or []
    if len(topics) != 3 or topics[0].lower() != TRANSFER_TOPIC or raw.get("removed"):
        return None
    data = raw.get("data") or "0x"
    if len(data) != 66:
        return None
    return Transfer(
        tx_hash=_hash(raw.get("transactionHash"), "log.transactionHash"),
        log_index=_int(raw.get("logIndex"), "log.logIndex"),
        block_number=_int(raw.get("blockNumber"), "log.blockNumber"),
        block_hash=_hash(raw.get("blockHash"), "log.blockHash"),
        token=raw["address"].lower(),
        from_address="0x" + _hash(topics[1], "log.topics[1]")[-40:],
        to_address="0x" + _hash(topics[2], "log.topics[2]")[-40:],
        amount=int(data, 16),
    )


def decode_router_log(raw: Any) -> RouterPayment | None:
    """A `PaymentReceived(bytes32 indexed, bytes32 indexed, address indexed, address, address,
    uint256)` log; anything else is None, and a log that is not log-shaped an RpcError."""
    try:
        topics = raw.get("topics") or []
        data = raw.get("data") or "0x"
        if len(topics) != 4 or topics[0].lower() != PAYMENT_RECEIVED_TOPIC or raw.get("removed") or len(data) != 2 + 3 * 64:
            return None
        token = "0x" + data[2 + 24 : 2 + 64].lower()
        return RouterPayment(
            tx_hash=_hash(raw.get("transactionHash"), "log.transactionHash"),
            log_index=_int(raw.get("logIndex"), "log.logIndex"),
            block_number=_int(raw.get("blockNumber"), "log.blockNumber"),
            block_hash=_hash(raw.get("blockHash"), "log.blockHash"),
            router=raw["address"].lower(),
            invoice_id_hash=_hash(topics[1], "log.topics[1]"),
            payment_id_hash=_hash(topics[2], "log.topics[2]"),
            payer="0x" + _hash(topics[3], "log.topics[3]")[-40:],
            token=None if int(token, 16) == 0 else token,
            recipient="0x" + data[66 + 24 : 66 + 64].lower(),
            amount=int(data[130:194], 16),
        )
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as exc:
        raise RpcError("eth_getLogs", f"malformed log: {type(exc).__name__}: {exc}") from None


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str) or len(value) != 42 or not value.startswith("0x") or not _HEX.issuperset(value[2:].lower()):
        raise RpcError(what, f"expected an address, got {value!r}")
    return value.lower()


def decode_full_block(raw: Any) -> FullBlock:
    """A block with its transactions as objects; only value-carrying calls are kept
    (a contract creation has no recipient that could be a deposit address)."""
    ref = decode_header(raw)
    transactions = raw.get("transactions")
    if not isinstance(transactions, list):
        raise RpcError("eth_getBlockByNumber", f"block {ref.number} has no transaction list")
    moved = []
    hashes = []
    for tx in transactions:
        if not isinstance(tx, dict):
            raise RpcError("eth_getBlockByNumber", f"block {ref.number}: transactions are not objects")
        hashes.append(_hash(tx.get("hash"), "tx.hash"))
        value = _int(tx.get("value"), "tx.value")
        if value == 0 or tx.get("to") is None:
            continue
        moved.append(NativeTransaction(
            tx_hash=_hash(tx.get("hash"), "tx.hash"),
            from_address=_address(tx.get("from"), "tx.from"),
            to_address=_address(tx.get("to"), "tx.to"),
            amount=value,
        ))
    return FullBlock(ref, tuple(moved), frozenset(hashes))


def _recipient_in(keep: Container[str]) -> Callable[[Any], bool]:
    """A cheap look at a Transfer log's recipient topic; a log too odd to look at is kept,
    so that the decoder says what is wrong with it."""

    def wanted(raw: Any) -> bool:
        try:
            return "0x" + raw["topics"][2][-40:].lower() in keep
        except (KeyError, IndexError, TypeError, AttributeError):
            return True

    return wanted


def address_topic(address: str) -> str:
    return "0x" + "00" * 12 + address[2:].lower()


class RpcCounts(Protocol):
    """Where a reader counts its requests and failures (the metrics); by JSON-RPC method."""

    def called(self, method: str) -> None: ...

    def failed(self, method: str) -> None: ...


def _counted(method: str) -> Callable[[F], F]:
    """Count a failure of a reader operation (the node's error, a transport failure after its
    retries, or an answer that does not decode) once, under the method it was about."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        async def counted(self: "JsonRpcReader", *args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(self, *args, **kwargs)
            except Exception:
                if self.counts is not None:
                    self.counts.failed(method)
                raise

        return counted  # type: ignore[return-value]

    return wrap


class JsonRpcReader:
    """`ChainReader` over any JSON-RPC transport (a node over HTTP, or the sandbox's chain).

    With `counts`, every request is counted by method (a batch of headers is one request)
    and so is every failed operation: a counter increment per request, against a
    round trip to the node."""

    def __init__(self, transport: Transport, counts: RpcCounts | None = None) -> None:
        self.transport = transport
        self.counts = counts
        self.block_receipts: bool | None = None  # does the node answer eth_getBlockReceipts? (None: not asked yet)

    async def _call(self, method: str, params: list) -> Any:
        if self.counts is not None:
            self.counts.called(method)
        return await self.transport.call(method, params)

    async def _batch(self, method: str, calls: Sequence[tuple[str, list]]) -> list[Any]:
        if self.counts is not None:
            self.counts.called(method)
        return await self.transport.batch(calls)

    @_counted("eth_chainId")
    async def chain_id(self) -> int:
        return _int(await self._call("eth_chainId", []), "eth_chainId")

    @_counted("eth_blockNumber")
    async def block_number(self) -> int:
        return _int(await self._call("eth_blockNumber", []), "eth_blockNumber")

    @_counted("eth_getBlockByNumber")
    async def headers(self, numbers: Sequence[int]) -> list[BlockRef | None]:
        raws = await self._batch("eth_getBlockByNumber", [("eth_getBlockByNumber", [hex(n), False]) for n in numbers])
        out: list[BlockRef | None] = []
        for n, raw in zip(numbers, raws):
            if raw is None:
                out.append(None)
                continue
            header = decode_header(raw)
            if header.number != n:
                raise RpcError("eth_getBlockByNumber", f"asked for block {n}, got {header.number}")
            out.append(header)
        return out

    @_counted("eth_getBlockByNumber")
    async def finalized_number(self) -> int:
        raw = await self._call("eth_getBlockByNumber", ["finalized", False])
        if raw is None:
            raise RpcError("eth_getBlockByNumber", "the node has no finalized block")
        return decode_header(raw).number

    @_counted("eth_getLogs")
    async def transfer_logs(
        self, from_block: int, to_block: int, tokens: Sequence[str], recipients: Sequence[str] | None,
        keep: Container[str] | None = None,
    ) -> list[Transfer]:
        """The tokens' Transfer logs, filtered by recipient topic while that list is short.

        `keep`: without a recipient filter, only logs to these addresses are decoded (checking
        and building every log of a busy token costs more than reading it)."""
        if not tokens:
            return []
        topics: list[Any] = [TRANSFER_TOPIC]
        if recipients is not None:
            if not recipients:
                return []
            topics += [None, [address_topic(a) for a in recipients]]
        wanted = None if keep is None else _recipient_in(keep)
        return await self._logs(from_block, to_block, list(tokens), topics, decode_transfer_log, wanted)

    @_counted("eth_getLogs")
    async def router_payments(
        self, from_block: int, to_block: int, routers: Sequence[str], payment_ids: Sequence[str] | None
    ) -> list[RouterPayment]:
        """The routers' `PaymentReceived` logs, filtered by payment id hash while that list is short."""
        topics: list[Any] = [PAYMENT_RECEIVED_TOPIC]
        if payment_ids is not None:
            if not payment_ids:
                return []
            topics += [None, list(payment_ids)]
        return await self._logs(from_block, to_block, list(routers), topics, decode_router_log)

    async def _logs(
        self, from_block: int, to_block: int, address: str | list[str], topics: list[Any], decode: Callable[[Any], L | None],
        wanted: Callable[[Any], bool] | None = None,
    ) -> list[L]:
        """One eth_getLogs; what `decode` does not recognise, or `wanted` passes over, is
        skipped; a log outside the range is the node's error."""
        raws = await self._call(
            "eth_getLogs", [{"fromBlock": hex(from_block), "toBlock": hex(to_block), "address": address, "topics": topics}]
        )
        if not isinstance(raws, list):
            raise RpcError("eth_getLogs", "logs are not a list")
        if wanted is not None:
            raws = [raw for raw in raws if wanted(raw)]
        out = []
        for raw in raws:
            decoded = decode(raw)
            if decoded is None:
                continue
            if not (from_block <= decoded.block_number <= to_block):
                raise RpcError("eth_getLogs", f"log of block {decoded.block_number} outside {from_block}-{to_block}")
            out.append(decoded)
        return out

    @_counted("eth_getBlockByNumber")
    async def full_blocks(self, numbers: Sequence[int]) -> list[FullBlock | None]:
        """Blocks with their transactions, in batches of BLOCK_BATCH."""
        out: list[FullBlock | None] = []
        for start in range(0, len(numbers), BLOCK_BATCH):
            part = numbers[start : start + BLOCK_BATCH]
            raws = await self._batch("eth_getBlockByNumber", [("eth_getBlockByNumber", [hex(n), True]) for n in part])
            for n, raw in zip(part, raws):
                if raw is None:
                    out.append(None)
                    continue
                block = decode_full_block(raw)
                if block.ref.number != n:
                    raise RpcError("eth_getBlockByNumber", f"asked for block {n}, got {block.ref.number}")
                out.append(block)
        return out

    @_counted("eth_getBlockReceipts")
    async def successful_transactions(self, candidates: dict[str, tuple[int, str]]) -> set[str]:
        """Which of these transactions (hash -> (block number, block hash)) succeeded.

        One `eth_getBlockReceipts` per block that holds one, batched; a node without that
        method gets a batch of `eth_getTransactionReceipt` instead (remembered). A receipt
        that names another block than the one we read means the chain moved: RpcError."""
        if not candidates:
            return set()
        receipts: list[Any] = []
        if self.block_receipts is not False:
            blocks = sorted({where for where in candidates.values()})
            try:
                answers = await self._batch("eth_getBlockReceipts", [("eth_getBlockReceipts", [hex(n)]) for n, _ in blocks])
                self.block_receipts = True
            except RpcError as exc:
                # (Also after it worked: a failover may have moved us to a node without it.)
                if exc.code != METHOD_NOT_FOUND:
                    raise
                log.info("block_receipts_unavailable", url=self.transport.url, error=str(exc))
                self.block_receipts = False
            else:
                for (n, _), answer in zip(blocks, answers):
                    if not isinstance(answer, list):
                        raise RpcError("eth_getBlockReceipts", f"block {n}: receipts are not a list")
                    receipts += answer
        if self.block_receipts is False:
            hashes = sorted(candidates)
            for start in range(0, len(hashes), BLOCK_BATCH * 4):
                receipts += await self._batch(
                    "eth_getTransactionReceipt", [("eth_getTransactionReceipt", [h]) for h in hashes[start : start + BLOCK_BATCH * 4]]
                )
        ok: set[str] = set()
        seen: set[str] = set()
        for receipt in receipts:
            if not isinstance(receipt, dict):
                raise RpcError("eth_getTransactionReceipt", "a receipt is missing or not an object")
            tx = _hash(receipt.get("transactionHash"), "receipt.transactionHash")
            if tx not in candidates:
                continue
            number, block_hash = candidates[tx]
            if _hash(receipt.get("blockHash"), "receipt.blockHash") != block_hash:
                raise RpcError("eth_getTransactionReceipt", f"receipt of {tx} names another block than {number}")
            seen.add(tx)
            if _int(receipt.get("status"), "receipt.status") == 1:
                ok.add(tx)
        if missing := set(candidates) - seen:
            raise RpcError("eth_getTransactionReceipt", f"no receipt for {sorted(missing)[0]}")
        return ok

    async def probe_tracer(self, block_number: int) -> str | None:
        """Which tracer the node offers for inner transfers, if any."""
        if self.counts is not None:
            self.counts.called("probe_tracer")
        return await traces.probe_tracer(self.transport, block_number)

    @_counted("trace")
    async def internal_transfers(self, numbers: Sequence[int], method: str) -> list[InternalTransfer]:
        """The coin moved by inner calls in these blocks, with the tracer `probe_tracer` found."""
        if self.counts is not None:
            self.counts.called("trace")
        out: list[InternalTransfer] = []
        for start in range(0, len(numbers), TRACE_BATCH):
            out += await traces.fetch_internal_transfers(self.transport, numbers[start : start + TRACE_BATCH], method)
        return out
