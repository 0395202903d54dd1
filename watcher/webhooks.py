"""Webhook delivery: Standard Webhooks signatures and the outbox dispatcher.

Events are written by the store in the same transaction as the change they report; this
module only moves them out: queue each endpoint's new events as its deliveries (the endpoint's
cursor over the events, store/outbox.py), claim what is due, POST it signed, record the
attempt, and reschedule on the one retry schedule below or give up and mark it failed.

Each endpoint is a lane of its own (contract §5): its own queue (its due deliveries, read by
URL), its own concurrency limit and its own circuit breaker, so an endpoint that hangs or
fails delays only its own deliveries. A lane claims its due deliveries a batch at a time (one
query) and holds them, like those in flight, until it has room to start them. A lane starts
nothing while MAX_UNRECORDED of its attempts are in flight or wait for their record (the
store's writer busy with a long follower step): what it holds stays bounded, and so does what
a crash would send again. An attempt never
follows a redirect (a 3xx is a failed attempt, its Location in `last_error`) and reads at most
64 KiB of the answer.

Attempts are recorded in groups (group commit): those that end within a few milliseconds of
each other are written in one transaction, so one fsync serves them all at
`synchronous=FULL`. Until its group has committed a delivery is not taken again, and its
outcome is neither logged nor counted; a crash before the commit loses only the record, and
the delivery is sent again after the restart (at least once, as ever). A group that finds the
database locked (another process's long write: the daemon's catch-up step, when this runs in
the dispatcher's own process) waits and is written again; a known outcome is never sent again
for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from .redaction import redact_text, strip_credentials
from .store import Outbox
from .store.outbox import Attempt

log = structlog.get_logger("watcher.webhooks")

# Seconds to wait before each retry after a failed attempt; after the last, the delivery fails.
RETRY_SCHEDULE = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 10 * 3600)
TIMEOUT_SECONDS = 10.0
# Of an answer, only this much is read (and thrown away): a receiver cannot fill our memory.
MAX_RESPONSE_BYTES = 64 * 1024
# Attempts in flight per endpoint.
ENDPOINT_CONCURRENCY = 16
# Consecutive failed attempts that open an endpoint's breaker, and how long it then stays open
# (growing while the probe after each pause fails too; back to the first after a success).
BREAKER_THRESHOLD = 10
# How often the dispatcher looks for pending deliveries to endpoints no longer configured.
UNCONFIGURED_SCAN_SECONDS = 30.0
BREAKER_PAUSES = (5.0, 15.0, 60.0, 300.0)
# Group commit: at most this many attempts in one transaction, the ones that ended within this
# many seconds of the first of them.
RECORD_BATCH = 64
RECORD_DELAY = 0.02
# A lane claims its due deliveries this many at a time (one query), and starts them as it has room.
CLAIM_BATCH = 64
# A lane starts no attempt while this many of its attempts are in flight or wait for their record.
# Recorded in a few milliseconds they never reach it. While the database's write lock is held by
# a long catch-up step (20-36 s for 25,000 payments) they would pile up for the whole step, each
# held (about 0.5 KB), each excluded by every claim, and all sent again after a crash; this many
# lets a lane go on delivering for a few seconds of such a step (at about 1,000 a second).
MAX_UNRECORDED = 64 * RECORD_BATCH
# A group whose write found the database locked is written again after this long, doubling up to
# the second figure, until it is recorded.
RECORD_RETRY_SECONDS = (0.5, 5.0)


def secret_keys(secrets: str) -> list[bytes]:
    """The HMAC keys of a `secret_env` value: one secret, or several separated by spaces while rotating."""
    keys = [secret_key(part) for part in secrets.split()]
    if not keys:
        raise ValueError("no webhook secret")
    return keys


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    if not secret.startswith("whsec_"):
        raise ValueError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len("whsec_") :])


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    mac = _keyed(key).copy()  # the key's own setup done once, not per attempt
    mac.update(f"{msg_id}.{timestamp}.".encode())
    mac.update(body)
    return "v1," + base64.b64encode(mac.digest()).decode()


@functools.lru_cache(maxsize=64)
def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


def signatures(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,` signature per key, space-separated: a receiver holding any one of the secrets
    accepts the attempt, so a secret can be rotated without a gap."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


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


@dataclass
class Breaker:
    """An endpoint's circuit breaker. Closed: attempts flow. After `threshold` consecutive
    failed attempts it opens: the endpoint gets no attempt for a pause (its deliveries wait,
    due, without spending their retries). Then one probe goes out: a success closes it, a
    failure opens it again for the next, longer pause."""

    threshold: int = BREAKER_THRESHOLD
    pauses: tuple[float, ...] = BREAKER_PAUSES
    failures: int = 0
    opened: int = 0  # consecutive openings (picks the pause)
    open_until: float | None = None
    probing: bool = False

    @property
    def is_open(self) -> bool:
        return self.open_until is not None

    def room(self, now: float, in_flight: int, limit: int) -> int:
        """How many attempts may start now."""
        if self.open_until is None:
            return max(limit - in_flight, 0)
        if now < self.open_until or self.probing or in_flight:
            return 0
        return 1  # the probe

    def started(self, now: float) -> None:
        if self.open_until is not None and now >= self.open_until:
            self.probing = True

    def record(self, ok: bool, now: float) -> bool | None:
        """Count an attempt; returns True when the breaker opened, False when it closed, else None."""
        was_open, probe = self.open_until is not None, self.probing
        self.probing = False
        if ok:
            self.failures = 0
            self.opened = 0
            self.open_until = None
            return False if was_open else None
        self.failures += 1
        if was_open:
            if probe:  # the probe failed: pause again, longer
                self.open_until = now + self.pauses[min(self.opened, len(self.pauses) - 1)]
                self.opened += 1
            return None  # else an attempt that was in flight when it opened: nothing new
        if self.failures >= self.threshold:
            self.open_until = now + self.pauses[0]
            self.opened = 1
            return True
        return None

    def reopens_in(self, now: float) -> float | None:
        return None if self.open_until is None else max(self.open_until - now, 0.0)


@dataclass(eq=False)  # a lane is itself: hashed and compared by identity
class _Lane:
    """One endpoint: its keys (None once it is no longer configured), breaker and attempts in flight."""

    url: str
    keys: list[bytes] | None
    breaker: Breaker
    shown: str = ""  # the URL as logs show it: credentials stripped
    in_flight: dict[str, asyncio.Task] = field(default_factory=dict)
    recording: set[str] = field(default_factory=set)  # attempted, not yet recorded: not taken again
    claimed: deque[dict] = field(default_factory=deque)  # due, read from the store, not started yet
    # Events may have been appended since the lane last queued its endpoint's: set by a wake-up
    # (an append) and by a wait that ran out, so a lane pass after each attempt reads nothing more.
    appended: bool = True
    queuing: asyncio.Task | None = None  # the endpoint's new events being queued, beside the lane
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def busy(self) -> list[str]:
        """The deliveries the lane holds: claimed, in flight, or waiting for their record."""
        return [*self.in_flight, *self.recording, *(d["id"] for d in self.claimed)]


@dataclass
class _Ended:
    """An attempt over, waiting for its group's commit, and what to tell once it is recorded."""

    lane: _Lane
    attempt: Attempt
    event_id: str
    url: str  # credentials stripped
    outcome: str  # delivered, retry or failed
    seconds: float | None  # None when nothing was sent
    attempts_done: int
    delay: float | None


