"""The API's HTTP server: aiohttp's request handling behind an accept loop of our own, hardened
for a listener that the open internet may reach (contract §3).

- A connection that has not sent a request's headers within `header_timeout` (10 s) is
  closed, and so is one idle for `idle_timeout` (60 s) between requests: aiohttp alone keeps
  an idle connection for about an hour, so a few hundred silent sockets exhausted the file
  descriptors and took `/healthz` down with them.
- At most `max_connections` connections are open; beyond that the accept loop stops accepting,
  so further clients wait in the kernel's backlog instead of costing descriptors. The limit is
  lowered to fit the process's descriptor limit (RLIMIT_NOFILE) when it is higher.
- Errors of the HTTP layer itself (a bad request line, an oversized header) are answered as
  problem+json, without echoing any of the bytes received.
- No `Server` header: it would name aiohttp and Python with their versions.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import socket
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("watcher.http")

HEADER_TIMEOUT = 10.0
IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 1000
BACKLOG = 128
# Descriptors kept for everything but API clients: the database, nodes, webhook endpoints.
RESERVED_DESCRIPTORS = 128
PROBLEM = "application/problem+json"

_TITLES = {
    400: "Bad request",
    413: "Payload too large",
    414: "URI too long",
    431: "Request header fields too large",
    500: "Internal error",
    504: "Gateway timeout",
}


def hide_server_header(request: web.BaseRequest) -> None:
    """Drop the `Server` header aiohttp adds to every response (software and version)."""
    writer = request.writer
    if getattr(writer, "_on_headers_sent", None) is None and hasattr(writer, "_on_headers_sent"):

        async def drop(headers: Any) -> None:
            headers.popall("Server", None)

        writer._on_headers_sent = drop


async def _on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    hide_server_header(request)


def harden(app: web.Application) -> None:
    """What the application itself must do: no `Server` header on its responses."""
    app.on_response_prepare.append(_on_prepare)


def effective_max_connections(configured: int) -> int:
    """`configured`, or less when the process may not open that many descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return min(configured, max(soft - RESERVED_DESCRIPTORS, 8))


class _Handler(RequestHandler):
    """aiohttp's handler with a deadline for the headers of each request and problem+json
    for the errors of the HTTP layer."""

    def __init__(
        self, manager: web.Server, *, listener: Listener, header_timeout: float, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._header_timeout = header_timeout
        self._header_deadline: asyncio.TimerHandle | None = None
        self._last_payload: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_header_deadline()
        try:
            super().connection_lost(exc)
        finally:
            self._listener.released()

    def data_received(self, data: bytes) -> None:
        parsed = self._request_count
        # Asked before the bytes are read: the segment that ends a body leaves it at EOF, and
        # arming then would cut the request being handled, not a next one being sent.
        between_requests = self._last_payload is None or self._last_payload.is_eof()
        super().data_received(data)
        if self._request_count > parsed:  # a request's headers are complete
            self._disarm_header_deadline()
            if self._messages:
                self._last_payload = self._messages[-1][1]
        elif between_requests and data:  # b"": aiohttp resuming its reading, nothing received
            self._arm_header_deadline()  # bytes of the next request's headers: they have a deadline
        # else: bytes of the current request's body, bounded by the body limit

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None and self.transport is not None:
            self._header_deadline = self._loop.call_later(self._header_timeout, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request that never reached the application: say what kind of error, echo nothing."""
        if status >= 500:
            log.error(
                "http_request_failed",
                client=request.remote,
                status=status,
                error=type(exc).__name__ if exc else None,
            )
        else:
            log.info(
                "http_bad_request",
                client=request.remote,
                status=status,
                error=type(exc).__name__ if exc else None,
            )
        title = _TITLES.get(status, "Bad request" if status < 500 else "Internal error")
        detail = (
            "the request could not be read as HTTP/1.1 within the server's limits"
            if status < 500
            else "the server could not handle this request; see its log"
        )
        body = {
            "type": f"urn:watcher:problem:{title.lower().replace(' ', '-')}",
            "title": title,
            "status": status,
            "detail": detail,
        }
        response = web.Response(status=status, body=orjson.dumps(body), content_type=PROBLEM)
        response.force_close()
        hide_server_header(request)
        return response


class Listener:
    """Accepts connections for a set-up AppRunner while fewer than `max_connections` are open."""

    def __init__(
        self,
        runner: web.AppRunner,
        sockets: list[socket.socket],
        *,
        max_connections: int,
        header_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.runner = runner
        self.sockets = sockets
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.open = 0
        self._room = asyncio.Event()
        self._room.set()
        self._tasks = [asyncio.create_task(self._accept(sock), name="http-accept") for sock in sockets]

    @property
    def addresses(self) -> list[Any]:
        return [sock.getsockname() for sock in self.sockets]

    def _handler(self) -> _Handler:
        server = self.runner.server
        assert server is not None
        return _Handler(
            server,
            loop=asyncio.get_running_loop(),
            listener=self,
            header_timeout=self.header_timeout,
            keepalive_timeout=self.idle_timeout,
            access_log=None,
        )

    def released(self) -> None:
        self.open -= 1
        if self.open < self.max_connections:
            self._room.set()

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._room.wait()
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("http_accept_failed", error=exc.strerror)
                    await asyncio.sleep(0.1)  # the client waits in the backlog meanwhile
                continue
            self.open += 1
            if self.open >= self.max_connections:
                self._room.clear()
            try:
                conn.setblocking(False)
                await loop.connect_accepted_socket(self._handler, conn)
            except OSError:
                conn.close()
                self.released()

    async def close(self) -> None:
        """Stop accepting (the runner's cleanup then closes the open connections)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self.sockets:
            sock.close()


async def listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    *,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    header_timeout: float = HEADER_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> Listener:
    """Bind `host:port` (every address it names) and serve `runner`'s application there.
    An address in use or not the host's raises OSError, as aiohttp's sites do."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and sockets[:-1]:  # several addresses share the port the first one got
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:  # worded as asyncio words it (the CLI's listen_failed line shows it)
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(exc.strerror or str(exc)).lower()}",
                ) from None
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    limit = effective_max_connections(max_connections)
    if limit < max_connections:
        log.warning(
            "http_max_connections_lowered",
            configured=max_connections,
            effective=limit,
            hint="the process may open too few files: raise LimitNOFILE (ulimit -n)",
        )
    return Listener(
        runner, sockets, max_connections=limit, header_timeout=header_timeout, idle_timeout=idle_timeout
    )
