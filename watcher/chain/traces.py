"""Internal native deposits: coin that reaches an address from inside a contract call.

A Safe, a smart-contract wallet or an exchange hot wallet pays with an inner CALL (or a
SELFDESTRUCT): no log is emitted and the transaction's own `to`/`value` name the contract,
not us, so only the node's tracers show the payment. Two tracer dialects exist and nodes
offer one, the other or both: geth's `debug_traceBlockByNumber` with `callTracer` (a tree
per transaction) and parity's `trace_block` (a flat list addressed by `traceAddress`).
Both decoders here yield the same `InternalTransfer`s, positions included, for the same
block, so a payment keeps its unique key whichever tracer a node happens to offer.

What counts, and why:

* a CALL with value > 0 and a SELFDESTRUCT with balance > 0 move coin to `to`;
* DELEGATECALL and CALLCODE run someone else's code in the caller's own account and
  STATICCALL cannot carry value, so none of them pays `to` (tracers still show the
  inherited msg.value on a DELEGATECALL frame: the type decides, never the value);
* CREATE/CREATE2 pay a brand-new contract, which is never one of our deposit addresses;
* anything under a reverted frame, the reverted frame itself, and every frame of a
  failed transaction was undone by the EVM;
* the transaction's own top-level call is left out: plain transfers are found from the
  block's transactions, and counting them here would count them twice.

Like `chain`, this is the edge where node JSON becomes our types: hex becomes `int`,
addresses become lowercase, and anything not shaped like a trace is an `RpcError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .failover import EndpointDown
from .transport import METHOD_NOT_FOUND, RpcError

__all__ = [
    "CALL_TRACER",
    "PARITY_TRACER",
    "InternalTransfer",
    "TraceTransport",
    "decode_call_traces",
    "decode_parity_traces",
    "fetch_internal_transfers",
    "probe_tracer",
]

CALL_TRACER: Final = "debug_traceBlockByNumber"
PARITY_TRACER: Final = "trace_block"

_CALL_TRACER_OPTIONS: Final = {"tracer": "callTracer"}

_HEX: Final = frozenset("0123456789abcdef")

# callTracer frame types (geth writes them upper case), split by whether `to` gets the value.
_PAYING_FRAMES: Final = frozenset({"CALL", "SELFDESTRUCT"})
_NON_PAYING_FRAMES: Final = frozenset({"DELEGATECALL", "STATICCALL", "CALLCODE", "CREATE", "CREATE2"})
# parity `action.callType`s; only a plain call pays `to`.
_PARITY_CALL_TYPES: Final = frozenset({"call", "delegatecall", "staticcall", "callcode"})


@dataclass(frozen=True, slots=True)
class InternalTransfer:
    """Coin moved to `to_address` by an inner call (or SELFDESTRUCT) that stuck.

    `position` numbers the counted transfers of one transaction from 0 in depth-first
    pre-order (the order the EVM made them); it is part of a payment's unique key, so it
    counts every counted transfer, ours or not, and does not depend on the tracer.
    """

    tx_hash: str
    position: int
    block_number: int
    from_address: str
    to_address: str
    amount: int


class TraceTransport(Protocol):
    """The part of `chain.Transport` this module uses."""

    async def call(self, method: str, params: list) -> Any: ...

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]: ...


# --------------------------------------------------------------------------
# Field checks: a node's answer that is not trace-shaped is an RpcError.
# --------------------------------------------------------------------------


def _quantity(value: Any, method: str, what: str, *, default: int | None = None) -> int:
    """A hex quantity; `default` when the field is absent (geth omits zero values)."""
    if value is None and default is not None:
        return default
    if (
        isinstance(value, str)
        and value[:2] in ("0x", "0X")
        and 2 < len(value) <= 66
        and _HEX.issuperset(value[2:].lower())
    ):
        return int(value, 16)
    raise RpcError(method, f"{what}: expected a hex quantity, got {value!r}")


def _number(value: Any, method: str, what: str) -> int:
    """A plain JSON integer or a hex quantity: parity-style nodes write both."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return _quantity(value, method, what)


def _address(value: Any, method: str, what: str) -> str:
    if (
        isinstance(value, str)
        and len(value) == 42
        and value[:2] in ("0x", "0X")
        and _HEX.issuperset(value[2:].lower())
    ):
        return value.lower()
    raise RpcError(method, f"{what}: expected an address, got {value!r}")


def _tx_hash(value: Any, method: str, what: str) -> str:
    if (
        isinstance(value, str)
        and len(value) == 66
        and value[:2] in ("0x", "0X")
        and _HEX.issuperset(value[2:].lower())
    ):
        return value.lower()
    raise RpcError(method, f"{what}: expected a transaction hash, got {value!r}")


