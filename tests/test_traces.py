"""Internal native deposits from the node's tracers (watcher.chain.traces).

Tables of hand-written traces pin the rules (what counts, what a revert undoes, what is
malformed); every table case runs through both decoders, the parity list being derived
from the callTracer tree the way a node lays it out, so "same positions whichever tracer"
is checked on every shape. Then the same rules against real anvil traces of TestWallet.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from typing import Any

import pytest
from web3 import Web3
from web3.utils.address import get_create_address

from watcher.chain import HttpTransport, RpcError
from watcher.chain.traces import (
    CALL_TRACER,
    PARITY_TRACER,
    InternalTransfer,
    decode_call_traces,
    decode_parity_traces,
    fetch_internal_transfers,
    probe_tracer,
)
from watcher.contracts import load_artifact

BLOCK = 7
TX1 = "0x" + "11" * 32
TX2 = "0x" + "22" * 32
EOA = "0x" + "e0" * 20
WALLET = "0x" + "aa" * 20
INNER = "0x" + "bb" * 20
X = "0x" + "0c" * 20
Y = "0x" + "0d" * 20


# --------------------------------------------------------------------------
# Hand-written traces
# --------------------------------------------------------------------------


def frame(
    kind: str, frm: str, to: str | None, value: int | None = None, *calls: dict, error: str | None = None
) -> dict:
    """A callTracer frame as geth writes it (upper-case type, hex value, `calls` only when any)."""
    f: dict[str, Any] = {"type": kind, "from": frm, "gas": "0x1000", "gasUsed": "0x10", "input": "0x"}
    if to is not None:
        f["to"] = to
    if value is not None:
        f["value"] = hex(value)
    if calls:
        f["calls"] = list(calls)
    if error is not None:
        f["error"] = error
    return f


def root(value: int, *calls: dict, error: str | None = None) -> dict:
    return frame("CALL", EOA, WALLET, value, *calls, error=error)


def call_block(*txs: tuple[str, dict]) -> list[dict]:
    return [{"txHash": h, "result": r} for h, r in txs]


def parity_block(block_number: int, *txs: tuple[str, dict]) -> list[dict]:
    """The `trace_block` answer for the same transactions: flat, pre-order, with traceAddress."""
    out: list[dict] = []
    for position, (tx_hash, top) in enumerate(txs):
        stack: list[tuple[dict, list[int]]] = [(top, [])]
        while stack:
            f, address = stack.pop()
            kind = f["type"]
            if kind == "SELFDESTRUCT":
                trace_type = "suicide"
                action = {"address": f["from"], "refundAddress": f["to"], "balance": f.get("value", "0x0")}
            elif kind in ("CREATE", "CREATE2"):
                trace_type = "create"
                action = {
                    "from": f["from"],
                    "value": f.get("value", "0x0"),
                    "gas": "0x1000",
                    "init": "0x",
                    "creationMethod": kind.lower(),
                }
            else:
                trace_type = "call"
                action = {
                    "from": f["from"],
                    "to": f["to"],
                    "callType": kind.lower(),
                    "value": f.get("value", "0x0"),
                    "gas": "0x1000",
                    "input": "0x",
                }
            t: dict[str, Any] = {
                "action": action,
                "blockHash": "0x" + "bc" * 32,
                "blockNumber": block_number,
                "result": None if "error" in f else {"gasUsed": "0x10", "output": "0x"},
                "subtraces": len(f.get("calls", [])),
                "traceAddress": address,
                "transactionHash": tx_hash,
                "transactionPosition": position,
                "type": trace_type,
            }
            if "error" in f:
                t["error"] = "Reverted"
            out.append(t)
            for i in range(len(f.get("calls", [])) - 1, -1, -1):
                stack.append((f["calls"][i], [*address, i]))
    return out


def it(tx: str, position: int, frm: str, to: str, amount: int, block: int = BLOCK) -> InternalTransfer:
    return InternalTransfer(
        tx_hash=tx, position=position, block_number=block, from_address=frm, to_address=to, amount=amount
    )


def deep(levels: int) -> dict:
    """A chain of `levels` nested CALLs from the wallet, paying X at the bottom."""
    f = frame("CALL", INNER, X, 1)
    for _ in range(levels):
        f = frame("CALL", INNER, INNER, 0, f)
    return f


CASES: dict[str, tuple[list[tuple[str, dict]], list[InternalTransfer]]] = {
    "empty block": ([], []),
    "plain transfer: the top-level call is not internal": ([(TX1, frame("CALL", EOA, X, 5))], []),
    "one inner call": ([(TX1, root(5, frame("CALL", WALLET, X, 5)))], [it(TX1, 0, WALLET, X, 5)]),
    "zero-value inner calls do not count nor take a position": (
        [
            (
                TX1,
                root(
                    3,
                    frame("CALL", WALLET, INNER, 0),
                    frame("CALL", WALLET, X, 3),
                    frame("CALL", WALLET, INNER),
                ),
            )
        ],
        [it(TX1, 0, WALLET, X, 3)],
    ),
    "several, in pre-order, positions per transaction": (
        [
            (
                TX1,
                root(
                    6,
                    frame("CALL", WALLET, X, 1),
                    frame("CALL", WALLET, INNER, 2, frame("CALL", INNER, Y, 2)),
                    frame("CALL", WALLET, X, 3),
                ),
            ),
            (TX2, root(4, frame("CALL", WALLET, Y, 4))),
        ],
        [
            it(TX1, 0, WALLET, X, 1),
            it(TX1, 1, WALLET, INNER, 2),
            it(TX1, 2, INNER, Y, 2),
            it(TX1, 3, WALLET, X, 3),
            it(TX2, 0, WALLET, Y, 4),
        ],
    ),
    "DELEGATECALL shows msg.value but pays nobody; its inner CALL does": (
        [(TX1, root(11, frame("DELEGATECALL", WALLET, INNER, 11, frame("CALL", WALLET, X, 11))))],
        [it(TX1, 0, WALLET, X, 11)],
    ),
    "STATICCALL and CALLCODE pay nobody": (
        [(TX1, root(2, frame("STATICCALL", WALLET, X), frame("CALLCODE", WALLET, X, 2)))],
        [],
    ),
    "reverted inner call": (
        [
            (
                TX1,
                root(7, frame("CALL", WALLET, X, 7, error="execution reverted"), frame("CALL", WALLET, Y, 1)),
            )
        ],
        [it(TX1, 0, WALLET, Y, 1)],
    ),
    "children and grandchildren of a reverted call": (
        [
            (
                TX1,
                root(
                    8,
                    frame(
                        "CALL",
                        WALLET,
                        WALLET,
                        7,
                        frame("CALL", WALLET, INNER, 7, frame("CALL", INNER, X, 7)),
                        error="execution reverted",
                    ),
                    frame("CALL", WALLET, X, 1),
                ),
            )
        ],
        [it(TX1, 0, WALLET, X, 1)],
    ),
    "a reverted parent undoes a child that did not itself fail": (
        [
            (
                TX1,
                root(
                    7,
                    frame(
                        "CALL",
                        WALLET,
                        INNER,
                        0,
                        frame("STATICCALL", INNER, Y),
                        frame("CALL", INNER, X, 7),
                        error="out of gas",
                    ),
                ),
            )
        ],
        [],
    ),
    "failed transaction: nothing inside counts": (
        [
            (
                TX1,
                root(
                    3,
                    frame("CALL", WALLET, X, 1),
                    frame("CALL", WALLET, INNER, 2, error="execution reverted"),
                    error="execution reverted",
                ),
            ),
            (TX2, root(1, frame("CALL", WALLET, Y, 1))),
        ],
        [it(TX2, 0, WALLET, Y, 1)],
    ),
    "CREATE with value is ignored, the SELFDESTRUCT inside pays": (
        [(TX1, root(13, frame("CREATE", WALLET, INNER, 13, frame("SELFDESTRUCT", INNER, X, 13))))],
        [it(TX1, 0, INNER, X, 13)],
    ),
    "CREATE2 without `to` (failed), SELFDESTRUCT of nothing": (
        [
            (
                TX1,
                root(
                    1,
                    frame("CREATE2", WALLET, None, 1, error="contract creation code storage out of gas"),
                    frame("SELFDESTRUCT", WALLET, X, 0),
                ),
            )
        ],
        [],
    ),
    "SELFDESTRUCT inside a reverted frame": (
        [
            (
                TX1,
                root(
                    2,
                    frame(
                        "CALL",
                        WALLET,
                        INNER,
                        2,
                        frame("SELFDESTRUCT", INNER, X, 2),
                        error="execution reverted",
                    ),
                ),
            )
        ],
        [],
    ),
    "addresses are lowercased": (
        [
            (
                TX1.upper().replace("0X", "0x"),
                root(1, frame("CALL", WALLET.upper().replace("0X", "0x"), "0x" + "0C" * 20, 1)),
            )
        ],
        [it(TX1, 0, WALLET, X, 1)],
    ),
    "nesting deeper than Python's recursion limit": ([(TX1, root(1, deep(1500)))], [it(TX1, 0, INNER, X, 1)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_both_decoders_agree_on_the_table(name: str) -> None:
    txs, expected = CASES[name]
    assert decode_call_traces(BLOCK, call_block(*txs)) == expected
    assert decode_parity_traces(BLOCK, parity_block(BLOCK, *txs)) == expected


def test_old_geth_without_tx_hash_is_named_from_the_block() -> None:
    txs = [(TX1, root(1, frame("CALL", WALLET, X, 1))), (TX2, root(2, frame("CALL", WALLET, Y, 2)))]
    bare = [{"result": r} for _, r in txs]
    assert decode_call_traces(BLOCK, bare, [TX1, TX2]) == [it(TX1, 0, WALLET, X, 1), it(TX2, 0, WALLET, Y, 2)]
    assert decode_call_traces(
        BLOCK, call_block(*txs), [TX1.upper().replace("0X", "0x"), TX2]
    ) == decode_call_traces(BLOCK, bare, [TX1, TX2])
    with pytest.raises(RpcError, match="no txHash"):
        decode_call_traces(BLOCK, bare)
    with pytest.raises(RpcError, match="2 traces for 1 transactions"):
        decode_call_traces(BLOCK, bare, [TX1])
    with pytest.raises(RpcError, match="the block has"):
        decode_call_traces(BLOCK, call_block(*txs), [TX2, TX1])


def test_parity_specifics() -> None:
    txs = [
        (
            TX1,
            root(6, frame("CALL", WALLET, X, 1), frame("CALL", WALLET, INNER, 2, frame("CALL", INNER, Y, 2))),
        ),
        (TX2, root(4, frame("CALL", WALLET, Y, 4))),
    ]
    expected = [
        it(TX1, 0, WALLET, X, 1),
        it(TX1, 1, WALLET, INNER, 2),
        it(TX1, 2, INNER, Y, 2),
        it(TX2, 0, WALLET, Y, 4),
    ]
    flat = parity_block(BLOCK, *txs)
    # Order within a transaction comes from traceAddress, not from the list.
    tx1 = [t for t in flat if t["transactionHash"] == TX1]
    shuffled = list(reversed(tx1)) + [t for t in flat if t["transactionHash"] == TX2]
    assert decode_parity_traces(BLOCK, shuffled) == expected
    # blockNumber as hex (some nodes), block rewards (proof-of-work chains) skipped.
    hexed = [{**t, "blockNumber": hex(BLOCK)} for t in flat]
    reward = {
        "action": {"author": X, "rewardType": "block", "value": "0x1bc16d674ec80000"},
        "blockHash": "0x" + "bc" * 32,
        "blockNumber": BLOCK,
        "result": None,
        "subtraces": 0,
        "traceAddress": [],
        "transactionHash": None,
        "transactionPosition": None,
        "type": "reward",
    }
    assert decode_parity_traces(BLOCK, [*hexed, reward]) == expected
    # "selfdestruct" spelling, and the balance read from `balance` with `refundAddress`.
    suicide = parity_block(
        BLOCK, (TX1, root(3, frame("CREATE", WALLET, INNER, 3, frame("SELFDESTRUCT", INNER, X, 3))))
    )
    assert suicide[-1]["type"] == "suicide"
    suicide[-1]["type"] = "selfdestruct"
    assert decode_parity_traces(BLOCK, suicide) == [it(TX1, 0, INNER, X, 3)]


def _set(path: Sequence[Any], value: Any) -> Any:
    """A mutation: set (or, with `...`, delete) the item at `path` of the raw answer."""

    def apply(raw: Any) -> Any:
        raw = copy.deepcopy(raw)
        target = raw
        for key in path[:-1]:
            target = target[key]
        if value is ...:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return raw

    return apply


GOOD_CALL = call_block(
    (
        TX1,
        root(
            3,
            frame("CALL", WALLET, X, 1),
            frame("CALL", WALLET, INNER, 2, frame("SELFDESTRUCT", INNER, Y, 2)),
        ),
    )
)
MALFORMED_CALL = {
    "not a list": lambda raw: {"0": raw[0]},
    "null": lambda raw: None,
    "item not an object": _set([0], "0x"),
    "no result (geth's per-tx tracer error)": lambda raw: [{"txHash": TX1, "error": "tracing failed"}],
    "result not an object": _set([0, "result"], []),
    "txHash not a hash": _set([0, "txHash"], "0x1234"),
    "type missing": _set([0, "result", "calls", 0, "type"], ...),
    "type not a string": _set([0, "result", "calls", 0, "type"], 1),
    "unknown frame type": _set([0, "result", "calls", 0, "type"], "EXTCALL"),
    "value decimal": _set([0, "result", "calls", 0, "value"], "12"),
    "value a number": _set([0, "result", "calls", 0, "value"], 12),
    "value not hex": _set([0, "result", "calls", 0, "value"], "0xzz"),
    "value empty hex": _set([0, "result", "calls", 0, "value"], "0x"),
    "to missing on a paying call": _set([0, "result", "calls", 0, "to"], ...),
    "from not an address": _set([0, "result", "calls", 1, "calls", 0, "from"], "0x12"),
    "calls not a list": _set([0, "result", "calls", 1, "calls"], {"0": {}}),
    "nested frame not an object": _set([0, "result", "calls", 1, "calls", 0], "SELFDESTRUCT"),
    "error not a string": _set([0, "result", "calls", 0, "error"], {"message": "reverted"}),
}


@pytest.mark.parametrize("name", list(MALFORMED_CALL))
def test_malformed_call_traces_are_rpc_errors(name: str) -> None:
    assert decode_call_traces(BLOCK, GOOD_CALL) == [
        it(TX1, 0, WALLET, X, 1),
        it(TX1, 1, WALLET, INNER, 2),
        it(TX1, 2, INNER, Y, 2),
    ]
    with pytest.raises(RpcError) as info:
        decode_call_traces(BLOCK, MALFORMED_CALL[name](GOOD_CALL))
    assert info.value.method == CALL_TRACER


GOOD_PARITY = parity_block(BLOCK, *[(h, r["result"]) for h, r in ((i["txHash"], i) for i in GOOD_CALL)])
MALFORMED_PARITY = {
    "not a list": lambda raw: {"traces": raw},
    "item not an object": _set([1], None),
    "other block": _set([1, "blockNumber"], BLOCK + 1),
    "blockNumber missing": _set([1, "blockNumber"], ...),
    "blockNumber a bool": _set([1, "blockNumber"], True),
    "transactionHash missing": _set([1, "transactionHash"], None),
    "traceAddress not a list": _set([1, "traceAddress"], "0"),
    "traceAddress negative": _set([1, "traceAddress"], [-1]),
    "traceAddress not ints": _set([1, "traceAddress"], ["0"]),
    "two traces at one address": _set([2, "traceAddress"], [0]),
    "no top-level trace": _set([0, "traceAddress"], [9]),
    "a trace whose parent is missing": _set([3, "traceAddress"], [5, 0]),
    "action not an object": _set([1, "action"], None),
    "unknown trace type": _set([1, "type"], "eofcreate"),
    "unknown call type": _set([1, "action", "callType"], "extcall"),
    "value not hex": _set([1, "action", "value"], 1),
    "refundAddress missing": _set([3, "action", "refundAddress"], ...),
    "balance not hex": _set([3, "action", "balance"], "2"),
    "error not a string": _set([1, "error"], 1),
}


@pytest.mark.parametrize("name", list(MALFORMED_PARITY))
def test_malformed_parity_traces_are_rpc_errors(name: str) -> None:
    assert [t["type"] for t in GOOD_PARITY] == ["call", "call", "call", "suicide"]
    assert decode_parity_traces(BLOCK, GOOD_PARITY) == decode_call_traces(BLOCK, GOOD_CALL)
    with pytest.raises(RpcError) as info:
        decode_parity_traces(BLOCK, MALFORMED_PARITY[name](GOOD_PARITY))
    assert info.value.method == PARITY_TRACER


JUNK: list[Any] = [None, 0, -1, True, 1.5, "", "0x", "0xzz", "0x" + "f" * 80, [], [None], {}, {"a": 1}]


def _mutations(raw: Any, path: tuple = ()) -> list[tuple]:
    """Every path into the answer (list indices and object keys)."""
    out = [path]
    if isinstance(raw, list):
        for i, v in enumerate(raw):
            out += _mutations(v, (*path, i))
    elif isinstance(raw, dict):
        for k, v in raw.items():
            out += _mutations(v, (*path, k))
    return out


@pytest.mark.parametrize(
    "decoder,good", [(decode_call_traces, GOOD_CALL), (decode_parity_traces, GOOD_PARITY)]
)
def test_any_mangled_answer_decodes_or_is_an_rpc_error(decoder: Any, good: list) -> None:
    """Never a KeyError, TypeError, ...: each field replaced by junk or removed, one at a time."""
    rng = random.Random(1)
    for path in _mutations(good)[1:]:
        for junk in [*rng.sample(JUNK, 5), ...]:
            raw = _set(path, junk)(good)
            try:
                result = decoder(BLOCK, raw)
            except RpcError:
                continue
            assert isinstance(result, list) and all(isinstance(t, InternalTransfer) for t in result), (
                path,
                junk,
            )


# --------------------------------------------------------------------------
# Fetching and probing, with a scripted transport
# --------------------------------------------------------------------------


class Scripted:
    """Answers from a table (method -> function of params), recording every request."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, Any]] = []

    def _answer(self, method: str, params: list) -> Any:
        answer = self.answers.get(method)
        if answer is None:
            raise RpcError(method, "the method does not exist/is not available", -32601)
        return answer(params)

    async def call(self, method: str, params: list) -> Any:
        self.requests.append(("call", (method, params)))
        return self._answer(method, params)

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]:
        self.requests.append(("batch", list(calls)))
        return [self._answer(m, p) for m, p in calls]


