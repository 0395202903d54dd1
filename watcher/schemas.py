"""Response models of the public API: the contract's JSON shapes as pydantic models.

The handlers build their answers from the store's views; these models describe those
answers in `/openapi.json` and tests validate real responses against them, so the
document and the server cannot drift apart silently.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AtomicAmount = Annotated[str, Field(pattern=r"^[0-9]+$", description="uint256 as a base-10 string")]
DecimalText = Annotated[str, Field(pattern=r"^-?[0-9]+(\.[0-9]+)?$", description="exact decimal string")]
Timestamp = Annotated[str, Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", description="RFC 3339, UTC")]
Address = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$", description="EIP-55 checksummed")]
Hash = Annotated[str, Field(pattern=r"^0x[0-9a-f]{64}$")]
Currency = Annotated[
    str, Field(pattern=r"^[A-Z]{3}$", description="USD, or a fiat code [[rates]] reach from USD")
]

InvoiceStatusName = Literal["draft", "pending", "paid", "confirmed", "expired", "underpaid", "cancelled"]
ExceptionTypeName = Literal["late_payment", "underpaid", "overpaid", "duplicate_payment"]
ResolutionActionName = Literal[
    "accept_late_payment",
    "accept_overpayment",
    "write_off_underpayment",
    "mark_duplicate_payment_reviewed",
    "other",
]


# The API's models are built at their first use, not at import (pydantic's `defer_build`):
# building every validator and serializer held the start-up for a fifth of a second.
API_MODEL = ConfigDict(extra="forbid", defer_build=True)
QUERY_MODEL = ConfigDict(defer_build=True)


class _Out(BaseModel):
    model_config = API_MODEL


class FieldError(_Out):
    field: str
    message: str


class Problem(_Out):
    """RFC 9457 problem details (`application/problem+json`)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None


class ContractCall(_Out):
    router: Address
    invoice_id_hash: Hash
    payment_id_hash: Hash
    token: Address
    recipient: Address
    amount: AtomicAmount


class PaymentOption(_Out):
    id: str
    rail: Literal["address", "contract"]
    network: str
    chain_id: int
    asset: str
    token_contract: Address | None
    decimals: int
    quoted_amount: DecimalText
    quote_rate: DecimalText = Field(
        description="one unit of the asset in the invoice's currency (exact, or to 20 significant digits "
        "when it never ends; amount_atomic is computed from the exact rate)"
    )
    amount_atomic: AtomicAmount
    quote_source: Annotated[str, Field(pattern=r"^(request|config|[a-z]+(\+[a-z]+)*)$")] = Field(
        description="request (quote_rates), config (usd_rate), or the live sources used, e.g. chainlink+http"
    )
    quoted_at: Timestamp
    destination_address: Address
    payment_uri: str
    required_confirmations: int
    contract_call: ContractCall | None


class Payment(_Out):
    id: str
    payment_option_id: str
    network: str
    asset: str
    transaction_hash: Hash
    log_index: int | None
    block_number: int
    block_hash: Hash
    block_timestamp: Timestamp
    from_address: Address
    to_address: Address
    amount: DecimalText
    amount_atomic: AtomicAmount
    confirmations: int
    status: Literal["detected", "confirmed", "reverted"]
    role: Literal["counted", "duplicate", "late"]
    observed_at: Timestamp
    confirmed_at: Timestamp | None


class PaymentSummary(_Out):
    payment_state: Literal["unpaid", "partial", "exact", "overpaid"]
    received_amount: DecimalText
    remaining_amount: DecimalText
    overpaid_amount: DecimalText


class InvoiceException(_Out):
    type: ExceptionTypeName
    status: Literal["open", "resolved"]
    resolution_action: ResolutionActionName | None
    resolution_note: str | None
    resolved_at: Timestamp | None


class ImmediateTiming(_Out):
    mode: Literal["immediate"]
    expires_after_minutes: int
    payable_until: Timestamp | None  # null while a draft


class DueDateTiming(_Out):
    mode: Literal["due_date"]
    due_after_days: int
    grace_period_days: int
    due_at: Timestamp | None
    payable_until: Timestamp | None


PaymentTiming = Annotated[ImmediateTiming | DueDateTiming, Field(discriminator="mode")]


