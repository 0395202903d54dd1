"""The webhook outbox: events written with the change they report, and their deliveries.

It shares the store's connection, so `emit()` inside a store transaction commits (or rolls
back) together with the state change.

A change writes its events and nothing per endpoint: each configured endpoint reads the events
as a queue of its own, from its cursor (`webhook_endpoints.after_seq`). The events past the
cursor that an endpoint wants are its deliveries not yet queued: the API shows them as pending
deliveries, and the dispatcher queues them (`queue_next`: a `deliveries` row each, the cursor
moved past them, in one transaction) before it sends them. From then on a delivery is a row
(attempts, retries, redelivery), as it always was. A delivery's id is its event's and its
endpoint's (`dlv_<event>_<endpoint>`), the same before and after it is queued.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
from sqlite_utils import Database

from ..domain import new_ids, rfc3339
from ..redaction import Redactor, redact_text, strip_credentials
from . import engine
from .records import StateConflict
from .views import status_view

DELIVERY_STATUSES = ("pending", "delivered", "failed")
# Attempts per statement in `record_attempts` (9 bound values each, far below either engine's cap).
ATTEMPTS_PER_STATEMENT = 500
# Events an endpoint's cursor moves past in one transaction when the dispatcher queues them.
QUEUE_EVENTS = 5000

# An endpoint `w` wants an event `e`: its filter is '*' or ',type,type,' (`_filter`).
WANTS = "(w.events = '*' OR " + engine.contains("w.events", "',' || e.type || ','") + ")"
# The deliveries not yet queued: each endpoint's wanted events past its cursor.
UNQUEUED = f"webhook_endpoints w JOIN events e ON e.seq > w.after_seq WHERE {WANTS}"
# A delivery's id, from its event's (`evt_<ulid>`) and its endpoint's; `unqueued_key` reads it back.
DELIVERY_ID = "'dlv_' || substr(e.id, 5) || '_' || w.id"
_DELIVERY_ID = re.compile(r"dlv_([0-9A-Za-z]+)_([0-9]+)")


def unqueued_key(delivery_id: str) -> tuple[str, int] | None:
    """(event id, endpoint id) of a delivery id made from them, else None."""
    match = _DELIVERY_ID.fullmatch(delivery_id)
    return None if match is None else ("evt_" + match[1], int(match[2]))


def delivery_view(row: sqlite3.Row) -> dict:
    """A delivery as the API shows it (contract §3, `/v1/webhook-deliveries`): the endpoint's
    credentials masked in its URL and in the error text (rows written before errors were
    redacted on the way in are shown safely too)."""
    return {
        "id": row["id"],
        "event_id": row["event_id"],
        "event_type": row["event_type"],
        "invoice_id": row["invoice_id"],
        "url": strip_credentials(row["url"]),
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status_code": row["last_status_code"],
        "last_error": None
        if row["last_error"] is None
        else Redactor([row["url"]])(redact_text(row["last_error"])),
        "next_attempt_at": rfc3339(row["next_attempt_at"]),
        "delivered_at": row["delivered_at"],
    }


# A delivery not yet queued, in the columns of a `deliveries` row (`unqueued_view`).
UNQUEUED_COLUMNS = (
    f"{DELIVERY_ID} AS id, e.id AS event_id, e.type AS event_type, e.invoice_id, w.url, "
    "'pending' AS status, 0 AS attempts, NULL AS last_status_code, NULL AS last_error, "
    "NULL AS next_attempt_at, NULL AS delivered_at, e.created_at"
)


def unqueued_view(row: sqlite3.Row) -> dict:
    """A delivery not yet queued, as the API shows it: pending, never attempted, due since its
    event was made."""
    return delivery_view(row) | {"next_attempt_at": row["created_at"]}


def _filter(endpoint: Endpoint) -> str:
    """How `webhook_endpoints.events` holds an endpoint's filter (see WANTS)."""
    return "*" if "*" in endpoint.events else "," + ",".join(sorted(set(endpoint.events))) + ","


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt, as it went; `next_attempt_at` None after a failure means give up.

    `claimed_attempts` and `claimed_requeues` are what the dispatcher saw when it took the
    delivery: if an operator redelivered it meanwhile, the attempt is recorded but the fresh
    schedule stays. None: the delivery's count as it is now."""

    delivery_id: str
    ok: bool
    status_code: int | None
    error: str | None
    duration_ms: float
    next_attempt_at: float | None
    claimed_attempts: int | None = None
    claimed_requeues: int | None = None


