"""Judging invoices again after a change, many at once.

A follower step can touch thousands of invoices. Each is judged from scratch from all of its
payments (`domain.judge`, pure), but what it reads comes in one query per table for the whole
set, what changed is written with one `executemany` per table (the invoices' per set of
columns changed), and the status each event carries is rendered once per invoice and shared by
all of that invoice's events.
"""

from __future__ import annotations

import gc
import sqlite3
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from typing import Any

import orjson

from ..domain import (
    ExceptionType,
    InvoiceFacts,
    InvoiceStatus,
    Judgement,
    PaymentFacts,
    PaymentState,
    PaymentStatus,
    Resolution,
    ResolutionAction,
    judge,
)
from . import engine
from .engine import Row
from .outbox import NewEvent, Outbox
from .views import RECIPIENT_COLUMNS, payment_view, recipient_checksum, status_json


@dataclass
class Reasons:
    """Why an invoice is judged again, beyond what judging finds changed: each is reported.

    `session`: a payment session has just started (finalize, checkout-session): a draft is
    judged as finalized, the version grows even if nothing else changed, and the invoice, if
    it is open for payment, reports `invoice.session_refreshed`.

    `search_text`: pieces to append to the invoice's `search_text` (its new payments' hashes and
    payers), written by the same statement as its judged columns."""

    created: bool = False
    new_payments: list[str] = field(default_factory=list)
    reverted_payments: list[str] = field(default_factory=list)
    resolved: bool = False
    session: bool = False
    search_text: str = ""

    def any(self) -> bool:
        return bool(
            self.created or self.new_payments or self.reverted_payments or self.resolved or self.session
        )


# The columns judging writes. A change writes those whose value changed (one UPDATE statement
# per set of them, a few kinds in a step), and appends to the invoice's search text (its new
# payments'; '' for none) in the same statement. Writing every column would also rewrite the
# entries of the indexes on the unchanged ones (`invoices_exception`): 3 us an invoice.
JUDGED_COLUMNS = (
    "status", "payment_summary", "exception", "exception_type", "exception_status", "open_exceptions",
    "paid_at", "confirmed_at", "last_payment_observed_at", "version", "updated_at",
)  # fmt: skip


@lru_cache(maxsize=256)
def update_judged(columns: tuple[str, ...]) -> str:
    """The statement that writes these judged columns of an invoice and appends to its search
    text; parameters: the columns' values, the text, the invoice id."""
    assert set(columns) <= set(JUDGED_COLUMNS), columns
    return (
        f"UPDATE invoices SET {', '.join(f'{c} = ?' for c in columns)}, search_text = search_text || ? "
        "WHERE id = ?"
    )


APPEND_SEARCH_TEXT = "UPDATE invoices SET search_text = search_text || ? WHERE id = ?"

STATUS_EVENTS = {
    InvoiceStatus.PAID: "invoice.paid",
    InvoiceStatus.CONFIRMED: "invoice.confirmed",
    InvoiceStatus.EXPIRED: "invoice.expired",
    InvoiceStatus.UNDERPAID: "invoice.underpaid",
    InvoiceStatus.CANCELLED: "invoice.cancelled",
}


@dataclass
class Outcome:
    """What re-judging one invoice changes: its new judged columns, its payments' new roles and
    its events (type, payment id or None), in the order they are reported."""

    values: dict[str, Any]
    changed: tuple[str, ...]  # the columns of `values` whose value changed, in JUDGED_COLUMNS order
    roles: list[tuple[str, str]]
    events: list[tuple[str, str | None]]
    payment_roles: dict[str, str]


@dataclass
class Batch:
    """What was read for a set of invoices."""

    invoices: dict[str, Row]
    payments: dict[str, list[Row]]
    networks: dict[str, set[str]]
    chain_times: dict[str, int]


# What judging and the events' status read of an invoice: not its metadata, request or fields,
# the largest of its columns.
INVOICE_COLUMNS = ", ".join(
    ("id", "amount", "tolerance_percent", "payable_until", "cancelled_at", "resolutions", "payment_timing")
    + JUDGED_COLUMNS
)


