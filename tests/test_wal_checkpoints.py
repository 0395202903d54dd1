"""A follower's step leaves the WAL's checkpoint to a thread of its own (engine.WalCheckpointer):
its COMMIT does not copy the pages back into the database file, the thread does, after each
step, so the WAL stays bounded; a failed checkpoint is tried again at the next step; closing
the store stops the thread and closes its connection."""

from __future__ import annotations

import sqlite3
import time

import pytest
from test_store import NET, block, create, transfer_to

from watcher.store import Store, engine
from watcher.store.core import CHECKPOINT_ASIDE_FROM


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db", clock=time.time)
    yield s
    s.close()


def pay_step(store: Store, invoices: list[dict], n: int) -> None:
    """One step paying each invoice, with enough pages (events, statuses) to pass 1,000."""
    matched = [transfer_to(invoice, 100, tx=f"0x{n:032x}{i:032x}", n=n) for i, invoice in enumerate(invoices)]
    store.apply_blocks(NET, [block(n)], matched, confirmed_through=0)


def open_invoices(store: Store, count: int) -> list[dict]:
    with store.db.atomic():
        invoices = [create(store, amount_atomic=10**9) for _ in range(count)]
    return invoices


def test_the_step_does_not_checkpoint_in_its_commit_the_thread_does_after_it(store, tmp_path):
    db_file, wal = tmp_path / "w.db", tmp_path / "w.db-wal"
    invoices = open_invoices(store, 1300)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything so far in the database file
    size_before = db_file.stat().st_size
    store._checkpointer.request = lambda: None  # the thread is asked for nothing: what the step left
    pay_step(store, invoices[:1200], 10)
    assert wal.stat().st_size > 1000 * 4096  # past the automatic checkpoint's 1,000 pages
    assert db_file.stat().st_size == size_before  # and none copied back: the commit did not checkpoint
    # Only the step's transaction goes without it: the connection's other writes keep it.
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == engine.AUTOCHECKPOINT_PAGES
    del store._checkpointer.request

    pay_step(store, invoices[1200:], 11)  # right after it, as a catch-up's steps come
    assert store.wait_for_checkpoints(10)
    checkpointer = store._checkpointer
    assert checkpointer.checkpoints == 1
    busy, frames, copied = checkpointer.last
    assert busy == 0 and frames > 1000 and copied == frames  # the thread copied the whole WAL
    assert db_file.stat().st_size > size_before


def test_the_wal_stays_bounded_over_many_steps(store, tmp_path):
    wal = tmp_path / "w.db-wal"
    sizes = []
    for n in range(12):
        pay_step(store, open_invoices(store, 150), 10 + n)
        assert store.wait_for_checkpoints(10)
        sizes.append(wal.stat().st_size)
    assert store._checkpointer.checkpoints == 12
    # Each step's transaction begins with the WAL copied back, so it writes from the start of
    # the file again: without the checkpoints the file would hold all twelve steps' pages.
    assert max(sizes) <= 2 * sizes[0], sizes


