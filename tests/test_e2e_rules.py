"""The payment rules (docs/integrators.md, "Payment rules"), end to end: HTTP in, real token transfers on the
in-process chain, and the webhooks a real receiver got and verified.

Each test drives the daemon through its API (the sandbox pay/mine routes and the operator
routes) and pays on chain only where the API cannot (zero-value transfers, an impostor
token, amounts above what the sandbox payer holds).
"""

from __future__ import annotations

import asyncio
import calendar
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import pytest
from aiohttp import web
from harness import Harness, Received, Receiver

from watcher.sandbox import _calldata

# Order of events emitted by one change (one version), as the store emits them.
EVENT_ORDER = (
    "invoice.created",
    "invoice.payment_detected",
    "invoice.payment_reverted",
    "invoice.paid",
    "invoice.confirmed",
    "invoice.expired",
    "invoice.underpaid",
    "invoice.cancelled",
    "invoice.exception_opened",
    "invoice.exception_resolved",
)

# What data.invoice.status must be in an event of each status type.
STATUS_OF_EVENT = {
    "invoice.paid": {"paid", "confirmed"},
    "invoice.confirmed": {"confirmed"},
    "invoice.expired": {"expired"},
    "invoice.underpaid": {"underpaid"},
}


@dataclass
class RecordingReceiver(Receiver):
    """The harness receiver, also noting the webhook-id and answer of every attempt."""

    attempt_log: list[tuple[str, int]] = field(default_factory=list)

    async def _handle(self, request: web.Request) -> web.Response:
        response = await super()._handle(request)
        self.attempt_log.append((request.headers.get("webhook-id", ""), response.status))
        return response


class BlockExpiryHarness(Harness):
    """The daemon with its timed expiry sweep out of the way (every hour), so that every
    deadline in these tests is decided by applying a mined block (eth-tester's time_travel)."""

    expiry_interval = 3600
    receiver_class = RecordingReceiver


@pytest.fixture
def make_harness(harnesses):
    def make(cls: type[Harness] = BlockExpiryHarness, **kwargs):
        return harnesses(cls, **kwargs)

    return make


@pytest.fixture
async def harness(make_harness):
    return await make_harness()


# --------------------------------------------------------------------------- helpers


def summary(state: str, received: str, remaining: str, overpaid: str = "0") -> dict:
    return {
        "payment_state": state,
        "received_amount": received,
        "remaining_amount": remaining,
        "overpaid_amount": overpaid,
    }


def unix(rfc3339: str) -> int:
    return calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))


async def resolve(h: Harness, invoice_id: str, action: str, note: str | None = None) -> tuple[int, dict]:
    body = {"resolution_action": action}
    if note is not None:
        body["resolution_note"] = note
    status, answer, _ = await h.request("POST", f"/v1/invoices/{invoice_id}/exception/resolve", json=body)
    return status, answer


async def travel_past_deadline(h: Harness, invoice: dict) -> None:
    """Move chain time past the invoice's payable_until (eth-tester mines one block for it)."""
    deadline = unix(invoice["payment_timing"]["payable_until"])
    await h.on_chain(h.chain.tester.time_travel, deadline + 10)


async def wait_payments(h: Harness, invoice_id: str, count: int) -> dict:
    return await h.wait_invoice(invoice_id, lambda i: len(i["payments"]) == count, f"{count} payments")


async def webhooks(h: Harness, invoice: dict, timeline: list[set[str]]) -> list[Received]:
    """Every event of the invoice arrived verified, once, with a stable id; grouped by
    `data.invoice.version` they are `timeline`, versions growing from 1 to the invoice's."""
    every = set().union(*timeline)
    await h.wait_events(invoice["id"], *every)
    await h.settle()
    events = h.receiver.for_invoice(invoice["id"])
    assert h.receiver.bad_signatures == 0
    for e in events:
        assert e.event_id.startswith("evt_")
        assert e.headers["webhook-id"] == e.event_id == e.body["id"]
        assert e.body["data"]["invoice"]["id"] == invoice["id"]
        if e.type in STATUS_OF_EVENT:
            assert e.body["data"]["invoice"]["status"] in STATUS_OF_EVENT[e.type], (e.type, e.body)
        if e.type == "invoice.payment_detected":
            assert e.body["data"]["payment"] is not None and e.body["data"]["payment"]["id"].startswith(
                "pay_"
            )
    assert len({e.event_id for e in events}) == len(events), "an event was delivered under two ids or twice"
    by_version: dict[int, list[str]] = {}
    for e in events:
        by_version.setdefault(e.version, []).append(e.type)
    versions = sorted(by_version)
    got = [sorted(by_version[v], key=EVENT_ORDER.index) for v in versions]
    want = [sorted(group, key=EVENT_ORDER.index) for group in timeline]
    assert got == want, f"events by version {dict(zip(versions, got, strict=False))}"
    assert versions[0] == 1
    current = await h.get(invoice["id"])
    assert versions[-1] == current["version"]
    return events


