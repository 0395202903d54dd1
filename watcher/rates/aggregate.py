"""A pair's value from its sources' answers: the median of those that answer, refused when the
highest and the lowest differ by more than 2% of it (contract section 9).

Pure, with no clock and no I/O, so the rule is a table test; the refresher hands it each
source's usable value at a moment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

# Sources of one pair that differ by more than this share of their median do not quote: one
# of them is wrong, and we cannot tell which.
MAX_DISAGREEMENT = Fraction(2, 100)


@dataclass(frozen=True)
class SourceView:
    """One source at a moment: its usable value (None when it has none, with the reason) and
    the age of the answer the value comes from."""

    label: str
    kind: str  # "chainlink" or "http"
    value: Fraction | None
    age: float | None
    reason: str | None = None


@dataclass(frozen=True)
class PairValue:
    """A pair at a moment: its value, or why it has none."""

    pair: str
    value: Fraction | None
    kinds: tuple[str, ...]  # the kinds of the sources used, in config order, each once
    age: float | None  # the oldest answer used
    reason: str | None  # why it does not quote (None when it does)

    @property
    def quotable(self) -> bool:
        return self.value is not None


def median(values: Sequence[Fraction]) -> Fraction:
    """The middle value, or the mean of the middle two for an even count: exact."""
    if not values:
        raise ValueError("the median of nothing")
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def disagreement(values: Sequence[Fraction], middle: Fraction | None = None) -> Fraction:
    """How far apart the answers are: (highest - lowest) / median (0 for one answer)."""
    if len(values) == 1:
        return Fraction(0)
    return (max(values) - min(values)) / (median(values) if middle is None else middle)


def percent(share: Fraction) -> str:
    """A share as a percentage with two decimals, for messages ("5.26%")."""
    return f"{float(share * 100):.2f}%"


def combine(pair: str, sources: Sequence[SourceView]) -> PairValue:
    answering = [s for s in sources if s.value is not None]
    if not answering:
        why = "; ".join(f"{s.label}: {s.reason or 'no answer'}" for s in sources)
        return PairValue(pair, None, (), None, f"no source has a usable answer ({why})")
    values = [s.value for s in answering if s.value is not None]
    middle = median(values)
    spread = disagreement(values, middle)
    if spread > MAX_DISAGREEMENT:
        shown = ", ".join(f"{s.label}: {float(s.value or 0):g}" for s in answering)
        return PairValue(
            pair,
            None,
            (),
            None,
            f"the sources disagree by {percent(spread)} of their median, more than "
            f"{percent(MAX_DISAGREEMENT)} ({shown})",
        )
    ages = [s.age for s in answering if s.age is not None]
    kinds = tuple(dict.fromkeys(s.kind for s in answering))
    return PairValue(pair, middle, kinds, max(ages) if ages else None, None)
