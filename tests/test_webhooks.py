"""Signing against the Standard Webhooks vector, and the retry schedule against a real failing endpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from decimal import Decimal

import pytest
from aiohttp import web
from harness import free_port

from watcher.store import Endpoint, NewInvoice, Store
from watcher.webhooks import RETRY_SCHEDULE, Dispatcher, next_attempt_delay, secret_key, sign, verify

# From the Standard Webhooks specification's reference libraries.
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signature_matches_the_standard_webhooks_vector():
    assert sign(secret_key(VECTOR_SECRET), VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIG


@pytest.mark.parametrize(
    "headers, body, now, ok",
    [
        (
            {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG},
            VECTOR_BODY,
            VECTOR_TS,
            True,
        ),
        (
            {
                "webhook-id": VECTOR_ID,
                "webhook-timestamp": str(VECTOR_TS),
                "webhook-signature": "v1,bad " + VECTOR_SIG,
            },
            VECTOR_BODY,
            VECTOR_TS,
            True,
        ),
        (
            {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG},
            VECTOR_BODY + b" ",
            VECTOR_TS,
            False,
        ),
        (
            {"webhook-id": "msg_other", "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG},
            VECTOR_BODY,
            VECTOR_TS,
            False,
        ),
        (
            {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG},
            VECTOR_BODY,
            VECTOR_TS + 301,
            False,
        ),
        (
            {"webhook-id": VECTOR_ID, "webhook-timestamp": "soon", "webhook-signature": VECTOR_SIG},
            VECTOR_BODY,
            VECTOR_TS,
            False,
        ),
        (
            {
                "webhook-id": VECTOR_ID,
                "webhook-timestamp": str(VECTOR_TS),
                "webhook-signature": "v2," + VECTOR_SIG[3:],
            },
            VECTOR_BODY,
            VECTOR_TS,
            False,
        ),
    ],
    ids=[
        "valid",
        "one-of-several",
        "tampered-body",
        "other-id",
        "too-old",
        "bad-timestamp",
        "unknown-version",
    ],
)
def test_verify(headers, body, now, ok):
    assert verify(secret_key(VECTOR_SECRET), headers, body, now=now) is ok


def test_schedule_is_the_contracts():
    assert RETRY_SCHEDULE == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert [next_attempt_delay(n) for n in range(1, 9)] == [*RETRY_SCHEDULE, None]


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _invoice(store: Store) -> dict:
    new = NewInvoice(
        amount=Decimal(0),
        currency="USD",
        fields={},
        metadata={},
        tolerance_percent=Decimal(0),
        payment_timing={"mode": "immediate", "expires_after_minutes": 20, "payable_until": None},
        payable_until=None,
        draft=False,
        request={},
    )
    invoice, _ = store.create_invoice(new, derive=lambda x, i: "", finish=lambda *a: ("", None))
    return invoice


async def _server(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/hook"


async def test_a_failing_endpoint_is_retried_on_schedule_then_marked_failed(tmp_path):
    seen_ids: list[str] = []

    async def always_500(request: web.Request) -> web.Response:
        seen_ids.append(request.headers["webhook-id"])
        return web.Response(status=503)

    runner, url = await _server(always_500)
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint(url, ("*",))])
    # The schedule of each delivery, on its own: no breaker pausing the endpoint in between
    # (test_a_failing_endpoint_is_paused_by_its_breaker_alone covers that).
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock, breaker_threshold=None)
    try:
        _invoice(store)  # zero amount: invoice.created and invoice.confirmed
        gaps = []
        for _ in range(len(RETRY_SCHEDULE) + 1):
            assert await dispatcher.run_once() == 2
            next_at = store.outbox.next_delivery_at()
            if next_at is None:
                break
            gaps.append(round(next_at - clock.now))
            clock.now = next_at
        assert gaps == list(RETRY_SCHEDULE)
        assert await dispatcher.run_once() == 0
        rows = store.db.execute(
            "SELECT status, attempts, last_status_code, last_error FROM deliveries"
        ).fetchall()
        assert [tuple(r) for r in rows] == [("failed", 8, 503, "HTTP 503")] * 2
        attempts = store.db.execute("SELECT COUNT(*) FROM delivery_attempts").fetchone()[0]
        assert attempts == 16
        assert len(set(seen_ids)) == 2 and len(seen_ids) == 16  # the same two ids on every attempt
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()


async def test_no_answer_within_the_timeout_is_a_failed_attempt(tmp_path):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(status=200)

    runner, url = await _server(slow)
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint(url, ("invoice.created",))])
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock, timeout=0.2)
    try:
        _invoice(store)
        assert await dispatcher.run_once() == 1  # only invoice.created is subscribed
        row = store.db.execute("SELECT status, attempts, last_error FROM deliveries").fetchone()
        assert tuple(row) == ("pending", 1, "no answer within 0.2 s")
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()


async def test_a_redelivery_during_an_attempt_keeps_its_fresh_schedule(tmp_path):
    """The last attempt is in flight when the operator redelivers: the attempt's failure must
    not turn the re-queued delivery into `failed`."""
    redelivered: list[str] = []
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)

    async def fail_after_a_redelivery(request: web.Request) -> web.Response:
        [row] = store.db.execute("SELECT id FROM deliveries").fetchall()
        redelivered.append(row["id"])
        store.outbox.redeliver(row["id"])  # the operator, while this attempt is in flight
        return web.Response(status=500)

    runner, url = await _server(fail_after_a_redelivery)
    store.outbox.set_endpoints([Endpoint(url, ("invoice.created",))])
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock)
    try:
        _invoice(store)
        store.outbox.queue_all()  # the dispatcher's queuing, done here: the rows this test changes
        store.db.execute("UPDATE deliveries SET attempts = 7")  # this attempt is the 8th, the last
        assert await dispatcher.run_once() == 1
        row = store.db.execute("SELECT status, attempts FROM deliveries").fetchone()
        assert tuple(row) == ("pending", 0)
        attempts = store.db.execute("SELECT attempt, status_code FROM delivery_attempts").fetchall()
        assert [tuple(a) for a in attempts] == [(8, 500)]
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()


async def test_a_redelivery_during_the_first_attempt_is_not_lost(tmp_path):
    """Redelivered while its first attempt is in flight (attempt count 0 before and after):
    that attempt's success must not mark the re-queued delivery delivered; it is sent again."""
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    seen: list[str] = []

    async def redeliver_during_the_first(request: web.Request) -> web.Response:
        [row] = store.db.execute("SELECT id FROM deliveries").fetchall()
        if not seen:
            store.outbox.redeliver(row["id"])  # the operator, while the first attempt is in flight
        seen.append(request.headers["webhook-id"])
        return web.Response(status=204)

    runner, url = await _server(redeliver_during_the_first)
    store.outbox.set_endpoints([Endpoint(url, ("invoice.created",))])
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock)
    try:
        _invoice(store)
        assert await dispatcher.run_once() == 1
        assert tuple(store.db.execute("SELECT status, attempts FROM deliveries").fetchone()) == ("pending", 0)
        assert await dispatcher.run_once() == 1  # the redelivery itself
        assert tuple(store.db.execute("SELECT status, attempts FROM deliveries").fetchone()) == (
            "delivered",
            1,
        )
        assert len(seen) == 2 and seen[0] == seen[1]  # the same event, under its one id
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()