def test_steps_back_to_back_wait_for_a_checkpoint_once_the_wal_is_long_so_it_starts_over(store, tmp_path):
    """A follower catching up runs its steps back to back: the next one begins while the last
    one's checkpoint runs, so the WAL never finds itself wholly copied when a transaction
    begins, and would grow with the whole backlog. Past `restart_frames`, a step waits for the
    checkpoint under way, and the WAL starts over from its beginning."""
    wal = tmp_path / "w.db-wal"
    store._checkpointer.restart_frames = 600
    invoices = open_invoices(store, 30 * 150)
    pages = [wal.stat().st_size // 4096]  # what making the invoices left in it (about 2,000 pages)
    for n in range(30):
        pay_step(store, invoices[n * 150 : (n + 1) * 150], 10 + n)  # about 190 pages each
        pages.append(wal.stat().st_size // 4096)
    assert store._checkpointer.restarts_waited > 0
    # 30 steps never starting over would add some 5,700 pages to the file.
    assert max(pages) <= pages[0] + 500, pages


@pytest.mark.parametrize("failing", ["checkpoint", "connect"])
def test_a_failed_checkpoint_is_logged_and_the_next_step_tries_again(store, monkeypatch, failing):
    """Whether the checkpoint itself fails or opening the thread's connection does (a process
    out of file descriptors), the thread lives on, and the next step's checkpoint copies both
    steps' pages."""
    invoices = open_invoices(store, 1300)
    real_connect = engine.connect
    failures = [sqlite3.OperationalError("disk I/O error")]

    class FailingOnce:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args):
            if "wal_checkpoint" in sql and failures:
                raise failures.pop()
            return self.conn.execute(sql, *args)

        def close(self) -> None:
            self.conn.close()

    def connect(*args, **kwargs):
        if failing == "connect" and failures:
            raise failures.pop()
        return FailingOnce(real_connect(*args, **kwargs))

    monkeypatch.setattr(engine, "connect", connect)
    warned: list[dict] = []
    monkeypatch.setattr(engine.log, "warning", lambda event, **kw: warned.append({"event": event, **kw}))
    pay_step(store, invoices[:1200], 10)
    assert store.wait_for_checkpoints(10)
    assert store._checkpointer.checkpoints == 0
    assert warned == [{"event": "wal_checkpoint_failed", "error": "disk I/O error"}]
    pay_step(store, invoices[1200:], 11)
    assert store.wait_for_checkpoints(10)
    checkpointer = store._checkpointer
    assert checkpointer.checkpoints == 1 and checkpointer.last[0] == 0
    assert checkpointer.last[1] == checkpointer.last[2] > 1000  # both steps' pages copied


def test_a_small_step_keeps_the_automatic_checkpoint_and_asks_the_thread_for_nothing(store):
    """A live block's step writes a few pages: a checkpoint after each block would sync the
    database file every block for nothing, where SQLite's waits for 1,000 pages."""
    invoices = open_invoices(store, CHECKPOINT_ASIDE_FROM)
    set_to: list[int] = []
    store.db.conn.set_trace_callback(
        lambda sql: set_to.append(int(sql.split("=")[1])) if "wal_autocheckpoint=" in sql else None
    )
    pay_step(store, invoices[:-1], 10)
    assert set_to == [] and store._checkpointer._thread is None
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == engine.AUTOCHECKPOINT_PAGES
    pay_step(store, invoices, 11)  # as many as CHECKPOINT_ASIDE_FROM: left to the thread
    assert set_to == [0, engine.AUTOCHECKPOINT_PAGES]
    assert store.wait_for_checkpoints(10) and store._checkpointer.checkpoints == 1
    store.db.conn.set_trace_callback(None)


def test_closing_the_store_stops_the_thread_and_removes_the_wal(tmp_path):
    store = Store(tmp_path / "w.db", clock=time.time)
    pay_step(store, open_invoices(store, CHECKPOINT_ASIDE_FROM), 10)
    assert store.wait_for_checkpoints(10)
    thread = store._checkpointer._thread
    assert thread is not None and thread.name == "wal-checkpointer" and thread.is_alive()
    store.close()
    assert not thread.is_alive()
    # The last connection closed copies the WAL back and deletes it: the thread's was closed too.
    assert not (tmp_path / "w.db-wal").exists()
    again = Store(tmp_path / "w.db", clock=time.time)
    assert again.cursor(NET).number == 10
    again.close()


def test_a_store_in_memory_has_no_checkpointer():
    store = Store(engine.MEMORY, clock=time.time)
    invoice = create(store, amount_atomic=100)
    store.apply_blocks(NET, [block(5)], [transfer_to(invoice, 100)], confirmed_through=0)
    assert store._checkpointer is None and store.wait_for_checkpoints(0)
    store.close()
