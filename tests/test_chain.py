"""Decoding what nodes send, and the HTTP transport against a real local JSON-RPC server that misbehaves."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from harness import free_port

from watcher.chain import (
    TRANSFER_TOPIC,
    HttpTransport,
    JsonRpcReader,
    RpcError,
    decode_header,
    decode_transfer_log,
)

TO = "0x" + "ab" * 20
FROM = "0x" + "cd" * 20
TOKEN = "0x" + "ef" * 20


def log(**over) -> dict:
    raw = {
        "address": TOKEN,
        "topics": [TRANSFER_TOPIC, "0x" + "00" * 12 + FROM[2:], "0x" + "00" * 12 + TO[2:]],
        "data": "0x" + f"{2**200:064x}",
        "blockNumber": "0x10",
        "blockHash": "0x" + "11" * 32,
        "transactionHash": "0x" + "22" * 32,
        "logIndex": "0x3",
        "removed": False,
    }
    raw.update(over)
    return raw


def test_a_transfer_log_decodes_to_exact_values():
    t = decode_transfer_log(log())
    assert (t.token, t.from_address, t.to_address, t.amount) == (TOKEN, FROM, TO, 2**200)
    assert (t.block_number, t.log_index) == (16, 3)


@pytest.mark.parametrize(
    "raw",
    [
        log(topics=[TRANSFER_TOPIC, "0x" + "00" * 32, "0x" + "00" * 32, "0x" + "00" * 32]),  # ERC-721
        log(data="0x"),
        log(removed=True),
        log(topics=["0x" + "99" * 32, "0x" + "00" * 32, "0x" + "00" * 32]),
    ],
    ids=["erc721-four-topics", "no-value", "removed", "other-event"],
)
def test_logs_that_are_not_erc20_transfers_are_skipped(raw):
    assert decode_transfer_log(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        "not a log",
        log(topics=[TRANSFER_TOPIC, 1, 2]),
        log(topics=[TRANSFER_TOPIC, "0x" + "zz" * 32, "0x" + "00" * 32]),
        log(data="0x" + "zz" * 32),
        log(blockNumber=16),
        log(blockHash="0x1234"),
        {k: v for k, v in log().items() if k != "transactionHash"},
    ],
    ids=[
        "string",
        "int-topics",
        "non-hex-topic",
        "non-hex-data",
        "int-block-number",
        "short-hash",
        "no-tx-hash",
    ],
)
def test_malformed_logs_are_rpc_errors(raw):
    with pytest.raises(RpcError):
        decode_transfer_log(raw)


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"number": "0x1"},
        {"number": "1", "hash": "0x" + "1" * 64, "parentHash": "0x" + "2" * 64, "timestamp": "0x1"},
    ],
)
def test_malformed_headers_are_rpc_errors(raw):
    with pytest.raises(RpcError):
        decode_header(raw)


class Node:
    """A JSON-RPC server on loopback whose next answers can be made to fail."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = orjson.loads(await request.read())
        fault = self.faults.pop(0) if self.faults else None
        if fault == "500":
            return web.Response(status=500, text="oops")
        if fault == "429":
            return web.Response(status=429, text="slow down")
        if fault == "garbage":
            return web.Response(status=200, text="{not json")
        if fault == "error":
            return web.json_response(
                {"jsonrpc": "2.0", "id": body["id"], "error": {"code": -32005, "message": "too many results"}}
            )

        def answer(call: dict) -> dict:
            return {"jsonrpc": "2.0", "id": call["id"], "result": "0x2a"}

        return web.json_response([answer(c) for c in body] if isinstance(body, list) else answer(body))


async def serve(handle) -> tuple[web.AppRunner, str]:
    """A JSON-RPC endpoint on loopback answered by `handle`; (runner to clean up, its URL)."""
    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/"


@pytest.fixture
async def node():
    n = Node()
    runner, n.url = await serve(n.handle)
    yield n
    await runner.cleanup()


async def test_transient_faults_are_retried(node):
    node.faults = ["500", "429", "garbage"]
    transport = HttpTransport(node.url, retry_delays=(0.01, 0.01, 0.01))
    try:
        assert await JsonRpcReader(transport).block_number() == 42
        assert node.requests == 4
    finally:
        await transport.close()


