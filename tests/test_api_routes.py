"""The invoice routes beyond create and read, end to end through HTTP on a
real daemon and chain: free-text search, CSV export, stats, drafts and finalize, cancel,
checkout-session refresh and exception resolution.

Every happy path checks the stored invoice (read back through the API) and the webhooks a
real receiver got; every refusal is checked to change nothing (the table at the end reuses
the machinery of test_api_errors.py).
"""

from __future__ import annotations

import calendar
import csv
import io
import time
from typing import Any
from urllib.parse import urlencode

import pytest
from harness import Harness
from test_api_errors import NO_JSON, Case, fixtures, problem_errors, send, snapshot

from watcher import api as api_module

TOKEN_UNIT = 10**6  # the sandbox token has 6 decimals


class RouteHarness(Harness):
    """The test daemon with a clock that can be moved forward (to follow eth-tester's
    time_travel, so that a new payment session starts after the chain's time) and a
    configurable `usd_rate` for the sandbox token (None: the asset needs quote_rates; the
    sandbox's ETH never has one, so it is offered only when a request quotes it)."""

    auth_failures_per_second = None  # the auth table fails 28 keys in a row from one address

    def __init__(self, *args: Any, usd_rate: str | None = "1", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.usd_rate = usd_rate
        self.offset = 0.0

    def clock(self) -> float:
        return time.time() + self.offset

    def chain_settings(self) -> dict:
        chain = super().chain_settings()
        for asset in chain["assets"]:
            if asset["kind"] != "erc20":
                continue
            if self.usd_rate is None:
                asset.pop("usd_rate", None)
            else:
                asset["usd_rate"] = self.usd_rate
        return chain

    async def restart(self, **changes: Any) -> None:
        """Stop the daemon, change its settings, start it again on the same database."""
        await self.stop_service()
        for name, value in changes.items():
            setattr(self, name, value)
        await self.start_service()


@pytest.fixture
def make_harness(harnesses):
    def make(**kwargs: Any):
        return harnesses(RouteHarness, **kwargs)

    return make


@pytest.fixture
async def h(make_harness) -> RouteHarness:
    return await make_harness()


# --------------------------------------------------------------------------- helpers


def unix(rfc3339: str) -> int:
    return calendar.timegm(time.strptime(rfc3339, "%Y-%m-%dT%H:%M:%SZ"))


async def post(h: Harness, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
    status, got, _ = await h.request("POST", path, json=body, **kwargs)
    return status, got


async def ids(h: Harness, path: str = "/v1/invoices", **query: str) -> tuple[list[str], int]:
    status, got, _ = await h.request("GET", path + "?" + urlencode(query))
    assert status == 200, (query, got)
    return [i["id"] for i in got["data"]], got["total"]


async def pay_and_wait(h: Harness, invoice_id: str, status: str, amount: str | None = None) -> dict:
    await h.pay(invoice_id, amount)
    await h.mine(1)
    return await h.wait_status(invoice_id, status)


async def travel_past(h: RouteHarness, invoice: dict) -> None:
    """Move chain time past the invoice's deadline, and our clock with it."""
    deadline = unix(invoice["payment_timing"]["payable_until"])
    await h.on_chain(h.chain.tester.time_travel, deadline + 10)
    h.offset = (deadline + 15) - time.time()


async def timeline(h: Harness, invoice: dict, want: list[set[str]]) -> None:
    """The invoice's webhooks, grouped by `data.invoice.version`, are exactly `want`, from
    version 1 to the invoice's current version, each delivered once."""
    await h.wait_events(invoice["id"], *set().union(*want))
    await h.settle()
    events = h.receiver.for_invoice(invoice["id"])
    assert h.receiver.bad_signatures == 0
    assert len({e.event_id for e in events}) == len(events)
    by_version: dict[int, list[str]] = {}
    for e in events:
        by_version.setdefault(e.version, []).append(e.type)
    got = [set(by_version[v]) for v in sorted(by_version)]
    assert all(len(set(v)) == len(v) for v in by_version.values()), by_version
    assert got == want, by_version
    assert sorted(by_version)[0] == 1 and sorted(by_version)[-1] == (await h.get(invoice["id"]))["version"]


def event(h: Harness, invoice_id: str, kind: str) -> dict:
    [found] = [e.body for e in h.receiver.for_invoice(invoice_id) if e.type == kind]
    return found


async def refused(
    h: Harness, method: str, path: str, status: int, *, json: Any = None, field: str | None = None
) -> dict:
    """The request answers a problem with `status` and changes nothing."""
    before = await snapshot(h)
    got_status, got, ctype = await h.request(method, path, json=json)
    wrong = problem_errors(Case(path, status, field), got_status, got, ctype)
    assert not wrong, wrong
    assert await snapshot(h) == before
    return got


# --------------------------------------------------------------------------- search


async def test_search_matches_ids_text_addresses_and_hashes_case_insensitively(h):
    a = await h.create(
        amount="1",
        product_name="Café Überraschung",
        merchant_reference="order_100%",
        customer_id="cus_Alpha",
        customer_email="Alice@Example.com",
        bill_to="Alice Liddell",
    )
    b = await h.create(
        amount="2",
        product_name="Pro Plan",
        merchant_reference="order_200",
        customer_id="cus_beta",
        customer_email="bob@example.com",
        bill_to="Bob & Co",
    )
    c = await h.create(amount="3", product_name="Pro Plan yearly", merchant_reference="ORDER_300")
    paid = await pay_and_wait(h, b["id"], "paid")
    tx = paid["payments"][0]["transaction_hash"]
    address = a["payment_options"][0]["destination_address"]  # EIP-55 mixed case

    cases = {
        a["id"]: [a["id"]],
        a["id"].lower()[4:20]: [a["id"]],  # part of the id, other case
        "überrasch": [a["id"]],  # Unicode case folding, not ASCII only
        "CAFÉ": [a["id"]],
        "pro plan": [c["id"], b["id"]],  # newest first
        "order_": [c["id"], b["id"], a["id"]],
        "100%": [a["id"]],  # % and _ are literal, not wildcards
        "0%": [a["id"]],
        "r_2": [b["id"]],
        "CUS_ALPHA": [a["id"]],
        "alice@example": [a["id"]],
        "liddell": [a["id"]],
        "bob & co": [b["id"]],
        address: [a["id"]],
        address.lower(): [a["id"]],
        "0X" + address[2:].upper(): [a["id"]],
        address[10:30].upper(): [a["id"]],
        tx: [b["id"]],
        tx.upper()[2:40]: [b["id"]],
        "  pro plan yearly  ": [c["id"]],  # surrounding blanks are not part of the search
        "nothing like this": [],
        "\x00": [],
    }
    for needle, want in cases.items():
        assert await ids(h, search=needle) == (want, len(want)), needle

    # With the other filters and pagination.
    assert await ids(h, search="pro plan", status="paid") == ([b["id"]], 1)
    assert await ids(h, search="order_", limit="1", offset="1") == ([b["id"]], 3)
    assert await ids(h, search="order_", merchant_reference="ORDER_300") == ([c["id"]], 1)

    for bad, field in ((" ", "search"), ("", "search"), ("x" * 255, "search")):
        await refused(h, "GET", "/v1/invoices?" + urlencode({"search": bad}), 422, field=field)


# --------------------------------------------------------------------------- export


def parse_csv(text: str) -> tuple[list[str], list[dict]]:
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header, body = rows[0], rows[1:]
    return header, [dict(zip(header, r, strict=True)) for r in body]


async def export(h: Harness, **query: str) -> tuple[list[str], list[dict], dict]:
    assert h.http is not None
    url = h.base_url + "/v1/invoices/export" + ("?" + urlencode(query) if query else "")
    async with h.http.get(url, headers={"Authorization": f"Bearer {h.api_key}"}) as r:
        text = (await r.read()).decode("utf-8")
        assert r.status == 200, text
        assert r.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert r.headers["Content-Disposition"] == 'attachment; filename="invoices.csv"'
        assert "\r\n" in text  # RFC 4180 line ends
        header, rows = parse_csv(text)
        return header, rows, dict(r.headers)


async def test_export_is_csv_with_a_header_row_the_filters_and_no_formulas(h, monkeypatch):
    header, rows, headers = await export(h)
    assert header == list(api_module.EXPORT_COLUMNS) and rows == [] and headers["X-Total-Count"] == "0"

    a = await h.create(
        amount="10",
        merchant_reference='=HYPERLINK("http://evil")',
        product_name="+1+2",
        customer_id="-5",
        customer_email="evil@example.com",
    )
    b = await h.create(
        amount="20",
        product_name='Widget, "large"\nsecond line',
        merchant_reference="@SUM(A1)",
        customer_id="\tcmd",
        customer_email="=x@example.com",
    )
    c = await h.create(amount="30", merchant_reference="plain")
    await h.pay(b["id"], "5")
    await h.mine(1)
    await h.wait_invoice(b["id"], lambda i: len(i["payments"]) == 1, "first payment")
    await pay_and_wait(h, b["id"], "paid")
    await h.mine(2)
    b_now = await h.wait_status(b["id"], "confirmed")
    await h.request("POST", f"/v1/invoices/{c['id']}/cancel")

    header, rows, headers = await export(h)
    assert headers["X-Total-Count"] == "3"
    assert [r["id"] for r in rows] == [c["id"], b["id"], a["id"]]  # newest first, as the list
    ra, rb, rc = rows[2], rows[1], rows[0]
    # Formula injection: a cell a spreadsheet would evaluate starts with an apostrophe.
    assert ra["merchant_reference"] == '\'=HYPERLINK("http://evil")'
    assert ra["product_name"] == "'+1+2" and ra["customer_id"] == "'-5"
    assert (
        rb["merchant_reference"] == "'@SUM(A1)"
        and rb["customer_id"] == "'\tcmd"
        and rb["customer_email"] == "'=x@example.com"
    )
    assert rb["product_name"] == 'Widget, "large"\nsecond line'  # quoted by the csv module, read back whole
    assert rc["merchant_reference"] == "plain"
    # The amounts, states and times of the invoice object.
    hashes = [p["transaction_hash"] for p in b_now["payments"]]
    assert len(hashes) == 2 and rb["transaction_hashes"] == " ".join(hashes)
    assert {
        k: rb[k]
        for k in (
            "status",
            "amount",
            "currency",
            "received_amount",
            "remaining_amount",
            "overpaid_amount",
            "payment_state",
            "exception_type",
            "exception_status",
        )
    } == {
        "status": "confirmed",
        "amount": "20",
        "currency": "USD",
        "received_amount": "20.00",
        "remaining_amount": "0",
        "overpaid_amount": "0",
        "payment_state": "exact",
        "exception_type": "",
        "exception_status": "",
    }
    assert rb["created_at"] == b_now["created_at"] and rb["paid_at"] == b_now["paid_at"]
    assert rb["confirmed_at"] == b_now["confirmed_at"] and rb["cancelled_at"] == ""
    assert rc["status"] == "cancelled" and rc["cancelled_at"] and rc["transaction_hashes"] == ""
    assert ra["status"] == "pending" and ra["received_amount"] == "0" and ra["remaining_amount"] == "10.00"

    # The list's filters.
    assert [r["id"] for r in (await export(h, status="confirmed"))[1]] == [b["id"]]
    assert [r["id"] for r in (await export(h, search="evil"))[1]] == [a["id"]]
    assert [r["id"] for r in (await export(h, transaction_hash=hashes[0]))[1]] == [b["id"]]
    assert (await export(h, status="expired"))[1] == []
    # Pages, if asked for.
    _, page, headers = await export(h, limit="1", offset="1")
    assert [r["id"] for r in page] == [b["id"]] and headers["X-Total-Count"] == "3"

    # Past the cap, an export without limit is refused, not cut short; with limit it is a page.
    monkeypatch.setattr(api_module, "EXPORT_MAX_ROWS", 2)
    problem = await refused(h, "GET", "/v1/invoices/export", 422, field="limit")
    assert "3 invoices match" in problem["detail"]
    assert [r["id"] for r in (await export(h, limit="2"))[1]] == [c["id"], b["id"]]
    assert [r["id"] for r in (await export(h, status="pending"))[1]] == [a["id"]]
    await refused(h, "GET", "/v1/invoices/export?limit=3", 422, field="limit")


async def test_export_reads_in_chunks_without_repeating_or_skipping(h):
    made = [(await h.create(amount=str(n + 1), merchant_reference=f"r{n}"))["id"] for n in range(7)]
    store = h.service.store
    chunks = list(store.export_rows({}, 100, 0, chunk=3))
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [r["id"] for c in chunks for r in c] == made[::-1]
    chunks = list(store.export_rows({}, 4, 2, chunk=3))
    assert [r["id"] for c in chunks for r in c] == made[::-1][2:6]
    # An invoice created while an export is under way is not in it, and nothing shifts.
    rows = store.export_rows({}, 100, 0, chunk=2)
    first = next(rows)
    await h.create(amount="1")
    rest = [r for c in rows for r in c]
    assert [r["id"] for r in first + rest] == made[::-1]


# --------------------------------------------------------------------------- stats


async def stats(h: Harness, **query: str) -> dict:
    status, got, _ = await h.request("GET", "/v1/invoices/stats" + ("?" + urlencode(query) if query else ""))
    assert status == 200, got
    return got


def counts(**nonzero: int) -> dict:
    every = dict.fromkeys(("draft", "pending", "paid", "confirmed", "expired", "underpaid", "cancelled"), 0)
    return every | nonzero


def exceptions(**nonzero: int) -> dict:
    return dict.fromkeys(("late_payment", "underpaid", "overpaid", "duplicate_payment"), 0) | nonzero


async def test_stats_count_every_status_and_open_exception_and_sum_received_exactly(h):
    empty = await stats(h)
    assert empty == {
        "total": 0,
        "by_status": counts(),
        "by_open_exception_type": exceptions(),
        "received": [
            {
                "network": "sandbox",
                "asset": "ETH",
                "decimals": 18,
                "amount_atomic": "0",
                "amount": "0",
                "payments": 0,
            },
            {
                "network": "sandbox",
                "asset": "TUSD",
                "decimals": 6,
                "amount_atomic": "0",
                "amount": "0",
                "payments": 0,
            },
        ],
    }

    paid = await h.create(amount="12.5", merchant_reference="shop-a")
    over = await h.create(amount="10", merchant_reference="shop-a")
    partial = await h.create(amount="7", merchant_reference="shop-b")
    cancelled = await h.create(amount="3", merchant_reference="shop-b")
    await h.create(amount="4", draft=True)
    await h.create(amount="0")
    await h.pay(paid["id"])
    await h.pay(over["id"], "10.000001")
    await h.pay(partial["id"], "0.25")
    await h.mine(1)
    await h.wait_status(paid["id"], "paid")
    await h.wait_status(over["id"], "paid")
    await h.wait_invoice(partial["id"], lambda i: len(i["payments"]) == 1, "partial payment")
    status, _ = await post(h, f"/v1/invoices/{cancelled['id']}/cancel")
    assert status == 200
    # A late payment to the cancelled invoice is recorded but not received (it does not count).
    await h.pay(cancelled["id"], "3")
    await h.mine(1)
    await h.wait_invoice(cancelled["id"], lambda i: len(i["payments"]) == 1, "late payment")

    got = await stats(h)
    assert got["total"] == 6
    assert got["by_status"] == counts(draft=1, pending=1, paid=2, confirmed=1, cancelled=1)
    assert got["by_open_exception_type"] == exceptions(overpaid=1, late_payment=1)
    received = 12_500_000 + 10_000_001 + 250_000
    assert got["received"] == [
        {
            "network": "sandbox",
            "asset": "ETH",
            "decimals": 18,
            "amount_atomic": "0",
            "amount": "0",
            "payments": 0,
        },
        {
            "network": "sandbox",
            "asset": "TUSD",
            "decimals": 6,
            "amount_atomic": str(received),
            "amount": "22.750001",
            "payments": 3,
        },
    ]

    tusd = 1  # received is sorted by network and asset: ETH first
    shop_a = await stats(h, merchant_reference="shop-a")
    assert shop_a["total"] == 2 and shop_a["by_status"] == counts(paid=2)
    assert (
        shop_a["received"][tusd]["amount_atomic"] == "22500001" and shop_a["received"][tusd]["payments"] == 2
    )
    shop_b = await stats(h, search="SHOP-B")
    assert shop_b["by_status"] == counts(pending=1, cancelled=1)
    assert shop_b["by_open_exception_type"] == exceptions(late_payment=1)
    assert shop_b["received"][tusd]["amount"] == "0.25"
    assert (await stats(h, status="draft"))["received"][tusd]["amount_atomic"] == "0"
    assert (await stats(h, exception_type="overpaid"))["by_status"] == counts(paid=1)

    # Accepting the late payment makes it received.
    status, _ = await post(
        h, f"/v1/invoices/{cancelled['id']}/exception/resolve", {"resolution_action": "accept_late_payment"}
    )
    assert status == 200
    again = await stats(h)
    assert again["received"][tusd]["amount_atomic"] == str(received + 3_000_000)
    assert again["by_open_exception_type"] == exceptions(overpaid=1)


# --------------------------------------------------------------------------- drafts


async def test_a_draft_is_finalized_into_a_payable_invoice(h):
    draft = await h.create(
        amount="15",
        draft=True,
        merchant_reference="d1",
        quote_rates={"TUSD": "0.5"},
        payment_timing={"mode": "due_date", "due_after_days": 3, "grace_period_days": 2},
    )
    assert draft["status"] == "draft" and draft["payment_options"] == [] and draft["version"] == 1
    assert draft["payment_timing"] == {
        "mode": "due_date",
        "due_after_days": 3,
        "grace_period_days": 2,
        "due_at": None,
        "payable_until": None,
    }
    assert await h.get(draft["id"]) == draft

    before = h.clock()
    status, final = await post(h, f"/v1/invoices/{draft['id']}/finalize")
    after = h.clock()
    assert status == 200, final
    assert final["status"] == "pending" and final["version"] == 2
    [option] = final["payment_options"]
    assert (
        option["amount_atomic"] == "30000000" and option["quote_rate"] == "0.5"
    )  # the draft's own quote_rates
    assert option["destination_address"].startswith("0x") and option["asset"] == "TUSD"
    timing = final["payment_timing"]
    assert int(before) + 3 * 86400 <= unix(timing["due_at"]) <= int(after) + 3 * 86400
    assert unix(timing["payable_until"]) == unix(timing["due_at"]) + 2 * 86400
    assert (timing["mode"], timing["due_after_days"], timing["grace_period_days"]) == ("due_date", 3, 2)
    assert await h.get(draft["id"]) == final

    # The new address is watched.
    paid = await pay_and_wait(h, draft["id"], "paid")
    assert paid["payment_summary"]["payment_state"] == "exact"
    await timeline(
        h,
        draft,
        [{"invoice.created"}, {"invoice.session_refreshed"}, {"invoice.payment_detected", "invoice.paid"}],
    )
    refreshed = event(h, draft["id"], "invoice.session_refreshed")
    assert refreshed["data"]["invoice"]["status"] == "pending" and refreshed["data"]["payment"] is None
    assert refreshed["data"]["invoice"]["payment_timing"] == timing

    # Only a draft is finalized.
    for invoice_id in (draft["id"], (await h.create(amount="1"))["id"], (await h.create(amount="0"))["id"]):
        await refused(h, "POST", f"/v1/invoices/{invoice_id}/finalize", 409)
    await refused(h, "POST", "/v1/invoices/inv_01NOPE0000000000000000000/finalize", 404)


async def test_a_zero_amount_draft_is_confirmed_at_finalize(h):
    draft = await h.create(amount="0", draft=True)
    assert draft["status"] == "draft" and draft["payment_timing"]["payable_until"] is None
    status, final = await post(h, f"/v1/invoices/{draft['id']}/finalize", {})
    assert status == 200, final
    assert final["status"] == "confirmed" and final["payment_options"] == [] and final["version"] == 2
    assert final["paid_at"] and final["confirmed_at"] and final["payment_timing"]["payable_until"]
    # As at creation: confirmed, never "paid", and no payment session.
    await timeline(h, draft, [{"invoice.created"}, {"invoice.confirmed"}])


async def test_drafts_that_cannot_be_quoted_are_refused_at_create_and_at_finalize(make_harness):
    h = await make_harness(usd_rate=None)  # the token has no configured rate
    status, problem, _ = await h.request("POST", "/v1/invoices", json={"amount": "5", "draft": True})
    assert status == 422 and problem["errors"][0]["field"] == "assets", problem
    assert await ids(h) == ([], 0)
    draft = await h.create(amount="5", draft=True, quote_rates={"TUSD": "2"})

    # The rate was configured when this draft was made, and is gone at finalize.
    await h.restart(usd_rate="1")
    rated = await h.create(amount="8", draft=True)
    await h.restart(usd_rate=None)
    problem = await refused(h, "POST", f"/v1/invoices/{rated['id']}/finalize", 422, field="assets")
    assert "quote" in problem["detail"]
    assert (await h.get(rated["id"]))["status"] == "draft"

    status, final = await post(h, f"/v1/invoices/{draft['id']}/finalize")
    assert status == 200 and final["payment_options"][0]["amount_atomic"] == "2500000", final


# --------------------------------------------------------------------------- cancel


async def test_cancel_a_pending_invoice_and_a_later_payment_is_late(h):
    invoice = await h.create(amount="9")
    status, cancelled = await post(h, f"/v1/invoices/{invoice['id']}/cancel")
    assert status == 200, cancelled
    assert cancelled["status"] == "cancelled" and cancelled["version"] == 2
    assert cancelled["cancelled_at"] and abs(unix(cancelled["cancelled_at"]) - time.time()) < 30
    assert (
        cancelled["payment_options"] == invoice["payment_options"]
    )  # still shown: its address is still watched
    assert await h.get(invoice["id"]) == cancelled
    await refused(h, "POST", f"/v1/invoices/{invoice['id']}/cancel", 409)

    tx = await h.pay(invoice["id"], "9")
    await h.mine(1)
    late = await h.wait_invoice(invoice["id"], lambda i: len(i["payments"]) == 1, "late payment")
    assert late["status"] == "cancelled" and late["payments"][0]["role"] == "late"
    assert late["exception"]["type"] == "late_payment" and late["exception"]["status"] == "open"
    assert late["payment_summary"]["payment_state"] == "unpaid"
    await refused(h, "POST", f"/v1/invoices/{invoice['id']}/cancel", 409)

    status, accepted = await post(
        h,
        f"/v1/invoices/{invoice['id']}/exception/resolve",
        {"resolution_action": "accept_late_payment", "resolution_note": "shipped anyway"},
    )
    assert status == 200 and accepted["status"] == "paid" and accepted["payments"][0]["role"] == "counted", (
        accepted
    )
    assert accepted["payments"][0]["transaction_hash"] == tx
    await timeline(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.cancelled"},
            {"invoice.payment_detected", "invoice.exception_opened"},
            {"invoice.paid", "invoice.exception_resolved"},
        ],
    )
    body = event(h, invoice["id"], "invoice.cancelled")
    assert body["data"]["invoice"]["status"] == "cancelled" and body["data"]["invoice"]["version"] == 2


async def test_only_a_pending_invoice_that_received_nothing_is_cancelled(h):
    partial = await h.create(amount="10")
    await h.pay(partial["id"], "1")
    await h.mine(1)
    await h.wait_invoice(partial["id"], lambda i: len(i["payments"]) == 1, "partial payment")
    paid = await h.create(amount="2")
    await pay_and_wait(h, paid["id"], "paid")
    draft = await h.create(amount="2", draft=True)
    zero = await h.create(amount="0")
    for invoice in (partial, paid, draft, zero):
        problem = await refused(h, "POST", f"/v1/invoices/{invoice['id']}/cancel", 409)
        assert problem["type"] == "urn:watcher:problem:state-conflict"
    await refused(h, "POST", "/v1/invoices/inv_01NOPE0000000000000000000/cancel", 404)
    await refused(
        h, "POST", f"/v1/invoices/{partial['id']}/cancel", 422, json={"reason": "duplicate"}, field="reason"
    )
    assert "invoice.cancelled" not in {e.type for e in h.receiver.events}


# --------------------------------------------------------------------------- checkout session


async def test_checkout_session_requotes_with_new_addresses_and_the_old_ones_still_count(h):
    invoice = await h.create(
        amount="20", merchant_reference="cs1", payment_timing={"expires_after_minutes": 30}
    )
    [old] = invoice["payment_options"]
    h.offset += 5  # the new timer visibly starts later
    status, fresh = await post(
        h, f"/v1/invoices/{invoice['id']}/checkout-session", {"quote_rates": {"TUSD": "0.8"}}
    )
    assert status == 200, fresh
    [new] = fresh["payment_options"]
    assert new["id"] != old["id"] and new["destination_address"] != old["destination_address"]
    assert (new["amount_atomic"], new["quote_rate"]) == ("25000000", "0.8")
    assert fresh["status"] == "pending" and fresh["version"] == invoice["version"] + 1
    assert fresh["payment_timing"]["expires_after_minutes"] == 30
    assert (
        unix(fresh["payment_timing"]["payable_until"]) >= unix(invoice["payment_timing"]["payable_until"]) + 4
    )
    assert await h.get(invoice["id"]) == fresh
    # The old address still finds the invoice.
    assert await ids(h, search=old["destination_address"]) == ([invoice["id"]], 1)

    # Without a body: the last session's rates again.
    status, again = await post(h, f"/v1/invoices/{invoice['id']}/checkout-session")
    assert status == 200 and again["payment_options"][0]["amount_atomic"] == "25000000", again
    assert again["payment_options"][0]["destination_address"] not in (
        old["destination_address"],
        new["destination_address"],
    )

    # A payment to the first (no longer offered) address counts at that option's own quote:
    # half of 20 TUSD there is half the invoice.
    await h.on_chain(
        h.chain.transfer_token, h.chain.deployed.token, old["destination_address"].lower(), 10 * TOKEN_UNIT
    )
    await h.mine(1)
    half = await h.wait_invoice(
        invoice["id"], lambda i: len(i["payments"]) == 1, "payment to the old address"
    )
    assert half["payments"][0]["payment_option_id"] == old["id"] and half["payments"][0]["role"] == "counted"
    assert half["payment_summary"] == {
        "payment_state": "partial",
        "received_amount": "10.00",
        "remaining_amount": "10.00",
        "overpaid_amount": "0",
    }
    # Something was received: no new session, no cancel.
    await refused(h, "POST", f"/v1/invoices/{invoice['id']}/checkout-session", 409)
    await h.on_chain(
        h.chain.transfer_token, h.chain.deployed.token, new["destination_address"].lower(), 12_500_000
    )
    await h.mine(1)
    done = await h.wait_status(invoice["id"], "paid")
    assert done["payment_summary"]["payment_state"] == "exact"
    await refused(h, "POST", f"/v1/invoices/{invoice['id']}/checkout-session", 409)

    await timeline(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.session_refreshed"},
            {"invoice.session_refreshed"},
            {"invoice.payment_detected"},
            {"invoice.payment_detected", "invoice.paid"},
        ],
    )


