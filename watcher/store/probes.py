"""Read-only questions operations ask of the database: does it answer, how many of what.

Kept apart from `core` (the invoice logic) and cheap enough to run on every `/readyz`
and `/metrics` request: each is one indexed aggregate.
"""

from __future__ import annotations

from .core import Store


def ping(store: Store) -> None:
    """Raises (sqlite3.Error) when the database does not answer."""
    store.db.execute("SELECT 1").fetchone()


def invoice_counts(store: Store) -> dict[str, int]:
    """Invoices by status (statuses without any are absent)."""
    rows = store.db.execute("SELECT status, COUNT(*) AS n FROM invoices GROUP BY status").fetchall()
    return {r["status"]: r["n"] for r in rows}
