"""The page's live status: one Server-Sent Events stream per open page, fed by the store.

The store tells the feed when it appends an invoice's event (the very rows the webhooks are
made from, in the same transaction) and when a chain's blocks move confirmations on. The
feed then reads the invoice once, after the transaction, and hands its public status to every
stream of that invoice. A message's `id` is the sequence number of the invoice's latest
event, so a browser that reconnects with `Last-Event-ID` learns which events it missed
(`missed_events`) together with the current truth.

Each stream holds only the latest status (a slow reader skips to the newest, nothing
queues up), streams are capped in total and per invoice, and each ends after a timeout
(the browser reconnects and resumes).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import structlog
from aiohttp import web
from aiohttp_sse import EventSourceResponse

from ..store import Store
from .public import public_status

log = structlog.get_logger("watcher.checkout")

RETRY_MS = 3000  # how soon a browser reconnects after a stream ends
PING_SECONDS = 15.0


@dataclass
class Message:
    seq: int
    data: bytes


@dataclass(eq=False)
class Stream:
    """One open page: the newest message for it, and a flag that it is waiting to be sent."""

    latest: Message | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, message: Message) -> None:
        self.latest = message
        self.changed.set()


@dataclass(eq=False)
class Channel:
    """The open streams of one invoice and what they were last sent."""

    streams: set[Stream] = field(default_factory=set)
    last: Message | None = None
    unconfirmed: bool = False  # has payments still gaining confirmations: blocks matter


class StreamsFull(Exception):
    pass


class Feed:
    def __init__(
        self,
        store: Store,
        *,
        max_streams: int,
        max_per_invoice: int,
        timeout: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.max_streams = max_streams
        self.max_per_invoice = max_per_invoice
        self.timeout = timeout
        self.monotonic = monotonic
        self.channels: dict[str, Channel] = {}
        self.open_streams = 0
        self.closing = asyncio.Event()
        self._due: set[str] = set()
        self._scheduled = False

    # ------------------------------------------------------------------ store hooks

    def invoice_changed(self, invoice_id: str) -> None:
        """Called by the store inside the transaction that appends an event: the reading is
        deferred to the loop's next turn, when that transaction has committed (or rolled back)."""
        if invoice_id in self.channels:
            self._due.add(invoice_id)
            self._schedule()

    def blocks_applied(self, network: str) -> None:
        """Confirmations grew without an event: refresh the invoices still confirming."""
        due = [i for i, c in self.channels.items() if c.unconfirmed]
        if due:
            self._due.update(due)
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._publish_due)

    def _publish_due(self) -> None:
        self._scheduled = False
        due, self._due = self._due, set()
        for invoice_id in due:
            channel = self.channels.get(invoice_id)
            if channel is None:
                continue
            message = self.current(invoice_id, channel)
            if message is not None and (channel.last is None or message.data != channel.last.data):
                channel.last = message
                for stream in channel.streams:
                    stream.offer(message)

    # ------------------------------------------------------------------ reading

    def current(
        self, invoice_id: str, channel: Channel | None = None, since: int | None = None
    ) -> Message | None:
        """The invoice's public status as a message (None if it is gone or a draft)."""
        invoice = self.store.get_invoice(invoice_id)
        if invoice is None or invoice["status"] == "draft":
            return None
        status = public_status(invoice)
        seq, missed = self.store.outbox.event_marks(invoice_id, since)
        if since is not None:
            status["missed_events"] = missed
        if channel is not None:
            channel.unconfirmed = any(p["status"] == "detected" for p in status["payments"])
        return Message(seq, orjson.dumps(status))

    # ------------------------------------------------------------------ streams

    def _open(self, invoice_id: str) -> tuple[Channel, Stream]:
        channel = self.channels.get(invoice_id)
        if self.open_streams >= self.max_streams:
            raise StreamsFull("too many live status streams are open; poll the status instead")
        if channel is not None and len(channel.streams) >= self.max_per_invoice:
            raise StreamsFull(
                "too many live status streams are open for this invoice; poll the status instead"
            )
        if channel is None:
            channel = self.channels[invoice_id] = Channel()
        stream = Stream()
        channel.streams.add(stream)
        self.open_streams += 1
        return channel, stream

    def _close(self, invoice_id: str, stream: Stream) -> None:
        channel = self.channels.get(invoice_id)
        if channel is None or stream not in channel.streams:
            return
        channel.streams.discard(stream)
        self.open_streams -= 1
        if not channel.streams:
            del self.channels[invoice_id]

    async def serve(self, request: web.Request, invoice_id: str) -> web.StreamResponse:
        """`GET /pay/{id}/events`; the caller has checked that the invoice may be shown."""
        since = _last_event_id(request.headers.get("Last-Event-ID"))
        try:
            channel, stream = self._open(invoice_id)
        except StreamsFull as exc:
            log.warning("checkout_streams_full", invoice_id=invoice_id, open=self.open_streams)
            return web.json_response(
                {"error": "busy", "detail": str(exc)}, status=503, headers={"Retry-After": "10"}
            )
        response = EventSourceResponse(ping_interval=PING_SECONDS, headers={"Cache-Control": "no-store"})
        try:
            await response.prepare(request)
            first = self.current(invoice_id, channel, since)
            if first is None:
                return response
            if channel.last is None:  # what later changes are compared with (without `missed_events`)
                channel.last = first if since is None else self.current(invoice_id, channel)
            await response.send(first.data.decode(), id=str(first.seq), event="status", retry=RETRY_MS)
            deadline = self.monotonic() + self.timeout
            while not self.closing.is_set():
                left = deadline - self.monotonic()
                if left <= 0 or not response.is_connected():
                    break
                try:
                    await asyncio.wait_for(stream.changed.wait(), timeout=min(left, 5.0))
                except TimeoutError:
                    continue
                stream.changed.clear()
                if stream.latest is not None and not self.closing.is_set():
                    await response.send(
                        stream.latest.data.decode(), id=str(stream.latest.seq), event="status"
                    )
        except (TimeoutError, ConnectionResetError, RuntimeError):
            pass  # the browser went away (or stalled): nothing to answer
        finally:
            self._close(invoice_id, stream)
            if response.is_connected():
                response.stop_streaming()  # ends its ping task
        return response

    def close(self) -> None:
        """At shutdown: end every stream now rather than at the server's shutdown timeout."""
        self.closing.set()
        for channel in self.channels.values():
            for stream in channel.streams:
                stream.changed.set()


def _last_event_id(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 18 else None
