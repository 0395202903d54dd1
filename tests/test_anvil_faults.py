"""Provider faults between the watcher and a real node, end to end through HTTP and the
webhook receiver.

The daemon talks to anvil through `FaultProxy`, which times out, answers 429/5xx, garbles
bodies, rewrites log block hashes or resets every connection on demand. Whatever it does, a
payment is recorded once, with the canonical block hash, or not yet; the retries and
failovers show in the log, in `/metrics` and in `/readyz`.

Timings are shortened for the tests (nothing in the watcher is changed): the service's RPC
timeout (`watcher.service.RPC_TIMEOUT`, read when a chain's transport is built) and
`FailoverTransport`'s default backoff schedule and failback cool-down (keyword defaults: the
service passes neither, so there is no setting for them).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from anvil_harness import PAYERS, AnvilHarness
from faultproxy import Fault
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

import watcher.ops
import watcher.service
from watcher.chain.failover import ENDPOINT_RETRY_DELAYS, FailoverTransport

NETWORK = "anvil0"
RPC_TIMEOUT = 0.5
PASS_DELAYS = (0.05, 0.1)  # FailoverTransport's backoff between passes over the list
RETURN_AFTER = 1.0  # seconds on a fallback before the preferred endpoint is tried again
# Attempts one follower step makes at a single endpoint before its read fails: each pass is
# one try and the endpoint's quick retries.
ATTEMPTS_PER_STEP = (len(PASS_DELAYS) + 1) * (len(ENDPOINT_RETRY_DELAYS) + 1)
AMOUNT = 10_000_000  # "10" TUSD (6 decimals) at usd_rate 1


@pytest.fixture(autouse=True)
def fast_rpc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watcher.service, "RPC_TIMEOUT", RPC_TIMEOUT)
    defaults = FailoverTransport.__init__.__kwdefaults__
    assert defaults is not None and {"retry_delays", "return_after"} <= defaults.keys()
    monkeypatch.setitem(defaults, "retry_delays", PASS_DELAYS)
    monkeypatch.setitem(defaults, "return_after", RETURN_AFTER)


# ---------------------------------------------------------------------------- helpers


async def metric(h: AnvilHarness, name: str, **labels: str) -> float:
    """The sum of `/metrics` samples called `name` (counters end in `_total`) with these labels."""
    status, body, _ = await h.request("GET", "/metrics", auth=False)
    assert status == 200, body
    return sum(
        sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def readyz(h: AnvilHarness) -> tuple[int, dict, dict]:
    """(status, body, this chain's entry)."""
    status, body, _ = await h.request("GET", "/readyz", auth=False)
    assert status in (200, 503), body
    [chain] = [c for c in body["chains"] if c["network"] == NETWORK]
    return status, body, chain


async def rpc_url_in_use(h: AnvilHarness) -> str:
    status, body, _ = await h.request("GET", "/v1/chains")
    assert status == 200, body
    [chain] = [c for c in body["data"] if c["name"] == NETWORK]
    return chain["rpc_url"]


def url_is(h: AnvilHarness, url: str) -> Any:
    async def check() -> bool:
        return await rpc_url_in_use(h) == url

    return check


@contextlib.asynccontextmanager
async def watching_readyz(h: AnvilHarness) -> AsyncIterator[list[tuple[int, dict]]]:
    """Polls /readyz in the background: a follower's `last_error` lasts only until its next
    step reads the head again, so it is sampled throughout rather than looked at once."""
    seen: list[tuple[int, dict]] = []

    async def poll() -> None:
        while True:
            status, _, chain = await readyz(h)
            seen.append((status, chain))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(poll())
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def errors_seen(seen: list[tuple[int, dict]]) -> list[str]:
    return [chain["last_error"] for _, chain in seen if chain["last_error"]]


async def token_invoice(h: AnvilHarness) -> tuple[dict, str]:
    invoice = await h.create(amount="10", assets=["TUSD"])
    [option] = invoice["payment_options"]
    return invoice, option["destination_address"]


async def assert_paid_once(h: AnvilHarness, invoice: dict, tx: str) -> dict:
    """The invoice reaches `paid` with exactly this transaction, at its canonical block, and
    the merchant hears `invoice.paid` once."""
    chain = h.anvil
    await h.wait_status(invoice["id"], "paid")
    await h.settle()
    paid = await h.get(invoice["id"])
    assert paid["status"] == "paid"
    [payment] = paid["payments"]
    receipt = await chain.run(chain.receipt, tx)
    assert payment["transaction_hash"] == tx
    assert payment["block_hash"] == receipt["blockHash"]
    assert payment["block_number"] == int(receipt["blockNumber"], 16)
    assert payment["amount_atomic"] == str(AMOUNT)
    assert payment["role"] == "counted"
    assert paid["payment_summary"]["payment_state"] == "exact"
    assert h.receiver.types_for(invoice["id"]).count("invoice.paid") == 1
    assert h.receiver.bad_signatures == 0
    return payment


# ---------------------------------------------------------------------------- tests


# (FaultProxy kind, watcher_rpc_endpoint_failures kind label, what /readyz's last_error names)
FAULTS = [
    ("timeout", "timeout", "TimeoutError"),
    ("http_429", "http_429", "HTTP 429"),
    ("http_503", "http_5xx", "HTTP 503"),
    ("malformed_json", "malformed", "malformed JSON"),
]


@pytest.mark.parametrize(("kind", "label", "shown"), FAULTS, ids=[f[0] for f in FAULTS])
async def test_a_faulty_getlogs_is_retried_and_the_payment_recorded_once(
    proxies, harnesses, anvil_node, kind, label, shown
):
    """One more faulty eth_getLogs than a follower step tries: the first step's read fails
    (the chain's last_error in /readyz says why), the next step's retry gets the logs."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]})
    chain = h.anvil
    invoice, address = await token_invoice(h)
    await h.settle()
    assert await metric(h, "watcher_rpc_endpoint_failures_total", network=NETWORK) == 0

    times = ATTEMPTS_PER_STEP + 1
    proxy.inject(Fault(kind, method="eth_getLogs", times=times))
    with capture_logs() as logs:
        async with watching_readyz(h) as seen:
            tx = await chain.run(chain.transfer_token, address, AMOUNT)
            await h.mine(1)
            await assert_paid_once(h, invoice, tx)

    assert proxy.injected[(kind, "eth_getLogs")] == times
    assert not proxy.faults  # every fault was spent
    assert await metric(h, "watcher_rpc_endpoint_failures_total", network=NETWORK, kind=label) >= times
    assert await metric(h, "watcher_rpc_errors_total", network=NETWORK, method="eth_getLogs") >= 1
    errors = errors_seen(seen)
    assert any("eth_getLogs" in e and shown in e for e in errors), errors
    assert all(status == 200 for status, _ in seen)  # retried within the bounds: never unready
    retries = [e for e in logs if e["event"] == "rpc_endpoint_retry" and e["method"] == "eth_getLogs"]
    assert retries and all(shown in e["error"] for e in retries), retries
    assert any(e["event"] == "follower_step_failed" and shown in e["error"] for e in logs)
    _, _, ready = await readyz(h)
    assert ready["last_error"] is None  # cleared by the step that succeeded


async def test_a_failing_first_rpc_url_fails_over_and_back(proxies, harnesses, anvil_node):
    """rpc_urls = [a, b] with a answering 502: the watcher reads through b (/v1/chains says
    so, a failover is counted); when a answers again it goes back after the cool-down and
    b hears nothing more."""
    node = anvil_node()
    a, b = await proxies(node.url), await proxies(node.url)
    a.inject(Fault("http_502"))  # every request, until cleared
    with capture_logs() as logs:
        h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [a.url, b.url]})
        chain = h.anvil
        invoice, address = await token_invoice(h)
        tx = await chain.run(chain.transfer_token, address, AMOUNT)
        await h.mine(1)
        payment = await assert_paid_once(h, invoice, tx)

    assert await rpc_url_in_use(h) == b.url
    assert sum(n for (k, _), n in a.injected.items() if k == "http_502") >= 2
    assert b.requests["eth_getLogs"] >= 1
    assert await metric(h, "watcher_rpc_failovers_total", network=NETWORK, direction="over") >= 1
    assert await metric(h, "watcher_rpc_failovers_total", network=NETWORK, direction="back") == 0
    assert await metric(h, "watcher_rpc_endpoint_failures_total", network=NETWORK, kind="http_5xx") >= 2
    [failover] = [e for e in logs if e["event"] == "rpc_failover"]
    assert (failover["from_url"], failover["to_url"]) == (a.url, b.url)
    assert "HTTP 502" in failover["reason"]
    _, _, ready = await readyz(h)
    assert ready["last_error"] is None  # the fallback answered: no step failed

    a.clear()
    with capture_logs() as logs:
        await h.wait_for(url_is(h, a.url), timeout=RETURN_AFTER + 10, what="failback to the first rpc_url")
    assert any(e["event"] == "rpc_failback" and e["to_url"] == a.url for e in logs), logs
    assert await metric(h, "watcher_rpc_failovers_total", network=NETWORK, direction="back") == 1
    b_before, a_logs_before = b.requests.total(), a.requests["eth_getLogs"]

    second, address2 = await token_invoice(h)
    tx2 = await chain.run(chain.transfer_token, address2, AMOUNT, PAYERS[2])
    await h.mine(1)
    await assert_paid_once(h, second, tx2)
    assert a.requests["eth_getLogs"] > a_logs_before
    assert b.requests.total() == b_before
    [first] = (await h.get(invoice["id"]))["payments"]
    assert (first["id"], first["transaction_hash"], first["block_hash"]) == (
        payment["id"],
        tx,
        payment["block_hash"],
    )


async def test_logs_naming_another_block_hash_are_never_recorded(proxies, harnesses, anvil_node):
    """eth_getLogs answers with the payment's log under a block hash that is not the block's:
    nothing is recorded and the checkpoint stays below that block while it lasts (/readyz
    names the block hash in last_error, /metrics shows the lag); once the node agrees with
    itself again the payment is recorded once, under the canonical hash."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]})
    chain = h.anvil
    invoice, address = await token_invoice(h)
    await h.settle()

    proxy.inject(Fault("wrong_block_hash"))  # until cleared
    with capture_logs() as logs:
        async with watching_readyz(h) as seen:
            tx = await chain.run(chain.transfer_token, address, AMOUNT)
            block = await h.mine(1)
            await h.wait_for(
                lambda: proxy.injected[("wrong_block_hash", "eth_getLogs")] >= 3,
                what="three rewritten answers",
            )
            await h.wait_for(
                lambda: any("block hash" in e for e in errors_seen(seen)), what="last_error in /readyz"
            )
            stuck = await h.get(invoice["id"])
            lag = await metric(h, "watcher_head_lag_blocks", network=NETWORK)
            last_processed = await metric(h, "watcher_last_processed_block", network=NETWORK)
            payments_recorded = await metric(h, "watcher_payments_recorded_total", network=NETWORK)

    receipt = await chain.run(chain.receipt, tx)
    assert int(receipt["blockNumber"], 16) == block
    assert stuck["status"] == "pending" and stuck["payments"] == []
    assert h.receiver.types_for(invoice["id"]) == ["invoice.created"]
    assert payments_recorded == 0
    assert lag >= 1 and last_processed < block
    assert (
        await metric(h, "watcher_follower_step_failures_total", network=NETWORK, reason="chain_changed") >= 1
    )
    assert all(chain_entry["last_processed_block"] < block for _, chain_entry in seen)
    # Each rewritten answer names a fresh hash; none is the block's.
    hashed = [e for e in errors_seen(seen) if "block hash" in e]
    assert hashed and all(tx in e and receipt["blockHash"] not in e for e in hashed), hashed
    failed = [e for e in logs if e["event"] == "follower_step_failed"]
    assert failed and all("block hash" in e["error"] for e in failed)

    proxy.clear()
    payment = await assert_paid_once(h, invoice, tx)
    assert payment["block_number"] == block
    assert await metric(h, "watcher_payments_recorded_total", network=NETWORK) == 1
    assert await metric(h, "watcher_head_lag_blocks", network=NETWORK) == 0
    _, _, ready = await readyz(h)
    assert ready["last_error"] is None and ready["last_processed_block"] == block


async def test_every_rpc_url_down_is_not_ready_and_loses_nothing(proxies, harnesses, anvil_node, monkeypatch):
    """Both rpc_urls reset every connection: /readyz turns 503 with the chain's reason and
    last error, nothing is recorded meanwhile; when they come back the payment made during
    the outage is recorded once and /readyz is ready again."""
    monkeypatch.setattr(watcher.ops, "MIN_HEAD_MAX_AGE", 1.5)  # the head's age bound (default 60 s)
    node = anvil_node()
    a, b = await proxies(node.url), await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [a.url, b.url]})
    chain = h.anvil
    invoice, address = await token_invoice(h)
    await h.settle()
    status, _, ready = await readyz(h)
    assert status == 200 and ready["ready"]

    before = {"a": a.requests.total(), "b": b.requests.total()}
    a.down = b.down = True
    with capture_logs() as logs:
        tx = await chain.run(chain.transfer_token, address, AMOUNT)
        block = await h.mine(1)

        async def unready() -> dict | None:
            status, body, entry = await readyz(h)
            return body if status == 503 and entry["last_error"] else None

        body = await h.wait_for(unready, what="/readyz 503 with the chain's last error")
        during = await h.get(invoice["id"])
        failures = await metric(h, "watcher_rpc_endpoint_failures_total", network=NETWORK, kind="connection")
        errors = await metric(h, "watcher_rpc_errors_total", network=NETWORK)

    assert body["title"] == "Not ready"
    [reason] = [r for r in body["reasons"] if r.get("network") == NETWORK]
    assert "head" in reason["reason"]
    assert "all 2 endpoints failed" in reason["last_error"]
    assert NETWORK in body["detail"] and "all 2 endpoints failed" in body["detail"]
    [entry] = [c for c in body["chains"] if c["network"] == NETWORK]
    assert entry["ready"] is False and entry["last_processed_block"] < block
    assert during["status"] == "pending" and during["payments"] == []
    assert h.receiver.types_for(invoice["id"]) == ["invoice.created"]
    assert failures >= 2 * ATTEMPTS_PER_STEP  # both endpoints, every attempt of a failed step
    assert errors >= 1
    assert a.requests.total() > before["a"] and b.requests.total() > before["b"]  # both were tried
    assert any(e["event"] == "rpc_all_endpoints_failed" for e in logs)
    assert any(e["event"] == "follower_step_failed" and "all 2 endpoints failed" in e["error"] for e in logs)

    a.down = b.down = False
    await assert_paid_once(h, invoice, tx)

    async def ready_again() -> bool:
        status, _, entry = await readyz(h)
        return status == 200 and entry["ready"] and entry["last_error"] is None

    await h.wait_for(ready_again, what="/readyz ready again")
    # Whichever answered first when they came back, the first rpc_url is the one used after
    # at most the cool-down.
    await h.wait_for(url_is(h, a.url), timeout=RETURN_AFTER + 10, what="the first rpc_url in use")


