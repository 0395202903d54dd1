"""The SQLite store: invoices, options, payments, chain cursors and the webhook outbox.

Every public method that writes is one `db.atomic()`: payments, the invoices they change
(re-judged from scratch) and the events that report the change commit together, so after
a crash the state and its events always agree. Atomic amounts are TEXT: they are uint256.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from sqlite_utils import Database

from ..domain import (
    ACTION_RESOLVES,
    BlockRef,
    ExceptionType,
    InvoiceFacts,
    InvoiceStatus,
    PaymentFacts,
    PaymentState,
    PaymentStatus,
    Resolution,
    ResolutionAction,
    format_units,
    judge,
    new_id,
    payments_to_cover,
    rfc3339,
)
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
from .schema import migrations
from .views import invoice_view, payment_view, status_view

BLOCK_WINDOW = 256  # recent canonical blocks kept when the caller names no window (see apply_blocks)

# Derives an address from (xpub, index); builds a payment URI / contract call for an option.
Deriver = Callable[[str, int], str]
OptionFinisher = Callable[[OptionSpec, str, str, str], tuple[str, dict | None]]
# Quotes a new payment session for an invoice row (finalize, checkout-session).
SessionPlanner = Callable[[dict], NewSession]


# The list's free-text search runs on one stored column, `invoices.search_text`: the casefolded
# (Unicode, as str.casefold) id and SEARCH_FIELDS of the invoice, the deposit addresses of all its
# options (old sessions' too) and the hash and payer of each of its payments, each piece after a
# SEARCH_SEPARATOR. A needle without the separator can only match inside one piece.
SEARCH_FIELDS = ("product_name", "merchant_reference", "customer_id", "customer_email", "bill_to")
SEARCH_SEPARATOR = "\x1f"


def search_text(values: Iterable[str | None]) -> str:
    """The pieces to append to an invoice's `search_text`."""
    return "".join(SEARCH_SEPARATOR + v.casefold() for v in values if v)


def _by_transaction(matched: Sequence[MatchedTransfer]) -> dict[str, list[MatchedTransfer]]:
    """The transfers of each transaction, transactions in the order they were found."""
    out: dict[str, list[MatchedTransfer]] = {}
    for m in matched:
        out.setdefault(m.transfer.tx_hash, []).append(m)
    return out


def _identity(m: MatchedTransfer, asset: str) -> tuple:
    """What a payment moves, which survives its transaction's re-inclusion elsewhere: the
    option it pays (hence the asset and token), the asset, payer, recipient and amount, as
    the payments table stores them."""
    t = m.transfer
    return (m.option_id, asset, t.from_address, t.to_address, str(t.amount))


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