# --------------------------------------------------------------------------- misbehaving receivers


class Endpoints:
    """Local receivers on one aiohttp server, each path misbehaving its own way."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.runner: web.AppRunner | None = None
        self.base = ""
        self.hits: dict[str, int] = {}

    def add(self, path: str, handler) -> str:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.hits[path] = self.hits.get(path, 0) + 1
            return await handler(request)

        self.app.router.add_route("*", path, counted)
        return path

    def url(self, path: str) -> str:
        return self.base + path

    async def start(self) -> Endpoints:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def endpoints():
    made = Endpoints()
    yield made
    await made.stop()


def _deliveries(store: Store, url: str) -> list[tuple]:
    rows = store.db.execute(
        "SELECT status, attempts, last_status_code, last_error FROM deliveries WHERE url = ? ORDER BY rowid",
        [url],
    ).fetchall()
    return [tuple(r) for r in rows]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_a_failed_attempt_and_is_never_followed(tmp_path, endpoints, status):
    """A 302 used to become a body-less GET recorded as delivered (the event lost); a 307 re-POSTed
    the signed body to wherever the receiver pointed. The Location's token is masked."""

    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(status=204)

    endpoints.add("/elsewhere", elsewhere)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(
            status=status, headers={"Location": endpoints.url("/elsewhere?token=LOCATION-SECRET-123")}
        )

    endpoints.add("/hook", redirect)
    await endpoints.start()
    url = endpoints.url("/hook?token=ENDPOINT-SECRET-456")
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint(url, ("invoice.created",))])
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock)
    try:
        _invoice(store)
        assert await dispatcher.run_once() == 1
        [(state, attempts, code, error)] = _deliveries(store, url)
        assert (state, attempts, code) == ("pending", 1, status)
        assert error == (
            f"HTTP {status}: a redirect to {endpoints.url('/elsewhere?token=***')}; "
            "redirects are not followed"
        )
        assert endpoints.hits == {"/hook": 1}  # nothing went to the redirect's target
        shown = store.outbox.list_deliveries()[0][0]
        assert "SECRET" not in repr(shown)
    finally:
        await dispatcher.close()
        store.close()


