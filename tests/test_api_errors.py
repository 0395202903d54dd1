"""Bad input to every route answers the contract's problem+json, never a 500, and stores nothing.

Contract §3: errors are `application/problem+json` with `type`, `title`, `status`, `detail`
(and for 422 an `errors` list of `{field, message}`); 400 malformed JSON, 401, 404, 405, 409,
413 over 64 KiB, 422 invalid field. "No request, however malformed, gets a 500 or changes
stored data."

Each table runs against one real daemon (a harness start costs about a second), case after
case. Before the table a pending invoice (`{inv}`, its option `{opt}`) and a zero-amount one
(`{zero}`, confirmed with no options) are created; after every case the list of invoices (ids,
versions, statuses, total) and the chain head must be exactly what they were, and after the
whole table one block is mined and the pending invoice must still have no payment (a bad
`pay` must not have queued a transfer). Failures are collected and reported together.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import pytest
from harness import Harness

PROBLEM = "application/problem+json"
NO_JSON = object()  # sentinel: the case sends `data` (or nothing), not a JSON value


@dataclass
class Case:
    id: str
    status: int
    field: str | None = (
        None  # for 422: what errors[0].field must name (exactly, or as a prefix of a sub-path)
    )
    method: str = "POST"
    path: str = "/v1/invoices"
    json: Any = NO_JSON
    data: bytes | None = None
    headers: dict[str, str] | None = None
    auth: bool = True


def create(id: str, status: int, field: str | None = None, **kw: Any) -> Case:
    return Case(id, status, field, "POST", "/v1/invoices", **kw)


def body(**fields: Any) -> dict:
    """A create body that is valid but for what the case changes."""
    return {"amount": "10", **fields}


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


# --------------------------------------------------------------------------- tables

CREATE_BODY = [
    create("malformed-json", 400, data=b'{"amount": '),
    create("duplicate-key", 400, data=b'{"amount": "1", "amount": "2"}'),
    create("trailing-comma", 400, data=b'{"amount": "1",}'),
    create("form-encoded", 400, data=b"amount=1"),
    create(
        "form-content-type",
        415,
        data=b"amount=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ),
    create("text-plain-content-type", 415, data=b'{"amount": "1"}', headers={"Content-Type": "text/plain"}),
    create(
        "octet-stream-content-type",
        415,
        data=b'{"amount": "1"}',
        headers={"Content-Type": "application/octet-stream"},
    ),
    create(
        "json-lookalike-content-type",
        415,
        data=b'{"amount": "1"}',
        headers={"Content-Type": "application/jsonx"},
    ),
    create("single-quotes", 400, data=b"{'amount': '1'}"),
    create("empty-body", 400, data=b""),
    create("whitespace-body", 400, data=b" \n\t "),
    create("invalid-utf8", 400, data=b'{"amount": "\xff\xfe"}'),
    create("nan-literal", 400, data=b'{"amount": NaN}'),
    create("infinity-literal", 400, data=b'{"amount": Infinity}'),
    create("minus-infinity-literal", 400, data=b'{"amount": -Infinity}'),
    create("nested-50000-deep", 400, data=b"[" * 50_000),
    create("nested-30000-deep-array", 422, "body", data=b"[" * 30_000 + b"]" * 30_000),
    create(
        "lone-surrogate-in-string-field",
        422,
        "product_name",
        data=b'{"amount": "1", "product_name": "\\ud800"}',
    ),
    create("null", 422, "body", data=b"null"),
    create("array", 422, "body", json=[]),
    create("array-of-object", 422, "body", json=[{"amount": "1"}]),
    create("string", 422, "body", json="amount=1"),
    create("number", 422, "body", data=b"5"),
    create("bool", 422, "body", data=b"true"),
    create("empty-object", 422, "amount", json={}),
    create("unknown-field", 422, "colour", json=body(colour="red")),
    create("unknown-field-id", 422, "id", json=body(id="inv_mine")),
    create("unknown-field-status", 422, "status", json=body(status="paid")),
    create("unknown-field-lone-surrogate", 422, None, data=b'{"amount": "1", "\\ud800": 1}'),
    create(
        "body-exactly-64KiB", 422, "metadata", data=None
    ),  # filled in below: parsed, then refused for metadata size
    create("body-64KiB-plus-1", 413, data=None),  # filled in below
    create("body-70KB", 413, data=b'{"amount": "1", "metadata": {"blob": "' + b"x" * 70_000 + b'"}}'),
]


def _sized(size: int) -> bytes:
    head, tail = b'{"amount": "1", "metadata": {"blob": "', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


CREATE_BODY[-3].data = _sized(64 * 1024)
CREATE_BODY[-2].data = _sized(64 * 1024 + 1)

CREATE_AMOUNT = [
    create("missing", 422, "amount", json={"currency": "USD"}),
    create("null", 422, "amount", json=body(amount=None)),
    create("true", 422, "amount", json=body(amount=True)),
    create("false", 422, "amount", json=body(amount=False)),
    create("list", 422, "amount", json=body(amount=["1"])),
    create("object", 422, "amount", json=body(amount={"value": "1"})),
    create("abc", 422, "amount", json=body(amount="abc")),
    create("empty-string", 422, "amount", json=body(amount="")),
    create("blank-string", 422, "amount", json=body(amount="  ")),
    create("NaN-string", 422, "amount", json=body(amount="NaN")),
    create("sNaN-string", 422, "amount", json=body(amount="sNaN")),
    create("Infinity-string", 422, "amount", json=body(amount="Infinity")),
    create("minus-Infinity-string", 422, "amount", json=body(amount="-Infinity")),
    create("inf-string", 422, "amount", json=body(amount="inf")),
    create("minus-one", 422, "amount", json=body(amount="-1")),
    create("minus-cent", 422, "amount", json=body(amount="-0.01")),
    create("minus-one-number", 422, "amount", json=body(amount=-1)),
    create("1e400-string", 422, "amount", json=body(amount="1e400")),
    create("1e400-number", 422, "amount", data=b'{"amount": 1e400}'),
    create("1e30-string", 422, "amount", json=body(amount="1e30")),
    create("1e30-number", 422, "amount", data=b'{"amount": 1e30}'),
    create("10^30-integer", 422, "amount", data=b'{"amount": 1000000000000000000000000000000}'),
    create("just-over-max", 422, "amount", json=body(amount="1000000000000001")),
    create("exponent-overflow", 422, "amount", json=body(amount="1e99999999999999999999")),
    create("huge-exponent", 422, "amount", json=body(amount="1e999999999")),
    create("19-places", 422, "amount", json=body(amount="0.0000000000000000001")),
    create("19-places-number", 422, "amount", data=b'{"amount": 0.0000000000000000001}'),
    create("tiny-exponent", 422, "amount", json=body(amount="1e-999999999")),
    create("comma-decimal", 422, "amount", json=body(amount="1,5")),
    create("hex", 422, "amount", json=body(amount="0x10")),
    create("inner-space", 422, "amount", json=body(amount="1 000")),
    create("underscores", 422, "amount", json=body(amount="1_000")),
    create("arabic-indic-digits", 422, "amount", json=body(amount="\u0661\u0662")),
    create("fullwidth-digits", 422, "amount", json=body(amount="\uff15")),
    create("currency-symbol", 422, "amount", json=body(amount="$10")),
    create("currency-EUR", 422, "currency", json=body(currency="EUR")),
    create("currency-lowercase", 422, "currency", json=body(currency="usd")),
    create("currency-number", 422, "currency", json=body(currency=840)),
    create("currency-null", 422, "currency", json=body(currency=None)),
]

CREATE_FIELDS = [
    create("product_name-201", 422, "product_name", json=body(product_name="p" * 201)),
    create("product_name-201-emoji", 422, "product_name", json=body(product_name="\U0001f600" * 201)),
    create("product_name-number", 422, "product_name", json=body(product_name=123)),
    create("product_name-list", 422, "product_name", json=body(product_name=["x"])),
    create("issued_by-121", 422, "issued_by", json=body(issued_by="i" * 121)),
    create("bill_to-121", 422, "bill_to", json=body(bill_to="b" * 121)),
    create("bill_to-object", 422, "bill_to", json=body(bill_to={"name": "x"})),
    create("merchant_reference-201", 422, "merchant_reference", json=body(merchant_reference="m" * 201)),
    create("merchant_reference-number", 422, "merchant_reference", json=body(merchant_reference=123)),
    create("customer_id-201", 422, "customer_id", json=body(customer_id="c" * 201)),
    create("customer_id-bool", 422, "customer_id", json=body(customer_id=True)),
    create("customer_email-no-at", 422, "customer_email", json=body(customer_email="not-an-email")),
    create("customer_email-space", 422, "customer_email", json=body(customer_email="a b@example.com")),
    create("customer_email-no-local", 422, "customer_email", json=body(customer_email="@example.com")),
    create("customer_email-no-domain", 422, "customer_email", json=body(customer_email="a@")),
    create("customer_email-two-ats", 422, "customer_email", json=body(customer_email="a@b@c")),
    create("customer_email-empty", 422, "customer_email", json=body(customer_email="")),
    create("customer_email-255", 422, "customer_email", json=body(customer_email="a" * 243 + "@example.com")),
    create("customer_email-number", 422, "customer_email", json=body(customer_email=5)),
    create("draft-string-true", 422, "draft", json=body(draft="true")),
    create("draft-string-false", 422, "draft", json=body(draft="false")),
    create("draft-one", 422, "draft", json=body(draft=1)),
    create("draft-null", 422, "draft", json=body(draft=None)),
]

CREATE_TIMING = [
    create("string", 422, "payment_timing", json=body(payment_timing="immediate")),
    create("list", 422, "payment_timing", json=body(payment_timing=[])),
    create("number", 422, "payment_timing", json=body(payment_timing=20)),
    create("unknown-mode", 422, "payment_timing.mode", json=body(payment_timing={"mode": "weekly"})),
    create("mode-null", 422, "payment_timing.mode", json=body(payment_timing={"mode": None})),
    create("due_date-without-days", 422, "payment_timing", json=body(payment_timing={"mode": "due_date"})),
    create(
        "due_date-with-minutes",
        422,
        "payment_timing",
        json=body(payment_timing={"mode": "due_date", "due_after_days": 3, "expires_after_minutes": 5}),
    ),
    create(
        "immediate-with-days",
        422,
        "payment_timing",
        json=body(payment_timing={"mode": "immediate", "due_after_days": 3}),
    ),
    create("immediate-with-grace", 422, "payment_timing", json=body(payment_timing={"grace_period_days": 3})),
    create(
        "minutes-0",
        422,
        "payment_timing.expires_after_minutes",
        json=body(payment_timing={"expires_after_minutes": 0}),
    ),
    create(
        "minutes-negative",
        422,
        "payment_timing.expires_after_minutes",
        json=body(payment_timing={"expires_after_minutes": -5}),
    ),
    create(
        "minutes-over-a-year",
        422,
        "payment_timing.expires_after_minutes",
        json=body(payment_timing={"expires_after_minutes": 525_601}),
    ),
    create(
        "minutes-string",
        422,
        "payment_timing.expires_after_minutes",
        json=body(payment_timing={"expires_after_minutes": "20"}),
    ),
    create(
        "minutes-fraction",
        422,
        "payment_timing.expires_after_minutes",
        data=b'{"amount": "10", "payment_timing": {"expires_after_minutes": 20.5}}',
    ),
    create(
        "minutes-bool",
        422,
        "payment_timing.expires_after_minutes",
        json=body(payment_timing={"expires_after_minutes": True}),
    ),
    create(
        "days-negative",
        422,
        "payment_timing.due_after_days",
        json=body(payment_timing={"mode": "due_date", "due_after_days": -1}),
    ),
    create(
        "days-too-many",
        422,
        "payment_timing.due_after_days",
        json=body(payment_timing={"mode": "due_date", "due_after_days": 3651}),
    ),
    create(
        "grace-too-long",
        422,
        "payment_timing.grace_period_days",
        json=body(payment_timing={"mode": "due_date", "due_after_days": 3, "grace_period_days": 366}),
    ),
    create(
        "unknown-key",
        422,
        "payment_timing.colour",
        json=body(payment_timing={"expires_after_minutes": 20, "colour": 1}),
    ),
    create(
        "payable_until-given",
        422,
        "payment_timing.payable_until",
        json=body(payment_timing={"payable_until": "2030-01-01T00:00:00Z"}),
    ),
]

CREATE_OPTIONS = [
    create("assets-string", 422, "assets", json=body(assets="TUSD")),
    create("assets-empty", 422, "assets", json=body(assets=[])),
    create("assets-unknown", 422, "assets", json=body(assets=["NOPE"])),
    create("assets-unknown-network", 422, "assets", json=body(assets=["ethereum:TUSD"])),
    create("assets-one-unknown", 422, "assets", json=body(assets=["TUSD", "USDT"])),
    create("assets-empty-name", 422, "assets", json=body(assets=[""])),
    create("assets-number", 422, "assets", json=body(assets=[1])),
    create("assets-81-chars", 422, "assets", json=body(assets=["A" * 81])),
    create("assets-51-items", 422, "assets", json=body(assets=["TUSD"] * 51)),
    create("assets-unknown-on-draft", 422, "assets", json=body(assets=["NOPE"], draft=True)),
    create("assets-unknown-at-zero", 422, "assets", json=body(amount="0", assets=["NOPE"])),
    create("rails-unknown-on-draft", 422, "rails", json=body(rails=["lightning"], draft=True)),
    create("rails-bitcoin", 422, "rails", json=body(rails=["bitcoin"])),
    create("rails-empty", 422, "rails", json=body(rails=[])),
    create("rails-string", 422, "rails", json=body(rails="address")),
    create("rails-repeated", 422, "rails", json=body(rails=["address", "address"])),
    create("rails-null-item", 422, "rails", json=body(rails=[None])),
    create("quote_rates-list", 422, "quote_rates", json=body(quote_rates=[])),
    create("quote_rates-string", 422, "quote_rates", json=body(quote_rates="1")),
    create("quote_rates-zero", 422, "quote_rates", json=body(quote_rates={"TUSD": "0"})),
    create("quote_rates-negative", 422, "quote_rates", json=body(quote_rates={"TUSD": "-1"})),
    create("quote_rates-abc", 422, "quote_rates", json=body(quote_rates={"TUSD": "abc"})),
    create("quote_rates-NaN", 422, "quote_rates", json=body(quote_rates={"TUSD": "NaN"})),
    create("quote_rates-Infinity", 422, "quote_rates", json=body(quote_rates={"TUSD": "Infinity"})),
    create("quote_rates-bool", 422, "quote_rates", json=body(quote_rates={"TUSD": True})),
    create("quote_rates-null", 422, "quote_rates", json=body(quote_rates={"TUSD": None})),
    create("quote_rates-object", 422, "quote_rates", json=body(quote_rates={"TUSD": {"usd": "1"}})),
    create("quote_rates-over-10^12", 422, "quote_rates", json=body(quote_rates={"TUSD": "1e13"})),
    create("quote_rates-tiny-exponent", 422, "quote_rates", json=body(quote_rates={"TUSD": "1e-999999999"})),
    create("quote_rates-empty-symbol", 422, "quote_rates", json=body(quote_rates={"": "1"})),
    create(
        "quote_rates-lone-surrogate-symbol",
        422,
        "quote_rates",
        data=b'{"amount": "10", "quote_rates": {"\\ud800": "1"}}',
    ),
    create("quote_rates-81-char-symbol", 422, "quote_rates", json=body(quote_rates={"A" * 81: "1"})),
    create("quote_rates-unknown-asset", 422, "quote_rates.NOPE", json=body(quote_rates={"NOPE": "1"})),
]

CREATE_METADATA = [
    create("list", 422, "metadata", json=body(metadata=[])),
    create("string", 422, "metadata", json=body(metadata="vip")),
    create("number", 422, "metadata", json=body(metadata=5)),
    create("over-8KiB-one-value", 422, "metadata", json=body(metadata={"blob": "x" * (8 * 1024)})),
    create(
        "over-8KiB-many-keys",
        422,
        "metadata",
        json=body(metadata={f"k{i:04d}": "v" * 10 for i in range(600)}),
    ),
    create("notes-141", 422, "metadata", json=body(metadata={"notes": "n" * 141})),
    create("notes-number", 422, "metadata", json=body(metadata={"notes": 5})),
    create("notes-list", 422, "metadata", json=body(metadata={"notes": ["a"]})),
    create("notes-object", 422, "metadata", json=body(metadata={"notes": {"a": "b"}})),
    create("notes-bool", 422, "metadata", json=body(metadata={"notes": False})),
    create("nested-33-deep", 422, "metadata", json=body(metadata=nested(33))),
    create("nested-300-deep", 422, "metadata", data=json.dumps(body(metadata=nested(300))).encode()),
    create("nested-900-deep", 422, "metadata", data=json.dumps(body(metadata=nested(900))).encode()),
    create(
        "integer-over-64-bits",
        422,
        "metadata",
        data=b'{"amount": "10", "metadata": {"n": 100000000000000000000000000000}}',
    ),
    create("number-1e400", 422, "metadata", data=b'{"amount": "10", "metadata": {"n": 1e400}}'),
    create(
        "number-beyond-a-double",
        422,
        "metadata",
        data=b'{"amount": "10", "metadata": {"n": 0.12345678901234567890123}}',
    ),
    create("lone-surrogate-value", 422, "metadata", data=b'{"amount": "10", "metadata": {"s": "\\udc00"}}'),
    create("lone-surrogate-key", 422, "metadata", data=b'{"amount": "10", "metadata": {"\\ud800": "x"}}'),
]

LIST_QUERY = [
    Case("status-bogus", 422, "status", "GET", "/v1/invoices?status=bogus"),
    Case("status-empty", 422, "status", "GET", "/v1/invoices?status="),
    Case("status-uppercase", 422, "status", "GET", "/v1/invoices?status=PENDING"),
    Case("exception_type-bogus", 422, "exception_type", "GET", "/v1/invoices?exception_type=fraud"),
    Case("exception_status-bogus", 422, "exception_status", "GET", "/v1/invoices?exception_status=closed"),
    Case(
        "merchant_reference-255",
        422,
        "merchant_reference",
        "GET",
        "/v1/invoices?merchant_reference=" + "m" * 255,
    ),
    Case("limit-0", 422, "limit", "GET", "/v1/invoices?limit=0"),
    Case("limit-201", 422, "limit", "GET", "/v1/invoices?limit=201"),
    Case("limit-abc", 422, "limit", "GET", "/v1/invoices?limit=abc"),
    Case("limit-empty", 422, "limit", "GET", "/v1/invoices?limit="),
    Case("limit-negative", 422, "limit", "GET", "/v1/invoices?limit=-1"),
    Case("limit-twice", 422, "limit", "GET", "/v1/invoices?limit=1&limit=2"),
    Case("status-twice", 422, "status", "GET", "/v1/invoices?status=pending&status=bogus"),
    Case("limit-fraction", 422, "limit", "GET", "/v1/invoices?limit=1.5"),
    Case("limit-plus", 422, "limit", "GET", "/v1/invoices?limit=%2B5"),
    Case("limit-superscript-two", 422, "limit", "GET", "/v1/invoices?limit=%C2%B2"),
    Case("limit-arabic-indic-one", 422, "limit", "GET", "/v1/invoices?limit=%D9%A1"),
    Case("limit-5000-digits", 422, "limit", "GET", "/v1/invoices?limit=" + "9" * 5000),
    Case("offset-negative", 422, "offset", "GET", "/v1/invoices?offset=-1"),
    Case("offset-abc", 422, "offset", "GET", "/v1/invoices?offset=abc"),
    Case("offset-over-10^9", 422, "offset", "GET", "/v1/invoices?offset=1000000001"),
    Case("offset-5000-digits", 422, "offset", "GET", "/v1/invoices?offset=" + "9" * 5000),
]

UNKNOWN_IDS = [
    Case("get", 404, None, "GET", "/v1/invoices/inv_01NOPE0000000000000000000"),
    Case("status", 404, None, "GET", "/v1/invoices/inv_01NOPE0000000000000000000/status"),
    Case("payments", 404, None, "GET", "/v1/invoices/inv_01NOPE0000000000000000000/payments"),
    Case(
        "resolve",
        404,
        None,
        "POST",
        "/v1/invoices/inv_01NOPE0000000000000000000/exception/resolve",
        json={"resolution_action": "other"},
    ),
    Case("sandbox-pay", 404, None, "POST", "/v1/sandbox/invoices/inv_01NOPE0000000000000000000/pay", json={}),
    Case(
        "sandbox-pay-empty-body", 404, None, "POST", "/v1/sandbox/invoices/inv_01NOPE0000000000000000000/pay"
    ),
    Case("option-id-as-invoice-id", 404, None, "GET", "/v1/invoices/{opt}"),
    Case("id-differs-in-case", 404, None, "GET", "/v1/invoices/{inv_lower}"),
    Case("percent-encoded-space", 404, None, "GET", "/v1/invoices/inv%20x"),
    Case("non-ascii", 404, None, "GET", "/v1/invoices/inv_%C3%BC"),
    Case("sql-ish", 404, None, "GET", "/v1/invoices/x'%20OR%20'1'='1"),
    Case("percent-encoded-surrogate", 404, None, "GET", "/v1/invoices/%ED%A0%80"),
    Case("percent-encoded-invalid-utf8", 404, None, "GET", "/v1/invoices/%FF%FE"),
    Case("1000-chars", 404, None, "GET", "/v1/invoices/" + "i" * 1000),
]

ROUTING = [
    Case("unknown-root-path", 404, None, "GET", "/nope", auth=False),
    Case("unknown-v1-path", 404, None, "GET", "/v1/nope"),
    Case("unknown-invoice-subpath", 404, None, "GET", "/v1/invoices/{inv}/nope"),
    Case("unknown-sandbox-path", 404, None, "POST", "/v1/sandbox/nope", json={}),
    Case("too-deep", 404, None, "GET", "/v1/invoices/{inv}/status/extra"),
    Case("delete-invoices", 405, None, "DELETE", "/v1/invoices"),
    Case("patch-invoices", 405, None, "PATCH", "/v1/invoices", json={"amount": "1"}),
    Case("put-invoice", 405, None, "PUT", "/v1/invoices/{inv}", json={"amount": "1"}),
    Case("post-invoice", 405, None, "POST", "/v1/invoices/{inv}", json={"amount": "1"}),
    Case("delete-invoice", 405, None, "DELETE", "/v1/invoices/{inv}"),
    Case("post-status", 405, None, "POST", "/v1/invoices/{inv}/status", json={}),
    Case("post-payments", 405, None, "POST", "/v1/invoices/{inv}/payments", json={}),
    Case("get-resolve", 405, None, "GET", "/v1/invoices/{inv}/exception/resolve"),
    Case("get-sandbox-pay", 405, None, "GET", "/v1/sandbox/invoices/{inv}/pay"),
    Case("get-sandbox-mine", 405, None, "GET", "/v1/sandbox/mine"),
    Case("post-healthz", 405, None, "POST", "/healthz", json={}, auth=False),
]

RESOLVE = "/v1/invoices/{inv}/exception/resolve"
RESOLVE_CASES = [
    *[
        Case(f"no-open-exception-{action}", 409, None, "POST", RESOLVE, json={"resolution_action": action})
        for action in (
            "accept_late_payment",
            "accept_overpayment",
            "write_off_underpayment",
            "mark_duplicate_payment_reviewed",
            "other",
        )
    ],
    Case(
        "no-open-exception-with-note",
        409,
        None,
        "POST",
        RESOLVE,
        json={"resolution_action": "other", "resolution_note": "ok"},
    ),
    Case(
        "no-open-exception-zero-invoice",
        409,
        None,
        "POST",
        "/v1/invoices/{zero}/exception/resolve",
        json={"resolution_action": "other"},
    ),
    Case("bad-action", 422, "resolution_action", "POST", RESOLVE, json={"resolution_action": "approve"}),
    Case("action-uppercase", 422, "resolution_action", "POST", RESOLVE, json={"resolution_action": "OTHER"}),
    Case("action-number", 422, "resolution_action", "POST", RESOLVE, json={"resolution_action": 5}),
    Case("action-null", 422, "resolution_action", "POST", RESOLVE, json={"resolution_action": None}),
    Case("action-list", 422, "resolution_action", "POST", RESOLVE, json={"resolution_action": ["other"]}),
    Case("action-missing", 422, "resolution_action", "POST", RESOLVE, json={"resolution_note": "x"}),
    Case(
        "note-501",
        422,
        "resolution_note",
        "POST",
        RESOLVE,
        json={"resolution_action": "other", "resolution_note": "n" * 501},
    ),
    Case(
        "note-number",
        422,
        "resolution_note",
        "POST",
        RESOLVE,
        json={"resolution_action": "other", "resolution_note": 5},
    ),
    Case(
        "unknown-field-lone-surrogate",
        422,
        None,
        "POST",
        RESOLVE,
        data=b'{"resolution_action": "other", "\\ud800": 1}',
    ),
    Case(
        "unknown-field",
        422,
        "status",
        "POST",
        RESOLVE,
        json={"resolution_action": "other", "status": "resolved"},
    ),
    Case(
        "bad-action-unknown-invoice",
        422,
        "resolution_action",
        "POST",
        "/v1/invoices/inv_nope/exception/resolve",
        json={"resolution_action": "approve"},
    ),
    Case("malformed-json", 400, None, "POST", RESOLVE, data=b'{"resolution_action": "other"'),
    Case("empty-body", 400, None, "POST", RESOLVE, data=b""),
    Case("array", 422, "body", "POST", RESOLVE, json=[{"resolution_action": "other"}]),
    Case("string", 422, "body", "POST", RESOLVE, json="other"),
    Case("null", 422, "body", "POST", RESOLVE, data=b"null"),
    Case("body-70KB", 413, None, "POST", RESOLVE, data=b'{"resolution_note": "' + b"x" * 70_000 + b'"}'),
]

PAY = "/v1/sandbox/invoices/{inv}/pay"
PAY_CASES = [
    Case("amount-true", 422, "amount", "POST", PAY, json={"amount": True}),
    Case("amount-list", 422, "amount", "POST", PAY, json={"amount": ["1"]}),
    Case("amount-object", 422, "amount", "POST", PAY, json={"amount": {"v": "1"}}),
    Case("amount-null", 422, "amount", "POST", PAY, json={"amount": None}),
    Case("amount-abc", 422, "amount", "POST", PAY, json={"amount": "abc"}),
    Case("amount-empty", 422, "amount", "POST", PAY, json={"amount": ""}),
    Case("amount-NaN", 422, "amount", "POST", PAY, json={"amount": "NaN"}),
    Case("amount-Infinity", 422, "amount", "POST", PAY, json={"amount": "Infinity"}),
    Case("amount-zero", 422, "amount", "POST", PAY, json={"amount": "0"}),
    Case("amount-negative", 422, "amount", "POST", PAY, json={"amount": "-1"}),
    Case("amount-negative-number", 422, "amount", "POST", PAY, json={"amount": -1}),
    Case("amount-7-places", 422, "amount", "POST", PAY, json={"amount": "0.0000001"}),
    Case("amount-over-payer-funds", 422, "amount", "POST", PAY, json={"amount": "1e13"}),
    Case("amount-1e400", 422, "amount", "POST", PAY, json={"amount": "1e400"}),
    Case("amount-huge-exponent", 422, "amount", "POST", PAY, json={"amount": "1e999999999"}),
    Case("amount-tiny-exponent", 422, "amount", "POST", PAY, json={"amount": "1e-999999999"}),
    Case("amount-underscores", 422, "amount", "POST", PAY, json={"amount": "1_0"}),
    Case("amount-arabic-indic-digits", 422, "amount", "POST", PAY, json={"amount": "\u0661"}),
    Case("option-unknown", 422, "payment_option_id", "POST", PAY, json={"payment_option_id": "opt_nope"}),
    Case("option-empty", 422, "payment_option_id", "POST", PAY, json={"payment_option_id": ""}),
    Case("option-number", 422, "payment_option_id", "POST", PAY, json={"payment_option_id": 1}),
    Case("option-list", 422, "payment_option_id", "POST", PAY, json={"payment_option_id": ["{opt}"]}),
    Case("option-is-invoice-id", 422, "payment_option_id", "POST", PAY, json={"payment_option_id": "{inv}"}),
    Case("unknown-field-lone-surrogate", 422, None, "POST", PAY, data=b'{"\\udfff": 1}'),
    Case("unknown-field", 422, "to", "POST", PAY, json={"to": "0x0000000000000000000000000000000000000001"}),
    Case("malformed-json", 400, None, "POST", PAY, data=b'{"amount": '),
    Case("nan-literal", 400, None, "POST", PAY, data=b'{"amount": NaN}'),
    Case("array", 422, "body", "POST", PAY, json=[]),
    Case("string", 422, "body", "POST", PAY, json="10"),
    Case("null", 422, "body", "POST", PAY, data=b"null"),
    Case("body-70KB", 413, None, "POST", PAY, data=b'{"amount": "' + b"1" * 70_000 + b'"}'),
    Case("no-options-zero-invoice", 409, None, "POST", "/v1/sandbox/invoices/{zero}/pay", json={}),
    Case(
        "no-options-draft-invoice",
        409,
        None,
        "POST",
        "/v1/sandbox/invoices/{draft}/pay",
        json={"amount": "1"},
    ),
]

MINE = "/v1/sandbox/mine"
MINE_CASES = [
    Case("blocks-0", 422, "blocks", "POST", MINE, json={"blocks": 0}),
    Case("blocks-1001", 422, "blocks", "POST", MINE, json={"blocks": 1001}),
    Case("blocks-negative", 422, "blocks", "POST", MINE, json={"blocks": -1}),
    Case("blocks-string", 422, "blocks", "POST", MINE, json={"blocks": "5"}),
    Case("blocks-true", 422, "blocks", "POST", MINE, json={"blocks": True}),
    Case("blocks-false", 422, "blocks", "POST", MINE, json={"blocks": False}),
    Case("blocks-null", 422, "blocks", "POST", MINE, json={"blocks": None}),
    Case("blocks-fraction", 422, "blocks", "POST", MINE, data=b'{"blocks": 1.5}'),
    Case("blocks-5.0", 422, "blocks", "POST", MINE, data=b'{"blocks": 5.0}'),
    Case("blocks-10^30", 422, "blocks", "POST", MINE, data=b'{"blocks": 1000000000000000000000000000000}'),
    Case("blocks-list", 422, "blocks", "POST", MINE, json={"blocks": [1]}),
    Case("unknown-field", 422, "count", "POST", MINE, json={"blocks": 1, "count": 1}),
    Case("unknown-field-lone-surrogate", 422, None, "POST", MINE, data=b'{"\\ud800": 1}'),
    Case("malformed-json", 400, None, "POST", MINE, data=b'{"blocks": 1'),
    # An optional body of whitespace is sent, and is not JSON (no body at all would mine a block).
    Case("whitespace-body", 400, None, "POST", MINE, data=b"\r"),
    Case("infinity-literal", 400, None, "POST", MINE, data=b'{"blocks": Infinity}'),
    Case("array", 422, "body", "POST", MINE, json=[1]),
    Case("number", 422, "body", "POST", MINE, data=b"5"),
    Case("null", 422, "body", "POST", MINE, data=b"null"),
    Case("body-70KB", 413, None, "POST", MINE, data=b'{"blocks": 1, "pad": "' + b"x" * 70_000 + b'"}'),
]

# Every /v1 route, with a body that would be accepted if the caller were authorised.
V1_ROUTES = [
    ("create", "POST", "/v1/invoices", {"amount": "1"}),
    ("list", "GET", "/v1/invoices", None),
    ("get", "GET", "/v1/invoices/{inv}", None),
    ("status", "GET", "/v1/invoices/{inv}/status", None),
    ("payments", "GET", "/v1/invoices/{inv}/payments", None),
    ("resolve", "POST", "/v1/invoices/{inv}/exception/resolve", {"resolution_action": "other"}),
    ("sandbox-pay", "POST", "/v1/sandbox/invoices/{inv}/pay", {}),
    ("sandbox-mine", "POST", "/v1/sandbox/mine", {"blocks": 1}),
    ("unknown-v1-path", "GET", "/v1/nope", None),
    ("unknown-invoice-id", "GET", "/v1/invoices/inv_nope", None),
]
BAD_AUTH = [
    ("missing", None),
    ("empty-header", ""),
    ("wrong-key", "Bearer sk_test_wrong"),
    ("key-plus-one-char", "Bearer {key}x"),
    ("key-minus-one-char", "Bearer {key_short}"),
    ("wrong-scheme-basic", "Basic {key}"),
    ("wrong-scheme-token", "Token {key}"),
    ("no-scheme", "{key}"),
    ("bearer-without-key", "Bearer"),
    ("bearer-empty-key", "Bearer "),
]
AUTH_CASES = [
    Case(
        f"{route}-{variant}",
        401,
        None,
        method,
        path,
        json=payload if payload is not None else NO_JSON,
        headers={} if header is None else {"Authorization": header},
        auth=False,
    )
    for route, method, path, payload in V1_ROUTES
    for variant, header in BAD_AUTH
]

TABLES = {
    "create-body": CREATE_BODY,
    "create-amount": CREATE_AMOUNT,
    "create-fields": CREATE_FIELDS,
    "create-timing": CREATE_TIMING,
    "create-options": CREATE_OPTIONS,
    "create-metadata": CREATE_METADATA,
    "list-query": LIST_QUERY,
    "unknown-ids": UNKNOWN_IDS,
    "routing-404-405": ROUTING,
    "resolve": RESOLVE_CASES,
    "sandbox-pay": PAY_CASES,
    "sandbox-mine": MINE_CASES,
    "auth-401": AUTH_CASES,
}


# --------------------------------------------------------------------------- checks


def problem_errors(case: Case, status: int, got: Any, ctype: str) -> list[str]:
    """What is wrong with the answer to `case`, if anything."""
    wrong = []
    if status != case.status:
        wrong.append(f"status {status}, wanted {case.status}")
    if not ctype.startswith(PROBLEM):
        wrong.append(f"content type {ctype!r}, wanted {PROBLEM}")
    if not isinstance(got, dict):
        return wrong + [f"body is not a JSON object: {str(got)[:200]!r}"]
    for key in ("type", "title", "detail"):
        if not isinstance(got.get(key), str) or not got[key]:
            wrong.append(f"problem {key!r} missing or empty")
    if got.get("status") != status:
        wrong.append(f"problem status {got.get('status')!r} differs from the HTTP status {status}")
    if case.status == 422:
        wrong += validation_errors_wrong(got.get("errors"), case.field)
    if wrong:
        wrong.append(f"body: {str(got)[:300]}")
    return wrong


def validation_errors_wrong(errors: Any, field: str | None) -> list[str]:
    """What is wrong with a 422's `errors`: a list of {field, message}, the first naming `field`."""
    if not isinstance(errors, list) or not errors:
        return ["422 without an errors list"]
    if not all(
        isinstance(e, dict) and isinstance(e.get("field"), str) and isinstance(e.get("message"), str)
        for e in errors
    ):
        return [f"errors entries are not {{field, message}}: {errors!r}"]
    first = errors[0]["field"]
    if field is not None and not (
        first == field or first.startswith(field + ".") or first.startswith(field + "[")
    ):
        return [f"errors[0].field is {first!r}, wanted {field!r}"]
    return []


