"""A JSON-RPC HTTP proxy in front of a real node that misbehaves on demand.

The watcher's resilience (retries, backoff, splitting getLogs ranges, reorg detection, failing
over) is only believable if it is exercised against the failures real providers produce: rate
limits, 5xx from load balancers, hung requests, cut connections, garbled bodies, provider-side
query limits and answers from a node that disagrees with the others. anvil never does any of
that, so tests point the watcher at this proxy instead and switch faults on and off:

    proxy = FaultProxy(node.url)
    await proxy.start()
    proxy.inject(Fault("http_429", method="eth_getLogs", times=2))
    ...  # watcher uses proxy.url
    assert proxy.injected[("http_429", "eth_getLogs")] == 2
    await proxy.close()

Faults are consulted in inject order and the first one that matches an HTTP request decides
what happens to it; `times` counts down per matching HTTP request (a batch is one request).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

KINDS = frozenset(
    {"timeout", "malformed_json", "rpc_error", "wrong_block_hash", "drop_connection", "stale_head"}
)

# Faults that only make sense for one method: without an explicit method they still only match
# requests that contain it, so they are neither spent nor counted on requests they cannot alter.
IMPLIED_METHOD = {"wrong_block_hash": "eth_getLogs", "stale_head": "eth_blockNumber"}


@dataclass
class Fault:
    """One misbehaviour, with how often and for which method.

    kind: "timeout", "http_<status>" (e.g. "http_429", "http_503"), "malformed_json",
        "rpc_error", "wrong_block_hash", "drop_connection" or "stale_head".
    method: match only requests (or batches containing a request) with this method; None = any.
    times: how many matching HTTP requests it affects before it expires (counted down in place
        and then removed from `FaultProxy.faults`); None = until cleared.
    delay: for "timeout", seconds to hold the request before forwarding it normally;
        None holds it until the client gives up (or the proxy closes), which is what a client
        timeout test wants.
    code, message: the JSON-RPC error for "rpc_error" (default: a provider's getLogs limit).
    lag: for "stale_head", how many blocks behind the real head eth_blockNumber answers.
    """

    kind: str
    method: str | None = None
    times: int | None = None
    delay: float | None = None
    code: int = -32005
    message: str = "query returned more than 10000 results"
    lag: int = 5

    def __post_init__(self) -> None:
        # A typo in a kind would otherwise be a fault that silently never fires.
        if self.kind not in KINDS and not _http_status(self.kind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None for until cleared)")

    @property
    def match_method(self) -> str | None:
        return self.method or IMPLIED_METHOD.get(self.kind)


def _http_status(kind: str) -> int | None:
    prefix, _, code = kind.partition("_")
    if prefix == "http" and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    return None


def _methods(body: Any) -> list[str]:
    calls = body if isinstance(body, list) else [body]
    return [str(call.get("method")) for call in calls if isinstance(call, dict)]


class FaultProxy:
    """Forwards JSON-RPC over HTTP to `upstream_url`, except where an injected fault says otherwise.

    `requests` counts every JSON-RPC call seen, by method (each member of a batch once);
    `injected` counts each fault that actually fired as (kind, method), where method is the
    fault's method (eth_getLogs / eth_blockNumber implied for wrong_block_hash / stale_head), or
    the request's own for a method-less fault on a single request (None for a batch).
    `down = True` resets every connection until it is set back, like a dead node; faults are
    neither consulted nor spent meanwhile.
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.faults: list[Fault] = []
        self.injected: Counter[tuple[str, str | None]] = Counter()
        self.requests: Counter[str] = Counter()
        self.down = False
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.ServerRunner | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("FaultProxy is not started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        # handler_cancellation: a held "timeout" request must end when its client gives up,
        # not be forwarded later behind the test's back.
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        # Short shutdown: held requests are the point of a timeout fault, not work to wait for.
        self._runner = web.ServerRunner(server, shutdown_timeout=0.1)
        await self._runner.setup()
        # Binding the socket ourselves gives a free port with no window for another process.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def inject(self, fault: Fault) -> Fault:
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Removes every fault; counters are kept so a test can still assert on what happened."""
        self.faults.clear()

    def _take_fault(self, methods: list[str]) -> Fault | None:
        for fault in self.faults:
            wanted = fault.match_method
            if wanted is not None and wanted not in methods:
                continue
            if fault.times is not None:
                fault.times -= 1
                if fault.times == 0:
                    self.faults.remove(fault)
            return fault
        return None

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        methods = _methods(body)
        self.requests.update(methods)
        if self.down:
            return await _reset(request)
        fault = self._take_fault(methods)
        if fault is not None:
            single_method = methods[0] if isinstance(body, dict) and methods else None
            self.injected[(fault.kind, fault.match_method or single_method)] += 1
        try:
            return await (self._forward(raw) if fault is None else self._apply(fault, request, raw, body))
        except aiohttp.ClientError as error:
            # The upstream itself failing is not an injected fault; say so plainly.
            return web.Response(status=502, text=f"FaultProxy upstream error: {error!r}")

    async def _apply(self, fault: Fault, request: web.BaseRequest, raw: bytes, body: Any) -> web.StreamResponse:
        if (status := _http_status(fault.kind)) is not None:
            headers = {"Retry-After": "1"} if status == 429 else None
            return web.Response(status=status, text=f"{status} injected by FaultProxy", headers=headers)
        if fault.kind == "drop_connection":
            return await _drop(request)
        if fault.kind == "timeout":
            if fault.delay is None:
                await asyncio.Future()  # until the client disconnects or the proxy closes
            await asyncio.sleep(fault.delay or 0)
            return await self._forward(raw)
        if fault.kind == "malformed_json":
            status, data = await self._post(raw)
            # A strict prefix of a JSON object or array is never valid JSON.
            return web.Response(status=status, body=data[: max(1, len(data) // 2)], content_type="application/json")
        if fault.kind == "rpc_error":
            return await self._rpc_error(fault, raw, body)
        if fault.kind == "wrong_block_hash":
            return await self._rewrite(raw, body, "eth_getLogs", _rehash_logs)
        if fault.kind == "stale_head":
            return await self._rewrite(raw, body, "eth_blockNumber", lambda head: hex(max(0, int(head, 16) - fault.lag)))
        raise AssertionError(fault.kind)

    async def _post(self, raw: bytes) -> tuple[int, bytes]:
        assert self._session is not None, "FaultProxy is not started"
        async with self._session.post(self.upstream_url, data=raw, headers={"Content-Type": "application/json"}) as answer:
            return answer.status, await answer.read()

    async def _forward(self, raw: bytes) -> web.Response:
        status, data = await self._post(raw)
        return web.Response(status=status, body=data, content_type="application/json")

    async def _rpc_error(self, fault: Fault, raw: bytes, body: Any) -> web.Response:
        error = {"code": fault.code, "message": fault.message}
        if not isinstance(body, list):
            call_id = body.get("id") if isinstance(body, dict) else None
            return _json({"jsonrpc": "2.0", "id": call_id, "error": error})
        # In a batch only the matching calls fail, like a provider refusing one heavy query.
        hit = [isinstance(call, dict) and fault.method in (None, call.get("method")) for call in body]
        rest = [call for call, failed in zip(body, hit) if not failed]
        answered: dict[bytes, Any] = {}
        if rest:
            status, data = await self._post(orjson.dumps(rest))
            if status != 200:
                return web.Response(status=status, body=data, content_type="application/json")
            upstream = orjson.loads(data)
            for answer in upstream if isinstance(upstream, list) else [upstream]:
                answered[orjson.dumps(answer.get("id"))] = answer
        merged = []
        for call, failed in zip(body, hit):
            call_id = call.get("id") if isinstance(call, dict) else None
            if failed:
                merged.append({"jsonrpc": "2.0", "id": call_id, "error": error})
            elif (answer := answered.get(orjson.dumps(call_id))) is not None:
                merged.append(answer)
        return _json(merged)

    async def _rewrite(self, raw: bytes, body: Any, method: str, change: Callable[[Any], Any]) -> web.Response:
        status, data = await self._post(raw)
        if status != 200:
            return web.Response(status=status, body=data, content_type="application/json")
        calls = body if isinstance(body, list) else [body]
        wanted = {orjson.dumps(call.get("id")) for call in calls if isinstance(call, dict) and call.get("method") == method}
        answer = orjson.loads(data)
        for item in answer if isinstance(answer, list) else [answer]:
            if isinstance(item, dict) and "result" in item and orjson.dumps(item.get("id")) in wanted:
                item["result"] = change(item["result"])
        return _json(answer)


def _rehash_logs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # One fake hash per real block, so logs of one block still agree with each other, as they
    # would coming from a node on another fork.
    fakes: dict[str, str] = {}
    for log in logs:
        real = log.get("blockHash")
        if real is not None:
            log["blockHash"] = fakes.setdefault(real, "0x" + secrets.token_hex(32))
    return logs


def _json(value: Any) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


async def _drop(request: web.BaseRequest) -> web.StreamResponse:
    """Closes the connection without an answer, as a crashing node or a proxy idle cut does."""
    assert request.transport is not None
    request.transport.close()
    await asyncio.Future()  # handler_cancellation ends this when the connection is gone
    raise AssertionError("unreachable")


async def _reset(request: web.BaseRequest) -> web.StreamResponse:
    """Aborts with a TCP RST (linger 0), which clients see as 'connection reset', like a dead node."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await asyncio.Future()
    raise AssertionError("unreachable")