async def test_checkout_session_reopens_an_expired_invoice(make_harness):
    h = await make_harness(expiry_minutes=1)
    invoice = await h.create(amount="5", assets=["sandbox:TUSD"])
    await travel_past(h, invoice)
    await h.wait_status(invoice["id"], "expired")

    status, fresh = await post(h, f"/v1/invoices/{invoice['id']}/checkout-session", {"assets": ["TUSD"]})
    assert status == 200, fresh
    assert fresh["status"] == "pending" and fresh["exception"] is None
    assert (
        unix(fresh["payment_timing"]["payable_until"]) > unix(invoice["payment_timing"]["payable_until"]) + 60
    )
    # Still pending after a new block (the deadline is in the future of the chain too).
    await h.mine(1)
    await h.settle()
    assert (await h.get(invoice["id"]))["status"] == "pending"
    paid = await pay_and_wait(h, invoice["id"], "paid")
    assert paid["payments"][0]["role"] == "counted"
    await timeline(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.expired"},
            {"invoice.session_refreshed"},
            {"invoice.payment_detected", "invoice.paid"},
        ],
    )


async def test_checkout_session_is_refused_unless_pending_or_expired_with_nothing_received(make_harness):
    h = await make_harness(expiry_minutes=1)
    late = await h.create(amount="5")
    draft = await h.create(amount="5", draft=True)
    zero = await h.create(amount="0")
    cancelled = await h.create(amount="5")
    assert (await post(h, f"/v1/invoices/{cancelled['id']}/cancel"))[0] == 200
    await travel_past(h, late)
    await h.wait_status(late["id"], "expired")
    await h.pay(late["id"])
    await h.mine(1)
    got = await h.wait_invoice(late["id"], lambda i: len(i["payments"]) == 1, "late payment")
    assert got["status"] == "expired" and got["payments"][0]["role"] == "late"

    for invoice in (late, draft, zero, cancelled):
        await refused(h, "POST", f"/v1/invoices/{invoice['id']}/checkout-session", 409)
    await refused(h, "POST", "/v1/invoices/inv_01NOPE0000000000000000000/checkout-session", 404)