async def test_a_hanging_endpoint_does_not_delay_a_healthy_one(tmp_path, endpoints):
    """One endpoint that never answers beside a healthy one: the healthy one gets every event
    at once. Before, a pass took 64 due deliveries and waited for all of them (10 s each
    hanging attempt), so the healthy endpoint got 16 deliveries per 10 s."""
    delivered: list[str] = []

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(status=204)

    async def healthy(request: web.Request) -> web.Response:
        delivered.append(request.headers["webhook-id"])
        return web.Response(status=204)

    endpoints.add("/hang", hang)
    endpoints.add("/ok", healthy)
    await endpoints.start()
    dead, alive = endpoints.url("/hang"), endpoints.url("/ok")
    store = Store(tmp_path / "w.db", clock=time.time)
    store.outbox.set_endpoints([Endpoint(dead, ("*",)), Endpoint(alive, ("*",))])
    dispatcher = Dispatcher(store.outbox, {dead: VECTOR_SECRET, alive: VECTOR_SECRET})
    store.outbox.on_delivery_queued = dispatcher.wake
    stopping = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stopping))
    try:
        for _ in range(60):  # 120 events: created and confirmed each
            _invoice(store)
        started = time.monotonic()
        while len(delivered) < 120:
            assert time.monotonic() - started < 5, f"the healthy endpoint got {len(delivered)} of 120 in 5 s"
            await asyncio.sleep(0.02)
        assert len(set(delivered)) == 120
        hung = store.db.execute(
            "SELECT COUNT(*) FROM deliveries WHERE url = ? AND status = 'pending'", [dead]
        ).fetchone()[0]
        assert hung == 120
    finally:
        runner.cancel()  # not a graceful stop, which would wait for the hanging attempts
        await asyncio.gather(runner, return_exceptions=True)
        await dispatcher.close()
        store.close()


