"""What one unit of an asset is worth in an invoice's currency, and the atomic amount that pays
an invoice at that rate.

An asset's price comes, in this order, from the request's `quote_rates`, from live `[[rates]]`
pairs, or from its fixed `usd_rate`; an asset with live pairs never falls back to `usd_rate`.
Pairs chain: an EUR invoice of an asset priced in USD goes through EUR/USD. The path through
the pairs is chosen once from the configuration (fewest pairs, then config order), never from
which pairs quote at the moment, so a quote is always made the same way. Everything is exact
(`Fraction`); the amount is rounded up, so the merchant is never short.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction
from typing import Any

from ..domain import quote_atomic
from .aggregate import PairValue

USD = "USD"
# quote_rate is shown exactly when it has at most this many decimal places, else rounded to
# RATE_DIGITS significant digits (a cross rate such as 2000 / 1.08 never ends); the atomic
# amount is computed from the exact fraction either way.
MAX_EXACT_PLACES = 40
RATE_DIGITS = 20

Path = tuple[tuple[str, bool], ...]  # (pair, inverted) steps

__all__ = ["USD", "NoQuote", "Quote", "RateGraph", "format_rate", "price", "quote_atomic", "rate_graph"]


@dataclass(frozen=True)
class Quote:
    """Invoice currency per unit of the asset, and where that came from: `request`, `config`,
    or the kinds of the sources used (`chainlink`, `chainlink+http`, `config+chainlink`)."""

    rate: Fraction
    source: str


@dataclass(frozen=True)
class NoQuote:
    """Why an asset cannot be quoted now; `pairs` names the live pairs at fault, if any."""

    reason: str
    pairs: tuple[str, ...] = ()


class RateGraph:
    """The configured pairs as a graph of currencies and asset symbols (upper case)."""

    def __init__(self, pairs: Iterable[str], assets: Iterable[str]) -> None:
        self.pairs = tuple(dict.fromkeys(pairs))
        self.assets = frozenset(a.upper() for a in assets)
        self._edges: dict[str, list[tuple[str, str, bool]]] = {}
        for pair in self.pairs:
            base, quote = pair.split("/")
            self._edges.setdefault(base, []).append((quote, pair, False))
            self._edges.setdefault(quote, []).append((base, pair, True))
        self.currencies = frozenset(
            {USD} | {node for node in self._reachable(USD) if node not in self.assets}
        )

    def live(self, symbol: str) -> bool:
        """Whether the asset has live pairs (and so never uses its usd_rate)."""
        return any(p.split("/")[0] == symbol.upper() for p in self.pairs)

    def _reachable(self, start: str) -> set[str]:
        seen, todo = {start}, [start]
        while todo:
            for nxt, _, _ in self._edges.get(todo.pop(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    def path(self, start: str, goal: str) -> Path | None:
        """The fewest pairs from `start` to `goal` (breadth first, config order), or None."""
        start, goal = start.upper(), goal.upper()
        came: dict[str, tuple[str, str, bool] | None] = {start: None}
        todo = deque([start])
        while todo:
            node = todo.popleft()
            if node == goal:
                steps: list[tuple[str, bool]] = []
                while (step := came[node]) is not None:
                    node, pair, inverted = step
                    steps.append((pair, inverted))
                return tuple(reversed(steps))
            for nxt, pair, inverted in self._edges.get(node, []):
                if nxt not in came:
                    came[nxt] = (node, pair, inverted)
                    todo.append(nxt)
        return None


def rate_graph(settings: Any) -> RateGraph:
    """The configured pairs (`settings.rates`) among the configured assets (`settings.chains`)."""
    return RateGraph((r.pair for r in settings.rates), (a.symbol for c in settings.chains for a in c.assets))


def price(
    graph: RateGraph,
    symbol: str,
    usd_rate: Decimal | None,
    currency: str,
    pairs: Mapping[str, PairValue],
) -> Quote | NoQuote:
    """One unit of `symbol` in `currency`, from the pairs' values now (`pairs`), or why not."""
    if graph.live(symbol):
        start, rate, kinds = symbol.upper(), Fraction(1), []
    elif usd_rate is not None:
        start, rate, kinds = USD, Fraction(usd_rate), ["config"]
    else:
        return NoQuote(f"{symbol} has no usd_rate and no [[rates]] pair: give quote_rates")
    path = graph.path(start, currency)
    if path is None:
        return NoQuote(f"no [[rates]] pair leads from {start} to {currency.upper()}")
    for pair, inverted in path:
        value = pairs.get(pair)
        if value is None or value.value is None:
            return NoQuote(f"{pair}: {value.reason if value else 'not read yet'}", (pair,))
        rate = rate / value.value if inverted else rate * value.value
        kinds += value.kinds
    return Quote(rate, "+".join(dict.fromkeys(kinds)) or "config")


def format_rate(rate: Fraction) -> str:
    """A rate as a plain decimal string: exact when it ends within MAX_EXACT_PLACES places."""
    denominator, twos, fives = rate.denominator, 0, 0
    while denominator % 2 == 0:
        denominator, twos = denominator // 2, twos + 1
    while denominator % 5 == 0:
        denominator, fives = denominator // 5, fives + 1
    places = max(twos, fives)
    if denominator == 1 and places <= MAX_EXACT_PLACES:
        scaled = rate.numerator * 10**places // rate.denominator
        text = str(abs(scaled)).rjust(places + 1, "0")
        whole, frac = (text[:-places], text[-places:].rstrip("0")) if places else (text, "")
        return ("-" if scaled < 0 else "") + (f"{whole}.{frac}" if frac else whole)
    with localcontext() as ctx:
        ctx.prec = RATE_DIGITS
        value = Decimal(rate.numerator) / Decimal(rate.denominator)
    return format(value, "f").rstrip("0").rstrip(".") if "." in format(value, "f") else format(value, "f")
