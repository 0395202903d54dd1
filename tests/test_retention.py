"""Retention (`[retention]`): idempotency keys expire after a day, delivered events (with their
deliveries and attempts) after 30 days, never an event that may still go out; each prune is
one bounded batch; `/metrics` shows the store's size and what was pruned."""

from __future__ import annotations

import time
from decimal import Decimal

from harness import Harness
from test_ops import sample, scrape

from watcher.store import Endpoint, NewInvoice, Store
from watcher.store.retention import prune_delivered_events, prune_idempotency_keys

DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def create(store: Store, key: str | None = None) -> dict:
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
    invoice, _ = store.create_invoice(
        new,
        derive=lambda x, i: "",
        finish=lambda *a: ("", None),
        idempotency_key=key,
        request_hash="h" if key else None,
    )
    return invoice


def count(store: Store, table: str) -> int:
    return store.db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_idempotency_keys_expire_after_their_hours_a_batch_at_a_time(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        old = [create(store, f"old-{n}") for n in range(5)]
        clock.now += 23 * 3600
        create(store, "recent")
        clock.now += 2 * 3600  # the old keys are 25 h old, the recent one 2 h
        assert prune_idempotency_keys(store, clock.now - 24 * 3600, limit=3) == 3
        assert prune_idempotency_keys(store, clock.now - 24 * 3600, limit=3) == 2
        assert prune_idempotency_keys(store, clock.now - 24 * 3600, limit=3) == 0
        keys = [r[0] for r in store.db.execute("SELECT key FROM idempotency_keys")]
        assert keys == ["recent"]
        # A forgotten key creates a new invoice; the invoices themselves are all kept.
        again = create(store, "old-0")
        assert again["id"] != old[0]["id"] and count(store, "invoices") == 7
    finally:
        store.close()


def test_only_events_whose_every_delivery_went_out_are_pruned_with_their_deliveries(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        store.outbox.set_endpoints(
            [Endpoint("http://127.0.0.1:1/a", ("*",)), Endpoint("http://127.0.0.1:1/b", ("*",))]
        )
        delivered, half, failed = (
            create(store),
            create(store),
            create(store),
        )  # two events each, four deliveries
        store.outbox.set_endpoints([])
        unsent = create(store)  # no endpoint: nothing to deliver

        def settle(invoice: dict, statuses: tuple[str, str]) -> None:
            """Endpoint a's deliveries end as statuses[0], endpoint b's as statuses[1]."""
            rows = store.db.execute(
                "SELECT d.id, d.url FROM deliveries d WHERE d.invoice_id = ?", [invoice["id"]]
            ).fetchall()
            for row in rows:
                status = statuses[0] if row["url"].endswith("/a") else statuses[1]
                ok = status == "delivered"
                store.outbox.record_attempt(
                    row["id"],
                    ok=ok,
                    status_code=204 if ok else 500,
                    error=None if ok else "HTTP 500",
                    duration_ms=1.0,
                    next_attempt_at=None if status != "pending" else clock.now + 5,
                )

        settle(delivered, ("delivered", "delivered"))
        settle(half, ("delivered", "pending"))
        settle(failed, ("delivered", "failed"))
        before = count(store, "events")
        clock.now += 29 * DAY
        assert prune_delivered_events(store, clock.now - 30 * DAY) == (0, 0, 0)  # not old enough
        clock.now += 2 * DAY
        events, deliveries, attempts = prune_delivered_events(store, clock.now - 30 * DAY)
        assert (events, deliveries, attempts) == (4, 4, 4)  # two events each of `delivered` and `unsent`
        left = {r[0] for r in store.db.execute("SELECT DISTINCT invoice_id FROM events")}
        assert left == {half["id"], failed["id"]} and count(store, "events") == before - 4
        assert count(store, "deliveries") == 8 and count(store, "delivery_attempts") == 8
        assert (
            store.outbox.events_for(delivered["id"]) == [] and store.get_invoice(delivered["id"]) is not None
        )
        assert unsent["id"] not in left
    finally:
        store.close()


def test_a_status_shared_by_the_events_of_one_change_goes_with_the_last_of_them(tmp_path):
    """The events of one change store their invoice's status once (m009): pruning one of them
    keeps the status for the other, whose body is still whole; pruning the last removes it."""
    import orjson

    from watcher.store.outbox import NewEvent

    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        store.outbox.set_endpoints([Endpoint("http://127.0.0.1:1/a", ("*",))])
        status = orjson.dumps({"id": "inv_x", "status": "paid", "note": "caf\u00e9 \u2603"})
        with store.db.atomic():
            store.outbox.append(
                [
                    NewEvent("invoice.payment_detected", "inv_x", status, {"amount_atomic": str(2**255)}),
                    NewEvent("invoice.paid", "inv_x", status, None),
                ]
            )
        [(shared,)] = store.db.execute(
            "SELECT DISTINCT status_id FROM events WHERE invoice_id = 'inv_x'"
        ).fetchall()
        assert count(store, "event_statuses") == 1
        bodies = {e["type"]: e["body"] for e in store.outbox.events_for("inv_x")}
        for event_type, body in bodies.items():
            event = orjson.loads(body)
            assert body == orjson.dumps(event)  # byte for byte the whole event, as sent
            assert event["type"] == event_type and event["data"]["invoice"] == orjson.loads(status)
        assert orjson.loads(bodies["invoice.payment_detected"])["data"]["payment"] == {
            "amount_atomic": str(2**255)
        }
        store.outbox.queue_all()  # the dispatcher's queuing, done here
        deliveries = dict(store.db.execute("SELECT event_type, id FROM deliveries").fetchall())

        def deliver(event_type: str) -> None:
            store.outbox.record_attempt(
                deliveries[event_type],
                ok=True,
                status_code=204,
                error=None,
                duration_ms=1.0,
                next_attempt_at=None,
            )

        deliver("invoice.payment_detected")
        clock.now += 31 * DAY
        assert prune_delivered_events(store, clock.now - 30 * DAY) == (1, 1, 1)
        assert count(store, "event_statuses") == 1
        [left] = store.outbox.events_for("inv_x")
        assert left["body"] == bodies["invoice.paid"]
        assert store.outbox.due_deliveries(clock.now)[0]["body"] == bodies["invoice.paid"]
        deliver("invoice.paid")
        assert prune_delivered_events(store, clock.now - 30 * DAY) == (1, 1, 1)
        assert count(store, "event_statuses") == 0 and shared is not None
    finally:
        store.close()


class RetentionHarness(Harness):
    """The daemon with a clock the test moves forward and prune jobs every 0.2 s."""

    prune_interval = 0.2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.offset = 0.0

    def clock(self) -> float:
        return time.time() + self.offset


async def test_the_daemon_prunes_on_schedule_and_reports_size_and_counts(harnesses):
    h = await harnesses(RetentionHarness)
    status, first, _ = await h.request(
        "POST", "/v1/invoices", json={"amount": "0"}, headers={"Idempotency-Key": "k1"}
    )
    assert status == 201
    await h.wait_events(first["id"], "invoice.created", "invoice.confirmed")
    await h.settle()
    samples = await scrape(h)
    assert sample(samples, "watcher_store_bytes", file="database") > 0
    assert sample(samples, "watcher_store_bytes", file="wal") is not None
    assert sample(samples, "watcher_pruned_total", what="events") == 0

    h.offset = 31 * DAY  # a month later
    store = h.service.store

    def pruned() -> bool:
        return count(store, "events") == 0 and count(store, "idempotency_keys") == 0

    await h.wait_for(pruned, what="the month-old events and key pruned")
    samples = await scrape(h)
    assert sample(samples, "watcher_pruned_total", what="events") == 2
    assert sample(samples, "watcher_pruned_total", what="deliveries") == 2
    assert sample(samples, "watcher_pruned_total", what="delivery_attempts") == 2
    assert sample(samples, "watcher_pruned_total", what="idempotency_keys") == 1
    assert (await h.get(first["id"]))["status"] == "confirmed"  # the invoice itself stays


class WatchHarness(RetentionHarness):
    """Closed invoices are watched for a day only."""

    def settings(self):
        base = super().settings()
        return base.model_copy(
            update={"retention": base.retention.model_copy(update={"watch_closed_invoices_days": 1})}
        )


async def test_addresses_of_long_closed_invoices_leave_the_watch_set(harnesses):
    h = await harnesses(WatchHarness)
    paid = await h.create(amount="2")
    await h.pay(paid["id"])
    await h.mine(4)
    await h.wait_status(paid["id"], "confirmed")
    cancelled = await h.create(amount="3")
    status, _, _ = await h.request("POST", f"/v1/invoices/{cancelled['id']}/cancel")
    assert status == 200
    open_one = await h.create(amount="4")
    watch = h.service.followers["sandbox"].watch
    address = {
        i["id"]: i["payment_options"][0]["destination_address"].lower() for i in (paid, cancelled, open_one)
    }
    await h.mine(1)  # the follower's next step picks up the newest option
    await h.wait_for(lambda: all(a in watch.addresses for a in address.values()), what="all three watched")

    h.offset = 2 * DAY  # two days later: the closed ones go, the open one stays
    await h.wait_for(
        lambda: (
            address[paid["id"]] not in watch.addresses and address[cancelled["id"]] not in watch.addresses
        ),
        what="closed invoices unwatched",
    )
    assert address[open_one["id"]] in watch.addresses
    samples = await scrape(h)
    assert sample(samples, "watcher_pruned_total", what="watched_options") == 2
    assert (await h.get(cancelled["id"]))["status"] == "cancelled"  # the invoices themselves stay


def test_an_event_stored_whole_before_m009_is_read_and_sent_as_it_was(tmp_path):
    """Events written before statuses were shared hold their whole body and no status_id."""
    import orjson

    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        body = orjson.dumps({"id": "evt_old", "type": "invoice.paid", "data": {"invoice": {"id": "inv_o"}}})
        with store.db.atomic():
            store.db.execute(
                "INSERT INTO events(id, type, invoice_id, created_at, body) VALUES (?,?,?,?,?)",
                ["evt_old", "invoice.paid", "inv_o", "2026-01-01T00:00:00Z", body],
            )
            store.db.execute(
                "INSERT INTO deliveries(id, event_id, event_type, invoice_id, url, status, next_attempt_at, "
                "created_at) VALUES ('dlv_old', 'evt_old', 'invoice.paid', 'inv_o', 'http://127.0.0.1:1/', "
                "'pending', 0, '2026-01-01T00:00:00Z')"
            )
        assert store.outbox.events_for("inv_o")[0]["body"] == body
        assert [d["body"] for d in store.outbox.due_deliveries(clock.now)] == [body]
    finally:
        store.close()


def test_an_event_whose_shared_status_is_missing_is_never_sent_as_its_payment_alone(tmp_path):
    """A status row gone while an event still names it (a store damaged by hand) is an error,
    not a webhook body made of the event's payment JSON."""
    import orjson
    import pytest

    from watcher.store.outbox import NewEvent

    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        store.outbox.set_endpoints([Endpoint("http://127.0.0.1:1/a", ("*",))])
        with store.db.atomic():
            store.outbox.append([NewEvent("invoice.paid", "inv_y", orjson.dumps({"id": "inv_y"}), None)])
        store.outbox.queue_all()  # the dispatcher's queuing, done here
        store.db.execute("PRAGMA foreign_keys = OFF")
        with store.db.atomic():
            store.db.execute("DELETE FROM event_statuses")
        with pytest.raises(LookupError, match="status .* is missing"):
            store.outbox.due_deliveries(clock.now)
    finally:
        store.close()
