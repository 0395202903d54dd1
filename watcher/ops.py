"""Operations routes: `/readyz`, `/metrics`, `/v1/chains`, `/v1/webhook-deliveries` and
redelivery (contract §3).

`/readyz` and `/metrics` are open like `/healthz`; the `/v1` ones go through the API's
bearer auth like every `/v1` path. Nothing here talks to a node: chain positions come from
the followers' last look and the store's checkpoints, so a dead node makes `/readyz` say so
rather than hang.

Readiness: the service's start-up is done (the nodes checked, the live prices' first round
read: watcher/startup.py); per chain: the follower has read the node's head, not longer ago than
`head_max_age` seconds, has committed a block, and is at most `max(2 * depth, 10)` blocks
behind that head (`depth` is the confirmations, or 64 with "finalized"). And the database
answers `SELECT 1`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, Field

from .api import PROBLEM, Problem, invalid, json_response, query_int, read_json, single_query
from .config import EVENT_TYPES, Settings, strip_credentials
from .domain import rfc3339
from .follower import Follower
from .followproc import RemoteFollower
from .metrics import CONTENT_TYPE_LATEST, ChainRow, Metrics
from .openapi import Operation
from .redaction import Redactor
from .schemas import API_MODEL, QUERY_MODEL, EventTypeName, Timestamp
from .startup import StartUp
from .store import StateConflict, Store
from .store.outbox import DELIVERY_STATUSES
from .store.probes import ping

DELIVERY_FILTERS = ("status", "event_type", "invoice_id")
MIN_LAG_BOUND = 10
MIN_HEAD_MAX_AGE = 60.0


class Ops:
    """What the operations routes and the scrape-time metrics read: the followers' status,
    the store's checkpoints, the configured chains."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        followers: Mapping[str, Follower | RemoteFollower],
        readers: Mapping[str, Any],
        *,
        heads: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        head_max_age: float | None = None,
        starting: StartUp | None = None,
    ) -> None:
        """`heads`: each chain's newHeads subscriber (its `mode` is "ws" while subscribed);
        `starting`: the service's start-up (not ready until it is done)."""
        self.starting = starting
        self.heads = heads if heads is not None else {}
        self.settings = settings
        self.store = store
        self.followers = followers
        self.readers = readers
        self.clock = clock
        self.started_at = clock()
        # Seconds without reading a head before a chain is not ready; None: per chain, ten polls
        # but at least a minute.
        self.head_max_age = head_max_age
        self._redact = Redactor([u for c in settings.chains for u in (*c.rpc_urls, c.ws_url) if u])

    def rpc_url(self, name: str) -> str:
        """The URL the chain's reader talks to, credentials stripped."""
        url = getattr(self.followers.get(name), "rpc_url", None)  # the followers' process says
        if not isinstance(url, str):
            transport = getattr(self.readers.get(name), "transport", None)
            url = getattr(transport, "url", None)
        if not isinstance(url, str):
            url = next(c.rpc_urls[0] for c in self.settings.chains if c.name == name)
        return strip_credentials(url)

    def positions(self) -> list[ChainRow]:
        """(network, head, last processed, lag, last head time) per configured chain."""
        rows: list[ChainRow] = []
        for chain in self.settings.chains:
            follower = self.followers.get(chain.name)
            head = follower.status.head_block if follower else None
            head_at = follower.status.last_head_at if follower else None
            cursor = self.store.cursor(chain.name)
            processed = cursor.number if cursor else None
            lag = max(head - processed, 0) if head is not None and processed is not None else None
            rows.append((chain.name, head, processed, lag, head_at))
        return rows

    def chains(self) -> list[dict]:
        """`GET /v1/chains` rows."""
        by_name = {c.name: c for c in self.settings.chains}
        return [
            {
                "name": name,
                "chain_id": by_name[name].chain_id,
                "head_block": head,
                "last_processed_block": processed,
                "lag_blocks": lag,
                "mode": getattr(self.heads.get(name), "mode", "poll"),
                "rpc_url": self.rpc_url(name),
                "last_head_at": rfc3339(head_at),
            }
            for name, head, processed, lag, head_at in self.positions()
        ]

    def _chain_readiness(
        self,
        name: str,
        head: int | None,
        processed: int | None,
        lag: int | None,
        head_at: float | None,
        now: float,
    ) -> tuple[dict, list[str]]:
        """One chain's entry in /readyz, and why it is not ready (nothing when it is)."""
        follower = self.followers.get(name)
        depth = follower.depth if follower else 0
        bound = max(2 * depth, MIN_LAG_BOUND)
        poll = follower.poll_interval if follower else 0.0
        max_age = self.head_max_age if self.head_max_age is not None else max(MIN_HEAD_MAX_AGE, 10 * poll)
        last_error = (
            self._redact(follower.status.last_error) if follower and follower.status.last_error else None
        )
        why = _watch_set_loading(follower)
        if follower is None:
            why.append("no follower runs for this chain")
        elif head is None or head_at is None:
            why.append(f"has not read the node's head since it started {now - self.started_at:.0f} s ago")
        elif now - head_at > max_age:
            why.append(f"last read the node's head {now - head_at:.0f} s ago (bound {max_age:g} s)")
        if follower is not None and follower.status.stopped is not None:
            why.append(f"is stopped: {self._redact(follower.status.stopped)}")
        if follower is not None and processed is None:
            why.append("has not processed a block yet")
        elif lag is not None and lag > bound:
            why.append(f"is {lag} blocks behind the node's head (bound {bound})")
        elif head is not None and processed is not None and head < processed:
            why.append(
                f"the node's head {head} is behind the checkpoint {processed} (a node behind the others: "
                "what it says cannot be checked against what we hold)"
            )
        chain = {
            "network": name,
            "ready": not why,
            "head_block": head,
            "last_processed_block": processed,
            "lag_blocks": lag,
            "max_lag_blocks": bound,
            "last_head_at": rfc3339(head_at),
            "last_error": last_error,
        }
        return chain, why

    def readiness(self) -> tuple[bool, dict]:
        """(ready, body): the start-up, the database check, each chain's check, and the reasons it fails."""
        reasons: list[dict] = []
        if self.starting is not None and not self.starting.done:
            reasons.append({"check": "start-up", "reason": f"starting: {self.starting.waiting_for}"})
        try:
            ping(self.store)
            database = "ok"
        except sqlite3.Error as exc:
            database = "error"
            reasons.append({"check": "database", "reason": f"the database does not answer: {exc}"})
        chains = []
        try:
            positions = self.positions() if database == "ok" else []
        except sqlite3.Error as exc:  # answered SELECT 1 but not the checkpoints
            positions = []
            reasons.append({"check": "database", "reason": f"the checkpoints cannot be read: {exc}"})
        now = self.clock()
        for position in positions:
            chain, why = self._chain_readiness(*position, now)
            chains.append(chain)
            reasons += [
                {
                    "check": "chain",
                    "network": chain["network"],
                    "reason": r,
                    "last_error": chain["last_error"],
                }
                for r in why
            ]
        if not reasons:
            return True, {"status": "ready", "database": database, "chains": chains}
        detail = "; ".join(
            (f"{r['network']} {r['reason']}" if "network" in r else r["reason"])
            + (f" (last error: {r['last_error']})" if r.get("last_error") else "")
            for r in reasons
        )
        return False, {
            "type": "urn:watcher:problem:not-ready",
            "title": "Not ready",
            "status": 503,
            "detail": detail,
            "reasons": reasons,
            "database": database,
            "chains": chains,
        }


