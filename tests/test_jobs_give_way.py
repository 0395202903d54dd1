"""The periodic jobs give way to the other writers: a run that finds the write lock held skips
at once, changing nothing, instead of looking for the lock every millisecond from the API's
process while a follower's step holds it; a job that has given way for too long waits."""

from __future__ import annotations

import threading
import time

import pytest
from test_store import NET, block, create

from watcher.jobs import GivingWay, expire_sweep, prune_events, prune_idempotency
from watcher.store import Store, engine


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db", clock=time.time)  # the busy timeout as the daemon's: 5 s
    yield s
    s.close()


def past_its_deadline(store: Store) -> dict:
    """A pending invoice whose deadline has passed in its chain's time."""
    invoice = create(store, amount_atomic=100)
    store.apply_blocks(NET, [block(5)], [], confirmed_through=0)
    store.db.execute("UPDATE invoices SET payable_until = 1 WHERE id = ?", [invoice["id"]])
    return invoice


class LockHolder:
    """Another connection holding the write lock, as a follower's step does, until released."""

    def __init__(self, path: str) -> None:
        self.conn = engine.connect(path)
        self.conn.execute("BEGIN IMMEDIATE")

    def release_after(self, seconds: float) -> threading.Thread:
        def release() -> None:
            time.sleep(seconds)
            self.conn.execute("ROLLBACK")

        thread = threading.Thread(target=release)
        thread.start()
        return thread

    def close(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


def status_of(store: Store, invoice: dict) -> str:
    return store.db.execute("SELECT status FROM invoices WHERE id = ?", [invoice["id"]]).fetchone()[0]


async def test_the_sweep_gives_way_to_a_held_lock_at_once_and_expires_the_invoice_once_it_is_free(store):
    invoice = past_its_deadline(store)
    way = GivingWay(store, "expiry")
    holder = LockHolder(store.path)
    try:
        started = time.monotonic()
        assert await expire_sweep(way) == 0
        assert time.monotonic() - started < 2  # waiting would take the 5 s busy timeout, then fail
        assert status_of(store, invoice) == "pending"
    finally:
        holder.close()
    assert await expire_sweep(way) == 1
    assert status_of(store, invoice) == "expired"


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda way: expire_sweep(way), id="expiry"),
        pytest.param(lambda way: prune_idempotency(way, 0, lambda: 2e9, None), id="idempotency_keys"),
        pytest.param(lambda way: prune_events(way, 0, lambda: 2e9, None), id="delivered_events"),
    ],
)
async def test_every_job_gives_way_to_a_held_lock(store, run):
    past_its_deadline(store)
    holder = LockHolder(store.path)
    try:
        started = time.monotonic()
        assert await run(GivingWay(store, "job")) == 0
        assert time.monotonic() - started < 2
    finally:
        holder.close()


async def test_a_job_that_has_given_way_for_too_long_waits_for_the_lock(store):
    invoice = past_its_deadline(store)
    now = [1000.0]
    way = GivingWay(store, "expiry", clock=lambda: now[0], at_most=60)
    holder = LockHolder(store.path)
    try:
        now[0] += 59
        assert await expire_sweep(way) == 0  # gave way: within its minute
        now[0] += 2  # a minute and more without a run done
        releasing = holder.release_after(0.2)
        started = time.monotonic()
        assert await expire_sweep(way) == 1
        assert time.monotonic() - started >= 0.15  # it waited for the release
        releasing.join()
    finally:
        holder.close()
    assert status_of(store, invoice) == "expired"
    assert way.done_at == now[0]
    assert await expire_sweep(way) == 0  # nothing left; a run done starts the minute again
    assert way.done_at == now[0]


def test_a_transaction_not_waiting_fails_at_once_and_the_next_one_waits_again(tmp_path):
    db = engine.open_database(tmp_path / "w.db", busy_timeout_ms=5000)
    db.execute("CREATE TABLE t (x INTEGER)")
    holder = LockHolder(str(tmp_path / "w.db"))
    try:
        started = time.monotonic()
        with pytest.raises(engine.WriteLockBusy), db.not_waiting(), db.atomic():
            db.execute("INSERT INTO t VALUES (1)")
        assert time.monotonic() - started < 2
        assert db.waits_for_lock and db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        releasing = holder.release_after(0.2)
        with db.atomic():  # waits, as before
            db.execute("INSERT INTO t VALUES (2)")
        releasing.join()
        assert [r[0] for r in db.execute("SELECT x FROM t")] == [2]
    finally:
        holder.close()
        db.close()