TRACES_BY_BLOCK = {
    5: [(TX1, root(1, frame("CALL", WALLET, X, 1)))],
    6: [],
    7: [(TX2, root(2, frame("CALL", WALLET, Y, 2)))],
}


def _by_block(make: Any) -> Any:
    return lambda params: make(int(params[0], 16), *TRACES_BY_BLOCK[int(params[0], 16)])


async def test_fetch_is_one_batch_for_all_blocks() -> None:
    expected = [it(TX1, 0, WALLET, X, 1, block=5), it(TX2, 0, WALLET, Y, 2, block=7)]
    node = Scripted(
        {CALL_TRACER: _by_block(lambda n, *txs: call_block(*txs)), PARITY_TRACER: _by_block(parity_block)}
    )
    assert await fetch_internal_transfers(node, [5, 6, 7], CALL_TRACER) == expected
    assert await fetch_internal_transfers(node, [5, 6, 7], PARITY_TRACER) == expected
    assert await fetch_internal_transfers(node, [], PARITY_TRACER) == []
    assert node.requests == [
        (
            "batch",
            [
                (CALL_TRACER, ["0x5", {"tracer": "callTracer"}]),
                (CALL_TRACER, ["0x6", {"tracer": "callTracer"}]),
                (CALL_TRACER, ["0x7", {"tracer": "callTracer"}]),
            ],
        ),
        ("batch", [(PARITY_TRACER, ["0x5"]), (PARITY_TRACER, ["0x6"]), (PARITY_TRACER, ["0x7"])]),
    ]
    with pytest.raises(ValueError):
        await fetch_internal_transfers(node, [5], "eth_getLogs")