def read_batch(conn: sqlite3.Connection, invoice_ids: Sequence[str]) -> Batch:
    keys = engine.keys_param(invoice_ids)
    invoices: dict[str, Row] = {
        r["id"]: r
        for r in engine.dict_rows(
            conn, f"SELECT {INVOICE_COLUMNS} FROM invoices WHERE {engine.in_keys('id')}", [keys]
        )
    }
    payments: dict[str, list[Row]] = {i: [] for i in invoice_ids}
    for p in engine.dict_rows(
        conn,
        f"SELECT p.*, o.amount_atomic AS option_amount, {RECIPIENT_COLUMNS} FROM payments p "
        f"JOIN payment_options o ON o.id = p.option_id WHERE {engine.in_keys('p.invoice_id')}",
        [keys],
    ):
        payments[p["invoice_id"]].append(p)
    # Each invoice's payments in chain order, sorted here rather than by the statement (a temporary
    # b-tree over the whole slice's rows): most invoices have one.
    for listed in payments.values():
        if len(listed) > 1:
            listed.sort(key=_chain_order)
    networks: dict[str, set[str]] = {i: set() for i in invoice_ids}
    for invoice_id, network in engine.tuple_rows(
        conn,
        f"SELECT DISTINCT invoice_id, network FROM payment_options WHERE {engine.in_keys('invoice_id')}",
        [keys],
    ):
        networks[invoice_id].add(network)
    chain_times = {
        r["network"]: r["block_timestamp"]
        for r in conn.execute("SELECT network, block_timestamp FROM cursors")
    }
    return Batch(invoices, payments, networks, chain_times)


def _chain_order(p: Row) -> tuple:
    return (p["block_timestamp"], p["network"], p["block_number"], p["log_key"], p["id"])


def chain_time(networks: set[str], chain_times: Mapping[str, int]) -> int | None:
    """The invoice's clock: the earliest of its chains' processed-block times, so a lagging
    chain never lets an invoice expire while a payment on it may still be on time; None while
    one of them has processed nothing."""
    if len(networks) == 1:  # most invoices: one chain
        for n in networks:
            return chain_times.get(n)
    if not networks or any(n not in chain_times for n in networks):
        return None
    return min(chain_times[n] for n in networks)


_PAYMENT_STATUSES = {s.value: s for s in PaymentStatus}


@lru_cache(maxsize=1024)
def _decimal(text: str) -> Decimal:
    """An invoice's amount or tolerance: most invoices share a few (a Decimal is immutable)."""
    return Decimal(text)


def judge_row(row: Row, payments: Sequence[Row], clock: int | None, session: bool) -> Judgement:
    stored = row["resolutions"]
    resolutions = tuple(
        Resolution(
            ExceptionType(r["exception_type"]), ResolutionAction(r["action"]), r["note"], r["resolved_at"],
            frozenset(r["payment_ids"]),
        )
        for r in orjson.loads(stored)
    ) if stored != "[]" else ()  # fmt: skip
    facts = InvoiceFacts(
        _decimal(row["amount"]),
        _decimal(row["tolerance_percent"]),
        row["payable_until"],
        row["status"] == InvoiceStatus.DRAFT and not session,
        row["cancelled_at"] is not None,
        resolutions,
    )
    return judge(
        facts,
        [
            PaymentFacts(
                p["id"], int(p["amount_atomic"]), int(p["option_amount"]), p["block_timestamp"],
                _PAYMENT_STATUSES[p["status"]],
                (p["block_timestamp"], p["network"], p["block_number"], p["log_key"]),
            )
            for p in payments
        ],
        chain_time=clock,
    )  # fmt: skip