# --------------------------------------------------------------------------- 1. partial payments


async def test_two_partial_payments_add_up_to_exactly_the_amount(harness):
    h = harness
    h.receiver.fail_next = 1  # the first delivery (invoice.created) fails and is retried after 5 s
    invoice = await h.create(amount="25.50", merchant_reference="order_partial")
    [option] = invoice["payment_options"]
    assert option["amount_atomic"] == "25500000"

    tx1 = await h.pay(invoice["id"], amount="10.25")
    await h.mine(1)
    first = await wait_payments(h, invoice["id"], 1)
    assert first["status"] == "pending"
    assert first["payment_summary"] == summary("partial", "10.25", "15.25")
    [p1] = first["payments"]
    assert (p1["transaction_hash"], p1["role"], p1["status"]) == (tx1, "counted", "detected")
    assert (p1["amount"], p1["amount_atomic"], p1["payment_option_id"]) == ("10.25", "10250000", option["id"])
    assert first["paid_at"] is None and first["last_payment_observed_at"] is not None
    await h.wait_events(invoice["id"], "invoice.payment_detected")

    # The sandbox's default amount is what remains: exactly 15.25.
    tx2 = await h.pay(invoice["id"])
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    assert paid["payment_summary"] == summary("exact", "25.50", "0")
    assert [(p["transaction_hash"], p["amount_atomic"], p["role"]) for p in paid["payments"]] == [
        (tx1, "10250000", "counted"),
        (tx2, "15250000", "counted"),
    ]
    assert paid["confirmations"] == 1  # the smallest among the counted payments
    assert paid["paid_at"] is not None and paid["confirmed_at"] is None
    assert paid["exception"] is None

    await h.mine(2)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert [p["status"] for p in confirmed["payments"]] == ["confirmed", "confirmed"]
    assert confirmed["confirmations"] == 3 and confirmed["confirmed_at"] is not None
    assert confirmed["payment_summary"] == summary("exact", "25.50", "0")

    status, polled, _ = await h.request("GET", f"/v1/invoices/{invoice['id']}/status")
    assert status == 200
    assert (polled["status"], polled["version"], polled["payment_summary"]) == (
        "confirmed",
        confirmed["version"],
        confirmed["payment_summary"],
    )

    events = await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected"},
            {"invoice.payment_detected", "invoice.paid"},
            {"invoice.confirmed"},
        ],
    )
    detected = [e for e in events if e.type == "invoice.payment_detected"]
    assert sorted(e.body["data"]["payment"]["transaction_hash"] for e in detected) == sorted([tx1, tx2])
    first_detected = min(detected, key=lambda e: e.version)
    assert first_detected.body["data"]["invoice"]["payment_summary"] == summary("partial", "10.25", "15.25")
    assert first_detected.body["data"]["invoice"]["status"] == "pending"

    # The failed first attempt and its retry carried the same webhook-id.
    [created] = [e for e in events if e.type == "invoice.created"]
    attempts = [(wid, code) for wid, code in h.receiver.attempt_log if wid == created.event_id]
    assert attempts == [(created.event_id, 500), (created.event_id, 204)]


# --------------------------------------------------------------------------- 2. overpayment


async def test_overpayment_is_paid_with_an_overpaid_exception(harness):
    h = harness
    invoice = await h.create(amount="10")
    tx = await h.pay(invoice["id"], amount="12.5")
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    assert paid["payment_summary"] == summary("overpaid", "12.50", "0", "2.50")
    assert paid["exception"] == {
        "type": "overpaid",
        "status": "open",
        "resolution_action": None,
        "resolution_note": None,
        "resolved_at": None,
    }
    [payment] = paid["payments"]
    assert (payment["transaction_hash"], payment["role"], payment["amount_atomic"]) == (
        tx,
        "counted",
        "12500000",
    )

    await h.mine(2)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert confirmed["payment_summary"] == summary("overpaid", "12.50", "0", "2.50")
    assert confirmed["exception"]["type"] == "overpaid" and confirmed["exception"]["status"] == "open"

    status, listed, _ = await h.request("GET", "/v1/invoices?exception_type=overpaid&exception_status=open")
    assert status == 200 and [i["id"] for i in listed["data"]] == [invoice["id"]] and listed["total"] == 1

    # A late-payment action does not fit; accept_overpayment does.
    status, problem = await resolve(h, invoice["id"], "accept_late_payment")
    assert status == 409, problem
    status, resolved = await resolve(h, invoice["id"], "accept_overpayment", "refunded 2.50 off chain")
    assert status == 200, resolved
    assert resolved["status"] == "confirmed"
    assert resolved["exception"]["type"] == "overpaid" and resolved["exception"]["status"] == "resolved"
    assert resolved["exception"]["resolution_action"] == "accept_overpayment"
    assert resolved["exception"]["resolution_note"] == "refunded 2.50 off chain"
    assert resolved["exception"]["resolved_at"] is not None
    assert resolved["payment_summary"] == summary("overpaid", "12.50", "0", "2.50")
    status, problem = await resolve(h, invoice["id"], "other")
    assert status == 409, problem  # nothing open any more

    events = await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected", "invoice.paid", "invoice.exception_opened"},
            {"invoice.confirmed"},
            {"invoice.exception_resolved"},
        ],
    )
    [opened] = [e for e in events if e.type == "invoice.exception_opened"]
    assert opened.body["data"]["invoice"]["exception"]["type"] == "overpaid"
    assert opened.body["data"]["invoice"]["payment_summary"]["overpaid_amount"] == "2.50"