async def test_a_failing_endpoint_is_paused_by_its_breaker_alone(tmp_path, endpoints):
    """After 10 failures in a row an endpoint gets no attempt for a pause (its deliveries wait,
    due, without spending retries); then one probe; a failed probe pauses it longer, a good one
    resumes it. Another endpoint is delivered to throughout."""
    answer = {"status": 503}

    async def flaky(request: web.Request) -> web.Response:
        return web.Response(status=answer["status"])

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(status=204)

    endpoints.add("/flaky", flaky)
    endpoints.add("/ok", healthy)
    await endpoints.start()
    bad, good = endpoints.url("/flaky"), endpoints.url("/ok")
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint(bad, ("invoice.created",)), Endpoint(good, ("invoice.created",))])
    changes: list[tuple[str, bool]] = []
    dispatcher = Dispatcher(
        store.outbox,
        {bad: VECTOR_SECRET, good: VECTOR_SECRET},
        clock=clock,
        on_breaker=lambda url, opened: changes.append((url, opened)),
    )

    def attempts(url: str) -> int:
        return sum(a for _, a, _, _ in _deliveries(store, url))

    try:
        for _ in range(12):
            _invoice(store)
        assert await dispatcher.run_once() == 24  # 12 each; the 10th failure opens the breaker
        assert changes == [(bad, True)] and dispatcher.open_breakers() == [bad]
        clock.now += 5  # the first retries are due, and the first pause is over
        for _ in range(3):
            _invoice(store)
        assert await dispatcher.run_once() == 3 + 1  # the healthy endpoint's three, and one probe
        assert attempts(bad) == 13
        clock.now += 5  # the failed probe paused it for 15 s
        assert await dispatcher.run_once() == 0
        clock.now += 10
        answer["status"] = 204
        assert await dispatcher.run_once() == 1  # the probe, which succeeds and closes it
        assert changes == [(bad, True), (bad, False)] and dispatcher.open_breakers() == []
        # Everything due to it, at once: 15 less the good probe and the failed one (due in 5 min).
        assert await dispatcher.run_once() == 13
        clock.now += 300
        assert await dispatcher.run_once() == 1
        assert {s for s, *_ in _deliveries(store, bad)} == {"delivered"}
        assert {s for s, *_ in _deliveries(store, good)} == {"delivered"}
        # The pauses cost no attempt: 12 failures, two probes, then one each (and the retry).
        tried = store.db.execute(
            "SELECT COUNT(*) FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
            "WHERE d.url = ?",
            [bad],
        ).fetchone()[0]
        assert tried == 12 + 2 + 13 + 1
    finally:
        await dispatcher.close()
        store.close()


async def test_at_most_64_kib_of_an_answer_is_read(tmp_path, endpoints):
    """A receiver answering 200 with 50 MB: delivered, and the daemon stopped reading (and
    closed the connection) long before the end. Before, the whole body was read into memory."""
    sent = {"bytes": 0, "finished": False}
    chunk = b"x" * (256 * 1024)

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/plain"})
        response.content_length = 50 * 1024 * 1024
        await response.prepare(request)
        try:
            for _ in range(200):
                await response.write(chunk)
                sent["bytes"] += len(chunk)
            sent["finished"] = True
        except (ConnectionResetError, ConnectionError):
            pass
        return response

    endpoints.add("/huge", huge)
    await endpoints.start()
    url = endpoints.url("/huge")
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint(url, ("invoice.created",))])
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock)
    try:
        _invoice(store)
        assert await dispatcher.run_once() == 1
        assert _deliveries(store, url) == [("delivered", 1, 200, None)]
        await asyncio.sleep(0.3)  # the server notices the closed connection
        assert not sent["finished"]
        assert sent["bytes"] < 16 * 1024 * 1024, sent
    finally:
        await dispatcher.close()
        store.close()


async def test_while_rotating_every_attempt_carries_one_signature_per_secret(tmp_path, endpoints):
    old_secret = VECTOR_SECRET
    new_secret = "whsec_" + base64.b64encode(b"n" * 32).decode()
    seen: list[tuple[dict, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(({k.lower(): v for k, v in request.headers.items()}, await request.read()))
        return web.Response(status=204)

    endpoints.add("/hook", hook)
    await endpoints.start()
    url = endpoints.url("/hook")
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint(url, ("invoice.created",))])
    dispatcher = Dispatcher(store.outbox, {url: f"{old_secret} {new_secret}"}, clock=clock)
    try:
        _invoice(store)
        assert await dispatcher.run_once() == 1
        [(headers, body)] = seen
        parts = headers["webhook-signature"].split(" ")
        assert len(parts) == 2 and all(p.startswith("v1,") for p in parts)
        msg_id, ts = headers["webhook-id"], int(headers["webhook-timestamp"])
        # Each signature on its own: the first is the old secret's, the second the new one's.
        assert parts[0] == sign(secret_key(old_secret), msg_id, ts, body)
        assert parts[1] == sign(secret_key(new_secret), msg_id, ts, body)
        for secret in (old_secret, new_secret):
            alone = {**headers, "webhook-signature": sign(secret_key(secret), msg_id, ts, body)}
            assert verify(secret_key(secret), alone, body, now=clock.now)
            assert verify(secret_key(secret), headers, body, now=clock.now)  # a receiver with either secret
    finally:
        await dispatcher.close()
        store.close()


