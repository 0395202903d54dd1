"""The SQLite store: invoices, options, payments, chain cursors and the webhook outbox.

Every public method that writes is one `db.atomic()`: payments, the invoices they change
(re-judged from scratch) and the events that report the change commit together, so after
a crash the state and its events always agree. Atomic amounts are TEXT: they are uint256.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import orjson
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from .domain import (
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
    Transfer,
    judge,
    new_id,
    payments_to_cover,
    rfc3339,
)
from .views import invoice_view, payment_view, status_view

BLOCK_WINDOW = 256  # recent canonical blocks kept to find a reorg's common ancestor

migrations = Migrations("watcher")


@migrations()
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE invoices (
            id TEXT PRIMARY KEY,
            status TEXT NOT NULL,
            amount TEXT NOT NULL,
            currency TEXT NOT NULL,
            product_name TEXT, issued_by TEXT, bill_to TEXT, merchant_reference TEXT,
            customer_id TEXT, customer_email TEXT,
            metadata TEXT NOT NULL,
            tolerance_percent TEXT NOT NULL,
            payment_timing TEXT NOT NULL,
            payable_until INTEGER,
            payment_summary TEXT NOT NULL,
            exception TEXT,
            exception_type TEXT, exception_status TEXT,
            resolutions TEXT NOT NULL DEFAULT '[]',
            request TEXT NOT NULL,
            version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            paid_at TEXT, confirmed_at TEXT, cancelled_at TEXT, last_payment_observed_at TEXT
        );
        CREATE INDEX invoices_status ON invoices(status, payable_until);
        CREATE INDEX invoices_reference ON invoices(merchant_reference);
        CREATE INDEX invoices_customer ON invoices(customer_id);
        CREATE INDEX invoices_email ON invoices(customer_email);
        CREATE INDEX invoices_exception ON invoices(exception_type, exception_status);

        CREATE TABLE payment_options (
            id TEXT PRIMARY KEY,
            invoice_id TEXT NOT NULL REFERENCES invoices(id),
            position INTEGER NOT NULL,
            active INTEGER NOT NULL DEFAULT 1,
            rail TEXT NOT NULL,
            network TEXT NOT NULL,
            chain_id INTEGER NOT NULL,
            asset TEXT NOT NULL,
            token_contract TEXT,
            decimals INTEGER NOT NULL,
            quoted_amount TEXT NOT NULL,
            quote_rate TEXT NOT NULL,
            amount_atomic TEXT NOT NULL,
            destination_address TEXT NOT NULL,
            derivation_index INTEGER,
            payment_uri TEXT NOT NULL,
            required_confirmations INTEGER NOT NULL,
            contract_call TEXT
        );
        CREATE INDEX options_invoice ON payment_options(invoice_id, position);
        CREATE UNIQUE INDEX options_address ON payment_options(network, destination_address)
            WHERE rail = 'address';

        CREATE TABLE derivation_counters (
            xpub TEXT PRIMARY KEY,
            next_index INTEGER NOT NULL
        );

        CREATE TABLE payments (
            id TEXT PRIMARY KEY,
            network TEXT NOT NULL,
            tx_hash TEXT NOT NULL,
            log_index INTEGER,
            log_key INTEGER NOT NULL,
            invoice_id TEXT NOT NULL REFERENCES invoices(id),
            option_id TEXT NOT NULL REFERENCES payment_options(id),
            asset TEXT NOT NULL,
            decimals INTEGER NOT NULL,
            block_number INTEGER NOT NULL,
            block_hash TEXT NOT NULL,
            block_timestamp INTEGER NOT NULL,
            from_address TEXT NOT NULL,
            to_address TEXT NOT NULL,
            amount_atomic TEXT NOT NULL,
            status TEXT NOT NULL,
            role TEXT NOT NULL,
            observed_at TEXT NOT NULL,
            confirmed_at TEXT,
            UNIQUE (network, tx_hash, log_key)
        );
        CREATE INDEX payments_invoice ON payments(invoice_id);
        CREATE INDEX payments_unconfirmed ON payments(network, status, block_number);
        CREATE INDEX payments_tx ON payments(tx_hash);

        CREATE TABLE chain_blocks (
            network TEXT NOT NULL,
            number INTEGER NOT NULL,
            hash TEXT NOT NULL,
            parent_hash TEXT NOT NULL,
            timestamp INTEGER NOT NULL,
            PRIMARY KEY (network, number)
        );

        CREATE TABLE cursors (
            network TEXT PRIMARY KEY,
            block_number INTEGER NOT NULL,
            block_hash TEXT NOT NULL,
            block_timestamp INTEGER NOT NULL,
            updated_at TEXT NOT NULL
        );

        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            type TEXT NOT NULL,
            invoice_id TEXT NOT NULL,
            created_at TEXT NOT NULL,
            body BLOB NOT NULL
        );
        CREATE INDEX events_invoice ON events(invoice_id);

        CREATE TABLE deliveries (
            id TEXT PRIMARY KEY,
            event_id TEXT NOT NULL REFERENCES events(id),
            event_type TEXT NOT NULL,
            invoice_id TEXT NOT NULL,
            url TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_at REAL,
            last_status_code INTEGER,
            last_error TEXT,
            delivered_at TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (event_id, url)
        );
        CREATE INDEX deliveries_due ON deliveries(status, next_attempt_at);

        CREATE TABLE delivery_attempts (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            delivery_id TEXT NOT NULL REFERENCES deliveries(id),
            attempt INTEGER NOT NULL,
            at TEXT NOT NULL,
            status_code INTEGER,
            error TEXT,
            duration_ms REAL NOT NULL
        );

        CREATE TABLE idempotency_keys (
            key TEXT PRIMARY KEY,
            request_hash TEXT NOT NULL,
            invoice_id TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        """
    )


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class OptionSpec:
    """A payment option to build; the store gives it its id and, for the address rail, an address."""

    rail: str
    network: str
    chain_id: int
    asset: str
    token_contract: str | None
    decimals: int
    quoted_amount: str
    quote_rate: str
    amount_atomic: int
    required_confirmations: int
    xpub: str | None = None  # address rail: derive the destination from this
    destination: str | None = None  # contract rail: the merchant address