async def test_second_partial_payment_that_overshoots_is_counted_and_overpaid(harness):
    h = harness
    invoice = await h.create(amount="10.00")
    tx1 = await h.pay(invoice["id"], amount="6")
    await h.mine(1)
    partial = await wait_payments(h, invoice["id"], 1)
    assert partial["payment_summary"] == summary("partial", "6.00", "4.00")
    tx2 = await h.pay(invoice["id"], amount="6.000001")
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    assert [(p["transaction_hash"], p["role"]) for p in paid["payments"]] == [
        (tx1, "counted"),
        (tx2, "counted"),
    ]
    assert paid["payment_summary"] == summary("overpaid", "12.00", "0", "2.00")  # rounded down to cents
    assert paid["exception"]["type"] == "overpaid" and paid["exception"]["status"] == "open"
    await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected"},
            {"invoice.payment_detected", "invoice.paid", "invoice.exception_opened"},
        ],
    )


# --------------------------------------------------------------------------- 3. duplicate


async def test_second_full_payment_after_paid_is_a_duplicate(harness):
    h = harness
    invoice = await h.create(amount="49.99")
    tx1 = await h.pay(invoice["id"])
    await h.mine(3)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    version_before = confirmed["version"]

    status, problem, _ = await h.request("POST", f"/v1/sandbox/invoices/{invoice['id']}/pay", json={})
    assert status == 409, problem  # nothing remains: the sandbox wants an explicit amount
    tx2 = await h.pay(invoice["id"], amount="49.99")
    await h.mine(1)
    after = await wait_payments(h, invoice["id"], 2)
    assert after["status"] == "confirmed"
    assert [(p["transaction_hash"], p["role"]) for p in after["payments"]] == [
        (tx1, "counted"),
        (tx2, "duplicate"),
    ]
    assert after["payments"][1]["amount_atomic"] == "49990000"
    assert after["payment_summary"] == summary("exact", "49.99", "0")
    assert after["exception"]["type"] == "duplicate_payment" and after["exception"]["status"] == "open"
    assert after["confirmations"] >= 3  # the duplicate does not count
    assert after["version"] > version_before
    assert after["confirmed_at"] == confirmed["confirmed_at"]

    await h.mine(2)  # the duplicate confirms; nothing about the invoice changes
    await h.settle()
    later = await h.get(invoice["id"])
    assert later["status"] == "confirmed" and later["payments"][1]["status"] == "confirmed"
    assert later["payments"][1]["role"] == "duplicate"

    status, resolved = await resolve(h, invoice["id"], "mark_duplicate_payment_reviewed", "refund sent")
    assert status == 200, resolved
    assert resolved["status"] == "confirmed"
    assert (
        resolved["exception"]["type"] == "duplicate_payment" and resolved["exception"]["status"] == "resolved"
    )
    assert resolved["payments"][1]["role"] == "duplicate"

    events = await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected", "invoice.paid", "invoice.confirmed"},  # 3 blocks at once: both said
            {"invoice.payment_detected", "invoice.exception_opened"},
            {"invoice.exception_resolved"},
        ],
    )
    dup_event = max((e for e in events if e.type == "invoice.payment_detected"), key=lambda e: e.version)
    assert dup_event.body["data"]["payment"]["transaction_hash"] == tx2
    assert dup_event.body["data"]["payment"]["role"] == "duplicate"
    assert dup_event.body["data"]["invoice"]["status"] == "confirmed"


# --------------------------------------------------------------------------- 4. late payment


