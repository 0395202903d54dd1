"""What a payer may see of an invoice, and which screen of the page its state is.

The invoice object of the API carries the merchant's private fields (customer email,
metadata, merchant reference, customer id, bill-to, payer addresses of payments); the page
and its feed are built only from what this module picks, so nothing else can leak.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..addresses import native_payment_uri, router_payment_uri, token_payment_uri
from ..domain import format_units

# The screens of the page, one per state a payer can meet (templates/page.html has one
# block each). `paid` shows "payment seen, n of m confirmations".
SCREENS = ("waiting", "partial", "paid", "confirmed", "overpaid", "expired", "underpaid", "cancelled", "late")
# Screens where the payer may still send money (the pay panel is shown).
PAYABLE = ("waiting", "partial")


def screen_of(invoice: dict) -> str:
    """The one screen that tells the payer the truth about `invoice` now."""
    status = invoice["status"]
    state = invoice["payment_summary"]["payment_state"]
    exception = invoice["exception"]
    late_open = (
        exception is not None and exception["type"] == "late_payment" and exception["status"] == "open"
    )
    if status in ("expired", "cancelled") and late_open:
        return "late"
    if status == "pending":
        return "partial" if state == "partial" else "waiting"
    if status in ("paid", "confirmed") and state == "overpaid":
        return "overpaid"
    return status


def paid_fraction(invoice: dict) -> Fraction:
    """How much of the invoice the counted, live payments cover (each payment counts as its
    amount over its option's amount), exactly."""
    amounts = {o["id"]: int(o["amount_atomic"]) for o in invoice["payment_options"]}
    return sum(
        (
            Fraction(int(p["amount_atomic"]), amounts[p["payment_option_id"]])
            for p in invoice["payments"]
            if p["role"] == "counted" and p["status"] != "reverted" and p["payment_option_id"] in amounts
        ),
        Fraction(0),
    )


def remaining_atomic(invoice: dict, option: dict) -> int:
    """What is left to pay, in this option's atomic units (rounded up: never short)."""
    return max(math.ceil((1 - paid_fraction(invoice)) * int(option["amount_atomic"])), 0)


def payment_uri_for(option: dict, amount_atomic: int) -> str:
    """The option's EIP-681 URI for `amount_atomic`: its own `payment_uri` for the full amount
    (byte for byte what the API shows), a new one for what remains after a partial payment."""
    if amount_atomic == int(option["amount_atomic"]):
        return option["payment_uri"]
    if option["rail"] == "contract":
        return router_payment_uri(
            {**option["contract_call"], "amount": str(amount_atomic)}, option["chain_id"]
        )
    if option["token_contract"]:
        return token_payment_uri(
            option["token_contract"], option["chain_id"], option["destination_address"], amount_atomic
        )
    return native_payment_uri(option["destination_address"], option["chain_id"], amount_atomic)


def public_payment(payment: dict) -> dict:
    """A payment as the payer sees it: no payer address, no internal ids."""
    return {
        "transaction_hash": payment["transaction_hash"],
        "network": payment["network"],
        "asset": payment["asset"],
        "amount": payment["amount"],
        "confirmations": payment["confirmations"],
        "status": payment["status"],
        "late": payment["role"] == "late",
    }


def required_confirmations(invoice: dict) -> int:
    """m of "n of m": what the options that were paid into need (else the largest offered)."""
    options = {o["id"]: o for o in invoice["payment_options"]}
    paid_into = [
        options[p["payment_option_id"]]["required_confirmations"]
        for p in invoice["payments"]
        if p["payment_option_id"] in options and p["status"] != "reverted"
    ]
    offered = [o["required_confirmations"] for o in invoice["payment_options"]]
    return max(paid_into or offered or [0])


def redirect_target(invoice: dict) -> str | None:
    """`redirect_url` with `invoice_id` added to its query, once the invoice is confirmed."""
    url = invoice.get("redirect_url")
    if not url or invoice["status"] != "confirmed":
        return None
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "invoice_id"]
    query.append(("invoice_id", invoice["id"]))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def public_status(invoice: dict) -> dict[str, Any]:
    """`GET /pay/{id}/status` and each message of the event stream."""
    summary = invoice["payment_summary"]
    return {
        "id": invoice["id"],
        "status": invoice["status"],
        "screen": screen_of(invoice),
        "amount": invoice["amount"],
        "currency": invoice["currency"],
        "payment_summary": {
            k: summary[k] for k in ("payment_state", "received_amount", "remaining_amount", "overpaid_amount")
        },
        "confirmations": invoice["confirmations"],
        "required_confirmations": required_confirmations(invoice),
        "payable_until": invoice["payment_timing"].get("payable_until"),
        "payments": [public_payment(p) for p in invoice["payments"] if p["status"] != "reverted"],
        "redirect_to": redirect_target(invoice),
        "version": invoice["version"],
    }


def amount_text(option: dict, amount_atomic: int) -> str:
    return format_units(amount_atomic, option["decimals"])