@dataclass(frozen=True)
class NewInvoice:
    amount: Decimal
    currency: str
    fields: dict[str, Any]  # product_name, issued_by, bill_to, merchant_reference, customer_*
    metadata: dict[str, Any]
    tolerance_percent: Decimal
    payment_timing: dict[str, Any]  # with payable_until / due_at filled for a non-draft
    payable_until: int | None
    draft: bool
    request: dict[str, Any]  # the options request (assets, rails, quote_rates) kept for finalize
    options: list[OptionSpec] = field(default_factory=list)


@dataclass(frozen=True)
class MatchedTransfer:
    """A transfer the follower found to one of our options."""

    transfer: Transfer
    option_id: str
    block_timestamp: int


@dataclass(frozen=True)
class Endpoint:
    url: str
    events: tuple[str, ...]

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


@dataclass
class ApplyResult:
    payments_added: int = 0
    payments_confirmed: int = 0
    invoices_changed: int = 0
    events: int = 0


class IdempotencyConflict(Exception):
    """The same Idempotency-Key came with another body."""


class StateConflict(Exception):
    """The invoice is not in a state that allows the change."""


# Derives an address from (xpub, index); builds a payment URI / contract call for an option.
Deriver = Callable[[str, int], str]
OptionFinisher = Callable[[OptionSpec, str, str, str], tuple[str, dict | None]]