async def snapshot(harness) -> tuple:
    """Everything a bad request must not change: the invoices (id, version, status), their
    total, the chain head."""
    status, got, _ = await harness.request("GET", "/v1/invoices?limit=200")
    assert status == 200, got
    invoices = sorted((i["id"], i["version"], i["status"]) for i in got["data"])
    return got["total"], invoices, await harness.on_chain(harness.chain.head)


async def fixtures(harness) -> dict[str, str]:
    inv = await harness.create(amount="25", merchant_reference="fixture")
    zero = await harness.create(amount="0")
    draft = await harness.create(amount="5", draft=True)
    assert inv["status"] == "pending" and zero["status"] == "confirmed" and draft["status"] == "draft"
    assert not zero["payment_options"] and not draft["payment_options"]
    key = harness.api_key
    return {
        "inv": inv["id"],
        "opt": inv["payment_options"][0]["id"],
        "zero": zero["id"],
        "draft": draft["id"],
        "inv_lower": inv["id"].lower(),
        "key": key,
        "key_short": key[:-1],
    }


def fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names) if "{" in value and "}" in value else value
    if isinstance(value, list):
        return [fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: fill(v, names) for k, v in value.items()}
    return value


async def send(harness, case: Case, names: dict[str, str]) -> tuple[int, Any, str]:
    kwargs: dict[str, Any] = {"auth": case.auth, "headers": fill(case.headers, names)}
    if case.json is not NO_JSON:
        kwargs["json"] = fill(case.json, names)
    elif case.data is not None:
        kwargs["data"] = case.data
        if not any(name.lower() == "content-type" for name in kwargs["headers"] or {}):
            kwargs["headers"] = {**(kwargs["headers"] or {}), "Content-Type": "application/json"}
    return await harness.request(case.method, fill(case.path, names), **kwargs)


