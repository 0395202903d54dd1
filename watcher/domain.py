"""Value types and the pure rules that decide what a payment means.

Everything here is free of I/O, clocks and web3 so that the money rules can be tested as
tables and re-run after any change (a new payment, a reorg, a deadline, an operator's
resolution) with the same answer every time.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

UINT256_MAX = 2**256 - 1


class InvoiceStatus(StrEnum):
    DRAFT = "draft"
    PENDING = "pending"
    PAID = "paid"
    CONFIRMED = "confirmed"
    EXPIRED = "expired"
    UNDERPAID = "underpaid"
    CANCELLED = "cancelled"


class PaymentState(StrEnum):
    UNPAID = "unpaid"
    PARTIAL = "partial"
    EXACT = "exact"
    OVERPAID = "overpaid"


class PaymentStatus(StrEnum):
    DETECTED = "detected"
    CONFIRMED = "confirmed"
    REVERTED = "reverted"


class Role(StrEnum):
    COUNTED = "counted"
    DUPLICATE = "duplicate"
    LATE = "late"


class ExceptionType(StrEnum):
    LATE_PAYMENT = "late_payment"
    UNDERPAID = "underpaid"
    OVERPAID = "overpaid"
    DUPLICATE_PAYMENT = "duplicate_payment"


class ResolutionAction(StrEnum):
    ACCEPT_LATE_PAYMENT = "accept_late_payment"
    ACCEPT_OVERPAYMENT = "accept_overpayment"
    WRITE_OFF_UNDERPAYMENT = "write_off_underpayment"
    MARK_DUPLICATE_PAYMENT_REVIEWED = "mark_duplicate_payment_reviewed"
    OTHER = "other"


# Which exception each specific action resolves; OTHER fits any.
ACTION_RESOLVES: dict[ResolutionAction, ExceptionType] = {
    ResolutionAction.ACCEPT_LATE_PAYMENT: ExceptionType.LATE_PAYMENT,
    ResolutionAction.ACCEPT_OVERPAYMENT: ExceptionType.OVERPAID,
    ResolutionAction.WRITE_OFF_UNDERPAYMENT: ExceptionType.UNDERPAID,
    ResolutionAction.MARK_DUPLICATE_PAYMENT_REVIEWED: ExceptionType.DUPLICATE_PAYMENT,
}

# When several exceptions are open at once the invoice shows one: money the merchant
# may have to send back first, then the shortfall.
EXCEPTION_PRIORITY = (
    ExceptionType.LATE_PAYMENT,
    ExceptionType.DUPLICATE_PAYMENT,
    ExceptionType.OVERPAID,
    ExceptionType.UNDERPAID,
)


# --------------------------------------------------------------------------- chain values


@dataclass(frozen=True, slots=True)
class BlockRef:
    """A block header as far as the follower cares: enough to link and to date, and its
    `logsBloom` as an int when the node gave one (which logs the block cannot hold)."""

    number: int
    hash: str
    parent_hash: str
    timestamp: int
    bloom: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Value that moved to an address on chain, normalised at the edge (ints, lowercase hex).

    `token` is None for the native coin; `log_index` is None for a plain native transfer.
    `trace_position` tells apart the coin moved by inner calls of one transaction (found by
    the node's tracer), in the tracer's order; None for logs and for the transaction's own value.
    """

    tx_hash: str
    log_index: int | None
    block_number: int
    block_hash: str
    token: str | None
    from_address: str
    to_address: str
    amount: int
    trace_position: int | None = None

    @property
    def unique_key(self) -> int:
        """Which value movement of the transaction this is: the log index, -1 for the
        transaction's own value, -2 - k for its k-th inner transfer (never equal to a log index)."""
        if self.log_index is not None:
            return self.log_index
        return -1 if self.trace_position is None else -2 - self.trace_position


