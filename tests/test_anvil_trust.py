"""Trusting no node, end to end: the real daemon on anvil behind `FaultProxy` playing the nodes
that answer wrongly but politely, with webhooks to the real signature-checking receiver.

Each test is one way a real provider breaks the promise that no payment is missed,
misattributed or wrongly confirmed (CONTRACT §4 "Trusting no node"): a load-balanced backend
whose logs lag the head it reports, a failback onto a node one block behind in the middle of
a step, a cap on JSON-RPC batches, a reorg deeper than the watcher remembers, `null` headers
from a node a few blocks behind during a reorg walk, and a node whose head is behind the
watcher's checkpoint. Each asserts the invoices' final states through the API and that no
wrong webhook was sent (no `invoice.payment_reverted` for a payment never orphaned, no
exception such as `duplicate_payment`).

Timings are shortened for the tests as in test_anvil_faults.py (FailoverTransport's keyword
defaults, which the service does not pass): nothing in the watcher is changed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from anvil_harness import PAYERS, AnvilHarness
from faultproxy import Fault, FaultProxy
from test_anvil_faults import AMOUNT, NETWORK, assert_paid_once, readyz, token_invoice, url_is

from watcher.chain.failover import FailoverTransport

RETURN_AFTER = 1.0  # seconds on a fallback before the preferred endpoint is tried again


@pytest.fixture(autouse=True)
def quick_failover(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = FailoverTransport.__init__.__kwdefaults__
    assert defaults is not None and {"retry_delays", "return_after"} <= defaults.keys()
    monkeypatch.setitem(defaults, "retry_delays", (0.05, 0.1))
    monkeypatch.setitem(defaults, "return_after", RETURN_AFTER)


# ---------------------------------------------------------------------------- helpers


async def chain_row(h: AnvilHarness) -> dict:
    status, body, _ = await h.request("GET", "/v1/chains")
    assert status == 200, body
    [row] = [c for c in body["data"] if c["name"] == NETWORK]
    return row


async def steps(h: AnvilHarness, proxies_: list[FaultProxy], n: int) -> None:
    """Until the follower has started `n` more steps (each begins with eth_blockNumber), so the
    one in flight when this was called has ended."""
    start = sum(p.requests["eth_blockNumber"] for p in proxies_)
    await h.wait_for(
        lambda: sum(p.requests["eth_blockNumber"] for p in proxies_) >= start + n,
        what=f"{n} more follower steps",
    )


async def wait_status(h: AnvilHarness, invoice_id: str, status: str, timeout: float = 15.0) -> dict:
    """`h.wait_status`, and on a timeout the follower's checkpoint and last error, which say
    where the chain stalled."""
    try:
        return await h.wait_for(
            lambda: _status_is(h, invoice_id, status), timeout=timeout, what=f"status {status}"
        )
    except AssertionError as exc:
        _, _, entry = await readyz(h)
        raise AssertionError(f"{exc}; the chain: {entry}") from None


async def _status_is(h: AnvilHarness, invoice_id: str, status: str) -> dict | None:
    invoice = await h.get(invoice_id)
    return invoice if invoice["status"] == status else None


async def quiet(h: AnvilHarness, proxies_: list[FaultProxy], lull: float = 0.25) -> None:
    """Until the nodes hear nothing for `lull` seconds: the follower is asleep."""

    async def still() -> bool:
        before = sum(p.requests.total() for p in proxies_)
        await asyncio.sleep(lull)
        return sum(p.requests.total() for p in proxies_) == before

    await h.wait_for(still, what="the follower asleep")


def assert_no_wrong_webhooks(h: AnvilHarness, reverted: Counter[str] | None = None) -> None:
    """Every event verified; `invoice.payment_reverted` only as often as `reverted` says, per
    invoice id (none by default); no exception opened (a duplicate_payment above all)."""
    assert h.receiver.bad_signatures == 0
    got = Counter(e.invoice_id for e in h.receiver.events if e.type == "invoice.payment_reverted")
    assert got == (reverted or Counter()), f"invoice.payment_reverted sent for {dict(got)}"
    opened = [
        e.body["data"]["invoice"]["exception"]
        for e in h.receiver.events
        if e.type == "invoice.exception_opened"
    ]
    assert not opened, opened
    per_id = Counter(e.event_id for e in h.receiver.events)
    assert all(n == 1 for n in per_id.values()), per_id


async def transfer(h: AnvilHarness, address: str, sender: str = PAYERS[1]) -> str:
    chain = h.anvil
    return await chain.run(chain.transfer_token, address, AMOUNT, sender)


# ---------------------------------------------------------------------------- defect 1: logs that lag


async def test_logs_withheld_by_a_lagging_backend_never_move_the_checkpoint_past_a_payment(
    anvil_node, proxies, harnesses
):
    """The load balancer answers eth_blockNumber and headers from an up-to-date backend and
    eth_getLogs from one a block behind, which clamps toBlock to its own head without an
    error. The paying block's logs are not proven complete while that lasts: the checkpoint
    stays below it, and one block later (the backend has it now) the payment is recorded."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]})
    invoice, address = await token_invoice(h)
    await h.settle()

    proxy.inject(Fault("lagging_backend", lag=1, methods=("eth_getLogs",)))  # until cleared
    tx = await transfer(h, address)
    block = await h.mine(1)
    await h.wait_for(
        lambda: proxy.hid("eth_getLogs", block), what=f"the lagging backend withholding block {block}'s logs"
    )
    await steps(h, [proxy], 2)
    row = await chain_row(h)
    assert row["last_processed_block"] < block, (
        f"the checkpoint moved to {row['last_processed_block']}, "
        f"past block {block} whose logs the node withheld"
    )
    assert (await h.get(invoice["id"]))["status"] == "pending"

    await h.mine(1)  # the lagging backend now has the paying block
    await wait_status(h, invoice["id"], "paid")
    proxy.clear()
    payment = await assert_paid_once(h, invoice, tx)
    assert payment["block_number"] == block
    assert_no_wrong_webhooks(h)