# --------------------------------------------------------------------------- group commit (issue 13)


@contextlib.asynccontextmanager
async def _running(dispatcher: Dispatcher, store: Store):
    """The dispatcher runs inside the block; stopped and closed (with the store) after it."""
    stopping = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stopping))
    try:
        yield
    finally:
        stopping.set()
        dispatcher.wake()
        await runner
        await dispatcher.close()
        store.close()


async def _until_recorded(outcomes: list[str], count: int, within: float) -> None:
    started = time.monotonic()
    while len(outcomes) < count:
        assert time.monotonic() - started < within, f"{len(outcomes)} of {count} recorded"
        await asyncio.sleep(0.02)


async def _deliveries_due(
    tmp_path, endpoints, events: tuple[str, ...] = ("invoice.created",), invoices: int = 1
) -> tuple[Store, str, list[str]]:
    """A store with deliveries due to a healthy endpoint, and the ids that endpoint receives."""
    got: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        got.append(request.headers["webhook-id"])
        return web.Response(status=204)

    endpoints.add("/ok", ok)
    await endpoints.start()
    url = endpoints.url("/ok")
    store = Store(tmp_path / "w.db", clock=time.time)
    store.outbox.set_endpoints([Endpoint(url, events)])
    for _ in range(invoices):
        _invoice(store)
    store.outbox.queue_all()  # the dispatcher's queuing, done here: the rows this test changes
    return store, url, got


async def test_attempts_that_end_together_are_recorded_in_one_transaction(tmp_path, endpoints):
    """40 deliveries, 16 in flight: their attempts are recorded in a few transactions (one
    fsync each at synchronous=FULL), not one each; every one is still recorded."""
    store, url, got = await _deliveries_due(tmp_path, endpoints, ("*",), invoices=20)  # created, confirmed
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: not lowered to go faster
    outcomes: list[str] = []
    transactions: list[int] = []  # attempts per transaction (each change is one, on the store's writer)

    async def write(change, *args):
        assert change == store.outbox.record_attempts
        transactions.append(len(args[0]))
        return await store.write(change, *args)

    dispatcher = Dispatcher(
        store.outbox,
        {url: VECTOR_SECRET},
        record_delay=0.2,
        write=write,
        on_attempt=lambda o, s: outcomes.append(o),
    )
    async with _running(dispatcher, store):
        await _until_recorded(outcomes, 40, within=10)
        assert sorted(got) == sorted(set(got)) and len(got) == 40  # each sent once: none taken twice
        statuses = store.db.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
        assert [tuple(r) for r in statuses] == [("delivered", 40)]
        assert store.db.execute("SELECT COUNT(*) FROM delivery_attempts").fetchone()[0] == 40
        assert sum(transactions) == 40 and len(transactions) <= 6, transactions


async def test_a_delivery_waiting_for_its_record_is_not_sent_again(tmp_path, endpoints):
    """Its attempt is over, its group not yet written: the lane must not take it again."""
    store, url, got = await _deliveries_due(tmp_path, endpoints)
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, record_delay=1.0)
    stopping = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stopping, idle=0.05))
    try:
        await asyncio.sleep(0.7)  # many lane passes while the record waits
        assert len(got) == 1
        assert store.db.execute("SELECT status FROM deliveries").fetchone()[0] == "pending"
    finally:
        stopping.set()
        dispatcher.wake()
        await runner  # a graceful stop writes the group it holds
        await dispatcher.close()
    assert store.db.execute("SELECT status, attempts FROM deliveries").fetchone()[:] == ("delivered", 1)
    assert len(got) == 1
    store.close()


