"""Bearer authentication for `/v1` (contract §3): several keys at once (rotation), each with a
scope, `read` (GET and HEAD only) or `write` (every route); failed attempts are logged with the
client's address, never the token, and past 10 a second from one address answered 429.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog
from aiohttp import web

log = structlog.get_logger("watcher.auth")

READ_METHODS = frozenset({"GET", "HEAD"})
FAILURES_PER_SECOND = 10
# Addresses remembered by the throttle; the oldest is forgotten past this (a flood from many
# addresses must not grow memory without bound).
MAX_TRACKED_ADDRESSES = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ProblemResponse = Callable[[int, str, str], web.Response]


@dataclass(frozen=True)
class ApiKey:
    name: str  # shown in logs in place of the key
    key: str = field(repr=False)
    scope: Literal["read", "write"] = "write"


class FailureThrottle:
    """Failed attempts per client address in the last second."""

    def __init__(
        self, limit: int = FAILURES_PER_SECOND, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._warned: dict[str, float] = {}

    def failed(self, address: str) -> bool:
        """Count a failure; True when this address is past the limit (answer 429)."""
        now = self.clock()
        times = self._failures.pop(address, None) or deque()
        while times and times[0] <= now - 1.0:
            times.popleft()
        times.append(now)
        self._failures[address] = times  # most recent last
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            old, _ = self._failures.popitem(last=False)
            self._warned.pop(old, None)
        return len(times) > self.limit

    def first_throttled(self, address: str) -> bool:
        """True once per second per throttled address: what to log without flooding the log."""
        now = self.clock()
        if now - self._warned.get(address, float("-inf")) < 1.0:
            return False
        self._warned[address] = now
        return True


def auth_middleware(
    keys: Sequence[ApiKey], problem: ProblemResponse, *, failures_per_second: int | None = FAILURES_PER_SECOND
) -> Callable:
    """aiohttp middleware guarding `/v1`. `problem(status, title, detail)` builds the answer."""
    encoded = [(k, k.key.encode()) for k in keys]
    throttle = FailureThrottle(failures_per_second) if failures_per_second else None

    def match(given: bytes) -> ApiKey | None:
        found = None
        for key, value in encoded:  # every key is compared, so the time says nothing of which
            if hmac.compare_digest(given, value):
                found = key
        return found

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not (request.path.startswith("/v1/") or request.path == "/v1"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("utf-8", "surrogateescape")  # any bytes a client sends
        key = match(given) if scheme.lower() == "bearer" and given else None
        client = request.remote or "unknown"
        if key is None:
            reason = "no bearer token" if scheme.lower() != "bearer" or not given else "unknown key"
            if throttle is not None and throttle.failed(client):
                if throttle.first_throttled(client):
                    log.warning("api_auth_throttled", client=client, limit_per_second=throttle.limit)
                response = problem(
                    429,
                    "Too many requests",
                    "too many failed authentication attempts from this address; wait a second",
                )
                response.headers["Retry-After"] = "1"
                return response
            log.warning(
                "api_auth_failed", client=client, method=request.method, path=request.path, reason=reason
            )
            return problem(401, "Unauthorized", "send Authorization: Bearer <api key>")
        if key.scope == "read" and request.method not in READ_METHODS:
            log.warning(
                "api_auth_forbidden", client=client, key=key.name, method=request.method, path=request.path
            )
            return problem(
                403, "Forbidden", f"the key {key.name!r} may only read (GET); this route changes data"
            )
        return await handler(request)

    return auth