async def test_a_failback_mid_step_onto_a_node_one_block_behind_loses_no_payment(
    anvil_node, proxies, harnesses, monkeypatch
):
    """rpc_urls [a, b]: the watcher is on b after a failed. Mid-step (head and block read
    from b) the cool-down ends and the logs are read from a, back but one block behind: a
    answers them as of its own head. The paying block must not be taken as read."""
    return_after = 2.0  # room for the test to set the scene on b before the cool-down ends
    monkeypatch.setitem(FailoverTransport.__init__.__kwdefaults__, "return_after", return_after)
    node = anvil_node()
    a, b = await proxies(node.url), await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [a.url, b.url]})
    follower = h.service.followers[NETWORK]
    invoice, address = await token_invoice(h)
    await h.settle()

    # The follower steps only when woken, so the test decides which request is the first
    # after the cool-down: a poll_interval too long to matter, taken after the next step.
    follower.poll_interval = 3600.0
    follower.wake()
    await quiet(h, [a, b])
    a.down = True
    follower.wake()
    await h.wait_for(url_is(h, b.url), what="failover to the second rpc_url")
    switched_at = time.monotonic()
    await quiet(h, [a, b])
    a.down = False
    a.inject(Fault("lagging_backend", lag=1))  # a whole node one block behind
    # b takes longer than the cool-down over the step's block read: the logs after it go to a.
    b.inject(Fault("timeout", method="eth_getBlockByNumber", times=1, delay=return_after + 0.5))
    tx = await transfer(h, address)
    block = await h.mine(1)
    assert time.monotonic() - switched_at < return_after / 2, "too slow to start the step on b"
    follower.wake()

    await h.wait_for(
        lambda: a.hid("eth_getLogs", block),
        timeout=return_after + 10,
        what="block's logs read from a mid-step",
    )
    assert b.injected[("timeout", "eth_getBlockByNumber")] == 1
    follower.poll_interval = 0.05
    follower.wake()
    await steps(h, [a, b], 2)
    row = await chain_row(h)
    assert row["last_processed_block"] < block, (
        f"the checkpoint moved to {row['last_processed_block']}, "
        f"past block {block} whose logs came from a node behind it"
    )

    await h.mine(1)  # a has the paying block now
    await wait_status(h, invoice["id"], "paid")
    a.clear()
    payment = await assert_paid_once(h, invoice, tx)
    assert payment["block_number"] == block
    assert_no_wrong_webhooks(h)


# ---------------------------------------------------------------------------- defect 3: batch caps


# How providers refuse a batch longer than their cap: (cap, Fault keywords).
REFUSALS = {
    "cap100_error_object": (100, {}),
    "cap10_http413": (10, {"status": 413}),
    "cap10_error_each": (10, {"each": True, "message": "batch limit exceeded"}),
}


