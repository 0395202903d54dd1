"""JSON-RPC over HTTP: one request or a batch, retried with backoff; the node's errors as `RpcError`.

The lowest layer of talking to a node: it knows JSON-RPC envelopes, not blocks or logs.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

log = structlog.get_logger("watcher.chain")

# Read retries: a schedule in one place (seconds before each retry).
RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)

# JSON-RPC "method not found": the node lacks an optional method (we fall back, not fail).
METHOD_NOT_FOUND = -32601


class RpcError(Exception):
    """The node answered with an error, or with something that is not an answer."""

    def __init__(self, method: str, message: str, code: int | None = None) -> None:
        super().__init__(f"{method}: {message}")
        self.method = method
        self.code = code


class BatchRefused(RpcError):
    """The node refused a JSON-RPC batch as a whole (too long for its cap: HTTP 413, or one
    error object about batches where a list was due, or such an error for every request): the
    same requests in smaller batches will do. Never retried as it is, never a failover."""


def refused_batch(payload: Any, status: int, answer: Any) -> BatchRefused | None:
    """The refusal of a whole batch, as providers word it, or None."""
    if not isinstance(payload, list) or len(payload) < 2:
        return None
    if status == 413:
        return BatchRefused("batch", f"HTTP 413 for a batch of {len(payload)}", 413)
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict) and _about_batches(answer["error"]):
        error = answer["error"]
        return BatchRefused(
            "batch", f"a batch of {len(payload)} refused: {error.get('message')}", error.get("code")
        )
    if (
        isinstance(answer, list)
        and len(answer) == len(payload)
        and all(
            isinstance(a, dict) and isinstance(a.get("error"), dict) and _about_batches(a["error"])
            for a in answer
        )
    ):
        error = answer[0]["error"]
        return BatchRefused(
            "batch", f"a batch of {len(payload)} refused: {error.get('message')}", error.get("code")
        )
    return None


def _about_batches(error: dict) -> bool:
    """An error that names batches ("batch too large", "batch limit exceeded"): a rate
    limiter's or proxy's error object, which says nothing of batches, stays a failed answer."""
    return "batch" in str(error.get("message", "")).lower()


class Transport(Protocol):
    """Sends JSON-RPC requests; answers are the raw `result` values."""

    async def call(self, method: str, params: list) -> Any: ...

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]: ...

    async def close(self) -> None: ...

    @property
    def url(self) -> str: ...


class HttpTransport:
    """JSON-RPC over HTTP with aiohttp and orjson; retries reads with backoff."""

    def __init__(
        self, url: str, *, timeout: float = 10.0, retry_delays: Sequence[float] = RETRY_DELAYS
    ) -> None:
        self._url = url
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._retry_delays = tuple(retry_delays)

    @property
    def url(self) -> str:
        return self._url

    async def _post(self, payload: Any) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.post(
            self._url, data=orjson.dumps(payload), headers={"Content-Type": "application/json"}
        ) as response:
            body = await response.read()
            if response.status != 200:
                if refused := refused_batch(payload, response.status, None):
                    raise refused
                raise RpcError("http", f"HTTP {response.status}", response.status)
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RpcError("http", f"malformed JSON: {exc}") from None
        if refused := refused_batch(payload, 200, answer):
            raise refused
        return answer

    async def _with_retries(self, what: str, payload: Any) -> Any:
        for attempt, delay in enumerate((*self._retry_delays, None)):
            try:
                return await self._post(payload)
            except BatchRefused:
                raise
            except (TimeoutError, aiohttp.ClientError, RpcError) as exc:
                if delay is None:
                    raise RpcError(what, f"gave up after {attempt + 1} attempts: {exc}") from None
                log.warning("rpc_retry", method=what, attempt=attempt + 1, error=str(exc), url=self._url)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def call(self, method: str, params: list) -> Any:
        answer = await self._with_retries(
            method, {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        )
        return _result(method, answer)

    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]:
        if not calls:
            return []
        first = next(self._ids)
        payload = [
            {"jsonrpc": "2.0", "id": first + i, "method": m, "params": p} for i, (m, p) in enumerate(calls)
        ]
        for _ in range(len(calls) - 1):
            next(self._ids)
        answers = await self._with_retries(calls[0][0], payload)
        if not isinstance(answers, list) or len(answers) != len(calls):
            raise RpcError(calls[0][0], "batch answer does not match the request")
        by_id = {a.get("id"): a for a in answers if isinstance(a, dict)}
        return [_result(m, by_id.get(first + i)) for i, (m, _) in enumerate(calls)]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _result(method: str, answer: Any) -> Any:
    if not isinstance(answer, dict):
        raise RpcError(method, "no answer")
    if "error" in answer and answer["error"] is not None:
        error = answer["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise RpcError(method, message, error.get("code") if isinstance(error, dict) else None)
    if "result" not in answer:
        raise RpcError(method, "answer without result")
    return answer["result"]
