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

Besides the transport's failures, the proxy plays the nodes that answer *wrongly but politely*,
which is what loses payments: a load-balanced backend a few blocks behind ("lagging_backend":
logs clamped to its own head without an error, `null` for blocks it lacks, "unknown block"
for logs by a hash it lacks), a node whose newest headers are `null` ("null_headers"), and a
provider's cap on JSON-RPC batches ("batch_cap"). Those rewrite each call of a batch on its
own, as a real backend would answer it.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

KINDS = frozenset(
    {
        "timeout",
        "malformed_json",
        "rpc_error",
        "wrong_block_hash",
        "drop_connection",
        "stale_head",
        "lagging_backend",
        "null_headers",
        "batch_cap",
    }
)

# Faults that only make sense for one method: without an explicit method they still only match
# requests that contain it, so they are neither spent nor counted on requests they cannot alter.
IMPLIED_METHOD = {
    "wrong_block_hash": "eth_getLogs",
    "stale_head": "eth_blockNumber",
    "null_headers": "eth_getBlockByNumber",
}

# Every method whose answer depends on which blocks a node has: what a lagging backend answers
# differently (by default all of them; `Fault.methods` picks some, e.g. only eth_getLogs behind
# a load balancer whose eth_blockNumber and headers come from an up-to-date backend).
LAGGING_METHODS = (
    "eth_blockNumber",
    "eth_getLogs",
    "eth_getBlockByNumber",
    "eth_getBlockByHash",
    "eth_getBlockReceipts",
    "eth_getTransactionReceipt",
)

# Faults that rewrite each call of a request on its own (a batch element by element).
PER_CALL = frozenset({"lagging_backend", "null_headers"})

# (code, message) of the JSON-RPC error a kind answers when the test names none.
DEFAULT_ERRORS = {
    "rpc_error": (-32005, "query returned more than 10000 results"),  # a provider's getLogs limit
    "batch_cap": (-32600, "batch size too large"),
    "lagging_backend": (-32000, "unknown block"),  # geth, for eth_getLogs by a blockHash it lacks (EIP-234)
}


