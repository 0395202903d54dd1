"""The typed reader: the `ChainReader` protocol and its JSON-RPC implementation.

Only this package sees what nodes send (hex strings, camelCase keys); everything past it is
`int` and lowercase `0x` strings in our own types. The hot path decodes logs by hand
(a Transfer's `to` and `value` are a slice and an `int(x, 16)`), which is what lets the
watcher keep near the node's own speed rather than paying for web3's generic formatting.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Container, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import structlog

from ..contracts import PAYMENT_RECEIVED_TOPIC
from ..domain import BlockRef, FullBlock, NativeTransaction, RouterPayment, Transfer
from ..offload import off_loop
from . import traces
from .traces import InternalTransfer
from .transport import METHOD_NOT_FOUND, BatchRefused, RpcError, Transport

log = structlog.get_logger("watcher.chain")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
L = TypeVar("L", Transfer, RouterPayment)  # what a log decodes to

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

# Full blocks per JSON-RPC batch: providers cap batches (often at 100), and a full block of a
# busy chain is hundreds of kilobytes; a batch must come back within the request timeout.
BLOCK_BATCH = 25
# Blocks traced per batch: a block's call traces can run to megabytes.
TRACE_BATCH = 5
# The JSON-RPC batch ceiling when none is configured: providers cap batches, often at 100.
MAX_BATCH = 100


class BlockUnknown(RpcError):
    """The node answering does not have a block we hold (a backend behind the others, or a
    reorg under way: it has none, or another one, at that height): whatever it said about
    that block cannot be complete. Ask again."""


@dataclass(frozen=True)
class LogQuery:
    """What logs a step wants: the tokens' Transfers (filtered by recipient topic while the
    list is short, else only `keep` recipients decoded) and the routers' PaymentReceived
    (filtered by payment id while that list is short)."""

    tokens: Sequence[str]
    recipients: Sequence[str] | None
    keep: Container[str] | None
    routers: Sequence[str]
    payment_ids: Sequence[str] | None

    # Topics in one request's filter; a longer list is asked in several requests.
    topics_per_request: int = 1000

    def requests(self) -> list[tuple[str, list[Any], Callable[[Any], Any], Callable[[Any], bool] | None]]:
        """(kind, address, topics, decode, wanted) for each eth_getLogs this query needs."""
        return self._requests

    @functools.cached_property
    def _requests(self) -> list[tuple[str, list[Any], Callable[[Any], Any], Callable[[Any], bool] | None]]:
        # Built once per query: a step asks the same filter for each of its spans, and a
        # filter of thousands of recipients costs a topic each to build.
        out: list[Any] = []
        if self.tokens and (self.recipients is None or self.recipients):
            if self.recipients is None:
                wanted = None if self.keep is None else _recipient_in(self.keep)
                out.append((list(self.tokens), [TRANSFER_TOPIC], decode_transfer_log, wanted))
            for group in self._groups([address_topic(a) for a in self.recipients or ()]):
                out.append((list(self.tokens), [TRANSFER_TOPIC, None, group], decode_transfer_log, None))
        if self.routers and (self.payment_ids is None or self.payment_ids):
            if self.payment_ids is None:
                out.append((list(self.routers), [PAYMENT_RECEIVED_TOPIC], decode_router_log, None))
            for group in self._groups(list(self.payment_ids or ())):
                out.append(
                    (list(self.routers), [PAYMENT_RECEIVED_TOPIC, None, group], decode_router_log, None)
                )
        return out

    def _groups(self, topics: list[str]) -> list[list[str]]:
        size = max(1, self.topics_per_request)
        return [topics[i : i + size] for i in range(0, len(topics), size)]


@dataclass
class FoundLogs:
    transfers: list[Transfer] = field(default_factory=list)
    routed: list[RouterPayment] = field(default_factory=list)
    # A log is taken once, whichever request brought it: a range asked in several filtered
    # requests gets one log twice from a node that ignores topic filters.
    _seen: set[tuple[bool, str, int | None]] = field(default_factory=set)

    def add(self, decoded: Transfer | RouterPayment) -> None:
        key = (isinstance(decoded, Transfer), decoded.tx_hash, decoded.log_index)
        if key in self._seen:
            return
        self._seen.add(key)
        if isinstance(decoded, Transfer):
            self.transfers.append(decoded)
        else:
            self.routed.append(decoded)


class ChainReader(Protocol):
    """What the follower needs of a chain."""

    async def chain_id(self) -> int: ...

    async def block_number(self) -> int: ...

    async def headers(self, numbers: Sequence[int]) -> list[BlockRef | None]: ...

    async def finalized_number(self) -> int: ...

    async def range_logs(
        self, first: int, last: int, query: LogQuery, through: BlockRef | None = None
    ) -> FoundLogs: ...

    async def block_logs(self, wanted: Sequence[tuple[BlockRef, LogQuery]]) -> FoundLogs: ...

    async def full_blocks(self, numbers: Sequence[int]) -> list[FullBlock | None]: ...

    async def successful_transactions(self, candidates: dict[str, tuple[int, str]]) -> set[str]: ...

    async def probe_tracer(self, block_number: int) -> str | None: ...

    async def internal_transfers(self, numbers: Sequence[int], method: str) -> list[InternalTransfer]: ...


def _int(value: Any, what: str) -> int:
    if (
        not isinstance(value, str)
        or not value.startswith("0x")
        or len(value) < 3
        or not _HEX.issuperset(value[2:].lower())
    ):
        raise RpcError(what, f"expected a hex quantity, got {value!r}")
    return int(value, 16)


_HEX = frozenset("0123456789abcdef")


def _found_in_range(requests: Sequence, answers: Sequence[Any], first: int, last: int) -> FoundLogs:
    """The answers to a range's requests, decoded (each log within the range, or RpcError)."""
    found = FoundLogs()
    for (_, _, decode, wanted), raws in zip(requests, answers, strict=True):
        for decoded in _decoded(raws, decode, wanted):
            if not (first <= decoded.block_number <= last):
                raise RpcError("eth_getLogs", f"log of block {decoded.block_number} outside {first}-{last}")
            found.add(decoded)
    return found


