"""Several RPC endpoints behind one `Transport`: failover in order, and back.

Providers fail often and independently (rate limits, outages, a node restarting), so a
chain has an ordered list of RPC URLs. Requests go to one endpoint at a time; when it gives
no answer we move down the list and re-send the same request there, and after a cool-down
we try the preferred endpoint again, since it is first for a reason (cost, latency, trust).

Only a missing answer moves us: a JSON-RPC error from a healthy node ("execution reverted",
"method not found") is the answer to the question, and another node would give the same one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
import structlog

from ..redaction import Redactor, strip_credentials
from .transport import RETRY_DELAYS, BatchRefused, HttpTransport, RpcError

log = structlog.get_logger("watcher.failover")

T = TypeVar("T")

OnSwitch = Callable[[str, str, str], None]

# One quick retry on the same endpoint: a blip should not cost a switch, a dead endpoint
# should not cost the whole `RETRY_DELAYS` schedule before the next one is tried.
ENDPOINT_RETRY_DELAYS = (0.1,)


class EndpointDown(RpcError):
    """The endpoint gave no JSON-RPC answer (HTTP 429/5xx or any non-200, timeout, refused
    connection, malformed JSON, an answer of the wrong shape): the one kind of failure that
    another endpoint may not share. `code` is the HTTP status when there was one."""

    def __init__(self, method: str, reason: str, code: int | None = None) -> None:
        super().__init__(method, reason, code)
        self.reason = reason


def redact(text: str, url: str) -> str:
    """`text` with `url`'s secrets masked: aiohttp puts the full request URL (userinfo,
    query and all) into some of its error messages."""
    return Redactor([url])(text)


def _check_shape(what: str, payload: Any, answer: Any) -> None:
    """A JSON-RPC answer of the wrong shape is the endpoint's failure, not the node's error:
    a proxy's error page in JSON, a rate limiter's object in place of a batch."""
    if isinstance(payload, list):
        ids = {p["id"] for p in payload}
        if not isinstance(answer, list) or len(answer) != len(payload):
            raise EndpointDown(what, "batch answer does not match the request")
        if not all(isinstance(a, dict) for a in answer) or {a.get("id") for a in answer} != ids:
            raise EndpointDown(what, "batch answer ids do not match the request")
        answers = answer
    else:
        if not isinstance(answer, dict):
            raise EndpointDown(what, "answer is not a JSON-RPC object")
        answers = [answer]
    if any("result" not in a and a.get("error") is None for a in answers):
        raise EndpointDown(what, "answer without result or error")


def failure_kind(exc: BaseException) -> str:
    """A short label for what went wrong with a request (a metrics label: few values)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, RpcError):
        if exc.code is not None and exc.method == "http":
            return "http_429" if exc.code == 429 else f"http_{exc.code // 100}xx"
        return "malformed" if "JSON" in str(exc) or "answer" in str(exc) else "error"
    return "connection"


