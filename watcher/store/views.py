"""Rows of the store turned into the JSON shapes of the public contract.

Kept apart from the SQL so that the API and the webhook bodies, which must agree to the
byte, come from one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import orjson

from ..domain import format_units, rfc3339
from ..keccak import keccak
from .engine import Row


def checksum(address: str | None) -> str | None:
    """EIP-55 form of a stored (lowercase) address. Every view shows several, and rendering
    invoices for webhooks is the store's hot path: the same addresses recur, so they are cached."""
    return _checksum(address) if address else None


@lru_cache(maxsize=1 << 16)
def _checksum(address: str) -> str:
    body = address[2:].lower()
    if len(body) == 40 and body.isascii() and body.isalnum():
        return "0x" + _checksum_bits(body)
    digest = keccak(body.encode()).hex()
    return "0x" + "".join([c.upper() if digest[i] > "7" else c for i, c in enumerate(body)])


# A hex digit of the digest above 7, as the bit that tells a lowercase ASCII letter from its capital.
_HIGH_NIBBLE = bytes.maketrans(b"0123456789abcdef", b"\0" * 8 + b"\x20" * 8)


def _checksum_bits(body: str) -> str:
    """EIP-55 on all 40 characters at once, in integers: a character is capitalised (its 0x20 bit
    cleared) where it is a letter (its 0x40 bit set, moved onto the 0x20 one) and the digest's hex
    digit at its place is above 7. Twice as fast as a character at a time, and a step renders the
    address of every payment it records, most of them new to this process. `body`: 40 ASCII
    lowercase letters and digits."""
    raw = body.encode()
    high = int.from_bytes(keccak(raw).hex()[:40].encode().translate(_HIGH_NIBBLE), "big")
    value = int.from_bytes(raw, "big")
    return (value ^ (value >> 1 & high)).to_bytes(40, "big").decode()


def payment_view(row: Row, tip: int | None, role: str | None = None, to_address: str | None = None) -> dict:
    """A payment; `tip` is the chain's last processed block, from which confirmations follow;
    `role` the one judging has just given it, when the row does not hold it yet; `to_address`
    the recipient's EIP-55 form when the caller has it (`recipient_checksum`), else computed."""
    reverted = row["status"] == "reverted"
    confirmations = 0 if reverted or tip is None else max(tip - row["block_number"] + 1, 0)
    return {
        "id": row["id"],
        "payment_option_id": row["option_id"],
        "network": row["network"],
        "asset": row["asset"],
        "transaction_hash": row["tx_hash"],
        "log_index": row["log_index"],
        "block_number": row["block_number"],
        "block_hash": row["block_hash"],
        "block_timestamp": rfc3339(row["block_timestamp"]),
        "from_address": checksum(row["from_address"]),
        "to_address": checksum(row["to_address"]) if to_address is None else to_address,
        "amount": format_units(int(row["amount_atomic"]), row["decimals"]),
        "amount_atomic": row["amount_atomic"],
        "confirmations": confirmations,
        "status": row["status"],
        "role": row["role"] if role is None else role,
        "observed_at": row["observed_at"],
        "confirmed_at": row["confirmed_at"],
    }


# The columns `recipient_checksum` reads, from `payments p JOIN payment_options o ON o.id = p.option_id`.
RECIPIENT_COLUMNS = "o.destination_address AS option_destination, o.destination_checksum AS option_checksum"


def recipient_checksum(row: Row) -> str | None:
    """A payment's recipient in EIP-55 form as its option stored it when it was made
    (`RECIPIENT_COLUMNS`), when the payment went to the option's destination (an address
    option's deposit address); else None (then it is computed)."""
    stored = row["option_checksum"]
    return stored if stored is not None and row["to_address"] == row["option_destination"] else None


def option_view(row: Row) -> dict:
    call = orjson.loads(row["contract_call"]) if row["contract_call"] else None
    return {
        "id": row["id"],
        "rail": row["rail"],
        "network": row["network"],
        "chain_id": row["chain_id"],
        "asset": row["asset"],
        "token_contract": checksum(row["token_contract"]),
        "decimals": row["decimals"],
        "quoted_amount": row["quoted_amount"],
        "quote_rate": row["quote_rate"],
        "quote_source": row["quote_source"],
        "quoted_at": row["quoted_at"],
        "amount_atomic": row["amount_atomic"],
        "destination_address": checksum(row["destination_address"]),
        "payment_uri": row["payment_uri"],
        "required_confirmations": row["required_confirmations"],
        "contract_call": call,
    }


