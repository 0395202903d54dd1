"""The fault proxy against real anvil, through a plain aiohttp client.

Resilience tests are only as good as the faults they are fed: a fault that silently does not fire,
or fires on the wrong requests, or never expires, would make them pass for the wrong reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from anvil import Anvil
from faultproxy import Fault, FaultProxy

DEV_ACCOUNT = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
# Init code PUSH1 0, PUSH1 0, LOG0, STOP: a contract creation whose constructor emits one empty log.
EMIT_LOG = "0x60006000a000"
ALL_LOGS = {"fromBlock": "0x0", "toBlock": "latest"}


def call(method: str, *params: Any, id: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": list(params)}


class Client:
    """A raw JSON-RPC client, so what the proxy sends is seen unfiltered by any library."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def post(self, body: Any, timeout: float = 5) -> tuple[int, bytes]:
        async with self.session.post(
            self.url,
            data=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            return response.status, await response.read()

    async def json(self, body: Any) -> Any:
        status, data = await self.post(body)
        assert status == 200, data
        return orjson.loads(data)

    async def result(self, method: str, *params: Any) -> Any:
        answer = await self.json(call(method, *params))
        assert "error" not in answer, answer
        return answer["result"]


@pytest.fixture
async def node(anvil_node: Any) -> Anvil:
    return anvil_node()


@pytest.fixture
async def proxy(node: Anvil) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(node.url)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def client(session: aiohttp.ClientSession, proxy: FaultProxy) -> Client:
    return Client(session, proxy.url)


@pytest.fixture
def direct(session: aiohttp.ClientSession, node: Anvil) -> Client:
    return Client(session, node.url)


async def emit_log(node: Anvil) -> dict[str, Any]:
    """Mines one log and returns its receipt; anvil publishes the receipt a moment after the hash."""
    tx = node.rpc("eth_sendTransaction", {"from": DEV_ACCOUNT, "data": EMIT_LOG})
    for _ in range(100):
        receipt = node.rpc("eth_getTransactionReceipt", tx)
        if receipt is not None:
            assert len(receipt["logs"]) == 1
            return receipt
        await asyncio.sleep(0.02)
    raise AssertionError("no receipt")


async def test_single_and_batch_requests_are_forwarded_intact(
    client: Client, direct: Client, proxy: FaultProxy
) -> None:
    single = await client.json(call("eth_chainId", id="a-string-id"))
    assert single == {"jsonrpc": "2.0", "id": "a-string-id", "result": "0x7a69"}

    batch = [
        call("eth_chainId", id=7),
        call("eth_blockNumber", id="x"),
        call("eth_getBalance", DEV_ACCOUNT, "latest", id=9),
    ]
    through_proxy = await client.json(batch)
    assert [answer["id"] for answer in through_proxy] == [7, "x", 9]
    assert through_proxy == await direct.json(batch)

    assert proxy.requests == {"eth_chainId": 2, "eth_blockNumber": 1, "eth_getBalance": 1}
    assert not proxy.injected


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_http_status_fault_then_normal(client: Client, proxy: FaultProxy, status: int) -> None:
    proxy.inject(Fault(f"http_{status}", times=1))

    got, body = await client.post(call("eth_chainId"))
    assert got == status
    assert len(body) < 100
    assert await client.result("eth_chainId") == "0x7a69"
    assert proxy.injected == {(f"http_{status}", "eth_chainId"): 1}


async def test_times_counts_matching_http_requests_and_a_batch_once(
    client: Client, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("http_429", method="eth_getLogs", times=2))

    assert await client.result("eth_chainId") == "0x7a69"  # other methods pass, and do not spend it
    assert (await client.post(call("eth_getLogs", ALL_LOGS)))[0] == 429
    batch = [call("eth_chainId", id=1), call("eth_getLogs", ALL_LOGS, id=2)]
    assert (await client.post(batch))[0] == 429
    assert await client.result("eth_getLogs", ALL_LOGS) == []

    assert proxy.injected == {("http_429", "eth_getLogs"): 2}
    assert not proxy.faults


async def test_first_matching_fault_wins_and_clear_ends_unlimited_faults(
    client: Client, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("http_500", method="eth_getLogs"))
    proxy.inject(Fault("http_503"))

    for _ in range(3):
        assert (await client.post(call("eth_getLogs", ALL_LOGS)))[0] == 500
        assert (await client.post(call("eth_chainId")))[0] == 503
    proxy.clear()
    assert await client.result("eth_getLogs", ALL_LOGS) == []

    assert proxy.injected == {("http_500", "eth_getLogs"): 3, ("http_503", "eth_chainId"): 3}


async def test_timeout_outlasts_the_client_then_normal(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("timeout", method="eth_blockNumber", times=1))

    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await client.post(call("eth_blockNumber"), timeout=0.3)
    assert time.monotonic() - started >= 0.3
    assert await client.result("eth_blockNumber") == "0x0"
    assert proxy.injected == {("timeout", "eth_blockNumber"): 1}


async def test_timeout_with_delay_answers_late_but_correctly(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("timeout", times=1, delay=0.4))

    started = time.monotonic()
    assert await client.result("eth_chainId") == "0x7a69"
    assert time.monotonic() - started >= 0.4


async def test_a_request_its_client_gave_up_on_is_never_delivered_late(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("timeout", times=1, delay=0.4))

    with pytest.raises(asyncio.TimeoutError):
        await client.post(call("anvil_mine", "0x1"), timeout=0.15)
    await asyncio.sleep(0.5)
    assert node.head() == 0


async def test_close_does_not_wait_for_held_requests(node: Anvil, session: aiohttp.ClientSession) -> None:
    proxy = FaultProxy(node.url)
    await proxy.start()
    proxy.inject(Fault("timeout"))
    held = asyncio.create_task(Client(session, proxy.url).post(call("eth_chainId"), timeout=10))
    await asyncio.sleep(0.2)

    started = time.monotonic()
    await proxy.close()
    assert time.monotonic() - started < 2
    with pytest.raises(aiohttp.ClientError):
        await held


async def test_malformed_json_then_normal(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("malformed_json", times=1))

    status, body = await client.post(call("eth_chainId"))
    assert status == 200
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body)
    assert await client.result("eth_chainId") == "0x7a69"
    assert proxy.injected == {("malformed_json", "eth_chainId"): 1}