def _hash(value: Any, what: str) -> str:
    """A 32-byte hex word (a hash or a topic), lowercase."""
    if (
        not isinstance(value, str)
        or len(value) != 66
        or not value.startswith("0x")
        or not _HEX.issuperset(value[2:].lower())
    ):
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
        bloom=_bloom(raw.get("logsBloom"), raw.get("transactions")),
    )


def _bloom(value: Any, transactions: Any) -> int | None:
    """The header's logsBloom, or None when the node gave none we can read (then nothing is
    skipped for it: a missing bloom only costs requests). An empty bloom on a block with
    transactions is not believed either: some chains leave logs out of it (bridge deposits)."""
    if (
        isinstance(value, str)
        and len(value) == 2 + 512
        and value.startswith("0x")
        and _HEX.issuperset(value[2:].lower())
    ):
        bloom = int(value, 16)
        return None if bloom == 0 and transactions else bloom
    return None


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
        if (
            len(topics) != 4
            or topics[0].lower() != PAYMENT_RECEIVED_TOPIC
            or raw.get("removed")
            or len(data) != 2 + 3 * 64
        ):
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
    if (
        not isinstance(value, str)
        or len(value) != 42
        or not value.startswith("0x")
        or not _HEX.issuperset(value[2:].lower())
    ):
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
        moved.append(
            NativeTransaction(
                tx_hash=_hash(tx.get("hash"), "tx.hash"),
                from_address=_address(tx.get("from"), "tx.from"),
                to_address=_address(tx.get("to"), "tx.to"),
                amount=value,
            )
        )
    return FullBlock(ref, tuple(moved), frozenset(hashes))


def _decoded(raws: Any, decode: Callable[[Any], L | None], wanted: Callable[[Any], bool] | None) -> list[L]:
    if not isinstance(raws, list):
        raise RpcError("eth_getLogs", "logs are not a list")
    out = []
    for raw in raws:
        if wanted is not None and not wanted(raw):
            continue
        decoded = decode(raw)
        if decoded is not None:
            out.append(decoded)
    return out