async def test_an_attempt_whose_record_never_committed_is_sent_again_under_its_id(tmp_path, endpoints):
    """The daemon dies after the POST, before the group's commit: the delivery is still pending
    in the database, so the next run sends it again (at least once), under the same id."""
    store, url, got = await _deliveries_due(tmp_path, endpoints)
    never = asyncio.Event()

    async def write_that_never_commits(change, *args):
        await never.wait()  # the process dies here, before the transaction

    dying = Dispatcher(store.outbox, {url: VECTOR_SECRET}, write=write_that_never_commits, record_delay=0)
    runner = asyncio.create_task(dying.run(asyncio.Event()))
    try:
        started = time.monotonic()
        while not got:
            assert time.monotonic() - started < 5
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await dying.close()
    assert store.db.execute("SELECT status, attempts FROM deliveries").fetchone()[:] == ("pending", 0)
    assert store.db.execute("SELECT COUNT(*) FROM delivery_attempts").fetchone()[0] == 0
    restarted = Dispatcher(store.outbox, {url: VECTOR_SECRET})
    try:
        assert await restarted.run_once() == 1
    finally:
        await restarted.close()
    assert store.db.execute("SELECT status, attempts FROM deliveries").fetchone()[:] == ("delivered", 1)
    assert len(got) == 2 and got[0] == got[1]
    store.close()


async def test_a_lane_reads_its_due_deliveries_in_batches(tmp_path, endpoints):
    """200 deliveries to a healthy endpoint, 4 in flight: a few queries for due deliveries, each
    claiming a batch, not one query per slot freed (the dispatcher's CPU per delivery); each
    is still sent once."""
    store, url, got = await _deliveries_due(tmp_path, endpoints, ("*",), invoices=100)  # created, confirmed
    queries: list[int] = []
    read_due = store.outbox.due_deliveries

    def counted(*args, **kwargs):
        due = read_due(*args, **kwargs)
        queries.append(len(due))
        return due

    store.outbox.due_deliveries = counted  # type: ignore[method-assign]
    outcomes: list[str] = []
    dispatcher = Dispatcher(
        store.outbox, {url: VECTOR_SECRET}, concurrency=4, on_attempt=lambda o, s: outcomes.append(o)
    )
    async with _running(dispatcher, store):
        await _until_recorded(outcomes, 200, within=20)
        assert len(got) == 200 and len(set(got)) == 200
        assert outcomes == ["delivered"] * 200
        claimed = [n for n in queries if n]
        # 64 at a time, 4 in flight (before: a query per slot freed, 50 or more)
        assert sum(claimed) == 200 and len(claimed) <= 8, queries


