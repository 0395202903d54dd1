"""FailoverTransport against real anvil nodes, behind a gate we can break on purpose."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from anvil import free_port
from structlog.testing import capture_logs

from watcher.chain import JsonRpcReader, RpcError
from watcher.chain.failover import EndpointDown, FailoverTransport, redact

REVERTING_INITCODE = "0x60006000fd"  # PUSH1 0 PUSH1 0 REVERT


class Gate:
    """An HTTP endpoint in front of a real node that answers like a failing provider on demand:
    "proxy" (forwards to the node), "503", "429", "garbage" (200, not JSON), "wrong_shape"
    (200, a JSON-RPC error object whatever was asked), "hang" (never answers)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "proxy"
        self.requests = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._closing = asyncio.Event()

    def url(self, secrets: str = "") -> str:
        return (
            f"http://{secrets}127.0.0.1:{self.port}/"
            if not secrets
            else f"http://{secrets}@127.0.0.1:{self.port}/"
        )

    async def start(self) -> Gate:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._client = aiohttp.ClientSession()
        return self

    async def close(self) -> None:
        self._closing.set()
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        if self.mode == "proxy":
            assert self._client is not None
            async with self._client.post(
                self.upstream, data=body, headers={"Content-Type": "application/json"}
            ) as answer:
                return web.Response(
                    body=await answer.read(), status=answer.status, content_type="application/json"
                )
        if self.mode in ("503", "429"):
            return web.Response(status=int(self.mode), text="unavailable")
        if self.mode == "garbage":
            return web.Response(text="<html>bad gateway</html>", content_type="text/html")
        if self.mode == "wrong_shape":
            return web.json_response(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32005, "message": "limit"}}
            )
        await self._closing.wait()  # "hang", until the test is over
        return web.Response(status=504)


@pytest.fixture
async def gates():
    made: list[Gate] = []

    async def make(upstream: str, mode: str = "proxy") -> Gate:
        gate = await Gate(upstream).start()
        gate.mode = mode
        made.append(gate)
        return gate

    yield make
    for gate in made:
        await gate.close()