@dataclass(frozen=True)
class Endpoint:
    url: str
    events: tuple[str, ...]

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


class NewEvent(NamedTuple):
    """An event to append: `status` is the invoice's status view, already rendered (an invoice
    with several events in one change renders it once); `payment` the payment it is about, as a
    view or already rendered (JSON bytes: the status holds it too)."""

    type: str
    invoice_id: str
    status: bytes
    payment: dict | bytes | None = None


def event_body(event_id: str, event_type: str, created_at: str, status: bytes, payment: bytes) -> bytes:
    """The event's JSON from its parts (the status and the payment already rendered), byte for
    byte what `orjson.dumps` gives for {"id", "type", "created_at", "data": {"invoice", "payment"}}."""
    return b"".join(
        (
            b'{"id":', orjson.dumps(event_id), b',"type":', orjson.dumps(event_type),
            b',"created_at":', orjson.dumps(created_at), b',"data":{"invoice":', status,
            b',"payment":', payment, b"}}",
        )
    )  # fmt: skip


# The columns `stored_body` needs, from `events e LEFT JOIN event_statuses s ON s.id = e.status_id`.
BODY_COLUMNS = "e.id, e.type, e.created_at, e.body, e.status_id, s.body AS status"
BODY_JOIN = "LEFT JOIN event_statuses s ON s.id = e.status_id"


def event_bodies(conn: sqlite3.Connection, event_ids: Sequence[str]) -> dict[str, bytes]:
    """The bodies of these events, by id (a connection with `sqlite3.Row` rows): for tools and
    benchmarks that read a store without a Store."""
    out: dict[str, bytes] = {}
    for i in range(0, len(event_ids), 500):
        part = list(event_ids[i : i + 500])
        rows = conn.execute(
            f"SELECT {BODY_COLUMNS} FROM events e {BODY_JOIN} WHERE e.id IN ({','.join('?' * len(part))})",
            part,
        )
        out.update((r["id"], stored_body(r)) for r in rows)
    return out


def stored_body(row: sqlite3.Row) -> bytes:
    """An event's body as it is sent. Events since m009 store their payment JSON and share their
    invoice's status with the other events of the same change; older ones hold the whole body."""
    if row["status_id"] is None:
        return bytes(row["body"])
    if row["status"] is None:  # never sent as a body of its own: the payment alone is not the event
        raise LookupError(f"event {row['id']}: its status {row['status_id']} is missing from the store")
    return event_body(row["id"], row["type"], row["created_at"], bytes(row["status"]), bytes(row["body"]))