def _object(value: Any, method: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RpcError(method, f"{what}: expected an object, got {type(value).__name__}")
    return value


def _failed(frame: dict[str, Any], method: str, what: str) -> bool:
    """Whether the frame itself was undone; geth and parity both name the reason in `error`."""
    error = frame.get("error")
    if error is None or error == "":
        return False
    if not isinstance(error, str):
        raise RpcError(method, f"{what}.error: expected a string, got {error!r}")
    return True


# --------------------------------------------------------------------------
# callTracer
# --------------------------------------------------------------------------


def decode_call_traces(
    block_number: int, raw: Any, tx_hashes: Sequence[str] | None = None
) -> list[InternalTransfer]:
    """Counted inner transfers of a `debug_traceBlockByNumber` + `callTracer` answer.

    Current geth, reth and anvil name each transaction (`txHash`); older geth gives only
    `{"result": ...}` in block order, so then `tx_hashes` (the block's transactions, in
    order) must say which is which. When both are there they must agree: a trace of some
    other block than the one we think we are reading is not an answer.
    """
    method = CALL_TRACER
    if not isinstance(raw, list):
        raise RpcError(method, f"block {block_number}: expected a list of traces, got {type(raw).__name__}")
    if tx_hashes is not None and len(tx_hashes) != len(raw):
        raise RpcError(method, f"block {block_number}: {len(raw)} traces for {len(tx_hashes)} transactions")
    transfers: list[InternalTransfer] = []
    for index, item in enumerate(raw):
        what = f"block {block_number} trace {index}"
        item = _object(item, method, what)
        if "result" not in item:
            # geth reports a transaction its tracer could not trace in place of the result;
            # skipping it could skip a payment.
            raise RpcError(method, f"{what}: not traced: {item.get('error')!r}")
        named = item.get("txHash")
        if named is None:
            if tx_hashes is None:
                raise RpcError(method, f"{what}: no txHash and no transaction list to name it")
            tx_hash = _tx_hash(tx_hashes[index], method, f"{what} (from the block)")
        else:
            tx_hash = _tx_hash(named, method, f"{what}.txHash")
            if tx_hashes is not None and tx_hash != str(tx_hashes[index]).lower():
                raise RpcError(method, f"{what}: traced {tx_hash}, the block has {tx_hashes[index]!r}")
        transfers += _walk_call_frames(block_number, tx_hash, item["result"], what)
    return transfers


def _walk_call_frames(block_number: int, tx_hash: str, root: Any, what: str) -> list[InternalTransfer]:
    """Pre-order over the frame tree with an explicit stack: calls nest up to 1024 deep,
    past Python's recursion limit."""
    method = CALL_TRACER
    transfers: list[InternalTransfer] = []
    # (frame, path for messages, an ancestor was undone, is the transaction's own call)
    stack: list[tuple[Any, str, bool, bool]] = [(root, f"{what}.result", False, True)]
    while stack:
        frame, path, undone_above, top = stack.pop()
        frame = _object(frame, method, path)
        kind = frame.get("type")
        if not isinstance(kind, str):
            raise RpcError(method, f"{path}.type: expected a string, got {kind!r}")
        kind = kind.upper()
        if kind not in _PAYING_FRAMES and kind not in _NON_PAYING_FRAMES:
            # A frame type we do not know might move coin; guessing either way is wrong.
            raise RpcError(method, f"{path}.type: unknown frame type {kind!r}")
        undone = undone_above or _failed(frame, method, path)
        if not top and not undone and kind in _PAYING_FRAMES:
            amount = _quantity(frame.get("value"), method, f"{path}.value", default=0)
            if amount > 0:
                transfers.append(
                    InternalTransfer(
                        tx_hash=tx_hash,
                        position=len(transfers),
                        block_number=block_number,
                        from_address=_address(frame.get("from"), method, f"{path}.from"),
                        to_address=_address(frame.get("to"), method, f"{path}.to"),
                        amount=amount,
                    )
                )
        calls = frame.get("calls")
        if calls is None:
            continue
        if not isinstance(calls, list):
            raise RpcError(method, f"{path}.calls: expected a list, got {type(calls).__name__}")
        for i in range(len(calls) - 1, -1, -1):
            stack.append((calls[i], f"{path}.calls[{i}]", undone, False))
    return transfers


# --------------------------------------------------------------------------
# parity trace_block
# --------------------------------------------------------------------------


def decode_parity_traces(block_number: int, raw: Any) -> list[InternalTransfer]:
    """Counted inner transfers of a `trace_block` answer.

    The list is flat, so a frame's fate is read from its ancestors: a trace whose
    `traceAddress` has an errored trace's address as a prefix (the empty address, the
    transaction itself, included) was undone with it; a trace whose parent is missing
    cannot be judged and is an error. Traces are put in `traceAddress`
    order per transaction, which is the pre-order callTracer lists, so positions match.
    """
    method = PARITY_TRACER
    if not isinstance(raw, list):
        raise RpcError(method, f"block {block_number}: expected a list of traces, got {type(raw).__name__}")
    by_tx: dict[str, dict[tuple[int, ...], tuple[int, dict[str, Any]]]] = {}
    for index, trace in enumerate(raw):
        what = f"block {block_number} trace {index}"
        trace = _object(trace, method, what)
        kind = trace.get("type")
        if kind == "reward":
            # Block and uncle rewards (OpenEthereum, Erigon on proof-of-work chains) belong
            # to no transaction and are not an inner call.
            continue
        number = _number(trace.get("blockNumber"), method, f"{what}.blockNumber")
        if number != block_number:
            raise RpcError(method, f"{what}: trace of block {number}, asked for {block_number}")
        tx_hash = _tx_hash(trace.get("transactionHash"), method, f"{what}.transactionHash")
        address = trace.get("traceAddress")
        # map/set/min keep this at C speed: a 1024-deep trace has half a million indices.
        if (
            not isinstance(address, list)
            or not set(map(type, address)) <= {int}
            or min(address, default=0) < 0
        ):
            raise RpcError(method, f"{what}.traceAddress: expected a list of indices, got {address!r}")
        frames = by_tx.setdefault(tx_hash, {})
        if tuple(address) in frames:
            raise RpcError(method, f"{what}: two traces at {address} in {tx_hash}")
        frames[tuple(address)] = (index, trace)
    transfers: list[InternalTransfer] = []
    for tx_hash, frames in by_tx.items():
        if () not in frames:
            raise RpcError(method, f"block {block_number}: {tx_hash} has no top-level trace")
        transfers += _parity_transaction(block_number, tx_hash, frames)
    return transfers


def _parity_transaction(
    block_number: int, tx_hash: str, frames: dict[tuple[int, ...], tuple[int, dict[str, Any]]]
) -> list[InternalTransfer]:
    method = PARITY_TRACER
    # Sorted, a parent comes before its children, so each frame inherits "undone" from its
    # parent in one lookup (checking every prefix would be cubic in a 1024-deep trace).
    undone: dict[tuple[int, ...], bool] = {}
    transfers: list[InternalTransfer] = []
    for address in sorted(frames):
        index, trace = frames[address]
        what = f"block {block_number} trace {index}"
        parent = address[:-1]
        if address and parent not in undone:
            raise RpcError(method, f"{what}: no trace at its parent address {list(parent)} in {tx_hash}")
        undone[address] = (bool(address) and undone[parent]) or _failed(trace, method, what)
        counted = _parity_payment(trace, what)
        if counted is None or not address or undone[address]:
            continue
        from_address, to_address, amount = counted
        if amount > 0:
            transfers.append(
                InternalTransfer(
                    tx_hash=tx_hash,
                    position=len(transfers),
                    block_number=block_number,
                    from_address=from_address,
                    to_address=to_address,
                    amount=amount,
                )
            )
    return transfers


def _parity_payment(trace: dict[str, Any], what: str) -> tuple[str, str, int] | None:
    """(from, to, amount) when the trace's kind pays its target; None when it cannot."""
    method = PARITY_TRACER
    kind = trace.get("type")
    action = _object(trace.get("action"), method, f"{what}.action")
    if kind == "call":
        call_type = action.get("callType")
        if not isinstance(call_type, str) or call_type not in _PARITY_CALL_TYPES:
            raise RpcError(method, f"{what}.action.callType: unknown call type {call_type!r}")
        if call_type != "call":
            return None
        return (
            _address(action.get("from"), method, f"{what}.action.from"),
            _address(action.get("to"), method, f"{what}.action.to"),
            _quantity(action.get("value"), method, f"{what}.action.value", default=0),
        )
    if kind in ("suicide", "selfdestruct"):
        return (
            _address(action.get("address"), method, f"{what}.action.address"),
            _address(action.get("refundAddress"), method, f"{what}.action.refundAddress"),
            _quantity(action.get("balance"), method, f"{what}.action.balance", default=0),
        )
    if kind == "create":
        return None
    raise RpcError(method, f"{what}.type: unknown trace type {kind!r}")


# --------------------------------------------------------------------------
# Talking to the node
# --------------------------------------------------------------------------


def _params(method: str, number: int) -> list:
    if method == CALL_TRACER:
        return [hex(number), dict(_CALL_TRACER_OPTIONS)]
    if method == PARITY_TRACER:
        return [hex(number)]
    raise ValueError(f"not a tracer method: {method!r}")


async def fetch_internal_transfers(
    transport: TraceTransport, numbers: Sequence[int], method: str
) -> list[InternalTransfer]:
    """Counted inner transfers of the given blocks, in block then trace order.

    One batch for all the blocks: tracing is the node's most expensive read, and one round
    trip keeps a catch-up of many blocks from paying latency per block. Only an old geth
    that leaves `txHash` out costs a second batch, for the blocks' transaction lists.
    """
    calls = [(method, _params(method, n)) for n in numbers]
    if not calls:
        return []
    answers = await transport.batch(calls)
    if not isinstance(answers, list) or len(answers) != len(calls):
        raise RpcError(method, "batch answer does not match the request")
    return await _decode_blocks(transport, method, numbers, answers)


async def _decode_blocks(
    transport: TraceTransport, method: str, numbers: Sequence[int], answers: Sequence[Any]
) -> list[InternalTransfer]:
    for number, answer in zip(numbers, answers, strict=True):
        if answer is None:
            # Some nodes answer null for a block they do not have; the caller asked for it
            # because it exists, so this is the node falling behind or a reorg, not "empty".
            raise RpcError(method, f"block {number}: no traces (unknown block?)")
    if method == PARITY_TRACER:
        return [
            t
            for number, answer in zip(numbers, answers, strict=True)
            for t in decode_parity_traces(number, answer)
        ]
    unnamed = [
        number
        for number, answer in zip(numbers, answers, strict=True)
        if isinstance(answer, list)
        and any(isinstance(item, dict) and "txHash" not in item for item in answer)
    ]
    hashes = await _block_tx_hashes(transport, unnamed) if unnamed else {}
    return [
        t
        for number, answer in zip(numbers, answers, strict=True)
        for t in decode_call_traces(number, answer, hashes.get(number))
    ]


async def _block_tx_hashes(transport: TraceTransport, numbers: Sequence[int]) -> dict[int, list[str]]:
    method = "eth_getBlockByNumber"
    blocks = await transport.batch([(method, [hex(n), False]) for n in numbers])
    if not isinstance(blocks, list) or len(blocks) != len(numbers):
        raise RpcError(method, "batch answer does not match the request")
    hashes: dict[int, list[str]] = {}
    for number, block in zip(numbers, blocks, strict=True):
        block = _object(block, method, f"block {number}")
        transactions = block.get("transactions")
        if not isinstance(transactions, list):
            raise RpcError(method, f"block {number}.transactions: expected a list")
        hashes[number] = [_tx_hash(h, method, f"block {number}.transactions") for h in transactions]
    return hashes


async def probe_tracer(transport: TraceTransport, block_number: int) -> str | None:
    """The tracer method this node offers, callTracer first; None if it has neither.

    callTracer comes first because geth, reth, erigon and anvil all offer it and it nests
    the way the EVM ran; `trace_block` is for nodes that only speak parity (Nethermind and
    OpenEthereum descendants, some providers). Only an answer that says the method is not
    there (`-32601`, "not supported", an HTTP 403/405/501) counts as "not offered"; any
    other failure (a node behind, a rate limit, a timeout, a garbled trace) is raised, so
    the caller asks again later rather than stop looking for such payments for good.
    Pick a block past genesis (geth refuses to trace genesis).
    """
    for method in (CALL_TRACER, PARITY_TRACER):
        try:
            answer = await transport.call(method, _params(method, block_number))
            await _decode_blocks(transport, method, [block_number], [answer])
        except RpcError as exc:
            if method_absent(exc):
                continue
            raise
        return method
    return None


# ("header not found" and the like are a node behind, not a missing method: not listed.)
_ABSENT_WORDS = ("not supported", "unsupported", "does not exist", "not available", "not allowed", "disabled")
_TRANSIENT_WORDS = ("header not found", "unknown block", "block not found", "not yet available", "try again")


def method_absent(exc: RpcError) -> bool:
    """Does this error say the node lacks the method (rather than failing to answer now)?"""
    if isinstance(exc, EndpointDown):
        return exc.code in (403, 405, 501)
    if exc.code == METHOD_NOT_FOUND:
        return True
    text = str(exc).lower()
    return any(word in text for word in _ABSENT_WORDS) and not any(word in text for word in _TRANSIENT_WORDS)