async def test_fetch_names_old_geth_traces_from_the_blocks() -> None:
    node = Scripted(
        {
            CALL_TRACER: _by_block(lambda n, *txs: [{"result": r} for _, r in txs]),
            "eth_getBlockByNumber": lambda params: {
                "transactions": [h for h, _ in TRACES_BY_BLOCK[int(params[0], 16)]]
            },
        }
    )
    assert await fetch_internal_transfers(node, [5, 6, 7], CALL_TRACER) == [
        it(TX1, 0, WALLET, X, 1, block=5),
        it(TX2, 0, WALLET, Y, 2, block=7),
    ]
    # The second batch asks only for the blocks that had unnamed traces (6 has none).
    assert node.requests[1] == (
        "batch",
        [("eth_getBlockByNumber", ["0x5", False]), ("eth_getBlockByNumber", ["0x7", False])],
    )
    node.answers["eth_getBlockByNumber"] = lambda params: {"transactions": []}
    with pytest.raises(RpcError, match="1 traces for 0 transactions"):
        await fetch_internal_transfers(node, [5], CALL_TRACER)


async def test_fetch_refuses_missing_blocks_and_short_batches() -> None:
    node = Scripted({PARITY_TRACER: lambda params: None})
    with pytest.raises(RpcError, match="unknown block"):
        await fetch_internal_transfers(node, [5], PARITY_TRACER)

    class Short(Scripted):
        async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]:
            return (await super().batch(calls))[:-1]

    with pytest.raises(RpcError, match="does not match"):
        await fetch_internal_transfers(Short({PARITY_TRACER: lambda params: []}), [5, 6], PARITY_TRACER)


