"""Decoding what nodes send, and the HTTP transport against a real local JSON-RPC server that misbehaves."""

from __future__ import annotations

import orjson
import pytest
from aiohttp import web

from harness import free_port
from watcher.chain import TRANSFER_TOPIC, HttpTransport, JsonRpcReader, RpcError, decode_header, decode_transfer_log

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
    ids=["string", "int-topics", "non-hex-topic", "non-hex-data", "int-block-number", "short-hash", "no-tx-hash"],
)
def test_malformed_logs_are_rpc_errors(raw):
    with pytest.raises(RpcError):
        decode_transfer_log(raw)


@pytest.mark.parametrize("raw", [None, [], {"number": "0x1"}, {"number": "1", "hash": "0x" + "1" * 64, "parentHash": "0x" + "2" * 64, "timestamp": "0x1"}])
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
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": {"code": -32005, "message": "too many results"}})

        def answer(call: dict) -> dict:
            return {"jsonrpc": "2.0", "id": call["id"], "result": "0x2a"}

        return web.json_response([answer(c) for c in body] if isinstance(body, list) else answer(body))


@pytest.fixture
async def node():
    n = Node()
    app = web.Application()
    app.router.add_post("/", n.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    n.url = f"http://127.0.0.1:{port}/"
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

    block = {"number": "0x1", "hash": "0x" + "11" * 32, "parentHash": "0x" + "22" * 32, "timestamp": "0x5",
             "transactions": [{"hash": "0x" + "33" * 32, "from": "0x" + "44" * 20, "to": "0x" + "55" * 20, "value": value}]}
    with pytest.raises(RpcError):
        decode_full_block(block)