async def _run_here(change: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return change(*args, **kwargs)


class Outbox:
    def __init__(
        self,
        connection: Callable[[], Database],
        clock: Callable[[], float],
        notify: Callable[..., None] | None = None,
        write: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        """`connection()` is the calling thread's connection to the store (see Store.db), so
        events are written inside the transaction of the change they report. `notify(fn,
        *args)` calls a listener: at once on the loop, after the commit on the store's writer."""
        self._connection = connection
        self._notify = notify or (lambda fn, *args: fn(*args))
        # `await write(change, *args)`: the store's writer (Store.write), for the dispatcher's
        # changes (attempts), so they never wait for the loop's turn at the database.
        self.write = write or _run_here
        self.clock = clock
        self.endpoints: tuple[Endpoint, ...] = ()
        # Called when events are appended (deliveries to queue) or a delivery is re-queued, so the
        # dispatcher wakes at once instead of polling.
        self.on_delivery_queued: Callable[[], None] | None = None
        # Told the invoice id of each invoice with new events (once per change): the payment
        # page's live feed reads the invoice once that change has committed.
        self.event_listeners: list[Callable[[str], None]] = []

    @property
    def db(self) -> Database:
        return self._connection()

    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The configured endpoints (at start and on reload: the daemon's, and a tool's that
        appends events), written to `webhook_endpoints` in one transaction. An endpoint new to
        the table starts at the newest event: it gets the events appended from now on. One whose
        filter changed or that is no longer configured has the events it wanted until now
        queued first, as they were queued at their append before: the former keeps its cursor
        (past them) with its new filter, the latter leaves the table, and its pending deliveries
        fail as ever (`endpoint is no longer configured`)."""
        given = tuple(endpoints)
        wanted = {e.url: _filter(e) for e in given}
        with self.db.atomic():
            stored = {r["url"]: r for r in self._q("SELECT id, url, events FROM webhook_endpoints")}
            newest = self._count("SELECT COALESCE(MAX(seq), 0) AS n FROM events")
            now = self.clock()
            for url, row in stored.items():
                if wanted.get(url) == row["events"]:
                    continue
                self._queue_through(row["id"], newest, now)
                if url in wanted:
                    self.db.execute(
                        "UPDATE webhook_endpoints SET events = ? WHERE id = ?", [wanted[url], row["id"]]
                    )
                else:
                    self.db.execute("DELETE FROM webhook_endpoints WHERE id = ?", [row["id"]])
            for url, events in wanted.items():
                if url not in stored:
                    self.db.execute(
                        "INSERT INTO webhook_endpoints(url, events, after_seq) VALUES (?,?,?)",
                        [url, events, newest],
                    )
        self.endpoints = given  # once written: a reload that failed to write changes nothing

    # ------------------------------------------------------------------ endpoints' cursors

    def _queue_through(self, endpoint_id: int, through: int, now: float) -> int:
        """Queue the endpoint's wanted events past its cursor up to `through` (a seq), and move
        its cursor there; inside the caller's transaction. Returns the deliveries queued."""
        queued = self.db.execute(
            "INSERT INTO deliveries(id, event_id, event_type, invoice_id, url, status, attempts, "
            f"next_attempt_at, created_at) SELECT {DELIVERY_ID}, e.id, e.type, e.invoice_id, w.url, "
            "'pending', 0, ?, e.created_at "
            f"FROM {UNQUEUED} AND w.id = ? AND e.seq <= ? ORDER BY e.seq "
            "ON CONFLICT DO NOTHING",
            [now, endpoint_id, through],
        ).rowcount
        self.db.execute(
            "UPDATE webhook_endpoints SET after_seq = ? WHERE id = ? AND after_seq < ?",
            [through, endpoint_id, through],
        )
        return queued

    def behind(self, url: str) -> bool:
        """Whether events were appended past the endpoint's cursor (wanted by it or not)."""
        row = self._q1(
            "SELECT 1 AS n FROM webhook_endpoints WHERE url = ? "
            "AND after_seq < (SELECT COALESCE(MAX(seq), 0) FROM events)",
            [url],
        )
        return row is not None

    def queue_next(self, url: str, limit: int = QUEUE_EVENTS) -> bool:
        """Queue the endpoint's deliveries of the next `limit` events past its cursor, in one
        transaction (the dispatcher's, before it sends them); True while more remain."""
        with self.db.atomic():
            row = self._q1("SELECT id, after_seq FROM webhook_endpoints WHERE url = ?", [url])
            if row is None:
                return False
            newest = self._count("SELECT COALESCE(MAX(seq), 0) AS n FROM events")
            if newest <= row["after_seq"]:
                return False
            through = min(newest, row["after_seq"] + limit)
            self._queue_through(row["id"], through, self.clock())
        return through < newest

    def queue_all(self) -> None:
        """Queue every endpoint's deliveries not yet queued (a one-off pass: tests, benchmarks)."""
        for row in self._q("SELECT url FROM webhook_endpoints"):
            while self.queue_next(row["url"]):
                pass

    def _q(self, sql: str, params: Sequence | dict = ()) -> list[sqlite3.Row]:
        return self.db.execute(sql, params).fetchall()

    def _q1(self, sql: str, params: Sequence | dict = ()) -> sqlite3.Row | None:
        return self.db.execute(sql, params).fetchone()

    def _count(self, sql: str, params: Sequence | dict = ()) -> int:
        """The `n` of a query that always answers one row (a COUNT, a MAX with a default)."""
        row = self._q1(sql, params)
        assert row is not None, sql
        return row["n"]

    def event_count(self) -> int:
        return self._count("SELECT COALESCE(MAX(seq), 0) AS n FROM events")

    def emit(self, event_type: str, invoice: dict, payment: dict | None = None) -> None:
        """Append one event; call inside the change's transaction."""
        self.append([NewEvent(event_type, invoice["id"], orjson.dumps(status_view(invoice)), payment)])

    def append(self, events: Sequence[NewEvent]) -> None:
        """Append events, in order: one statement per table, inside the caller's transaction.
        Nothing is written per endpoint: each reads the events from its cursor (see above)."""
        if not events:
            return
        now_s = self.clock()
        now_ms = int(now_s * 1000)
        created_at = rfc3339(now_s)
        assert created_at is not None
        event_ids = new_ids("evt", now_ms, len(events))
        conn = self.db.conn
        # One status row per distinct status in this append: an invoice's events of one change
        # carry the same rendering. Ids are taken after the highest: appends run one at a time,
        # inside the store's write transaction.
        status_ids: dict[bytes, int] = {}
        next_status_id = self._count("SELECT COALESCE(MAX(id), 0) + 1 AS n FROM event_statuses")
        for e in events:
            if e.status not in status_ids:
                status_ids[e.status] = next_status_id + len(status_ids)
        event_rows = [
            (
                event_id, e.type, e.invoice_id, created_at,
                e.payment if type(e.payment) is bytes else orjson.dumps(e.payment), status_ids[e.status],
            )
            for e, event_id in zip(events, event_ids, strict=True)
        ]  # fmt: skip
        conn.executemany(
            "INSERT INTO event_statuses(id, body) VALUES (?,?)", [(i, s) for s, i in status_ids.items()]
        )
        conn.executemany(
            "INSERT INTO events(id, type, invoice_id, created_at, body, status_id) VALUES (?,?,?,?,?,?)",
            event_rows,
        )
        for invoice_id in dict.fromkeys(e.invoice_id for e in events):
            for listener in self.event_listeners:
                self._notify(listener, invoice_id)
        if self.on_delivery_queued is not None:  # the endpoints that want them have deliveries to queue
            self._notify(self.on_delivery_queued)

    def event_marks(self, invoice_id: str, since: int | None = None) -> tuple[int, list[str]]:
        """(sequence number of the invoice's latest event, or 0; the types of its events after
        `since`, oldest first): where a live status stream stands, and what a resuming one missed."""
        latest = self._count(
            "SELECT COALESCE(MAX(seq), 0) AS n FROM events WHERE invoice_id = ?", [invoice_id]
        )
        if since is None or since >= latest:
            return latest, []
        rows = self._q(
            "SELECT type FROM events WHERE invoice_id = ? AND seq > ? ORDER BY seq", [invoice_id, since]
        )
        return latest, [r["type"] for r in rows]

    def events_for(self, invoice_id: str) -> list[dict]:
        rows = self._q(
            f"SELECT {BODY_COLUMNS} FROM events e {BODY_JOIN} WHERE e.invoice_id = ? ORDER BY e.seq",
            [invoice_id],
        )
        return [{"id": r["id"], "type": r["type"], "body": stored_body(r)} for r in rows]

    def due_deliveries(
        self, now: float, limit: int = 100, *, url: str | None = None, exclude: Collection[str] = ()
    ) -> list[dict]:
        """Pending deliveries due by `now`, oldest first: to one endpoint when `url` is given,
        leaving out `exclude` (the ids the dispatcher holds).

        `exclude` is one parameter (a JSON list), not a placeholder per id: the statement's text
        is the same whatever its length, so the connection's statement cache holds one
        compiled statement, not one per length (each as large as its list: 240 MB of them once
        on the event loop's connection), and no count of ids meets SQLite's cap on variables."""
        where = ["d.status = 'pending'", "d.next_attempt_at <= ?"]
        params: list[Any] = [now]
        if url is not None:
            where.append("d.url = ?")
            params.append(url)
        if exclude:
            where.append(f"NOT {engine.in_keys('d.id')}")
            params.append(engine.keys_param(exclude))
        rows = self._q(
            f"SELECT d.id AS delivery_id, d.event_id, d.url, d.attempts, d.requeues, {BODY_COLUMNS} "
            f"FROM deliveries d JOIN events e ON e.id = d.event_id {BODY_JOIN} "
            f"WHERE {' AND '.join(where)} ORDER BY d.next_attempt_at LIMIT ?",
            [*params, limit],
        )
        return [
            {
                "id": r["delivery_id"],
                "event_id": r["event_id"],
                "url": r["url"],
                "attempts": r["attempts"],
                "requeues": r["requeues"],
                "body": stored_body(r),
            }
            for r in rows
        ]

    def next_delivery_at(self, url: str | None = None) -> float | None:
        """When the next pending delivery (to `url`, or to any endpoint) is due: now while some
        are not yet queued."""
        unqueued = self._q1(
            f"SELECT 1 AS n FROM {UNQUEUED}{'' if url is None else ' AND w.url = ?'} LIMIT 1",
            [] if url is None else [url],
        )
        if unqueued is not None:
            return self.clock()
        if url is None:
            row = self._q1("SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE status = 'pending'")
        else:
            row = self._q1(
                "SELECT MIN(next_attempt_at) AS t FROM deliveries WHERE url = ? AND status = 'pending'", [url]
            )
        return row["t"] if row else None

    def pending_urls(self) -> list[str]:
        """Endpoints with pending deliveries, queued or not (some may no longer be configured)."""
        return [
            r["url"]
            for r in self._q(
                "SELECT DISTINCT url FROM deliveries WHERE status = 'pending' "
                f"UNION SELECT DISTINCT w.url FROM {UNQUEUED}"
            )
        ]

    def record_attempt(
        self,
        delivery_id: str,
        *,
        ok: bool,
        status_code: int | None,
        error: str | None,
        duration_ms: float,
        next_attempt_at: float | None,
        claimed_attempts: int | None = None,
        claimed_requeues: int | None = None,
    ) -> None:
        """One attempt, as it went (see `Attempt`), in a transaction of its own."""
        self.record_attempts(
            [
                Attempt(
                    delivery_id,
                    ok=ok,
                    status_code=status_code,
                    error=error,
                    duration_ms=duration_ms,
                    next_attempt_at=next_attempt_at,
                    claimed_attempts=claimed_attempts,
                    claimed_requeues=claimed_requeues,
                )
            ]
        )

    def record_attempts(self, attempts: Sequence[Attempt]) -> None:
        """Attempts of distinct deliveries in one transaction: one commit, so one fsync, for
        them all (the dispatcher's group commit). A delivery no longer there (pruned
        meanwhile) is skipped.

        Two statements for the whole group (its attempts as a VALUES list), not one per
        attempt: each statement the store's writer thread runs hands the GIL back and forth
        with the event loop, so a group costs the loop two hand-offs, not two per attempt."""
        now = rfc3339(self.clock())
        with self.db.atomic():
            for start in range(0, len(attempts), ATTEMPTS_PER_STATEMENT):
                self._record_chunk(attempts[start : start + ATTEMPTS_PER_STATEMENT], now)

    def _record_chunk(self, attempts: Sequence[Attempt], now: str | None) -> None:
        if not attempts:
            return
        values = ",".join(["(?,?,?,?,?,?,?,?)"] * len(attempts))
        rows = [
            value
            for a in attempts
            for value in (
                a.delivery_id, a.claimed_attempts, a.claimed_requeues, int(a.ok), a.status_code,
                a.error, a.duration_ms, a.next_attempt_at,
            )
        ]  # fmt: skip
        given = (
            "WITH a(id, claimed, requeues, ok, status_code, error, duration_ms, next_at) "
            f"AS (VALUES {values}) "
        )
        conn = self.db.conn
        # The attempt's number: one after the count the dispatcher saw (None: the count now).
        conn.execute(
            given
            + "INSERT INTO delivery_attempts(delivery_id, attempt, at, status_code, error, duration_ms) "
            "SELECT a.id, COALESCE(a.claimed, d.attempts) + 1, ?, a.status_code, a.error, a.duration_ms "
            "FROM a JOIN deliveries d ON d.id = a.id",
            [*rows, now],
        )
        # A delivery re-queued while its attempt was in flight (its count or requeues moved)
        # keeps the new schedule: the attempt is recorded above, the delivery left alone.
        conn.execute(
            given + "UPDATE deliveries SET "
            "status = CASE WHEN a.ok THEN 'delivered' WHEN a.next_at IS NULL THEN 'failed' "
            "ELSE 'pending' END, "
            "attempts = COALESCE(a.claimed, deliveries.attempts) + 1, last_status_code = a.status_code, "
            "last_error = a.error, next_attempt_at = CASE WHEN a.ok THEN NULL ELSE a.next_at END, "
            "delivered_at = CASE WHEN a.ok THEN ? END "
            "FROM a WHERE deliveries.id = a.id "
            "AND (a.claimed IS NULL OR deliveries.attempts = a.claimed) "
            "AND (a.requeues IS NULL OR deliveries.requeues = a.requeues)",
            [*rows, now],
        )

    # ------------------------------------------------------------------ operations

    def backlog(self) -> int:
        """Deliveries still to make (pending: due now or waiting for a retry, queued or not)."""
        return self._count("SELECT COUNT(*) AS n FROM deliveries WHERE status = 'pending'") + self._count(
            f"SELECT COUNT(*) AS n FROM {UNQUEUED}"
        )

    def list_deliveries(
        self,
        *,
        status: str | None = None,
        event_type: str | None = None,
        invoice_id: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[dict], int]:
        """Deliveries, newest first, with the total matching the filters: those not yet queued
        (pending, the newest events) first, then the queued ones."""
        unqueued: list[dict] = []
        unqueued_total = 0
        if status in (None, "pending"):
            where, params = [], []
            for column, value in (("e.type", event_type), ("e.invoice_id", invoice_id)):
                if value is not None:
                    where.append(f" AND {column} = ?")
                    params.append(value)
            clause = "".join(where)
            unqueued_total = self._count(f"SELECT COUNT(*) AS n FROM {UNQUEUED}{clause}", params)
            if offset < unqueued_total:
                unqueued = [
                    unqueued_view(r)
                    for r in self._q(
                        f"SELECT {UNQUEUED_COLUMNS} FROM {UNQUEUED}{clause} "
                        "ORDER BY e.seq DESC, w.id LIMIT ? OFFSET ?",
                        [*params, limit, offset],
                    )
                ]
        where, params = [], []
        for column, value in (("status", status), ("event_type", event_type), ("invoice_id", invoice_id)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        total = self._count(f"SELECT COUNT(*) AS n FROM deliveries{clause}", params)
        rows = self._q(
            f"SELECT * FROM deliveries{clause} ORDER BY rowid DESC LIMIT ? OFFSET ?",
            [*params, limit - len(unqueued), max(offset - unqueued_total, 0)],
        )
        return [*unqueued, *(delivery_view(r) for r in rows)], unqueued_total + total

    def _unqueued(self, delivery_id: str) -> sqlite3.Row | None:
        """A delivery not yet queued, by its id (with its event's seq and its endpoint's id)."""
        key = unqueued_key(delivery_id)
        if key is None:
            return None
        return self._q1(
            f"SELECT {UNQUEUED_COLUMNS}, e.seq, w.id AS endpoint_id "
            f"FROM {UNQUEUED} AND e.id = ? AND w.id = ?",
            list(key),
        )

    def get_delivery(self, delivery_id: str) -> dict | None:
        # Not yet queued first: one queued meanwhile is then found queued.
        if (unqueued := self._unqueued(delivery_id)) is not None:
            return unqueued_view(unqueued)
        row = self._q1("SELECT * FROM deliveries WHERE id = ?", [delivery_id])
        return delivery_view(row) if row is not None else None

    def redeliver(self, delivery_id: str) -> dict | None:
        """Queue a delivery's event again, to the same endpoint: the same event id (so the
        same `webhook-id`) and body, due now, with the retry schedule started afresh.

        Any delivery can be redelivered, since this is an operator's explicit request: a
        failed one; a pending one (attempted now rather than at its next retry); a delivered
        one (sent again; a receiver that dedupes by `webhook-id` drops it). `attempts` counts
        the attempts since the last (re)queue; every attempt stays in `delivery_attempts`.
        `last_status_code` and `last_error` still describe the last attempt until the next.

        Returns the delivery as queued, None for an unknown id; StateConflict when its
        endpoint is no longer configured (the attempt could only fail).
        """
        with self.db.atomic():
            if (unqueued := self._unqueued(delivery_id)) is not None:  # queued now, with those before it
                self._queue_through(unqueued["endpoint_id"], unqueued["seq"], self.clock())
            row = self._q1("SELECT url FROM deliveries WHERE id = ?", [delivery_id])
            if row is None:
                return None
            if row["url"] not in {e.url for e in self.endpoints}:
                raise StateConflict("the delivery's endpoint is no longer configured")
            self.db.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, requeues = requeues + 1, "
                "next_attempt_at = ?, "
                "delivered_at = NULL WHERE id = ?",
                [self.clock(), delivery_id],
            )
        if self.on_delivery_queued is not None:  # after the commit, on the loop (this may run on the writer)
            self._notify(self.on_delivery_queued)
        return self.get_delivery(delivery_id)