async def test_probe_prefers_call_tracer_then_parity_then_none() -> None:
    both = Scripted({CALL_TRACER: lambda p: [], PARITY_TRACER: lambda p: []})
    assert await probe_tracer(both, 5) == CALL_TRACER
    assert both.requests == [("call", (CALL_TRACER, ["0x5", {"tracer": "callTracer"}]))]

    parity = Scripted({PARITY_TRACER: _by_block(parity_block)})
    assert await probe_tracer(parity, 5) == PARITY_TRACER
    assert [r[1][0] for r in parity.requests] == [CALL_TRACER, PARITY_TRACER]

    # Only "no such method" means no tracer; a node with neither answers so for both.
    assert await probe_tracer(Scripted({}), 5) is None


async def test_probe_raises_what_is_not_an_absent_method() -> None:
    """A garbled trace, a node behind ("header not found"), a rate limit: asked again later,
    never taken for "no tracer" (which would stop finding such payments for good)."""
    from watcher.chain.failover import EndpointDown

    def fails(exc: RpcError) -> Any:
        def answer(params: list) -> Any:
            raise exc

        return answer

    garbage = Scripted({CALL_TRACER: lambda p: {"structLogs": []}})
    with pytest.raises(RpcError):
        await probe_tracer(garbage, 5)
    behind = Scripted({CALL_TRACER: fails(RpcError(CALL_TRACER, "header not found", -32000))})
    with pytest.raises(RpcError, match="header not found"):
        await probe_tracer(behind, 5)
    limited = Scripted({CALL_TRACER: fails(EndpointDown(CALL_TRACER, "HTTP 429", 429))})
    with pytest.raises(EndpointDown):
        await probe_tracer(limited, 5)
    # A provider that forbids the namespace (HTTP 403, or says it is not allowed) has none.
    forbidden = Scripted(
        {
            CALL_TRACER: fails(EndpointDown(CALL_TRACER, "HTTP 403", 403)),
            PARITY_TRACER: fails(RpcError(PARITY_TRACER, "method trace_block is not allowed", -32000)),
        }
    )
    assert await probe_tracer(forbidden, 5) is None


