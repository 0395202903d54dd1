"""The core path through HTTP only: create, pay with a real token transfer, confirm, webhooks."""

from __future__ import annotations


async def test_exact_payment_goes_pending_paid_confirmed(harness):
    invoice = await harness.create(amount="49.99", merchant_reference="order_1")
    assert invoice["status"] == "pending"
    [option] = invoice["payment_options"]
    assert option["amount_atomic"] == "49990000"

    tx = await harness.pay(invoice["id"])
    await harness.mine(1)
    paid = await harness.wait_status(invoice["id"], "paid")
    [payment] = paid["payments"]
    assert payment["transaction_hash"] == tx
    assert payment["role"] == "counted" and payment["status"] == "detected"
    assert payment["amount_atomic"] == "49990000" and payment["amount"] == "49.99"
    assert paid["payment_summary"] == {
        "payment_state": "exact",
        "received_amount": "49.99",
        "remaining_amount": "0",
        "overpaid_amount": "0",
    }

    await harness.mine(2)
    confirmed = await harness.wait_status(invoice["id"], "confirmed")
    assert confirmed["confirmations"] >= 3
    assert confirmed["payments"][0]["status"] == "confirmed"
    assert confirmed["paid_at"] and confirmed["confirmed_at"]

    events = await harness.wait_events(
        invoice["id"], "invoice.created", "invoice.payment_detected", "invoice.paid", "invoice.confirmed"
    )
    assert harness.receiver.bad_signatures == 0
    versions = [e.version for e in events]
    assert versions == sorted(versions) and versions[0] == 1
    assert len({e.event_id for e in events}) == len(events)
    assert events[-1].body["data"]["invoice"]["status"] == "confirmed"
