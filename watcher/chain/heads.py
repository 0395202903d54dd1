"""New heads pushed over WebSocket, so the follower wakes when a block arrives, not on a timer.

The socket only wakes the follower: blocks and logs are still read over HTTP, so a lost or
late notification costs latency, never data. That is why the socket carries nothing but the
subscription, and why losing it is not an error: we say we are polling (the follower's own
timer) and reconnect with backoff until the subscription is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

import aiohttp
import orjson
import structlog

from ..config import strip_credentials
from .failover import redact

log = structlog.get_logger("watcher.heads")

Mode = Literal["ws", "poll"]

SUBSCRIBE_ID = 1


class SubscribeError(Exception):
    """The node would not give us a newHeads subscription (no answer, or an error)."""


def head_number(message: Any, subscription: str) -> int | None:
    """The block number of a newHeads notification for `subscription`; None for any other
    message of the socket. A notification we cannot read raises ValueError."""
    if not isinstance(message, dict) or message.get("method") != "eth_subscription":
        return None
    params = message.get("params")
    if not isinstance(params, dict) or params.get("subscription") != subscription:
        return None
    result = params.get("result")
    number = result.get("number") if isinstance(result, dict) else None
    if not isinstance(number, str) or not number.startswith("0x"):
        raise ValueError(f"newHeads notification without a hex block number: {number!r}")
    return int(number, 16)


class HeadSubscriber:
    """Calls `on_head(number)` for each new head the node announces over `ws_url`.

    `mode` is "ws" while subscribed and "poll" otherwise; `on_mode(mode)` is told of every
    change. `last_head_at` (by `clock`), `last_error`, and the counters `subscriptions` and
    `heads` say how the socket is doing."""

    def __init__(
        self,
        ws_url: str,
        on_head: Callable[[int], None],
        *,
        on_mode: Callable[[Mode], None] | None = None,
        heartbeat: float = 20.0,
        connect_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ws_url = ws_url
        self.on_head = on_head
        self.on_mode = on_mode
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.clock = clock
        self.mode: Mode = "poll"
        self.last_head_at: float | None = None
        self.last_error: str | None = None
        self.subscription: str | None = None
        self.subscriptions = 0
        self.heads = 0
        self._safe_url = strip_credentials(ws_url)

    async def run(self, stopping: asyncio.Event) -> None:
        """Until `stopping` is set; cancels whatever the socket is waiting for, so it stops at once."""
        loop = asyncio.ensure_future(self._loop(stopping))
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({loop, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (loop, stop):
                task.cancel()
            await asyncio.gather(loop, stop, return_exceptions=True)
            self._set_mode("poll")
        if loop.done() and not loop.cancelled() and loop.exception() is not None:
            raise loop.exception()  # type: ignore[misc]

    async def _loop(self, stopping: asyncio.Event) -> None:
        delay = self.backoff_initial
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout
        )
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stopping.is_set():
                subscribed_before = self.subscriptions
                try:
                    await self._session(session)
                    error = "socket closed"
                except (TimeoutError, aiohttp.ClientError, OSError, SubscribeError) as exc:
                    error = redact(
                        f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, self.ws_url
                    )
                except Exception as exc:  # a bug: polling goes on; say so loudly and subscribe again
                    log.exception("ws_heads_crashed", url=self._safe_url)
                    error = f"{type(exc).__name__}"
                if self.subscriptions > subscribed_before:
                    delay = self.backoff_initial
                self._lost(error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    async def _session(self, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(self.ws_url, heartbeat=self.heartbeat, autoping=True) as ws:
            self.subscription = subscription = await self._subscribe(ws)
            self._set_mode("ws")
            log.info("ws_heads_subscribed", url=self._safe_url, subscription=subscription)
            async for message in ws:
                if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                    self._notification(message.data, subscription)
                elif message.type == aiohttp.WSMsgType.ERROR:
                    raise aiohttp.ClientError(f"socket error: {ws.exception()}")
            if ws.exception() is not None:
                raise aiohttp.ClientError(f"socket error: {ws.exception()}")

    async def _subscribe(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        # A text frame: JSON-RPC over WebSocket is text, and some providers drop binary frames.
        request = {"jsonrpc": "2.0", "id": SUBSCRIBE_ID, "method": "eth_subscribe", "params": ["newHeads"]}
        await ws.send_str(orjson.dumps(request).decode())
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._subscription_answer(ws)
        except TimeoutError:
            raise SubscribeError(f"no answer to eth_subscribe in {self.connect_timeout} s") from None

    async def _subscription_answer(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """The subscription id; notifications cannot come before it, other answers are skipped."""
        async for message in ws:
            if message.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                break
            try:
                answer = _loads(message.data)
            except ValueError:
                raise SubscribeError(f"malformed answer to eth_subscribe: {_excerpt(message.data)}") from None
            if not isinstance(answer, dict) or answer.get("id") != SUBSCRIBE_ID:
                continue
            if isinstance(answer.get("result"), str):
                self.subscriptions += 1
                return answer["result"]
            raise SubscribeError(f"eth_subscribe refused: {answer.get('error')!r}")
        raise SubscribeError("socket closed before the subscription was answered")

    def _notification(self, data: str | bytes, subscription: str) -> None:
        """One message of the socket; a malformed one is logged and skipped, and so is a failure
        of `on_head`: neither may end the subscription."""
        try:
            number = head_number(_loads(data), subscription)
        except ValueError as exc:
            log.warning("ws_heads_malformed", error=str(exc), message=_excerpt(data))
            return
        if number is None:
            return
        self.heads += 1
        self.last_head_at = self.clock()
        try:
            self.on_head(number)
        except Exception:
            log.exception("ws_heads_callback_failed", number=number)

    def _lost(self, error: str, retry_in: float) -> None:
        self.last_error = error
        self._set_mode("poll")
        log.warning("ws_heads_lost", url=self._safe_url, error=error, retry_in=retry_in)

    def _set_mode(self, mode: Mode) -> None:
        if mode == self.mode:
            return
        self.mode = mode
        if self.on_mode is None:
            return
        try:
            self.on_mode(mode)
        except Exception:
            log.exception("ws_heads_on_mode_failed", mode=mode)


def _loads(data: str | bytes) -> Any:
    """JSON, or ValueError (orjson's decode error is one)."""
    return orjson.loads(data)


def _excerpt(data: str | bytes, limit: int = 200) -> str:
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    return text[:limit]