# --------------------------------------------------------------------------- tests


class UnthrottledHarness(Harness):
    auth_failures_per_second = None  # the auth table fails 150 keys in a row from one address


@pytest.fixture
async def harness(harnesses):
    return await harnesses(UnthrottledHarness)


@pytest.mark.parametrize("table", list(TABLES.values()), ids=list(TABLES))
async def test_bad_requests_answer_problems_and_change_nothing(harness, table: list[Case]):
    names = await fixtures(harness)
    before = await snapshot(harness)
    failures = []
    for case in table:
        try:
            status, got, ctype = await send(harness, case, names)
        except Exception as exc:  # the connection itself failed: also a failure of the case
            failures.append(f"{case.id}: request failed: {exc!r}")
            continue
        wrong = problem_errors(case, status, got, ctype)
        after = await snapshot(harness)
        if after != before:
            wrong.append(f"stored data or chain changed: {before} -> {after}")
            before = after
        if wrong:
            failures.append(f"{case.id}: " + "; ".join(wrong))

    # A bad `pay` must not have queued a transfer: mine it, and the invoice still has no payment.
    await harness.mine_direct(1)
    await harness.settle()
    invoice = await harness.get(names["inv"])
    if invoice["payments"] or invoice["status"] != "pending":
        failures.append(
            f"after mining, the fixture invoice changed: {invoice['status']}, payments {invoice['payments']}"
        )
    assert not failures, f"{len(failures)} of {len(table)} cases failed:\n" + "\n".join(failures)