@dataclass(frozen=True, slots=True)
class RouterPayment:
    """A PaymentRouter `PaymentReceived` log; `token` None for the native coin."""

    tx_hash: str
    log_index: int
    block_number: int
    block_hash: str
    router: str
    invoice_id_hash: str
    payment_id_hash: str
    payer: str
    token: str | None
    recipient: str
    amount: int

    def as_transfer(self) -> Transfer:
        return Transfer(
            self.tx_hash,
            self.log_index,
            self.block_number,
            self.block_hash,
            self.token,
            self.payer,
            self.recipient,
            self.amount,
        )


@dataclass(frozen=True, slots=True)
class NativeTransaction:
    """A transaction's own movement of the native coin (value > 0 to some address)."""

    tx_hash: str
    from_address: str
    to_address: str
    amount: int


@dataclass(frozen=True, slots=True)
class FullBlock:
    """A block with the value-carrying transactions in it, for native deposits, and the hashes
    of all of them (to tell that traces read by number are of this very block)."""

    ref: BlockRef
    transactions: tuple[NativeTransaction, ...]
    tx_hashes: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- judging


@dataclass(frozen=True, slots=True)
class Resolution:
    """An operator's decision on an exception; `payment_ids` are the payments it covered."""

    exception_type: ExceptionType
    action: ResolutionAction
    note: str | None
    resolved_at: str
    payment_ids: frozenset[str] = frozenset()


# Judging's value types are NamedTuples, immutable like the frozen dataclasses above, but made
# four times faster (a frozen dataclass sets each field through object.__setattr__): a step
# makes several of them for each invoice it judges.
class InvoiceFacts(NamedTuple):
    """What judging needs to know of an invoice, nothing more."""

    amount: Decimal
    tolerance_percent: Decimal = Decimal(0)
    payable_until: int | None = None  # unix seconds; None while a draft
    draft: bool = False
    cancelled: bool = False
    resolutions: tuple[Resolution, ...] = ()


class PaymentFacts(NamedTuple):
    """One recorded payment as judging sees it.

    `option_amount_atomic` is what its payment option asked for: the payment is worth
    `amount_atomic / option_amount_atomic` of the invoice.
    """

    id: str
    amount_atomic: int
    option_amount_atomic: int
    block_timestamp: int
    status: PaymentStatus
    order: tuple = ()  # chain-time order key: (timestamp, network, block, log index)


class ExceptionView(NamedTuple):
    type: ExceptionType
    status: str  # "open" | "resolved"
    resolution_action: ResolutionAction | None = None
    resolution_note: str | None = None
    resolved_at: str | None = None

    def as_dict(self) -> dict:
        return {
            "type": str(self.type),
            "status": self.status,
            "resolution_action": str(self.resolution_action) if self.resolution_action else None,
            "resolution_note": self.resolution_note,
            "resolved_at": self.resolved_at,
        }


class Judgement(NamedTuple):
    status: InvoiceStatus
    payment_state: PaymentState
    share: Share  # of the invoice amount counted
    received_amount: Decimal
    remaining_amount: Decimal
    overpaid_amount: Decimal
    roles: dict[str, Role]
    exception: ExceptionView | None = None
    open_exceptions: tuple[ExceptionType, ...] = ()

    @property
    def received(self) -> Fraction:
        """The share of the invoice amount counted, as a fraction in lowest terms."""
        return Fraction(self.share.num, self.share.den)

    def summary(self) -> dict:
        return {
            "payment_state": str(self.payment_state),
            "received_amount": format_decimal(self.received_amount),
            "remaining_amount": format_decimal(self.remaining_amount),
            "overpaid_amount": format_decimal(self.overpaid_amount),
        }