def _judged_changes(row: Row, judged: Judgement, open_before: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The judged columns that differ from the row; and the exceptions open now."""
    summary = orjson.dumps(judged.summary()).decode()
    exception = orjson.dumps(judged.exception.as_dict()).decode() if judged.exception else None
    changes: dict[str, Any] = {}
    if str(judged.status) != row["status"]:
        changes["status"] = str(judged.status)
    if summary != row["payment_summary"]:
        changes["payment_summary"] = summary
    if exception != row["exception"]:
        changes["exception"] = exception
        changes["exception_type"] = judged.exception.type.value if judged.exception else None
        changes["exception_status"] = judged.exception.status if judged.exception else None
    open_now = [str(t) for t in judged.open_exceptions]
    if open_now != open_before:
        changes["open_exceptions"] = orjson.dumps(open_now).decode()
    return changes, open_now


def _timestamps(row: Row, judged: Judgement, reasons: Reasons, now: str) -> dict[str, Any]:
    """paid_at, confirmed_at and last_payment_observed_at as the new status has them."""
    status = judged.status
    fully_paid = judged.payment_state in (PaymentState.EXACT, PaymentState.OVERPAID)
    out: dict[str, Any] = {}
    if status in (InvoiceStatus.PAID, InvoiceStatus.CONFIRMED) and fully_paid and row["paid_at"] is None:
        out["paid_at"] = now
    if status == InvoiceStatus.CONFIRMED and row["confirmed_at"] is None:
        out["confirmed_at"] = now
    if status in (InvoiceStatus.PENDING, InvoiceStatus.EXPIRED, InvoiceStatus.UNDERPAID):
        out["paid_at"] = None
        out["confirmed_at"] = None
    if status == InvoiceStatus.PAID:
        out["confirmed_at"] = None
    if reasons.new_payments:
        out["last_payment_observed_at"] = now
    return out


def _events(row: Row, judged: Judgement, reasons: Reasons, status_changed: bool, newly_open: bool) -> list:
    """The events of one change, in the order they are reported."""
    events: list[tuple[str, str | None]] = []
    if reasons.created:
        events.append(("invoice.created", None))
    if reasons.session and judged.status == InvoiceStatus.PENDING:
        events.append(("invoice.session_refreshed", None))
    for pid in reasons.new_payments:
        events.append(("invoice.payment_detected", pid))
    for pid in reasons.reverted_payments:
        events.append(("invoice.payment_reverted", pid))
    if status_changed or reasons.created:
        event = STATUS_EVENTS.get(judged.status)
        fully_paid = judged.payment_state in (PaymentState.EXACT, PaymentState.OVERPAID)
        # (A zero-amount invoice, confirmed at creation or at finalize, was never "paid".)
        if (
            event == "invoice.confirmed"
            and row["status"] != InvoiceStatus.PAID
            and fully_paid
            and not (reasons.created or reasons.session)
        ):
            events.append(("invoice.paid", None))  # paid and confirmed in one step: say both
        if event is not None:
            events.append((event, None))
    if reasons.resolved:
        events.append(("invoice.exception_resolved", None))
    if newly_open:  # one event per change, even if two exceptions open in it
        events.append(("invoice.exception_opened", None))
    return events


def rejudge_one(
    row: Row, payments: Sequence[Row], clock: int | None, reasons: Reasons, now: str
) -> Outcome | None:
    """Pure: what judging the invoice again changes; None when nothing does."""
    judged = judge_row(row, payments, clock, reasons.session)
    stored_open = row["open_exceptions"]
    open_before = [] if stored_open == "[]" else orjson.loads(stored_open)
    changes, open_now = _judged_changes(row, judged, open_before)
    judged_roles = judged.roles
    payment_roles = {}
    roles = []
    for p in payments:
        payment_id, stored_role = p["id"], p["role"]
        role = judged_roles.get(payment_id)
        if role is None:
            payment_roles[payment_id] = stored_role
        else:
            payment_roles[payment_id] = role.value
            if role != stored_role:
                roles.append((role.value, payment_id))
    if not (changes or roles or reasons.any()):
        return None
    newly_open = any(t not in open_before for t in open_now) if open_now else False
    events = _events(row, judged, reasons, "status" in changes, newly_open)
    changes.update(_timestamps(row, judged, reasons, now))
    changes["version"] = row["version"] + 1
    changes["updated_at"] = now
    values = {}
    changed = []
    for c in JUDGED_COLUMNS:
        value = row[c]
        if c in changes and changes[c] != value:
            value = changes[c]
            changed.append(c)
        values[c] = value
    return Outcome(values, tuple(changed), roles, events, payment_roles)


@dataclass
class Rejudged:
    changed: int = 0  # invoices that changed
    events: int = 0
    detected: list[tuple[str, str]] = field(default_factory=list)  # (network, role) of each payment reported


# Invoices judged per slice of a change: each slice is three reads and a few writes.
# A catch-up step can touch tens of thousands of invoices; a slice's rows, views and event
# bodies (some 25 KB an invoice) are all the memory a step holds at once.
SLICE = 1_000


def rejudge_many(
    conn: sqlite3.Connection,
    outbox: Outbox,
    reasons: Mapping[str, Reasons],
    *,
    now: str,
    tips: Mapping[str, int],
) -> Rejudged:
    """Judge each invoice again, write what changed and queue its events, inside the caller's
    transaction: per SLICE invoices, three reads and a statement per table written (roles, event
    statuses, events), the invoices' one per set of columns changed. `tips` are the chains'
    processed blocks (payments' confirmations)."""
    ids = sorted(reasons)
    done = Rejudged()
    with collector_paused(len(ids) > SLICE // 10):
        for start in range(0, len(ids), SLICE):
            _rejudge_slice(conn, outbox, ids[start : start + SLICE], reasons, now, tips, done)
    return done


@contextmanager
def collector_paused(pause: bool) -> Generator[None, None, None]:
    """Python's cyclic collector off while many invoices are judged, or a large step recorded
    (`Store.apply_blocks`). A slice allocates some thirty containers an invoice (rows, views,
    events), and recording a few a payment, none of them in a cycle, so each of the collector's
    passes, hundreds a step, finds nothing, and its rarer full passes walk every live object of
    the process (18 us a payment in `bench store` while judging; 3-6 us more while recording,
    and more in the followers' process, whose watch set is millions of objects). It is turned
    back on after, unless it was off already (cycles made meanwhile, anywhere, are collected
    then)."""
    was_on = pause and gc.isenabled()
    if was_on:
        gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _rejudge_slice(
    conn: sqlite3.Connection,
    outbox: Outbox,
    ids: Sequence[str],
    reasons: Mapping[str, Reasons],
    now: str,
    tips: Mapping[str, int],
    done: Rejudged,
) -> None:
    judged = judge_slice(read_batch(conn, ids), ids, reasons, now, tips)
    write_slice(conn, outbox, judged)
    done.changed += judged.changed
    done.events += len(judged.events)
    done.detected += judged.detected


@dataclass
class JudgedSlice:
    """What judging a slice of invoices writes: the payments' new roles, the invoices' judged
    columns (grouped by the set of columns changed, one statement each), the search text of the
    unchanged ones, and the events, each carrying its invoice's status rendered once."""

    changed: int = 0  # invoices that changed
    role_rows: list[tuple[str, str]] = field(default_factory=list)
    invoice_rows: dict[tuple[str, ...], list[list[Any]]] = field(default_factory=dict)
    search_rows: list[tuple[str, str]] = field(default_factory=list)
    events: list[NewEvent] = field(default_factory=list)
    detected: list[tuple[str, str]] = field(default_factory=list)  # (network, role) of each payment reported


def judge_slice(
    batch: Batch, ids: Sequence[str], reasons: Mapping[str, Reasons], now: str, tips: Mapping[str, int]
) -> JudgedSlice:
    """Pure (no I/O): what the invoices `ids`, as read in `batch`, change when judged again.
    Apart from the slice's reads and writes so that each is measured alone (`python -m bench
    store --phases`): they are most of a step's time, and which of them is worth moving is a
    measure, not a guess."""
    out = JudgedSlice()
    invoice_rows, events = out.invoice_rows, out.events
    for invoice_id in ids:
        row = batch.invoices[invoice_id]
        payments = batch.payments[invoice_id]
        clock = chain_time(batch.networks[invoice_id], batch.chain_times)
        why = reasons[invoice_id]
        outcome = rejudge_one(row, payments, clock, why, now)
        if outcome is None:
            if why.search_text:
                out.search_rows.append((why.search_text, invoice_id))
            continue
        out.changed += 1
        out.role_rows += outcome.roles
        values = outcome.values
        same_change = invoice_rows.get(outcome.changed)
        if same_change is None:
            same_change = invoice_rows[outcome.changed] = []
        same_change.append([*(values[c] for c in outcome.changed), why.search_text, invoice_id])
        # What the events carry (the status view): the invoice as just written and its payments
        # (with their new roles), not its options; built from the rows in hand, rendered once,
        # each payment's JSON shared by the status and its own event.
        roles_now = outcome.payment_roles
        views = [
            payment_view(p, tips.get(p["network"]), roles_now[p["id"]], recipient_checksum(p))
            for p in payments
        ]
        rendered = [orjson.dumps(v) for v in views]
        values["id"] = invoice_id
        values["payment_timing"] = row["payment_timing"]
        status = status_json(values, views, rendered)
        place = {v["id"]: k for k, v in enumerate(views)}
        for event_type, payment_id in outcome.events:
            if payment_id is None:
                events.append(NewEvent(event_type, invoice_id, status, None))
                continue
            k = place[payment_id]
            events.append(NewEvent(event_type, invoice_id, status, rendered[k]))
            if event_type == "invoice.payment_detected":
                out.detected.append((views[k]["network"], views[k]["role"]))
    return out


def write_slice(conn: sqlite3.Connection, outbox: Outbox, judged: JudgedSlice) -> None:
    """A judged slice's writes: a statement per table (the invoices' one per set of columns)."""
    if judged.role_rows:
        conn.executemany("UPDATE payments SET role = ? WHERE id = ?", judged.role_rows)
    for columns, rows in judged.invoice_rows.items():
        conn.executemany(update_judged(columns), rows)
    if judged.search_rows:
        conn.executemany(APPEND_SEARCH_TEXT, judged.search_rows)
    outbox.append(judged.events)
