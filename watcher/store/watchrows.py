"""The options a chain's watch set holds, read on any connection to the store.

The follower's incremental look reads them on the store's own connection; the whole load at
start-up reads them on a read connection of its own, in a thread (watcher/watchload.py).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

_SELECT = (
    "SELECT rowid, id, rail, destination_address, token_contract, contract_call FROM payment_options "
    "WHERE network = ? AND rowid > ? ORDER BY rowid"
)


def watch_rows(conn: sqlite3.Connection, network: str, after_rowid: int = 0) -> Iterator[sqlite3.Row]:
    """Options on a network (both rails) after `after_rowid`, in creation order, fetched in
    batches: a million rows held as a list would double the watch set's memory while it loads."""
    cursor = conn.execute(_SELECT, [network, after_rowid])
    while batch := cursor.fetchmany(10_000):
        yield from batch


def watch_batch(conn: sqlite3.Connection, network: str, after_rowid: int, limit: int) -> list[sqlite3.Row]:
    """At most `limit` options after `after_rowid`: one short read, no statement left open."""
    return conn.execute(_SELECT + " LIMIT ?", [network, after_rowid, limit]).fetchall()


def count_watch_rows(conn: sqlite3.Connection, network: str) -> int:
    """How many options a network has (the watch set's size once loaded: its progress bar)."""
    return conn.execute("SELECT COUNT(*) FROM payment_options WHERE network = ?", [network]).fetchone()[0]


@contextmanager
def read_connection(path: str) -> Iterator[sqlite3.Connection]:
    """A read-only connection of its own to the store's file, for a reader on another thread
    (a WAL database: it reads while the store's own connection writes)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()
