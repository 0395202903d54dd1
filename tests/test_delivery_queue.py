"""Each webhook endpoint reads the events as a queue from its cursor (store/outbox.py): a change
writes its events and nothing per endpoint, the dispatcher queues the deliveries before it sends
them, and everything the user sees and every guarantee stays: the API lists the deliveries not
yet queued as pending under the ids they keep, the endpoints' filters apply, an endpoint added
by a reload gets the events appended after it, one removed still fails its pending deliveries,
retention keeps the events not yet queued, a redelivery of one not yet queued works, and a
database from before keeps its pending deliveries."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator

import orjson
from aiohttp import web
from sqlite_utils import Database
from test_webhooks import VECTOR_SECRET, Clock, _server

from watcher.store import Endpoint, Store
from watcher.store.outbox import NewEvent
from watcher.store.retention import prune_delivered_events
from watcher.store.schema import migrations
from watcher.webhooks import Dispatcher

DAY = 86400.0
A = "http://127.0.0.1:9/a"
B = "http://127.0.0.1:9/b"


def _rows(store: Store) -> list[tuple]:
    return [
        tuple(r)
        for r in store.db.execute("SELECT id, event_type, url, status, attempts FROM deliveries ORDER BY id")
    ]


async def _receiver() -> tuple[web.AppRunner, str, list[str]]:
    """An endpoint that takes every attempt; the `webhook-id`s it got."""
    seen: list[str] = []

    async def ok(request: web.Request) -> web.Response:
        seen.append(request.headers["webhook-id"])
        return web.Response(status=204)

    runner, url = await _server(ok)
    return runner, url, seen


@contextlib.asynccontextmanager
async def _dispatching(dispatcher: Dispatcher, runner: web.AppRunner, idle: float) -> AsyncIterator[None]:
    """`dispatcher.run` as the daemon runs it, against the endpoint `runner` serves; on the way
    out the dispatcher stops and both close."""
    stopping = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stopping, idle=idle))
    try:
        yield
    finally:
        stopping.set()
        dispatcher.wake()
        await task
        await dispatcher.close()
        await runner.cleanup()


@contextlib.contextmanager
def _write_lock_held(path) -> Iterator[sqlite3.Connection]:
    """Another process's long step: the database's write lock, until the caller commits."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield other
    finally:
        if other.in_transaction:
            other.execute("COMMIT")
        other.close()