async def test_checkout_session_that_cannot_be_quoted_is_a_422_and_changes_nothing(make_harness):
    h = await make_harness(usd_rate=None)
    invoice = await h.create(amount="4", quote_rates={"TUSD": "1"})
    problem = await refused(
        h,
        "POST",
        f"/v1/invoices/{invoice['id']}/checkout-session",
        422,
        json={"quote_rates": {"OTHER": "1"}},
        field="quote_rates.OTHER",
    )
    assert "no configured asset" in problem["detail"]
    assert await h.get(invoice["id"]) == invoice
    status, fresh = await post(
        h, f"/v1/invoices/{invoice['id']}/checkout-session", {"quote_rates": {"TUSD": "2"}}
    )
    assert status == 200 and fresh["payment_options"][0]["amount_atomic"] == "2000000", fresh


# --------------------------------------------------------------------------- exception resolve


async def test_resolve_fits_the_open_exception_and_answers_the_invoice(h):
    invoice = await h.create(amount="5")
    await h.pay(invoice["id"], "6")
    await h.mine(1)
    over = await h.wait_status(invoice["id"], "paid")
    assert over["exception"]["type"] == "overpaid" and over["exception"]["status"] == "open"

    path = f"/v1/invoices/{invoice['id']}/exception/resolve"
    for action in ("accept_late_payment", "write_off_underpayment", "mark_duplicate_payment_reviewed"):
        problem = await refused(h, "POST", path, 409, json={"resolution_action": action})
        assert "overpaid" in problem["detail"]
    await refused(
        h,
        "POST",
        path,
        422,
        json={"resolution_action": "accept_overpayment", "resolution_note": "n" * 501},
        field="resolution_note",
    )
    status, resolved = await post(
        h, path, {"resolution_action": "accept_overpayment", "resolution_note": "refund sent"}
    )
    assert status == 200, resolved
    assert resolved["exception"]["type"] == "overpaid" and resolved["exception"]["status"] == "resolved"
    assert resolved["exception"]["resolution_action"] == "accept_overpayment"
    assert resolved["exception"]["resolution_note"] == "refund sent" and resolved["exception"]["resolved_at"]
    assert resolved["version"] == over["version"] + 1 and resolved["status"] == "paid"
    assert await h.get(invoice["id"]) == resolved
    await refused(h, "POST", path, 409, json={"resolution_action": "other"})  # none open any more

    # A second payment is a duplicate: `other` resolves it without counting it.
    await h.pay(invoice["id"], "1")
    await h.mine(1)
    dup = await h.wait_invoice(invoice["id"], lambda i: len(i["payments"]) == 2, "duplicate")
    assert dup["exception"]["type"] == "duplicate_payment" and dup["exception"]["status"] == "open"
    status, other = await post(h, path, {"resolution_action": "other"})
    assert status == 200 and other["exception"]["resolution_action"] == "other", other
    assert [p["role"] for p in other["payments"]] == ["counted", "duplicate"]
    await refused(
        h,
        "POST",
        "/v1/invoices/inv_01NOPE0000000000000000000/exception/resolve",
        404,
        json={"resolution_action": "other"},
    )
    await h.mine(2)
    await h.wait_status(invoice["id"], "confirmed")
    await timeline(
        h,
        invoice,
        [
            {"invoice.created"},
            {"invoice.payment_detected", "invoice.paid", "invoice.exception_opened"},
            {"invoice.exception_resolved"},
            {"invoice.payment_detected", "invoice.exception_opened"},
            {"invoice.exception_resolved"},
            {"invoice.confirmed"},
        ],
    )