async def test_a_range_the_provider_refuses_is_shrunk(anvil_node, proxies, harnesses):
    """ "query returned more than 10000 results" (a JSON-RPC error, not a failover): the
    follower asks for half the range until the provider accepts; the payment in the long
    range is found once. (Growing back is a follower story in test_follower.py.) Ranges are
    read only well below the head, so the watcher is held back while the chain grows."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]}, confirmations=1)
    await h.settle()
    follower = h.service.followers[NETWORK]
    start_chunk = follower.chunk_size
    invoice = await h.create(amount="10", assets=["TUSD"])
    [option] = invoice["payment_options"]
    # Ranges are read only well below the head: hold the watcher back (its node says the head is
    # far below the checkpoint) while 300 blocks are mined, so that it then reads them by range.
    hold = proxy.inject(Fault("stale_head", lag=10**6))
    await h.wait_for(
        lambda: proxy.injected[("stale_head", "eth_blockNumber")] >= 1, what="the watcher held back"
    )
    chain = h.anvil
    await h.mine(300)
    tx = await chain.run(chain.transfer_token, option["destination_address"], AMOUNT)
    await h.mine(1)
    proxy.inject(
        Fault(
            "rpc_error",
            method="eth_getLogs",
            times=3,
            code=-32005,
            message="query returned more than 10000 results",
            only=lambda call: "fromBlock" in call["params"][0],
        )
    )
    with capture_logs() as logs:
        proxy.faults.remove(hold)
        paid = await h.wait_status(invoice["id"], "confirmed")  # one confirmation: paid and confirmed at once
    assert [p["transaction_hash"] for p in paid["payments"]] == [tx]
    assert proxy.injected[("rpc_error", "eth_getLogs")] == 3
    shrunk = [e["chunk_size"] for e in logs if e["event"] == "log_range_shrunk"]
    assert shrunk and min(shrunk) < start_chunk, (
        "the refused range was shrunk"
    )  # (it grows back after full ranges)
    # (Two spans of one step may each be refused: at least one failed step, at most three.)
    assert 1 <= await metric(h, "watcher_follower_step_failures_total", network=NETWORK, reason="rpc") <= 3