async def test_payment_after_deadline_is_late_until_accepted(make_harness):
    h = await make_harness(expiry_minutes=1)
    invoice = await h.create(amount="20")
    assert invoice["payment_timing"]["expires_after_minutes"] == 1
    assert unix(invoice["payment_timing"]["payable_until"]) - unix(invoice["created_at"]) == 60

    await travel_past_deadline(h, invoice)
    expired = await h.wait_status(invoice["id"], "expired")
    assert expired["payment_summary"] == summary("unpaid", "0", "20.00")
    assert expired["exception"] is None
    await h.wait_events(invoice["id"], "invoice.expired")

    tx = await h.pay(invoice["id"])
    await h.mine(1)
    late = await wait_payments(h, invoice["id"], 1)
    assert late["status"] == "expired"
    [payment] = late["payments"]
    assert (payment["transaction_hash"], payment["role"], payment["amount_atomic"]) == (
        tx,
        "late",
        "20000000",
    )
    assert unix(payment["block_timestamp"]) > unix(invoice["payment_timing"]["payable_until"])
    assert late["exception"] == {
        "type": "late_payment",
        "status": "open",
        "resolution_action": None,
        "resolution_note": None,
        "resolved_at": None,
    }
    assert late["payment_summary"] == summary("unpaid", "0", "20.00")
    assert late["confirmations"] == 0  # no payment counts

    status, listed, _ = await h.request("GET", "/v1/invoices?exception_type=late_payment")
    assert status == 200 and [i["id"] for i in listed["data"]] == [invoice["id"]]

    status, problem = await resolve(h, invoice["id"], "write_off_underpayment")
    assert status == 409, problem
    status, accepted = await resolve(h, invoice["id"], "accept_late_payment", "customer paid a minute late")
    assert status == 200, accepted
    assert accepted["status"] == "paid"
    assert accepted["payments"][0]["role"] == "counted"
    assert accepted["payment_summary"] == summary("exact", "20.00", "0")
    assert accepted["exception"]["type"] == "late_payment" and accepted["exception"]["status"] == "resolved"
    assert accepted["exception"]["resolution_action"] == "accept_late_payment"
    assert accepted["paid_at"] is not None and accepted["confirmed_at"] is None

    await h.mine(2)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert confirmed["payments"][0]["status"] == "confirmed" and confirmed["payments"][0]["role"] == "counted"
    assert confirmed["confirmations"] == 3
    assert confirmed["exception"]["status"] == "resolved"

    await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.expired"},
            {"invoice.payment_detected", "invoice.exception_opened"},
            {"invoice.paid", "invoice.exception_resolved"},
            {"invoice.confirmed"},
        ],
    )


# --------------------------------------------------------------------------- 5. underpaid


async def underpaid_then_written_off(h: Harness) -> tuple[dict, str]:
    """Pay 12 of 30, let the deadline pass, write the rest off, confirm; returns (invoice, tx)."""
    invoice = await h.create(amount="30")
    tx = await h.pay(invoice["id"], amount="12")
    await h.mine(1)
    partial = await wait_payments(h, invoice["id"], 1)
    assert partial["status"] == "pending"
    assert partial["payment_summary"] == summary("partial", "12.00", "18.00")

    await travel_past_deadline(h, invoice)  # the payment now has 2 confirmations
    underpaid = await h.wait_status(invoice["id"], "underpaid")
    assert underpaid["payment_summary"] == summary("partial", "12.00", "18.00")
    assert underpaid["exception"] == {
        "type": "underpaid",
        "status": "open",
        "resolution_action": None,
        "resolution_note": None,
        "resolved_at": None,
    }
    assert (
        underpaid["payments"][0]["role"] == "counted" and underpaid["payments"][0]["transaction_hash"] == tx
    )
    assert underpaid["paid_at"] is None
    await h.wait_events(invoice["id"], "invoice.underpaid")

    status, problem = await resolve(h, invoice["id"], "accept_overpayment")
    assert status == 409, problem
    status, written_off = await resolve(h, invoice["id"], "write_off_underpayment", "customer is short 18")
    assert status == 200, written_off
    # The write-off waits for the payment to be confirmed.
    assert written_off["status"] == "underpaid"
    assert written_off["payments"][0]["status"] == "detected"
    assert (
        written_off["exception"]["type"] == "underpaid" and written_off["exception"]["status"] == "resolved"
    )
    assert written_off["exception"]["resolution_action"] == "write_off_underpayment"
    await h.wait_events(invoice["id"], "invoice.exception_resolved")

    await h.mine(1)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert confirmed["payments"][0]["status"] == "confirmed"
    assert confirmed["payment_summary"] == summary("partial", "12.00", "18.00")
    assert confirmed["exception"]["status"] == "resolved"
    assert confirmed["confirmed_at"] is not None
    await h.wait_events(invoice["id"], "invoice.confirmed")
    await h.settle()
    return invoice, tx