async def test_persistent_faults_give_up_with_an_rpc_error(node):
    node.faults = ["500"] * 10
    transport = HttpTransport(node.url, retry_delays=(0.01, 0.01))
    try:
        with pytest.raises(RpcError, match="gave up after 3 attempts"):
            await transport.call("eth_blockNumber", [])
    finally:
        await transport.close()


async def test_a_node_error_is_not_retried_but_reported_with_its_code(node):
    node.faults = ["error"]
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    try:
        with pytest.raises(RpcError) as info:
            await transport.call("eth_getLogs", [{}])
        assert info.value.code == -32005 and node.requests == 1
    finally:
        await transport.close()


async def test_batches_answer_in_request_order(node):
    transport = HttpTransport(node.url)
    try:
        assert await transport.batch([("eth_blockNumber", []), ("eth_chainId", [])]) == ["0x2a", "0x2a"]
    finally:
        await transport.close()


@pytest.mark.parametrize("value", ["0x", "0xzz", "12", None, 5])
def test_a_block_with_a_malformed_quantity_is_the_nodes_error_not_a_crash(value):
    from watcher.chain import decode_full_block

    block = {
        "number": "0x1",
        "hash": "0x" + "11" * 32,
        "parentHash": "0x" + "22" * 32,
        "timestamp": "0x5",
        "transactions": [
            {"hash": "0x" + "33" * 32, "from": "0x" + "44" * 20, "to": "0x" + "55" * 20, "value": value}
        ],
    }
    with pytest.raises(RpcError):
        decode_full_block(block)


# --------------------------------------------------------------------------- nodes that cap, lag and mislead


def test_bloom_bits_agree_with_the_reference_implementation():
    from eth_bloom import BloomFilter  # py-evm's, what eth-tester builds its headers with

    from watcher.bloom import bloom_mask, may_contain

    reference = BloomFilter()
    items = [TOKEN, TRANSFER_TOPIC, "0x" + "00" * 12 + TO[2:]]
    for item in items:
        reference.add(bytes.fromhex(item[2:]))
    mask = 0
    for item in items:
        assert bloom_mask(item) & int(reference) == bloom_mask(item)
        mask |= bloom_mask(item)
    assert mask == int(reference)
    assert may_contain(int(reference), bloom_mask(TOKEN) | bloom_mask(TRANSFER_TOPIC))
    assert not may_contain(int(reference), bloom_mask("0x" + "01" * 20) | bloom_mask(TOKEN))


def _block_hash(n: int) -> str:
    return "0x" + f"{n:064x}"


class CappedNode:
    """A node on loopback with blocks 0..head: it refuses batches longer than `cap` the way
    providers do (`style`), and its logs backend may lag (`logs_head`): ranges are clamped
    silently above it, and headers and logs by hash above it are null / an error."""

    def __init__(self, head: int = 300, cap: int = 100, style: str = "object") -> None:
        self.head, self.cap, self.style = head, cap, style
        self.logs_head: int | None = None
        self.batch_sizes: list[int] = []
        self.batch_methods: list[list[str]] = []
        self.log_of: dict[int, dict] = {}  # block -> one Transfer log in it

    def _header(self, n: int) -> dict | None:
        if n > self.head or (self.logs_head is not None and n > self.logs_head):
            return None
        return {
            "number": hex(n),
            "hash": _block_hash(n),
            "parentHash": _block_hash(n - 1) if n else "0x" + "00" * 32,
            "timestamp": hex(1000 + n),
        }

    def _answer(self, call: dict) -> dict:
        method, params = call["method"], call["params"]
        if method == "eth_getBlockByNumber":
            return {"jsonrpc": "2.0", "id": call["id"], "result": self._header(int(params[0], 16))}
        if method == "eth_getLogs":
            f = params[0]
            if "blockHash" in f:
                n = int(f["blockHash"], 16)
                if self._header(n) is None:
                    return {
                        "jsonrpc": "2.0",
                        "id": call["id"],
                        "error": {"code": -32000, "message": "unknown block"},
                    }
                blocks = [n]
            else:
                top = (
                    int(f["toBlock"], 16)
                    if self.logs_head is None
                    else min(int(f["toBlock"], 16), self.logs_head)
                )
                blocks = list(range(int(f["fromBlock"], 16), top + 1))
            return {
                "jsonrpc": "2.0",
                "id": call["id"],
                "result": [self.log_of[n] for n in blocks if n in self.log_of],
            }
        return {"jsonrpc": "2.0", "id": call["id"], "result": hex(self.head)}

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if isinstance(body, list):
            self.batch_sizes.append(len(body))
            self.batch_methods.append([c["method"] for c in body])
            if len(body) > self.cap:
                if self.style == "413":
                    return web.Response(status=413, text="request entity too large")
                error = {"code": -32600, "message": f"batch size too large, max {self.cap}"}
                if self.style == "each":
                    return web.json_response(
                        [{"jsonrpc": "2.0", "id": c["id"], "error": error} for c in body]
                    )
                return web.json_response({"jsonrpc": "2.0", "id": None, "error": error})
            return web.json_response([self._answer(c) for c in body])
        return web.json_response(self._answer(body))