def _watch_set_loading(follower: Follower | RemoteFollower | None) -> list[str]:
    """Why a chain is not ready while its watch set loads (watchload): how far it is."""
    if follower is None or follower.watch.loaded:
        return []
    loaded, total = follower.watch.progress
    if not total:
        return ["watch set loading: counting its options"]
    return [f"watch set loading: {loaded:,} of {total:,} options"]


# --------------------------------------------------------------------------- response shapes


class _Out(BaseModel):
    model_config = API_MODEL


DeliveryStatusName = Literal["pending", "delivered", "failed"]


class ChainInfo(_Out):
    name: str
    chain_id: int
    head_block: int | None = Field(description="the node's head as last read; null before the first read")
    last_processed_block: int | None = Field(description="the checkpoint; null before the first block")
    lag_blocks: int | None
    mode: Literal["poll", "ws"]
    rpc_url: str = Field(description="the URL in use, credentials replaced by ***")
    last_head_at: Timestamp | None


class ChainList(_Out):
    data: list[ChainInfo]


class WebhookDelivery(_Out):
    id: str
    event_id: str = Field(description="the webhook-id header, the same on every attempt and redelivery")
    event_type: EventTypeName
    invoice_id: str
    url: str
    status: DeliveryStatusName
    attempts: int = Field(description="attempts since the delivery was queued (or redelivered)")
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: Timestamp | None
    delivered_at: Timestamp | None


class WebhookDeliveryList(_Out):
    data: list[WebhookDelivery]
    total: int
    limit: int
    offset: int


class DeliveryQuery(BaseModel):
    """The list's filters (documentation: the handler checks them the same way)."""

    model_config = QUERY_MODEL

    status: DeliveryStatusName | None = None
    event_type: EventTypeName | None = None
    invoice_id: Annotated[str, Field(min_length=1, max_length=254)] | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    offset: Annotated[int, Field(ge=0, le=10**9)] = 0


class ChainReadiness(_Out):
    network: str
    ready: bool
    head_block: int | None
    last_processed_block: int | None
    lag_blocks: int | None
    max_lag_blocks: int
    last_head_at: Timestamp | None
    last_error: str | None


