"""Chain reorganisations on a real node (anvil's `anvil_reorg`), end to end through HTTP and
the webhook receiver.

What anvil 1.7.1 does, checked by these tests where it matters: `anvil_reorg(depth, pairs)`
replaces the last `depth` blocks with as many new ones (the head keeps its height, every
replaced block gets a new hash) holding only the transactions listed in `pairs`, each as
`[tx, offset]` with offset 0 the first new block. A transaction of the replaced blocks that
is not listed is gone for good: no receipt, not in the pool, never mined again. Listed as
its raw signed bytes (`eth_getRawTransactionByHash`), a transaction keeps its hash; listed
as a transaction object, anvil signs it afresh (another hash), so the tests use raw bytes.
"""

from __future__ import annotations

from collections import Counter

from anvil_harness import AnvilHarness

# Tests take `anvil_node` before `harnesses`: fixtures are torn down in reverse, so the daemon
# stops before its node does (the other way round its follower retries a dead node for ~8 s).
CONFIRMATIONS = 5  # deep enough that the reorged payment is still unconfirmed when its block goes


def _events_once_per_id(h: AnvilHarness, invoice_id: str) -> list:
    """Every event delivered once per id (no redelivery expected here) and with a valid
    signature: the receiver records only what verifies, and counts the rest."""
    events = h.receiver.for_invoice(invoice_id)
    assert h.receiver.bad_signatures == 0
    per_id = Counter(e.event_id for e in events)
    assert all(n == 1 for n in per_id.values()), per_id
    for e in events:
        assert e.headers["webhook-id"] == e.event_id
        assert e.headers["webhook-signature"].startswith("v1,")
    return events


async def test_a_reorg_that_drops_the_payment_reverts_it_and_unpays_the_invoice(anvil_node, harnesses):
    """The block holding the only payment is replaced by one without it (not re-mined from
    the pool either): the payment is `reverted`, the invoice goes back to `pending` with
    nothing received, and the merchant gets a signed `invoice.payment_reverted` naming it."""
    h = await harnesses(AnvilHarness, nodes=[anvil_node()], confirmations=CONFIRMATIONS)
    chain = h.anvil
    invoice = await h.create(amount="10", assets=["TUSD"])
    [option] = invoice["payment_options"]
    assert option["required_confirmations"] == CONFIRMATIONS

    tx = await chain.run(chain.transfer_token, option["destination_address"], 10_000_000)
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    [payment] = paid["payments"]
    assert payment["transaction_hash"] == tx and payment["status"] == "detected"
    old_block, old_hash = payment["block_number"], payment["block_hash"]
    head = await h.mine(1)  # one block on top: the reorg replaces two
    await h.settle()
    assert (await h.get(invoice["id"]))["status"] == "paid"  # 2 of 5 confirmations: not yet confirmed
    paid_events = [e for e in h.receiver.for_invoice(invoice["id"]) if e.type == "invoice.paid"]
    assert len(paid_events) == 1

    depth = head - old_block + 1
    await chain.run(chain.node.rpc, "anvil_reorg", depth, [])
    assert await chain.run(chain.head) == head  # same height, new blocks
    replaced = await chain.run(chain.node.rpc, "eth_getBlockByNumber", hex(old_block), False)
    assert replaced["hash"] != old_hash and replaced["transactions"] == []
    assert await chain.run(chain.receipt, tx) is None
    assert await chain.run(chain.node.rpc, "eth_getTransactionByHash", tx) is None  # not back in the pool

    await h.mine(2)
    back = await h.wait_status(invoice["id"], "pending")
    [gone] = back["payments"]
    assert gone["id"] == payment["id"] and gone["transaction_hash"] == tx
    assert gone["status"] == "reverted" and gone["confirmations"] == 0
    assert back["payment_summary"]["payment_state"] == "unpaid"
    assert back["payment_summary"]["received_amount"] == "0"
    assert back["paid_at"] is None and back["exception"] is None

    await h.wait_events(invoice["id"], "invoice.payment_reverted")
    # The new branch grows past the old payment's confirmation depth: nothing comes back.
    await h.mine(CONFIRMATIONS + 1)
    await h.settle()
    assert await chain.run(chain.receipt, tx) is None
    later = await h.get(invoice["id"])
    assert later["status"] == "pending" and [p["status"] for p in later["payments"]] == ["reverted"]
    assert later["version"] == back["version"]  # new blocks alone change nothing

    events = _events_once_per_id(h, invoice["id"])
    [reverted] = [e for e in events if e.type == "invoice.payment_reverted"]
    assert reverted.body["data"]["payment"]["id"] == payment["id"]
    assert reverted.body["data"]["payment"]["transaction_hash"] == tx
    assert reverted.body["data"]["payment"]["status"] == "reverted"
    assert reverted.body["data"]["invoice"]["status"] == "pending"
    assert reverted.version == back["version"] > paid_events[0].version
    assert Counter(e.type for e in events) == Counter(
        {
            "invoice.created": 1,
            "invoice.payment_detected": 1,
            "invoice.paid": 1,
            "invoice.payment_reverted": 1,
        }
    )