async def test_deadline_with_partial_payment_is_underpaid_until_written_off(make_harness):
    h = await make_harness(expiry_minutes=1)
    invoice, _ = await underpaid_then_written_off(h)
    events = await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected"},
            {"invoice.underpaid", "invoice.exception_opened"},
            {"invoice.exception_resolved"},
            {"invoice.confirmed"},  # never invoice.paid: the amount was never reached
        ],
    )
    [underpaid_event] = [e for e in events if e.type == "invoice.underpaid"]
    assert underpaid_event.body["data"]["invoice"]["exception"]["type"] == "underpaid"
    [confirmed_event] = [e for e in events if e.type == "invoice.confirmed"]
    assert confirmed_event.body["data"]["invoice"]["payment_summary"] == summary("partial", "12.00", "18.00")


async def test_written_off_underpayment_is_never_reported_as_paid(make_harness):
    h = await make_harness(expiry_minutes=1)
    invoice, _ = await underpaid_then_written_off(h)
    confirmed = await h.get(invoice["id"])
    assert "invoice.paid" not in h.receiver.types_for(invoice["id"])
    assert confirmed["paid_at"] is None


# --------------------------------------------------------------------------- 6. zero value


async def test_zero_value_transfer_is_never_recorded(harness):
    h = harness
    invoice = await h.create(amount="5")
    [option] = invoice["payment_options"]
    token, dest = h.chain.deployed.token, option["destination_address"]

    # A zero-value transfer and a real 1.00 in the same block: only the real one is a payment.
    # (From another account: eth-tester keeps one pending transaction per sender and block.)
    other = (await h.on_chain(h.chain.tester.get_accounts))[1]
    zero_tx = await h.on_chain(h.chain.transfer_token, token, dest, 0, other)
    real_tx = await h.pay(invoice["id"], amount="1")
    await h.mine(1)
    zero_receipt = await h.on_chain(h.chain.tester.get_transaction_receipt, zero_tx)
    assert zero_receipt["status"] == 1 and len(zero_receipt["logs"]) == 1  # a real zero-value Transfer log
    got = await wait_payments(h, invoice["id"], 1)
    [payment] = got["payments"]
    assert payment["transaction_hash"] == real_tx != zero_tx
    assert payment["amount_atomic"] == "1000000"
    assert got["payment_summary"] == summary("partial", "1.00", "4.00")

    # And alone, in a block of its own.
    await h.on_chain(h.chain.transfer_token, token, dest, 0, other)
    await h.mine(1)
    await h.settle()
    later = await h.get(invoice["id"])
    assert [p["transaction_hash"] for p in later["payments"]] == [real_tx]
    assert later["status"] == "pending" and later["version"] == got["version"]
    status, listed, _ = await h.request("GET", f"/v1/invoices?transaction_hash={zero_tx}")
    assert status == 200 and listed["total"] == 0 and listed["data"] == []

    await webhooks(h, invoice, [{"invoice.created"}, {"invoice.payment_detected"}])


# --------------------------------------------------------------------------- 7. impostor token


async def test_transfer_of_an_unconfigured_token_is_ignored(harness):
    h = harness
    invoice = await h.create(amount="7")
    [option] = invoice["payment_options"]
    dest = option["destination_address"]
    other = (await h.on_chain(h.chain.tester.get_accounts))[1]

    impostor = await h.on_chain(
        h.chain.deploy_contract, "TestToken", ["string", "string", "uint8"], ["Test USD", "TUSD", 6]
    )
    assert impostor != h.chain.deployed.token
    mint = _calldata("mint(address,uint256)", ["address", "uint256"], [other, 10**12])
    await h.on_chain(h.chain._send, other, impostor, mint)
    await h.mine(1)
    # The impostor pays the full amount; the real token pays 2.00; same block.
    fake_tx = await h.on_chain(h.chain.transfer_token, impostor, dest, 7_000_000, other)
    real_tx = await h.pay(invoice["id"], amount="2")
    await h.mine(1)
    receipt = await h.on_chain(h.chain.tester.get_transaction_receipt, fake_tx)
    assert receipt["status"] == 1 and len(receipt["logs"]) == 1  # the impostor's Transfer log is on chain

    got = await wait_payments(h, invoice["id"], 1)
    await h.settle()
    got = await h.get(invoice["id"])
    assert [p["transaction_hash"] for p in got["payments"]] == [real_tx]
    assert got["status"] == "pending"
    assert got["payment_summary"] == summary("partial", "2.00", "5.00")

    await webhooks(h, invoice, [{"invoice.created"}, {"invoice.payment_detected"}])


# --------------------------------------------------------------------------- 8. zero amount