@pytest.fixture
async def capped():
    made = []

    async def start(**kw) -> CappedNode:
        n = CappedNode(**kw)
        runner, n.url = await serve(n.handle)
        made.append(runner)
        return n

    yield start
    for runner in made:
        await runner.cleanup()


@pytest.mark.parametrize("style", ["object", "413", "each"])
@pytest.mark.parametrize("failover", [False, True], ids=["http", "failover"])
async def test_a_refused_batch_is_sent_again_in_halves_and_the_ceiling_stays_down(capped, style, failover):
    from watcher.chain.failover import FailoverTransport

    node = await capped(head=300, cap=100, style=style)
    transport = (
        FailoverTransport([node.url], retry_delays=(0.01,), endpoint_retry_delays=(0.01,))
        if failover
        else HttpTransport(node.url, retry_delays=(0.01,))
    )
    reader = JsonRpcReader(transport, max_batch=1000)
    try:
        headers = await reader.headers(list(range(0, 250)))
        assert [h.number for h in headers] == list(range(0, 250))
        assert reader.max_batch <= 100
        refused = sum(1 for size in node.batch_sizes if size > 100)
        assert refused >= 1
        again = await reader.headers(list(range(0, 250)))  # the ceiling is remembered: no refusal now
        assert [h.hash for h in again] == [h.hash for h in headers]
        assert sum(1 for size in node.batch_sizes if size > 100) == refused
        if failover:
            assert transport.switches == 0  # a cap is an answer, not a dead endpoint
    finally:
        await transport.close()


async def test_a_configured_max_batch_is_never_passed(capped):
    node = await capped(head=300, cap=40)
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    try:
        await JsonRpcReader(transport, max_batch=40).headers(list(range(0, 250)))
        assert max(node.batch_sizes) == 40
    finally:
        await transport.close()


def _log_in(n: int) -> dict:
    return log(blockNumber=hex(n), blockHash=_block_hash(n), transactionHash="0x" + f"{n:064x}")


async def test_a_range_answered_by_a_backend_without_its_last_block_is_refused(capped):
    """geth clamps toBlock to its own head without an error: the header of the span's last
    block, in the same batch, shows the backend lacks it."""
    from watcher.chain import BlockUnknown, LogQuery

    node = await capped(head=300)
    node.log_of[300] = _log_in(300)
    node.logs_head = 299
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    query = LogQuery(tokens=[TOKEN], recipients=[TO], keep=None, routers=[], payment_ids=None)
    try:
        reader = JsonRpcReader(transport)
        with pytest.raises(BlockUnknown):
            await reader.range_logs(200, 300, query)
        node.logs_head = None
        found = await reader.range_logs(200, 300, query)
        assert [t.block_number for t in found.transfers] == [300]
    finally:
        await transport.close()


async def test_logs_by_hash_must_name_the_block_asked_for(capped):
    from watcher.chain import LogQuery
    from watcher.domain import BlockRef

    node = await capped(head=10)
    node.log_of[5] = _log_in(5)
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    query = LogQuery(tokens=[TOKEN], recipients=None, keep={TO}, routers=[], payment_ids=None)
    ref = BlockRef(5, _block_hash(5), _block_hash(4), 1005)
    try:
        reader = JsonRpcReader(transport)
        found = await reader.block_logs([(ref, query)])
        assert [(t.block_number, t.amount) for t in found.transfers] == [(5, 2**200)]
        node.log_of[5] = _log_in(6)  # a log of another block in the answer for block 5
        with pytest.raises(RpcError, match="names block hash .* not the block 5 its logs were asked for"):
            await reader.block_logs([(ref, query)])
        node.logs_head = 4  # a backend without block 5: EIP-234 says error, never []
        with pytest.raises(RpcError, match="unknown block"):
            await reader.block_logs([(ref, query)])
    finally:
        await transport.close()