@pytest.mark.parametrize("refusal", ["cap100_error_object", "cap10_http413"])
async def test_a_one_block_reorg_under_a_batch_cap_keeps_the_chain_going(
    anvil_node, proxies, harnesses, refusal
):
    """The provider refuses batches longer than `cap` (with one JSON-RPC error object in place
    of the list, or HTTP 413) and the watcher remembers more blocks than that. A one-block
    reorg drops a payment: it is reverted once, the confirmed one below is untouched, and a
    payment after the reorg is still found. With the default max_batch (100) nothing is
    refused at a cap of 100. (Whether a walk ever needs a page longer than 10 is the walk's
    business: the catch-up test below holds the halving.)"""
    cap, how = REFUSALS[refusal]
    node = anvil_node()
    proxy = await proxies(node.url)
    proxy.inject(Fault("batch_cap", cap=cap, **how))  # from the start, for good
    h = await harnesses(
        AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]}, confirmations=3, internal_transfers="off"
    )
    chain = h.anvil
    kept, kept_address = await token_invoice(h)
    await transfer(h, kept_address)
    await h.mine(1)
    await h.mine(150)
    await wait_status(h, kept["id"], "confirmed")
    await h.settle()
    remembered = len(h.service.store.recent_blocks(NETWORK))
    assert remembered > cap, (
        f"premise: the watcher remembers {remembered} blocks, not more than a batch holds"
    )

    dropped, address = await token_invoice(h)
    tx = await transfer(h, address, PAYERS[2])
    await h.mine(1)
    paid = await wait_status(h, dropped["id"], "paid")
    [payment] = paid["payments"]
    await chain.run(chain.node.rpc, "anvil_reorg", 1, [])
    assert await chain.run(chain.receipt, tx) is None
    await h.mine(1)

    back = await wait_status(h, dropped["id"], "pending")
    [gone] = back["payments"]
    assert (gone["id"], gone["status"]) == (payment["id"], "reverted")
    await h.wait_events(dropped["id"], "invoice.payment_reverted")

    third, third_address = await token_invoice(h)
    await transfer(h, third_address, PAYERS[3])
    await h.mine(3)
    await wait_status(h, third["id"], "confirmed")
    await h.settle()
    still = await h.get(kept["id"])
    assert still["status"] == "confirmed" and [p["status"] for p in still["payments"]] == ["confirmed"]
    assert_no_wrong_webhooks(h, Counter({dropped["id"]: 1}))
    refused = proxy.injected[("batch_cap", None)]
    if cap >= 100:
        assert refused == 0, f"{refused} batches longer than the default max_batch of 100"
    else:  # whatever was refused was halved until it fit, and the smaller size is kept
        reader = h.service.followers[NETWORK].reader
        assert refused == 0 or reader.max_batch <= cap, (refused, reader.max_batch)


