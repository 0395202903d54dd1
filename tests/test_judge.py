"""Table-driven tests of the pure payment rules in watcher.domain (docs/integrators.md, "Payment rules").

Every case gives an invoice, its payments and the chain's time, and pins the whole verdict:
status, payment summary (amounts as strings), each payment's role, the exception shown and
the exceptions still open.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction

import pytest

from watcher.domain import (
    UINT256_MAX,
    ExceptionType,
    InvoiceFacts,
    PaymentFacts,
    PaymentStatus,
    Resolution,
    ResolutionAction,
    Role,
    display_places,
    format_units,
    judge,
    new_id,
    new_ids,
    payments_to_cover,
    quote_atomic,
)

PU = 1_768_473_000  # payable_until, unix seconds (2026-01-15T10:30:00Z)
BEFORE = PU - 60  # a block well on time
AFTER = PU + 60  # a block after the deadline

USDT_4999 = 49_990_000  # 49.99 USD in USDT (6 decimals)
ETH_4999 = 16_663_333_333_333_334  # 49.99 USD at 3000 USD/ETH, in wei (rounded up)

C = PaymentStatus.CONFIRMED
D = PaymentStatus.DETECTED
R = PaymentStatus.REVERTED

RESOLVED_AT = "2026-01-15T11:00:00Z"
NOTE = "checked with the customer"


def inv(amount="49.99", **kw) -> InvoiceFacts:
    kw.setdefault("payable_until", PU)
    return InvoiceFacts(amount=Decimal(amount), **kw)


def pay(pid, atomic, option=USDT_4999, t=BEFORE, status=C, order=()) -> PaymentFacts:
    return PaymentFacts(pid, atomic, option, t, status, order)


def opened(kind: str) -> dict:
    return {
        "type": kind,
        "status": "open",
        "resolution_action": None,
        "resolution_note": None,
        "resolved_at": None,
    }


def resolved(kind: str, action: str, note: str | None = NOTE) -> dict:
    return {
        "type": kind,
        "status": "resolved",
        "resolution_action": action,
        "resolution_note": note,
        "resolved_at": RESOLVED_AT,
    }


def resolution(kind: ExceptionType, action: ResolutionAction, ids=(), note=NOTE) -> Resolution:
    return Resolution(kind, action, note, RESOLVED_AT, frozenset(ids))


@dataclass
class Case:
    id: str
    invoice: InvoiceFacts
    payments: list[PaymentFacts]
    chain_time: int | None
    status: str
    state: str
    amounts: tuple[str, str, str]  # received_amount, remaining_amount, overpaid_amount
    roles: dict[str, str] = field(default_factory=dict)
    exception: dict | None = None
    open: tuple[str, ...] = ()


def check(case: Case) -> None:
    j = judge(case.invoice, case.payments, chain_time=case.chain_time)
    received, remaining, overpaid = case.amounts
    assert str(j.status) == case.status
    assert j.summary() == {
        "payment_state": case.state,
        "received_amount": received,
        "remaining_amount": remaining,
        "overpaid_amount": overpaid,
    }
    assert {pid: str(role) for pid, role in j.roles.items()} == case.roles
    assert (j.exception.as_dict() if j.exception else None) == case.exception
    assert tuple(str(t) for t in j.open_exceptions) == case.open


THOUSAND = 1_000_000_000  # 1000 USD in USDT atomic units
SMALL_EXACT = [pay(f"p{i:04d}", 1_000_000, THOUSAND) for i in range(1000)]
SMALL_SHORT = SMALL_EXACT[:-1] + [pay("p0999", 999_999, THOUSAND)]
ALL_COUNTED = {f"p{i:04d}": "counted" for i in range(1000)}

BIG = 10**21  # 1000 ETH in wei: above 2**64
HALF_MAX = 2**255  # UINT256_MAX == 2**255 + (2**255 - 1)

# --------------------------------------------------------------------------- basic rules

BASIC = [
    Case(
        "exact-confirmed",
        inv(),
        [pay("a", USDT_4999)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
    ),
    Case(
        "exact-detected-is-paid",
        inv(),
        [pay("a", USDT_4999, status=D)],
        PU - 30,
        "paid",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
    ),
    Case(
        "two-partials-exact",
        inv(),
        [pay("a", 20_000_000), pay("b", 29_990_000, t=BEFORE + 12)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "two-partials-one-detected-is-paid",
        inv(),
        [pay("a", 20_000_000), pay("b", 29_990_000, t=BEFORE + 12, status=D)],
        PU - 30,
        "paid",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "one-partial-pending",
        inv(),
        [pay("a", 20_000_000)],
        PU - 30,
        "pending",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
    ),
    Case("nothing-pending", inv(), [], PU - 30, "pending", "unpaid", ("0", "49.99", "0")),
    Case(
        "1000-small-payments-exact",
        inv("1000"),
        SMALL_EXACT,
        PU - 30,
        "confirmed",
        "exact",
        ("1000.00", "0", "0"),
        ALL_COUNTED,
    ),
    Case(
        "1000-small-payments-one-wei-short",
        inv("1000"),
        SMALL_SHORT,
        PU - 30,
        "pending",
        "partial",
        ("999.99", "0.01", "0"),
        ALL_COUNTED,
    ),
    Case(
        "1000-small-payments-one-wei-short-deadline-passed",
        inv("1000"),
        SMALL_SHORT,
        PU + 1,
        "underpaid",
        "partial",
        ("999.99", "0.01", "0"),
        ALL_COUNTED,
        opened("underpaid"),
        ("underpaid",),
    ),
    # overpayment
    Case(
        "overpaid-one-payment",
        inv(),
        [pay("a", 60_000_000)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
    Case(
        "overpaid-detected-is-paid",
        inv(),
        [pay("a", 60_000_000, status=D)],
        PU - 30,
        "paid",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
    Case(
        "overpaid-by-second-partial",
        inv(),
        [pay("a", 40_000_000), pay("b", 20_000_000, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted", "b": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
    # Less than a cent too much still shows, with the places it takes (never as "0").
    Case(
        "overpaid-by-one-atomic-unit",
        inv(),
        [pay("a", USDT_4999 + 1)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("49.99", "0", "0.000001"),
        {"a": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
    # duplicate
    Case(
        "second-full-payment-is-duplicate",
        inv(),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=BEFORE + 30)],
        PU - 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "duplicate-does-not-hold-back-confirmation",
        inv(),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=BEFORE + 30, status=D)],
        PU - 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "duplicate-on-detected-invoice-stays-paid",
        inv(),
        [pay("a", USDT_4999, status=D), pay("b", USDT_4999, t=BEFORE + 30)],
        PU - 10,
        "paid",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "small-extra-after-paid-is-duplicate",
        inv(),
        [pay("a", USDT_4999), pay("b", 1, t=BEFORE + 30)],
        PU - 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    # a payment after payable_until to an invoice already fully paid: "already fully paid" wins
    Case(
        "payment-after-deadline-on-paid-invoice-is-duplicate",
        inv(),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=AFTER)],
        AFTER + 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    # late payments and the deadline
    Case(
        "payment-at-payable-until-is-on-time",
        inv(),
        [pay("a", USDT_4999, t=PU)],
        PU + 100,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
    ),
    Case(
        "payment-one-second-late-on-expired",
        inv(),
        [pay("a", USDT_4999, t=PU + 1)],
        PU + 10,
        "expired",
        "unpaid",
        ("0", "49.99", "0"),
        {"a": "late"},
        opened("late_payment"),
        ("late_payment",),
    ),
    Case(
        "late-payment-on-underpaid-keeps-underpaid",
        inv(),
        [pay("a", 20_000_000), pay("b", 29_990_000, t=AFTER)],
        AFTER + 10,
        "underpaid",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted", "b": "late"},
        opened("late_payment"),
        ("late_payment", "underpaid"),
    ),
    Case("deadline-nothing-received-expired", inv(), [], PU + 1, "expired", "unpaid", ("0", "49.99", "0")),
    Case(
        "deadline-something-received-underpaid",
        inv(),
        [pay("a", 20_000_000)],
        PU + 1,
        "underpaid",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
        opened("underpaid"),
        ("underpaid",),
    ),
    Case(
        "deadline-underpaid-detected-still-underpaid",
        inv(),
        [pay("a", 20_000_000, status=D)],
        PU + 1,
        "underpaid",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
        opened("underpaid"),
        ("underpaid",),
    ),
    Case(
        "deadline-not-passed-chain-time-none-nothing",
        inv(),
        [],
        None,
        "pending",
        "unpaid",
        ("0", "49.99", "0"),
    ),
    Case(
        "deadline-not-passed-chain-time-none-partial",
        inv(),
        [pay("a", 20_000_000)],
        None,
        "pending",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
    ),
    Case(
        "deadline-not-passed-chain-time-equal-nothing",
        inv(),
        [],
        PU,
        "pending",
        "unpaid",
        ("0", "49.99", "0"),
    ),
    Case(
        "deadline-not-passed-chain-time-equal-partial",
        inv(),
        [pay("a", 20_000_000)],
        PU,
        "pending",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
    ),
    # tolerance: an underpayment within payment_tolerance_percent counts as exact
    Case(
        "tolerance-1pct-at-edge-is-exact",
        inv("100.00", tolerance_percent=Decimal("1")),
        [pay("a", 99_000_000, 100_000_000)],
        PU - 30,
        "confirmed",
        "exact",
        ("99.00", "1.00", "0"),
        {"a": "counted"},
    ),
    Case(
        "tolerance-1pct-at-edge-after-deadline-is-confirmed",
        inv("100.00", tolerance_percent=Decimal("1")),
        [pay("a", 99_000_000, 100_000_000)],
        PU + 1,
        "confirmed",
        "exact",
        ("99.00", "1.00", "0"),
        {"a": "counted"},
    ),
    Case(
        "tolerance-1pct-just-outside-is-partial",
        inv("100.00", tolerance_percent=Decimal("1")),
        [pay("a", 98_999_999, 100_000_000)],
        PU - 30,
        "pending",
        "partial",
        ("98.99", "1.01", "0"),
        {"a": "counted"},
    ),
    Case(
        "tolerance-1pct-just-outside-after-deadline-underpaid",
        inv("100.00", tolerance_percent=Decimal("1")),
        [pay("a", 98_999_999, 100_000_000)],
        PU + 1,
        "underpaid",
        "partial",
        ("98.99", "1.01", "0"),
        {"a": "counted"},
        opened("underpaid"),
        ("underpaid",),
    ),
    Case(
        "tolerance-half-pct-inside",
        inv("100.00", tolerance_percent=Decimal("0.5")),
        [pay("a", 99_500_000, 100_000_000)],
        PU - 30,
        "confirmed",
        "exact",
        ("99.50", "0.50", "0"),
        {"a": "counted"},
    ),
    Case(
        "tolerance-half-pct-just-outside",
        inv("100.00", tolerance_percent=Decimal("0.5")),
        [pay("a", 99_499_999, 100_000_000)],
        PU - 30,
        "pending",
        "partial",
        ("99.49", "0.51", "0"),
        {"a": "counted"},
    ),
    Case(
        "tolerance-zero-one-unit-short-is-partial",
        inv("100.00"),
        [pay("a", 99_999_999, 100_000_000)],
        PU - 30,
        "pending",
        "partial",
        ("99.99", "0.01", "0"),
        {"a": "counted"},
    ),
    Case(
        "tolerance-top-up-after-paid-is-duplicate",
        inv("100.00", tolerance_percent=Decimal("1")),
        [pay("a", 99_000_000, 100_000_000), pay("b", 1_000_000, 100_000_000, t=BEFORE + 5)],
        PU - 30,
        "confirmed",
        "exact",
        ("99.00", "1.00", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    # reverted payments are ignored
    Case(
        "reverted-only-payment-back-to-pending",
        inv(),
        [pay("a", USDT_4999, status=R)],
        PU - 30,
        "pending",
        "unpaid",
        ("0", "49.99", "0"),
    ),
    Case(
        "reverted-only-payment-after-deadline-expired",
        inv(),
        [pay("a", USDT_4999, status=R)],
        PU + 1,
        "expired",
        "unpaid",
        ("0", "49.99", "0"),
    ),
    Case(
        "reverted-first-makes-duplicate-counted",
        inv(),
        [pay("a", USDT_4999, status=R), pay("b", USDT_4999, t=BEFORE + 30)],
        PU - 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"b": "counted"},
    ),
    Case(
        "reverted-duplicate-closes-exception",
        inv(),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=BEFORE + 30, status=R)],
        PU - 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
    ),
    Case(
        "reverted-partial-of-two",
        inv(),
        [pay("a", 20_000_000, status=R), pay("b", 29_990_000, t=BEFORE + 12)],
        PU - 30,
        "pending",
        "partial",
        ("29.99", "20.00", "0"),
        {"b": "counted"},
    ),
    Case(
        "reverted-overpayment-closes-overpaid",
        inv(),
        [pay("a", USDT_4999), pay("b", 10_000_000, t=BEFORE - 30, status=R)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
    ),
    Case(
        "reverted-detected-does-not-hold-back-confirmation",
        inv(),
        [
            pay("a", 20_000_000),
            pay("x", 5_000_000, t=BEFORE + 1, status=R),
            pay("b", 29_990_000, t=BEFORE + 2),
        ],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    # cancelled and draft
    Case("cancelled-nothing", inv(cancelled=True), [], PU - 30, "cancelled", "unpaid", ("0", "49.99", "0")),
    Case(
        "cancelled-stays-cancelled-after-deadline",
        inv(cancelled=True),
        [],
        PU + 100,
        "cancelled",
        "unpaid",
        ("0", "49.99", "0"),
    ),
    Case(
        "cancelled-payment-before-deadline-is-late",
        inv(cancelled=True),
        [pay("a", USDT_4999)],
        PU - 30,
        "cancelled",
        "unpaid",
        ("0", "49.99", "0"),
        {"a": "late"},
        opened("late_payment"),
        ("late_payment",),
    ),
    Case(
        "cancelled-partial-payment-is-late",
        inv(cancelled=True),
        [pay("a", 1_000_000)],
        PU - 30,
        "cancelled",
        "unpaid",
        ("0", "49.99", "0"),
        {"a": "late"},
        opened("late_payment"),
        ("late_payment",),
    ),
    Case("draft", inv(payable_until=None, draft=True), [], None, "draft", "unpaid", ("0", "49.99", "0")),
    Case(
        "draft-chain-time-does-not-expire",
        inv(payable_until=None, draft=True),
        [],
        PU + 10_000,
        "draft",
        "unpaid",
        ("0", "49.99", "0"),
    ),
    # zero amount
    Case("zero-amount-confirmed-at-once", inv("0"), [], None, "confirmed", "exact", ("0", "0", "0")),
    Case(
        "zero-amount-after-deadline-still-confirmed",
        inv("0"),
        [],
        PU + 100,
        "confirmed",
        "exact",
        ("0", "0", "0"),
    ),
    Case(
        "zero-amount-draft",
        inv("0", payable_until=None, draft=True),
        [],
        None,
        "draft",
        "exact",
        ("0", "0", "0"),
    ),
    # (cannot normally happen: a zero-amount invoice has no options.) Note the zero-amount
    # branch shows the open exception but leaves open_exceptions empty.
    Case(
        "zero-amount-stray-payment-is-duplicate",
        inv("0"),
        [pay("a", 5, option=1)],
        PU - 30,
        "confirmed",
        "exact",
        ("0", "0", "0"),
        {"a": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    # big amounts: above 2**64 and near 2**256-1
    Case(
        "1000-eth-above-2**64-exact",
        inv("3000000"),
        [pay("a", 6 * 10**20, BIG), pay("b", 4 * 10**20, BIG, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("3000000.00", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "1000-eth-one-wei-short",
        inv("3000000"),
        [pay("a", 6 * 10**20, BIG), pay("b", 4 * 10**20 - 1, BIG, t=BEFORE + 1)],
        PU - 30,
        "pending",
        "partial",
        ("2999999.99", "0.01", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "1000-eth-overpaid-double",
        inv("3000000"),
        [pay("a", 2 * BIG, BIG)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("6000000.00", "0", "3000000.00"),
        {"a": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
    Case(
        "uint256-max-option-single-payment",
        inv(),
        [pay("a", UINT256_MAX, UINT256_MAX)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
    ),
    Case(
        "uint256-max-option-two-halves",
        inv(),
        [pay("a", HALF_MAX, UINT256_MAX), pay("b", HALF_MAX - 1, UINT256_MAX, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "uint256-max-option-one-unit-short",
        inv(),
        [pay("a", UINT256_MAX - 1, UINT256_MAX)],
        PU - 30,
        "pending",
        "partial",
        ("49.98", "0.01", "0"),
        {"a": "counted"},
    ),
    # several options: each payment is worth amount_atomic / option_amount_atomic
    Case(
        "half-usdt-plus-half-eth-exact",
        inv(),
        [pay("a", USDT_4999 // 2), pay("b", ETH_4999 // 2, ETH_4999, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "third-plus-two-thirds-across-options",
        inv(),
        [pay("a", 10**20, 3 * 10**20), pay("b", 200, 300, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "half-plus-third-across-options-partial",
        inv(),
        [pay("a", USDT_4999 // 2), pay("b", 10**20, 3 * 10**20, t=BEFORE + 1)],
        PU - 30,
        "pending",
        "partial",
        ("41.65", "8.34", "0"),
        {"a": "counted", "b": "counted"},
    ),
    Case(
        "usdt-amount-sent-to-eth-option-is-tiny",
        inv(),
        [pay("a", USDT_4999, ETH_4999)],
        PU - 30,
        "pending",
        "partial",
        ("0", "49.99", "0"),
        {"a": "counted"},
    ),
    Case(
        "full-eth-then-full-usdt-is-duplicate",
        inv(),
        [pay("a", ETH_4999, ETH_4999), pay("b", USDT_4999, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    # ordering: by the `order` key (timestamp, network, block, log index), never list order
    Case(
        "order-key-earlier-block-listed-second",
        inv(),
        [
            pay("x", USDT_4999, t=BEFORE + 10, order=(BEFORE + 10, "ethereum", 11, 0)),
            pay("y", USDT_4999, t=BEFORE, order=(BEFORE, "ethereum", 10, 0)),
        ],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"x": "duplicate", "y": "counted"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "order-key-same-block-by-log-index",
        inv(),
        [
            pay("x", USDT_4999, order=(BEFORE, "ethereum", 10, 5)),
            pay("y", USDT_4999, order=(BEFORE, "ethereum", 10, 2)),
        ],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"x": "duplicate", "y": "counted"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "order-key-full-first-makes-partial-duplicate",
        inv(),
        [
            pay("a", 20_000_000, order=(BEFORE, "ethereum", 10, 7)),
            pay("b", USDT_4999, order=(BEFORE, "ethereum", 10, 1)),
        ],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "duplicate", "b": "counted"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "order-key-partial-first-makes-overpaid",
        inv(),
        [
            pay("b", USDT_4999, order=(BEFORE, "ethereum", 10, 7)),
            pay("a", 20_000_000, order=(BEFORE, "ethereum", 10, 1)),
        ],
        PU - 30,
        "confirmed",
        "overpaid",
        ("69.99", "0", "20.00"),
        {"a": "counted", "b": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
    Case(
        "no-order-key-falls-back-to-timestamp",
        inv(),
        [pay("a", USDT_4999, t=BEFORE + 5), pay("b", USDT_4999, t=BEFORE)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "duplicate", "b": "counted"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    # display precision follows the invoice amount, never fewer than cents
    Case(
        "three-place-amount-display",
        inv("49.999"),
        [pay("a", 20_000_000, 49_999_000)],
        PU - 30,
        "pending",
        "partial",
        ("20.000", "29.999", "0"),
        {"a": "counted"},
    ),
    Case(
        "received-rounds-down-remaining-up",
        inv("10"),
        [pay("a", 1, 3)],
        PU - 30,
        "pending",
        "partial",
        ("3.33", "6.67", "0"),
        {"a": "counted"},
    ),
    Case(
        "integer-amount-shows-cents",
        inv("10"),
        [pay("a", 11, 10)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("11.00", "0", "1.00"),
        {"a": "counted"},
        opened("overpaid"),
        ("overpaid",),
    ),
]

# --------------------------------------------------------------------------- resolutions

LATE_FULL = pay("a", USDT_4999, t=AFTER)
LATE = ExceptionType.LATE_PAYMENT
UNDER = ExceptionType.UNDERPAID
OVER = ExceptionType.OVERPAID
DUP = ExceptionType.DUPLICATE_PAYMENT
A = ResolutionAction

RESOLUTIONS = [
    Case(
        "accept-late-counts-it-confirmed",
        inv(resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, {"a"}),)),
        [LATE_FULL],
        AFTER + 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
        resolved("late_payment", "accept_late_payment"),
    ),
    Case(
        "accept-late-detected-is-paid",
        inv(resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, {"a"}),)),
        [pay("a", USDT_4999, t=AFTER, status=D)],
        AFTER + 10,
        "paid",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
        resolved("late_payment", "accept_late_payment"),
    ),
    Case(
        "accept-late-on-cancelled-counts-it",
        inv(cancelled=True, resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, {"a"}),)),
        [pay("a", USDT_4999)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted"},
        resolved("late_payment", "accept_late_payment"),
    ),
    Case(
        "accept-late-completes-underpaid",
        inv(resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, {"b"}),)),
        [pay("a", 20_000_000), pay("b", 29_990_000, t=AFTER)],
        AFTER + 10,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "counted"},
        resolved("late_payment", "accept_late_payment"),
    ),
    Case(
        "accept-late-covers-only-named-payments-new-late-opens",
        inv(resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, {"a"}),)),
        [pay("a", 20_000_000, t=AFTER), pay("b", 10_000_000, t=AFTER + 100)],
        AFTER + 200,
        "underpaid",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted", "b": "late"},
        opened("late_payment"),
        ("late_payment", "underpaid"),
    ),
    Case(
        "late-after-accepted-late-paid-is-duplicate",
        inv(resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, {"a"}),)),
        [LATE_FULL, pay("b", USDT_4999, t=AFTER + 100)],
        AFTER + 200,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "write-off-underpaid-confirmed",
        inv(resolutions=(resolution(UNDER, A.WRITE_OFF_UNDERPAYMENT),)),
        [pay("a", 20_000_000)],
        PU + 10,
        "confirmed",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
        resolved("underpaid", "write_off_underpayment"),
    ),
    Case(
        "write-off-underpaid-waits-for-confirmation",
        inv(resolutions=(resolution(UNDER, A.WRITE_OFF_UNDERPAYMENT),)),
        [pay("a", 20_000_000), pay("b", 5_000_000, t=BEFORE + 1, status=D)],
        PU + 10,
        "underpaid",
        "partial",
        ("25.00", "24.99", "0"),
        {"a": "counted", "b": "counted"},
        resolved("underpaid", "write_off_underpayment"),
    ),
    Case(
        "accept-overpayment-resolves-status-unchanged",
        inv(resolutions=(resolution(OVER, A.ACCEPT_OVERPAYMENT),)),
        [pay("a", 60_000_000)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted"},
        resolved("overpaid", "accept_overpayment"),
    ),
    Case(
        "accept-overpayment-detected-stays-paid",
        inv(resolutions=(resolution(OVER, A.ACCEPT_OVERPAYMENT),)),
        [pay("a", 60_000_000, status=D)],
        PU - 30,
        "paid",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted"},
        resolved("overpaid", "accept_overpayment"),
    ),
    Case(
        "mark-duplicate-reviewed-resolves-status-unchanged",
        inv(resolutions=(resolution(DUP, A.MARK_DUPLICATE_PAYMENT_REVIEWED, {"b"}),)),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        resolved("duplicate_payment", "mark_duplicate_payment_reviewed"),
    ),
    Case(
        "new-duplicate-after-review-opens-again",
        inv(resolutions=(resolution(DUP, A.MARK_DUPLICATE_PAYMENT_REVIEWED, {"b"}),)),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=BEFORE + 1), pay("c", USDT_4999, t=BEFORE + 2)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate", "c": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
    Case(
        "other-on-late-resolves-without-counting",
        inv(resolutions=(resolution(LATE, A.OTHER, {"a"}),)),
        [LATE_FULL],
        AFTER + 10,
        "expired",
        "unpaid",
        ("0", "49.99", "0"),
        {"a": "late"},
        resolved("late_payment", "other"),
    ),
    Case(
        "other-on-underpaid-does-not-write-off",
        inv(resolutions=(resolution(UNDER, A.OTHER),)),
        [pay("a", 20_000_000)],
        PU + 10,
        "underpaid",
        "partial",
        ("20.00", "29.99", "0"),
        {"a": "counted"},
        resolved("underpaid", "other"),
    ),
    Case(
        "other-on-overpaid",
        inv(resolutions=(resolution(OVER, A.OTHER),)),
        [pay("a", 60_000_000)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted"},
        resolved("overpaid", "other"),
    ),
    Case(
        "other-on-duplicate",
        inv(resolutions=(resolution(DUP, A.OTHER, {"b"}),)),
        [pay("a", USDT_4999), pay("b", USDT_4999, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "exact",
        ("49.99", "0", "0"),
        {"a": "counted", "b": "duplicate"},
        resolved("duplicate_payment", "other"),
    ),
    Case(
        "resolved-note-may-be-null",
        inv(resolutions=(resolution(OVER, A.ACCEPT_OVERPAYMENT, note=None),)),
        [pay("a", 60_000_000)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted"},
        resolved("overpaid", "accept_overpayment", note=None),
    ),
    Case(
        "open-exception-shown-over-earlier-resolution",
        inv(resolutions=(resolution(OVER, A.ACCEPT_OVERPAYMENT),)),
        [pay("a", 60_000_000), pay("b", 1_000_000, t=BEFORE + 1)],
        PU - 30,
        "confirmed",
        "overpaid",
        ("60.00", "0", "10.01"),
        {"a": "counted", "b": "duplicate"},
        opened("duplicate_payment"),
        ("duplicate_payment",),
    ),
]


@pytest.mark.parametrize("case", BASIC, ids=lambda c: c.id)
def test_judge_rules(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", RESOLUTIONS, ids=lambda c: c.id)
def test_judge_resolutions(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", BASIC + RESOLUTIONS, ids=lambda c: c.id)
def test_judge_ignores_list_order(case: Case) -> None:
    forward = judge(case.invoice, case.payments, chain_time=case.chain_time)
    backward = judge(case.invoice, list(reversed(case.payments)), chain_time=case.chain_time)
    assert backward == forward
    assert str(backward.status) == case.status


# --------------------------------------------------------------------------- whole flows


def test_flow_late_payment_accepted_then_another_late_payment() -> None:
    base = inv()
    a = pay("a", 20_000_000, t=AFTER)
    j1 = judge(base, [a], chain_time=AFTER + 10)
    assert (str(j1.status), j1.roles) == ("expired", {"a": Role.LATE})
    assert j1.exception.as_dict() == opened("late_payment")

    covered = payments_to_cover(ExceptionType.LATE_PAYMENT, j1.roles)
    assert covered == frozenset({"a"})
    accepted = inv(resolutions=(resolution(LATE, A.ACCEPT_LATE_PAYMENT, covered),))
    j2 = judge(accepted, [a], chain_time=AFTER + 10)
    assert str(j2.status) == "underpaid"
    assert j2.roles == {"a": Role.COUNTED}
    assert j2.received == Fraction(20_000_000, USDT_4999)
    assert j2.exception.as_dict() == opened("underpaid")

    b = pay("b", 29_990_000, t=AFTER + 100)
    j3 = judge(accepted, [a, b], chain_time=AFTER + 200)
    assert str(j3.status) == "underpaid"
    assert j3.roles == {"a": Role.COUNTED, "b": Role.LATE}
    assert j3.exception.as_dict() == opened("late_payment")

    both = inv(
        resolutions=accepted.resolutions
        + (resolution(LATE, A.ACCEPT_LATE_PAYMENT, payments_to_cover(LATE, j3.roles)),)
    )
    j4 = judge(both, [a, b], chain_time=AFTER + 200)
    assert str(j4.status) == "confirmed"
    assert j4.summary() == {
        "payment_state": "exact",
        "received_amount": "49.99",
        "remaining_amount": "0",
        "overpaid_amount": "0",
    }
    assert j4.exception.as_dict() == resolved("late_payment", "accept_late_payment")
    assert j4.open_exceptions == ()


def test_flow_write_off_then_confirmation() -> None:
    a = pay("a", 20_000_000, status=D)
    j1 = judge(inv(), [a], chain_time=PU + 1)
    assert str(j1.status) == "underpaid"
    assert j1.exception.as_dict() == opened("underpaid")
    written = inv(resolutions=(resolution(UNDER, A.WRITE_OFF_UNDERPAYMENT),))
    j2 = judge(written, [a], chain_time=PU + 1)
    assert str(j2.status) == "underpaid"
    assert j2.exception.as_dict() == resolved("underpaid", "write_off_underpayment")
    assert j2.open_exceptions == ()
    j3 = judge(written, [pay("a", 20_000_000, status=C)], chain_time=PU + 30)
    assert str(j3.status) == "confirmed"
    assert str(j3.payment_state) == "partial"


def test_flow_reorg_reverts_then_reincluded() -> None:
    j1 = judge(inv(), [pay("a", USDT_4999, status=D)], chain_time=PU - 30)
    assert str(j1.status) == "paid"
    j2 = judge(inv(), [pay("a", USDT_4999, status=R)], chain_time=PU - 20)
    assert (str(j2.status), str(j2.payment_state), j2.roles) == ("pending", "unpaid", {})
    j3 = judge(
        inv(),
        [pay("a", USDT_4999, status=R), pay("a2", USDT_4999, t=BEFORE + 20, status=D)],
        chain_time=PU - 10,
    )
    assert (str(j3.status), j3.roles) == ("paid", {"a2": Role.COUNTED})


# --------------------------------------------------------------------------- once-disagreements, now fixed


def test_huge_overpayment_is_judged() -> None:
    check(
        Case(
            "huge-overpayment",
            inv(),
            [pay("a", 10**40)],
            PU - 30,
            "confirmed",
            "overpaid",
            ("10000000000000000000000000000000000.00", "0", "9999999999999999999999999999999950.01"),
            {"a": "counted"},
            opened("overpaid"),
            ("overpaid",),
        )
    )


def test_unpaid_summary_matches_contract_example() -> None:
    j = judge(inv(), [], chain_time=PU - 30)
    assert j.summary() == {
        "payment_state": "unpaid",
        "received_amount": "0",
        "remaining_amount": "49.99",
        "overpaid_amount": "0",
    }


# --------------------------------------------------------------------------- amount helpers


@pytest.mark.parametrize(
    "amount, rate, decimals, expected",
    [
        pytest.param("49.99", "1", 6, 49_990_000, id="usdt-exact"),
        pytest.param("49.99", "1", 18, 49_990_000_000_000_000_000, id="18-decimals-above-2**64-exact"),
        pytest.param("49.99", "3000", 18, 16_663_333_333_333_334, id="eth-rounds-up"),
        pytest.param("10", "3", 6, 3_333_334, id="thirds-round-up"),
        pytest.param("1", "3", 0, 1, id="zero-decimals-rounds-up"),
        pytest.param("3000000", "3000", 18, 10**21, id="1000-eth-exact-no-round"),
        pytest.param("1000000", "0.000000000001", 18, 10**36, id="tiny-rate-huge-exact"),
        pytest.param(
            "123456789.123456789", "0.000000001", 18, 123_456_789_123_456_789 * 10**18, id="many-digits-exact"
        ),
        pytest.param("0.01", "1", 2, 1, id="one-cent"),
        pytest.param("0", "1", 18, 0, id="zero"),
    ],
)
def test_quote_atomic(amount, rate, decimals, expected) -> None:
    got = quote_atomic(Decimal(amount), Decimal(rate), decimals)
    assert isinstance(got, int)
    assert got == expected
    # never short, and never more than one atomic unit over
    value = Fraction(Decimal(rate)) / 10**decimals
    assert got * value >= Fraction(Decimal(amount))
    if got:
        assert (got - 1) * value < Fraction(Decimal(amount))


@pytest.mark.parametrize(
    "atomic, decimals, expected",
    [
        pytest.param(1_500_000, 6, "1.5", id="strips-trailing-zeros"),
        pytest.param(49_990_000, 6, "49.99", id="usdt"),
        pytest.param(12_000_000, 6, "12", id="drops-point"),
        pytest.param(0, 6, "0", id="zero"),
        pytest.param(0, 0, "0", id="zero-no-decimals"),
        pytest.param(1, 18, "0.000000000000000001", id="one-wei"),
        pytest.param(10**21, 18, "1000", id="1000-eth-keeps-integer-zeros"),
        pytest.param(1000, 0, "1000", id="no-decimals-keeps-zeros"),
        pytest.param(100, 2, "1", id="two-decimals"),
        pytest.param(16_663_333_333_333_334, 18, "0.016663333333333334", id="eth-quote"),
        pytest.param(10**28 - 1, 18, "9999999999.999999999999999999", id="28-digits"),
        pytest.param(123456789012345678901234567890, 18, "123456789012.34567890123456789", id="30-digits"),
        pytest.param(
            UINT256_MAX,
            18,
            "115792089237316195423570985008687907853269984665640564039457.584007913129639935",
            id="uint256-max",
        ),
        pytest.param(UINT256_MAX, 0, str(UINT256_MAX), id="uint256-max-no-decimals"),
    ],
)
def test_format_units(atomic, decimals, expected) -> None:
    assert format_units(atomic, decimals) == expected


@pytest.mark.parametrize(
    "amount, places",
    [
        pytest.param("49.99", 2, id="cents"),
        pytest.param("10", 2, id="integer-gets-cents"),
        pytest.param("0", 2, id="zero"),
        pytest.param("49.999", 3, id="three-places"),
        pytest.param("0.00000001", 8, id="eight-places"),
        pytest.param("1E+3", 2, id="exponent-form"),
    ],
)
def test_display_places(amount, places) -> None:
    assert display_places(Decimal(amount)) == places


@pytest.mark.parametrize(
    "kind, expected",
    [
        pytest.param(ExceptionType.LATE_PAYMENT, {"b", "d"}, id="late"),
        pytest.param(ExceptionType.DUPLICATE_PAYMENT, {"c"}, id="duplicate"),
        pytest.param(ExceptionType.UNDERPAID, set(), id="underpaid-none"),
        pytest.param(ExceptionType.OVERPAID, set(), id="overpaid-none"),
    ],
)
def test_payments_to_cover(kind, expected) -> None:
    roles = {"a": Role.COUNTED, "b": Role.LATE, "c": Role.DUPLICATE, "d": Role.LATE}
    assert payments_to_cover(kind, roles) == frozenset(expected)


@pytest.mark.parametrize(
    "prefix, ms, rand, expected",
    [
        pytest.param("inv", 0, bytes(16), "inv_" + "0" * 26, id="all-zero"),
        pytest.param("opt", 1, bytes(16), "opt_" + "0" * 9 + "1" + "0" * 16, id="one-ms"),
        pytest.param("inv", 0, b"\xff" * 16, "inv_" + "0" * 10 + "Z" * 16, id="max-random"),
        pytest.param("inv", 2**48 - 1, bytes(16), "inv_7" + "Z" * 9 + "0" * 16, id="max-time"),
        # Each random character is its byte's low five bits (the high three are dropped).
        pytest.param("inv", 0, bytes(range(16)), "inv_" + "0" * 10 + "0123456789ABCDEF", id="low-bits"),
        pytest.param(
            "inv", 0, bytes(range(224, 240)), "inv_" + "0" * 10 + "0123456789ABCDEF", id="high-bits"
        ),
    ],
)
def test_new_id_layout(prefix, ms, rand, expected) -> None:
    assert new_id(prefix, ms, rand) == expected


def test_new_id_sorts_by_time_and_is_random() -> None:
    ids = [new_id("inv", now_ms=1_768_473_000_000 + i) for i in range(50)]
    assert ids == sorted(ids)
    assert all(re.fullmatch(r"inv_[0-9A-HJKMNP-TV-Z]{26}", i) for i in ids)
    assert new_id("inv", now_ms=5) != new_id("inv", now_ms=5)


def test_new_ids_random_part_uses_every_character_at_every_place() -> None:
    """80 random bits: each of the 16 characters takes all 32 values (not a subset of them)."""
    ids = new_ids("evt", 5, 2000)
    assert len(set(ids)) == 2000
    for place in range(10, 26):
        assert {i[4 + place] for i in ids} == set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


@pytest.mark.parametrize("tolerance", ["99.99", "100"])
def test_no_tolerance_makes_an_unpaid_invoice_paid(tolerance) -> None:
    j = judge(inv(tolerance_percent=Decimal(tolerance)), [], chain_time=PU - 30)
    assert (str(j.status), str(j.payment_state)) == ("pending", "unpaid")
    j = judge(
        inv(tolerance_percent=Decimal(tolerance)),
        [pay("a", 25_000_000), pay("b", 1, t=BEFORE + 1)],
        chain_time=PU - 30,
    )
    assert (str(j.status), str(j.payment_state)) == ("confirmed", "exact")
    assert {k: str(v) for k, v in j.roles.items()} == {"a": "counted", "b": "duplicate"}
