"""The rates' Prometheus series: each pair's age and whether it quotes (read at scrape time
from the book), each source's errors, and the assets a pair left out of new invoices."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from .book import RateBook


class RateMetrics:
    def __init__(self, registry: CollectorRegistry, book: RateBook) -> None:
        self.source_errors = Counter(
            "watcher_rate_source_errors",
            "Reads of a [[rates]] source that gave no usable answer, by pair, source (rates[i]), kind and "
            "outcome: failed (no answer, garbage; retried with backoff) or refused (stale, incomplete, not "
            "positive, sequencer down).",
            ["pair", "source", "kind", "outcome"],
            registry=registry,
        )
        self.left_out = Counter(
            "watcher_rate_assets_left_out",
            "Assets left out of a new invoice or session because a pair could not quote.",
            ["pair"],
            registry=registry,
        )
        for state in book.states:
            for outcome in ("failed", "refused"):
                self.source_errors.labels(
                    state.settings.pair, f"rates[{state.index}]", state.source.kind, outcome
                )
        for pair in book.pairs:
            self.left_out.labels(pair)
        registry.register(_RateCollector(book))
        book.on_source_error = self.source_error
        book.on_left_out = self.asset_left_out

    def source_error(self, pair: str, index: int, kind: str, outcome: str) -> None:
        self.source_errors.labels(pair, f"rates[{index}]", kind, outcome).inc()

    def asset_left_out(self, pair: str) -> None:
        self.left_out.labels(pair).inc()


class _RateCollector:
    def __init__(self, book: RateBook) -> None:
        self.book = book

    def collect(self) -> Iterator[Metric]:
        now = self.book.clock()
        quotable = GaugeMetricFamily(
            "watcher_rate_quotable", "1 while a pair quotes, 0 while it cannot.", labels=["pair"]
        )
        age = GaugeMetricFamily(
            "watcher_rate_age_seconds",
            "Age of the oldest source answer a quoting pair uses (absent while it cannot quote).",
            labels=["pair"],
        )
        source_age = GaugeMetricFamily(
            "watcher_rate_source_age_seconds",
            "Age of each source's last accepted answer (absent before its first).",
            labels=["pair", "source", "kind"],
        )
        for pair, value in self.book.pair_values(now).items():
            quotable.add_metric([pair], 1 if value.quotable else 0)
            if value.quotable and value.age is not None:
                age.add_metric([pair], value.age)
        for state in self.book.states:
            if (seconds := state.age(now)) is not None:
                source_age.add_metric(
                    [state.settings.pair, f"rates[{state.index}]", state.source.kind], seconds
                )
        yield from (quotable, age, source_age)
