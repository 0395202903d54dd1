"""Reorganisations and restarts, end to end on eth-tester through the HTTP API."""

from __future__ import annotations

from collections import Counter


async def test_reorg_unpays_invoice_and_reports_reverted_payment(harness):
    invoice = await harness.create(amount="10")
    await harness.mine(1)
    await harness.settle()

    snapshot = await harness.on_chain(harness.chain.tester.take_snapshot)
    tx = await harness.pay(invoice["id"])
    await harness.mine(1)
    paid = await harness.wait_status(invoice["id"], "paid")
    assert paid["payments"][0]["transaction_hash"] == tx
    await harness.wait_events(invoice["id"], "invoice.paid")

    # The block with the payment is orphaned by a longer chain without it.
    await harness.on_chain(harness.chain.tester.revert_to_snapshot, snapshot)
    await harness.mine(3)

    back = await harness.wait_status(invoice["id"], "pending")
    [payment] = back["payments"]
    assert payment["status"] == "reverted" and payment["transaction_hash"] == tx
    assert back["payment_summary"]["payment_state"] == "unpaid"
    assert back["paid_at"] is None
    events = await harness.wait_events(invoice["id"], "invoice.payment_reverted")
    reverted = [e for e in events if e.type == "invoice.payment_reverted"]
    assert len(reverted) == 1
    assert reverted[0].body["data"]["payment"]["transaction_hash"] == tx
    assert reverted[0].body["data"]["invoice"]["status"] == "pending"
    assert reverted[0].version > max(e.version for e in events if e.type == "invoice.paid")

    # The new branch grows; the orphaned payment stays reverted and the invoice unpaid.
    await harness.mine(3)
    await harness.settle()
    later = await harness.get(invoice["id"])
    assert later["status"] == "pending"
    assert [p["status"] for p in later["payments"]] == ["reverted"]
    assert later["confirmations"] == 0
    assert harness.receiver.bad_signatures == 0


async def test_reorg_that_reincludes_the_payment_counts_it_once(harness):
    invoice = await harness.create(amount="10")
    await harness.mine(1)
    await harness.settle()
    snapshot = await harness.on_chain(harness.chain.tester.take_snapshot)
    await harness.pay(invoice["id"])
    await harness.mine(1)
    await harness.wait_status(invoice["id"], "paid")

    # Same transfer, mined again on a new branch one block later.
    await harness.on_chain(harness.chain.tester.revert_to_snapshot, snapshot)
    await harness.mine(1)  # a sibling of the block that held the payment, at the same height
    await harness.wait_status(invoice["id"], "pending")
    await harness.pay(invoice["id"])  # the same payer, nonce and amount: the same tx hash
    await harness.mine(4)
    done = await harness.wait_status(invoice["id"], "confirmed")
    live = [p for p in done["payments"] if p["status"] != "reverted"]
    assert len(live) == 1 and live[0]["role"] == "counted"
    assert done["payment_summary"]["payment_state"] == "exact"
    assert done["exception"] is None


async def test_restart_resumes_without_skipping_or_repeating(harness):
    first = await harness.create(amount="5")
    second = await harness.create(amount="7")
    await harness.pay(first["id"])
    await harness.mine(1)
    await harness.wait_status(first["id"], "paid")
    await harness.wait_events(first["id"], "invoice.paid")

    await harness.stop_service()
    # While the daemon is down: the second invoice is paid and blocks go by.
    option = second["payment_options"][0]
    await harness.on_chain(
        harness.chain.transfer_token,
        option["token_contract"].lower(),
        option["destination_address"],
        int(option["amount_atomic"]),
    )
    await harness.mine_direct(5)

    await harness.start_service()
    await harness.wait_status(first["id"], "confirmed")
    await harness.wait_status(second["id"], "confirmed")
    await harness.settle()

    for invoice in (first, second):
        got = await harness.get(invoice["id"])
        assert len(got["payments"]) == 1, got["payments"]
        events = harness.receiver.for_invoice(invoice["id"])
        types = Counter(e.type for e in events)
        # Every state change reported, and none twice under different ids.
        assert types["invoice.created"] == 1
        assert types["invoice.payment_detected"] == 1
        assert types["invoice.paid"] == 1
        assert types["invoice.confirmed"] == 1
        ids_by_type_version = Counter((e.type, e.version) for e in events)
        assert all(n == 1 for n in ids_by_type_version.values()), ids_by_type_version
    assert harness.receiver.bad_signatures == 0


async def test_events_survive_an_endpoint_outage_and_keep_their_ids(harness):
    harness.receiver.fail_next = 1
    invoice = await harness.create(amount="3")
    store = harness.service.store
    # The first attempt failed; its retry is 5 s away. Bring it forward instead of sleeping.
    await harness.wait_for(lambda: harness.receiver.attempts >= 1, what="first attempt")
    store.db.execute("UPDATE deliveries SET next_attempt_at = 0 WHERE status = 'pending'")
    harness.service.dispatcher.wake()
    events = await harness.wait_events(invoice["id"], "invoice.created")
    assert len(events) == 1
    rows = store.db.execute("SELECT attempts, status FROM deliveries").fetchall()
    assert [(r["attempts"], r["status"]) for r in rows] == [(2, "delivered")]
    attempts = store.db.execute("SELECT status_code FROM delivery_attempts ORDER BY id").fetchall()
    assert [r["status_code"] for r in attempts] == [500, 204]


async def test_finalized_confirmations_follow_the_nodes_finalized_block(tmp_path):
    from harness import Harness

    h = await Harness(tmp_path, confirmations="finalized").start()
    try:
        invoice = await h.create(amount="2")
        assert invoice["payment_options"][0]["required_confirmations"] == 0
        await h.pay(invoice["id"])
        await h.mine(1)
        # eth-tester finalizes every block at once, so the payment is final as soon as it is seen.
        done = await h.wait_status(invoice["id"], "confirmed")
        assert done["payments"][0]["status"] == "confirmed"
        events = await h.wait_events(invoice["id"], "invoice.paid", "invoice.confirmed")
        assert [e.type for e in events].count("invoice.paid") == 1
    finally:
        await h.close()