async def test_rpc_error_default_and_given(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("rpc_error", method="eth_getLogs", times=1))
    proxy.inject(Fault("rpc_error", method="eth_call", times=1, code=3, message="execution reverted"))

    answer = await client.json(call("eth_getLogs", ALL_LOGS, id=42))
    assert answer == {
        "jsonrpc": "2.0",
        "id": 42,
        "error": {"code": -32005, "message": "query returned more than 10000 results"},
    }
    answer = await client.json(call("eth_call", {"to": DEV_ACCOUNT}, "latest", id="c"))
    assert answer["id"] == "c" and answer["error"] == {"code": 3, "message": "execution reverted"}
    assert await client.result("eth_getLogs", ALL_LOGS) == []
    assert proxy.injected == {("rpc_error", "eth_getLogs"): 1, ("rpc_error", "eth_call"): 1}


async def test_rpc_error_in_a_batch_fails_only_the_matching_calls(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("rpc_error", method="eth_getLogs", times=1, message="limit exceeded"))

    batch = [call("eth_chainId", id=1), call("eth_getLogs", ALL_LOGS, id=2), call("eth_blockNumber", id=3)]
    answers = await client.json(batch)
    assert [answer["id"] for answer in answers] == [1, 2, 3]
    assert answers[0]["result"] == "0x7a69" and answers[2]["result"] == "0x0"
    assert answers[1]["error"] == {"code": -32005, "message": "limit exceeded"}
    assert proxy.requests == {"eth_chainId": 1, "eth_getLogs": 1, "eth_blockNumber": 1}