async def test_zero_amount_invoice_is_confirmed_at_once(harness):
    h = harness
    invoice = await h.create(amount="0", merchant_reference="free_trial")
    assert invoice["status"] == "confirmed"
    assert invoice["payment_options"] == []
    assert invoice["payments"] == []
    assert invoice["payment_summary"] == summary("exact", "0", "0")
    assert invoice["exception"] is None
    assert invoice["confirmations"] == 0
    assert invoice["paid_at"] is not None and invoice["confirmed_at"] is not None
    assert invoice["version"] == 1

    status, problem, ctype = await h.request(
        "POST", f"/v1/sandbox/invoices/{invoice['id']}/pay", json={"amount": "1"}
    )
    assert status == 409 and ctype.startswith("application/problem+json"), problem

    await h.mine(1)
    await h.settle()
    again = await h.get(invoice["id"])
    assert again["status"] == "confirmed" and again["version"] == 1
    await webhooks(h, invoice, [{"invoice.created", "invoice.confirmed"}])


# --------------------------------------------------------------------------- 9. tolerance


async def test_underpayment_within_tolerance_counts_as_exact(make_harness):
    h = await make_harness(tolerance="1")
    inside = await h.create(amount="100")
    outside = await h.create(amount="100")
    tx_in = await h.pay(inside["id"], amount="99.5")  # 0.5 % short
    await h.mine(1)
    tx_out = await h.pay(outside["id"], amount="98.999999")  # just over 1 % short
    await h.mine(1)

    paid = await h.wait_status(inside["id"], "paid")
    assert paid["payment_summary"] == summary("exact", "99.50", "0.50")
    assert paid["payments"][0]["transaction_hash"] == tx_in and paid["payments"][0]["role"] == "counted"
    assert paid["exception"] is None

    short = await wait_payments(h, outside["id"], 1)
    assert short["status"] == "pending"
    assert short["payment_summary"] == summary("partial", "98.99", "1.01")
    assert short["payments"][0]["transaction_hash"] == tx_out

    await h.mine(1)
    confirmed = await h.wait_status(inside["id"], "confirmed")
    assert confirmed["payment_summary"] == summary("exact", "99.50", "0.50")
    await h.settle()
    assert (await h.get(outside["id"]))["status"] == "pending"

    await webhooks(
        h,
        inside,
        [
            {"invoice.created"},
            {"invoice.payment_detected", "invoice.paid"},
            {"invoice.confirmed"},
        ],
    )
    await webhooks(h, outside, [{"invoice.created"}, {"invoice.payment_detected"}])


# --------------------------------------------------------------------------- 10. uint256 amounts


async def test_amounts_above_2_64_are_exact(harness):
    h = harness
    amount = "98765432109876.543211"
    total = 98765432109876543211
    assert total > 2**64
    invoice = await h.create(amount=amount)
    [option] = invoice["payment_options"]
    assert option["amount_atomic"] == str(total)
    assert option["quoted_amount"] == amount
    assert option["payment_uri"].endswith(f"&uint256={total}")
    assert invoice["payment_summary"] == summary("unpaid", "0", amount)

    payer, token, dest = h.chain.deployed.payer, h.chain.deployed.token, option["destination_address"]
    mint = _calldata("mint(address,uint256)", ["address", "uint256"], [payer, 2 * total])
    await h.on_chain(h.chain._send, payer, token, mint)
    await h.mine(1)

    first = 2**64 + 1
    second = total - first
    tx1 = await h.on_chain(h.chain.transfer_token, token, dest, first)
    await h.mine(1)
    partial = await wait_payments(h, invoice["id"], 1)
    assert partial["status"] == "pending"
    assert partial["payments"][0]["amount_atomic"] == "18446744073709551617"
    assert partial["payments"][0]["amount"] == "18446744073709.551617"
    assert partial["payment_summary"] == summary("partial", "18446744073709.551617", "80318688036166.991594")

    tx2 = await h.on_chain(h.chain.transfer_token, token, dest, second)
    await h.mine(3)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert [(p["transaction_hash"], p["amount_atomic"], p["role"]) for p in confirmed["payments"]] == [
        (tx1, "18446744073709551617", "counted"),
        (tx2, "80318688036166991594", "counted"),
    ]
    assert confirmed["payments"][1]["amount"] == "80318688036166.991594"
    assert confirmed["payment_summary"] == summary("exact", amount, "0")
    assert confirmed["exception"] is None

    status, payments, _ = await h.request("GET", f"/v1/invoices/{invoice['id']}/payments")
    assert status == 200
    assert [p["amount_atomic"] for p in payments["data"]] == ["18446744073709551617", "80318688036166991594"]

    events = await webhooks(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected"},
            {"invoice.payment_detected", "invoice.paid", "invoice.confirmed"},  # 3 blocks at once
        ],
    )
    amounts = sorted(
        e.body["data"]["payment"]["amount_atomic"] for e in events if e.type == "invoice.payment_detected"
    )
    assert amounts == ["18446744073709551617", "80318688036166991594"]
    [last] = [e for e in events if e.type == "invoice.confirmed"]
    assert last.body["data"]["invoice"]["payment_summary"]["received_amount"] == amount