async def test_healthz_is_open_and_auth_scheme_is_case_insensitive(harness):
    status, got, _ = await harness.request("GET", "/healthz", auth=False)
    assert status == 200 and got == {"status": "ok"}
    status, got, _ = await harness.request(
        "GET", "/v1/invoices", auth=False, headers={"Authorization": f"bearer {harness.api_key}"}
    )
    assert status == 200, got


async def test_create_takes_exact_decimals_and_plain_json_metadata(harness):
    """What is accepted at the edges is taken exactly: a JSON number amount is not a float."""
    cases = [
        ({"amount": 49.99}, "49.99", "49990000"),
        ({"amount": 0.1}, "0.1", "100000"),
        ({"amount": 50}, "50", "50000000"),
        ({"amount": "1e2"}, "100", "100000000"),
        ({"amount": " 7.5 "}, "7.5", "7500000"),
        ({"amount": "0.000000000000000001"}, "0.000000000000000001", "1"),
        ({"amount": "1000000000000000"}, "1000000000000000", "1000000000000000000000"),
    ]
    for n, (fields, amount, atomic) in enumerate(cases, 1):
        invoice = await harness.create(**fields)
        assert invoice["amount"] == amount, (fields, invoice["amount"])
        assert invoice["payment_options"][0]["amount_atomic"] == atomic, (fields, invoice["payment_options"])
        status, got, _ = await harness.request("GET", "/v1/invoices?limit=1")
        assert got["total"] == n

    zero = await harness.create(amount="-0")
    assert zero["amount"] == "0" and zero["status"] == "confirmed" and zero["payment_options"] == []

    metadata = {
        "notes": "n" * 140,
        "price": 1.5,
        "count": 3,
        "big": 2**63 - 1,
        "nested": {"list": [1, 2.25, None, True, "x"]},
    }
    invoice = await harness.create(
        metadata=metadata,
        product_name="p" * 200,
        issued_by="i" * 120,
        bill_to="b" * 120,
        customer_email="buyer@example.com",
    )
    assert invoice["metadata"] == metadata
    assert (await harness.get(invoice["id"]))["metadata"] == metadata