async def _until(done: Callable[[], object], failure: Callable[[], str], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < deadline, failure()
        await asyncio.sleep(0.02)


def _append(store: Store, invoice_id: str, *types: str) -> None:
    with store.db.atomic():
        store.outbox.append([NewEvent(t, invoice_id, orjson.dumps({"id": invoice_id}), None) for t in types])


def test_a_change_writes_its_events_and_no_delivery_and_the_api_shows_them_pending(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        store.outbox.set_endpoints([Endpoint(A, ("*",)), Endpoint(B, ("invoice.paid",))])
        _append(store, "inv_1", "invoice.payment_detected", "invoice.paid")
        assert _rows(store) == []  # nothing per endpoint in the change's transaction
        listed, total = store.outbox.list_deliveries()
        assert total == 3
        assert [(d["event_type"], d["url"], d["status"], d["attempts"]) for d in listed] == [
            ("invoice.paid", A, "pending", 0),  # newest event first
            ("invoice.paid", B, "pending", 0),
            ("invoice.payment_detected", A, "pending", 0),
        ]
        assert all(d["next_attempt_at"] and d["last_error"] is None for d in listed)
        assert store.outbox.list_deliveries(status="delivered") == ([], 0)
        assert store.outbox.list_deliveries(event_type="invoice.payment_detected")[1] == 1
        assert store.outbox.list_deliveries(invoice_id="inv_other") == ([], 0)
        assert [d["url"] for d in store.outbox.list_deliveries(limit=1, offset=1)[0]] == [B]
        assert store.outbox.backlog() == 3
        assert store.outbox.next_delivery_at(B) == clock.now
        for shown in listed:
            assert store.outbox.get_delivery(shown["id"]) == shown

        store.outbox.queue_all()  # the dispatcher's queuing: same deliveries, same ids
        assert sorted(d["id"] for d in listed) == [r[0] for r in _rows(store)]
        requeried, total = store.outbox.list_deliveries()
        assert total == 3 and sorted(map(str, requeried)) == sorted(map(str, listed))
        assert store.outbox.backlog() == 3
        assert store.outbox.get_delivery("dlv_NOTANID_1") is None
    finally:
        store.close()


def test_a_page_runs_from_the_deliveries_not_yet_queued_into_the_queued_ones(tmp_path):
    store = Store(tmp_path / "w.db", clock=Clock())
    try:
        store.outbox.set_endpoints([Endpoint(A, ("*",))])
        _append(store, "inv_1", "invoice.created", "invoice.paid")
        store.outbox.queue_all()
        _append(store, "inv_1", "invoice.confirmed")
        page, total = store.outbox.list_deliveries(limit=2)
        assert total == 3
        assert [d["event_type"] for d in page] == ["invoice.confirmed", "invoice.paid"]
        page, _ = store.outbox.list_deliveries(limit=2, offset=2)
        assert [d["event_type"] for d in page] == ["invoice.created"]
    finally:
        store.close()


def test_an_endpoint_added_by_a_reload_gets_the_events_appended_after_it(tmp_path):
    store = Store(tmp_path / "w.db", clock=Clock())
    try:
        store.outbox.set_endpoints([Endpoint(A, ("*",))])
        _append(store, "inv_1", "invoice.created")
        store.outbox.set_endpoints([Endpoint(A, ("*",)), Endpoint(B, ("*",))])  # the reload
        _append(store, "inv_1", "invoice.paid")
        shown = {(d["event_type"], d["url"]) for d in store.outbox.list_deliveries()[0]}
        assert shown == {("invoice.created", A), ("invoice.paid", A), ("invoice.paid", B)}
        store.outbox.queue_all()
        assert {(r[1], r[2]) for r in _rows(store)} == shown
    finally:
        store.close()


def test_a_filter_changed_by_a_reload_applies_to_the_events_appended_after_it(tmp_path):
    store = Store(tmp_path / "w.db", clock=Clock())
    try:
        store.outbox.set_endpoints([Endpoint(A, ("invoice.created",))])
        _append(store, "inv_1", "invoice.created", "invoice.paid")
        store.outbox.set_endpoints([Endpoint(A, ("invoice.paid",))])
        _append(store, "inv_2", "invoice.created", "invoice.paid")
        store.outbox.queue_all()
        got = sorted((r[1], r[2]) for r in _rows(store))
        assert got == [("invoice.created", A), ("invoice.paid", A)]
        invoices = {d["event_type"]: d["invoice_id"] for d in store.outbox.list_deliveries()[0]}
        assert invoices == {"invoice.created": "inv_1", "invoice.paid": "inv_2"}
    finally:
        store.close()


async def test_an_endpoint_removed_by_a_reload_fails_what_it_had_pending(tmp_path):
    """Its events appended before the reload are queued for it then, and their attempts fail as
    ever (the endpoint is no longer configured); the events after it are not its."""
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        store.outbox.set_endpoints([Endpoint(A, ("*",)), Endpoint(B, ("*",))])
        _append(store, "inv_1", "invoice.created")
        store.outbox.set_endpoints([Endpoint(A, ("*",))])
        _append(store, "inv_1", "invoice.paid")
        assert [(r[1], r[2], r[3]) for r in _rows(store)] == [("invoice.created", B, "pending")]
        dispatcher = Dispatcher(store.outbox, {A: VECTOR_SECRET}, clock=clock, timeout=0.5)
        try:
            await dispatcher.run_once()
        finally:
            await dispatcher.close()
        row = store.db.execute(
            "SELECT status, attempts, last_error FROM deliveries WHERE url = ?", [B]
        ).fetchone()
        assert tuple(row) == ("pending", 1, "endpoint is no longer configured")  # on the retry schedule
        assert {d["url"] for d in store.outbox.list_deliveries(event_type="invoice.paid")[0]} == {A}
    finally:
        store.close()


def test_retention_keeps_the_events_past_an_endpoints_cursor(tmp_path):
    """An old event with no delivery row yet is not yet queued, not delivered: it stays."""
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    try:
        store.outbox.set_endpoints([Endpoint(A, ("invoice.paid",))])
        _append(store, "inv_1", "invoice.created", "invoice.paid")  # the first is not A's
        clock.now += 31 * DAY
        assert prune_delivered_events(store, clock.now - 30 * DAY) == (0, 0, 0)
        store.outbox.queue_all()
        [(delivery_id, *_)] = _rows(store)
        assert prune_delivered_events(store, clock.now - 30 * DAY) == (1, 0, 0)  # created: no one's
        store.outbox.record_attempt(
            delivery_id, ok=True, status_code=204, error=None, duration_ms=1.0, next_attempt_at=None
        )
        assert prune_delivered_events(store, clock.now - 30 * DAY) == (1, 1, 1)
    finally:
        store.close()


async def test_a_delivery_not_yet_queued_can_be_redelivered(tmp_path):
    runner, url, seen = await _receiver()
    clock = Clock()
    store = Store(tmp_path / "w.db", clock=clock)
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, clock=clock)
    try:
        store.outbox.set_endpoints([Endpoint(url, ("*",))])
        _append(store, "inv_1", "invoice.created", "invoice.paid")
        first, second = sorted(store.outbox.list_deliveries()[0], key=lambda d: d["event_type"])
        redelivered = store.outbox.redeliver(second["id"])  # invoice.paid, the newer
        assert redelivered is not None and redelivered["id"] == second["id"]
        assert redelivered["status"] == "pending" and redelivered["attempts"] == 0
        assert len(_rows(store)) == 2  # queued with the one before it, in order
        assert await dispatcher.run_once() == 2
        assert sorted(seen) == sorted([first["event_id"], second["event_id"]])
        assert {d["status"] for d in store.outbox.list_deliveries()[0]} == {"delivered"}
        assert (
            store.db.execute("SELECT requeues FROM deliveries WHERE id = ?", [second["id"]]).fetchone()[0]
            == 1
        )
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()


async def test_the_dispatcher_queues_and_sends_what_a_step_appended(tmp_path):
    """The daemon's loop (not `run_once`): woken by the append, a lane queues its endpoint's
    events and sends each once, in its order of appending per invoice."""
    seen: list[tuple[str, str]] = []

    async def ok(request: web.Request) -> web.Response:
        event = orjson.loads(await request.read())
        seen.append((event["data"]["invoice"]["id"], event["type"]))
        return web.Response(status=204)

    runner, url = await _server(ok)
    store = Store(tmp_path / "w.db", clock=time.time)
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, concurrency=1)
    store.outbox.on_delivery_queued = dispatcher.wake
    async with _dispatching(dispatcher, runner, idle=5.0):
        store.outbox.set_endpoints([Endpoint(url, ("invoice.paid", "invoice.confirmed"))])
        await asyncio.sleep(0.1)
        for i in range(30):
            _append(store, f"inv_{i}", "invoice.created", "invoice.paid", "invoice.confirmed")
        await _until(lambda: len(seen) >= 60, lambda: f"{len(seen)} of 60 sent")
        await asyncio.sleep(0.2)
        assert len(seen) == 60 and len(set(seen)) == 60
        for i in range(30):  # one in flight at a time: each invoice's events in order
            mine = [t for inv, t in seen if inv == f"inv_{i}"]
            assert mine == ["invoice.paid", "invoice.confirmed"]
    assert store.outbox.backlog() == 0
    assert store.db.execute("SELECT COUNT(*) FROM deliveries WHERE status = 'delivered'").fetchone()[0] == 60
    store.close()