def test_a_group_of_attempts_is_written_in_two_statements_whatever_its_size(tmp_path):
    """50 attempts, one group: one INSERT and one UPDATE in one transaction (each statement
    run on the store's writer thread hands the GIL to the event loop and back; before, a
    SELECT and one INSERT and one UPDATE per attempt). Each outcome is recorded as before:
    delivered, retry, failed, re-queued by the operator meanwhile, pruned meanwhile, and an
    attempt that did not say what it claimed."""
    from watcher.store.outbox import Attempt

    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint("http://127.0.0.1:9/hook", ("invoice.created",))])
    for _ in range(50):
        _invoice(store)
    store.outbox.queue_all()  # the dispatcher's queuing, done here: the rows this test changes
    ids = [r["id"] for r in store.db.execute("SELECT id FROM deliveries ORDER BY id")]
    store.db.execute("UPDATE deliveries SET attempts = 2 WHERE id IN (?, ?)", [ids[1], ids[2]])
    store.db.execute("UPDATE deliveries SET attempts = 7 WHERE id = ?", [ids[3]])
    store.outbox.redeliver(ids[4])  # re-queued while its attempt was in flight
    store.db.execute("DELETE FROM deliveries WHERE id = ?", [ids[5]])  # pruned meanwhile

    def attempt(i: int, ok: bool = True, **fields) -> Attempt:
        given = {"status_code": 204, "error": None, "duration_ms": 1.5, "next_attempt_at": None}
        given |= {"claimed_attempts": 0, "claimed_requeues": 0} | fields
        return Attempt(ids[i], ok=ok, **given)

    group = [
        attempt(0),
        attempt(
            1,
            ok=False,
            status_code=500,
            error="HTTP 500",
            next_attempt_at=clock.now + 300,
            claimed_attempts=2,
        ),
        attempt(2, ok=False, status_code=None, error="no answer within 10 s", claimed_attempts=2),
        attempt(3, ok=False, status_code=503, error="HTTP 503", claimed_attempts=7),
        attempt(4),
        attempt(5),
        attempt(6, claimed_attempts=None, claimed_requeues=None),
        *(attempt(i) for i in range(7, 50)),
    ]
    statements: list[str] = []
    store.db.conn.set_trace_callback(statements.append)
    store.outbox.record_attempts(group)
    store.db.conn.set_trace_callback(None)
    # The busy handler switched off and on around BEGIN IMMEDIATE (engine._begin_immediate) is
    # the lock's, not the group's: measured, it costs the dispatcher nothing (BENCHMARKS.md).
    statements = [s for s in statements if not s.startswith("PRAGMA busy_timeout")]
    assert len(statements) == 4, statements  # BEGIN, the attempts' INSERT, the deliveries' UPDATE, COMMIT

    rows = {
        r["id"]: (r["status"], r["attempts"], r["last_status_code"], r["last_error"], r["next_attempt_at"])
        for r in store.db.execute("SELECT * FROM deliveries")
    }
    assert rows[ids[0]] == ("delivered", 1, 204, None, None)
    assert rows[ids[1]] == ("pending", 3, 500, "HTTP 500", clock.now + 300)
    assert rows[ids[2]] == ("failed", 3, None, "no answer within 10 s", None)
    assert rows[ids[3]] == ("failed", 8, 503, "HTTP 503", None)
    assert rows[ids[4]][:2] == ("pending", 0)  # the operator's fresh schedule stands
    assert ids[5] not in rows
    assert rows[ids[6]] == ("delivered", 1, 204, None, None)
    assert all(rows[ids[i]] == ("delivered", 1, 204, None, None) for i in range(7, 50))
    delivered_at = store.db.execute(
        "SELECT COUNT(*) FROM deliveries WHERE delivered_at IS NOT NULL AND status = 'delivered'"
    ).fetchone()[0]
    assert delivered_at == 45
    recorded = {
        r["delivery_id"]: (r["attempt"], r["status_code"], r["error"])
        for r in store.db.execute("SELECT * FROM delivery_attempts")
    }
    assert len(recorded) == 49 and ids[5] not in recorded
    assert recorded[ids[1]] == (3, 500, "HTTP 500")
    assert recorded[ids[3]] == (8, 503, "HTTP 503")
    assert recorded[ids[4]] == (1, 204, None)  # recorded, though the delivery was left alone
    assert recorded[ids[6]] == (1, 204, None)
    store.close()


async def test_a_paused_lane_holds_its_claimed_deliveries_and_probes_when_the_pause_ends(
    tmp_path, endpoints, monkeypatch
):
    """The daemon's loop (not run_once): an endpoint failing its first 3 attempts opens its
    breaker while the lane holds claimed deliveries; none of them is sent during the pause, the
    probe goes out when the pause ends (not at the next idle look, 30 s away), and then every
    delivery arrives, each once."""
    answers: list[tuple[float, int]] = []

    async def failing_first(request: web.Request) -> web.Response:
        status = 503 if len(answers) < 3 else 204
        answers.append((time.monotonic(), status))
        return web.Response(status=status)

    import watcher.webhooks

    monkeypatch.setattr(watcher.webhooks, "RETRY_SCHEDULE", (0.1,) * 7)  # the failed three come back soon
    endpoints.add("/hook", failing_first)
    await endpoints.start()
    url = endpoints.url("/hook")
    store = Store(tmp_path / "w.db", clock=time.time)
    store.outbox.set_endpoints([Endpoint(url, ("*",))])
    for _ in range(10):
        _invoice(store)  # 20 deliveries: created and confirmed
    outcomes: list[str] = []
    dispatcher = Dispatcher(
        store.outbox,
        {url: VECTOR_SECRET},
        concurrency=1,
        breaker_threshold=3,
        breaker_pauses=(0.5,),
        record_delay=0,
        on_attempt=lambda o, s: outcomes.append(o),
    )
    stopping = asyncio.Event()
    runner = asyncio.create_task(dispatcher.run(stopping, idle=30))
    try:
        started = time.monotonic()
        while outcomes.count("delivered") < 20:
            assert time.monotonic() - started < 10, f"{outcomes.count('delivered')} of 20 delivered"
            await asyncio.sleep(0.02)
        assert [s for _, s in answers[:4]] == [503, 503, 503, 204]
        paused = answers[3][0] - answers[2][0]
        assert 0.45 <= paused < 2, paused  # nothing during the pause; the probe right after it
        assert len(answers) == 23  # three failures, then each of the 20 once (the failed three again)
        statuses = store.db.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall()
        assert [tuple(r) for r in statuses] == [("delivered", 20)]
    finally:
        stopping.set()
        dispatcher.wake()
        await runner
        await dispatcher.close()
        store.close()