class ReadinessReason(_Out):
    check: Literal["start-up", "database", "chain"]
    network: str | None = None
    reason: str
    last_error: str | None = None


class Ready(_Out):
    status: Literal["ready"]
    database: Literal["ok"]
    chains: list[ChainReadiness]


class NotReady(_Out):
    """problem+json with the reasons."""

    type: str
    title: str
    status: Literal[503]
    detail: str
    reasons: list[ReadinessReason]
    database: Literal["ok", "error"]
    chains: list[ChainReadiness]


def _inlined(model: type[BaseModel]) -> dict:
    """A model's JSON schema with its own $defs inlined (for a response given as a schema)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


# Declarations for /openapi.json (openapi.build_document); the routes below are these.
OPERATIONS = [
    Operation(
        "GET",
        "/readyz",
        "Ready when the database answers and every chain's lag is within bounds",
        {200: Ready, 503: (PROBLEM, lambda: _inlined(NotReady))},
        auth=False,
        tags=("operations",),
    ),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics (text format)",
        {200: (CONTENT_TYPE_LATEST.split(";")[0], {"type": "string"})},
        auth=False,
        tags=("operations",),
    ),
    Operation(
        "GET",
        "/v1/chains",
        "Each configured chain: head, checkpoint, lag, RPC URL in use",
        {200: ChainList},
        tags=("operations",),
        problems=(422,),
    ),
    Operation(
        "GET",
        "/v1/webhook-deliveries",
        "Webhook deliveries, newest first",
        {200: WebhookDeliveryList},
        query=DeliveryQuery,
        tags=("webhooks",),
        problems=(422,),
    ),
    Operation(
        "POST",
        "/v1/webhook-deliveries/{id}/redeliver",
        "Queue the same event (same webhook-id) again to the same endpoint, due now, "
        "with a fresh retry schedule",
        {200: WebhookDelivery},
        tags=("webhooks",),
        problems=(400, 404, 409, 413, 422),
    ),
]


# --------------------------------------------------------------------------- query parsing


def delivery_filters(request: web.Request) -> dict[str, str]:
    """Known filters only, each once and valid: a misspelt one must not return everything."""
    known = (*DELIVERY_FILTERS, "limit", "offset")
    for name in request.query:
        if name not in known:
            raise invalid(name, f"unknown query parameter (known: {', '.join(known)})")
    filters = {}
    for name in DELIVERY_FILTERS:
        value = single_query(request, name)
        if value is not None:
            filters[name] = value
    if "status" in filters and filters["status"] not in DELIVERY_STATUSES:
        raise invalid("status", f"must be one of {', '.join(DELIVERY_STATUSES)}")
    if "event_type" in filters and filters["event_type"] not in EVENT_TYPES:
        raise invalid("event_type", f"must be one of {', '.join(sorted(EVENT_TYPES))}")
    if "invoice_id" in filters and not 1 <= len(filters["invoice_id"]) <= 254:
        raise invalid("invoice_id", "must be 1 to 254 characters")
    return filters


# --------------------------------------------------------------------------- routes


def add_ops_routes(app: web.Application, ops: Ops, metrics: Metrics) -> None:
    store = ops.store

    async def readyz(request: web.Request) -> web.Response:
        ready, body = ops.readiness()
        if ready:
            return json_response(body)
        return web.Response(status=503, body=orjson.dumps(body), content_type=PROBLEM)

    async def metrics_route(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def list_chains(request: web.Request) -> web.Response:
        if request.query:
            raise invalid(next(iter(request.query)), "unknown query parameter (this route takes none)")
        return json_response({"data": ops.chains()})

    async def list_deliveries(request: web.Request) -> web.Response:
        filters = delivery_filters(request)
        limit = query_int(request, "limit", 50, 1, 200)
        offset = query_int(request, "offset", 0, 0, 10**9)
        data, total = store.outbox.list_deliveries(**filters, limit=limit, offset=offset)
        return json_response({"data": data, "total": total, "limit": limit, "offset": offset})

    async def redeliver(request: web.Request) -> web.Response:
        delivery_id = request.match_info["id"]
        body = await read_json(request, required=False)
        if not isinstance(body, dict):
            raise invalid("body", "must be a JSON object (or empty)")
        if body:
            raise invalid(str(next(iter(body))), "unknown field (this route takes no body)")
        try:
            delivery = await store.write(store.outbox.redeliver, delivery_id)
        except StateConflict as exc:
            raise Problem(409, "Conflict", str(exc), slug="state-conflict") from None
        if delivery is None:
            raise Problem(404, "Not found", f"no webhook delivery {delivery_id!r}", slug="not-found")
        return json_response(delivery)

    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_get("/v1/chains", list_chains)
    app.router.add_get("/v1/webhook-deliveries", list_deliveries)
    app.router.add_post("/v1/webhook-deliveries/{id}/redeliver", redeliver)