class Invoice(_Out):
    id: str
    status: InvoiceStatusName
    amount: DecimalText
    currency: Currency
    product_name: str | None
    issued_by: str | None
    bill_to: str | None
    merchant_reference: str | None
    customer_id: str | None
    customer_email: str | None
    metadata: dict[str, Any]
    payment_summary: PaymentSummary
    confirmations: int
    exception: InvoiceException | None
    payment_options: list[PaymentOption]
    payments: list[Payment]
    payment_timing: PaymentTiming
    checkout_url: str | None = Field(description="the hosted payment page; null without [checkout]")
    redirect_url: str | None = Field(description="where the payment page sends the payer when done")
    version: int
    created_at: Timestamp
    updated_at: Timestamp = Field(description="the last change (every version bump)")
    paid_at: Timestamp | None
    confirmed_at: Timestamp | None
    cancelled_at: Timestamp | None
    last_payment_observed_at: Timestamp | None


class InvoiceStatusView(_Out):
    """The polling shape, also `data.invoice` of every webhook."""

    id: str
    status: InvoiceStatusName
    confirmations: int
    payment_summary: PaymentSummary
    exception: InvoiceException | None
    payment_timing: PaymentTiming
    last_payment_observed_at: Timestamp | None
    payments: list[Payment]
    version: int


class InvoiceList(_Out):
    data: list[Invoice]
    total: int
    limit: int
    offset: int


class PaymentList(_Out):
    data: list[Payment]


class Health(_Out):
    status: Literal["ok", "starting"]
    waiting_for: str | None = Field(
        None, description="while starting: what the start-up waits for (the /v1 routes answer 503)"
    )


# Every event type, once: the config's `events` filters, the deliveries' filter and the events'
# schema read it from here.
EventTypeName = Literal[
    "invoice.created",
    "invoice.session_refreshed",
    "invoice.payment_detected",
    "invoice.payment_reverted",
    "invoice.paid",
    "invoice.confirmed",
    "invoice.expired",
    "invoice.underpaid",
    "invoice.cancelled",
    "invoice.exception_opened",
    "invoice.exception_resolved",
]


class WebhookEventData(_Out):
    invoice: InvoiceStatusView
    payment: Payment | None


class WebhookEvent(_Out):
    """The body POSTed to each webhook endpoint."""

    id: str
    type: EventTypeName
    created_at: Timestamp
    data: WebhookEventData


class SandboxPayment(_Out):
    transaction_hash: Hash


class SandboxMined(_Out):
    blocks: int
    head_block: int


class InvoiceFilters(BaseModel):
    """Query parameters of the invoice list, export and stats (documentation of parse_list_filters)."""

    model_config = QUERY_MODEL

    status: InvoiceStatusName | None = None
    exception_type: ExceptionTypeName | None = None
    exception_status: Literal["open", "resolved"] | None = None
    merchant_reference: Annotated[str, Field(max_length=254)] | None = None
    customer_id: Annotated[str, Field(max_length=254)] | None = None
    customer_email: Annotated[str, Field(max_length=254)] | None = None
    transaction_hash: Annotated[str, Field(max_length=254)] | None = None
    search: Annotated[str, Field(min_length=1, max_length=254, pattern=r"\S")] | None = None


class InvoicePage(InvoiceFilters):
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    offset: Annotated[int, Field(ge=0, le=10**9)] = 0


class ExportPage(InvoiceFilters):
    limit: Annotated[int, Field(ge=1, le=100_000)] | None = None
    offset: Annotated[int, Field(ge=0, le=10**9)] = 0


class ReceivedTotal(_Out):
    network: str
    asset: str
    decimals: int
    amount_atomic: AtomicAmount
    amount: DecimalText
    payments: int


class InvoiceStats(_Out):
    total: int
    by_status: dict[InvoiceStatusName, int]
    by_open_exception_type: dict[ExceptionTypeName, int]
    received: list[ReceivedTotal]


class SandboxPayIn(BaseModel):
    model_config = API_MODEL
    payment_option_id: str | None = None
    amount: (
        Annotated[
            str,
            Field(pattern=r"^[0-9]+(\.[0-9]+)?$", description="in the asset's units; default: what remains"),
        ]
        | None
    ) = None


class SandboxMineIn(BaseModel):
    model_config = API_MODEL
    blocks: Annotated[int, Field(ge=1, le=1000)] = 1