@pytest.mark.parametrize("refusal", list(REFUSALS))
async def test_a_catch_up_over_more_blocks_than_a_batch_holds_with_a_native_asset(
    anvil_node, proxies, harnesses, refusal
):
    """125 blocks, each paying part of one coin invoice, read in one catch-up step behind a
    provider that caps batches: the full blocks and their receipts come in pages, every part
    is recorded once and the invoice is paid and confirmed. At a cap of 100 the default
    max_batch (100) is never refused; at 10 (free tiers) a page of full blocks is, and the
    watcher halves."""
    parts = 125
    cap, how = REFUSALS[refusal]
    node = anvil_node()
    proxy = await proxies(node.url)
    proxy.inject(Fault("batch_cap", cap=cap, **how))
    h = await harnesses(
        AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]}, confirmations=3, internal_transfers="off"
    )
    chain = h.anvil
    invoice = await h.create(amount="10", assets=["ETH"])
    [option] = invoice["payment_options"]
    amount, address = int(option["amount_atomic"]), option["destination_address"]
    amounts = [amount // parts] * (parts - 1)
    amounts.append(amount - sum(amounts))
    await h.settle()

    # Hold the watcher back (its node says the head is far below its checkpoint) while the
    # parts are mined one block each: it then reads them all in one step.
    hold = proxy.inject(Fault("stale_head", lag=10**6))
    await h.wait_for(
        lambda: proxy.injected[("stale_head", "eth_blockNumber")] >= 1, what="the watcher held back"
    )

    def pay_in_parts() -> None:
        for value in amounts:
            chain.transfer_native(address, value)
            chain.mine(1)

    await chain.run(pay_in_parts)
    proxy.faults.remove(hold)
    await wait_status(h, invoice["id"], "paid")
    await h.mine(2)
    done = await wait_status(h, invoice["id"], "confirmed")
    await h.settle()
    done = await h.get(invoice["id"])

    assert len(done["payments"]) == parts
    assert len({p["transaction_hash"] for p in done["payments"]}) == parts
    assert sorted(int(p["amount_atomic"]) for p in done["payments"]) == sorted(amounts)
    assert {(p["status"], p["role"]) for p in done["payments"]} == {("confirmed", "counted")}
    assert done["payment_summary"]["payment_state"] == "exact" and done["exception"] is None
    types = Counter(h.receiver.types_for(invoice["id"]))
    assert types["invoice.paid"] == 1 and types["invoice.confirmed"] == 1
    assert_no_wrong_webhooks(h)
    refused = proxy.injected[("batch_cap", None)]
    if cap >= 100:
        assert refused == 0, f"{refused} batches longer than the default max_batch of 100"
    else:
        assert refused >= 1, (
            f"premise: {parts} full blocks and their receipts in pages of 25 or more meet the cap of {cap}"
        )
        assert h.service.followers[NETWORK].reader.max_batch <= cap  # halved until it fit, and kept


# ------------------------------------------------------------------ defect 4: deeper than remembered

DEEP_CONFIRMATIONS = 300
REORG_DEPTH = 700  # deeper than the watcher remembers at 300 confirmations (the test checks)


async def test_a_reorg_deeper_than_the_watcher_remembers_stops_the_chain_and_confirms_nothing(
    anvil_node, proxies, harnesses
):
    """confirmations = 300, a payment 281 blocks deep (not yet confirmed) and a reorg of 700
    blocks that orphans it. The watcher cannot find a common ancestor in what it remembers:
    it stops the chain, /readyz is 503 and says why, and the orphaned payment is never
    confirmed, however many blocks follow."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(
        AnvilHarness,
        nodes=[node],
        rpc_urls={NETWORK: [proxy.url]},
        confirmations=DEEP_CONFIRMATIONS,
        internal_transfers="off",
    )
    chain = h.anvil
    invoice, address = await token_invoice(h)
    await h.mine(REORG_DEPTH - 270)
    tx = await transfer(h, address)
    paid_block = await h.mine(1)
    head = await h.mine(280)
    paid = await wait_status(h, invoice["id"], "paid")
    await h.settle()
    assert paid["payments"][0]["block_number"] == paid_block
    remembered = len(h.service.store.recent_blocks(NETWORK))
    assert remembered < REORG_DEPTH <= head and head - paid_block + 1 <= REORG_DEPTH, (
        remembered,
        head,
        paid_block,
    )
    status, _, _ = await readyz(h)
    assert status == 200

    await chain.run(chain.node.rpc, "anvil_reorg", REORG_DEPTH, [])
    assert await chain.run(chain.receipt, tx) is None
    await h.mine(25)  # the orphaned payment's old block would now be 306 deep

    seen: list[dict] = []

    async def stopped_or_confirmed() -> tuple[str, Any] | None:
        got = await h.get(invoice["id"])
        if got["status"] == "confirmed":
            return "confirmed", got
        status, body, _ = await readyz(h)
        seen.append(body)
        # (503 for another reason first is fine: anvil answers intermediate heads while it reorgs.)
        stopped = status == 503 and any(
            "reorg" in r["reason"].lower() for r in body["reasons"] if r.get("network") == NETWORK
        )
        return ("stopped", body) if stopped else None

    try:
        outcome, body = await h.wait_for(
            stopped_or_confirmed, timeout=30, what="the chain stopped (or the payment confirmed)"
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}; /readyz said last: {seen[-1] if seen else None}") from None
    assert outcome == "stopped", "the payment of a block the reorg orphaned was confirmed"
    assert NETWORK in body["detail"] and "reorg" in body["detail"].lower()

    # It stays stopped: more blocks and time (twenty poll intervals) confirm nothing. (A stopped
    # chain need not poll its node, so there are no steps to count.)
    await h.mine(5)
    await asyncio.sleep(20 * h.poll_interval)
    status, body, entry = await readyz(h)
    assert status == 503 and entry["ready"] is False
    after = await h.get(invoice["id"])
    assert after["status"] != "confirmed"
    assert all(p["status"] != "confirmed" for p in after["payments"])
    assert "invoice.confirmed" not in h.receiver.types_for(invoice["id"])
    assert_no_wrong_webhooks(h)


# ---------------------------------------------------------------------------- defect 5: a null is not a reorg


async def test_null_headers_in_a_reorg_walk_revert_no_confirmed_payment(anvil_node, proxies, harnesses):
    """A one-block reorg of an empty tip above a confirmed payment. The walk back to the common
    ancestor is answered by a node six blocks behind (`null` for the newest six headers, the
    paying block among them), while single reads come from an up-to-date one. A `null` is
    "ask again": the payment stays confirmed and no payment_reverted is sent."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(
        AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]}, confirmations=3, internal_transfers="off"
    )
    chain = h.anvil
    invoice, address = await token_invoice(h)
    tx = await transfer(h, address)
    paid_block = await h.mine(1)
    tip = await h.mine(3)
    confirmed = await wait_status(h, invoice["id"], "confirmed")
    await h.settle()
    [payment] = confirmed["payments"]
    assert payment["block_number"] == paid_block

    proxy.inject(Fault("null_headers", count=6, min_batch=2))  # batches go to the lagging backend
    await chain.run(chain.node.rpc, "anvil_reorg", 1, [])
    await h.mine(1)
    await h.wait_for(
        lambda: proxy.hid("eth_getBlockByNumber", tip - 1), what="a reorg walk answered with nulls"
    )
    await steps(h, [proxy], 2)
    during = await h.get(invoice["id"])
    assert during["status"] == "confirmed", (
        f"a confirmed payment was reverted on null headers: {during['status']}"
    )

    proxy.clear()
    await h.settle()
    final = await h.get(invoice["id"])
    [kept] = final["payments"]
    assert final["status"] == "confirmed" and kept["status"] == "confirmed"
    assert (kept["id"], kept["transaction_hash"], kept["block_hash"]) == (
        payment["id"],
        tx,
        payment["block_hash"],
    )
    receipt = await chain.run(chain.receipt, tx)
    assert receipt["blockHash"] == payment["block_hash"]  # the reorg never touched it
    node_head = await chain.run(chain.node.rpc, "eth_getBlockByNumber", "latest", False)
    assert h.service.store.cursor(NETWORK).hash == node_head["hash"]
    types = Counter(h.receiver.types_for(invoice["id"]))
    assert types == Counter(
        {"invoice.created": 1, "invoice.payment_detected": 1, "invoice.paid": 1, "invoice.confirmed": 1}
    ), types
    assert_no_wrong_webhooks(h)