async def test_a_locked_database_delays_the_queuing_and_loses_nothing(tmp_path):
    """Another process holds the write lock (a long catch-up step) when the lane would queue:
    it waits and queues later; every event is then sent once."""
    runner, url, seen = await _receiver()
    path = tmp_path / "w.db"
    store = Store(path, clock=time.time, busy_timeout_ms=50)
    store.outbox.set_endpoints([Endpoint(url, ("*",))])
    for i in range(5):
        _append(store, f"inv_{i}", "invoice.created")
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET})
    async with _dispatching(dispatcher, runner, idle=0.1):
        with _write_lock_held(path) as other:  # the other process's step
            await asyncio.sleep(0.5)
            assert seen == [] and _rows(store) == []
            assert store.outbox.list_deliveries()[1] == 5  # shown pending meanwhile
            other.execute("COMMIT")
            await _until(lambda: len(seen) >= 5, lambda: f"{len(seen)} of 5 sent")
    assert len(seen) == 5 and len(set(seen)) == 5
    store.close()


async def test_a_database_from_before_keeps_its_pending_deliveries(tmp_path):
    """Migrated from the schema before the endpoints' cursors (m010): its pending delivery is
    listed and sent once, its delivered one stays delivered, and nothing is queued twice."""
    path = tmp_path / "old.db"
    runner, url, seen = await _receiver()
    db = Database(sqlite3.connect(path, isolation_level=None))
    migrations.apply(db, stop_before="m010_endpoint_cursors")
    for n, status in ((1, "delivered"), (2, "pending")):
        body = orjson.dumps(
            {"id": f"evt_old{n}", "type": "invoice.paid", "data": {"invoice": {"id": "inv_o"}}}
        )
        db.execute(
            "INSERT INTO events(id, type, invoice_id, created_at, body) "
            f"VALUES ('evt_old{n}', 'invoice.paid', 'inv_o', '2026-11-01T00:00:00Z', ?)",
            [body],
        )
        db.execute(
            "INSERT INTO deliveries(id, event_id, event_type, invoice_id, url, status, attempts, "
            f"next_attempt_at, created_at) VALUES ('dlv_old{n}', 'evt_old{n}', 'invoice.paid', 'inv_o', "
            "?, ?, ?, 0, '2026-11-01T00:00:00Z')",
            [url, status, 1 if status == "delivered" else 0],
        )
    db.close()
    store = Store(path, clock=time.time)
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET})
    try:
        store.outbox.set_endpoints([Endpoint(url, ("*",))])  # the daemon's start
        listed, total = store.outbox.list_deliveries()
        assert total == 2 and {(d["id"], d["status"]) for d in listed} == {
            ("dlv_old1", "delivered"),
            ("dlv_old2", "pending"),
        }
        assert await dispatcher.run_once() == 1
        assert await dispatcher.run_once() == 0
        assert seen == ["evt_old2"]
        assert {d["status"] for d in store.outbox.list_deliveries()[0]} == {"delivered"}
        assert store.db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 2
    finally:
        await dispatcher.close()
        await runner.cleanup()
        store.close()