def invoice_confirmations(payments: Sequence[dict]) -> int:
    """The smallest confirmation count among the payments that count; 0 if none."""
    counted = [p["confirmations"] for p in payments if p["role"] == "counted" and p["status"] != "reverted"]
    return min(counted) if counted else 0


def invoice_view(
    row: Row,
    options: Sequence[Row],
    payments: list[dict],
    checkout_base_url: str | None = None,
) -> dict:
    """`checkout_base_url`: `[checkout] public_base_url`, or None without a payment page."""
    return {
        "id": row["id"],
        "status": row["status"],
        "amount": row["amount"],
        "currency": row["currency"],
        "product_name": row["product_name"],
        "issued_by": row["issued_by"],
        "bill_to": row["bill_to"],
        "merchant_reference": row["merchant_reference"],
        "customer_id": row["customer_id"],
        "customer_email": row["customer_email"],
        "metadata": orjson.loads(row["metadata"]) if row["metadata"] else {},
        "payment_summary": orjson.loads(row["payment_summary"]),
        "confirmations": invoice_confirmations(payments),
        "exception": orjson.loads(row["exception"]) if row["exception"] else None,
        "payment_options": [option_view(o) for o in options],
        "payments": payments,
        "payment_timing": orjson.loads(row["payment_timing"]),
        "checkout_url": f"{checkout_base_url}/pay/{row['id']}" if checkout_base_url else None,
        "redirect_url": row["redirect_url"],
        "version": row["version"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "paid_at": row["paid_at"],
        "confirmed_at": row["confirmed_at"],
        "cancelled_at": row["cancelled_at"],
        "last_payment_observed_at": row["last_payment_observed_at"],
    }


STATUS_FIELDS = (
    "id",
    "status",
    "confirmations",
    "payment_summary",
    "exception",
    "payment_timing",
    "last_payment_observed_at",
    "payments",
    "version",
)
# The invoice columns the status shape is made of (the rest of it is the payments).
STATUS_COLUMNS = "id, status, payment_summary, exception, payment_timing, last_payment_observed_at, version"


def status_view(invoice: dict) -> dict:
    """The polling shape (and the `data.invoice` of every webhook) of an invoice already rendered."""
    return {k: invoice[k] for k in STATUS_FIELDS}


def status_of(row: Row, payments: list[dict]) -> dict:
    """The polling shape straight from an invoice's row (`STATUS_COLUMNS` at least) and its
    payments' views, the same as `status_view(invoice_view(...))`: the status route and the
    recording path's events need neither the options nor the rest of the invoice."""
    return {
        "id": row["id"],
        "status": row["status"],
        "confirmations": invoice_confirmations(payments),
        "payment_summary": orjson.loads(row["payment_summary"]),
        "exception": orjson.loads(row["exception"]) if row["exception"] else None,
        "payment_timing": orjson.loads(row["payment_timing"]),
        "last_payment_observed_at": row["last_payment_observed_at"],
        "payments": payments,
        "version": row["version"],
    }


def status_json(row: Row, payments: Sequence[dict], rendered_payments: Sequence[bytes]) -> bytes:
    """`orjson.dumps(status_of(row, payments))`, to the byte, put together from parts already
    rendered: the payments' JSON (`rendered_payments`, which their events carry too), and the
    row's `payment_summary` and `exception`, which must be orjson's own rendering (judging has
    just written them so). Each event of a step carries one: this saves parsing the JSON columns
    judging has just rendered, and rendering them and the payments again."""
    exception = row["exception"]
    return b"".join(
        (
            b'{"id":', orjson.dumps(row["id"]), b',"status":', orjson.dumps(row["status"]),
            b',"confirmations":', orjson.dumps(invoice_confirmations(payments)),
            b',"payment_summary":', row["payment_summary"].encode(),
            b',"exception":', b"null" if exception is None else exception.encode(),
            b',"payment_timing":', orjson.dumps(orjson.loads(row["payment_timing"])),
            b',"last_payment_observed_at":', orjson.dumps(row["last_payment_observed_at"]),
            b',"payments":[', b",".join(rendered_payments),
            b'],"version":', orjson.dumps(row["version"]), b"}",
        )
    )  # fmt: skip