async def test_every_batch_of_logs_carries_its_own_proof_header(capped):
    """However the calls are paged (a small max_batch, or a halving), each request that asks for
    logs also asks for the header of its newest block: a page of logs answered by a backend
    behind can never be vouched for by a header another request got from a synced one."""
    from watcher.chain import LogQuery
    from watcher.domain import BlockRef

    node = await capped(head=40, cap=5)
    for n in (12, 17, 30):
        node.log_of[n] = _log_in(n)
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    query = LogQuery(tokens=[TOKEN], recipients=None, keep={TO}, routers=["0x" + "99" * 20], payment_ids=None)
    refs = [BlockRef(n, _block_hash(n), _block_hash(n - 1), 1000 + n) for n in range(10, 35)]
    try:
        reader = JsonRpcReader(transport, max_batch=8)  # the node takes 5: halved to 4
        found = await reader.block_logs([(ref, query) for ref in refs])
        assert sorted(t.block_number for t in found.transfers) == [12, 17, 30]
        spans = await JsonRpcReader(transport, max_batch=2).range_logs(10, 34, query)
        assert sorted(t.block_number for t in spans.transfers) == [12, 17, 30]
        answered = [m for m, size in zip(node.batch_methods, node.batch_sizes, strict=True) if size <= 5]
        assert answered and all(m[-1] == "eth_getBlockByNumber" and "eth_getLogs" in m for m in answered)
    finally:
        await transport.close()


def test_an_empty_bloom_on_a_block_with_transactions_is_not_believed():
    raw = {
        "number": "0x1",
        "hash": "0x" + "11" * 32,
        "parentHash": "0x" + "22" * 32,
        "timestamp": "0x5",
        "logsBloom": "0x" + "00" * 256,
    }
    assert decode_header({**raw, "transactions": []}).bloom == 0
    assert decode_header({**raw, "transactions": ["0x" + "33" * 32]}).bloom is None
    assert decode_header({**raw, "logsBloom": "0x12"}).bloom is None


async def test_a_log_brought_by_two_filtered_requests_is_taken_once(capped):
    """A watch set past one topic filter is asked in several requests; a node that ignores the
    topic filter answers the same log to each. It is one payment, not two."""
    from watcher.chain import LogQuery

    node = await capped(head=20)
    node.log_of[12] = _log_in(12)
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    other = "0x" + "77" * 20
    query = LogQuery(
        tokens=[TOKEN], recipients=[TO, other], keep=None, routers=[], payment_ids=None, topics_per_request=1
    )
    try:
        assert len(query.requests()) == 2
        found = await JsonRpcReader(transport).range_logs(10, 20, query)
        assert [t.block_number for t in found.transfers] == [12]
    finally:
        await transport.close()


async def test_a_large_answer_is_decoded_off_the_event_loop_and_the_same(capped, monkeypatch):
    """Decoding a span's thousands of logs held the loop (the API) for 50-70 ms: past
    OFF_LOOP_ITEMS logs it runs on a worker thread, with the same result; a small one stays."""
    import threading

    from watcher import offload
    from watcher.chain import LogQuery
    from watcher.chain import reader as reader_module

    node = await capped(head=40)
    for n in range(10, 40):
        node.log_of[n] = _log_in(n)
    transport = HttpTransport(node.url, retry_delays=(0.01,))
    query = LogQuery(tokens=[TOKEN], recipients=None, keep={TO}, routers=[], payment_ids=None)
    threads: list[int] = []
    decode = reader_module._found_in_range

    def recorded(*args):
        threads.append(threading.get_ident())
        return decode(*args)

    monkeypatch.setattr(reader_module, "_found_in_range", recorded)
    try:
        results = []
        for limit in (10_000, 10):  # 30 logs: on the loop, then off it
            monkeypatch.setattr(offload, "OFF_LOOP_ITEMS", limit)
            found = await JsonRpcReader(transport).range_logs(10, 39, query)
            results.append(sorted((t.block_number, t.tx_hash, t.amount) for t in found.transfers))
    finally:
        await transport.close()
    assert results[0] == results[1] and len(results[0]) == 30
    assert threads[0] == threading.get_ident() and threads[1] != threading.get_ident()