class Dispatcher:
    def __init__(
        self,
        outbox: Outbox,
        secrets: Mapping[str, str],  # url -> whsec_ secret(s), space-separated
        *,
        clock: Callable[[], float] = time.time,
        concurrency: int = ENDPOINT_CONCURRENCY,
        timeout: float = TIMEOUT_SECONDS,
        breaker_threshold: int | None = BREAKER_THRESHOLD,
        breaker_pauses: tuple[float, ...] = BREAKER_PAUSES,
        on_attempt: Callable[[str, float | None], None] | None = None,
        on_breaker: Callable[[str, bool], None] | None = None,
        write: Callable[..., Awaitable[Any]] | None = None,
        record_batch: int = RECORD_BATCH,
        record_delay: float = RECORD_DELAY,
        claim_batch: int = CLAIM_BATCH,
        max_unrecorded: int = MAX_UNRECORDED,
    ) -> None:
        """``concurrency``: attempts in flight per endpoint. ``breaker_threshold`` None: no breaker.
        ``on_attempt(outcome, seconds)`` hears of each attempt once it is recorded (the
        metrics): outcome ``delivered``, ``retry`` or ``failed``; seconds None when nothing was
        sent. ``on_breaker(shown_url, open)`` hears of each breaker that opens or closes.
        ``write(fn, *args)`` runs a store change (default: the outbox's, the store's writer
        thread). ``record_batch``, ``record_delay``: the group commit's. ``claim_batch``: due
        deliveries a lane reads at a time. ``max_unrecorded``: attempts a lane may have in flight
        or waiting for their record before it starts another."""
        self.outbox = outbox
        self.on_attempt = on_attempt
        self.on_breaker = on_breaker
        self.clock = clock
        self.concurrency = concurrency
        self.timeout = timeout
        self.breaker_threshold = breaker_threshold
        self.breaker_pauses = breaker_pauses
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._lanes: dict[str, _Lane] = {}
        self._keys: dict[str, list[bytes]] = {}
        self._write = write or outbox.write
        self.record_batch = max(1, record_batch)
        self.record_delay = record_delay
        self.claim_batch = max(1, claim_batch)
        self.max_unrecorded = max(1, max_unrecorded)
        self._ended: list[_Ended] = []  # attempts over, not yet in a group being written
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Mapping[str, str]) -> None:
        """The configured endpoints and their secrets (at start and on reload)."""
        self._keys = {url: secret_keys(s) for url, s in secrets.items()}
        for url, lane in self._lanes.items():
            lane.keys = self._keys.get(url)

    def wake(self) -> None:
        """Events were appended or a delivery re-queued: every lane looks now."""
        self._wake.set()
        for lane in self._lanes.values():
            lane.appended = True
            lane.changed.set()

    def open_breakers(self) -> list[str]:
        """The endpoints (credentials stripped) whose breaker is open now."""
        return [strip_credentials(url) for url, lane in self._lanes.items() if lane.breaker.is_open]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _lane(self, url: str) -> _Lane:
        lane = self._lanes.get(url)
        if lane is None:
            threshold = self.breaker_threshold if self.breaker_threshold is not None else 2**62
            lane = self._lanes[url] = _Lane(
                url, self._keys.get(url), Breaker(threshold, self.breaker_pauses), strip_credentials(url)
            )
        return lane

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No pool-wide cap: each lane bounds its own connections, so one endpoint's hanging
            # attempts can never hold the connections another endpoint needs.
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=0),
            )
        return self._session

    # ------------------------------------------------------------------ one pass (tests, benchmarks)

    async def run_once(self) -> int:
        """Deliver everything due now, each endpoint on its own; returns how many attempts were made."""
        for url in self._keys:
            await self._queue(url)
        urls = set(self._keys) | set(self.outbox.pending_urls())
        counts = await asyncio.gather(*(self._lane_once(self._lane(url)) for url in sorted(urls)))
        await self.flush()
        return sum(counts)

    async def _lane_once(self, lane: _Lane) -> int:
        now = self.clock()
        room = lane.breaker.room(now, len(lane.in_flight), self.concurrency * 4)
        if room == 0:
            return 0
        due = self.outbox.due_deliveries(now, limit=room, url=lane.url, exclude=lane.busy())
        if not due:
            return 0
        semaphore = asyncio.Semaphore(self.concurrency)

        async def one(delivery: dict) -> None:
            async with semaphore:
                await self._attempt(lane, delivery)

        lane.breaker.started(now)
        await asyncio.gather(*(one(d) for d in due))
        return len(due)

    # ------------------------------------------------------------------ the daemon's loop

    async def run(self, stopping: asyncio.Event, idle: float = 1.0) -> None:
        """Keep a lane running for every endpoint that is configured or has pending deliveries.
        At `stopping`, the lanes start nothing new and let their attempts in flight finish;
        cancelled, they cancel those attempts too."""
        loop = asyncio.get_running_loop()
        unconfigured: set[str] = set()
        scanned_at = float("-inf")
        try:
            while not stopping.is_set():
                self._wake.clear()
                # Deliveries to endpoints no longer configured (a reload removed them) are rare:
                # look for them now and then, not at every wake-up (a dead endpoint's backlog
                # would make that scan cost something at every new event).
                if loop.time() - scanned_at >= UNCONFIGURED_SCAN_SECONDS:
                    scanned_at = loop.time()
                    try:
                        unconfigured = set(self.outbox.pending_urls()) - set(self._keys)
                    except Exception:  # the database may be busy or closing; look again soon
                        log.exception("dispatcher_step_failed")
                urls = set(self._keys) | unconfigured
                for url in urls:
                    lane = self._lane(url)
                    if lane.task is None or lane.task.done():
                        lane.task = asyncio.create_task(
                            self._run_lane(lane, stopping, idle), name="webhook-lane"
                        )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle):
                        await self._wake.wait()
            for lane in self._lanes.values():
                lane.changed.set()
            await asyncio.gather(*(lane.task for lane in self._lanes.values() if lane.task is not None))
            await self.flush()
        except asyncio.CancelledError:
            lanes = [lane.task for lane in self._lanes.values() if lane.task is not None]
            for task in lanes:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
            self._record_now()  # what ended before the cancellation is recorded, not sent again
            raise

    async def _run_lane(self, lane: _Lane, stopping: asyncio.Event, idle: float) -> None:
        """Start the lane's due deliveries while it has room; wait for room, a wake-up or the next
        due time."""
        try:
            while not stopping.is_set():
                lane.changed.clear()
                wait = idle
                try:
                    if lane.keys is not None and lane.appended and lane.queuing is None:
                        lane.appended = False  # a wake-up while it queues sets it again
                        lane.queuing = asyncio.create_task(self._queue_lane(lane), name="webhook-queue")
                    wait = self._fill(lane, idle)
                except Exception:  # a bug here must not stop this endpoint's deliveries for good
                    log.exception("dispatcher_step_failed", url=lane.url)  # the log strips url fields
                if lane.keys is None and not lane.busy() and self._idle_unconfigured(lane):
                    return  # no longer configured and nothing left to fail: the lane ends
                try:
                    async with asyncio.timeout(max(wait, 0.01)):  # no task per wait, unlike wait_for
                        await lane.changed.wait()
                except TimeoutError:
                    lane.appended = True  # now and then without a wake-up (one lost, another process's)
            # Stopping: let the attempts in flight record their outcome; what is not queued yet
            # stays in the events, for the next start.
            if lane.queuing is not None:
                lane.queuing.cancel()
            await asyncio.gather(*lane.in_flight.values(), return_exceptions=True)
        except asyncio.CancelledError:
            attempts = [*lane.in_flight.values(), *([lane.queuing] if lane.queuing is not None else [])]
            for task in attempts:
                task.cancel()
            await asyncio.gather(*attempts, return_exceptions=True)
            raise

    async def _queue_lane(self, lane: _Lane) -> None:
        """Queue the lane's new events beside it: while this waits for the write lock (another
        process's long step), the lane goes on starting what was queued before."""
        try:
            if await self._queue(lane.url):
                lane.changed.set()  # the lane looks at once: there may be deliveries due
            else:
                lane.appended = True  # at the lane's next look
        except Exception:  # as the lane's own pass: a bug here must not stop the endpoint for good
            log.exception("dispatcher_step_failed", url=lane.url)  # the log strips url fields
            lane.appended = True
        finally:
            lane.queuing = None

    async def _queue(self, url: str) -> bool:
        """Queue the endpoint's deliveries of the events appended past its cursor, a batch of
        events per transaction; False when they could not all be queued. A database locked by
        another process's long write (a catch-up step) leaves them for the lane's next look:
        they are shown as pending meanwhile, and their events are kept (retention waits for the
        cursor)."""
        try:
            while self.outbox.behind(url) and await self._write(self.outbox.queue_next, url):
                pass
        except sqlite3.OperationalError as exc:
            if not _locked(exc):
                raise
            log.warning("webhook_queue_waiting", url=url)  # the log strips url fields
            return False
        return True

    def _idle_unconfigured(self, lane: _Lane) -> bool:
        return self.outbox.next_delivery_at(lane.url) is None

    def _fill(self, lane: _Lane, idle: float) -> float:
        """Start what the lane has room for; returns how long to wait before looking again."""
        now = self.clock()
        room = lane.breaker.room(now, len(lane.in_flight), self.concurrency)
        # Back-pressure from the store: its records wake the lane (_recorded) when they commit.
        room = min(room, max(self.max_unrecorded - len(lane.in_flight) - len(lane.recording), 0))
        if room > len(lane.claimed):  # one query claims a batch, not one per attempt ended
            lane.claimed += self.outbox.due_deliveries(
                now, limit=max(room, self.claim_batch), url=lane.url, exclude=lane.busy()
            )
        for _ in range(min(room, len(lane.claimed))):
            delivery = lane.claimed.popleft()
            lane.breaker.started(now)
            task = asyncio.create_task(self._attempt(lane, delivery), name="webhook-attempt")
            lane.in_flight[delivery["id"]] = task
            task.add_done_callback(functools.partial(self._done, lane, delivery["id"]))
        if lane.in_flight or lane.recording or lane.queuing is not None:
            return idle  # a finished attempt, its record or the queuing wakes the lane
        if lane.claimed:  # due, and held back by the breaker alone
            return min(idle, lane.breaker.reopens_in(now) or 0.0)
        next_at = self.outbox.next_delivery_at(lane.url)
        wait = idle if next_at is None else max(next_at - now, 0.0)
        return min(idle, max(wait, lane.breaker.reopens_in(now) or 0.0))

    def _done(self, lane: _Lane, delivery_id: str, _task: asyncio.Task | None = None) -> None:
        lane.in_flight.pop(delivery_id, None)
        lane.changed.set()

    # ------------------------------------------------------------------ one attempt

    async def _post(self, keys: list[bytes], delivery: dict) -> tuple[int | None, str | None]:
        """(status code, error or None): one POST, no redirect followed, at most 64 KiB read."""
        timestamp = int(self.clock())
        headers = {
            "content-type": "application/json",
            "webhook-id": delivery["event_id"],
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signatures(keys, delivery["event_id"], timestamp, delivery["body"]),
            "user-agent": "watcher-webhooks",
        }
        try:
            async with self._http().post(
                delivery["url"], data=delivery["body"], headers=headers, allow_redirects=False
            ) as response:
                if not await _read_at_most(response, MAX_RESPONSE_BYTES):
                    response.close()  # the rest is never read: drop the connection instead
                if 300 <= response.status < 400:
                    location = response.headers.get("Location")
                    where = f"to {location}" if location else "without a Location"
                    return (
                        response.status,
                        f"HTTP {response.status}: a redirect {where}; redirects are not followed",
                    )
                if not 200 <= response.status < 300:
                    return response.status, f"HTTP {response.status}"
                return response.status, None
        except TimeoutError:
            return None, f"no answer within {self.timeout:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return None, f"{type(exc).__name__}: {exc}"

    async def _attempt(self, lane: _Lane, delivery: dict) -> None:
        keys = lane.keys
        started = time.perf_counter()
        status_code: int | None = None
        if keys is None:
            error: str | None = "endpoint is no longer configured"
        else:
            status_code, error = await self._post(keys, delivery)
            if error is not None:
                error = redact_text(error)  # a Location or an aiohttp error can quote credentials
        duration_ms = (time.perf_counter() - started) * 1000
        ok = error is None
        attempts_done = delivery["attempts"] + 1
        delay = None if ok else next_attempt_delay(attempts_done)
        if keys is not None:
            self._breaker_saw(lane, ok)
        lane.recording.add(delivery["id"])
        self._ended.append(
            _Ended(
                lane,
                Attempt(
                    delivery["id"],
                    ok=ok,
                    status_code=status_code,
                    error=error,
                    duration_ms=duration_ms,
                    next_attempt_at=None if delay is None else self.clock() + delay,
                    claimed_attempts=delivery["attempts"],
                    claimed_requeues=delivery["requeues"],
                ),
                delivery["event_id"],
                lane.shown,
                "delivered" if ok else ("failed" if delay is None else "retry"),
                duration_ms / 1000 if keys is not None else None,
                attempts_done,
                delay,
            )
        )
        if len(self._ended) >= self.record_batch:
            self._start_flush()
        elif self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(self.record_delay, self._start_flush)

    # ------------------------------------------------------------------ recording, in groups

    def _start_flush(self) -> None:
        """Write the attempts ended so far as one group (a task: the next group gathers meanwhile)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._ended:
            return
        group, self._ended = self._ended, []
        task = asyncio.create_task(self._record(group), name="webhook-record")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def flush(self) -> None:
        """Record every attempt that has ended (and wait for the groups being written)."""
        self._start_flush()
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _record_now(self) -> None:
        """At a cancellation: record what has ended on the spot, without awaiting."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        group, self._ended = self._ended, []
        if group:
            try:
                self.outbox.record_attempts([e.attempt for e in group])
            except Exception:
                log.exception("webhook_attempts_unrecorded", count=len(group))
                group = []
            self._recorded(group)

    async def _record(self, group: list[_Ended]) -> None:
        attempts = [e.attempt for e in group]
        wait = RECORD_RETRY_SECONDS[0]
        try:
            while True:
                try:
                    await self._write(self.outbox.record_attempts, attempts)
                    break
                except sqlite3.OperationalError as exc:
                    if not _locked(exc):
                        raise
                    # Another process holds the write lock (the daemon's long catch-up step, when
                    # this runs in the dispatcher's process): these outcomes are known, so they
                    # wait for the lock and are never sent again for it.
                    log.warning("webhook_attempts_record_waiting", count=len(group), retry_in_seconds=wait)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, RECORD_RETRY_SECONDS[1])
        except Exception:  # nothing recorded: the deliveries are still pending, and are sent again
            log.exception("webhook_attempts_unrecorded", count=len(group))
            for ended in group:
                ended.lane.recording.discard(ended.attempt.delivery_id)
                ended.lane.changed.set()
            return
        self._recorded(group)

    def _recorded(self, group: list[_Ended]) -> None:
        """Once a group has committed: its deliveries may be taken again; log and count them."""
        logger = log.bind()  # the logger as configured now, once per group rather than once per line
        lanes = set()
        for ended in group:
            ended.lane.recording.discard(ended.attempt.delivery_id)
            lanes.add(ended.lane)
            if self.on_attempt is not None:
                self.on_attempt(ended.outcome, ended.seconds)
            self._log(logger, ended)
        for lane in lanes:
            lane.changed.set()

    @staticmethod
    def _log(logger: Any, ended: _Ended) -> None:
        attempt = ended.attempt
        if attempt.ok:
            logger.info(
                "webhook_delivered",
                delivery=attempt.delivery_id,
                event_id=ended.event_id,
                url=ended.url,
                ms=round(attempt.duration_ms, 1),
            )
        elif ended.delay is None:
            logger.error(
                "webhook_failed",
                delivery=attempt.delivery_id,
                event_id=ended.event_id,
                url=ended.url,
                error=attempt.error,
                attempts=ended.attempts_done,
            )
        else:
            logger.warning(
                "webhook_retry_scheduled",
                delivery=attempt.delivery_id,
                event_id=ended.event_id,
                url=ended.url,
                error=attempt.error,
                in_seconds=ended.delay,
            )

    def _breaker_saw(self, lane: _Lane, ok: bool) -> None:
        now = self.clock()
        change = lane.breaker.record(ok, now)
        if change is None:
            return
        shown = strip_credentials(lane.url)
        if change:
            log.warning(
                "webhook_endpoint_paused",
                url=shown,
                failures=lane.breaker.failures,
                seconds=lane.breaker.reopens_in(now),
            )
        else:
            log.info("webhook_endpoint_resumed", url=shown)
        if self.on_breaker is not None:
            self.on_breaker(shown, change)


def _locked(exc: sqlite3.OperationalError) -> bool:
    """SQLite's busy or locked error: another connection held the write lock past the timeout."""
    return "locked" in str(exc) or "busy" in str(exc)


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> bool:
    """Read (and drop) the body up to `limit` bytes; True when it was read to its end."""
    read = 0
    while read <= limit:
        chunk = await response.content.read(limit + 1 - read)
        if not chunk:
            return True
        read += len(chunk)
    return False