class Store:
    def __init__(self, path: str | Path, *, clock: Callable[[], float]) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            _create_private(Path(self.path))
        conn = sqlite3.connect(self.path, isolation_level=None)  # one thread: the event loop's
        conn.row_factory = sqlite3.Row
        self.db = Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        migrations.apply(self.db)
        self.clock = clock
        # `[checkout] public_base_url`: every invoice view then has its `checkout_url`.
        self.checkout_base_url: str | None = None
        # Told each network whose blocks were applied (confirmations moved), after the commit.
        self.block_listeners: list[Callable[[str], None]] = []
        self.outbox = Outbox(self.db, clock)
        self._tips: dict[str, int] = {
            r["network"]: r["block_number"] for r in self._q("SELECT network, block_number FROM cursors")
        }

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ helpers

    def _q(self, sql: str, params: Sequence | dict = ()) -> list[sqlite3.Row]:
        return self.db.execute(sql, params).fetchall()

    def _q1(self, sql: str, params: Sequence | dict = ()) -> sqlite3.Row | None:
        return self.db.execute(sql, params).fetchone()

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
                    return self._invoice(seen["invoice_id"]), False
            now = self._now()
            invoice_id = new_id("inv", int(self.clock() * 1000))
            status = InvoiceStatus.DRAFT if new.draft else InvoiceStatus.PENDING
            self.db["invoices"].insert(
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
                self.db["idempotency_keys"].insert(
                    {
                        "key": idempotency_key,
                        "request_hash": request_hash,
                        "invoice_id": invoice_id,
                        "created_at": now,
                    }
                )
            self._rejudge(invoice_id, created=True)
            return self._invoice(invoice_id), True

    def _insert_options(
        self, invoice_id: str, specs: list[OptionSpec], derive: Deriver, finish: OptionFinisher
    ) -> None:
        start = (
            (
                self._q1(
                    "SELECT COALESCE(MAX(position), -1) AS p FROM payment_options WHERE invoice_id = ?",
                    [invoice_id],
                )["p"]
            )
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
            self.db["payment_options"].insert(
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
                    "amount_atomic": str(spec.amount_atomic),
                    "destination_address": destination,
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
        invoice = self._invoice(invoice_id)
        return status_view(invoice) if invoice else None

    def get_payments(self, invoice_id: str) -> list[dict] | None:
        if self._q1("SELECT 1 FROM invoices WHERE id = ?", [invoice_id]) is None:
            return None
        return self._payments(invoice_id)

    def _payments(self, invoice_id: str) -> list[dict]:
        rows = self._q(
            "SELECT * FROM payments WHERE invoice_id = ? ORDER BY block_timestamp, network, block_number, log_key, id",
            [invoice_id],
        )
        return [payment_view(r, self._tips.get(r["network"])) for r in rows]

    def _invoice(self, invoice_id: str) -> dict | None:
        row = self._q1("SELECT * FROM invoices WHERE id = ?", [invoice_id])
        if row is None:
            return None
        options = self._q(
            "SELECT * FROM payment_options WHERE invoice_id = ? AND active = 1 ORDER BY position",
            [invoice_id],
        )
        return invoice_view(row, options, self._payments(invoice_id), self.checkout_base_url)

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
        where, params = self._filter_clause(filters)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        if filters.get("search"):
            # A search reads every invoice: count the matches in the scan that finds the page.
            ids = self._q(
                f"SELECT id, COUNT(*) OVER () AS n FROM invoices {clause} ORDER BY rowid DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            )
            if ids:
                total = ids[0]["n"]
            else:  # nothing found, or a page past the end
                total = self.count_invoices(filters) if offset else 0
        else:
            total = self._q1(f"SELECT COUNT(*) AS n FROM invoices {clause}", params)["n"]
            ids = self._q(
                f"SELECT id FROM invoices {clause} ORDER BY rowid DESC LIMIT ? OFFSET ?",
                [*params, limit, offset],
            )
        return [self._invoice(r["id"]) for r in ids], total  # type: ignore[misc]

    def count_invoices(self, filters: dict[str, Any]) -> int:
        where, params = self._filter_clause(filters)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        return self._q1(f"SELECT COUNT(*) AS n FROM invoices {clause}", params)["n"]

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
                f"SELECT invoices.rowid AS row_number, invoices.* FROM invoices {clause} ORDER BY invoices.rowid DESC LIMIT ? OFFSET ?",
                [*params, *([last] if last is not None else []), min(chunk, left), skip],
            )
            skip = 0
            if not rows:
                return
            hashes: dict[str, list[str]] = {r["id"]: [] for r in rows}
            marks = ",".join("?" * len(rows))
            for p in self._q(
                f"SELECT invoice_id, tx_hash FROM payments WHERE invoice_id IN ({marks}) AND status != 'reverted' "
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
            f"WHERE p.role = 'counted' AND p.status != 'reverted' AND p.invoice_id IN (SELECT invoices.id FROM invoices {clause})",
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

    def _chain_time(self, networks: Iterable[str]) -> int | None:
        """The invoice's clock: the earliest of its chains' processed-block times, so a lagging
        chain never lets an invoice expire while a payment on it may still be on time."""
        times = []
        for network in set(networks):
            row = self._q1("SELECT block_timestamp FROM cursors WHERE network = ?", [network])
            if row is None:
                return None
            times.append(row["block_timestamp"])
        return min(times) if times else None

    def _rejudge(
        self,
        invoice_id: str,
        *,
        created: bool = False,
        new_payments: Sequence[str] = (),
        reverted_payments: Sequence[str] = (),
        resolved: bool = False,
        session: bool = False,
    ) -> bool:
        """Judge the invoice again from all its payments; store it and emit what changed.

        `session`: a payment session has just started (finalize, checkout-session): a draft is
        judged as finalized, the version grows even if nothing else changed, and the invoice,
        if it is open for payment, reports `invoice.session_refreshed`."""
        row = self._q1("SELECT * FROM invoices WHERE id = ?", [invoice_id])
        assert row is not None
        payments = self._q(
            "SELECT p.*, o.amount_atomic AS option_amount FROM payments p JOIN payment_options o ON o.id = p.option_id "
            "WHERE p.invoice_id = ? ORDER BY p.block_timestamp, p.network, p.block_number, p.log_key, p.id",
            [invoice_id],
        )
        networks = [
            r["network"]
            for r in self._q(
                "SELECT DISTINCT network FROM payment_options WHERE invoice_id = ?", [invoice_id]
            )
        ]
        resolutions = tuple(
            Resolution(
                ExceptionType(r["exception_type"]),
                ResolutionAction(r["action"]),
                r["note"],
                r["resolved_at"],
                frozenset(r["payment_ids"]),
            )
            for r in orjson.loads(row["resolutions"])
        )
        facts = InvoiceFacts(
            amount=Decimal(row["amount"]),
            tolerance_percent=Decimal(row["tolerance_percent"]),
            payable_until=row["payable_until"],
            draft=row["status"] == InvoiceStatus.DRAFT and not session,
            cancelled=row["cancelled_at"] is not None,
            resolutions=resolutions,
        )
        judged = judge(
            facts,
            [
                PaymentFacts(
                    p["id"],
                    int(p["amount_atomic"]),
                    int(p["option_amount"]),
                    p["block_timestamp"],
                    PaymentStatus(p["status"]),
                    (p["block_timestamp"], p["network"], p["block_number"], p["log_key"]),
                )
                for p in payments
            ],
            chain_time=self._chain_time(networks),
        )
        for p in payments:
            role = judged.roles.get(p["id"])
            if role is not None and role != p["role"]:
                self.db.execute("UPDATE payments SET role = ? WHERE id = ?", [str(role), p["id"]])

        summary = orjson.dumps(judged.summary()).decode()
        exception = orjson.dumps(judged.exception.as_dict()).decode() if judged.exception else None
        old_status = row["status"]
        new_status = str(judged.status)
        changes: dict[str, Any] = {}
        if new_status != old_status:
            changes["status"] = new_status
        if summary != row["payment_summary"]:
            changes["payment_summary"] = summary
        if exception != row["exception"]:
            changes["exception"] = exception
            changes["exception_type"] = judged.exception.type.value if judged.exception else None
            changes["exception_status"] = judged.exception.status if judged.exception else None
        roles_changed = any(judged.roles.get(p["id"]) not in (None, p["role"]) for p in payments)
        open_now = [str(t) for t in judged.open_exceptions]
        newly_open = [t for t in open_now if t not in orjson.loads(row["open_exceptions"])]
        if open_now != orjson.loads(row["open_exceptions"]):
            changes["open_exceptions"] = orjson.dumps(open_now).decode()
        if not (
            changes or created or new_payments or reverted_payments or roles_changed or resolved or session
        ):
            return False

        now = self._now()
        fully_paid = judged.payment_state in (PaymentState.EXACT, PaymentState.OVERPAID)
        if (
            new_status in (InvoiceStatus.PAID, InvoiceStatus.CONFIRMED)
            and fully_paid
            and row["paid_at"] is None
        ):
            changes["paid_at"] = now
        if new_status == InvoiceStatus.CONFIRMED and row["confirmed_at"] is None:
            changes["confirmed_at"] = now
        if new_status in (InvoiceStatus.PENDING, InvoiceStatus.EXPIRED, InvoiceStatus.UNDERPAID):
            changes["paid_at"] = None
            changes["confirmed_at"] = None
        if new_status == InvoiceStatus.PAID:
            changes["confirmed_at"] = None
        if new_payments:
            changes["last_payment_observed_at"] = now
        changes["version"] = row["version"] + 1
        changes["updated_at"] = now
        sets = ", ".join(f"{k} = ?" for k in changes)
        self.db.execute(f"UPDATE invoices SET {sets} WHERE id = ?", [*changes.values(), invoice_id])

        # What the events carry (the status view): the invoice as just written and its payments
        # (with their new roles), not its options; built from the rows in hand, not read again.
        invoice = invoice_view(
            {**dict(row), **changes},
            [],
            [
                payment_view(
                    {**dict(p), "role": str(judged.roles.get(p["id"], p["role"]))},
                    self._tips.get(p["network"]),
                )
                for p in payments
            ],
        )
        by_id = {p["id"]: p for p in invoice["payments"]}
        if created:
            self.outbox.emit("invoice.created", invoice)
        if session and new_status == InvoiceStatus.PENDING:
            self.outbox.emit("invoice.session_refreshed", invoice)
        for pid in new_payments:
            self.outbox.emit("invoice.payment_detected", invoice, by_id.get(pid))
        for pid in reverted_payments:
            self.outbox.emit("invoice.payment_reverted", invoice, by_id.get(pid))
        if "status" in changes or created:
            event = {
                InvoiceStatus.PAID: "invoice.paid",
                InvoiceStatus.CONFIRMED: "invoice.confirmed",
                InvoiceStatus.EXPIRED: "invoice.expired",
                InvoiceStatus.UNDERPAID: "invoice.underpaid",
                InvoiceStatus.CANCELLED: "invoice.cancelled",
            }.get(InvoiceStatus(new_status))
            # (A zero-amount invoice, confirmed at creation or at finalize, was never "paid".)
            if (
                event == "invoice.confirmed"
                and old_status != InvoiceStatus.PAID
                and fully_paid
                and not (created or session)
            ):
                self.outbox.emit("invoice.paid", invoice)  # paid and confirmed in one step: say both
            if event is not None:
                self.outbox.emit(event, invoice)
        if resolved:
            self.outbox.emit("invoice.exception_resolved", invoice)
        if newly_open:  # one event per change, even if two exceptions open in it
            self.outbox.emit("invoice.exception_opened", invoice)
        return True

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
            row = self._q1("SELECT resolutions FROM invoices WHERE id = ?", [invoice_id])
            resolutions = orjson.loads(row["resolutions"])
            resolutions.append(
                {
                    "exception_type": kind.value,
                    "action": action.value,
                    "note": note,
                    "resolved_at": self._now(),
                    "payment_ids": sorted(payments_to_cover(kind, roles)),  # type: ignore[arg-type]
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
        return self._q1(
            "SELECT COUNT(*) AS n FROM payments WHERE invoice_id = ? AND status != 'reverted'", [invoice_id]
        )["n"]

    # ------------------------------------------------------------------ chain following

    @contextmanager
    def _tip_restored_on_failure(self, network: str) -> Iterator[None]:
        """The cached tip moves inside the transaction (event bodies need it); a rollback moves it back."""
        before = self._tips.get(network)
        try:
            yield
        except BaseException:
            if before is None:
                self._tips.pop(network, None)
            else:
                self._tips[network] = before
            raise

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
                "INSERT INTO chain_genesis(network, hash, recorded_at) VALUES (?, ?, ?) ON CONFLICT(network) DO NOTHING",
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
        cursor = self.db.execute(
            "SELECT rowid, id, rail, destination_address, token_contract, contract_call FROM payment_options "
            "WHERE network = ? AND rowid > ? ORDER BY rowid",
            [network, after_rowid],
        )
        while batch := cursor.fetchmany(10_000):
            yield from batch

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
        """
        result = ApplyResult()
        tip = blocks[-1]
        now = self._now()
        with self._tip_restored_on_failure(network), self.db.atomic():
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO chain_blocks(network, number, hash, parent_hash, timestamp) VALUES (?,?,?,?,?)",
                [(network, b.number, b.hash, b.parent_hash, b.timestamp) for b in blocks],
            )
            forget_through = (
                tip.number - BLOCK_WINDOW if keep_above is None else min(keep_above, tip.number - 1)
            )
            self.db.execute(
                "DELETE FROM chain_blocks WHERE network = ? AND number <= ?", [network, forget_through]
            )
            self.db.execute(
                "INSERT INTO cursors(network, block_number, block_hash, block_timestamp, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(network) DO UPDATE SET block_number = excluded.block_number, block_hash = excluded.block_hash, "
                "block_timestamp = excluded.block_timestamp, updated_at = excluded.updated_at",
                [network, tip.number, tip.hash, tip.timestamp, now],
            )
            self._tips[network] = tip.number

            touched: dict[str, list[str]] = {}
            for tx_hash, transfers in _by_transaction(matched).items():
                for payment_id, invoice_id in self._record_transaction(network, tx_hash, transfers, now):
                    touched.setdefault(invoice_id, []).append(payment_id)
                    result.payments_added += 1

            due = self._q(
                "SELECT id, invoice_id FROM payments WHERE network = ? AND status = 'detected' AND block_number <= ?",
                [network, confirmed_through],
            )
            if due:
                self.db.conn.executemany(
                    "UPDATE payments SET status = 'confirmed', confirmed_at = ? WHERE id = ?",
                    [(now, r["id"]) for r in due],
                )
                result.payments_confirmed = len(due)
            invoice_ids = (
                set(touched)
                | {r["invoice_id"] for r in due}
                | self._expiry_candidates(network, tip.timestamp)
            )
            events_before = self.outbox.event_count()
            for invoice_id in sorted(invoice_ids):
                if self._rejudge(invoice_id, new_payments=touched.get(invoice_id, ())):
                    result.invoices_changed += 1
            result.events = self.outbox.event_count() - events_before
        for listener in self.block_listeners:
            listener(network)
        return result

    def _expiry_candidates(self, network: str, chain_time: int) -> set[str]:
        return {
            r["invoice_id"]
            for r in self._q(
                "SELECT DISTINCT o.invoice_id FROM invoices i JOIN payment_options o ON o.invoice_id = i.id "
                "WHERE i.status = 'pending' AND i.payable_until < ? AND o.network = ?",
                [chain_time, network],
            )
        }

    def _record_transaction(
        self, network: str, tx_hash: str, transfers: Sequence[MatchedTransfer], now: str
    ) -> list[tuple[str, str]]:
        """Record what one transaction paid us; returns (payment id, invoice id) of each payment
        that is new or revived, in the transaction's order.

        A payment is what it moves (see `_identity`), not where its log sits: a transaction
        re-included after a reorg may land at another position and its logs get other
        indexes. So a transfer at a key a live payment of this transaction holds is already
        recorded; any other revives a reverted payment of the transaction that moved the same
        thing (the k-th such transfer, in log order, the k-th such payment, by its old key),
        taking its new block and log; what is left is a new payment. All transfers of a
        transaction are in one block, hence in one call."""
        rows = self._q(
            "SELECT id, invoice_id, status, log_key, option_id, asset, from_address, to_address, amount_atomic "
            "FROM payments WHERE network = ? AND tx_hash = ? ORDER BY log_key, id",
            [network, tx_hash],
        )
        live_keys = {r["log_key"] for r in rows if r["status"] != PaymentStatus.REVERTED}
        reverted: dict[tuple, list[sqlite3.Row]] = {}
        for r in rows:
            if r["status"] == PaymentStatus.REVERTED:
                key = (r["option_id"], r["asset"], r["from_address"], r["to_address"], r["amount_atomic"])
                reverted.setdefault(key, []).append(r)
        options: dict[str, sqlite3.Row] = {}
        recorded = []
        for m in sorted(transfers, key=lambda m: m.transfer.unique_key):
            t = m.transfer
            if t.unique_key in live_keys:
                continue
            option = options.get(m.option_id)
            if option is None:
                option = self._q1(
                    "SELECT invoice_id, asset, decimals FROM payment_options WHERE id = ?", [m.option_id]
                )
                if option is None:
                    raise LookupError(f"no payment option {m.option_id!r}")
                options[m.option_id] = option
            same = reverted.get(_identity(m, option["asset"]))
            if same:
                recorded.append(self._revive_payment(same.pop(0), m, now))
            else:
                recorded.append(self._insert_payment(network, m, option, now))
            live_keys.add(t.unique_key)
        return recorded

    def _revive_payment(self, row: sqlite3.Row, m: MatchedTransfer, now: str) -> tuple[str, str]:
        """A reverted payment back on the canonical chain, where it now is."""
        t = m.transfer
        self.db.execute(
            "UPDATE payments SET status = 'detected', block_number = ?, block_hash = ?, block_timestamp = ?, "
            "log_index = ?, log_key = ?, confirmed_at = NULL, observed_at = ? WHERE id = ?",
            [t.block_number, t.block_hash, m.block_timestamp, t.log_index, t.unique_key, now, row["id"]],
        )
        return row["id"], row["invoice_id"]

    def _insert_payment(
        self, network: str, m: MatchedTransfer, option: sqlite3.Row, now: str
    ) -> tuple[str, str]:
        t = m.transfer
        payment_id = new_id("pay", int(self.clock() * 1000))
        # Plain SQL: the hot path of a busy chain (sqlite-utils' insert looks the table up each time).
        self.db.execute(
            "INSERT INTO payments(id, network, tx_hash, log_index, log_key, invoice_id, option_id, asset, decimals, "
            "block_number, block_hash, block_timestamp, from_address, to_address, amount_atomic, status, role, "
            "observed_at, confirmed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?, 'detected', 'counted', ?, NULL)",
            [
                payment_id,
                network,
                t.tx_hash,
                t.log_index,
                t.unique_key,
                option["invoice_id"],
                m.option_id,
                option["asset"],
                option["decimals"],
                t.block_number,
                t.block_hash,
                m.block_timestamp,
                t.from_address,
                t.to_address,
                str(t.amount),
                now,
            ],
        )
        self._add_search_text(option["invoice_id"], [t.tx_hash, t.from_address])
        return payment_id, option["invoice_id"]

    def revert_to(self, network: str, ancestor: BlockRef) -> list[str]:
        """Undo everything above `ancestor` after a reorg.

        Payments in orphaned blocks are marked reverted and their invoices judged again.
        Returns the reverted payment ids.
        """
        floor = ancestor.number
        with self._tip_restored_on_failure(network), self.db.atomic():
            orphaned = self._q(
                "SELECT id, invoice_id FROM payments WHERE network = ? AND block_number > ? AND status != 'reverted'",
                [network, floor],
            )
            self.db.conn.executemany(
                "UPDATE payments SET status = 'reverted', confirmed_at = NULL WHERE id = ?",
                [(r["id"],) for r in orphaned],
            )
            self.db.execute("DELETE FROM chain_blocks WHERE network = ? AND number > ?", [network, floor])
            self.db.execute(
                "INSERT OR REPLACE INTO chain_blocks(network, number, hash, parent_hash, timestamp) VALUES (?,?,?,?,?)",
                [network, ancestor.number, ancestor.hash, ancestor.parent_hash, ancestor.timestamp],
            )
            self.db.execute(
                "UPDATE cursors SET block_number = ?, block_hash = ?, block_timestamp = ?, updated_at = ? WHERE network = ?",
                [ancestor.number, ancestor.hash, ancestor.timestamp, self._now(), network],
            )
            self._tips[network] = ancestor.number
            by_invoice: dict[str, list[str]] = {}
            for r in orphaned:
                by_invoice.setdefault(r["invoice_id"], []).append(r["id"])
            for invoice_id, ids in sorted(by_invoice.items()):
                self._rejudge(invoice_id, reverted_payments=ids)
            return [r["id"] for r in orphaned]

    def expire_due(self) -> int:
        """Judge again the open invoices whose deadline has passed in their chains' time."""
        changed = 0
        with self.db.atomic():
            rows = self._q(
                "SELECT i.id FROM invoices i WHERE i.status = 'pending' AND i.payable_until IS NOT NULL "
                "AND i.payable_until < (SELECT COALESCE(MAX(block_timestamp), 0) FROM cursors)"
            )
            for r in rows:
                changed += self._rejudge(r["id"])
        return changed
