"""The SQLite store: invoices, options, payments, chain cursors and the webhook outbox.

Every public method that writes is one `db.atomic()`: payments, the invoices they change
(re-judged from scratch) and the events that report the change commit together, so after
a crash the state and its events always agree. Atomic amounts are TEXT: they are uint256.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlite_utils import Database

from ..domain import (
    ACTION_RESOLVES,
    BlockRef,
    ExceptionType,
    InvoiceStatus,
    ResolutionAction,
    format_units,
    new_id,
    new_ids,
    payments_to_cover,
    rfc3339,
)
from . import engine, recording
from .outbox import Outbox
from .records import (
    ApplyResult,
    IdempotencyConflict,
    MatchedTransfer,
    NewInvoice,
    NewSession,
    OptionSpec,
    StateConflict,
)
from .rejudge import SLICE, Reasons, Rejudged, collector_paused, rejudge_many
from .schema import migrations
from .views import STATUS_COLUMNS, checksum, invoice_view, payment_view, status_of
from .watchrows import watch_rows

BLOCK_WINDOW = 256  # recent canonical blocks kept when the caller names no window (see apply_blocks)

# Derives an address from (xpub, index); builds a payment URI / contract call for an option.
Deriver = Callable[[str, int], str]
OptionFinisher = Callable[[OptionSpec, str, str, str], tuple[str, dict | None]]
# Quotes a new payment session for an invoice row (finalize, checkout-session).
SessionPlanner = Callable[[dict], NewSession]
T = TypeVar("T")


# The list's free-text search runs on one stored column, `invoices.search_text`: the casefolded
# (Unicode, as str.casefold) id and SEARCH_FIELDS of the invoice, the deposit addresses of all its
# options (old sessions' too) and the hash and payer of each of its payments, each piece after a
# SEARCH_SEPARATOR. A needle without the separator can only match inside one piece.
SEARCH_FIELDS = ("product_name", "merchant_reference", "customer_id", "customer_email", "bill_to")
SEARCH_SEPARATOR = "\x1f"


def search_text(values: Iterable[str | None]) -> str:
    """The pieces to append to an invoice's `search_text`."""
    return "".join(SEARCH_SEPARATOR + v.casefold() for v in values if v)


