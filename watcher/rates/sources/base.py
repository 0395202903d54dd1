"""What every source answers, and the two ways it can fail."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

# A live value must be a price a quote can use: bounded like a configured usd_rate, so a feed
# gone mad cannot make an invoice of 10^80 atomic units (or of none).
MAX_VALUE = Fraction(10**12)
MIN_VALUE = Fraction(1, 10**18)


@dataclass(frozen=True)
class Reading:
    """An accepted answer: its value, when the source says it was updated (unix seconds: the
    feed's `updatedAt` in chain time, or when an HTTP source answered), and how old it was when
    read (chain time for a feed), at `read_at` on the wall clock."""

    value: Fraction
    updated_at: float
    age: float
    read_at: float


class Refused(Exception):
    """The source answered, but with something that must not quote (stale, incomplete, not
    positive, the sequencer down). Its earlier answer is withdrawn too: the source says
    something is wrong now."""


class SourceFailed(Exception):
    """No usable answer this time (no node or server answered, a redirect, garbage): tried again
    with backoff; the last accepted answer quotes until it is older than max_age_seconds."""


class Source(Protocol):
    kind: str

    async def read(self) -> Reading: ...

    async def close(self) -> None: ...


def value_problem(value: Fraction) -> str | None:
    """Why a value read from a source cannot be a price, or None."""
    if value <= 0:
        return f"the answer {float(value):g} is not positive"
    if value > MAX_VALUE:
        return f"the answer {float(value):g} is above 10^12"
    if value < MIN_VALUE:
        return f"the answer {float(value):g} is below 10^-18"
    return None