def _proof(raw: Any, number: int, ours: BlockRef | None) -> None:
    """The header that closes a batch of logs: the node answering has block `number`, and it
    is ours (when we hold it)."""
    if raw is None:
        raise BlockUnknown(
            "eth_getBlockByNumber",
            f"the node answering has no block {number} yet: its logs cannot be complete",
        )
    header = decode_header(raw)
    if header.number != number:
        raise RpcError("eth_getBlockByNumber", f"asked for block {number}, got {header.number}")
    if ours is not None and header.hash != ours.hash:
        raise BlockUnknown(
            "eth_getBlockByNumber",
            f"the node answering has another block {number} than ours (a reorg under way?)",
        )


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
        async def counted(self: JsonRpcReader, *args: Any, **kwargs: Any) -> Any:
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

    def __init__(
        self, transport: Transport, counts: RpcCounts | None = None, *, max_batch: int = MAX_BATCH
    ) -> None:
        self.transport = transport
        self.counts = counts
        self.block_receipts: bool | None = (
            None  # does the node answer eth_getBlockReceipts? (None: not asked yet)
        )
        # The batch ceiling: the configured `max_batch`, halved (for good) each time the node refuses a batch.
        self.max_batch = max(1, max_batch)

    async def _call(self, method: str, params: list) -> Any:
        if self.counts is not None:
            self.counts.called(method)
        return await self.transport.call(method, params)

    async def _batch(
        self,
        method: str,
        calls: Sequence[tuple[str, list]],
        *,
        page: int | None = None,
        about: Sequence[tuple[int, BlockRef | None]] | None = None,
    ) -> list[Any]:
        """The answers to `calls`, sent in batches of at most `max_batch` (and `page`); a
        batch the node refuses as too long halves `max_batch` and goes again.

        `about` (one `(block number, our header or None)` per call) closes every batch with
        the header of the highest block its calls are about, from the same request, so the
        node that answered them is shown to have that block (ours, when we hold it)."""
        out: list[Any] = []
        done = 0
        extra = 0 if about is None else 1
        while done < len(calls):
            size = max(1, min(self.max_batch, page or self.max_batch) - extra)
            part = list(calls[done : done + size])
            if about is not None:
                number, ours = max(about[done : done + size], key=lambda a: a[0])
                part.append(("eth_getBlockByNumber", [hex(number), False]))
            if self.counts is not None:
                self.counts.called(method)
            try:
                answers = await self.transport.batch(part)
            except BatchRefused as exc:
                if len(part) <= 1 + extra:
                    raise
                self.max_batch = max(1 + extra, len(part) // 2)
                log.warning("rpc_batch_shrunk", method=method, max_batch=self.max_batch, error=str(exc))
                continue
            if about is not None:
                _proof(answers.pop(), number, ours)
            out += answers
            done += len(part) - extra
        return out

    @_counted("eth_chainId")
    async def chain_id(self) -> int:
        return _int(await self._call("eth_chainId", []), "eth_chainId")

    @_counted("eth_blockNumber")
    async def block_number(self) -> int:
        return _int(await self._call("eth_blockNumber", []), "eth_blockNumber")

    @_counted("eth_getBlockByNumber")
    async def headers(self, numbers: Sequence[int]) -> list[BlockRef | None]:
        raws = await self._batch(
            "eth_getBlockByNumber", [("eth_getBlockByNumber", [hex(n), False]) for n in numbers]
        )
        out: list[BlockRef | None] = []
        for n, raw in zip(numbers, raws, strict=True):
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
    async def range_logs(
        self, first: int, last: int, query: LogQuery, through: BlockRef | None = None
    ) -> FoundLogs:
        """The query's logs of blocks `first`..`last` by number range, in one batch with the
        header of `last`: a backend behind `last` answers logs only up to its own head and
        no error (geth clamps `toBlock`), so the same batch must show it has `last` (the
        hash of `through`, when given), or nothing it said is taken."""
        requests = query.requests()
        if not requests:
            return FoundLogs()
        span = {"fromBlock": hex(first), "toBlock": hex(last)}
        calls = [
            ("eth_getLogs", [{**span, "address": address, "topics": topics}])
            for address, topics, _, _ in requests
        ]
        answers = await self._batch("eth_getLogs", calls, about=[(last, through)] * len(calls))
        logs = sum(len(raws) for raws in answers if isinstance(raws, list))
        return await off_loop(_found_in_range, requests, answers, first, last, items=logs)

    @_counted("eth_getLogs")
    async def block_logs(self, wanted: Sequence[tuple[BlockRef, LogQuery]]) -> FoundLogs:
        """Each block's logs asked by its hash (EIP-234: a node that lacks the block errs
        rather than answers nothing), all in batches; every log must name the block asked
        for. Each batch is closed by the header, by number, of its newest block, which must be
        ours: the node answering has the chain we hold up to there."""
        calls: list[tuple[str, list]] = []
        expect: list[tuple[BlockRef, Callable[[Any], Any], Callable[[Any], bool] | None]] = []
        for block, query in wanted:
            for address, topics, decode, keep in query.requests():
                calls.append(
                    ("eth_getLogs", [{"blockHash": block.hash, "address": address, "topics": topics}])
                )
                expect.append((block, decode, keep))
        if not calls:
            return FoundLogs()
        answers = await self._batch(
            "eth_getLogs", calls, about=[(block.number, block) for block, _, _ in expect]
        )
        found = FoundLogs()
        for (block, decode, keep), raws in zip(expect, answers, strict=True):
            for decoded in _decoded(raws, decode, keep):
                if decoded.block_hash != block.hash or decoded.block_number != block.number:
                    raise BlockUnknown(
                        "eth_getLogs",
                        f"log of tx {decoded.tx_hash} names block hash {decoded.block_hash} "
                        f"(number {decoded.block_number}), "
                        f"not the block {block.number} its logs were asked for",
                    )
                found.add(decoded)
        return found

    @_counted("eth_getBlockByNumber")
    async def full_blocks(self, numbers: Sequence[int]) -> list[FullBlock | None]:
        """Blocks with their transactions, in batches of BLOCK_BATCH."""
        out: list[FullBlock | None] = []
        raws = await self._batch(
            "eth_getBlockByNumber",
            [("eth_getBlockByNumber", [hex(n), True]) for n in numbers],
            page=BLOCK_BATCH,
        )
        for n, raw in zip(numbers, raws, strict=True):
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
        receipts = await self._receipts_by_block(candidates) if self.block_receipts is not False else None
        if receipts is None:
            receipts = await self._batch(
                "eth_getTransactionReceipt", [("eth_getTransactionReceipt", [h]) for h in sorted(candidates)]
            )
        return _succeeded(receipts, candidates)

    async def _receipts_by_block(self, candidates: dict[str, tuple[int, str]]) -> list[Any] | None:
        """Every receipt of the candidates' blocks, or None when the node lacks eth_getBlockReceipts."""
        blocks = sorted(set(candidates.values()))
        try:
            answers = await self._batch(
                "eth_getBlockReceipts",
                [("eth_getBlockReceipts", [hex(n)]) for n, _ in blocks],
                page=BLOCK_BATCH,
            )
        except RpcError as exc:
            # (Also after it worked: a failover may have moved us to a node without it.)
            if exc.code != METHOD_NOT_FOUND:
                raise
            log.info("block_receipts_unavailable", url=self.transport.url, error=str(exc))
            self.block_receipts = False
            return None
        self.block_receipts = True
        receipts: list[Any] = []
        for (n, _), answer in zip(blocks, answers, strict=True):
            if not isinstance(answer, list):
                raise RpcError("eth_getBlockReceipts", f"block {n}: receipts are not a list")
            receipts += answer
        return receipts

    async def probe_tracer(self, block_number: int) -> str | None:
        """Which tracer the node offers for inner transfers, if any."""
        if self.counts is not None:
            self.counts.called("probe_tracer")
        return await traces.probe_tracer(_Paged(self, "probe_tracer"), block_number)

    @_counted("trace")
    async def internal_transfers(self, numbers: Sequence[int], method: str) -> list[InternalTransfer]:
        """The coin moved by inner calls in these blocks, with the tracer `probe_tracer` found."""
        out: list[InternalTransfer] = []
        paged = _Paged(self, "trace")
        for start in range(0, len(numbers), TRACE_BATCH):
            out += await traces.fetch_internal_transfers(paged, numbers[start : start + TRACE_BATCH], method)
        return out


class _Paged:
    """The reader's transport as the tracers see it: batches kept under the reader's
    `max_batch` (and halved when refused), like every other batch."""

    def __init__(self, reader: JsonRpcReader, method: str) -> None:
        self.reader = reader
        self.method = method

    async def call(self, method: str, params: list) -> Any:
        return await self.reader.transport.call(method, params)

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]:
        return await self.reader._batch(self.method, calls)


def _succeeded(receipts: list[Any], candidates: dict[str, tuple[int, str]]) -> set[str]:
    """The candidates whose receipt says success. Every candidate needs its receipt, in the
    block we read it from: otherwise the chain moved (RpcError)."""
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
