"""What the daemon still waits for between binding its API and serving every route.

The API's listener is bound as soon as the config is read and the database is open, so
`/healthz` answers within a second of the process's start whatever the nodes do. The work
that talks to the nodes (each chain's chain id and genesis, the live prices' first round)
runs after. Until it is done, `/healthz` says `starting`, `/readyz` is 503 naming what the
daemon waits for, and every route that needs that work (the `/v1` ones) answers 503 with
`Retry-After` rather than an answer built on unchecked nodes or missing prices. READY=1 goes
to systemd only once it is done, as before (contract §7: READY=1 once the API serves).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

PROBLEM = "application/problem+json"
RETRY_AFTER_SECONDS = 1

# What answers while starting: liveness, readiness (with what it waits for), metrics and the
# API's description. Everything else waits for the start-up to finish.
OPEN_WHILE_STARTING = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"})


class StartUp:
    """The start-up step in progress (`waiting_for`), None once every route may serve."""

    def __init__(self) -> None:
        self.waiting_for: str | None = "opening the database"

    def step(self, what: str) -> None:
        self.waiting_for = what

    def finish(self) -> None:
        self.waiting_for = None

    @property
    def done(self) -> bool:
        return self.waiting_for is None

    def middleware(self) -> Callable:
        """aiohttp middleware: 503 with Retry-After for every route not open while starting."""

        @web.middleware
        async def starting(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            waiting_for = self.waiting_for
            if (
                waiting_for is None
                or request.path in OPEN_WHILE_STARTING
                or request.path.startswith("/docs/")
            ):
                return await handler(request)
            return starting_response(waiting_for)

        return starting


def starting_response(waiting_for: str) -> web.Response:
    body = {
        "type": "urn:watcher:problem:starting",
        "title": "Starting",
        "status": 503,
        "detail": f"the watcher is starting ({waiting_for}); retry in a moment",
    }
    return web.Response(
        status=503,
        body=orjson.dumps(body),
        content_type=PROBLEM,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