# --------------------------------------------------------------------------- 11. many small payments


async def test_twenty_small_payments_add_up_to_paid(harness):
    h = harness
    invoice = await h.create(amount="7.40")
    txs: list[str] = []
    for _ in range(10):  # one per block: see test_sandbox_payments_sent_before_one_mine_all_land
        txs.append(await h.pay(invoice["id"], amount="0.37"))
        await h.mine(1)
    half = await wait_payments(h, invoice["id"], 10)
    assert half["status"] == "pending"
    assert half["payment_summary"] == summary("partial", "3.70", "3.70")

    for _ in range(10):
        txs.append(await h.pay(invoice["id"], amount="0.37"))
        await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    assert len(set(txs)) == 20
    assert [p["transaction_hash"] for p in paid["payments"]] == txs  # in chain order
    assert {p["role"] for p in paid["payments"]} == {"counted"}
    assert {p["amount_atomic"] for p in paid["payments"]} == {"370000"}
    assert paid["payment_summary"] == summary("exact", "7.40", "0")
    assert paid["exception"] is None
    assert paid["confirmations"] == 1
    assert [p["status"] for p in paid["payments"]] == ["confirmed"] * 18 + ["detected"] * 2

    await h.mine(2)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert {p["status"] for p in confirmed["payments"]} == {"confirmed"}
    assert confirmed["confirmations"] == 3

    # The follower may take several blocks in one step, so detections may share a version.
    await h.wait_events(invoice["id"], "invoice.confirmed")
    await h.settle()
    events = h.receiver.for_invoice(invoice["id"])
    assert h.receiver.bad_signatures == 0
    assert all(e.headers["webhook-id"] == e.event_id for e in events)
    assert len({e.event_id for e in events}) == len(events)
    detected = [e for e in events if e.type == "invoice.payment_detected"]
    assert sorted(e.body["data"]["payment"]["transaction_hash"] for e in detected) == sorted(txs)
    assert all(e.body["data"]["payment"]["role"] == "counted" for e in detected)
    [created] = [e for e in events if e.type == "invoice.created"]
    [paid_event] = [e for e in events if e.type == "invoice.paid"]
    [confirmed_event] = [e for e in events if e.type == "invoice.confirmed"]
    last_detected = max(detected, key=lambda e: e.version)
    # Detections of one step share the invoice's version: the last tx is among the newest.
    newest = [e for e in detected if e.version == last_detected.version]
    assert txs[-1] in {e.body["data"]["payment"]["transaction_hash"] for e in newest}
    assert created.version == 1
    assert created.version < min(e.version for e in detected)
    assert last_detected.version == paid_event.version < confirmed_event.version == confirmed["version"]
    assert paid_event.body["data"]["invoice"]["payment_summary"] == summary("exact", "7.40", "0")


async def test_sandbox_payments_sent_before_one_mine_all_land(harness):
    h = harness
    invoice = await h.create(amount="10")
    tx1 = await h.pay(invoice["id"], amount="3")
    tx2 = await h.pay(invoice["id"], amount="4")
    assert tx1 != tx2
    await h.mine(1)
    await h.wait_invoice(invoice["id"], lambda i: len(i["payments"]) >= 1, "a payment")
    await h.settle()
    got = await h.get(invoice["id"])
    assert sorted(p["transaction_hash"] for p in got["payments"]) == sorted([tx1, tx2])
    assert got["payment_summary"] == summary("partial", "7.00", "3.00")


# --------------------------------------------------------------------------- 12. list filters