# --------------------------------------------------------------------------- bounded memory (issue 13)


async def test_a_lane_stops_starting_attempts_while_too_many_wait_for_their_record(tmp_path, endpoints):
    """The store's writer thread is busy (a long catch-up step): the group commits wait. A
    lane starts no attempt past `max_unrecorded` in flight or waiting for their record, and
    resumes as they commit; each delivery is still sent once. (Before, it went on sending
    everything due, each attempt held in memory and excluded by every later claim.)"""
    store, url, got = await _deliveries_due(tmp_path, endpoints, ("*",), invoices=100)  # 200 deliveries
    writer_free = asyncio.Event()

    async def write(change, *args):
        await writer_free.wait()  # the writer thread is busy with a follower step
        return await store.write(change, *args)

    outcomes: list[str] = []
    dispatcher = Dispatcher(
        store.outbox,
        {url: VECTOR_SECRET},
        concurrency=4,
        max_unrecorded=20,
        write=write,
        record_delay=0,
        on_attempt=lambda o, s: outcomes.append(o),
    )
    async with _running(dispatcher, store):
        try:
            started = time.monotonic()
            while len(got) < 20:
                assert time.monotonic() - started < 10, f"{len(got)} sent"
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # many lane passes while the records wait
            assert len(got) == 20, len(got)
            [lane] = dispatcher._lanes.values()
            assert len(lane.in_flight) + len(lane.recording) <= 20
        finally:
            writer_free.set()  # the dispatcher stops with its attempts recorded, whatever happened
        await _until_recorded(outcomes, 200, within=20)
        assert len(got) == 200 and len(set(got)) == 200
        assert outcomes == ["delivered"] * 200


def test_claims_leaving_out_lists_of_any_length_compile_one_statement(tmp_path):
    """The dispatcher claims due deliveries leaving out those it holds, a list whose length
    changes at every claim. SQLite's own memory (its compiled statements: the connection
    caches 128) stays flat over 128 claims of 128 lengths; with a placeholder per id each
    length was a statement of its own, as large as its list (240 MB on the event loop's
    connection in a 100% catch-up). Each claim still leaves the listed deliveries out."""
    import _sqlite3
    import ctypes

    sqlite = ctypes.CDLL(_sqlite3.__file__)
    sqlite.sqlite3_memory_used.restype = ctypes.c_int64
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    store.outbox.set_endpoints([Endpoint("http://127.0.0.1:9/hook", ("invoice.created",))])
    for _ in range(3):
        _invoice(store)
    store.outbox.queue_all()  # the dispatcher's queuing, done here: the rows this test claims
    ids = [r["id"] for r in store.db.execute("SELECT id FROM deliveries")]
    others = [f"dlv_{i:026d}" for i in range(3_000)]
    store.outbox.due_deliveries(clock.now, exclude=others[:10])  # the one statement, compiled
    before = sqlite.sqlite3_memory_used()
    for length in range(2_000, 2_128):
        due = store.outbox.due_deliveries(clock.now, exclude=[ids[0], *others[:length]])
        assert sorted(d["id"] for d in due) == sorted(ids[1:])
    grown = (sqlite.sqlite3_memory_used() - before) / 2**20
    assert grown < 2, f"SQLite's memory grew {grown:.1f} MB"
    store.close()
