"""What is particular to SQLite, kept in one place so the store's SQL can run on PostgreSQL next.

The rest of the store writes SQL both engines read the same way: `INSERT … ON CONFLICT … DO
UPDATE`, `UPDATE … RETURNING`, partial indexes, and one statement per table per change with
`executemany`. What differs lives here:

- opening a connection and its durability settings (WAL, `synchronous=FULL`, foreign keys,
  a busy timeout): on PostgreSQL, a pool and `synchronous_commit = on`;
- a list of keys as one parameter (`in_keys`): SQLite reads a JSON array with `json_each`;
  PostgreSQL would take `column = ANY(%s)` with a list;
- placeholders are sqlite3's `?` (psycopg's are `%s`: the PostgreSQL module translates);
- the WAL's checkpoints, which the steps leave to a thread of their own (WalCheckpointer):
  PostgreSQL's checkpointer is a server process already.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Generator, Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeAlias

import orjson
import structlog
from sqlite_utils import Database

MEMORY = ":memory:"

# A row as the store reads it (sqlite3.Row), or the same columns as a mapping (tests, views).
Row: TypeAlias = sqlite3.Row | Mapping[str, Any]


log = structlog.get_logger("watcher.store")

# How long a writer waits for another connection's write transaction before "database is locked".
BUSY_TIMEOUT_MS = 5000
# How often a writer that found the write lock held looks again. SQLite's own busy handler
# sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 then 100 ms between looks: with three
# processes writing (a follower's steps, the dispatcher's records, the API), a step that found
# a 5 ms record in progress slept up to 60 ms more after it ended (BENCHMARKS.md, issue 13).
LOCK_POLL_S = 0.001


class WriteLockBusy(sqlite3.OperationalError):
    """Another connection held the write lock, and the transaction was begun not to wait for it
    (StoreDatabase.not_waiting): nothing was written."""


def connect(path: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with the store's settings:
    every commit is durable before it returns (`synchronous=FULL` in WAL mode), and a writer
    waits up to `busy_timeout_ms` (5 s) for another connection's transaction instead of failing at once.

    Each thread uses a connection of its own (Store.db); only closing may happen on another
    thread, when the store closes, hence `check_same_thread=False`."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return conn


class StoreDatabase(Database):
    """sqlite-utils' Database whose transactions take the write lock when they begin.

    Two connections write (the loop's and the store's writer thread's). A transaction that
    begins as a reader and writes later fails at once with "database is locked" when the other
    connection committed in between (WAL cannot upgrade a stale snapshot), whatever the busy
    timeout; `BEGIN IMMEDIATE` waits for the lock up front instead, looking again every
    LOCK_POLL_S until the busy timeout has passed. (PostgreSQL: row locks.)"""

    busy_timeout_ms = BUSY_TIMEOUT_MS
    waits_for_lock = True

    @contextmanager
    def not_waiting(self) -> Generator[None, None, None]:
        """Transactions begun inside take the write lock only if it is free, else raise
        WriteLockBusy at once. For work that can come back later (the periodic jobs): a writer
        that waits looks again every LOCK_POLL_S, a thousand wake-ups a second in its process for
        as long as a follower's step holds the lock, and the API's loop shares that process's GIL."""
        waited, self.waits_for_lock = self.waits_for_lock, False
        try:
            yield
        finally:
            self.waits_for_lock = waited

    @contextmanager
    def atomic(self) -> Generator[Database, None, None]:
        if self.conn.in_transaction:  # nested: sqlite-utils' savepoint
            with super().atomic() as db:
                yield db
            return
        self._begin_immediate()
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def _begin_immediate(self) -> None:
        """Take the write lock: at once if it is free, else looking again every LOCK_POLL_S until
        the busy timeout, then "database is locked" as SQLite says it. The connection's own busy
        handler is off meanwhile (each try answers at once) and back on for the transaction."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        self.conn.execute("PRAGMA busy_timeout=0")
        try:
            while True:
                try:
                    self.conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                        raise
                    if not self.waits_for_lock:
                        raise WriteLockBusy("the write lock is held by another connection") from exc
                    if time.monotonic() >= deadline:
                        raise
                time.sleep(LOCK_POLL_S)
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")


# SQLite's automatic checkpoint: every connection's, and the steps' connection's between steps.
AUTOCHECKPOINT_PAGES = 1000
# A step does not wait for the checkpoint beside it unless the WAL has grown past this many
# frames (64 MB of 4 KB pages): the WAL goes back to its start only when a write transaction
# begins with every frame copied, which steps run back to back seldom leave time for.
WAL_RESTART_FRAMES = 16_384
# How long a step waits for that checkpoint at most (a disk this slow has other troubles).
RESTART_WAIT_S = 60.0


class WalCheckpointer:
    """Copies the WAL back into the database file on a thread of its own, for a follower's steps.

    SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past 1,000 pages:
    every step's, since a step of 5,000 payments writes tens of megabytes of pages (as many
    invoice pages as invoices paid, when payments come in an order unrelated to the invoices').
    The step then waits for those pages to be written again and the database file synced,
    before the next step can begin. A PASSIVE checkpoint here does the same work beside the next
    step (SQLite releases the GIL), and waits for no reader or writer. Durability is untouched:
    a commit is durable in the WAL; a checkpoint only moves pages. Only the step's own
    transaction goes without the automatic checkpoint (`beside`): every other write, on any
    connection, keeps it, so the WAL stays bounded where no step runs."""

    def __init__(self, path: str | Path, restart_frames: int = WAL_RESTART_FRAMES) -> None:
        self.path = str(path)
        self.restart_frames = restart_frames
        self.checkpoints = 0  # done (for tests): (busy, frames in the WAL, frames copied) in `last`
        self.last: tuple[int, int, int] | None = None
        self.restarts_waited = 0  # steps that waited for a checkpoint so the WAL could start over
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @contextmanager
    def beside(self, db: StoreDatabase) -> Generator[None, None, None]:
        """A step's transaction on `db` (inside): its COMMIT leaves the checkpoint to this thread,
        which is asked for one once the transaction has committed. If the last checkpoint found
        the WAL past `restart_frames`, the step first waits for the one under way, so that its
        transaction begins with every frame copied and the WAL starts over from its beginning."""
        if self.last is not None and self.last[1] > self.restart_frames:
            self.restarts_waited += 1
            self.wait_idle(RESTART_WAIT_S)
        db.execute("PRAGMA wal_autocheckpoint=0")
        try:
            yield
        finally:
            db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        if not db.conn.in_transaction:  # inside another's transaction: its commit is later
            self.request()

    def request(self) -> None:
        """A checkpoint soon (one for any number of requests made while one runs)."""
        with self._lock:
            if self._stopping:
                return
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)
                self._thread.start()
            self._idle.clear()
            self._wanted.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Whether every checkpoint requested so far has ended (failed ones too) within `timeout`."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    if conn is None:
                        conn = connect(self.path)
                    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.last = (busy, frames, copied)
                    self.checkpoints += 1
                except Exception as exc:  # the next request tries again, on a new connection
                    log.warning("wal_checkpoint_failed", error=str(exc))
                    if conn is not None:
                        _close_quietly(conn)
                        conn = None
                with self._lock:
                    if not self._wanted.is_set():
                        self._idle.set()
        finally:
            if conn is not None:
                _close_quietly(conn)
            self._idle.set()

    def close(self) -> None:
        """Stop the thread (a checkpoint under way ends first) and close its connection."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        self._wanted.set()
        if thread is not None:
            thread.join()


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except Exception as exc:
        log.warning("wal_checkpointer_close_failed", error=str(exc))


def open_database(path: str | Path, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> StoreDatabase:
    # No sqlite-utils plugins: none may change the store's connections, and looking for them
    # reads the metadata of every installed package (importlib.metadata) before the API serves.
    db = StoreDatabase(connect(path, busy_timeout_ms), execute_plugins=False)
    db.busy_timeout_ms = busy_timeout_ms
    return db


def dict_rows(conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
    """The rows as plain dicts. A `sqlite3.Row` finds a column by name comparing it with every
    column before it: the recording path reads some thirty columns of each payment and invoice
    it judges and renders, and dicts built once per row (in C, from the row's tuple) make each
    of those reads a hash lookup."""
    cursor = conn.cursor()
    cursor.row_factory = None
    cursor.execute(sql, tuple(params))
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r, strict=True)) for r in cursor]


def tuple_rows(conn: sqlite3.Connection, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
    """The rows as plain tuples (no `sqlite3.Row`), for a few columns read by position."""
    cursor = conn.cursor()
    cursor.row_factory = None
    return cursor.execute(sql, tuple(params)).fetchall()


def in_keys(column: str) -> str:
    """`column` is one of the keys given as one parameter by `keys_param`: one statement for a
    whole step's keys, however many (no limit on bound variables, no temporary table)."""
    return f"{column} IN (SELECT value FROM json_each(?))"


def keys_param(keys: Iterable[str]) -> str:
    return orjson.dumps(list(keys)).decode()


def contains(text: str, part: str) -> str:
    """`text` holds `part` (both SQL expressions). PostgreSQL: `strpos(text, part) > 0`."""
    return f"instr({text}, {part}) > 0"
