"""Signing against the Standard Webhooks vector, and the retry schedule against a real failing endpoint."""

from __future__ import annotations

import asyncio
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
        ({"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG}, VECTOR_BODY, VECTOR_TS, True),
        ({"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": "v1,bad " + VECTOR_SIG}, VECTOR_BODY, VECTOR_TS, True),
        ({"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG}, VECTOR_BODY + b" ", VECTOR_TS, False),
        ({"webhook-id": "msg_other", "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG}, VECTOR_BODY, VECTOR_TS, False),
        ({"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIG}, VECTOR_BODY, VECTOR_TS + 301, False),
        ({"webhook-id": VECTOR_ID, "webhook-timestamp": "soon", "webhook-signature": VECTOR_SIG}, VECTOR_BODY, VECTOR_TS, False),
        ({"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": "v2," + VECTOR_SIG[3:]}, VECTOR_BODY, VECTOR_TS, False),
    ],
    ids=["valid", "one-of-several", "tampered-body", "other-id", "too-old", "bad-timestamp", "unknown-version"],
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
        amount=Decimal(0), currency="USD", fields={}, metadata={}, tolerance_percent=Decimal(0),
        payment_timing={"mode": "immediate", "expires_after_minutes": 20, "payable_until": None},
        payable_until=None, draft=False, request={},
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
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock)
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
        rows = store.db.execute("SELECT status, attempts, last_status_code, last_error FROM deliveries").fetchall()
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
        assert tuple(store.db.execute("SELECT status, attempts FROM deliveries").fetchone()) == ("delivered", 1)
        assert len(seen) == 2 and seen[0] == seen[1]  # the same event, under its one id
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()