async def test_idempotency_key(harness):
    async def total() -> int:
        status, got, _ = await harness.request("GET", "/v1/invoices?limit=1")
        assert status == 200
        return got["total"]

    failures = []
    for case_id, key in [
        ("too-long", "k" * 256),
        ("empty", ""),
        ("not-ascii", "cl\xe9"),
        ("control-character", "a\tb"),
    ]:
        status, got, ctype = await harness.request(
            "POST", "/v1/invoices", json={"amount": "1"}, headers={"Idempotency-Key": key}
        )
        wrong = problem_errors(Case(case_id, 422, "Idempotency-Key"), status, got, ctype)
        if wrong:
            failures.append(f"{case_id}: " + "; ".join(wrong))
    assert not failures, "\n".join(failures)
    assert await total() == 0

    key = {"Idempotency-Key": "k" * 255}
    status, first, _ = await harness.request(
        "POST", "/v1/invoices", json={"amount": "12.5", "merchant_reference": "r1"}, headers=key
    )
    assert status == 201, first
    # The same key and body (keys in another order) answers the same invoice, not a second one.
    status, again, _ = await harness.request(
        "POST", "/v1/invoices", json={"merchant_reference": "r1", "amount": "12.5"}, headers=key
    )
    assert status == 201, again
    assert again["id"] == first["id"] and again["payment_options"] == first["payment_options"]
    assert await total() == 1

    # The same key with another body is a conflict, whatever differs.
    for case_id, other in [
        ("other-amount", {"amount": "12.6", "merchant_reference": "r1"}),
        ("other-reference", {"amount": "12.5", "merchant_reference": "r2"}),
        ("extra-field", {"amount": "12.5", "merchant_reference": "r1", "draft": True}),
    ]:
        status, got, ctype = await harness.request("POST", "/v1/invoices", json=other, headers=key)
        wrong = problem_errors(Case(case_id, 409), status, got, ctype)
        if wrong:
            failures.append(f"{case_id}: " + "; ".join(wrong))
    # An invalid body under a used key is refused for the body (422), not replayed.
    status, got, ctype = await harness.request("POST", "/v1/invoices", json={"amount": "-1"}, headers=key)
    wrong = problem_errors(Case("invalid-body-used-key", 422, "amount"), status, got, ctype)
    if wrong:
        failures.append("invalid-body-used-key: " + "; ".join(wrong))
    assert not failures, "\n".join(failures)
    assert await total() == 1
    assert (await harness.get(first["id"]))["version"] == first["version"]

    # A different key with the first body is a new invoice.
    status, other, _ = await harness.request(
        "POST",
        "/v1/invoices",
        json={"amount": "12.5", "merchant_reference": "r1"},
        headers={"Idempotency-Key": "another"},
    )
    assert status == 201 and other["id"] != first["id"]
    assert await total() == 2