# --------------------------------------------------------------------------- bad requests


NOPE = "inv_01NOPE0000000000000000000"
FINALIZE, CANCEL, SESSION = (
    "/v1/invoices/{draft}/finalize",
    "/v1/invoices/{inv}/cancel",
    "/v1/invoices/{inv}/checkout-session",
)

ROUTE_CASES = [
    # finalize: only a draft, no body fields
    Case("finalize-pending", 409, None, "POST", "/v1/invoices/{inv}/finalize"),
    Case("finalize-confirmed", 409, None, "POST", "/v1/invoices/{zero}/finalize", json={}),
    Case("finalize-unknown", 404, None, "POST", f"/v1/invoices/{NOPE}/finalize"),
    Case("finalize-field", 422, "assets", "POST", FINALIZE, json={"assets": ["TUSD"]}),
    Case("finalize-array", 422, "body", "POST", FINALIZE, json=[]),
    Case("finalize-null", 422, "body", "POST", FINALIZE, data=b"null"),
    Case("finalize-malformed", 400, None, "POST", FINALIZE, data=b"{"),
    Case("finalize-70KB", 413, None, "POST", FINALIZE, data=b'{"x": "' + b"x" * 70_000 + b'"}'),
    Case(
        "finalize-bad-body-unknown-invoice", 422, "x", "POST", f"/v1/invoices/{NOPE}/finalize", json={"x": 1}
    ),
    # cancel
    Case("cancel-draft", 409, None, "POST", "/v1/invoices/{draft}/cancel"),
    Case("cancel-confirmed", 409, None, "POST", "/v1/invoices/{zero}/cancel", json={}),
    Case("cancel-unknown", 404, None, "POST", f"/v1/invoices/{NOPE}/cancel"),
    Case("cancel-reason", 422, "reason", "POST", CANCEL, json={"reason": "x"}),
    Case("cancel-string", 422, "body", "POST", CANCEL, json="cancel"),
    Case("cancel-malformed", 400, None, "POST", CANCEL, data=b'{"a":'),
    Case("cancel-70KB", 413, None, "POST", CANCEL, data=b'{"x": "' + b"x" * 70_000 + b'"}'),
    # checkout-session
    Case("session-draft", 409, None, "POST", "/v1/invoices/{draft}/checkout-session"),
    Case("session-confirmed", 409, None, "POST", "/v1/invoices/{zero}/checkout-session", json={}),
    Case("session-unknown", 404, None, "POST", f"/v1/invoices/{NOPE}/checkout-session"),
    Case("session-asset-unknown", 422, "assets", "POST", SESSION, json={"assets": ["NOPE"]}),
    Case("session-asset-unknown-network", 422, "assets", "POST", SESSION, json={"assets": ["ethereum:TUSD"]}),
    Case("session-assets-empty", 422, "assets", "POST", SESSION, json={"assets": []}),
    Case("session-assets-string", 422, "assets", "POST", SESSION, json={"assets": "TUSD"}),
    Case("session-rate-zero", 422, "quote_rates", "POST", SESSION, json={"quote_rates": {"TUSD": "0"}}),
    Case("session-rate-abc", 422, "quote_rates", "POST", SESSION, json={"quote_rates": {"TUSD": "abc"}}),
    Case("session-rate-float-literal", 400, None, "POST", SESSION, data=b'{"quote_rates": {"TUSD": NaN}}'),
    Case("session-rates-list", 422, "quote_rates", "POST", SESSION, json={"quote_rates": []}),
    Case("session-rails", 422, "rails", "POST", SESSION, json={"rails": ["address"]}),
    Case("session-amount", 422, "amount", "POST", SESSION, json={"amount": "1"}),
    Case(
        "session-timing",
        422,
        "payment_timing",
        "POST",
        SESSION,
        json={"payment_timing": {"expires_after_minutes": 5}},
    ),
    Case("session-array", 422, "body", "POST", SESSION, json=[]),
    Case("session-malformed", 400, None, "POST", SESSION, data=b'{"assets": ['),
    Case("session-70KB", 413, None, "POST", SESSION, data=b'{"assets": ["' + b"x" * 70_000 + b'"]}'),
    Case(
        "session-bad-body-wrong-state",
        422,
        "assets",
        "POST",
        "/v1/invoices/{zero}/checkout-session",
        json={"assets": ["NOPE"]},
    ),
    Case(
        "session-bad-body-unknown-invoice",
        422,
        "quote_rates",
        "POST",
        f"/v1/invoices/{NOPE}/checkout-session",
        json={"quote_rates": {"TUSD": "-1"}},
    ),
    # list, export and stats queries
    Case("list-search-blank", 422, "search", "GET", "/v1/invoices?search=%20%20"),
    Case("list-search-empty", 422, "search", "GET", "/v1/invoices?search="),
    Case("list-search-255", 422, "search", "GET", "/v1/invoices?search=" + "s" * 255),
    Case("export-status-bogus", 422, "status", "GET", "/v1/invoices/export?status=bogus"),
    Case("export-unknown-param", 422, "colour", "GET", "/v1/invoices/export?colour=red"),
    Case("export-search-blank", 422, "search", "GET", "/v1/invoices/export?search=%20"),
    Case("export-limit-0", 422, "limit", "GET", "/v1/invoices/export?limit=0"),
    Case("export-limit-over-cap", 422, "limit", "GET", "/v1/invoices/export?limit=100001"),
    Case("export-offset-negative", 422, "offset", "GET", "/v1/invoices/export?offset=-1"),
    Case(
        "export-exception-type-bogus",
        422,
        "exception_type",
        "GET",
        "/v1/invoices/export?exception_type=fraud",
    ),
    Case("stats-limit", 422, "limit", "GET", "/v1/invoices/stats?limit=5"),
    Case("stats-offset", 422, "offset", "GET", "/v1/invoices/stats?offset=0"),
    Case("stats-status-bogus", 422, "status", "GET", "/v1/invoices/stats?status=PAID"),
    Case(
        "stats-exception-status-bogus",
        422,
        "exception_status",
        "GET",
        "/v1/invoices/stats?exception_status=closed",
    ),
    Case("stats-search-blank", 422, "search", "GET", "/v1/invoices/stats?search="),
    # methods
    Case("get-finalize", 405, None, "GET", "/v1/invoices/{draft}/finalize"),
    Case("get-cancel", 405, None, "GET", CANCEL),
    Case("get-session", 405, None, "GET", SESSION),
    Case("post-export", 405, None, "POST", "/v1/invoices/export", json={}),
    Case("post-stats", 405, None, "POST", "/v1/invoices/stats", json={}),
    Case("delete-stats", 405, None, "DELETE", "/v1/invoices/stats"),
    Case("put-cancel", 405, None, "PUT", CANCEL, json={}),
]