async def test_invoice_list_filters_and_pagination(harness):
    h = harness
    a = await h.create(amount="1", merchant_reference="order_A", customer_email="alice@example.com")
    b = await h.create(amount="2", merchant_reference="order_B", customer_email="bob@example.com")
    c = await h.create(amount="3", merchant_reference="order_A", customer_email="bob@example.com")
    d = await h.create(amount="4", merchant_reference="order_D", customer_email="dave@example.com")
    tx = await h.pay(b["id"])
    await h.mine(1)
    await h.wait_status(b["id"], "paid")

    async def ids(**query) -> tuple[list[str], int, dict]:
        status, body, _ = await h.request("GET", "/v1/invoices?" + urlencode(query))
        assert status == 200, body
        return [i["id"] for i in body["data"]], body["total"], body

    assert (await ids())[:2] == ([d["id"], c["id"], b["id"], a["id"]], 4)  # newest first
    assert (await ids(status="paid"))[:2] == ([b["id"]], 1)
    assert (await ids(status="pending"))[:2] == ([d["id"], c["id"], a["id"]], 3)
    assert (await ids(status="expired"))[:2] == ([], 0)
    assert (await ids(merchant_reference="order_A"))[:2] == ([c["id"], a["id"]], 2)
    assert (await ids(customer_email="bob@example.com"))[:2] == ([c["id"], b["id"]], 2)
    assert (await ids(customer_email="bob@example.com", status="pending"))[:2] == ([c["id"]], 1)
    assert (await ids(transaction_hash=tx))[:2] == ([b["id"]], 1)
    assert (await ids(transaction_hash="0x" + tx[2:].upper()))[:2] == ([b["id"]], 1)
    assert (await ids(transaction_hash="0x" + "ab" * 32))[:2] == ([], 0)
    # As explorers often copy it: no 0x (any case, blanks around) is the same hash.
    assert (await ids(transaction_hash=tx[2:]))[:2] == ([b["id"]], 1)
    assert (await ids(transaction_hash=" " + tx[2:].upper() + " "))[:2] == ([b["id"]], 1)
    assert (await ids(transaction_hash="0X" + tx[2:]))[:2] == ([b["id"]], 1)
    for not_a_hash in (tx[3:], tx + "0", "0x" + "g" * 64, "hello", tx[2:] + tx[2:]):
        status, problem, _ = await h.request(
            "GET", "/v1/invoices?" + urlencode({"transaction_hash": not_a_hash})
        )
        assert status == 422 and problem["errors"][0]["field"] == "transaction_hash", not_a_hash
    [listed_b] = (await ids(transaction_hash=tx))[2]["data"]
    assert listed_b["status"] == "paid" and listed_b["payments"][0]["transaction_hash"] == tx

    page, total, body = await ids(limit=2)
    assert (page, total, body["limit"], body["offset"]) == ([d["id"], c["id"]], 4, 2, 0)
    page, total, body = await ids(limit=2, offset=2)
    assert (page, total, body["limit"], body["offset"]) == ([b["id"], a["id"]], 4, 2, 2)
    page, total, body = await ids(limit=1, offset=1, merchant_reference="order_A")
    assert (page, total) == ([a["id"]], 2)
    page, total, body = await ids(limit=50, offset=10)
    assert (page, total) == ([], 4)

    for bad in ({"status": "bogus"}, {"limit": "0"}, {"limit": "201"}, {"offset": "-1"}):
        status, problem, ctype = await h.request("GET", "/v1/invoices?" + urlencode(bad))
        assert status == 422 and ctype.startswith("application/problem+json"), (bad, problem)


# --------------------------------------------------------------------------- concurrency


class FastSweepHarness(BlockExpiryHarness):
    """The same daemon with its expiry sweep every 2 ms instead of 200 ms (production: 5 s)."""

    expiry_interval = 0.002


async def test_requests_never_fail_while_the_expiry_sweep_runs(make_harness):
    """Invoice creation goes on while the sweep runs every 2 ms, and the sweep, which picks
    only `pending` invoices, leaves paid ones alone even past their deadline with payments
    that never confirm: their status, version and events are what they were before."""
    h = await make_harness(FastSweepHarness, confirmations=1000, expiry_minutes=1)
    invoices = []
    for _ in range(10):
        invoice = await h.create(amount="1")
        await h.pay(invoice["id"])
        await h.mine(1)
        invoices.append(invoice)
    for invoice in invoices:
        await h.wait_status(invoice["id"], "paid")
    await travel_past_deadline(h, invoices[-1])
    await h.settle()
    before = {i["id"]: await h.get(i["id"]) for i in invoices}
    assert {i["status"] for i in before.values()} == {"paid"}
    chain_time = await h.on_chain(lambda: h.chain.tester.get_block_by_number("latest")["timestamp"])
    assert all(
        unix(i["payment_timing"]["payable_until"]) < chain_time for i in before.values()
    )  # all past it
    events_before = {i: [e.event_id for e in h.receiver.for_invoice(i)] for i in before}

    store = h.service.store
    sweep = store.expire_due
    sweeps = 0

    def counted_sweep() -> int:
        nonlocal sweeps
        sweeps += 1
        return sweep()

    store.expire_due = counted_sweep  # the scheduler calls it through the store
    failures: list[tuple[int, object]] = []
    deadline = time.monotonic() + 3
    while not failures and time.monotonic() < deadline:
        answers = await asyncio.gather(
            *(h.request("POST", "/v1/invoices", json={"amount": "1"}) for _ in range(10))
        )
        failures += [(status, body) for status, body, _ in answers if status != 201]
    assert failures == []
    assert sweeps >= 10, sweeps  # the sweep ran all along (every 2 ms at most, between requests)

    await h.settle()
    for invoice_id, old in before.items():
        now = await h.get(invoice_id)
        assert (now["status"], now["version"]) == ("paid", old["version"])
        assert now["payment_summary"] == old["payment_summary"] and now["exception"] is None
        assert [e.event_id for e in h.receiver.for_invoice(invoice_id)] == events_before[invoice_id]
