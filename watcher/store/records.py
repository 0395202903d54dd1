"""What goes into the store and what comes back out of a change: plain values, no SQL."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..domain import Transfer


@dataclass(frozen=True)
class OptionSpec:
    """A payment option to build; the store gives it its id and, for the address rail, an address."""

    rail: str
    network: str
    chain_id: int
    asset: str
    token_contract: str | None
    decimals: int
    quoted_amount: str
    quote_rate: str
    amount_atomic: int
    required_confirmations: int
    xpub: str | None = None  # address rail: derive the destination from this
    destination: str | None = None  # contract rail: the merchant address
    router: str | None = None  # contract rail: the PaymentRouter to call
    quote_source: str = "config"  # request, config, or the live sources' kinds (chainlink+http)
    quoted_at: float | None = None  # unix seconds; None: when the store inserts it


@dataclass(frozen=True)
class NewInvoice:
    amount: Decimal
    currency: str
    fields: dict[str, Any]  # product_name, issued_by, bill_to, merchant_reference, customer_*
    metadata: dict[str, Any]
    tolerance_percent: Decimal
    payment_timing: dict[str, Any]  # with payable_until / due_at filled for a non-draft
    payable_until: int | None
    draft: bool
    request: dict[str, Any]  # the options request (assets, rails, quote_rates) kept for finalize
    options: list[OptionSpec] = field(default_factory=list)


@dataclass(frozen=True)
class NewSession:
    """A payment session to start on an existing invoice: its options and its timer."""

    options: list[OptionSpec]
    payment_timing: dict[str, Any]  # with payable_until (and due_at) filled
    payable_until: int
    request: dict[str, Any]  # the options request it was built from, kept for the next refresh


@dataclass(frozen=True)
class MatchedTransfer:
    """A transfer the follower found to one of our options."""

    transfer: Transfer
    option_id: str
    block_timestamp: int


@dataclass
class ApplyResult:
    payments_added: int = 0
    payments_confirmed: int = 0
    invoices_changed: int = 0
    events: int = 0
    payment_roles: list[str] = field(default_factory=list)  # role of each payment reported as detected


class IdempotencyConflict(Exception):
    """The same Idempotency-Key came with another body."""


class StateConflict(Exception):
    """The invoice is not in a state that allows the change."""