# ---------------------------------------------------------------------------- /readyz: a node behind us


async def test_readyz_is_503_while_the_node_is_behind_the_checkpoint(anvil_node, proxies, harnesses):
    """After the watcher caught up, its node answers a head three blocks below the checkpoint
    (a stale backend). /readyz is 503 and says so while it lasts; nothing is reverted, and a
    payment made meanwhile is recorded once the node is back."""
    node = anvil_node()
    proxy = await proxies(node.url)
    h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={NETWORK: [proxy.url]})
    invoice, address = await token_invoice(h)
    await h.settle()
    status, _, entry = await readyz(h)
    assert status == 200 and entry["ready"]

    proxy.inject(Fault("stale_head", lag=3))

    async def unready() -> dict | None:
        status, body, _ = await readyz(h)
        return body if status == 503 else None

    body = await h.wait_for(
        unready, timeout=10, what="/readyz 503 while the node's head is behind the checkpoint"
    )
    [reason] = [r for r in body["reasons"] if r.get("network") == NETWORK]
    assert "behind" in reason["reason"], reason
    [entry] = [c for c in body["chains"] if c["network"] == NETWORK]
    assert entry["ready"] is False
    row = await chain_row(h)
    assert row["head_block"] < row["last_processed_block"]

    tx = await transfer(h, address)
    await h.mine(1)
    proxy.clear()
    await assert_paid_once(h, invoice, tx)

    async def ready_again() -> bool:
        status, _, _ = await readyz(h)
        return status == 200

    await h.wait_for(ready_again, what="/readyz ready again")
    assert_no_wrong_webhooks(h)