def _create_private(path: Path) -> None:
    """The database holds customers' emails and metadata: a new file is 0600 (SQLite gives its
    -wal and -shm files the database file's mode) and a directory the daemon creates is 0700,
    whatever the umask. An existing file keeps the mode the operator gave it."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)


class SchemaMismatch(RuntimeError):
    """The database's schema is not the one this code writes (another version migrated it, or
    has not yet)."""


# A step recording this many payments leaves its WAL checkpoint to the store's thread
# (engine.WalCheckpointer); a smaller one (a live block's) keeps SQLite's automatic checkpoint,
# which runs only once the WAL passes 1,000 pages, rather than a checkpoint after every block.
CHECKPOINT_ASIDE_FROM = 100


class Store:
    """The store. Each thread has a connection of its own (`db`): the event loop's serves the
    API's reads, and `write()` runs a change on the store's writer thread, so a long change
    (a follower step recording thousands of payments) never holds the loop. Readers see only
    committed changes (WAL). A change may also run on the calling thread, as tests do."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float],
        migrate: bool = True,
        busy_timeout_ms: int = engine.BUSY_TIMEOUT_MS,
    ) -> None:
        """``migrate`` False: a process that shares the daemon's database (its webhook
        dispatcher) never changes its schema; `SchemaMismatch` if it is not this code's.
        ``busy_timeout_ms``: how long a write waits for another connection's."""
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        if self.path != engine.MEMORY:
            _create_private(Path(self.path))
        self._local = threading.local()
        self._connections: list[Database] = []
        self._connections_lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        # The steps' WAL checkpoints, on a thread of their own (started by the first step).
        self._checkpointer = engine.WalCheckpointer(self.path) if self.path != engine.MEMORY else None
        if migrate:
            migrations.apply(self.db)
        elif pending := [m.name for m in migrations.pending(self.db)]:
            self.close()
            raise SchemaMismatch(f"the database at {self.path} lacks migrations {', '.join(pending)}")
        self.clock = clock
        # `[checkout] public_base_url`: every invoice view then has its `checkout_url`.
        self.checkout_base_url: str | None = None
        # Told each network whose blocks were applied (confirmations moved), after the commit.
        self.block_listeners: list[Callable[[str], None]] = []
        self.outbox = Outbox(lambda: self.db, clock, self._notify, self.write)

    @property
    def db(self) -> engine.StoreDatabase:
        """The calling thread's connection, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            if self._connections and self.path == engine.MEMORY:
                raise RuntimeError("an in-memory store has one connection: use it from one thread")
            db = self._local.db = engine.open_database(self.path, self.busy_timeout_ms)
            with self._connections_lock:
                self._connections.append(db)
        return db

    async def write(self, change: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `change(*args, **kwargs)` (a method of this store that writes) on the store's
        writer thread, one change at a time, and return its result. The listeners it calls
        (events appended, blocks applied) run afterwards on the loop, once it has committed;
        if it raises, they never run. An in-memory store runs the change here."""
        if self.path == engine.MEMORY:
            return change(*args, **kwargs)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        loop = asyncio.get_running_loop()
        result, notes = await loop.run_in_executor(
            self._writer, functools.partial(self._run_deferring, change, args, kwargs)
        )
        for fn, fn_args in notes:
            fn(*fn_args)
        return result

    async def write_if_free(self, change: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """As write(), but the change's transaction takes the write lock only if no other
        connection holds it: else it raises engine.WriteLockBusy at once, having changed nothing."""
        return await self.write(self._not_waiting, change, *args, **kwargs)

    def wait_for_checkpoints(self, timeout: float | None = None) -> bool:
        """Whether the WAL checkpoints the steps requested have all ended within `timeout`."""
        return self._checkpointer is None or self._checkpointer.wait_idle(timeout)

    def _not_waiting(self, change: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self.db.not_waiting():
            return change(*args, **kwargs)

    def _run_deferring(self, change: Callable[..., T], args: tuple, kwargs: dict) -> tuple[T, list]:
        self._local.deferred = []
        try:
            return change(*args, **kwargs), self._local.deferred
        finally:
            self._local.deferred = None

    def _notify(self, fn: Callable[..., None], *args: Any) -> None:
        """Call a listener: now, or after the change when on the writer thread (listeners
        belong to the loop)."""
        deferred = getattr(self._local, "deferred", None)
        if deferred is None:
            fn(*args)
        else:
            deferred.append((fn, args))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = engine.WalCheckpointer(self.path)  # a store may be used again
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for db in connections:
            db.close()
        self._local = threading.local()

    # ------------------------------------------------------------------ helpers

    def _q(self, sql: str, params: Sequence | dict = ()) -> list[sqlite3.Row]:
        return self.db.execute(sql, params).fetchall()

    def _q1(self, sql: str, params: Sequence | dict = ()) -> sqlite3.Row | None:
        return self.db.execute(sql, params).fetchone()

    def _one(self, sql: str, params: Sequence | dict = ()) -> sqlite3.Row:
        """The row of a query that always has one (a count, a MAX)."""
        row = self._q1(sql, params)
        assert row is not None, sql
        return row

    def _now(self) -> str:
        return rfc3339(self.clock())  # type: ignore[return-value]

    def _add_search_text(self, invoice_id: str, values: Iterable[str | None]) -> None:
        """Make more text find the invoice; called in the transaction that stores that text."""
        self.db.execute(
            "UPDATE invoices SET search_text = search_text || ? WHERE id = ?",
            [search_text(values), invoice_id],
        )

    # ------------------------------------------------------------------ invoices

    def create_invoice(
        self,
        new: NewInvoice,
        *,
        derive: Deriver,
        finish: OptionFinisher,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
    ) -> tuple[dict, bool]:
        """Insert an invoice with its options and its `invoice.created` event.

        Returns (invoice, created). A repeated Idempotency-Key with the same body returns the
        first invoice; with another body it raises IdempotencyConflict and writes nothing.
        """
        with self.db.atomic():
            if idempotency_key is not None:
                seen = self._q1(
                    "SELECT request_hash, invoice_id FROM idempotency_keys WHERE key = ?", [idempotency_key]
                )
                if seen is not None:
                    if seen["request_hash"] != request_hash:
                        raise IdempotencyConflict(idempotency_key)
                    return self._existing_invoice(seen["invoice_id"]), False
            now = self._now()
            invoice_id = new_id("inv", int(self.clock() * 1000))
            status = InvoiceStatus.DRAFT if new.draft else InvoiceStatus.PENDING
            self.db.table("invoices").insert(
                {
                    "id": invoice_id,
                    "status": str(status),
                    "amount": format(new.amount, "f"),
                    "currency": new.currency,
                    **{
                        k: new.fields.get(k)
                        for k in (
                            "product_name",
                            "issued_by",
                            "bill_to",
                            "merchant_reference",
                            "customer_id",
                            "customer_email",
                        )
                    },
                    "metadata": orjson.dumps(new.metadata).decode(),
                    "tolerance_percent": format(new.tolerance_percent, "f"),
                    "payment_timing": orjson.dumps(new.payment_timing).decode(),
                    "payable_until": new.payable_until,
                    "payment_summary": "{}",
                    "request": orjson.dumps(new.request).decode(),
                    "version": 0,
                    "created_at": now,
                    "updated_at": now,
                    "redirect_url": new.fields.get("redirect_url"),
                    "search_text": search_text([invoice_id, *(new.fields.get(k) for k in SEARCH_FIELDS)]),
                }
            )
            self._insert_options(invoice_id, new.options, derive, finish)
            if idempotency_key is not None:
                self.db.table("idempotency_keys").insert(
                    {
                        "key": idempotency_key,
                        "request_hash": request_hash,
                        "invoice_id": invoice_id,
                        "created_at": now,
                    }
                )
            self._rejudge(invoice_id, created=True)
            return self._existing_invoice(invoice_id), True

    def _insert_options(
        self, invoice_id: str, specs: list[OptionSpec], derive: Deriver, finish: OptionFinisher
    ) -> None:
        start = (
            self._one(
                "SELECT COALESCE(MAX(position), -1) AS p FROM payment_options WHERE invoice_id = ?",
                [invoice_id],
            )["p"]
            + 1
        )
        destinations = []
        for offset, spec in enumerate(specs):
            option_id = new_id("opt", int(self.clock() * 1000))
            index = None
            if spec.rail == "address":
                assert spec.xpub is not None
                index = self._allocate_index(spec.xpub)
                destination = derive(spec.xpub, index).lower()
            else:
                assert spec.destination is not None
                destination = spec.destination.lower()
            uri, call = finish(spec, destination, invoice_id, option_id)
            self.db.table("payment_options").insert(
                {
                    "id": option_id,
                    "invoice_id": invoice_id,
                    "position": start + offset,
                    "active": 1,
                    "rail": spec.rail,
                    "network": spec.network,
                    "chain_id": spec.chain_id,
                    "asset": spec.asset,
                    "token_contract": spec.token_contract,
                    "decimals": spec.decimals,
                    "quoted_amount": spec.quoted_amount,
                    "quote_rate": spec.quote_rate,
                    "quote_source": spec.quote_source,
                    "quoted_at": rfc3339(self.clock() if spec.quoted_at is None else spec.quoted_at),
                    "amount_atomic": str(spec.amount_atomic),
                    "destination_address": destination,
                    "destination_checksum": checksum(destination),
                    "derivation_index": index,
                    "payment_uri": uri,
                    "required_confirmations": spec.required_confirmations,
                    "contract_call": orjson.dumps(call).decode() if call is not None else None,
                }
            )
            destinations.append(destination)
        if destinations:
            self._add_search_text(invoice_id, destinations)

    def _allocate_index(self, xpub: str) -> int:
        """Indices are handed out once and never again, even if the invoice is later dropped."""
        row = self._q1("SELECT next_index FROM derivation_counters WHERE xpub = ?", [xpub])
        index = row["next_index"] if row else 0
        self.db.execute(
            "INSERT INTO derivation_counters(xpub, next_index) VALUES (?, ?) "
            "ON CONFLICT(xpub) DO UPDATE SET next_index = excluded.next_index",
            [xpub, index + 1],
        )
        return index

    def get_invoice(self, invoice_id: str) -> dict | None:
        return self._invoice(invoice_id)

    def get_status(self, invoice_id: str) -> dict | None:
        """The polling route's shape, read without the options it does not show (the route is
        polled far more than any other)."""
        with self._snapshot():
            row = self._q1(f"SELECT {STATUS_COLUMNS} FROM invoices WHERE id = ?", [invoice_id])
            return None if row is None else status_of(row, self._payments(invoice_id))

    def get_payments(self, invoice_id: str) -> list[dict] | None:
        with self._snapshot():
            if self._q1("SELECT 1 FROM invoices WHERE id = ?", [invoice_id]) is None:
                return None
            return self._payments(invoice_id)

    def _payments(self, invoice_id: str) -> list[dict]:
        rows = self._q(
            "SELECT * FROM payments WHERE invoice_id = ? ORDER BY block_timestamp, network, block_number, "
            "log_key, id",
            [invoice_id],
        )
        tips = self._tips()
        return [payment_view(r, tips.get(r["network"])) for r in rows]

    def _tips(self) -> dict[str, int]:
        """Each chain's last processed block, as this connection sees it now (inside a change:
        the change's own checkpoint), from which payments' confirmations follow."""
        return {r["network"]: r["block_number"] for r in self._q("SELECT network, block_number FROM cursors")}

    def _existing_invoice(self, invoice_id: str) -> dict:
        """An invoice this change has just read or written."""
        invoice = self._invoice(invoice_id)
        assert invoice is not None, invoice_id
        return invoice

    def _invoice(self, invoice_id: str) -> dict | None:
        with self._snapshot():
            row = self._q1("SELECT * FROM invoices WHERE id = ?", [invoice_id])
            if row is None:
                return None
            options = self._q(
                "SELECT * FROM payment_options WHERE invoice_id = ? AND active = 1 ORDER BY position",
                [invoice_id],
            )
            return invoice_view(row, options, self._payments(invoice_id), self.checkout_base_url)

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Reads that must agree with each other (an invoice and its payments) in one read
        transaction: the writer thread may commit between two statements, and WAL gives a read
        transaction one consistent snapshot. Inside a change, its own transaction is the snapshot."""
        conn = self.db.conn
        if conn.in_transaction:
            yield
            return
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def _filter_clause(self, filters: dict[str, Any]) -> tuple[list[str], list[Any]]:
        """The list's filters as SQL conditions on `invoices` (for the list, the export and the stats)."""
        where: list[str] = []
        params: list[Any] = []
        for column in (
            "status",
            "merchant_reference",
            "customer_id",
            "customer_email",
            "exception_type",
            "exception_status",
        ):
            if filters.get(column) is not None:
                where.append(f"invoices.{column} = ?")
                params.append(filters[column])
        if filters.get("transaction_hash"):
            where.append("invoices.id IN (SELECT invoice_id FROM payments WHERE tx_hash = ?)")
            params.append(filters["transaction_hash"].lower())
        if filters.get("search"):
            # A literal, case-insensitive substring of one piece of `search_text` (see SEARCH_FIELDS).
            needle = filters["search"].casefold()
            if SEARCH_SEPARATOR in needle:
                where.append("0")  # (a control character) it could only match across two pieces: nothing
            else:
                where.append("instr(invoices.search_text, ?) > 0")
                params.append(needle)
        return where, params

    def list_invoices(self, filters: dict[str, Any], limit: int, offset: int) -> tuple[list[dict], int]:
        with self._snapshot():
            return self._list_invoices(filters, limit, offset)

    def _list_invoices(self, filters: dict[str, Any], limit: int, offset: int) -> tuple[list[dict], int]:
        where, params = self._filter_clause(filters)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        if filters.get("search"):
            # A search reads every invoice: count the matches in the scan that finds the page.
            ids = self._q(
                f"SELECT id, COUNT(*) OVER () AS n FROM invoices {clause} ORDER BY rowid DESC LIMIT ? "
                "OFFSET ?",
                [*params, limit, offset],
            )
            # Nothing found: no match at all, or a page past the end (then count them).
            total = ids[0]["n"] if ids else (self.count_invoices(filters) if offset else 0)
        else:
            total = self._one(f"SELECT COUNT(*) AS n FROM invoices {clause}", params)["n"]
            ids = self._q(
                f"SELECT id FROM invoices {clause} ORDER BY rowid DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            )
        return [self._invoice(r["id"]) for r in ids], total  # type: ignore[misc]

    def count_invoices(self, filters: dict[str, Any]) -> int:
        where, params = self._filter_clause(filters)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._one(f"SELECT COUNT(*) AS n FROM invoices {clause}", params)["n"]

    def export_rows(
        self, filters: dict[str, Any], limit: int, offset: int, *, chunk: int = 500
    ) -> Iterator[list[dict]]:
        """The filtered invoices, newest first, as flat rows for the CSV export, `chunk` at a time.

        Every chunk is its own short read (no cursor stays open while the caller writes), and
        the chunks continue below the last rowid seen, so invoices created during the export are
        left out rather than shifting the pages."""
        where, params = self._filter_clause(filters)
        last: int | None = None
        left, skip = limit, offset
        while left > 0:
            conds = list(where) + (["invoices.rowid < ?"] if last is not None else [])
            clause = ("WHERE " + " AND ".join(conds)) if conds else ""
            rows = self._q(
                f"SELECT invoices.rowid AS row_number, invoices.* FROM invoices {clause} ORDER BY "
                "invoices.rowid DESC LIMIT ? OFFSET ?",
                [*params, *([last] if last is not None else []), min(chunk, left), skip],
            )
            skip = 0
            if not rows:
                return
            hashes: dict[str, list[str]] = {r["id"]: [] for r in rows}
            marks = ",".join("?" * len(rows))
            for p in self._q(
                f"SELECT invoice_id, tx_hash FROM payments WHERE invoice_id IN ({marks}) AND status != "
                "'reverted' "
                "ORDER BY block_timestamp, network, block_number, log_key, id",
                list(hashes),
            ):
                if p["tx_hash"] not in hashes[p["invoice_id"]]:
                    hashes[p["invoice_id"]].append(p["tx_hash"])
            out = []
            for r in rows:
                summary = orjson.loads(r["payment_summary"])
                out.append(
                    {
                        "id": r["id"],
                        "status": r["status"],
                        "amount": r["amount"],
                        "currency": r["currency"],
                        "received_amount": summary.get("received_amount"),
                        "remaining_amount": summary.get("remaining_amount"),
                        "overpaid_amount": summary.get("overpaid_amount"),
                        "payment_state": summary.get("payment_state"),
                        "exception_type": r["exception_type"],
                        "exception_status": r["exception_status"],
                        "merchant_reference": r["merchant_reference"],
                        "customer_id": r["customer_id"],
                        "customer_email": r["customer_email"],
                        "product_name": r["product_name"],
                        "created_at": r["created_at"],
                        "paid_at": r["paid_at"],
                        "confirmed_at": r["confirmed_at"],
                        "cancelled_at": r["cancelled_at"],
                        "transaction_hashes": " ".join(hashes[r["id"]]),
                    }
                )
            yield out
            last = rows[-1]["row_number"]
            left -= len(rows)

    def invoice_stats(self, filters: dict[str, Any]) -> dict:
        """Counts of the filtered invoices by status and by open exception type (every one
        present, zeros included), and what their counted, live payments brought per network and asset."""
        where, params = self._filter_clause(filters)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        by_status = {s.value: 0 for s in InvoiceStatus}
        for r in self._q(f"SELECT status, COUNT(*) AS n FROM invoices {clause} GROUP BY status", params):
            by_status[r["status"]] = r["n"]
        by_exception = {t.value: 0 for t in ExceptionType}
        open_clause = "WHERE " + " AND ".join([*where, "invoices.exception_status = 'open'"])
        for r in self._q(
            f"SELECT exception_type, COUNT(*) AS n FROM invoices {open_clause} GROUP BY exception_type",
            params,
        ):
            by_exception[r["exception_type"]] = r["n"]
        # uint256 sums: SQLite's SUM would overflow (or go to floats), so they are added here, exactly.
        received: dict[tuple[str, str, int], list[int]] = {}
        for r in self.db.execute(
            "SELECT p.network, p.asset, p.decimals, p.amount_atomic FROM payments p "
            "WHERE p.role = 'counted' AND p.status != 'reverted' AND p.invoice_id IN (SELECT invoices.id "
            f"FROM invoices {clause})",
            params,
        ):
            entry = received.setdefault((r["network"], r["asset"], r["decimals"]), [0, 0])
            entry[0] += int(r["amount_atomic"])
            entry[1] += 1
        return {
            "total": sum(by_status.values()),
            "by_status": by_status,
            "by_open_exception_type": by_exception,
            "received": [
                {
                    "network": network,
                    "asset": asset,
                    "decimals": decimals,
                    "amount_atomic": str(total),
                    "amount": format_units(total, decimals),
                    "payments": count,
                }
                for (network, asset, decimals), (total, count) in sorted(received.items())
            ],
        }

    # ------------------------------------------------------------------ judging

    def _rejudge(
        self,
        invoice_id: str,
        *,
        created: bool = False,
        resolved: bool = False,
        session: bool = False,
    ) -> bool:
        """Judge one invoice again from all its payments; store it and queue what changed (see
        `rejudge.Reasons` for what each flag reports). True if the invoice changed."""
        reasons = Reasons(created=created, resolved=resolved, session=session)
        return self._rejudge_many({invoice_id: reasons}).changed > 0

    def _rejudge_many(self, reasons: dict[str, Reasons]) -> Rejudged:
        if not reasons:
            return Rejudged()
        return rejudge_many(self.db.conn, self.outbox, reasons, now=self._now(), tips=self._tips())

    # ------------------------------------------------------------------ operator actions

    def resolve_exception(self, invoice_id: str, action: ResolutionAction, note: str | None) -> dict | None:
        """Resolve the open exception; StateConflict if none is open or the action does not fit."""
        with self.db.atomic():
            invoice = self._invoice(invoice_id)
            if invoice is None:
                return None
            exc = invoice["exception"]
            if exc is None or exc["status"] != "open":
                raise StateConflict("the invoice has no open exception")
            kind = ExceptionType(exc["type"])
            fits = ACTION_RESOLVES.get(action)
            if fits is not None and fits != kind:
                raise StateConflict(f"{action} does not resolve a {kind} exception")
            roles = {p["id"]: p["role"] for p in invoice["payments"] if p["status"] != "reverted"}
            row = self._one("SELECT resolutions FROM invoices WHERE id = ?", [invoice_id])
            resolutions = orjson.loads(row["resolutions"])
            resolutions.append(
                {
                    "exception_type": kind.value,
                    "action": action.value,
                    "note": note,
                    "resolved_at": self._now(),
                    "payment_ids": sorted(payments_to_cover(kind, roles)),
                }
            )
            self.db.execute(
                "UPDATE invoices SET resolutions = ? WHERE id = ?",
                [orjson.dumps(resolutions).decode(), invoice_id],
            )
            self._rejudge(invoice_id, resolved=True)
            return self._invoice(invoice_id)

    def start_session(
        self,
        invoice_id: str,
        *,
        from_statuses: Sequence[InvoiceStatus],
        plan: SessionPlanner,
        derive: Deriver,
        finish: OptionFinisher,
    ) -> dict | None:
        """Finalize a draft, or give a `pending`/`expired` invoice that has received nothing a
        fresh payment session: new options (the old ones stay watched but are no longer
        offered), a new timer. None for an unknown invoice; StateConflict unless the invoice is
        in one of `from_statuses` with no live payment.

        `plan(invoice_row)` quotes the options and starts the timer; it runs after the state
        checks, inside the transaction, and whatever it raises undoes the whole change."""
        with self.db.atomic():
            row = self._q1("SELECT * FROM invoices WHERE id = ?", [invoice_id])
            if row is None:
                return None
            status = row["status"]
            if status not in from_statuses:
                raise StateConflict(f"the invoice is {status}, not {' or '.join(from_statuses)}")
            if self._live_payments(invoice_id):
                raise StateConflict(f"the invoice is {status} and has received a payment")
            session = plan(dict(row))
            self.db.execute(
                "UPDATE payment_options SET active = 0 WHERE invoice_id = ? AND active = 1", [invoice_id]
            )
            self._insert_options(invoice_id, session.options, derive, finish)
            self.db.execute(
                "UPDATE invoices SET payment_timing = ?, payable_until = ?, request = ? WHERE id = ?",
                [
                    orjson.dumps(session.payment_timing).decode(),
                    session.payable_until,
                    orjson.dumps(session.request).decode(),
                    invoice_id,
                ],
            )
            self._rejudge(invoice_id, session=True)
            return self._invoice(invoice_id)

    def cancel_invoice(self, invoice_id: str) -> dict | None:
        """`pending` with nothing received → `cancelled`; StateConflict otherwise, None if unknown.
        A payment that arrives later is `late` (judging knows the invoice is cancelled)."""
        with self.db.atomic():
            row = self._q1("SELECT status FROM invoices WHERE id = ?", [invoice_id])
            if row is None:
                return None
            if row["status"] != InvoiceStatus.PENDING:
                raise StateConflict(f"only a pending invoice can be cancelled; this one is {row['status']}")
            if self._live_payments(invoice_id):
                raise StateConflict("the invoice has received a payment")
            self.db.execute("UPDATE invoices SET cancelled_at = ? WHERE id = ?", [self._now(), invoice_id])
            self._rejudge(invoice_id)
            return self._invoice(invoice_id)

    def _live_payments(self, invoice_id: str) -> int:
        """Payments still on the canonical chain, whatever their role."""
        return self._one(
            "SELECT COUNT(*) AS n FROM payments WHERE invoice_id = ? AND status != 'reverted'", [invoice_id]
        )["n"]

    # ------------------------------------------------------------------ chain following

    def cursor(self, network: str) -> BlockRef | None:
        row = self._q1("SELECT * FROM cursors WHERE network = ?", [network])
        if row is None:
            return None
        block = self._q1(
            "SELECT parent_hash FROM chain_blocks WHERE network = ? AND number = ?",
            [network, row["block_number"]],
        )
        return BlockRef(
            row["block_number"],
            row["block_hash"],
            block["parent_hash"] if block else "",
            row["block_timestamp"],
        )

    def genesis_hash(self, network: str) -> str | None:
        """The hash of block 0 of the chain this database follows as `network`; None until
        `remember_genesis` has recorded it (a chain never followed, a database from before)."""
        row = self._q1("SELECT hash FROM chain_genesis WHERE network = ?", [network])
        return row["hash"] if row else None

    def remember_genesis(self, network: str, block_hash: str) -> str:
        """Record `network`'s genesis hash unless one is recorded; returns the recorded one,
        which differs from `block_hash` when the node serves another chain."""
        with self.db.atomic():
            self.db.execute(
                "INSERT INTO chain_genesis(network, hash, recorded_at) VALUES (?, ?, ?) ON "
                "CONFLICT(network) DO NOTHING",
                [network, block_hash.lower(), self._now()],
            )
            return self.genesis_hash(network)  # type: ignore[return-value]

    def recent_blocks(self, network: str) -> list[BlockRef]:
        """The stored canonical window, newest first."""
        return [
            BlockRef(r["number"], r["hash"], r["parent_hash"], r["timestamp"])
            for r in self._q("SELECT * FROM chain_blocks WHERE network = ? ORDER BY number DESC", [network])
        ]

    def watch_entries(self, network: str, after_rowid: int = 0) -> Iterator[sqlite3.Row]:
        """Options on a network (both rails), in creation order; the follower keeps them in memory.

        Yielded in batches, not fetched at once: at start that is every open option, and a
        million rows held as a list would double the follower's memory while it loads them."""
        return watch_rows(self.db.conn, network, after_rowid)

    def apply_blocks(
        self,
        network: str,
        blocks: Sequence[BlockRef],
        matched: Sequence[MatchedTransfer],
        *,
        confirmed_through: int,
        keep_above: int | None = None,
    ) -> ApplyResult:
        """Record a range of canonical blocks in one transaction.

        `blocks` are the headers of the range (its last one becomes the checkpoint);
        `confirmed_through` is the highest block whose payments count as confirmed; stored
        blocks at or below `keep_above` are forgotten (the follower's window: what it can
        walk back through after a reorg; BLOCK_WINDOW blocks when not given).

        However many payments the range holds, each table is written by one statement and
        each invoice judged once (recording.py, rejudge.py).
        """
        result = ApplyResult()
        tip = blocks[-1]
        now = self._now()
        checkpointer = self._checkpointer if len(matched) >= CHECKPOINT_ASIDE_FROM else None
        with (
            checkpointer.beside(self.db) if checkpointer is not None else nullcontext(),
            collector_paused(len(matched) > SLICE // 10),
            self.db.atomic(),
        ):
            conn = self.db.conn
            self._move_checkpoint(conn, network, blocks, keep_above, now)
            plan = self._record(conn, network, matched, now, confirmed_through)
            confirmed = conn.execute(
                "UPDATE payments SET status = 'confirmed', confirmed_at = ? "
                "WHERE network = ? AND status = 'detected' AND block_number <= ? RETURNING invoice_id",
                [now, network, confirmed_through],
            ).fetchall()
            result.payments_added = len(plan.recorded)
            result.payments_confirmed = len(confirmed) + plan.inserted_confirmed
            reasons: dict[str, Reasons] = {}
            for payment_id, invoice_id in plan.recorded:
                reasons.setdefault(invoice_id, Reasons()).new_payments.append(payment_id)
            for invoice_id, values in plan.search_text.items():
                reasons[invoice_id].search_text = search_text(values)
            for r in confirmed:
                reasons.setdefault(r["invoice_id"], Reasons())
            for invoice_id in self._expiry_candidates(network, tip.timestamp):
                reasons.setdefault(invoice_id, Reasons())
            judged = self._rejudge_many(reasons)
            result.invoices_changed = judged.changed
            result.events = judged.events
            result.payment_roles = [role for _, role in judged.detected]
        for listener in self.block_listeners:
            self._notify(listener, network)
        return result

    def _move_checkpoint(
        self,
        conn: sqlite3.Connection,
        network: str,
        blocks: Sequence[BlockRef],
        keep_above: int | None,
        now: str,
    ) -> None:
        tip = blocks[-1]
        conn.executemany(
            "INSERT INTO chain_blocks(network, number, hash, parent_hash, timestamp) VALUES (?,?,?,?,?) "
            "ON CONFLICT(network, number) DO UPDATE SET "
            "hash = excluded.hash, parent_hash = excluded.parent_hash, timestamp = excluded.timestamp",
            [(network, b.number, b.hash, b.parent_hash, b.timestamp) for b in blocks],
        )
        forget_through = tip.number - BLOCK_WINDOW if keep_above is None else min(keep_above, tip.number - 1)
        conn.execute("DELETE FROM chain_blocks WHERE network = ? AND number <= ?", [network, forget_through])
        conn.execute(
            "INSERT INTO cursors(network, block_number, block_hash, block_timestamp, updated_at) "
            "VALUES (?,?,?,?,?) ON CONFLICT(network) DO UPDATE SET block_number = excluded.block_number, "
            "block_hash = excluded.block_hash, block_timestamp = excluded.block_timestamp, "
            "updated_at = excluded.updated_at",
            [network, tip.number, tip.hash, tip.timestamp, now],
        )

    def _record(
        self,
        conn: sqlite3.Connection,
        network: str,
        matched: Sequence[MatchedTransfer],
        now: str,
        confirmed_through: int,
    ) -> recording.RecordingPlan:
        """Record the step's transfers: new payments, revived ones (see recording.py)."""
        if not matched:
            return recording.RecordingPlan()
        existing = recording.read_existing(
            conn, network, list(dict.fromkeys(m.transfer.tx_hash for m in matched))
        )
        options = recording.read_options(conn, list(dict.fromkeys(m.option_id for m in matched)))
        payment_ids = iter(new_ids("pay", int(self.clock() * 1000), len(matched)))
        plan = recording.plan_recording(
            network,
            matched,
            existing,
            options,
            now=now,
            new_payment_id=payment_ids.__next__,
            confirmed_through=confirmed_through,
        )
        recording.write_plan(conn, plan)
        return plan

    def _expiry_candidates(self, network: str, chain_time: int) -> set[str]:
        return {
            r["invoice_id"]
            for r in self._q(
                "SELECT DISTINCT o.invoice_id FROM invoices i JOIN payment_options o ON o.invoice_id = i.id "
                "WHERE i.status = 'pending' AND i.payable_until < ? AND o.network = ?",
                [chain_time, network],
            )
        }

    def revert_to(self, network: str, ancestor: BlockRef) -> list[str]:
        """Undo everything above `ancestor` after a reorg.

        Payments in orphaned blocks are marked reverted and their invoices judged again.
        Returns the reverted payment ids.
        """
        floor = ancestor.number
        with self.db.atomic():
            conn = self.db.conn
            # The live statuses named, not "!= 'reverted'": each is then a range of the
            # (network, status, block_number) index above the ancestor, not every payment the
            # chain ever had.
            orphaned = conn.execute(
                "UPDATE payments SET status = 'reverted', confirmed_at = NULL "
                "WHERE network = ? AND block_number > ? AND status IN ('detected', 'confirmed') "
                "RETURNING id, invoice_id",
                [network, floor],
            ).fetchall()
            orphaned.sort(key=lambda r: r["id"])
            conn.execute("DELETE FROM chain_blocks WHERE network = ? AND number > ?", [network, floor])
            conn.execute(
                "INSERT INTO chain_blocks(network, number, hash, parent_hash, timestamp) VALUES (?,?,?,?,?) "
                "ON CONFLICT(network, number) DO UPDATE SET hash = excluded.hash, "
                "parent_hash = excluded.parent_hash, timestamp = excluded.timestamp",
                [network, ancestor.number, ancestor.hash, ancestor.parent_hash, ancestor.timestamp],
            )
            conn.execute(
                "UPDATE cursors SET block_number = ?, block_hash = ?, block_timestamp = ?, updated_at = ? "
                "WHERE network = ?",
                [ancestor.number, ancestor.hash, ancestor.timestamp, self._now(), network],
            )
            reasons: dict[str, Reasons] = {}
            for r in orphaned:
                reasons.setdefault(r["invoice_id"], Reasons()).reverted_payments.append(r["id"])
            self._rejudge_many(reasons)
            return [r["id"] for r in orphaned]

    def expire_due(self) -> int:
        """Judge again the open invoices whose deadline has passed in their chains' time."""
        with self.db.atomic():
            rows = self._q(
                "SELECT i.id FROM invoices i WHERE i.status = 'pending' AND i.payable_until IS NOT NULL "
                "AND i.payable_until < (SELECT COALESCE(MAX(block_timestamp), 0) FROM cursors)"
            )
            return self._rejudge_many({r["id"]: Reasons() for r in rows}).changed