NEW_ROUTES = [
    ("GET", "/v1/invoices?search=x", None),
    ("GET", "/v1/invoices/export", None),
    ("GET", "/v1/invoices/stats", None),
    ("POST", FINALIZE, {}),
    ("POST", CANCEL, {}),
    ("POST", SESSION, {}),
    ("POST", f"/v1/invoices/{NOPE}/cancel", {}),
]
AUTH_CASES = [
    Case(
        f"{method}-{path}-{variant}",
        401,
        None,
        method,
        path,
        json=NO_JSON if payload is None else payload,
        headers={} if header is None else {"Authorization": header},
        auth=False,
    )
    for method, path, payload in NEW_ROUTES
    for variant, header in (
        ("missing", None),
        ("wrong-key", "Bearer sk_test_wrong"),
        ("key-plus-one", "Bearer {key}x"),
        ("basic", "Basic {key}"),
    )
]


@pytest.mark.parametrize("table", [ROUTE_CASES, AUTH_CASES], ids=["routes", "auth-401"])
async def test_bad_requests_to_the_new_routes_answer_problems_and_change_nothing(h, table):
    names = await fixtures(h)
    before = await snapshot(h)
    failures = []
    for case in table:
        status, got, ctype = await send(h, case, names)
        wrong = problem_errors(case, status, got, ctype)
        after = await snapshot(h)
        if after != before:
            wrong.append(f"stored data changed: {before} -> {after}")
            before = after
        if wrong:
            failures.append(f"{case.id}: " + "; ".join(wrong))
    assert not failures, f"{len(failures)} of {len(table)} cases failed:\n" + "\n".join(failures)
    # Nothing was emitted for the fixtures beyond their creation.
    await h.settle()
    assert {e.type for e in h.receiver.events} <= {"invoice.created", "invoice.confirmed"}