# --------------------------------------------------------------------------
# Real anvil traces of TestWallet
# --------------------------------------------------------------------------


class Chain:
    """TestWallet and a coin-refusing PaymentRouter on an anvil node, driven by its unlocked dev account."""

    GAS = 500_000  # explicit: a reverting transaction is mined instead of refused by estimation

    def __init__(self, node: Any) -> None:
        self.node = node
        self.sender = node.rpc("eth_accounts")[0].lower()
        self.wallet = self.deploy("TestWallet")
        self.refuser = self.deploy("PaymentRouter")  # no receive/fallback: refuses the coin
        self.abi = Web3().eth.contract(abi=load_artifact("TestWallet")["abi"])

    def receipt(self, tx_hash: str) -> dict:
        deadline = time.monotonic() + 10
        while (receipt := self.node.rpc("eth_getTransactionReceipt", tx_hash)) is None:
            assert time.monotonic() < deadline, tx_hash
            time.sleep(0.01)
        return receipt

    def deploy(self, name: str) -> str:
        tx_hash = self.node.rpc(
            "eth_sendTransaction", {"from": self.sender, "data": load_artifact(name)["bytecode"]}
        )
        return self.receipt(tx_hash)["contractAddress"].lower()

    def send(self, fn: str, args: list, value: int) -> str:
        args = [
            [Web3.to_checksum_address(a) for a in x]
            if isinstance(x, list) and x and isinstance(x[0], str)
            else Web3.to_checksum_address(x)
            if isinstance(x, str)
            else x
            for x in args
        ]
        data = self.abi.encode_abi(fn, args=args)
        return self.node.rpc(
            "eth_sendTransaction",
            {"from": self.sender, "to": self.wallet, "data": data, "value": hex(value), "gas": hex(self.GAS)},
        )

    def pay(self, to: str, value: int) -> str:
        return self.node.rpc("eth_sendTransaction", {"from": self.sender, "to": to, "value": hex(value)})

    def balance(self, address: str) -> int:
        return int(self.node.rpc("eth_getBalance", address, "latest"), 16)