@pytest.fixture
async def transports():
    made: list[FailoverTransport] = []

    def make(urls: list[str], **kwargs: Any) -> FailoverTransport:
        kwargs.setdefault("endpoint_retry_delays", (0.01,))
        kwargs.setdefault("retry_delays", (0.01,))
        transport = FailoverTransport(urls, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class Switches(list):
    def __call__(self, old: str, new: str, reason: str) -> None:
        self.append((old, new, reason))


async def test_a_dead_first_endpoint_fails_over_to_the_second(anvil_node, transports):
    node = anvil_node(chain_id=4242)
    dead = f"http://127.0.0.1:{free_port()}"
    switches = Switches()
    transport = transports([dead, node.url], on_switch=switches)

    assert await transport.call("eth_chainId", []) == hex(4242)

    assert transport.current_url == transport.url == node.url
    assert transport.switches == transport.failovers == 1
    assert len(switches) == 1
    old, new, reason = switches[0]
    assert (old, new) == (dead, node.url)
    assert "ClientConnectorError" in reason


async def test_once_failed_over_requests_stay_on_the_fallback(anvil_node, gates, transports):
    node = anvil_node()
    gate = await gates(node.url, "503")
    transport = transports([gate.url(), node.url])

    await transport.call("eth_blockNumber", [])
    tried = gate.requests
    node.mine(2)
    assert await transport.call("eth_blockNumber", []) == "0x2"

    assert tried == 2  # the first attempt and one quick retry
    assert gate.requests == tried
    assert transport.switches == 1


async def test_returns_to_the_preferred_endpoint_after_the_cool_down(anvil_node, gates, transports):
    node = anvil_node()
    gate = await gates(node.url, "503")
    now = [1000.0]
    switches = Switches()
    transport = transports([gate.url(), node.url], return_after=30, clock=lambda: now[0], on_switch=switches)
    await transport.call("eth_chainId", [])
    assert transport.current_url == node.url

    now[0] += 31  # cool-down over, preferred still down: one try, and we stay
    await transport.call("eth_chainId", [])
    assert transport.current_url == node.url and gate.requests == 4
    await transport.call("eth_chainId", [])
    assert gate.requests == 4  # the next try waits for the next cool-down

    gate.mode = "proxy"
    await transport.call("eth_chainId", [])
    assert transport.current_url == node.url and gate.requests == 4
    now[0] += 31
    with capture_logs() as logs:
        assert await transport.call("eth_chainId", []) == hex(31337)

    assert transport.current_url == gate.url() and gate.requests == 5
    assert transport.failbacks == 1 and transport.switches == 2
    assert switches[-1] == (node.url, gate.url(), "answered again")
    assert [e["event"] for e in logs] == ["rpc_failback"]


@pytest.mark.parametrize(
    "method, params, code, message",
    [
        ("no_such_method", [], -32601, "Method not found"),
        ("eth_call", [{"data": REVERTING_INITCODE}, "latest"], 3, "execution reverted"),
    ],
)
async def test_a_json_rpc_error_is_the_answer_not_a_failover(
    anvil_node, gates, transports, method, params, code, message
):
    node = anvil_node()
    gate = await gates(node.url)
    transport = transports([gate.url(), node.url])

    with pytest.raises(RpcError) as raised:
        await transport.call(method, params)

    assert not isinstance(raised.value, EndpointDown)
    assert (raised.value.method, raised.value.code) == (method, code)
    assert message in str(raised.value)
    assert gate.requests == 1 and transport.switches == 0


@pytest.mark.parametrize("mode", ["429", "garbage", "wrong_shape", "hang"])
async def test_a_batch_fails_over_from_a_broken_endpoint(anvil_node, gates, transports, mode):
    node = anvil_node()
    node.mine(2)
    gate = await gates(node.url, mode)
    transport = transports([gate.url(), node.url], timeout=0.3, endpoint_retry_delays=())

    started = time.monotonic()
    answers = await transport.batch(
        [("eth_chainId", []), ("eth_blockNumber", []), ("eth_getBlockByNumber", ["0x1", False])]
    )

    assert answers[:2] == [hex(31337), "0x2"]
    assert answers[2]["number"] == "0x1"
    assert transport.current_url == node.url and gate.requests == 1
    assert time.monotonic() - started < 2


async def test_a_reader_reads_headers_through_failover(anvil_node, gates, transports):
    node = anvil_node()
    node.mine(3)
    gate = await gates(node.url, "503")
    reader = JsonRpcReader(transports([gate.url(), node.url]))

    headers = await reader.headers([1, 2, 3])

    assert [h.number for h in headers if h is not None] == [1, 2, 3]
    assert headers[2].parent_hash == headers[1].hash


async def test_all_endpoints_down_is_an_rpc_error_after_the_backoff_schedule(anvil_node, gates, transports):
    node = anvil_node()
    first, second = await gates(node.url, "503"), await gates(node.url, "503")
    transport = transports(
        [first.url(), second.url()], endpoint_retry_delays=(0.01,), retry_delays=(0.1, 0.2)
    )

    started = time.monotonic()
    with pytest.raises(RpcError) as raised:
        await transport.call("eth_chainId", [])
    elapsed = time.monotonic() - started

    assert isinstance(raised.value, EndpointDown)
    assert raised.value.method == "eth_chainId" and raised.value.code == 503
    assert "all 2 endpoints failed 3 times" in str(raised.value)
    assert (first.requests, second.requests) == (6, 6)  # 3 passes of 2 tries each
    assert elapsed >= 0.3
    second.mode = "proxy"
    assert await transport.call("eth_chainId", []) == hex(31337)


async def test_later_passes_start_again_at_the_preferred_endpoint(anvil_node, gates, transports):
    node = anvil_node()
    first, second = await gates(node.url, "503"), await gates(node.url, "proxy")
    transport = transports([first.url(), second.url()], endpoint_retry_delays=(), retry_delays=(0.3,))
    await transport.call("eth_chainId", [])
    assert transport.current_url == second.url() and (first.requests, second.requests) == (1, 1)
    second.mode = "503"

    call = asyncio.create_task(transport.call("eth_chainId", []))
    await until(lambda: first.requests == 2)  # the first pass (second, then first) failed
    first.mode = "proxy"

    assert await call == hex(31337)
    assert transport.current_url == first.url()
    assert (first.requests, second.requests) == (3, 2)  # the second pass began with the preferred


async def test_credentials_never_reach_logs_or_callbacks(anvil_node, gates, transports):
    node = anvil_node()
    gate = await gates(node.url, "hang")
    secrets = ("s3cretpw", "TOPSECRETKEY", "abcdef1234567890abcdef1234")
    preferred = (
        f"http://alice:s3cretpw@127.0.0.1:{gate.port}/v3/abcdef1234567890abcdef1234?apikey=TOPSECRETKEY"
    )
    dead = f"http://bob:s3cretpw@127.0.0.1:{free_port()}/?apikey=TOPSECRETKEY"
    switches = Switches()
    transport = transports([preferred, dead, node.url], timeout=0.2, on_switch=switches)

    with capture_logs() as logs:
        assert await transport.call("eth_chainId", []) == hex(31337)

    assert transport.current_url == node.url
    assert {e["event"] for e in logs} >= {"rpc_failover"}
    shown = repr(logs) + repr(switches)
    assert "127.0.0.1" in shown and not any(s in shown for s in secrets)
    aiohttp_message = f"ConnectionTimeoutError: Connection timeout to host {preferred}"
    assert not any(s in redact(aiohttp_message, preferred) for s in secrets)


async def test_a_json_rpc_error_after_failover_still_moves_to_the_endpoint_that_answered(
    anvil_node, transports
):
    node = anvil_node()
    transport = transports([f"http://127.0.0.1:{free_port()}", node.url])

    with pytest.raises(RpcError) as raised:
        await transport.call("no_such_method", [])

    assert raised.value.code == -32601
    assert transport.current_url == node.url