def judge(invoice: InvoiceFacts, payments: Sequence[PaymentFacts], *, chain_time: int | None) -> Judgement:
    """Derive an invoice's whole payment state from its payments and the chain's time.

    `chain_time` is the timestamp of the last block the watcher processed on the invoice's
    chains (None if it has processed none): the deadline passes only in chain time.

    Exact in integers: each payment is worth `amount_atomic / option_amount_atomic` of the
    invoice, a ratio kept as a numerator and a denominator (`Share`), and the sums shown are
    floors of integer quotients built into Decimals from their digits. No step rounds, and no
    `Fraction` or decimal context is made per payment: this runs for every invoice a step
    touches, thousands of times a second.
    """
    if invoice.amount == 0:
        return _judge_nothing_to_pay(invoice, payments)

    terms = _terms(str(invoice.amount), str(invoice.tolerance_percent))
    threshold = terms.threshold
    roles, received, all_confirmed = _assign_roles(invoice, payments, threshold)
    fully_paid = received.num > 0 and received.at_least(threshold)
    status = _status(
        invoice,
        received.num == 0,
        fully_paid,
        all_confirmed,
        chain_time is not None and invoice.payable_until is not None and chain_time > invoice.payable_until,
    )

    places, amount_num, amount_den = terms.places, terms.amount_num, terms.amount_den
    received_units = received.num * amount_num * terms.scale // (received.den * amount_den)
    overpaid_now = received.num > received.den
    overpaid = (
        _overpaid_shown((received.num - received.den) * amount_num, received.den * amount_den, places)
        if overpaid_now
        else _ZERO
    )

    open_types = _open_payment_exceptions(invoice, roles)
    if overpaid_now and not _resolved_type(invoice, ExceptionType.OVERPAID):
        open_types.append(ExceptionType.OVERPAID)
    if status == InvoiceStatus.UNDERPAID and not _resolved_type(invoice, ExceptionType.UNDERPAID):
        open_types.append(ExceptionType.UNDERPAID)
    remaining_units = terms.amount_units - received_units

    return Judgement(
        status,
        _payment_state(received, fully_paid),
        received,
        _units(received_units, places),
        _units(remaining_units, places) if remaining_units > 0 else terms.zero_units,
        overpaid,
        roles,
        _pick_exception(invoice, open_types) if open_types or invoice.resolutions else None,
        tuple(t for t in EXCEPTION_PRIORITY if t in open_types) if open_types else (),
    )


_ZERO = Decimal(0)


class _Terms(NamedTuple):
    """What judging derives from an invoice's amount and tolerance alone: the share that counts
    as paid (1 - tolerance / 100), the places its sums are shown with, and the amount as an
    exact ratio and as a whole number of display units."""

    threshold: Share
    places: int
    amount_num: int
    amount_den: int
    scale: int
    amount_units: int
    zero_units: Decimal


@lru_cache(maxsize=1024)
def _terms(amount: str, tolerance_percent: str) -> _Terms:
    """Cached by the decimals' text, which keeps their exponent ("25" and "25.00" are equal
    Decimals but show their sums with different places): most invoices share a few amounts and
    tolerances, and a step judges thousands. `threshold` is shared: never changed in place."""
    value = Decimal(amount)
    tolerance_num, tolerance_den = Decimal(tolerance_percent).as_integer_ratio()
    places = display_places(value)
    amount_num, amount_den = value.as_integer_ratio()
    scale = 10**places
    return _Terms(
        Share(100 * tolerance_den - tolerance_num, 100 * tolerance_den),
        places,
        amount_num,
        amount_den,
        scale,
        # The amount in display units is a whole number (it has at most `places` decimals).
        amount_num * scale // amount_den,
        _units(0, places),
    )


@dataclass(slots=True)
class Share:
    """A non-negative share of an invoice, `num / den` (den > 0), exact: the sum of payments'
    `amount_atomic / option_amount_atomic`. Payments of one option share a denominator, so
    adding them is one integer addition; others are put over a common one."""

    num: int
    den: int

    def add(self, num: int, den: int) -> None:
        if den <= 0:
            raise ZeroDivisionError(f"a payment option of {den} atomic units")
        if den == self.den:
            self.num += num
        else:
            total, common = self.num * den + num * self.den, self.den * den
            g = math.gcd(total, common)
            self.num, self.den = total // g, common // g

    def at_least(self, other: Share) -> bool:
        return self.num * other.den >= other.num * self.den