@dataclass
class Fault:
    """One misbehaviour, with how often and for which method.

    kind: "timeout", "http_<status>" (e.g. "http_429", "http_503"), "malformed_json",
        "rpc_error", "wrong_block_hash", "drop_connection", "stale_head", "lagging_backend",
        "null_headers" or "batch_cap".
    method: match only requests (or batches containing a request) with this method; None = any.
    times: how many matching HTTP requests it affects before it expires (counted down in place
        and then removed from `FaultProxy.faults`); None = until cleared.
    delay: for "timeout", seconds to hold the request before forwarding it normally;
        None holds it until the client gives up (or the proxy closes), which is what a client
        timeout test wants.
    code, message: the JSON-RPC error for "rpc_error" (default: a provider's getLogs limit),
        for "batch_cap" (default -32600 "batch size too large") and for "lagging_backend"'s
        eth_getLogs by a block hash it lacks (default -32000 "unknown block").
    lag: for "stale_head", how many blocks behind the real head eth_blockNumber answers; for
        "lagging_backend", how many blocks behind the real head the backend is: it has blocks
        up to head - lag and answers as a node at that height would (see `FaultProxy`).
    methods: for "lagging_backend", which methods lag (default: all of LAGGING_METHODS).
    count: for "null_headers", how many of the newest blocks eth_getBlockByNumber answers
        `null` for (numbers above head - count), everything else honest.
    only: for "lagging_backend" and "null_headers", a test's choice of which calls land on
        the lagging backend (`only(call) -> bool`, the call's JSON-RPC object); the rest are
        answered honestly, as by another backend behind the same load balancer. For
        "rpc_error", which calls of the method fail (e.g. eth_getLogs by range, not by block
        hash: a provider's range limit); a request with none of them neither matches nor
        spends it.
    min_batch: for "lagging_backend" and "null_headers", only calls of a request holding at
        least this many calls land on the lagging backend (a load balancer that sends big
        batches to another pool than single calls); 1 = every request.
    cap: for "batch_cap", the longest batch accepted; a longer one is refused as a whole.
    status: for "batch_cap", 200 refuses with a single JSON-RPC error object in place of the
        batch's list (what most providers do); another status refuses with that HTTP status
        (e.g. 413 Payload Too Large).
    each: for "batch_cap" with status 200, answer a list holding that error for every call
        of the batch instead (how some providers word the same refusal).
    """

    kind: str
    method: str | None = None
    times: int | None = None
    delay: float | None = None
    code: int | None = None
    message: str | None = None
    lag: int = 5
    methods: tuple[str, ...] | None = None
    count: int = 1
    only: Callable[[dict[str, Any]], bool] | None = None
    min_batch: int = 1
    cap: int = 100
    status: int = 200
    each: bool = False

    def __post_init__(self) -> None:
        # A typo in a kind would otherwise be a fault that silently never fires.
        if self.kind not in KINDS and not _http_status(self.kind):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be at least 1 (or None for until cleared)")
        default_code, default_message = DEFAULT_ERRORS.get(self.kind, (-32000, "injected by FaultProxy"))
        self.code = default_code if self.code is None else self.code
        self.message = default_message if self.message is None else self.message
        if self.methods is not None:
            if self.kind != "lagging_backend":
                raise ValueError("methods is for lagging_backend (method picks the requests of other kinds)")
            if not self.methods or not set(self.methods) <= set(LAGGING_METHODS):
                raise ValueError(f"methods must be some of {LAGGING_METHODS}")
        if self.kind == "lagging_backend" and self.method is not None:
            raise ValueError("lagging_backend takes methods=(...), not method=")
        if self.lag < 0 or self.count < 1 or self.cap < 1 or self.min_batch < 1:
            raise ValueError("lag must be at least 0, count, cap and min_batch at least 1")
        if self.status != 200 and _http_status(f"http_{self.status}") is None:
            raise ValueError("status must be 200 or an HTTP error status")
        if self.each and (self.kind != "batch_cap" or self.status != 200):
            raise ValueError("each is for batch_cap refusing with HTTP 200")

    @property
    def match_method(self) -> str | None:
        return self.method or IMPLIED_METHOD.get(self.kind)

    @property
    def lagging_methods(self) -> frozenset[str]:
        """The methods a per-call fault rewrites."""
        if self.kind == "null_headers":
            return frozenset({"eth_getBlockByNumber"})
        return frozenset(self.methods or LAGGING_METHODS)

    def matches(self, body: Any, methods: list[str]) -> bool:
        """Whether this fault takes this HTTP request (and spends one of its `times`)."""
        if self.kind == "batch_cap":
            return isinstance(body, list) and len(body) > self.cap
        if self.kind in PER_CALL:
            return not self.lagging_methods.isdisjoint(methods)
        if self.kind == "rpc_error" and self.only is not None:
            return any(self.fails(call) for call in (body if isinstance(body, list) else [body]))
        wanted = self.match_method
        return wanted is None or wanted in methods

    def fails(self, call: Any) -> bool:
        """For "rpc_error": whether this call of a request is answered with the error."""
        return (
            isinstance(call, dict)
            and self.method in (None, call.get("method"))
            and (self.only is None or self.only(call))
        )


def _http_status(kind: str) -> int | None:
    prefix, _, code = kind.partition("_")
    if prefix == "http" and code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    return None


def _methods(body: Any) -> list[str]:
    calls = body if isinstance(body, list) else [body]
    return [str(call.get("method")) for call in calls if isinstance(call, dict)]


@dataclass
class Hidden:
    """One call a per-call fault answered differently: what it hid, by block number."""

    kind: str
    method: str
    blocks: range  # the block numbers the answer lacks (or is refused for)
    batch: int  # how many calls the request held (1 for a single request)


@dataclass
class _Local:
    """A call answered by the proxy itself."""

    answer: dict[str, Any]


@dataclass
class _Forward:
    """A call sent upstream (perhaps changed), its answer perhaps changed on the way back."""

    call: dict[str, Any]
    after: Callable[[Any], Any] | None = None  # result -> result, only on a successful answer
    altered: list[Hidden] = field(default_factory=list)