async def test_method_not_allowed_names_the_allowed_methods(harness):
    status, body, ctype = await harness.request("DELETE", "/v1/invoices")
    assert status == 405 and ctype.startswith("application/problem+json")
    assert body["status"] == 405
    async with harness.http.delete(
        harness.base_url + "/v1/invoices", headers={"Authorization": f"Bearer {harness.api_key}"}
    ) as r:
        assert set(r.headers["Allow"].split(", ")) == {"GET", "HEAD", "POST"}


async def test_deeply_nested_json_is_a_400_not_a_crash(harness):
    before = (await harness.request("GET", "/v1/invoices"))[1]["total"]
    # Whether the parser refuses the depth (400) or the validation does (422) depends on the
    # interpreter's recursion limit (eth-tester raises it); either way, a problem, never a 500.
    for body in (
        "[" * 30000 + "]" * 30000,
        '{"amount": "1", "metadata": {"x": ' + "[" * 30000 + "]" * 30000 + "}}",
    ):
        status, problem, ctype = await harness.request(
            "POST", "/v1/invoices", data=body, headers={"Content-Type": "application/json"}
        )
        assert status in (400, 422) and ctype.startswith("application/problem+json"), (status, problem)
        assert problem["status"] == status
    assert (await harness.request("GET", "/v1/invoices"))[1]["total"] == before