def _judge_nothing_to_pay(invoice: InvoiceFacts, payments: Sequence[PaymentFacts]) -> Judgement:
    """An invoice of 0: settled at creation, nothing can be counted."""
    roles = {p.id: Role.DUPLICATE for p in payments if p.status != PaymentStatus.REVERTED}
    open_types = _open_payment_exceptions(invoice, roles)
    return Judgement(
        InvoiceStatus.DRAFT if invoice.draft else InvoiceStatus.CONFIRMED,
        PaymentState.EXACT,
        Share(0, 1),
        Decimal(0),
        Decimal(0),
        Decimal(0),
        roles,
        _pick_exception(invoice, open_types),
        tuple(t for t in EXCEPTION_PRIORITY if t in open_types),
    )


def _assign_roles(
    invoice: InvoiceFacts, payments: Sequence[PaymentFacts], threshold: Share
) -> tuple[dict[str, Role], Share, bool]:
    """In chain order, each live payment counts until the invoice is paid; after that it is a
    duplicate, and one past the deadline (not accepted late) is late. Returns the roles, the
    share of the invoice received, and whether every counted payment is confirmed."""
    accepted_late = _covered(invoice, ResolutionAction.ACCEPT_LATE_PAYMENT) if invoice.resolutions else ()
    live = [p for p in payments if p.status != PaymentStatus.REVERTED]
    if len(live) > 1:
        live.sort(key=lambda p: (p.order or (p.block_timestamp,), p.id))
    roles: dict[str, Role] = {}
    received = Share(0, 1)
    all_confirmed = True
    payable_until = None if invoice.cancelled else invoice.payable_until
    for p in live:
        if received.num > 0 and received.at_least(threshold):
            roles[p.id] = Role.DUPLICATE
            continue
        if (payable_until is not None and p.block_timestamp <= payable_until) or p.id in accepted_late:
            roles[p.id] = Role.COUNTED
            received.add(p.amount_atomic, p.option_amount_atomic)
            all_confirmed = all_confirmed and p.status == PaymentStatus.CONFIRMED
        else:
            roles[p.id] = Role.LATE
    return roles, received, all_confirmed


def _status(
    invoice: InvoiceFacts, nothing: bool, fully_paid: bool, all_confirmed: bool, deadline_passed: bool
) -> InvoiceStatus:
    """`nothing`: no payment counts towards the invoice."""
    if invoice.draft:
        return InvoiceStatus.DRAFT
    if fully_paid:
        return InvoiceStatus.CONFIRMED if all_confirmed else InvoiceStatus.PAID
    if invoice.cancelled and nothing:
        return InvoiceStatus.CANCELLED
    if not (deadline_passed or invoice.cancelled):
        return InvoiceStatus.PENDING
    if nothing:
        return InvoiceStatus.EXPIRED
    if all_confirmed and _has_action(invoice, ResolutionAction.WRITE_OFF_UNDERPAYMENT):
        return InvoiceStatus.CONFIRMED
    return InvoiceStatus.UNDERPAID


def _payment_state(received: Share, fully_paid: bool) -> PaymentState:
    if received.num == 0:
        return PaymentState.UNPAID
    if received.num > received.den:
        return PaymentState.OVERPAID
    return PaymentState.EXACT if fully_paid else PaymentState.PARTIAL


def _covered(invoice: InvoiceFacts, action: ResolutionAction) -> frozenset[str]:
    ids: set[str] = set()
    for r in invoice.resolutions:
        if r.action == action:
            ids |= r.payment_ids
    return frozenset(ids)


def _has_action(invoice: InvoiceFacts, action: ResolutionAction) -> bool:
    return any(r.action == action for r in invoice.resolutions)


def _resolved_type(invoice: InvoiceFacts, kind: ExceptionType) -> bool:
    return any(r.exception_type == kind for r in invoice.resolutions)