class Store:
    def __init__(self, path: str | Path, *, clock: Callable[[], float]) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        self.db = Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        migrations.apply(self.db)
        self.clock = clock
        self.endpoints: tuple[Endpoint, ...] = ()
        # Called when a delivery is queued, so the dispatcher wakes at once instead of polling.
        self.on_delivery_queued: Callable[[], None] | None = None
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

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        self.endpoints = tuple(endpoints)

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
                seen = self._q1("SELECT request_hash, invoice_id FROM idempotency_keys WHERE key = ?", [idempotency_key])
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
                    **{k: new.fields.get(k) for k in (
                        "product_name", "issued_by", "bill_to", "merchant_reference", "customer_id", "customer_email")},
                    "metadata": orjson.dumps(new.metadata).decode(),
                    "tolerance_percent": format(new.tolerance_percent, "f"),
                    "payment_timing": orjson.dumps(new.payment_timing).decode(),
                    "payable_until": new.payable_until,
                    "payment_summary": "{}",
                    "request": orjson.dumps(new.request).decode(),
                    "version": 0,
                    "created_at": now,
                }
            )
            self._insert_options(invoice_id, new.options, derive, finish)
            if idempotency_key is not None:
                self.db["idempotency_keys"].insert(
                    {"key": idempotency_key, "request_hash": request_hash, "invoice_id": invoice_id, "created_at": now}
                )
            self._rejudge(invoice_id, created=True)
            return self._invoice(invoice_id), True

    def _insert_options(self, invoice_id: str, specs: list[OptionSpec], derive: Deriver, finish: OptionFinisher) -> None:
        start = (self._q1("SELECT COALESCE(MAX(position), -1) AS p FROM payment_options WHERE invoice_id = ?", [invoice_id])["p"]) + 1
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
            "SELECT * FROM payment_options WHERE invoice_id = ? AND active = 1 ORDER BY position", [invoice_id]
        )
        return invoice_view(row, options, self._payments(invoice_id))

    def list_invoices(self, filters: dict[str, Any], limit: int, offset: int) -> tuple[list[dict], int]:
        where, params = [], []
        for column in ("status", "merchant_reference", "customer_id", "customer_email", "exception_type", "exception_status"):
            if filters.get(column) is not None:
                where.append(f"{column} = ?")
                params.append(filters[column])
        if filters.get("transaction_hash"):
            where.append("id IN (SELECT invoice_id FROM payments WHERE tx_hash = ?)")
            params.append(filters["transaction_hash"].lower())
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        total = self._q1(f"SELECT COUNT(*) AS n FROM invoices {clause}", params)["n"]
        ids = self._q(f"SELECT id FROM invoices {clause} ORDER BY rowid DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        return [self._invoice(r["id"]) for r in ids], total  # type: ignore[misc]

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
        force_version: bool = False,
    ) -> bool:
        """Judge the invoice again from all its payments; store it and emit what changed."""
        row = self._q1("SELECT * FROM invoices WHERE id = ?", [invoice_id])
        assert row is not None
        payments = self._q("SELECT p.*, o.amount_atomic AS option_amount FROM payments p JOIN payment_options o ON o.id = p.option_id WHERE p.invoice_id = ?", [invoice_id])
        networks = [r["network"] for r in self._q("SELECT DISTINCT network FROM payment_options WHERE invoice_id = ?", [invoice_id])]
        resolutions = tuple(
            Resolution(
                ExceptionType(r["exception_type"]), ResolutionAction(r["action"]), r["note"], r["resolved_at"],
                frozenset(r["payment_ids"]),
            )
            for r in orjson.loads(row["resolutions"])
        )
        facts = InvoiceFacts(
            amount=Decimal(row["amount"]),
            tolerance_percent=Decimal(row["tolerance_percent"]),
            payable_until=row["payable_until"],
            draft=row["status"] == InvoiceStatus.DRAFT,
            cancelled=row["cancelled_at"] is not None,
            resolutions=resolutions,
        )
        judged = judge(
            facts,
            [
                PaymentFacts(
                    p["id"], int(p["amount_atomic"]), int(p["option_amount"]), p["block_timestamp"],
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
        if not (changes or created or new_payments or reverted_payments or roles_changed or force_version):
            return False

        now = self._now()
        fully_paid = judged.payment_state in (PaymentState.EXACT, PaymentState.OVERPAID)
        if new_status in (InvoiceStatus.PAID, InvoiceStatus.CONFIRMED) and fully_paid and row["paid_at"] is None:
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
        sets = ", ".join(f"{k} = ?" for k in changes)
        self.db.execute(f"UPDATE invoices SET {sets} WHERE id = ?", [*changes.values(), invoice_id])

        invoice = self._invoice(invoice_id)
        assert invoice is not None
        by_id = {p["id"]: p for p in invoice["payments"]}
        if created:
            self._emit("invoice.created", invoice)
        for pid in new_payments:
            self._emit("invoice.payment_detected", invoice, by_id.get(pid))
        for pid in reverted_payments:
            self._emit("invoice.payment_reverted", invoice, by_id.get(pid))
        if "status" in changes or created:
            event = {
                InvoiceStatus.PAID: "invoice.paid",
                InvoiceStatus.CONFIRMED: "invoice.confirmed",
                InvoiceStatus.EXPIRED: "invoice.expired",
                InvoiceStatus.UNDERPAID: "invoice.underpaid",
                InvoiceStatus.CANCELLED: "invoice.cancelled",
            }.get(InvoiceStatus(new_status))
            if event == "invoice.confirmed" and old_status != InvoiceStatus.PAID and fully_paid and not created:
                self._emit("invoice.paid", invoice)  # paid and confirmed in one step: say both
            if event is not None:
                self._emit(event, invoice)
        old_exc = orjson.loads(row["exception"]) if row["exception"] else None
        new_exc = judged.exception.as_dict() if judged.exception else None
        if new_exc != old_exc and new_exc is not None:
            if new_exc["status"] == "open" and (old_exc is None or old_exc["status"] != "open" or old_exc["type"] != new_exc["type"]):
                self._emit("invoice.exception_opened", invoice)
            elif new_exc["status"] == "resolved" and old_exc is not None and old_exc["status"] == "open":
                self._emit("invoice.exception_resolved", invoice)
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
            self.db.execute("UPDATE invoices SET resolutions = ? WHERE id = ?", [orjson.dumps(resolutions).decode(), invoice_id])
            self._rejudge(invoice_id, force_version=True)
            return self._invoice(invoice_id)

    # ------------------------------------------------------------------ chain following

    def cursor(self, network: str) -> BlockRef | None:
        row = self._q1("SELECT * FROM cursors WHERE network = ?", [network])
        if row is None:
            return None
        block = self._q1("SELECT parent_hash FROM chain_blocks WHERE network = ? AND number = ?", [network, row["block_number"]])
        return BlockRef(row["block_number"], row["block_hash"], block["parent_hash"] if block else "", row["block_timestamp"])

    def recent_blocks(self, network: str) -> list[BlockRef]:
        """The stored canonical window, newest first."""
        return [
            BlockRef(r["number"], r["hash"], r["parent_hash"], r["timestamp"])
            for r in self._q("SELECT * FROM chain_blocks WHERE network = ? ORDER BY number DESC", [network])
        ]

    def watch_entries(self, network: str, after_rowid: int = 0) -> list[sqlite3.Row]:
        """Address-rail options on a network, in creation order; the follower keeps them in memory."""
        return self._q(
            "SELECT rowid, id, destination_address, token_contract FROM payment_options "
            "WHERE network = ? AND rail = 'address' AND rowid > ? ORDER BY rowid",
            [network, after_rowid],
        )

    def apply_blocks(
        self,
        network: str,
        blocks: Sequence[BlockRef],
        matched: Sequence[MatchedTransfer],
        *,
        confirmed_through: int,
    ) -> ApplyResult:
        """Record a range of canonical blocks in one transaction.

        `blocks` are the headers of the range (its last one becomes the checkpoint);
        `confirmed_through` is the highest block whose payments count as confirmed.
        """
        result = ApplyResult()
        tip = blocks[-1]
        now = self._now()
        with self.db.atomic():
            self.db.conn.executemany(
                "INSERT OR REPLACE INTO chain_blocks(network, number, hash, parent_hash, timestamp) VALUES (?,?,?,?,?)",
                [(network, b.number, b.hash, b.parent_hash, b.timestamp) for b in blocks],
            )
            self.db.execute("DELETE FROM chain_blocks WHERE network = ? AND number <= ?", [network, tip.number - BLOCK_WINDOW])
            self.db.execute(
                "INSERT INTO cursors(network, block_number, block_hash, block_timestamp, updated_at) VALUES (?,?,?,?,?) "
                "ON CONFLICT(network) DO UPDATE SET block_number = excluded.block_number, block_hash = excluded.block_hash, "
                "block_timestamp = excluded.block_timestamp, updated_at = excluded.updated_at",
                [network, tip.number, tip.hash, tip.timestamp, now],
            )
            self._tips[network] = tip.number

            touched: dict[str, list[str]] = {}
            for m in matched:
                payment_id = self._record_payment(network, m, now)
                if payment_id is not None:
                    invoice_id = self._q1("SELECT invoice_id FROM payments WHERE id = ?", [payment_id])["invoice_id"]
                    touched.setdefault(invoice_id, []).append(payment_id)
                    result.payments_added += 1

            due = self._q(
                "SELECT id, invoice_id FROM payments WHERE network = ? AND status = 'detected' AND block_number <= ?",
                [network, confirmed_through],
            )
            if due:
                self.db.conn.executemany(
                    "UPDATE payments SET status = 'confirmed', confirmed_at = ? WHERE id = ?", [(now, r["id"]) for r in due]
                )
                result.payments_confirmed = len(due)
            invoice_ids = set(touched) | {r["invoice_id"] for r in due} | self._expiry_candidates(network, tip.timestamp)
            events_before = self._event_count()
            for invoice_id in sorted(invoice_ids):
                if self._rejudge(invoice_id, new_payments=touched.get(invoice_id, ())):
                    result.invoices_changed += 1
            result.events = self._event_count() - events_before
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

    def _record_payment(self, network: str, m: MatchedTransfer, now: str) -> str | None:
        """Insert a payment once per (chain, tx, log); a reverted one seen again is detected again.

        Returns the payment id when it is new or revived, None when it was already live.
        """
        t = m.transfer
        log_key = t.log_index if t.log_index is not None else -1
        existing = self._q1(
            "SELECT id, status FROM payments WHERE network = ? AND tx_hash = ? AND log_key = ?", [network, t.tx_hash, log_key]
        )
        if existing is not None:
            if existing["status"] != PaymentStatus.REVERTED:
                return None
            self.db.execute(
                "UPDATE payments SET status = 'detected', block_number = ?, block_hash = ?, block_timestamp = ?, "
                "confirmed_at = NULL, observed_at = ? WHERE id = ?",
                [t.block_number, t.block_hash, m.block_timestamp, now, existing["id"]],
            )
            return existing["id"]
        option = self._q1("SELECT invoice_id, asset, decimals FROM payment_options WHERE id = ?", [m.option_id])
        payment_id = new_id("pay", int(self.clock() * 1000))
        self.db["payments"].insert(
            {
                "id": payment_id,
                "network": network,
                "tx_hash": t.tx_hash,
                "log_index": t.log_index,
                "log_key": log_key,
                "invoice_id": option["invoice_id"],
                "option_id": m.option_id,
                "asset": option["asset"],
                "decimals": option["decimals"],
                "block_number": t.block_number,
                "block_hash": t.block_hash,
                "block_timestamp": m.block_timestamp,
                "from_address": t.from_address,
                "to_address": t.to_address,
                "amount_atomic": str(t.amount),
                "status": "detected",
                "role": "counted",
                "observed_at": now,
                "confirmed_at": None,
            }
        )
        return payment_id

    def revert_to(self, network: str, ancestor: BlockRef | None) -> list[str]:
        """Undo everything above `ancestor` (None: forget the whole window) after a reorg.

        Payments in orphaned blocks are marked reverted and their invoices judged again.
        Returns the reverted payment ids.
        """
        floor = ancestor.number if ancestor else -1
        with self.db.atomic():
            orphaned = self._q(
                "SELECT id, invoice_id FROM payments WHERE network = ? AND block_number > ? AND status != 'reverted'",
                [network, floor],
            )
            self.db.conn.executemany(
                "UPDATE payments SET status = 'reverted', confirmed_at = NULL WHERE id = ?", [(r["id"],) for r in orphaned]
            )
            self.db.execute("DELETE FROM chain_blocks WHERE network = ? AND number > ?", [network, floor])
            if ancestor is None:
                self.db.execute("DELETE FROM cursors WHERE network = ?", [network])
                self._tips.pop(network, None)
            else:
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

    # ------------------------------------------------------------------ outbox

    def _event_count(self) -> int:
        return self._q1("SELECT COALESCE(MAX(seq), 0) AS n FROM events")["n"]

    def _emit(self, event_type: str, invoice: dict, payment: dict | None = None) -> None:
        now_s = self.clock()
        event_id = new_id("evt", int(now_s * 1000))
        created_at = rfc3339(now_s)
        body = orjson.dumps(
            {
                "id": event_id,
                "type": event_type,
                "created_at": created_at,
                "data": {"invoice": status_view(invoice), "payment": payment},
            }
        )
        self.db.execute(
            "INSERT INTO events(id, type, invoice_id, created_at, body) VALUES (?,?,?,?,?)",
            [event_id, event_type, invoice["id"], created_at, body],
        )
        for endpoint in self.endpoints:
            if endpoint.wants(event_type):
                self.db.execute(
                    "INSERT INTO deliveries(id, event_id, event_type, invoice_id, url, status, attempts, next_attempt_at, created_at) "
                    "VALUES (?,?,?,?,?, 'pending', 0, ?, ?)",
                    [new_id("dlv", int(now_s * 1000)), event_id, event_type, invoice["id"], endpoint.url, now_s, created_at],
                )
                if self.on_delivery_queued is not None:
                    self.on_delivery_queued()

    def events_for(self, invoice_id: str) -> list[dict]:
        return [
            {"id": r["id"], "type": r["type"], "body": bytes(r["body"])}
            for r in self._q("SELECT * FROM events WHERE invoice_id = ? ORDER BY seq", [invoice_id])
        ]

    def due_deliveries(self, now: float, limit: int = 100) -> list[dict]:
        rows = self._q(
            "SELECT d.id, d.event_id, d.url, d.attempts, e.body FROM deliveries d JOIN events e ON e.id = d.event_id "
            "WHERE d.status = 'pending' AND d.next_attempt_at <= ? ORDER BY d.next_attempt_at LIMIT ?",
            [now, limit],
        )
        return [dict(r) | {"body": bytes(r["body"])} for r in rows]

    def next_delivery_at(self) -> float | None:
        row = self._q1("SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE status = 'pending'")
        return row["t"] if row else None

    def record_attempt(
        self,
        delivery_id: str,
        *,
        ok: bool,
        status_code: int | None,
        error: str | None,
        duration_ms: float,
        next_attempt_at: float | None,
    ) -> None:
        """One attempt, as it went; `next_attempt_at` None after a failure means give up."""
        now = self._now()
        with self.db.atomic():
            row = self._q1("SELECT attempts FROM deliveries WHERE id = ?", [delivery_id])
            attempt = row["attempts"] + 1
            self.db.execute(
                "INSERT INTO delivery_attempts(delivery_id, attempt, at, status_code, error, duration_ms) VALUES (?,?,?,?,?,?)",
                [delivery_id, attempt, now, status_code, error, duration_ms],
            )
            status = "delivered" if ok else ("pending" if next_attempt_at is not None else "failed")
            self.db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, last_status_code = ?, last_error = ?, "
                "next_attempt_at = ?, delivered_at = ? WHERE id = ?",
                [status, attempt, status_code, error, None if ok else next_attempt_at, now if ok else None, delivery_id],
            )

    def list_deliveries(self, filters: dict[str, Any], limit: int, offset: int) -> tuple[list[dict], int]:
        where, params = [], []
        for column in ("status", "event_type", "invoice_id"):
            if filters.get(column) is not None:
                where.append(f"{column} = ?")
                params.append(filters[column])
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        total = self._q1(f"SELECT COUNT(*) AS n FROM deliveries {clause}", params)["n"]
        rows = self._q(f"SELECT * FROM deliveries {clause} ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        return [
            {
                "id": r["id"], "event_id": r["event_id"], "event_type": r["event_type"], "invoice_id": r["invoice_id"],
                "url": r["url"], "status": r["status"], "attempts": r["attempts"],
                "last_status_code": r["last_status_code"], "last_error": r["last_error"],
                "next_attempt_at": rfc3339(r["next_attempt_at"]), "delivered_at": r["delivered_at"],
            }
            for r in rows
        ], total
