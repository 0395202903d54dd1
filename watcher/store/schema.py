"""The database layout, as sqlite-utils migrations: each runs once, in a transaction."""

from __future__ import annotations

import json
import re

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

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
            open_exceptions TEXT NOT NULL DEFAULT '[]',
            resolutions TEXT NOT NULL DEFAULT '[]',
            request TEXT NOT NULL,
            version INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            paid_at TEXT, confirmed_at TEXT, cancelled_at TEXT, last_payment_observed_at TEXT,
            -- The list's free-text search: casefolded text of the invoice, its options' deposit
            -- addresses and its payments' hashes and payers, each piece after a U+001F (core.py).
            search_text TEXT NOT NULL DEFAULT ''
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
        CREATE INDEX deliveries_invoice ON deliveries(invoice_id);
        CREATE INDEX deliveries_type ON deliveries(event_type);

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


@migrations()
def m002_delivery_requeues(db: Database) -> None:
    # Counts redeliveries, so an attempt in flight when the operator re-queued its delivery
    # can tell (its attempt count alone may match: both 0) and leaves the new schedule alone.
    db.execute("ALTER TABLE deliveries ADD COLUMN requeues INTEGER NOT NULL DEFAULT 0")


@migrations()
def m003_checkout_fields(db: Database) -> None:
    # The hosted payment page (issue 11): where it sends the payer when done, and when the
    # invoice last changed (every version bump); older invoices changed last at creation, as
    # far as anyone can tell now.
    db.execute("ALTER TABLE invoices ADD COLUMN redirect_url TEXT")
    db.execute("ALTER TABLE invoices ADD COLUMN updated_at TEXT")
    db.execute("UPDATE invoices SET updated_at = created_at")


@migrations()
def m004_delivery_lanes(db: Database) -> None:
    # Each webhook endpoint has its own queue: its due deliveries are read by url, so one
    # endpoint's backlog is never scanned to find another's.
    db.execute("CREATE INDEX deliveries_endpoint_due ON deliveries(url, status, next_attempt_at)")


# The table-level constraint m001 put on `payments`; m005 replaces it with a partial index.
_PAYMENT_KEY_CONSTRAINT = re.compile(
    r",\s*UNIQUE\s*\(\s*network\s*,\s*tx_hash\s*,\s*log_key\s*\)", re.IGNORECASE
)


@migrations()
def m005_payment_identity(db: Database) -> None:
    # A re-included transaction's logs may move (another log lands before them), so a revived
    # payment takes a new log key that a reverted row of the same transaction may still hold:
    # only live rows need a unique (network, tx, log key). SQLite cannot drop a table
    # constraint, so the table is rebuilt from its own stored definition (keeping any column
    # added since m001) with its rows and its other indexes. Nothing references `payments`.
    table_sql = db.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'payments'"
    ).fetchone()[0]
    new_sql, found = _PAYMENT_KEY_CONSTRAINT.subn("", table_sql)
    if found != 1:
        raise RuntimeError(f"m005_payment_identity: unexpected payments table: {table_sql}")
    indexes = [
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'payments' AND sql IS NOT NULL"
        )
    ]
    db.execute(re.sub(r"^CREATE TABLE\s+\"?payments\"?", "CREATE TABLE payments_rebuilt", new_sql, count=1))
    db.execute("INSERT INTO payments_rebuilt SELECT * FROM payments")
    db.execute("DROP TABLE payments")
    db.execute("ALTER TABLE payments_rebuilt RENAME TO payments")
    for sql in indexes:
        db.execute(sql)
    db.execute(
        "CREATE UNIQUE INDEX payments_live_log ON payments(network, tx_hash, log_key) "
        "WHERE status != 'reverted'"
    )


@migrations()
def m006_chain_genesis(db: Database) -> None:
    # Each chain's block 0, recorded the first time it is followed: a node whose genesis differs
    # serves another chain under the same chain id (a reset test chain, another network).
    db.execute(
        "CREATE TABLE chain_genesis (network TEXT PRIMARY KEY, hash TEXT NOT NULL, recorded_at TEXT NOT NULL)"
    )