def _open_payment_exceptions(invoice: InvoiceFacts, roles: dict[str, Role]) -> list[ExceptionType]:
    """Late and duplicate payments stay an open exception until a resolution covers them."""
    open_types: list[ExceptionType] = []
    late: list[str] = []
    duplicate: list[str] = []
    for pid, role in roles.items():
        if role != Role.COUNTED:
            (late if role == Role.LATE else duplicate).append(pid)
    if not (late or duplicate):
        return open_types
    covered: dict[ExceptionType, set[str]] = {
        ExceptionType.LATE_PAYMENT: set(),
        ExceptionType.DUPLICATE_PAYMENT: set(),
    }
    for r in invoice.resolutions:
        if r.exception_type in covered:
            covered[r.exception_type] |= r.payment_ids
    for kind, ids in ((ExceptionType.LATE_PAYMENT, late), (ExceptionType.DUPLICATE_PAYMENT, duplicate)):
        if any(pid not in covered[kind] for pid in ids):
            open_types.append(kind)
    return open_types


def _pick_exception(invoice: InvoiceFacts, open_types: list[ExceptionType]) -> ExceptionView | None:
    for kind in EXCEPTION_PRIORITY:
        if kind in open_types:
            return ExceptionView(kind, "open")
    if invoice.resolutions:
        last = invoice.resolutions[-1]
        return ExceptionView(last.exception_type, "resolved", last.action, last.note, last.resolved_at)
    return None


def payments_to_cover(kind: ExceptionType, roles: dict[str, Role]) -> frozenset[str]:
    """The payments a resolution of `kind` takes in: every late or duplicate one it is about."""
    wanted = {ExceptionType.LATE_PAYMENT: Role.LATE, ExceptionType.DUPLICATE_PAYMENT: Role.DUPLICATE}.get(
        kind
    )
    if wanted is None:
        return frozenset()
    return frozenset(pid for pid, role in roles.items() if role == wanted)


# --------------------------------------------------------------------------- amounts


# A decimal as text: ASCII digits only (no "1_000", no other scripts' digits), optional exponent.
DECIMAL_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def exact_decimal(value: object) -> Decimal | None:
    """A decimal string (ASCII digits, no separators), an int or an exact JSON number (parsed as
    Decimal) as a finite Decimal; None for anything else (a float, a bool, "1,000", "NaN")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        return None
    if isinstance(value, str) and not DECIMAL_TEXT.fullmatch(value.strip()):
        return None
    try:
        number = Decimal(value.strip()) if isinstance(value, str) else Decimal(value)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


MAX_USD_RATE = Decimal(10) ** 12
MAX_RATE_PLACES = 36


def usd_rate_problem(rate: Decimal) -> str | None:
    """Why a USD rate cannot be used to quote, or None. Quoting works in exact fractions, so
    a rate's size is bounded: "1e-999999999" would build a number of a billion digits."""
    if not rate.is_finite() or rate <= 0 or rate > MAX_USD_RATE:
        return "must be above 0 and at most 10^12"
    exponent = rate.as_tuple().exponent
    if isinstance(exponent, int) and -exponent > MAX_RATE_PLACES:
        return f"has more than {MAX_RATE_PLACES} decimal places"
    return None


def display_places(amount: Decimal) -> int:
    """Sums are shown with the invoice amount's precision, and never fewer than cents."""
    exponent = amount.as_tuple().exponent
    return max(2, -exponent if isinstance(exponent, int) else 0)


def _units(units: int, places: int) -> Decimal:
    """`units` of 10^-places as a Decimal with `places` places, built from its digits: exact at
    any size."""
    return Decimal(f"{units}E-{places}")