async def test_a_reorg_that_moves_the_payment_to_another_block_counts_it_once(anvil_node, harnesses):
    """The same signed transaction is re-included one block higher on the new branch: one
    payment (the same record, now in the new block), the invoice `confirmed` at the new
    block's depth, no exception, and each event delivered once."""
    h = await harnesses(AnvilHarness, nodes=[anvil_node()], confirmations=CONFIRMATIONS)
    chain = h.anvil
    invoice = await h.create(amount="10", assets=["TUSD"])
    [option] = invoice["payment_options"]

    tx = await chain.run(chain.transfer_token, option["destination_address"], 10_000_000)
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    [payment] = paid["payments"]
    old_block, old_hash = payment["block_number"], payment["block_hash"]
    head = await h.mine(1)
    await h.settle()

    raw = await chain.run(chain.node.rpc, "eth_getRawTransactionByHash", tx)
    depth = head - old_block + 1
    await chain.run(chain.node.rpc, "anvil_reorg", depth, [[raw, depth - 1]])  # into the new tip
    receipt = await chain.run(chain.receipt, tx)
    assert receipt is not None and int(receipt["status"], 16) == 1
    new_block, new_hash = int(receipt["blockNumber"], 16), receipt["blockHash"]
    assert new_block == head != old_block and new_hash != old_hash
    # The old height now holds an empty block: the log the watcher saw is nowhere on the chain.
    assert (await chain.run(chain.node.rpc, "eth_getBlockByNumber", hex(old_block), False))[
        "transactions"
    ] == []

    # Not confirmed one block short of the new block's depth (it would be at the old one's) ...
    await h.mine(CONFIRMATIONS - 2)
    await h.settle()
    short = await h.get(invoice["id"])
    assert short["status"] == "paid", short["status"]
    [moved] = short["payments"]
    assert (moved["block_number"], moved["block_hash"]) == (new_block, new_hash)
    assert moved["confirmations"] == CONFIRMATIONS - 1
    # ... and confirmed at it.
    await h.mine(1)
    done = await h.wait_status(invoice["id"], "confirmed")
    await h.settle()
    done = await h.get(invoice["id"])

    [final] = done["payments"]
    assert final["id"] == payment["id"] and final["transaction_hash"] == tx
    assert final["status"] == "confirmed" and final["role"] == "counted"
    assert (final["block_number"], final["block_hash"]) == (new_block, new_hash)
    assert final["confirmations"] == CONFIRMATIONS
    assert done["exception"] is None
    assert done["payment_summary"]["payment_state"] == "exact"
    assert done["payment_summary"]["received_amount"] == "10.00"

    events = _events_once_per_id(h, invoice["id"])
    types = Counter(e.type for e in events)
    assert types["invoice.confirmed"] == 1 and types["invoice.payment_reverted"] == 1
    assert not any(t.startswith("invoice.exception") for t in types), types
    by_version = sorted(events, key=lambda e: e.version)
    assert by_version[-1].type == "invoice.confirmed"
    # The last detection names the new block; the revert named the old one.
    detected = [e for e in by_version if e.type == "invoice.payment_detected"]
    assert detected[-1].body["data"]["payment"]["block_hash"] == new_hash
    [reverted] = [e for e in events if e.type == "invoice.payment_reverted"]
    assert reverted.body["data"]["payment"]["block_hash"] == old_hash
    assert reverted.version < detected[-1].version
    # No two distinct events report the same change.
    per_change = Counter((e.type, e.version) for e in events)
    assert all(n == 1 for n in per_change.values()), per_change
