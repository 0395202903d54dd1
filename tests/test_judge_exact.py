"""Judging in integers gives what judging in exact fractions gave, on any invoice.

`domain.judge` keeps each invoice's received share as an integer numerator and denominator,
and builds the sums shown from integer quotients (it runs for every invoice a follower step
touches). Before, the same rules ran on `Fraction` and on `Decimal` at 200 digits. The
reference below is that earlier arithmetic, kept as the oracle: thousands of random invoices
(several options, uint256-sized amounts, tolerances, deadlines, reverted payments,
resolutions) must judge the same to the last field, with no float anywhere.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from decimal import ROUND_DOWN, Decimal, localcontext
from fractions import Fraction

import pytest

from watcher import domain
from watcher.domain import (
    UINT256_MAX,
    ExceptionType,
    InvoiceFacts,
    InvoiceStatus,
    PaymentFacts,
    PaymentState,
    PaymentStatus,
    Resolution,
    ResolutionAction,
    Role,
    judge,
)

PU = 1_768_473_000


# ------------------------------------------------------------------ the earlier arithmetic


def _reference(invoice: InvoiceFacts, payments: Sequence[PaymentFacts], chain_time: int | None) -> tuple:
    """(status, payment_state, received, received_amount, remaining_amount, overpaid_amount,
    roles, open_exceptions) as the Fraction-based rules computed them."""
    with localcontext() as ctx:
        ctx.prec = 200
        threshold = 1 - Fraction(invoice.tolerance_percent) / 100
        roles, received, counted = _reference_roles(invoice, payments, threshold)
        fully_paid = received >= threshold and received > 0
        all_confirmed = all(p.status == PaymentStatus.CONFIRMED for p in counted)
        deadline_passed = (
            chain_time is not None
            and invoice.payable_until is not None
            and chain_time > invoice.payable_until
        )
        # The rule from the statuses is not arithmetic: the domain's own, given what was counted.
        status = domain._status(
            invoice,
            received == 0,
            fully_paid=fully_paid,
            all_confirmed=all_confirmed,
            deadline_passed=deadline_passed,
        )
        places = domain.display_places(invoice.amount)
        received_amount = _quantize_down(received * Fraction(invoice.amount), places)
        remaining = max(invoice.amount - received_amount, Decimal(0))
        remaining = remaining.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN)
        overpaid = Decimal(0)
        if received > 1:
            value = (received - 1) * Fraction(invoice.amount)
            overpaid = _quantize_down(value, 36)
            for shown_places in range(places, 37):
                if _quantize_down(value, shown_places) > 0:
                    overpaid = _quantize_down(value, shown_places)
                    break
        if received == 0:
            state = PaymentState.UNPAID
        elif received > 1:
            state = PaymentState.OVERPAID
        else:
            state = PaymentState.EXACT if fully_paid else PaymentState.PARTIAL
        open_types = _reference_open(invoice, roles)
        if received > 1 and not any(r.exception_type == ExceptionType.OVERPAID for r in invoice.resolutions):
            open_types.append(ExceptionType.OVERPAID)
        if status == InvoiceStatus.UNDERPAID and not any(
            r.exception_type == ExceptionType.UNDERPAID for r in invoice.resolutions
        ):
            open_types.append(ExceptionType.UNDERPAID)
        ordered = tuple(t for t in domain.EXCEPTION_PRIORITY if t in open_types)
        return status, state, received, received_amount, remaining, overpaid, roles, ordered


def _reference_roles(
    invoice: InvoiceFacts, payments: Sequence[PaymentFacts], threshold: Fraction
) -> tuple[dict[str, Role], Fraction, list[PaymentFacts]]:
    accepted: set[str] = set()
    for r in invoice.resolutions:
        if r.action == ResolutionAction.ACCEPT_LATE_PAYMENT:
            accepted |= r.payment_ids
    live = sorted(
        (p for p in payments if p.status != PaymentStatus.REVERTED),
        key=lambda p: (p.order or (p.block_timestamp,), p.id),
    )
    roles: dict[str, Role] = {}
    received = Fraction(0)
    counted = []
    for p in live:
        share = Fraction(p.amount_atomic, p.option_amount_atomic)
        if received > 0 and received >= threshold:
            roles[p.id] = Role.DUPLICATE
            continue
        on_time = (
            not invoice.cancelled
            and invoice.payable_until is not None
            and p.block_timestamp <= invoice.payable_until
        )
        if on_time or p.id in accepted:
            roles[p.id] = Role.COUNTED
            received += share
            counted.append(p)
        else:
            roles[p.id] = Role.LATE
    return roles, received, counted


def _reference_open(invoice: InvoiceFacts, roles: dict[str, Role]) -> list[ExceptionType]:
    out = []
    for kind, role in (
        (ExceptionType.LATE_PAYMENT, Role.LATE),
        (ExceptionType.DUPLICATE_PAYMENT, Role.DUPLICATE),
    ):
        covered = set().union(*(r.payment_ids for r in invoice.resolutions if r.exception_type == kind))
        if any(r == role and pid not in covered for pid, r in roles.items()):
            out.append(kind)
    return out


def _quantize_down(value: Fraction, places: int) -> Decimal:
    return Decimal(f"{value.numerator * 10**places // value.denominator}E-{places}")


# ------------------------------------------------------------------ random invoices

AMOUNTS = [
    "49.99",
    "25",
    "0.01",
    "1000000",
    "0.000001",
    "3.14159265358979323846",
    "1E+3",
    "99999999999.999999",
]
TOLERANCES = ["0", "0.5", "1", "2.25", "33.333", "99.99", "100"]
RESOLUTIONS = [
    (ExceptionType.LATE_PAYMENT, ResolutionAction.ACCEPT_LATE_PAYMENT),
    (ExceptionType.OVERPAID, ResolutionAction.ACCEPT_OVERPAYMENT),
    (ExceptionType.UNDERPAID, ResolutionAction.WRITE_OFF_UNDERPAYMENT),
    (ExceptionType.DUPLICATE_PAYMENT, ResolutionAction.MARK_DUPLICATE_PAYMENT_REVIEWED),
    (ExceptionType.DUPLICATE_PAYMENT, ResolutionAction.OTHER),
]


def _random_option_amount(rng: random.Random) -> int:
    return rng.choice(
        [
            rng.randrange(1, 10**6),
            49_990_000,
            16_663_333_333_333_334,
            rng.randrange(10**17, 10**24),
            rng.randrange(2**200, UINT256_MAX),
            UINT256_MAX,
        ]
    )


def _random_case(rng: random.Random) -> tuple[InvoiceFacts, list[PaymentFacts], int | None]:
    options = [_random_option_amount(rng) for _ in range(rng.randint(1, 3))]
    payments = []
    for k in range(rng.randint(0, 6)):
        option = rng.choice(options)
        amount = rng.choice(
            [
                option,
                option - 1,
                option + 1,
                option // rng.randint(1, 4),
                option * rng.randint(2, 3),
                rng.randrange(0, option + 1),
                option * 995 // 1000,
                min(option * 2, UINT256_MAX),
            ]
        )
        t = PU + rng.choice([-120, -60, -1, 0, 1, 60])
        status = rng.choice([PaymentStatus.CONFIRMED, PaymentStatus.DETECTED, PaymentStatus.REVERTED])
        order = (t, "net", 100 + k, k) if rng.random() < 0.7 else ()
        payments.append(PaymentFacts(f"pay_{k}", amount, option, t, status, order))
    ids = [p.id for p in payments]
    resolutions = tuple(
        Resolution(
            kind, action, None, "2026-01-15T11:00:00Z", frozenset(rng.sample(ids, rng.randint(0, len(ids))))
        )
        for kind, action in rng.sample(RESOLUTIONS, rng.randint(0, 2))
    )
    invoice = InvoiceFacts(
        amount=Decimal(rng.choice(AMOUNTS)),
        tolerance_percent=Decimal(rng.choice(TOLERANCES)),
        payable_until=rng.choice([PU, PU, None]),
        draft=rng.random() < 0.05,
        cancelled=rng.random() < 0.1,
        resolutions=resolutions,
    )
    return invoice, payments, rng.choice([None, PU - 10, PU, PU + 10])


@pytest.mark.parametrize("seed", range(4))
def test_integer_judging_equals_the_fraction_rules(seed) -> None:
    rng = random.Random(seed)
    for _ in range(2_500):
        invoice, payments, chain_time = _random_case(rng)
        got = judge(invoice, payments, chain_time=chain_time)
        want = _reference(invoice, payments, chain_time)
        assert (
            got.status, got.payment_state, got.received, got.received_amount, got.remaining_amount,
            got.overpaid_amount, got.roles, got.open_exceptions,
        ) == want, (invoice, payments, chain_time)  # fmt: skip
        # The sums are shown alike too: the same digits, the same places.
        for mine, theirs in zip(
            (got.received_amount, got.remaining_amount, got.overpaid_amount), want[3:6], strict=True
        ):
            assert str(mine) == str(theirs)
            assert isinstance(mine, Decimal)


def test_one_wei_over_is_an_overpayment_shown() -> None:
    """One wei more than an 18-decimals option asks is an overpayment, shown with the places it
    takes, never rounded away."""
    option = 49_990_000_000_000_000_000
    j = judge(
        InvoiceFacts(amount=Decimal("49.99"), payable_until=PU),
        [PaymentFacts("p", option + 1, option, PU - 1, PaymentStatus.CONFIRMED)],
        chain_time=PU - 1,
    )
    assert j.payment_state == PaymentState.OVERPAID
    assert j.received == Fraction(option + 1, option)
    assert j.received_amount == Decimal("49.99") and j.remaining_amount == 0
    assert str(j.overpaid_amount) == "1E-18"  # 49.99 USD / 49.99e18 wei, one wei


def test_a_payment_option_of_nothing_is_refused() -> None:
    with pytest.raises(ZeroDivisionError):
        judge(
            InvoiceFacts(amount=Decimal("1"), payable_until=PU),
            [
                PaymentFacts("a", 1, 2, PU - 1, PaymentStatus.CONFIRMED),
                PaymentFacts("b", 1, 0, PU - 1, PaymentStatus.CONFIRMED),
            ],
            chain_time=PU,
        )