class FaultProxy:
    """Forwards JSON-RPC over HTTP to `upstream_url`, except where an injected fault says otherwise.

    `requests` counts every JSON-RPC call seen, by method (each member of a batch once);
    `injected` counts each fault that actually fired as (kind, method), where method is the
    fault's method (eth_getLogs / eth_blockNumber implied for wrong_block_hash / stale_head), or
    the request's own for a method-less fault on a single request (None for a batch). A
    per-call fault ("lagging_backend", "null_headers") counts each call it answered differently,
    under that call's method, and `hidden` lists what it hid: a call that asks only for blocks
    the lagging backend has is answered honestly and counted nowhere.
    `down = True` resets every connection until it is set back, like a dead node; faults are
    neither consulted nor spent meanwhile.

    A lagging backend at height V = real head - lag answers as geth at V would:
    eth_blockNumber is V; eth_getBlockByNumber of a number above V (or eth_getBlockByHash,
    eth_getBlockReceipts, eth_getTransactionReceipt of anything in such a block) is `null`, and
    "latest" is block V; eth_getLogs over a range has its toBlock clamped to V silently (`[]`
    when the whole range is above V); eth_getLogs by a blockHash above V is the JSON-RPC error
    -32000 "unknown block".
    """

    def __init__(self, upstream_url: str) -> None:
        self.upstream_url = upstream_url
        self.faults: list[Fault] = []
        self.injected: Counter[tuple[str, str | None]] = Counter()
        self.requests: Counter[str] = Counter()
        self.hidden: list[Hidden] = []
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

    def hid(self, method: str, block: int, kind: str | None = None) -> bool:
        """Whether a per-call fault (of `kind`, if given) has hidden `block` from a `method` call."""
        return any(h.method == method and block in h.blocks and kind in (None, h.kind) for h in self.hidden)

    def _take_fault(self, body: Any, methods: list[str]) -> Fault | None:
        for fault in self.faults:
            if not fault.matches(body, methods):
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
        fault = self._take_fault(body, methods)
        if fault is not None and fault.kind not in PER_CALL:
            single_method = methods[0] if isinstance(body, dict) and methods else None
            self.injected[(fault.kind, fault.match_method or single_method)] += 1
        try:
            return await (self._forward(raw) if fault is None else self._apply(fault, request, raw, body))
        except aiohttp.ClientError as error:
            # The upstream itself failing is not an injected fault; say so plainly.
            return web.Response(status=502, text=f"FaultProxy upstream error: {error!r}")

    async def _apply(
        self, fault: Fault, request: web.BaseRequest, raw: bytes, body: Any
    ) -> web.StreamResponse:
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
            return web.Response(
                status=status, body=data[: max(1, len(data) // 2)], content_type="application/json"
            )
        if fault.kind == "rpc_error":
            return await self._rpc_error(fault, raw, body)
        if fault.kind == "wrong_block_hash":
            return await self._rewrite(raw, body, "eth_getLogs", _rehash_logs)
        if fault.kind == "stale_head":
            return await self._rewrite(
                raw, body, "eth_blockNumber", lambda head: hex(max(0, int(head, 16) - fault.lag))
            )
        if fault.kind == "batch_cap":
            return _refuse_batch(fault, body)
        if fault.kind in PER_CALL:
            return await self._per_call(fault, raw, body)
        raise AssertionError(fault.kind)

    async def _post(self, raw: bytes) -> tuple[int, bytes]:
        assert self._session is not None, "FaultProxy is not started"
        async with self._session.post(
            self.upstream_url, data=raw, headers={"Content-Type": "application/json"}
        ) as answer:
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
        hit = [fault.fails(call) for call in body]
        rest = [call for call, failed in zip(body, hit, strict=True) if not failed]
        answered: dict[bytes, Any] = {}
        if rest:
            status, data = await self._post(orjson.dumps(rest))
            if status != 200:
                return web.Response(status=status, body=data, content_type="application/json")
            upstream = orjson.loads(data)
            for answer in upstream if isinstance(upstream, list) else [upstream]:
                answered[orjson.dumps(answer.get("id"))] = answer
        merged = []
        for call, failed in zip(body, hit, strict=True):
            call_id = call.get("id") if isinstance(call, dict) else None
            if failed:
                merged.append({"jsonrpc": "2.0", "id": call_id, "error": error})
            elif (answer := answered.get(orjson.dumps(call_id))) is not None:
                merged.append(answer)
        return _json(merged)

    async def _rewrite(
        self, raw: bytes, body: Any, method: str, change: Callable[[Any], Any]
    ) -> web.Response:
        status, data = await self._post(raw)
        if status != 200:
            return web.Response(status=status, body=data, content_type="application/json")
        calls = body if isinstance(body, list) else [body]
        wanted = {
            orjson.dumps(call.get("id"))
            for call in calls
            if isinstance(call, dict) and call.get("method") == method
        }
        answer = orjson.loads(data)
        for item in answer if isinstance(answer, list) else [answer]:
            if isinstance(item, dict) and "result" in item and orjson.dumps(item.get("id")) in wanted:
                item["result"] = change(item["result"])
        return _json(answer)

    # ------------------------------------------------------------------ per-call faults

    async def _upstream(self, method: str, *params: Any) -> Any:
        """One call to the real node for the proxy's own needs (not counted in `requests`)."""
        status, data = await self._post(
            orjson.dumps({"jsonrpc": "2.0", "id": 0, "method": method, "params": list(params)})
        )
        answer = orjson.loads(data) if status == 200 else None
        if not isinstance(answer, dict) or "result" not in answer:
            raise aiohttp.ClientError(f"upstream {method} failed: HTTP {status} {data[:200]!r}")
        return answer["result"]

    async def _per_call(self, fault: Fault, raw: bytes, body: Any) -> web.Response:
        calls = body if isinstance(body, list) else [body]
        if not all(isinstance(call, dict) and "id" in call for call in calls):
            return await self._forward(raw)  # not ours to reinterpret: the node says what is wrong with it
        head = int(await self._upstream("eth_blockNumber"), 16)
        visible = max(0, head - (fault.count if fault.kind == "null_headers" else fault.lag))
        plans = [await self._plan(fault, call, head, visible, len(calls)) for call in calls]
        forwarded = [plan.call for plan in plans if isinstance(plan, _Forward)]
        answered: dict[bytes, Any] = {}
        if forwarded:
            status, data = await self._post(
                orjson.dumps(forwarded if isinstance(body, list) else forwarded[0])
            )
            if status != 200:
                return web.Response(status=status, body=data, content_type="application/json")
            upstream = orjson.loads(data)
            for answer in upstream if isinstance(upstream, list) else [upstream]:
                if isinstance(answer, dict):
                    answered[orjson.dumps(answer.get("id"))] = answer
        merged = []
        for call, plan in zip(calls, plans, strict=True):
            if isinstance(plan, _Local):
                merged.append(plan.answer)
                continue
            answer = answered.get(orjson.dumps(call["id"]))
            if answer is None:
                continue  # the node left it out: so does the proxy
            if plan.after is not None and answer.get("result") is not None:
                answer["result"] = plan.after(answer["result"])
            merged.append(answer)
        return _json(merged if isinstance(body, list) else merged[0])

    def _note(self, fault: Fault, method: str, blocks: range, batch: int) -> None:
        self.injected[(fault.kind, method)] += 1
        self.hidden.append(Hidden(fault.kind, method, blocks, batch))

    async def _plan(
        self, fault: Fault, call: dict[str, Any], head: int, visible: int, batch: int
    ) -> _Local | _Forward:
        """How a backend at height `visible` answers `call` (the real node is at `head`)."""
        method = call.get("method")
        params = call.get("params") or []
        if (
            method not in fault.lagging_methods
            or not isinstance(params, list)
            or batch < fault.min_batch
            or (fault.only is not None and not fault.only(call))
        ):
            return _Forward(call)
        backend = _LaggingBackend(self, fault, call, head, visible, batch)
        planner = {
            "eth_blockNumber": backend.block_number,
            "eth_getBlockByNumber": backend.block_by_number,
            "eth_getBlockByHash": backend.about_a_block,
            "eth_getTransactionReceipt": backend.about_a_block,
            "eth_getBlockReceipts": backend.block_receipts,
            "eth_getLogs": backend.logs,
        }.get(str(method))
        return _Forward(call) if planner is None else await planner(params)


@dataclass
class _LaggingBackend:
    """One call as a backend `visible` blocks high answers it, the real node being at `head`."""

    proxy: FaultProxy
    fault: Fault
    call: dict[str, Any]
    head: int
    visible: int
    batch: int

    def local(self, result: Any = None, error: dict[str, Any] | None = None) -> _Local:
        answer = {"jsonrpc": "2.0", "id": self.call["id"]}
        return _Local(answer | ({"error": error} if error is not None else {"result": result}))

    def hide(self, blocks: range) -> None:
        if blocks:  # a backend that has every block asked about answers like the node
            self.proxy._note(self.fault, str(self.call.get("method")), blocks, self.batch)

    def missing(self, n: int | None) -> bool:
        """Whether block `n` is past this backend's height (noted as hidden when it is)."""
        if n is None or n <= self.visible:
            return False
        self.hide(range(n, n + 1))
        return True

    def hide_above(self) -> None:
        self.hide(range(self.visible + 1, self.head + 1))

    async def number_of_block(self, block_hash: str) -> int | None:
        block = await self.proxy._upstream("eth_getBlockByHash", block_hash, False)
        return _number(block.get("number"), None) if isinstance(block, dict) else None

    async def block_number(self, params: list[Any]) -> _Local | _Forward:
        self.hide_above()
        return self.local(hex(self.visible))

    async def block_by_number(self, params: list[Any]) -> _Local | _Forward:
        if not params:
            return _Forward(self.call)
        tag = params[0]
        if tag in ("latest", "pending"):
            if self.fault.kind == "null_headers":
                return _Forward(self.call)  # a null for "latest" is no node's answer
            self.hide_above()
            return _Forward(self.call | {"params": [hex(self.visible), *params[1:]]})
        return self.local(None) if self.missing(_number(tag, None)) else _Forward(self.call)

    async def about_a_block(self, params: list[Any]) -> _Local | _Forward:
        """A block by hash or a receipt: forwarded, and dropped on the way back when it is in a
        block the backend lacks (it has no such thing)."""
        number_key = "number" if self.call.get("method") == "eth_getBlockByHash" else "blockNumber"

        def hides_number(result: Any) -> Any:
            if isinstance(result, dict) and self.missing(_number(result.get(number_key), -1)):
                return None
            return result

        return _Forward(self.call, after=hides_number)

    async def block_receipts(self, params: list[Any]) -> _Local | _Forward:
        if not params:
            return _Forward(self.call)
        where = params[0]
        n = _number(where, None)
        if isinstance(where, str) and len(where) == 66:  # a block hash
            n = await self.number_of_block(where)
        elif where in ("latest", "pending"):
            self.hide_above()
            return _Forward(self.call | {"params": [hex(self.visible)]})
        return self.local(None) if self.missing(n) else _Forward(self.call)

    async def logs(self, params: list[Any]) -> _Local | _Forward:
        if not params or not isinstance(params[0], dict):
            return _Forward(self.call)
        query = params[0]
        if "blockHash" in query:
            if self.missing(await self.number_of_block(query["blockHash"])):
                return self.local(error={"code": self.fault.code, "message": self.fault.message})
            return _Forward(self.call)
        first = _block_tag(query.get("fromBlock", "latest"), self.head)
        last = _block_tag(query.get("toBlock", "latest"), self.head)
        if last <= self.visible:
            return _Forward(self.call)
        self.hide(range(max(first, self.visible + 1), min(last, self.head) + 1))
        if first > self.visible:
            return self.local([])  # the silent answer: nothing there (that it knows of)
        return _Forward(self.call | {"params": [query | {"toBlock": hex(self.visible)}, *params[1:]]})


def _refuse_batch(fault: Fault, body: Any) -> web.Response:
    """A provider refusing a batch past its cap: an HTTP error, or one JSON-RPC error for the
    batch or per call."""
    if fault.status != 200:
        return web.Response(
            status=fault.status, text=f"batch of {len(body)} exceeds the limit of {fault.cap}"
        )
    error = {"code": fault.code, "message": fault.message}
    if fault.each:
        return _json(
            [
                {"jsonrpc": "2.0", "id": call.get("id") if isinstance(call, dict) else None, "error": error}
                for call in body
            ]
        )
    return _json({"jsonrpc": "2.0", "id": None, "error": error})


def _number(value: Any, default: Any) -> Any:
    """A hex block number, or `default` for a tag or anything else."""
    if isinstance(value, str) and value.startswith("0x") and len(value) < 20:
        try:
            return int(value, 16)
        except ValueError:
            return default
    return default


def _block_tag(value: Any, head: int) -> int:
    """An eth_getLogs bound as a number, resolved like the real node does at height `head`."""
    if value == "earliest":
        return 0
    n = _number(value, None)
    return head if n is None else n


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