class _Endpoint(HttpTransport):
    """An `HttpTransport` whose give-up is an `EndpointDown`, so a JSON-RPC error answer is
    told apart from a missing answer, and whose messages never carry the URL's secrets."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retry_delays: Sequence[float],
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(url, timeout=timeout, retry_delays=retry_delays)
        self.safe_url = strip_credentials(url)
        self.on_failure = on_failure

    async def _with_retries(self, what: str, payload: Any) -> Any:
        for attempt, delay in enumerate((*self._retry_delays, None)):
            try:
                answer = await self._post(payload)
                _check_shape(what, payload, answer)
                return answer
            except BatchRefused:
                raise  # an answer (the node's cap), not a missing one: smaller batches, same endpoint
            except (TimeoutError, aiohttp.ClientError, RpcError) as exc:
                reason = self._describe(exc)
                if self.on_failure is not None:
                    self.on_failure(failure_kind(exc))
                if delay is None:
                    raise EndpointDown(
                        what, reason, exc.code if isinstance(exc, RpcError) else None
                    ) from None
                log.warning(
                    "rpc_endpoint_retry", method=what, attempt=attempt + 1, error=reason, url=self.safe_url
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, EndpointDown):
            return redact(exc.reason, self.url)
        if isinstance(exc, RpcError):
            return redact(str(exc).removeprefix(f"{exc.method}: "), self.url)
        detail = str(exc)
        return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__, self.url)


class FailoverTransport:
    """`Transport` over an ordered list of RPC URLs; the first is preferred.

    A request goes to the endpoint in use; if it gives no answer (after one quick retry
    there), the same request goes to the next endpoint, wrapping round the list. When a whole
    pass fails we back off (`retry_delays`) and start the next pass at the preferred endpoint;
    after the last pass the `EndpointDown` (an `RpcError`) is raised. While on a fallback, the
    first request after `return_after` seconds tries the preferred endpoint first."""

    def __init__(
        self,
        rpc_urls: Sequence[str],
        *,
        timeout: float = 10.0,
        endpoint_retry_delays: Sequence[float] = ENDPOINT_RETRY_DELAYS,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        return_after: float = 30.0,
        on_switch: OnSwitch | None = None,
        on_failure: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`on_failure(kind)` hears of every request an endpoint failed to answer (the metrics)."""
        if not rpc_urls:
            raise ValueError("FailoverTransport needs at least one RPC URL")
        self._endpoints = [
            _Endpoint(u, timeout=timeout, retry_delays=endpoint_retry_delays, on_failure=on_failure)
            for u in rpc_urls
        ]
        self._retry_delays = tuple(retry_delays)
        self._return_after = return_after
        self._clock = clock
        self.on_switch = on_switch
        self.current = 0
        self.switches = 0
        self.failovers = 0
        self.failbacks = 0
        self._since = clock()

    @property
    def rpc_urls(self) -> tuple[str, ...]:
        return tuple(e.url for e in self._endpoints)

    @property
    def url(self) -> str:
        return self._endpoints[self.current].url

    @property
    def current_url(self) -> str:
        return self.url

    async def call(self, method: str, params: list) -> Any:
        return await self._send(method, lambda endpoint: endpoint.call(method, params))

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]:
        if not calls:
            return []
        return await self._send(calls[0][0], lambda endpoint: endpoint.batch(calls))

    async def close(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.close()

    async def _send(self, what: str, send: Callable[[_Endpoint], Awaitable[T]]) -> T:
        start = 0 if self._failback_due() else self.current
        last: EndpointDown | None = None
        for attempt, delay in enumerate((*self._retry_delays, None)):
            failures: dict[int, EndpointDown] = {}
            for index in self._order(start):
                try:
                    result = await send(self._endpoints[index])
                except EndpointDown as exc:
                    failures[index] = last = exc
                    continue
                except RpcError:
                    self._settle(index, failures)
                    raise
                self._settle(index, failures)
                return result
            if delay is None:
                break
            log.warning(
                "rpc_all_endpoints_failed",
                method=what,
                attempt=attempt + 1,
                retry_in=delay,
                error=last.reason if last else None,
                endpoints=len(self._endpoints),
            )
            await asyncio.sleep(delay)
            start = 0
        assert last is not None
        passes = len(self._retry_delays) + 1
        raise EndpointDown(
            what,
            f"all {len(self._endpoints)} endpoints failed {passes} times, last: {last.reason}",
            last.code,
        )

    def _order(self, start: int) -> list[int]:
        n = len(self._endpoints)
        return [(start + i) % n for i in range(n)]

    def _failback_due(self) -> bool:
        """Claims the try of the preferred endpoint, so one request per cool-down pays for it
        if it is still down."""
        if self.current == 0 or self._clock() - self._since < self._return_after:
            return False
        self._since = self._clock()
        return True

    def _settle(self, answered: int, failures: dict[int, EndpointDown]) -> None:
        """Move to the endpoint that answered when it is better placed than the one in use:
        the one in use failed (failover), or it is higher on the list (failback)."""
        old = self.current
        if answered == old:
            return
        if answered < old:
            reason = f"failed: {failures[old].reason}" if old in failures else "answered again"
            self._switch(old, answered, "rpc_failback", reason)
        elif old in failures:
            self._switch(old, answered, "rpc_failover", f"failed: {failures[old].reason}")

    def _switch(self, old: int, new: int, event: str, reason: str) -> None:
        self.current = new
        self._since = self._clock()
        self.switches += 1
        if event == "rpc_failback":
            self.failbacks += 1
        else:
            self.failovers += 1
        old_url, new_url = self._endpoints[old].safe_url, self._endpoints[new].safe_url
        level = log.info if event == "rpc_failback" else log.warning
        level(event, from_url=old_url, to_url=new_url, reason=reason)
        if self.on_switch is None:
            return
        try:
            self.on_switch(old_url, new_url, reason)
        except Exception:
            # A metrics or logging hook must not turn an answered request into a failure.
            log.exception("rpc_on_switch_failed")