async def test_an_authorization_header_that_is_not_utf8_is_a_401(harness):
    host, port = harness.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/invoices HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\xfa\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"401", answer[:200]
    assert b"application/problem+json" in rest


async def test_an_unknown_list_filter_is_refused_not_ignored(harness):
    for query in ("stauts=paid", "serach=0xabc", "limit=5&colour=red"):
        status, problem, ctype = await harness.request("GET", "/v1/invoices?" + query)
        assert status == 422 and ctype.startswith("application/problem+json"), (query, problem)
        assert problem["errors"][0]["field"] in ("stauts", "serach", "colour")


async def test_a_write_lock_held_past_the_busy_timeout_answers_503_and_changes_nothing(harness):
    """Another process (the followers', the dispatcher's) holding the database's write lock
    longer than the API's busy timeout: a clear 503 with Retry-After, nothing written, and the
    next try, once the lock is free, succeeds."""
    import sqlite3

    from watcher.store import engine

    await harness.create()
    # Its webhook queued, sent and recorded first: in-process, the dispatcher's writes take the
    # store's writer thread too, and one waiting out the lock would hold the API's write behind it.
    await harness.wait_for(
        lambda: harness.service.store.outbox.next_delivery_at() is None, what="the dispatcher idle"
    )
    status, before, _ = await harness.request("GET", "/v1/invoices")
    assert status == 200, before
    holder = sqlite3.connect(harness.service.store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        url = harness.base_url + "/v1/invoices"
        auth = {"Authorization": f"Bearer {harness.api_key}"}
        async with harness.http.post(url, json={"amount": "5"}, headers=auth) as response:
            body = await response.json(content_type=None)
            assert response.status == 503, body
            assert response.headers["Retry-After"] == "1"
        assert body["type"] == "urn:watcher:problem:database-busy" and "try again" in body["detail"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    status, after, _ = await harness.request("GET", "/v1/invoices")
    assert [i["id"] for i in after["data"]] == [i["id"] for i in before["data"]]
    await harness.create()  # free again
    assert engine.BUSY_TIMEOUT_MS <= 10_000  # the wait above is the API's whole busy timeout