def _overpaid_shown(num: int, den: int, places: int) -> Decimal:
    """`num / den` of the invoice's currency, rounded down like the other sums, but an
    overpayment smaller than the display unit (it opens the overpaid exception) is shown with as
    many more places as it takes to be seen, never as 0: the merchant must see there is
    something to refund."""
    for shown_places in range(places, MAX_OVERPAID_PLACES + 1):
        units = num * 10**shown_places // den
        if units > 0:
            return _units(units, shown_places)
    return _units(num * 10**MAX_OVERPAID_PLACES // den, MAX_OVERPAID_PLACES)


MAX_OVERPAID_PLACES = 36  # the most decimals an asset may have


def quote_atomic(amount: Decimal, rate: Decimal | Fraction, decimals: int) -> int:
    """Atomic units that cover `amount` at `rate` (the invoice currency per unit), exactly, rounded
    up so the merchant is never short."""
    value = Fraction(amount) / Fraction(rate) * 10**decimals
    return math.ceil(value)


def atomic_to_decimal(amount_atomic: int, decimals: int) -> Decimal:
    """Exact decimal value of an atomic amount, at any size (built from a string, not by arithmetic)."""
    return Decimal(f"{amount_atomic}E-{decimals}")


def format_decimal(value: Decimal) -> str:
    """Plain notation, never exponent form: '0', '49.99', '1000000000000000000000'.

    Zero is "0" whatever its precision, as in the contract's examples."""
    if not value:
        return "0"
    return format(value, "f")


def format_units(amount_atomic: int, decimals: int) -> str:
    """An atomic amount as a decimal string with trailing zeros dropped ('1.5', '0', '12').

    Pure integer and string work, so a uint256 of any size is printed exactly."""
    sign = "-" if amount_atomic < 0 else ""
    digits = str(abs(amount_atomic))
    if decimals == 0:
        return sign + digits
    digits = digits.rjust(decimals + 1, "0")
    whole, frac = digits[:-decimals], digits[-decimals:].rstrip("0")
    return sign + (f"{whole}.{frac}" if frac else whole)


# --------------------------------------------------------------------------- ids and times

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]
# A random byte as one character of the id: its low five bits, uniform since 256 is a multiple of 32.
_RANDOM_CHARS = bytes.maketrans(bytes(range(256)), bytes(ord(_CROCKFORD[b & 31]) for b in range(256)))
RANDOM_BYTES_PER_ID = 16


def new_id(prefix: str, now_ms: int, randomness: bytes | None = None) -> str:
    """A ULID with a type prefix: sortable by creation time, unguessable.

    The time comes from the caller's clock; the randomness, unless given, from `secrets` (the
    OS's CSPRNG): an invoice id is the only key to its public payment page, so its 80
    random bits must be unguessable, never `random`'s."""
    return new_ids(prefix, now_ms, 1, randomness)[0]


def new_ids(prefix: str, now_ms: int, count: int, randomness: bytes | None = None) -> list[str]:
    """`count` ids of one millisecond: a step makes thousands (payments, events), so the time
    part is encoded once, and the random part of all of them by one `bytes.translate`: each of
    its 16 characters (80 bits) is a random byte's low five bits (`RANDOM_BYTES_PER_ID` bytes an
    id), not 10 bytes cut into 5-bit groups in Python (1.0 against 0.1 us an id)."""
    # 26 characters: 48 bits of time (10 characters), then 80 of randomness (16).
    head = prefix + "_" + "".join([_CROCKFORD_PAIRS[(now_ms >> s) & 1023] for s in (40, 30, 20, 10, 0)])
    raw = secrets.token_bytes(RANDOM_BYTES_PER_ID * count) if randomness is None else randomness
    if len(raw) != RANDOM_BYTES_PER_ID * count:
        raise ValueError(f"randomness must be {RANDOM_BYTES_PER_ID} bytes per id")
    chars = raw.translate(_RANDOM_CHARS).decode("ascii")
    return [head + chars[k : k + RANDOM_BYTES_PER_ID] for k in range(0, len(chars), RANDOM_BYTES_PER_ID)]


def rfc3339(unix_seconds: float | int | None) -> str | None:
    if unix_seconds is None:
        return None
    return _rfc3339(int(unix_seconds))


@lru_cache(maxsize=4096)
def _rfc3339(unix_seconds: int) -> str:
    """Cached: every payment and event shows a time, and most are of the same few seconds."""
    return datetime.fromtimestamp(unix_seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
