"""Retention (`[retention]`): what the store forgets, and how big it is.

Each prune removes at most one batch and commits: the jobs that call them run every half
minute on the event loop, so a large backlog (a first run on an old database) is worked off
over several runs without ever holding the loop or the write lock for long.
"""

from __future__ import annotations

import os
import sqlite3

from ..domain import rfc3339
from .core import Store

BATCH = 2000
WATCH_BATCH = 20_000  # options looked at per run: cheap (an index walk and dict deletions)
CLOSED_STATUSES = ("confirmed", "cancelled", "expired", "underpaid")


def prune_idempotency_keys(store: Store, older_than: float, limit: int = BATCH) -> int:
    """Forget Idempotency-Keys first used before `older_than` (unix seconds); returns how many."""
    with store.db.atomic():
        cursor = store.db.execute(
            "DELETE FROM idempotency_keys WHERE rowid IN "
            "(SELECT rowid FROM idempotency_keys WHERE created_at < ? ORDER BY created_at LIMIT ?)",
            [rfc3339(older_than), limit],
        )
    return cursor.rowcount


def prune_delivered_events(store: Store, older_than: float, limit: int = BATCH) -> tuple[int, int, int]:
    """Remove events made before `older_than` whose every delivery is delivered (or that had no
    endpoint to go to), with their deliveries and attempts. A pending or failed delivery keeps
    its event: it may still go out, or be redelivered. So does an event past an endpoint's cursor
    (its deliveries not yet queued: outbox.py), wanted by that endpoint or not. A status the
    events of one change shared goes with the last of them. Returns (events, deliveries, attempts)."""
    with store.db.atomic():
        rows = store.db.execute(
            "SELECT e.seq, e.id, e.status_id FROM events e WHERE e.created_at < ? "
            "AND e.seq <= COALESCE((SELECT MIN(after_seq) FROM webhook_endpoints), e.seq) AND NOT EXISTS "
            "(SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.status != 'delivered') "
            "ORDER BY e.created_at LIMIT ?",
            [rfc3339(older_than), limit],
        ).fetchall()
        if not rows:
            return 0, 0, 0
        ids = [r["id"] for r in rows]
        marks = ",".join("?" * len(ids))
        attempts = store.db.execute(
            "DELETE FROM delivery_attempts WHERE delivery_id IN "
            f"(SELECT id FROM deliveries WHERE event_id IN ({marks}))",
            ids,
        ).rowcount
        deliveries = store.db.execute(f"DELETE FROM deliveries WHERE event_id IN ({marks})", ids).rowcount
        statuses = [r["status_id"] for r in rows if r["status_id"] is not None]
        events = store.db.execute(f"DELETE FROM events WHERE id IN ({marks})", ids).rowcount
        if statuses:  # a status goes with the last event that shares it
            store.db.execute(
                f"DELETE FROM event_statuses WHERE id IN ({','.join('?' * len(statuses))}) "
                "AND NOT EXISTS (SELECT 1 FROM events e WHERE e.status_id = event_statuses.id)",
                statuses,
            )
    return events, deliveries, attempts


def closed_watch_entries(
    store: Store,
    network: str,
    closed_before: float,
    after: tuple[str, int] = ("", 0),
    limit: int = WATCH_BATCH,
) -> list[sqlite3.Row]:
    """Options on `network` whose invoice closed (confirmed, cancelled, expired or underpaid,
    and unchanged since) before `closed_before`, after the (updated_at, option rowid) mark
    `after`, in that order: the ones to stop watching for late payments, a batch at a time."""
    return store.db.execute(
        "SELECT i.updated_at, o.rowid, o.id, o.rail, o.destination_address, o.contract_call "
        "FROM invoices i JOIN payment_options o ON o.invoice_id = i.id "
        f"WHERE i.updated_at < ? AND i.status IN ({','.join('?' * len(CLOSED_STATUSES))}) AND o.network = ? "
        "AND (i.updated_at > ? OR (i.updated_at = ? AND o.rowid > ?)) "
        "ORDER BY i.updated_at, o.rowid LIMIT ?",
        [rfc3339(closed_before), *CLOSED_STATUSES, network, after[0], after[0], after[1], limit],
    ).fetchall()


def store_bytes(store: Store) -> dict[str, int]:
    """The database's size: its pages, and the write-ahead log beside it."""
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    page_size = store.db.execute("PRAGMA page_size").fetchone()[0]
    try:
        wal = os.path.getsize(store.path + "-wal") if store.path != ":memory:" else 0
    except OSError:
        wal = 0
    return {"database": pages * page_size, "wal": wal}