@migrations()
def m007_retention_indexes(db: Database) -> None:
    # Retention (issue 10): each prune reads its oldest rows by time, and removes an event's
    # deliveries' attempts by delivery; closed invoices are walked in the order they changed.
    for sql in (
        "CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at)",
        "CREATE INDEX events_created ON events(created_at)",
        "CREATE INDEX delivery_attempts_delivery ON delivery_attempts(delivery_id)",
        "CREATE INDEX invoices_updated ON invoices(updated_at)",
    ):
        db.execute(sql)


def _option_time(option_id: str, fallback: str) -> str:
    """When an option was made, from its id (a ULID: milliseconds in its first 10 characters),
    or `fallback` for an id that is not one."""
    from ..domain import rfc3339

    crockford = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    digits = option_id.partition("_")[2][:10]
    if len(digits) != 10 or any(c not in crockford for c in digits):
        return fallback
    millis = 0
    for char in digits:
        millis = millis * 32 + crockford.index(char)
    return rfc3339(millis / 1000) or fallback


@migrations()
def m008_live_rates(db: Database) -> None:
    # Live prices (issue 14): each option records where its quote came from and when it was
    # made. Older options were quoted from the request's quote_rates when the invoice's stored
    # request names their asset, else from the configured usd_rate; the time is in their id.
    db.execute("ALTER TABLE payment_options ADD COLUMN quote_source TEXT NOT NULL DEFAULT 'config'")
    db.execute("ALTER TABLE payment_options ADD COLUMN quoted_at TEXT")
    rows = db.execute(
        "SELECT o.id, o.network, o.asset, i.request, i.created_at "
        "FROM payment_options o JOIN invoices i ON i.id = o.invoice_id"
    ).fetchall()
    for option_id, network, asset, request, created_at in rows:
        named = {k.lower() for k in (json.loads(request).get("quote_rates") or {})}
        source = "request" if {asset.lower(), f"{network}:{asset}".lower()} & named else "config"
        db.execute(
            "UPDATE payment_options SET quote_source = ?, quoted_at = ? WHERE id = ?",
            [source, _option_time(option_id, created_at), option_id],
        )


@migrations()
def m009_shared_statuses(db: Database) -> None:
    # Throughput (issue 13): the events of one invoice's change share its status view, stored
    # once. A new event's `body` holds only its payment JSON, and the whole body is put back
    # together on reading (`outbox.stored_body`); older events keep their whole body, with no
    # status_id.
    db.execute("CREATE TABLE event_statuses (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    db.execute("ALTER TABLE events ADD COLUMN status_id INTEGER REFERENCES event_statuses(id)")
    db.execute("CREATE INDEX events_status ON events(status_id)")


@migrations()
def m010_endpoint_cursors(db: Database) -> None:
    # Throughput (issue 13): a step writes its events and nothing per endpoint. Each configured
    # webhook endpoint reads the events as a queue from its cursor: the events past `after_seq`
    # that it wants (`events`: '*' or ',type,type,') are its deliveries not yet queued, and the
    # dispatcher queues them (a `deliveries` row each) before it sends them (outbox.py). The
    # endpoints are written when the daemon starts and reloads; one new to the table starts at
    # the newest event, as a delivery was queued then only for the endpoints configured. A
    # database from before keeps its deliveries as they are: every event it holds was queued
    # when it was appended.
    db.execute(
        "CREATE TABLE webhook_endpoints (id INTEGER PRIMARY KEY AUTOINCREMENT, url TEXT NOT NULL UNIQUE, "
        "events TEXT NOT NULL, after_seq INTEGER NOT NULL)"
    )


@migrations()
def m011_option_checksums(db: Database) -> None:
    # Throughput (issue 13): an option keeps its destination's EIP-55 form, computed once when it
    # is made, and a step renders its payments' recipients from it instead of hashing each new
    # address again (a keccak, 5-10 us a payment). Options from before keep NULL and are
    # checksummed as they were, when rendered.
    db.execute("ALTER TABLE payment_options ADD COLUMN destination_checksum TEXT")