def test_a_reload_that_cannot_write_its_endpoints_changes_nothing(tmp_path):
    """The database locked past the busy timeout: the reload fails (the daemon logs it and keeps
    running), and the endpoints in use stay the ones in the database."""
    import pytest

    path = tmp_path / "w.db"
    store = Store(path, clock=Clock(), busy_timeout_ms=50)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        store.outbox.set_endpoints([Endpoint(A, ("*",))])
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.outbox.set_endpoints([Endpoint(B, ("*",))])
        other.execute("COMMIT")
        assert [e.url for e in store.outbox.endpoints] == [A]
        assert [r[0] for r in store.db.execute("SELECT url FROM webhook_endpoints")] == [A]
    finally:
        other.close()
        store.close()


async def test_a_lane_looks_for_new_events_when_woken_not_after_each_attempt(tmp_path):
    """A lane passes once per attempt ended or recorded: reading the endpoint's cursor at each
    pass cost the dispatcher a query a delivery. It reads it when woken (an append) or when its
    wait runs out."""
    runner, url, seen = await _receiver()
    store = Store(tmp_path / "w.db", clock=time.time)
    store.outbox.set_endpoints([Endpoint(url, ("*",))])
    looks: list[str] = []
    behind = store.outbox.behind

    def counted(lane_url: str) -> bool:
        looks.append(lane_url)
        return behind(lane_url)

    store.outbox.behind = counted  # type: ignore[method-assign]
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET}, concurrency=4)
    try:
        async with _dispatching(dispatcher, runner, idle=30.0):
            await asyncio.sleep(0.1)
            for i in range(100):
                _append(store, f"inv_{i}", "invoice.created")
            dispatcher.wake()  # as the store's listener does after the appends' commits
            await _until(lambda: not store.outbox.backlog(), lambda: f"{len(seen)} of 100 sent", 20)
    finally:
        store.close()
    assert len(seen) == 100 and len(set(seen)) == 100
    assert len(looks) <= 10, len(looks)  # before: about 30 here, one a lane pass


async def test_a_lane_goes_on_sending_what_is_queued_while_its_queuing_waits_for_the_lock(tmp_path):
    """New events wait to be queued behind another process's long write; the deliveries queued
    before go out meanwhile (their records wait), and every event is sent once."""
    runner, url, seen = await _receiver()
    path = tmp_path / "w.db"
    store = Store(path, clock=time.time, busy_timeout_ms=3000)
    store.outbox.set_endpoints([Endpoint(url, ("*",))])
    for i in range(5):
        _append(store, f"old_{i}", "invoice.created")
    store.outbox.queue_all()
    for i in range(5):
        _append(store, f"new_{i}", "invoice.created")
    dispatcher = Dispatcher(store.outbox, {url: VECTOR_SECRET})
    async with _dispatching(dispatcher, runner, idle=0.2):
        with _write_lock_held(path) as other:  # the other process's step, for 1.5 s
            await asyncio.sleep(1.5)
            assert len(seen) == 5  # the queued ones, not held behind the queuing of the new ones
            other.execute("COMMIT")
            await _until(lambda: not store.outbox.backlog(), lambda: f"{len(seen)} of 10 sent")
    assert len(seen) == 10 and len(set(seen)) == 10
    store.close()