async def _both(url: str, numbers: Sequence[int]) -> list[InternalTransfer]:
    """Both tracers' answers, asserted equal; each in exactly one batch request."""
    transport = HttpTransport(url, retry_delays=())
    batches: list[int] = []
    real_batch = transport.batch

    async def counting(calls: Sequence[tuple[str, list]]) -> list[Any]:
        batches.append(len(calls))
        return await real_batch(calls)

    transport.batch = counting  # type: ignore[method-assign]
    try:
        by_call_tracer = await fetch_internal_transfers(transport, numbers, CALL_TRACER)
        by_parity = await fetch_internal_transfers(transport, numbers, PARITY_TRACER)
        assert await probe_tracer(transport, numbers[0]) == CALL_TRACER
    finally:
        await transport.close()
    assert by_call_tracer == by_parity
    assert batches == [len(numbers), len(numbers)]
    return by_call_tracer


async def test_anvil_one_block_both_tracers(anvil_node: Any) -> None:
    node = anvil_node()
    chain = Chain(node)
    w, r = chain.wallet, chain.refuser
    sweeper = get_create_address(Web3.to_checksum_address(w), 1).lower()  # the wallet's first CREATE
    node.rpc("evm_setAutomine", False)
    a = chain.send("forward", [X], 5)
    b = chain.send("forwardMany", [[X, Y, X], [1, 2, 3]], 6)
    c = chain.send("forwardIgnoringFailure", [X], 7)
    d = chain.send("forwardMany", [[X, r], [1, 2]], 3)  # pays X, then the router refuses: all undone
    e = chain.pay(X, 9)
    f = chain.send("forwardByDelegatecall", [X], 11)
    g = chain.send("forwardBySelfdestruct", [X], 13)
    node.mine(1)
    number = node.head()
    block = node.rpc("eth_getBlockByNumber", hex(number), False)
    assert block["transactions"] == [a, b, c, d, e, f, g]
    assert [int(chain.receipt(h)["status"], 16) for h in block["transactions"]] == [1, 1, 1, 0, 1, 1, 1]
    # What actually moved: c's and d's inner sends to X were undone.
    assert (chain.balance(X), chain.balance(Y), chain.balance(w)) == (5 + 1 + 3 + 9 + 11 + 13, 2, 7)

    assert await _both(node.url, [number]) == [
        it(a, 0, w, X, 5, number),
        it(b, 0, w, X, 1, number),
        it(b, 1, w, Y, 2, number),
        it(b, 2, w, X, 3, number),
        it(f, 0, w, X, 11, number),
        it(g, 0, sweeper, X, 13, number),
    ]

    # anvil names every trace (txHash); without the names, the block's list gives the same.
    raw = node.rpc(CALL_TRACER, hex(number), {"tracer": "callTracer"})
    assert [t["txHash"] for t in raw] == block["transactions"]
    bare = [{"result": t["result"]} for t in raw]
    assert decode_call_traces(number, bare, block["transactions"]) == decode_call_traces(number, raw)
    # trace_block keeps the failed transaction's traces, its top-level one marked "Reverted".
    flat = node.rpc(PARITY_TRACER, hex(number))
    assert [(t["traceAddress"], t.get("error")) for t in flat if t["transactionHash"] == d] == [
        ([], "Reverted"),
        ([0], None),
        ([1], "Reverted"),
    ]


async def test_anvil_across_blocks_both_tracers(anvil_node: Any) -> None:
    node = anvil_node()
    chain = Chain(node)
    w = chain.wallet
    start = node.head()
    a = chain.send("forward", [X], 5)
    chain.receipt(a)
    node.mine(1)  # an empty block in between
    c = chain.send("forwardIgnoringFailure", [Y], 7)
    chain.receipt(c)
    b = chain.send("forwardMany", [[Y, X], [1, 2]], 3)
    chain.receipt(b)
    e = chain.pay(Y, 9)
    chain.receipt(e)
    numbers = list(range(start + 1, node.head() + 1))
    assert len(numbers) == 5
    assert await _both(node.url, numbers) == [
        it(a, 0, w, X, 5, start + 1),
        it(b, 0, w, Y, 1, start + 4),
        it(b, 1, w, X, 2, start + 4),
    ]
