"""Webhook delivery: Standard Webhooks signatures and the outbox dispatcher.

Events are written by the store in the same transaction as the change they report; this
module only moves them out: claim what is due, POST it signed, record the attempt, and
reschedule on the one retry schedule below or give up and mark it failed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Callable, Mapping

import aiohttp
import structlog

from .store import Outbox

log = structlog.get_logger("watcher.webhooks")

# Seconds to wait before each retry after a failed attempt; after the last, the delivery fails.
RETRY_SCHEDULE = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
TIMEOUT_SECONDS = 10.0


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len("whsec_"):])


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(key: bytes, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: int = 300) -> bool:
    """What a receiver does (used by our tests and shown in the docs)."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    expected = sign(key, msg_id, int(timestamp), body).split(",", 1)[1]
    for candidate in headers.get("webhook-signature", "").split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            return True
    return False


def next_attempt_delay(attempts_done: int) -> float | None:
    """Delay before the next attempt after `attempts_done` failed ones; None: give up."""
    if attempts_done - 1 < len(RETRY_SCHEDULE):
        return RETRY_SCHEDULE[attempts_done - 1]
    return None


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        secrets: Mapping[str, str],  # url -> whsec_ secret
        *,
        clock: Callable[[], float] = time.time,
        concurrency: int = 16,
        timeout: float = TIMEOUT_SECONDS,
        on_attempt: Callable[[str, float | None], None] | None = None,
    ) -> None:
        """``on_attempt(outcome, seconds)`` hears of each attempt (the metrics): outcome
        ``delivered``, ``retry`` or ``failed``; seconds None when nothing was sent."""
        self.outbox = outbox
        self.on_attempt = on_attempt
        self.clock = clock
        self.concurrency = concurrency
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        self._keys = {url: secret_key(s) for url, s in secrets.items()}

    def wake(self) -> None:
        self._wake.set()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self) -> int:
        """Deliver everything due now; returns how many attempts were made."""
        due = self.outbox.due_deliveries(self.clock(), limit=self.concurrency * 4)
        if not due:
            return 0
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(delivery: dict) -> None:
            async with semaphore:
                await self._attempt(delivery)

        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    async def _attempt(self, delivery: dict) -> None:
        key = self._keys.get(delivery["url"])
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        if key is None:
            error = "endpoint is no longer configured"
        else:
            timestamp = int(self.clock())
            headers = {
                "content-type": "application/json",
                "webhook-id": delivery["event_id"],
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(key, delivery["event_id"], timestamp, delivery["body"]),
                "user-agent": "watcher-webhooks",
            }
            try:
                assert self._session is not None
                async with self._session.post(delivery["url"], data=delivery["body"], headers=headers) as response:
                    status_code = response.status
                    await response.read()
                    if not 200 <= response.status < 300:
                        error = f"HTTP {response.status}"
            except asyncio.TimeoutError:
                error = f"no answer within {self.timeout:g} s"
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        duration_ms = (time.perf_counter() - started) * 1000
        ok = error is None
        attempts_done = delivery["attempts"] + 1
        delay = None if ok else next_attempt_delay(attempts_done)
        self.outbox.record_attempt(
            delivery["id"], ok=ok, status_code=status_code, error=error, duration_ms=duration_ms,
            next_attempt_at=None if delay is None else self.clock() + delay, claimed_attempts=delivery["attempts"],
            claimed_requeues=delivery["requeues"],
        )
        if self.on_attempt is not None:
            outcome = "delivered" if ok else ("failed" if delay is None else "retry")
            self.on_attempt(outcome, duration_ms / 1000 if key is not None else None)
        if ok:
            log.info("webhook_delivered", delivery=delivery["id"], event_id=delivery["event_id"], url=delivery["url"], ms=round(duration_ms, 1))
        elif delay is None:
            log.error("webhook_failed", delivery=delivery["id"], event_id=delivery["event_id"], url=delivery["url"], error=error, attempts=attempts_done)
        else:
            log.warning("webhook_retry_scheduled", delivery=delivery["id"], event_id=delivery["event_id"], url=delivery["url"], error=error, in_seconds=delay)

    async def run(self, stopping: asyncio.Event, idle: float = 1.0) -> None:
        while not stopping.is_set():
            try:
                sent = await self.run_once()
            except Exception:  # a bug here must not stop deliveries for good
                log.exception("dispatcher_step_failed")
                sent = 0
            if sent:
                continue
            self._wake.clear()
            try:
                next_at = self.outbox.next_delivery_at()
            except Exception:  # the database may be busy or closing; look again soon
                log.exception("dispatcher_step_failed")
                next_at = None
            wait = idle if next_at is None else min(idle, max(next_at - self.clock(), 0.0))
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait, 0.01))
            except asyncio.TimeoutError:
                pass
