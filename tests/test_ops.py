"""Operations routes end to end (contract §3): `/v1/chains`, `/readyz`, `/metrics`,
`/v1/webhook-deliveries` and redelivery, on a real daemon over HTTP.

`MirrorHarness` adds a second chain, "mirror": the same eth-tester chain reached over real
HTTP through a local JSON-RPC proxy that the test can "freeze" (answer chosen methods with
an error), so a chain can be made unreachable, or made to lag behind a head it still sees.
Its URL carries credentials in every place a provider puts them, and its errors quote them.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
import prometheus_client
import pytest
from aiohttp import web
from harness import Harness, free_port
from prometheus_client.parser import text_string_to_metric_families

from watcher.config import EVENT_TYPES, settings_from_dict
from watcher.openapi import build_document
from watcher.ops import (
    OPERATIONS,
    ChainList,
    DeliveryQuery,
    NotReady,
    Ready,
    WebhookDelivery,
    WebhookDeliveryList,
)
from watcher.sandbox import sandbox_settings_data
from watcher.store.outbox import DELIVERY_STATUSES

PROBLEM = "application/problem+json"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
DELIVERY_KEYS = {
    "id",
    "event_id",
    "event_type",
    "invoice_id",
    "url",
    "status",
    "attempts",
    "last_status_code",
    "last_error",
    "next_attempt_at",
    "delivered_at",
}
MIRROR_CHAIN_ID = 4242
SECRET_PATH = "abcdef0123456789abcdef0123456789"
SECRET_QUERY = "sekret123"


# --------------------------------------------------------------------------- a second chain over HTTP


class RpcProxy:
    """A node over HTTP for the mirror chain: forwards to the sandbox chain, or refuses."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.frozen: set[str] = set()  # methods answered with an error; "*" for all
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://user:pass@127.0.0.1:{self.port}/v3/{SECRET_PATH}?apikey={SECRET_QUERY}"

    async def _answer(self, request: web.Request, call: dict) -> dict:
        method, params = call["method"], call.get("params", [])
        if "*" in self.frozen or method in self.frozen:
            # Errors quoting the URL happen (proxies, gateways): the watcher must not repeat its secrets.
            return {
                "jsonrpc": "2.0",
                "id": call["id"],
                "error": {"code": -32000, "message": f"frozen by the test at {request.path_qs}"},
            }
        if method == "eth_chainId":
            return {"jsonrpc": "2.0", "id": call["id"], "result": hex(MIRROR_CHAIN_ID)}
        assert self.harness.chain is not None
        result = await self.harness.chain.transport.call(method, params)
        return {"jsonrpc": "2.0", "id": call["id"], "result": result}

    async def _handle(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())
        if isinstance(payload, list):
            answers: Any = [await self._answer(request, c) for c in payload]
        else:
            answers = await self._answer(request, payload)
        return web.Response(body=orjson.dumps(answers), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class MirrorHarness(Harness):
    def __init__(self, tmp_path, *, frozen: set[str] = frozenset()) -> None:
        super().__init__(tmp_path)
        self.proxy = RpcProxy(self)
        self.proxy.frozen = set(frozen)

    async def start(self) -> MirrorHarness:
        await self.proxy.start()
        await super().start()
        return self

    async def close(self) -> None:
        await super().close()
        await self.proxy.stop()

    def settings(self):
        assert self.chain is not None
        sandbox = sandbox_settings_data(self.chain, confirmations=self.confirmations, poll_interval=0.05)
        mirror = {
            "name": "mirror",
            "chain_id": MIRROR_CHAIN_ID,
            "rpc_urls": [self.proxy.url],
            "poll_interval_seconds": 0.05,
            "confirmations": 3,
            "start_block": 0,
            # No xpub and no rate: invoices get no option here; the chain is only followed.
            "assets": [
                {"symbol": "TUSD", "kind": "erc20", "contract": self.chain.deployed.token, "decimals": 6}
            ],
        }
        return settings_from_dict(
            {
                "database": str(self.tmp_path / "watcher.db"),
                "log_format": "console",
                "log_level": "warning",
                "http": {"listen": f"127.0.0.1:{free_port()}", "api_key_env": "API_KEY"},
                "webhooks": [{"url": self.receiver.url, "secret_env": "HOOK_SECRET"}],
                "chains": [sandbox, mirror],
            },
            env={"API_KEY": self.api_key, "HOOK_SECRET": self.receiver.secret},
        )

    def processed(self, network: str) -> int | None:
        assert self.service is not None and self.service.store is not None
        cursor = self.service.store.cursor(network)
        return cursor.number if cursor else None


@pytest.fixture
async def mirror(harnesses):
    return await harnesses(MirrorHarness)


# --------------------------------------------------------------------------- helpers


async def scrape(h: Harness) -> dict[tuple[str, tuple], float]:
    """The /metrics samples, by (sample name, sorted labels); fetched without the API key."""
    assert h.http is not None
    async with h.http.get(h.base_url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def readyz(h: Harness) -> tuple[int, Any, str]:
    status, body, ctype = await h.request("GET", "/readyz", auth=False)
    (Ready if status == 200 else NotReady).model_validate(body)  # the documented shapes
    return status, body, ctype


async def deliveries(h: Harness, query: str = "") -> dict:
    status, body, _ = await h.request("GET", "/v1/webhook-deliveries" + query)
    assert status == 200, body
    WebhookDeliveryList.model_validate(body)
    return body


async def redeliver(h: Harness, delivery_id: str, **options: Any) -> tuple[int, Any, str]:
    status, body, ctype = await h.request(
        "POST", f"/v1/webhook-deliveries/{delivery_id}/redeliver", **options
    )
    if status == 200:
        WebhookDelivery.model_validate(body)
    return status, body, ctype


async def delivery_of(h: Harness, invoice_id: str, event_type: str) -> dict:
    [row] = (await deliveries(h, f"?invoice_id={invoice_id}&event_type={event_type}"))["data"]
    return row


def bump(h: Harness, delivery_id: str) -> None:
    """Bring a scheduled retry forward instead of sleeping through the schedule."""
    assert h.service is not None and h.service.store is not None and h.service.dispatcher is not None
    h.service.store.db.execute(
        "UPDATE deliveries SET next_attempt_at = ? WHERE id = ?", [time.time(), delivery_id]
    )
    h.service.dispatcher.wake()


# --------------------------------------------------------------------------- /v1/chains


async def test_chains_report_head_checkpoint_and_lag_per_chain(mirror):
    h = mirror
    head = await h.mine(3)
    await h.wait_for(
        lambda: h.processed("sandbox") == head and h.processed("mirror") == head, what="both chains at head"
    )
    status, body, ctype = await h.request("GET", "/v1/chains")
    assert status == 200 and ctype.startswith("application/json")
    ChainList.model_validate(body)
    by_name = {c["name"]: c for c in body["data"]}
    assert list(by_name) == ["sandbox", "mirror"]  # in configuration order
    for chain in by_name.values():
        assert set(chain) == {
            "name",
            "chain_id",
            "head_block",
            "last_processed_block",
            "lag_blocks",
            "mode",
            "rpc_url",
            "last_head_at",
        }
        assert chain["head_block"] >= head and chain["last_processed_block"] == head
        assert chain["lag_blocks"] == chain["head_block"] - head
        assert chain["mode"] == "poll"
        assert RFC3339.match(chain["last_head_at"]), chain
    assert by_name["sandbox"]["chain_id"] == h.chain.chain_id
    assert by_name["sandbox"]["rpc_url"] == "eth-tester://in-process"
    assert by_name["mirror"]["chain_id"] == MIRROR_CHAIN_ID
    assert by_name["mirror"]["rpc_url"] == f"http://127.0.0.1:{h.proxy.port}/v3/***?apikey=***"


# --------------------------------------------------------------------------- /readyz


async def test_readyz_follows_each_chain_from_unreachable_to_lagging_to_stale(tmp_path):
    h = MirrorHarness(tmp_path, frozen={"*"})  # the mirror's node refuses everything from the start
    await h.start()
    try:
        # Never reached: not ready, the follower's last error quoted (without the URL's secrets).
        async def unreachable():  # (and the sandbox chain ready: its watch set loaded, its first step done)
            status, body, ctype = await readyz(h)
            reasons = body["reasons"] if status == 503 else []
            if any(r.get("last_error") for r in reasons) and all(r["network"] == "mirror" for r in reasons):
                return status, body, ctype

        status, body, ctype = await h.wait_for(unreachable, what="503 with the follower's error")
        assert ctype.startswith(PROBLEM)
        assert (
            body["type"] == "urn:watcher:problem:not-ready"
            and body["status"] == 503
            and body["title"] == "Not ready"
        )
        assert body["database"] == "ok"
        [reason, *more] = body["reasons"]
        assert all(r["network"] == "mirror" for r in body["reasons"])  # the sandbox chain is fine
        assert reason["check"] == "chain" and "has not read the node's head" in reason["reason"]
        assert reason["last_error"].startswith("eth_blockNumber: frozen by the test at /v3/***")
        text = orjson.dumps(body).decode()
        assert SECRET_PATH not in text and SECRET_QUERY not in text and "pass" not in text
        assert "mirror has not read the node's head" in body["detail"]
        chains = {c["network"]: c for c in body["chains"]}
        assert chains["sandbox"]["ready"] is True and chains["mirror"]["ready"] is False
        assert chains["mirror"]["head_block"] is None and chains["mirror"]["max_lag_blocks"] == 10

        # Reachable: ready.
        h.proxy.frozen = set()
        status, body, _ = await h.wait_for(lambda: _ready(h), what="ready")
        assert body["status"] == "ready" and body["database"] == "ok"
        assert [(c["network"], c["ready"], c["lag_blocks"]) for c in body["chains"]] == [
            ("sandbox", True, 0),
            ("mirror", True, 0),
        ]

        # The node answers its head but not its blocks: the checkpoint stays, the lag grows past the bound.
        h.proxy.frozen = {"eth_getBlockByNumber"}
        before = h.processed("mirror")
        head = await h.mine(12)

        async def lagging():
            status, body, _ = await readyz(h)
            if status == 503 and any(
                "blocks behind" in r["reason"] and r["last_error"] for r in body["reasons"]
            ):
                return body

        body = await h.wait_for(lagging, what="503 for the lag")
        # (The sandbox chain may lag for a moment too, behind the 12 blocks just mined.)
        [reason] = [r for r in body["reasons"] if r["network"] == "mirror"]
        assert reason["reason"] == f"is {head - before} blocks behind the node's head (bound 10)"
        assert reason["last_error"].startswith("eth_getBlockByNumber: frozen by the test")
        status, chains, _ = await h.request("GET", "/v1/chains")
        [row] = [c for c in chains["data"] if c["name"] == "mirror"]
        assert (row["head_block"], row["last_processed_block"], row["lag_blocks"]) == (
            head,
            before,
            head - before,
        )
        await h.wait_for(
            lambda: (h.processed("sandbox") or -1) >= head,
            what="the sandbox chain at the head (busy machines lag)",
        )
        samples = await scrape(h)
        assert sample(samples, "watcher_head_lag_blocks", network="mirror") == head - before
        assert sample(samples, "watcher_head_lag_blocks", network="sandbox") == 0
        assert (
            sample(samples, "watcher_rpc_errors_total", network="mirror", method="eth_getBlockByNumber") >= 1
        )
        assert (
            sample(samples, "watcher_rpc_errors_total", network="mirror", method="eth_blockNumber") >= 1
        )  # from the start
        assert (
            sample(samples, "watcher_rpc_errors_total", network="sandbox", method="eth_getBlockByNumber")
            is None
        )

        # Catching up makes it ready again.
        h.proxy.frozen = set()
        await h.wait_for(lambda: _ready(h), what="ready after catching up")

        # A node that stops answering: the head it last gave goes stale.
        assert h.service is not None and h.service.ops is not None
        h.service.ops.head_max_age = 0.5
        h.proxy.frozen = {"*"}

        async def stale():
            status, body, _ = await readyz(h)
            if status == 503 and any("last read the node's head" in r["reason"] for r in body["reasons"]):
                return body

        body = await h.wait_for(stale, what="503 for a stale head")
        assert {r["network"] for r in body["reasons"]} == {"mirror"}
    finally:
        await h.close()


async def _ready(h: Harness):
    status, body, ctype = await readyz(h)
    if status == 200:
        assert ctype.startswith("application/json")
        return status, body, ctype


async def test_readyz_is_503_when_the_database_does_not_answer(harness):
    h = harness
    await h.wait_for(lambda: _ready(h), what="ready")
    assert h.service is not None and h.service.store is not None
    h.service.store.db.conn.close()  # as if the file had gone away under the daemon
    status, body, ctype = await readyz(h)
    assert status == 503 and ctype.startswith(PROBLEM)
    assert body["database"] == "error"
    assert [r["check"] for r in body["reasons"]] == ["database"]
    assert body["reasons"][0]["reason"].startswith("the database does not answer")
    # /metrics still answers, without the series read from the database.
    samples = await scrape(h)
    assert sample(samples, "watcher_invoices", status="pending") is None
    assert sample(samples, "watcher_head_block", network="sandbox") is None
    assert sample(samples, "watcher_build_info", version=__import__("watcher").__version__) == 1


# --------------------------------------------------------------------------- /metrics


async def test_metrics_count_blocks_rpc_payments_invoices_and_webhooks(harness):
    h = harness
    invoice = await h.create(amount="5")
    await h.create(amount="7")  # stays pending
    await h.pay(invoice["id"])
    await h.mine(1)
    await h.wait_status(invoice["id"], "paid")
    await h.pay(invoice["id"], amount="1")  # after it was paid: a duplicate
    await h.mine(3)
    await h.wait_invoice(
        invoice["id"],
        lambda i: i["status"] == "confirmed" and len(i["payments"]) == 2,
        "confirmed, 2 payments",
    )
    await h.settle()
    assert h.service is not None and h.service.store is not None
    head = h.service.store.cursor("sandbox").number

    samples = await scrape(h)
    assert sample(samples, "watcher_build_info", version=__import__("watcher").__version__) == 1
    # Blocks: the sandbox chain is followed from block 0, each block once.
    assert sample(samples, "watcher_blocks_processed_total", network="sandbox") == head + 1
    assert sample(samples, "watcher_last_processed_block", network="sandbox") == head
    assert sample(samples, "watcher_head_block", network="sandbox") == head
    assert sample(samples, "watcher_head_lag_blocks", network="sandbox") == 0
    assert sample(samples, "watcher_last_head_timestamp_seconds", network="sandbox") == pytest.approx(
        time.time(), abs=30
    )
    # RPC: every method the follower uses, no errors.
    assert sample(samples, "watcher_rpc_calls_total", network="sandbox", method="eth_chainId") == 1
    for method in ("eth_blockNumber", "eth_getBlockByNumber", "eth_getLogs"):
        assert sample(samples, "watcher_rpc_calls_total", network="sandbox", method=method) >= 1, method
    assert not [k for k in samples if k[0] == "watcher_rpc_errors_total"]
    # Payments by role; invoices by status (every status shows, 0 or not).
    assert sample(samples, "watcher_payments_recorded_total", network="sandbox", role="counted") == 1
    assert sample(samples, "watcher_payments_recorded_total", network="sandbox", role="duplicate") == 1
    invoices = {dict(k[1])["status"]: v for k, v in samples.items() if k[0] == "watcher_invoices"}
    assert invoices == {
        "draft": 0,
        "pending": 1,
        "paid": 0,
        "confirmed": 1,
        "expired": 0,
        "underpaid": 0,
        "cancelled": 0,
    }
    # Webhooks: one attempt per delivered event, timed; nothing left in the outbox.
    delivered = len(h.receiver.events)
    assert delivered == (await deliveries(h, "?status=delivered"))["total"] > 0
    assert sample(samples, "watcher_webhook_deliveries_total", outcome="delivered") == delivered
    assert sample(samples, "watcher_webhook_deliveries_total", outcome="retry") == 0
    assert sample(samples, "watcher_webhook_deliveries_total", outcome="failed") == 0
    assert sample(samples, "watcher_webhook_delivery_duration_seconds_count") == delivered
    assert 0 < sample(samples, "watcher_webhook_delivery_duration_seconds_sum") < 10 * delivered
    assert sample(samples, "watcher_webhook_delivery_duration_seconds_bucket", le="+Inf") == delivered
    assert sample(samples, "watcher_webhook_outbox_backlog") == 0


async def test_metrics_are_per_daemon_and_show_the_backlog(harness, tmp_path):
    h = harness
    assert h.service is not None
    assert h.service.metrics.registry is not prometheus_client.REGISTRY
    h.receiver.fail_next = 1
    invoice = await h.create(amount="2")
    await h.wait_for(lambda: h.receiver.attempts >= 1, what="first attempt")
    samples = await h.wait_for(
        lambda: _with(h, "watcher_webhook_deliveries_total", 1, outcome="retry"), what="a retry counted"
    )
    assert sample(samples, "watcher_webhook_outbox_backlog") == 1
    assert sample(samples, "watcher_webhook_deliveries_total", outcome="delivered") == 0

    # A second daemon in the same process counts on its own.
    other = Harness(tmp_path / "other")
    await other.start()
    try:
        await other.settle()
        mine = await scrape(other)
        assert sample(mine, "watcher_webhook_deliveries_total", outcome="retry") == 0
        assert sample(mine, "watcher_rpc_calls_total", network="sandbox", method="eth_chainId") == 1
    finally:
        await other.close()

    bump(h, (await delivery_of(h, invoice["id"], "invoice.created"))["id"])
    samples = await h.wait_for(
        lambda: _with(h, "watcher_webhook_deliveries_total", 1, outcome="delivered"), what="delivered"
    )
    assert sample(samples, "watcher_webhook_outbox_backlog") == 0
    assert sample(samples, "watcher_webhook_delivery_duration_seconds_count") == 2


async def _with(h: Harness, name: str, value: float, **labels: str):
    samples = await scrape(h)
    return samples if sample(samples, name, **labels) == value else None


# --------------------------------------------------------------------------- /v1/webhook-deliveries


async def test_deliveries_list_filters_and_pages(harness):
    h = harness
    first = await h.create(amount="3")
    second = await h.create(amount="4")
    await h.pay(second["id"])
    await h.mine(1)
    await h.wait_status(second["id"], "paid")
    await h.settle()

    everything = await deliveries(h, "?limit=200")
    rows = everything["data"]
    assert everything["total"] == len(rows) == len(h.receiver.events) >= 4
    assert (everything["limit"], everything["offset"]) == (200, 0)
    for row in rows:
        assert set(row) == DELIVERY_KEYS
        assert row["url"] == h.receiver.url and row["status"] == "delivered"
        assert (row["attempts"], row["last_status_code"], row["last_error"], row["next_attempt_at"]) == (
            1,
            204,
            None,
            None,
        )
        assert RFC3339.match(row["delivered_at"])
    # Newest first: the reverse of the order they were queued (and, one at a time here, received).
    assert [r["event_id"] for r in rows] == [e.event_id for e in reversed(h.receiver.events)]
    assert rows[-1]["event_type"] == "invoice.created" and rows[-1]["invoice_id"] == first["id"]

    created = await deliveries(h, "?event_type=invoice.created")
    assert created["total"] == 2 and {r["invoice_id"] for r in created["data"]} == {first["id"], second["id"]}
    of_second = await deliveries(h, f"?invoice_id={second['id']}")
    assert of_second["total"] == len([r for r in rows if r["invoice_id"] == second["id"]])
    assert {r["event_type"] for r in of_second["data"]} >= {
        "invoice.created",
        "invoice.payment_detected",
        "invoice.paid",
    }
    both = await deliveries(h, f"?invoice_id={second['id']}&event_type=invoice.paid&status=delivered")
    assert both["total"] == 1 and both["data"][0]["event_type"] == "invoice.paid"
    assert (await deliveries(h, "?status=failed")) == {"data": [], "total": 0, "limit": 50, "offset": 0}
    assert (await deliveries(h, "?status=pending"))["total"] == 0
    assert (await deliveries(h, "?invoice_id=inv_unknown"))["total"] == 0

    page = await deliveries(h, "?limit=2&offset=1")
    assert (page["total"], page["limit"], page["offset"]) == (len(rows), 2, 1)
    assert page["data"] == rows[1:3]
    past = await deliveries(h, f"?offset={len(rows)}")
    assert past["data"] == [] and past["total"] == len(rows)


async def test_redeliver_sends_the_same_event_again(harness):
    h = harness
    invoice = await h.create(amount="6")
    await h.settle()
    row = await delivery_of(h, invoice["id"], "invoice.created")
    assert row["status"] == "delivered"

    # A delivered one, sent again on the operator's request: same event id, same body.
    status, queued, ctype = await redeliver(h, row["id"])
    assert status == 200 and ctype.startswith("application/json"), queued
    assert set(queued) == DELIVERY_KEYS
    assert (
        queued["id"],
        queued["event_id"],
        queued["status"],
        queued["attempts"],
        queued["delivered_at"],
    ) == (row["id"], row["event_id"], "pending", 0, None)
    assert RFC3339.match(queued["next_attempt_at"])

    def twice() -> list | None:
        got = [e for e in h.receiver.events if e.event_id == row["event_id"]]
        return got if len(got) == 2 else None

    events = await h.wait_for(twice, what="the event twice")
    assert [e.headers["webhook-id"] for e in events] == [row["event_id"]] * 2
    assert events[0].body == events[1].body
    assert h.receiver.bad_signatures == 0
    again = await h.wait_for(lambda: _delivery_with(h, row["id"], "delivered"), what="delivered again")
    assert (again["attempts"], again["last_status_code"]) == (1, 204)
    # The list still has one row for it (a redelivery is the same delivery).
    assert (await deliveries(h, f"?invoice_id={invoice['id']}&event_type=invoice.created"))["total"] == 1


async def test_a_failed_delivery_can_be_redelivered(harness):
    h = harness
    h.receiver.fail_next = 100
    invoice = await h.create(amount="8")
    row = await h.wait_for(
        lambda: _delivery_with(h, None, "pending", invoice["id"], attempts=1), what="first failure"
    )
    assert (row["last_status_code"], row["last_error"]) == (500, "HTTP 500")
    assert RFC3339.match(row["next_attempt_at"])
    # Through the retry schedule (7 retries), brought forward, to failed.
    for attempt in range(2, 9):
        bump(h, row["id"])
        row = await h.wait_for(
            lambda row_id=row["id"], attempt=attempt: _delivery_with(h, row_id, None, attempts=attempt),
            what=f"attempt {attempt}",
        )
    assert (row["status"], row["next_attempt_at"], row["delivered_at"]) == ("failed", None, None)
    assert (await deliveries(h, "?status=failed"))["data"] == [row]
    samples = await scrape(h)
    assert sample(samples, "watcher_webhook_deliveries_total", outcome="retry") == 7
    assert sample(samples, "watcher_webhook_deliveries_total", outcome="failed") == 1
    assert h.receiver.events == []

    h.receiver.fail_next = 0
    status, queued, _ = await redeliver(h, row["id"], json={})
    assert status == 200 and (queued["status"], queued["attempts"]) == ("pending", 0), queued
    [event] = await h.wait_events(invoice["id"], "invoice.created")
    assert event.event_id == row["event_id"] and event.headers["webhook-id"] == row["event_id"]
    done = await h.wait_for(lambda: _delivery_with(h, row["id"], "delivered"), what="delivered")
    assert (done["attempts"], done["last_status_code"], done["last_error"]) == (1, 204, None)


async def test_redelivering_a_pending_delivery_sends_it_now(harness):
    h = harness
    h.receiver.fail_next = 1
    invoice = await h.create(amount="9")
    row = await h.wait_for(
        lambda: _delivery_with(h, None, "pending", invoice["id"], attempts=1), what="first failure"
    )
    started = time.monotonic()
    status, _, _ = await redeliver(h, row["id"])
    assert status == 200
    await h.wait_events(invoice["id"], "invoice.created")
    assert time.monotonic() - started < 4  # not at the scheduled retry, 5 s after the failure


async def _delivery_with(
    h: Harness,
    delivery_id: str | None,
    status: str | None,
    invoice_id: str | None = None,
    attempts: int | None = None,
) -> dict | None:
    query = f"?invoice_id={invoice_id}" if invoice_id else "?limit=200"
    for row in (await deliveries(h, query))["data"]:
        if delivery_id not in (None, row["id"]):
            continue
        if (status is None or row["status"] == status) and (attempts is None or row["attempts"] == attempts):
            return row
    return None


# --------------------------------------------------------------------------- bad input


async def test_bad_input_on_every_ops_route_is_a_problem(harness):
    h = harness
    invoice = await h.create(amount="1")
    await h.settle()
    row = await delivery_of(h, invoice["id"], "invoice.created")
    before = await deliveries(h, "?limit=200")
    redeliver = f"/v1/webhook-deliveries/{row['id']}/redeliver"

    cases: list[tuple[str, str, int, str | None, dict]] = [
        # (method, path, status, the 422's field, request options)
        ("GET", "/v1/chains", 401, None, {"auth": False}),
        ("GET", "/v1/webhook-deliveries", 401, None, {"auth": False}),
        ("POST", redeliver, 401, None, {"auth": False}),
        ("POST", "/v1/webhook-deliveries/dlv_unknown/redeliver", 401, None, {"auth": False}),
        (
            "GET",
            "/v1/chains",
            401,
            None,
            {"auth": False, "headers": {"Authorization": "Bearer wrong-key-of-some-length"}},
        ),
        ("GET", "/v1/chains?verbose=1", 422, "verbose", {}),
        ("POST", "/v1/chains", 405, None, {}),
        ("GET", "/v1/webhook-deliveries?status=sent", 422, "status", {}),
        ("GET", "/v1/webhook-deliveries?status=", 422, "status", {}),
        ("GET", "/v1/webhook-deliveries?status=pending&status=failed", 422, "status", {}),
        ("GET", "/v1/webhook-deliveries?event_type=invoice.nope", 422, "event_type", {}),
        ("GET", "/v1/webhook-deliveries?event_type=*", 422, "event_type", {}),
        ("GET", "/v1/webhook-deliveries?invoice_id=", 422, "invoice_id", {}),
        ("GET", "/v1/webhook-deliveries?invoice_id=" + "x" * 300, 422, "invoice_id", {}),
        ("GET", "/v1/webhook-deliveries?limit=0", 422, "limit", {}),
        ("GET", "/v1/webhook-deliveries?limit=201", 422, "limit", {}),
        ("GET", "/v1/webhook-deliveries?limit=ten", 422, "limit", {}),
        ("GET", "/v1/webhook-deliveries?limit=", 422, "limit", {}),
        ("GET", "/v1/webhook-deliveries?offset=-1", 422, "offset", {}),
        ("GET", "/v1/webhook-deliveries?offset=1.5", 422, "offset", {}),
        ("GET", "/v1/webhook-deliveries?offset=%D9%A1", 422, "offset", {}),  # a non-ASCII digit
        ("GET", "/v1/webhook-deliveries?offset=99999999999999", 422, "offset", {}),
        ("GET", "/v1/webhook-deliveries?page=2", 422, "page", {}),
        ("GET", "/v1/webhook-deliveries?Status=failed", 422, "Status", {}),
        ("DELETE", "/v1/webhook-deliveries", 405, None, {}),
        ("POST", "/v1/webhook-deliveries/dlv_unknown/redeliver", 404, None, {}),
        ("POST", "/v1/webhook-deliveries/%20/redeliver", 404, None, {}),
        ("POST", "/v1/webhook-deliveries/dlv_unknown/redeliver", 404, None, {"json": {}}),
        ("GET", redeliver, 405, None, {}),
        ("POST", redeliver, 400, None, {"data": b"{", "headers": {"Content-Type": "application/json"}}),
        ("POST", redeliver, 400, None, {"data": b"\xff", "headers": {"Content-Type": "application/json"}}),
        ("POST", redeliver, 422, "body", {"json": []}),
        ("POST", redeliver, 422, "body", {"data": b"null", "headers": {"Content-Type": "application/json"}}),
        ("POST", redeliver, 422, "force", {"json": {"force": True}}),
        ("POST", redeliver, 415, None, {"data": b"{}", "headers": {"Content-Type": "text/plain"}}),
        (
            "POST",
            redeliver,
            413,
            None,
            {"data": b'{"a": "' + b"x" * 70_000 + b'"}', "headers": {"Content-Type": "application/json"}},
        ),
        ("POST", "/readyz", 405, None, {"auth": False}),
        ("POST", "/metrics", 405, None, {"auth": False}),
    ]
    failures = []
    for method, path, expected, field, options in cases:
        status, body, ctype = await h.request(method, path, **options)
        problem_ok = ctype.startswith(PROBLEM) and isinstance(body, dict) and body.get("status") == expected
        field_ok = field is None or (body.get("errors") or [{}])[0].get("field") == field
        if status != expected or not problem_ok or not field_ok:
            failures.append(
                (method, path[:80], expected, status, body if isinstance(body, dict) else str(body)[:200])
            )
    assert not failures, "\n".join(map(str, failures))

    # Nothing above changed a delivery or queued one again (a re-queue is written before the
    # route answers, and counted in the row) ...
    assert h.service is not None and h.service.store is not None
    store = h.service.store

    def requeues() -> int:
        return store.db.execute("SELECT COALESCE(SUM(requeues), 0) AS n FROM deliveries").fetchone()["n"]

    assert await deliveries(h, "?limit=200") == before
    assert requeues() == 0
    received = len(h.receiver.events)
    assert received == before["total"]
    # ... and nothing is on its way to the receiver: one good redelivery behind them arrives
    # alone, as the one re-queue, the same event again.
    status, _, _ = await h.request("POST", redeliver)
    assert status == 200
    await h.wait_for(lambda: len(h.receiver.events) > received, what="the good redelivery")
    await h.settle()
    assert requeues() == 1
    [again] = h.receiver.events[received:]
    assert again.event_id == row["event_id"] and again.type == "invoice.created"
    after = await deliveries(h, "?limit=200")
    others = [r for r in after["data"] if r["id"] != row["id"]]
    assert others == [r for r in before["data"] if r["id"] != row["id"]]
    [redelivered] = [r for r in after["data"] if r["id"] == row["id"]]
    assert (redelivered["status"], redelivered["attempts"]) == ("delivered", 1)
    before = after

    # The open routes need no key.
    for path in ("/readyz", "/metrics", "/healthz"):
        status, _, _ = await h.request("GET", path, auth=False)
        assert status == 200, path

    # An endpoint removed from the configuration (a SIGHUP reload, say): nothing to redeliver to.
    store.outbox.set_endpoints([])
    status, body, ctype = await h.request("POST", redeliver)
    assert status == 409 and ctype.startswith(PROBLEM) and "no longer configured" in body["detail"]
    assert await deliveries(h, "?limit=200") == before


def test_the_documented_query_and_shapes_match_the_handlers():
    fields = DeliveryQuery.model_fields
    assert set(fields["status"].annotation.__args__[0].__args__) == set(DELIVERY_STATUSES)
    assert set(fields["event_type"].annotation.__args__[0].__args__) == EVENT_TYPES
    document = build_document(OPERATIONS, version="test")
    assert set(document["paths"]) == {
        "/readyz",
        "/metrics",
        "/v1/chains",
        "/v1/webhook-deliveries",
        "/v1/webhook-deliveries/{id}/redeliver",
    }
    assert "$defs" not in orjson.dumps(document).decode()  # every reference resolves within the document
