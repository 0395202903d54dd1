"""HeadSubscriber against real anvil nodes: heads in order, losing the socket, getting it back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from anvil import free_port
from structlog.testing import capture_logs

from watcher.chain.heads import HeadSubscriber

FAST = {"heartbeat": 5.0, "connect_timeout": 2.0, "backoff_initial": 0.05, "backoff_max": 0.2}


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Running:
    """A subscriber's `run()` in a task; `stop()` asserts it ends promptly."""

    def __init__(self, subscriber: HeadSubscriber) -> None:
        self.subscriber = subscriber
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(subscriber.run(self.stopping))

    async def stop(self) -> float:
        started = time.monotonic()
        self.stopping.set()
        await asyncio.wait_for(self.task, 1.0)
        return time.monotonic() - started


@pytest.fixture
async def subscribe():
    made: list[Running] = []

    def make(ws_url: str, on_head: Callable[[int], None], **kwargs: Any) -> Running:
        running = Running(HeadSubscriber(ws_url, on_head, **{**FAST, **kwargs}))
        made.append(running)
        return running

    yield make
    for running in made:
        running.stopping.set()
        await asyncio.wait_for(asyncio.gather(running.task, return_exceptions=True), 5)


class WsProxy:
    """A WebSocket relay in front of a real node that can inject frames or go silent
    (relay nothing, answer no ping), as a half-dead connection does."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.silent = False
        self.clients: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def start(self) -> WsProxy:
        app = web.Application()
        app.router.add_get("/", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._session = aiohttp.ClientSession()
        return self

    async def inject(self, message: Any) -> None:
        for ws in list(self.clients):
            await ws.send_str(message if isinstance(message, str) else orjson.dumps(message).decode())

    async def close(self) -> None:
        for ws in list(self.clients):
            await ws.close()
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        self.clients.add(ws)
        assert self._session is not None
        async with self._session.ws_connect(self.upstream) as upstream:
            relay = asyncio.create_task(self._down(upstream, ws))
            try:
                await self._up(ws, upstream)
            finally:
                relay.cancel()
                self.clients.discard(ws)
        return ws

    async def _down(self, upstream: aiohttp.ClientWebSocketResponse, ws: web.WebSocketResponse) -> None:
        async for message in upstream:
            if message.type == aiohttp.WSMsgType.TEXT and not self.silent:
                await ws.send_str(message.data)

    async def _up(self, ws: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if self.silent:
                continue
            if message.type == aiohttp.WSMsgType.PING:
                await ws.pong(message.data)
            elif message.type == aiohttp.WSMsgType.TEXT:
                await upstream.send_str(message.data)


@pytest.fixture
async def ws_proxy():
    made: list[WsProxy] = []

    async def make(upstream: str) -> WsProxy:
        proxy = await WsProxy(upstream).start()
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        await proxy.close()


async def test_heads_arrive_in_order_over_the_socket(anvil_node, subscribe):
    node = anvil_node()
    heads: list[int] = []
    now = [500.0]
    running = subscribe(node.ws_url, heads.append, clock=lambda: now[0])
    await until(lambda: running.subscriber.mode == "ws")

    for _ in range(3):
        node.mine(1)
    await until(lambda: len(heads) >= 3)

    assert heads == [1, 2, 3]
    assert running.subscriber.mode == "ws"
    assert running.subscriber.last_head_at == 500.0 and running.subscriber.heads == 3
    assert await running.stop() < 1.0
    assert running.subscriber.mode == "poll"


async def test_polls_while_the_node_is_down_and_returns_to_the_socket(anvil_node, subscribe):
    port = free_port()
    heads: list[int] = []
    modes: list[str] = []
    with capture_logs() as logs:
        running = subscribe(f"ws://127.0.0.1:{port}", heads.append, on_mode=modes.append)
        await until(lambda: [e["event"] for e in logs].count("ws_heads_lost") >= 3)
        assert running.subscriber.mode == "poll" and modes == []

        node = anvil_node(port=port)
        await until(lambda: running.subscriber.mode == "ws")
        node.mine(1)
        await until(lambda: heads == [1])

        node.stop()
        await until(lambda: running.subscriber.mode == "poll")
        assert running.subscriber.last_error is not None

        restarted = anvil_node(port=port)
        await until(lambda: running.subscriber.mode == "ws")
        restarted.mine(2)
        await until(lambda: len(heads) >= 3)

    assert heads == [1, 1, 2]  # the restarted node is a new chain
    assert modes == ["ws", "poll", "ws"]
    events = [e["event"] for e in logs]
    assert events.count("ws_heads_subscribed") == 2
    lost_after_subscribing = [
        e for e in logs[events.index("ws_heads_subscribed") :] if e["event"] == "ws_heads_lost"
    ]
    assert (
        lost_after_subscribing[0]["retry_in"] == FAST["backoff_initial"]
    )  # a subscription resets the backoff
    assert running.subscriber.subscriptions == 2
    assert await running.stop() < 1.0


async def test_malformed_notifications_are_skipped(anvil_node, subscribe, ws_proxy):
    node = anvil_node()
    proxy = await ws_proxy(node.ws_url)
    heads: list[int] = []
    running = subscribe(proxy.url, heads.append)
    await until(lambda: running.subscriber.mode == "ws")
    subscription = running.subscriber.subscription

    with capture_logs() as logs:
        await proxy.inject("{not json")
        await proxy.inject(
            {
                "jsonrpc": "2.0",
                "method": "eth_subscription",
                "params": {"subscription": subscription, "result": {"number": "zz"}},
            }
        )
        await proxy.inject(
            {
                "jsonrpc": "2.0",
                "method": "eth_subscription",
                "params": {"subscription": "0xother", "result": {"number": "0x63"}},
            }
        )
        await proxy.inject([1, 2, 3])
        node.mine(1)
        await until(lambda: heads == [1])

    assert running.subscriber.mode == "ws" and running.subscriber.subscriptions == 1
    assert [e["event"] for e in logs].count("ws_heads_malformed") == 2
    assert "ws_heads_lost" not in [e["event"] for e in logs]


async def test_a_failing_callback_does_not_end_the_subscription(anvil_node, subscribe):
    node = anvil_node()
    heads: list[int] = []

    def on_head(number: int) -> None:
        heads.append(number)
        if number == 1:
            raise RuntimeError("the follower is having a bad day")

    running = subscribe(node.ws_url, on_head)
    await until(lambda: running.subscriber.mode == "ws")
    with capture_logs() as logs:
        node.mine(1)
        node.mine(1)
        await until(lambda: len(heads) >= 2)

    assert heads == [1, 2] and running.subscriber.mode == "ws"
    assert [e["event"] for e in logs] == ["ws_heads_callback_failed"]


async def test_the_heartbeat_notices_a_silently_dead_socket(anvil_node, subscribe, ws_proxy):
    node = anvil_node()
    proxy = await ws_proxy(node.ws_url)
    running = subscribe(proxy.url, lambda n: None, heartbeat=0.2)
    await until(lambda: running.subscriber.mode == "ws")

    proxy.silent = True
    started = time.monotonic()
    await until(lambda: running.subscriber.mode == "poll", timeout=3)

    assert time.monotonic() - started < 2
    assert "PONG" in (running.subscriber.last_error or "")
    proxy.silent = False
    await until(lambda: running.subscriber.mode == "ws", timeout=3)


async def test_an_unreachable_node_is_polled_with_doubling_backoff(subscribe):
    with capture_logs() as logs:
        running = subscribe(f"ws://alice:s3cret@127.0.0.1:{free_port()}/?key=TOPSECRET", lambda n: None)
        await until(lambda: len([e for e in logs if e["event"] == "ws_heads_lost"]) >= 4)
        assert await running.stop() < 1.0

    lost = [e for e in logs if e["event"] == "ws_heads_lost"]
    assert [e["retry_in"] for e in lost[:4]] == [0.05, 0.1, 0.2, 0.2]
    assert running.subscriber.mode == "poll" and running.subscriber.subscriptions == 0
    assert "ClientConnectorError" in (running.subscriber.last_error or "")
    assert "s3cret" not in repr(logs) and "TOPSECRET" not in repr(logs)