async def test_rpc_error_only_for_the_calls_a_test_picks(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    """A provider's range limit refuses eth_getLogs by range, never by block hash; a request
    with no such call neither fails nor spends the fault."""
    receipt = await emit_log(node)
    by_range = lambda call: "fromBlock" in call["params"][0]  # noqa: E731
    proxy.inject(Fault("rpc_error", method="eth_getLogs", times=1, only=by_range))

    assert await client.result("eth_getLogs", {"blockHash": receipt["blockHash"]}) == receipt["logs"]
    batch = [
        call("eth_getLogs", {"blockHash": receipt["blockHash"]}, id=1),
        call("eth_getLogs", ALL_LOGS, id=2),
    ]
    by_hash, ranged = await client.json(batch)
    assert by_hash["result"] == receipt["logs"] and ranged["error"]["code"] == -32005
    assert await client.result("eth_getLogs", ALL_LOGS) == receipt["logs"]  # spent
    assert proxy.injected == {("rpc_error", "eth_getLogs"): 1}


async def test_wrong_block_hash_changes_only_log_block_hashes(
    node: Anvil, client: Client, direct: Client, proxy: FaultProxy
) -> None:
    receipt = await emit_log(node)
    real_logs = await direct.result("eth_getLogs", ALL_LOGS)
    assert real_logs == receipt["logs"]
    proxy.inject(Fault("wrong_block_hash"))

    # Requests without eth_getLogs neither match nor spend it.
    assert await client.result("eth_getTransactionReceipt", receipt["transactionHash"]) == receipt
    batch = [
        call("eth_getLogs", ALL_LOGS, id=1),
        call("eth_getBlockByNumber", receipt["blockNumber"], False, id=2),
    ]
    logs_answer, block_answer = await client.json(batch)
    single = await client.result("eth_getLogs", ALL_LOGS)

    for logs in (logs_answer["result"], single):
        assert len(logs) == 1
        assert logs[0]["blockHash"] != receipt["blockHash"]
        assert len(bytes.fromhex(logs[0]["blockHash"][2:])) == 32
        assert {**logs[0], "blockHash": receipt["blockHash"]} == real_logs[0]
    assert block_answer["result"]["hash"] == receipt["blockHash"]
    assert proxy.injected == {("wrong_block_hash", "eth_getLogs"): 2}


async def test_drop_connection_then_normal(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("drop_connection", method="eth_chainId", times=1))

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.post(call("eth_chainId"))
    assert await client.result("eth_chainId") == "0x7a69"
    assert proxy.injected == {("drop_connection", "eth_chainId"): 1}


async def test_stale_head_lags_only_block_number(node: Anvil, client: Client, proxy: FaultProxy) -> None:
    node.mine(10)
    proxy.inject(Fault("stale_head", lag=3, times=1))

    assert await client.result("eth_chainId") == "0x7a69"  # not eth_blockNumber: untouched, unspent
    assert await client.result("eth_blockNumber") == hex(7)
    assert await client.result("eth_blockNumber") == hex(10)
    assert proxy.injected == {("stale_head", "eth_blockNumber"): 1}


async def test_down_resets_every_connection_until_set_back(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("http_500", times=1))
    proxy.down = True
    for body in (call("eth_chainId"), [call("eth_chainId", id=1), call("eth_blockNumber", id=2)]):
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.post(body)

    proxy.down = False
    assert (await client.post(call("eth_chainId")))[0] == 500  # faults wait out the outage
    assert await client.result("eth_chainId") == "0x7a69"
    assert proxy.injected == {("http_500", "eth_chainId"): 1}


def test_unknown_kinds_and_spent_times_are_refused() -> None:
    for kind in ("http_200", "http_teapot", "timout"):
        with pytest.raises(ValueError):
            Fault(kind)
    with pytest.raises(ValueError):
        Fault("http_429", times=0)


# ---------------------------------------------------------------------------- nodes that lack blocks


async def three_logged_blocks(node: Anvil) -> list[dict[str, Any]]:
    """Blocks 1, 2 and 3, each with one log (anvil automines here): their receipts."""
    receipts = [await emit_log(node) for _ in range(3)]
    assert [int(r["blockNumber"], 16) for r in receipts] == [1, 2, 3]
    return receipts


def logs_query(first: int, last: int | str) -> dict[str, str]:
    return {"fromBlock": hex(first), "toBlock": last if isinstance(last, str) else hex(last)}


async def test_lagging_backend_answers_as_a_node_lag_blocks_behind(
    node: Anvil, client: Client, direct: Client, proxy: FaultProxy
) -> None:
    r1, r2, r3 = await three_logged_blocks(node)
    proxy.inject(Fault("lagging_backend", lag=1))  # it has blocks up to 2

    assert await client.result("eth_chainId") == "0x7a69"  # not a lagging method: untouched
    assert await client.result("eth_blockNumber") == hex(2)
    # Logs by range: toBlock clamped to its head without an error; a range above it is empty.
    assert await client.result("eth_getLogs", logs_query(0, 3)) == r1["logs"] + r2["logs"]
    assert await client.result("eth_getLogs", logs_query(0, "latest")) == r1["logs"] + r2["logs"]
    assert await client.result("eth_getLogs", logs_query(3, 3)) == []
    # Logs by block hash (EIP-234): a block it lacks is an error, never an empty answer.
    unknown = await client.json(call("eth_getLogs", {"blockHash": r3["blockHash"]}, id=5))
    assert unknown == {"jsonrpc": "2.0", "id": 5, "error": {"code": -32000, "message": "unknown block"}}
    assert await client.result("eth_getLogs", {"blockHash": r2["blockHash"]}) == r2["logs"]
    # Blocks, receipts: null for what it lacks; "latest" is its own head.
    assert await client.result("eth_getBlockByNumber", hex(3), False) is None
    assert (await client.result("eth_getBlockByNumber", hex(2), False))["hash"] == r2["blockHash"]
    assert (await client.result("eth_getBlockByNumber", "latest", True))["hash"] == r2["blockHash"]
    assert await client.result("eth_getBlockByHash", r3["blockHash"], False) is None
    assert (await client.result("eth_getBlockByHash", r2["blockHash"], False))["number"] == hex(2)
    assert await client.result("eth_getTransactionReceipt", r3["transactionHash"]) is None
    assert await client.result("eth_getTransactionReceipt", r2["transactionHash"]) == r2
    assert await client.result("eth_getBlockReceipts", hex(3)) is None
    assert await client.result("eth_getBlockReceipts", r3["blockHash"]) is None
    assert await client.result("eth_getBlockReceipts", hex(2)) == [r2]

    # The node itself has everything.
    assert await direct.result("eth_blockNumber") == hex(3)
    assert await direct.result("eth_getLogs", logs_query(3, 3)) == r3["logs"]
    # Counted per call it answered differently, not per call it could have.
    assert proxy.injected == {
        ("lagging_backend", "eth_blockNumber"): 1,
        ("lagging_backend", "eth_getLogs"): 4,
        ("lagging_backend", "eth_getBlockByNumber"): 2,
        ("lagging_backend", "eth_getBlockByHash"): 1,
        ("lagging_backend", "eth_getTransactionReceipt"): 1,
        ("lagging_backend", "eth_getBlockReceipts"): 2,
    }
    assert proxy.hid("eth_getLogs", 3) and not proxy.hid("eth_getLogs", 2)
    assert proxy.faults  # until cleared


async def test_lagging_backend_rewrites_each_call_of_a_batch(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    _, r2, r3 = await three_logged_blocks(node)
    proxy.inject(Fault("lagging_backend", lag=1, times=1))

    batch = [
        call("eth_getBlockByNumber", hex(2), False, id=1),
        call("eth_getBlockByNumber", hex(3), False, id=2),
        call("eth_getLogs", {"blockHash": r3["blockHash"]}, id=3),
        call("eth_getLogs", {"blockHash": r2["blockHash"]}, id=4),
        call("eth_chainId", id=5),
        call("eth_getBlockByNumber", hex(3), True, id=6),
    ]
    answers = await client.json(batch)
    assert [a["id"] for a in answers] == [1, 2, 3, 4, 5, 6]
    assert answers[0]["result"]["hash"] == r2["blockHash"]
    assert answers[1]["result"] is None and answers[5]["result"] is None
    assert answers[2]["error"]["message"] == "unknown block"
    assert answers[3]["result"] == r2["logs"]
    assert answers[4]["result"] == "0x7a69"
    assert {(h.method, h.blocks, h.batch) for h in proxy.hidden} == {
        ("eth_getBlockByNumber", range(3, 4), 6),
        ("eth_getLogs", range(3, 4), 6),
    }
    # One HTTP request spent it.
    assert not proxy.faults
    assert (await client.result("eth_getBlockByNumber", hex(3), False))["hash"] == r3["blockHash"]


async def test_lagging_logs_behind_an_honest_head_and_honest_headers(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    """The dangerous load balancer: eth_blockNumber and headers from an up-to-date backend, logs
    from one a block behind, which clamps toBlock without saying so."""
    r1, r2, r3 = await three_logged_blocks(node)
    proxy.inject(Fault("lagging_backend", lag=1, methods=("eth_getLogs",)))

    batch = [call("eth_blockNumber", id=1), call("eth_getBlockByNumber", hex(3), False, id=2)]
    head, header = await client.json(batch)
    assert head["result"] == hex(3) and header["result"]["hash"] == r3["blockHash"]
    assert await client.result("eth_getLogs", logs_query(1, 3)) == r1["logs"] + r2["logs"]
    assert await client.result("eth_getLogs", logs_query(3, 3)) == []
    assert proxy.injected == {("lagging_backend", "eth_getLogs"): 2}

    # It lags the moving head: one block later block 3 is there, block 4 is not.
    r4 = await emit_log(node)
    assert await client.result("eth_getLogs", logs_query(3, 4)) == r3["logs"]
    assert proxy.hid("eth_getLogs", 4) and not proxy.hid("eth_getLogs", 3, kind="null_headers")
    proxy.clear()
    assert await client.result("eth_getLogs", logs_query(3, 4)) == r3["logs"] + r4["logs"]


async def test_lagging_backend_only_for_the_calls_a_test_picks(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    """`only`: a load balancer routes some calls (here header-only blocks) to the lagging backend."""
    *_, r3 = await three_logged_blocks(node)
    proxy.inject(
        Fault(
            "lagging_backend",
            lag=2,
            methods=("eth_getBlockByNumber",),
            only=lambda c: c["params"][1] is False,
        )
    )

    batch = [
        call("eth_getBlockByNumber", hex(3), False, id=1),
        call("eth_getBlockByNumber", hex(3), True, id=2),
    ]
    header, full = await client.json(batch)
    assert header["result"] is None
    assert full["result"]["hash"] == r3["blockHash"] and len(full["result"]["transactions"]) == 1
    assert proxy.injected == {("lagging_backend", "eth_getBlockByNumber"): 1}


async def test_null_headers_for_the_newest_blocks_only(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    r1, r2, r3 = await three_logged_blocks(node)
    proxy.inject(Fault("null_headers", count=2))  # blocks 2 and 3

    batch = [call("eth_getBlockByNumber", hex(n), n == 3, id=n) for n in (1, 2, 3)]
    answers = await client.json(batch)
    assert answers[0]["result"]["hash"] == r1["blockHash"]
    assert answers[1]["result"] is None and answers[2]["result"] is None
    # Everything else is honest: the head, "latest", by hash, logs, receipts.
    assert await client.result("eth_blockNumber") == hex(3)
    assert (await client.result("eth_getBlockByNumber", "latest", False))["hash"] == r3["blockHash"]
    assert (await client.result("eth_getBlockByHash", r3["blockHash"], False))["number"] == hex(3)
    assert await client.result("eth_getLogs", logs_query(2, 3)) == r2["logs"] + r3["logs"]
    assert await client.result("eth_getTransactionReceipt", r3["transactionHash"]) == r3
    assert proxy.injected == {("null_headers", "eth_getBlockByNumber"): 2}
    assert proxy.hid("eth_getBlockByNumber", 2) and proxy.hid("eth_getBlockByNumber", 3)


async def test_null_headers_only_in_batches_of_at_least_min_batch(
    node: Anvil, client: Client, proxy: FaultProxy
) -> None:
    *_, r3 = await three_logged_blocks(node)
    proxy.inject(Fault("null_headers", count=1, min_batch=2))

    assert (await client.result("eth_getBlockByNumber", hex(3), False))["hash"] == r3["blockHash"]
    [alone] = await client.json([call("eth_getBlockByNumber", hex(3), False, id=1)])
    assert alone["result"]["hash"] == r3["blockHash"]
    pair = await client.json([call("eth_getBlockByNumber", hex(n), False, id=n) for n in (2, 3)])
    assert pair[0]["result"]["number"] == hex(2) and pair[1]["result"] is None
    assert [(h.blocks, h.batch) for h in proxy.hidden] == [(range(3, 4), 2)]


async def test_batch_cap_refuses_a_longer_batch_as_a_whole(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("batch_cap", cap=100))

    at_cap = [call("eth_chainId", id=i) for i in range(100)]
    assert [a["id"] for a in await client.json(at_cap)] == list(range(100))
    assert await client.result("eth_chainId") == "0x7a69"
    over = [call("eth_getBlockByNumber", hex(0), False, id=i) for i in range(101)]
    status, body = await client.post(over)
    # One JSON-RPC error object in place of the list, with HTTP 200: how providers refuse it.
    assert status == 200
    assert orjson.loads(body) == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32600, "message": "batch size too large"},
    }
    assert proxy.injected == {("batch_cap", None): 1}
    assert proxy.requests["eth_getBlockByNumber"] == 101


async def test_batch_cap_as_http_413_and_times_counts_refused_batches(
    client: Client, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("batch_cap", cap=2, status=413, times=1))

    assert len(await client.json([call("eth_chainId", id=1), call("eth_chainId", id=2)])) == 2  # not spent
    status, _ = await client.post([call("eth_chainId", id=i) for i in range(3)])
    assert status == 413
    assert len(await client.json([call("eth_chainId", id=i) for i in range(3)])) == 3  # spent
    assert proxy.injected == {("batch_cap", None): 1}


async def test_batch_cap_with_an_error_for_each_call(client: Client, proxy: FaultProxy) -> None:
    proxy.inject(Fault("batch_cap", cap=2, each=True, message="batch limit exceeded"))

    answers = await client.json([call("eth_chainId", id=i) for i in ("a", "b", "c")])
    assert answers == [
        {"jsonrpc": "2.0", "id": i, "error": {"code": -32600, "message": "batch limit exceeded"}}
        for i in "abc"
    ]
    assert proxy.requests["eth_chainId"] == 3 and proxy.injected == {("batch_cap", None): 1}


def test_new_kinds_refuse_settings_that_would_never_fire() -> None:
    for bad in (
        dict(kind="rpc_error", methods=("eth_getLogs",)),
        dict(kind="lagging_backend", methods=("eth_call",)),
        dict(kind="lagging_backend", methods=()),
        dict(kind="lagging_backend", method="eth_getLogs"),
        dict(kind="null_headers", count=0),
        dict(kind="batch_cap", cap=0),
        dict(kind="null_headers", min_batch=0),
        dict(kind="batch_cap", status=413, each=True),
        dict(kind="rpc_error", each=True),
        dict(kind="batch_cap", status=302),
    ):
        with pytest.raises(ValueError):
            Fault(**bad)
    assert Fault("rpc_error").code == -32005 and Fault("batch_cap").code == -32600
