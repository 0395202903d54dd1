"""The store's writer thread: changes run off the loop, one at a time; the loop's reads see a
change whole or not at all; listeners hear of a change on the loop, after it committed, and
never of one that rolled back."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from test_store import NET, block, create, transfer_to

from watcher.store import Store


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db", clock=time.time)
    yield s
    s.close()


async def test_a_change_runs_on_the_writer_thread_and_its_listeners_after_it_on_the_loop(store):
    invoice = create(store, amount_atomic=100)
    heard: list[tuple[str, int]] = []
    store.outbox.event_listeners.append(lambda invoice_id: heard.append((invoice_id, threading.get_ident())))
    store.block_listeners.append(lambda network: heard.append((network, threading.get_ident())))
    ran_on: list[int] = []
    apply = store.apply_blocks

    def apply_here(*args, **kwargs):
        ran_on.append(threading.get_ident())
        assert heard == [], "a listener ran before the change committed"
        return apply(*args, **kwargs)

    result = await store.write(apply_here, NET, [block(5)], [transfer_to(invoice, 100)], confirmed_through=0)
    assert result.payments_added == 1
    assert ran_on and ran_on[0] != threading.get_ident()
    assert heard == [(invoice["id"], threading.get_ident()), (NET, threading.get_ident())]


async def test_a_change_that_fails_writes_nothing_and_tells_no_listener(store):
    invoice = create(store, amount_atomic=100)
    heard: list[str] = []
    store.outbox.event_listeners.append(heard.append)
    store.block_listeners.append(heard.append)
    events_before = store.outbox.event_count()

    def apply_then_fail():
        with store.db.atomic():
            store.apply_blocks(NET, [block(5)], [transfer_to(invoice, 100)], confirmed_through=0)
            raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError, match="disk is full"):
        await store.write(apply_then_fail)
    assert heard == []
    assert store.get_payments(invoice["id"]) == []
    assert store.outbox.event_count() == events_before
    assert store.cursor(NET) is None


async def test_the_loop_reads_a_change_whole_or_not_at_all_while_the_writer_holds_it(store):
    invoice = create(store, amount_atomic=100)
    inside, release = threading.Event(), threading.Event()

    def slow_apply():
        with store.db.atomic():
            store.apply_blocks(NET, [block(5)], [transfer_to(invoice, 100)], confirmed_through=5)
            inside.set()
            assert release.wait(10)

    writing = asyncio.ensure_future(store.write(slow_apply))
    assert await asyncio.to_thread(inside.wait, 10)
    during = store.get_invoice(invoice["id"])  # on the loop, while the writer's transaction is open
    assert during["status"] == "pending" and during["payments"] == []
    assert store.cursor(NET) is None
    release.set()
    await writing
    after = store.get_invoice(invoice["id"])
    assert after["status"] == "confirmed"
    assert [(p["status"], p["confirmations"]) for p in after["payments"]] == [("confirmed", 1)]


async def test_changes_run_one_at_a_time_in_the_order_asked(store):
    order: list[int] = []
    running = threading.Lock()

    def change(n: int) -> int:
        assert running.acquire(blocking=False), "two changes ran at once"
        try:
            time.sleep(0.01)
            order.append(n)
            return n
        finally:
            running.release()

    assert await asyncio.gather(*(store.write(change, n) for n in range(8))) == list(range(8))
    assert order == list(range(8))


def test_a_writer_takes_the_lock_within_milliseconds_of_its_release_and_fails_after_its_timeout(tmp_path):
    """Another connection holds the write lock until about 235 ms after the writer first asked.
    SQLite's own busy handler looks again 1, 3, 8, 18, 33, 53, 78, 103, 128, 178, 228, 328 ms
    after the first try: at 328 ms, some 90 ms after the release. The store looks every
    LOCK_POLL_S and takes it within a few (the bound leaves 60 ms to a busy machine's
    scheduler). A lock held past the busy timeout still fails the transaction with "database
    is locked", and the connection's busy timeout is back afterwards."""
    import sqlite3

    from watcher.store import engine

    db = engine.open_database(tmp_path / "w.db", busy_timeout_ms=2000)
    db.execute("CREATE TABLE t (x INTEGER)")
    other = engine.connect(tmp_path / "w.db")
    released = threading.Event()
    released_at: list[float] = []

    def hold(seconds: float) -> None:
        other.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        released_at.append(time.monotonic())
        other.execute("ROLLBACK")
        released.set()

    holder = threading.Thread(target=hold, args=(0.245,))
    holder.start()
    time.sleep(0.01)  # the lock held
    with db.atomic():
        taken_at = time.monotonic()
        db.execute("INSERT INTO t VALUES (1)")
    holder.join()
    assert taken_at - released_at[0] < 0.06, f"{(taken_at - released_at[0]) * 1000:.0f} ms after the release"
    assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1

    db.busy_timeout_ms = 200
    holder = threading.Thread(target=hold, args=(0.5,))
    holder.start()
    time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"), db.atomic():
        db.execute("INSERT INTO t VALUES (2)")
    assert 0.19 <= time.monotonic() - started < 0.45
    holder.join()
    assert db.execute("SELECT COUNT(*) FROM t").fetchone()[0] == 1
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 200
    other.close()
    db.close()


def test_a_writer_that_fails_to_begin_for_another_reason_than_the_lock_fails_at_once(tmp_path):
    """Only "busy" is looked at again: any other error of `BEGIN IMMEDIATE` (here a disk I/O
    error) is raised at its first try, and the connection's busy timeout is back."""
    import sqlite3

    from watcher.store import engine

    db = engine.open_database(tmp_path / "w.db", busy_timeout_ms=2000)
    real, tries = db.conn, []

    class FailingToBegin:
        def execute(self, sql, *args):
            if sql == "BEGIN IMMEDIATE":
                tries.append(sql)
                exc = sqlite3.OperationalError("disk I/O error")
                exc.sqlite_errorcode = sqlite3.SQLITE_IOERR  # as sqlite3 sets it
                raise exc
            return real.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(real, name)

    db.conn = FailingToBegin()
    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"), db.atomic():
        pass
    assert tries == ["BEGIN IMMEDIATE"] and time.monotonic() - started < 1
    assert real.execute("PRAGMA busy_timeout").fetchone()[0] == 2000
    db.conn = real
    db.close()
