"""Prometheus metrics: one registry per Service (several daemons can share a process, as in
the tests), counters fed by hooks in the follower, the reader and the dispatcher, and gauges
read at scrape time from the followers and the store.

Every name starts with `watcher_`. Counters count events since the daemon started (under `watcher
run` the follower counts in a process of its own and reports them: `relayed`);
gauges that describe stored state (invoices by status, the outbox backlog) are read from the
database on each scrape, so they are right after a restart too.
"""

from __future__ import annotations

import collections
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from . import __version__
from .domain import InvoiceStatus
from .store import Store
from .store.probes import invoice_counts
from .store.retention import store_bytes

log = structlog.get_logger("watcher.metrics")

__all__ = ["CONTENT_TYPE_LATEST", "ChainRow", "Metrics"]

# Webhook attempts: a local receiver answers in milliseconds, a slow one takes up to the 10 s timeout.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# (network, head_block, last_processed_block, lag_blocks, last_head_at unix seconds); None: not known yet.
ChainRow = tuple[str, int | None, int | None, int | None, float | None]


# The counters the follower's process feeds (followproc.CountsRelay has the same hooks as Metrics).
RELAYED_COUNTERS = frozenset(
    {
        "rpc_calls",
        "rpc_errors",
        "rpc_endpoint_failures",
        "rpc_failovers",
        "follower_step_failures",
        "blocks_processed",
        "payments_recorded",
        "pruned",
    }
)


class RpcCounter:
    """`chain.RpcCounts` for one chain: its per-method children are bound once, so counting
    a request is a dict lookup and an increment."""

    def __init__(self, calls: Counter, errors: Counter, network: str) -> None:
        self._calls_of = calls
        self._errors_of = errors
        self.network = network
        self._calls: dict[str, Counter] = {}
        self._errors: dict[str, Counter] = {}

    def called(self, method: str) -> None:
        child = self._calls.get(method)
        if child is None:
            child = self._calls[method] = self._calls_of.labels(self.network, method)
        child.inc()

    def failed(self, method: str) -> None:
        child = self._errors.get(method)
        if child is None:
            child = self._errors[method] = self._errors_of.labels(self.network, method)
        child.inc()


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        Info("watcher_build", "The running watcher's version.", registry=r).info({"version": __version__})
        self.blocks_processed = Counter(
            "watcher_blocks_processed", "Blocks scanned and committed, per chain.", ["network"], registry=r
        )
        self.rpc_calls = Counter(
            "watcher_rpc_calls",
            "JSON-RPC requests sent to the node, by method (a batch counts once).",
            ["network", "method"],
            registry=r,
        )
        self.rpc_errors = Counter(
            "watcher_rpc_errors",
            "Failed node reads, by method (after the transport's retries).",
            ["network", "method"],
            registry=r,
        )
        self.rpc_endpoint_failures = Counter(
            "watcher_rpc_endpoint_failures",
            "Requests an RPC endpoint did not answer (each attempt, before "
            "retries and failover), by kind: timeout, connection, http_429, http_5xx, malformed.",
            ["network", "kind"],
            registry=r,
        )
        self.rpc_failovers = Counter(
            "watcher_rpc_failovers",
            "Switches of a chain's RPC endpoint: failover to the next rpc_url, or back to the first.",
            ["network", "direction"],
            registry=r,
        )
        self.follower_step_failures = Counter(
            "watcher_follower_step_failures",
            "Follower steps that failed and will be retried, by reason: rpc "
            "(the node did not answer or answered an error), chain_changed (what the node said moved under "
            "us, e.g. logs naming another block hash), tracer_missing, other (a bug; see the log).",
            ["network", "reason"],
            registry=r,
        )
        self.ws_heads_connected = Gauge(
            "watcher_ws_heads_connected",
            "1 while a chain's newHeads WebSocket subscription is live, 0 while "
            "it polls only (chains without ws_url are not listed).",
            ["network"],
            registry=r,
        )
        self.payments_recorded = Counter(
            "watcher_payments_recorded",
            "Payment detections recorded, by the role the payment got then "
            "(a payment re-included after a reorg is detected, and counted, again).",
            ["network", "role"],
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "watcher_webhook_deliveries",
            "Webhook delivery attempts by outcome: delivered, retry (failed, "
            "will be retried) or failed (failed, no retry left).",
            ["outcome"],
            registry=r,
        )
        self.webhook_latency = Histogram(
            "watcher_webhook_delivery_duration_seconds",
            "Time from sending a webhook to its answer (or to the error), per attempt.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for outcome in ("delivered", "retry", "failed"):
            self.webhook_deliveries.labels(outcome)  # every outcome shows, at 0 until it happens
        self.pruned = Counter(
            "watcher_pruned",
            "Rows the retention jobs removed, by what: idempotency_keys, events, deliveries, "
            "delivery_attempts, watched_options (addresses of long-closed invoices no longer watched).",
            ["what"],
            registry=r,
        )
        for what in ("idempotency_keys", "events", "deliveries", "delivery_attempts", "watched_options"):
            self.pruned.labels(what)
        self.webhook_paused = Gauge(
            "watcher_webhook_endpoint_paused",
            "1 while an endpoint's circuit breaker holds its deliveries "
            "after repeated failures, 0 once it answers again (endpoint: its URL, credentials masked).",
            ["endpoint"],
            registry=r,
        )

        self.webhook_dispatcher_up = Gauge(
            "watcher_webhook_dispatcher_up",
            "1 while the webhook dispatcher's process runs, 0 while the daemon waits to start it "
            "again after it exited (only under `watcher run`, where it has a process of its own).",
            registry=r,
        )
        self.webhook_dispatcher_exits = Counter(
            "watcher_webhook_dispatcher_exits",
            "Times the webhook dispatcher's process exited on its own (and was started again).",
            registry=r,
        )
        self.follower_process_up = Gauge(
            "watcher_follower_process_up",
            "1 while the followers' process runs, 0 while the daemon waits to start it again after "
            "it exited (only under `watcher run`, where it has a process of its own).",
            registry=r,
        )
        self.follower_process_exits = Counter(
            "watcher_follower_process_exits",
            "Times the followers' process exited on its own (and was started again).",
            registry=r,
        )

    # ------------------------------------------------------------------ hooks

    def rpc(self, network: str) -> RpcCounter:
        return RpcCounter(self.rpc_calls, self.rpc_errors, network)

    def step_failed(self, network: str, reason: str) -> None:
        """`follower.FollowerMetrics`: a step failed (it is retried with backoff)."""
        self.follower_step_failures.labels(network, reason).inc()

    def endpoint_failed(self, network: str, kind: str) -> None:
        self.rpc_endpoint_failures.labels(network, kind).inc()

    def endpoint_switched(self, network: str, direction: str) -> None:
        """`direction`: "over" (to a later rpc_url) or "back" (to an earlier one)."""
        self.rpc_failovers.labels(network, direction).inc()

    def heads_mode(self, network: str, mode: str) -> None:
        self.ws_heads_connected.labels(network).set(1 if mode == "ws" else 0)

    def blocks_applied(self, network: str, blocks: int, payment_roles: Sequence[str]) -> None:
        """`follower.FollowerMetrics`: called after each committed range."""
        self.blocks_processed.labels(network).inc(blocks)
        # Once per role, not per payment: a catch-up step records 25,000 (on the event loop).
        for role, count in collections.Counter(payment_roles).items():
            self.payments_recorded.labels(network, role).inc(count)

    def webhook_attempt(self, outcome: str, seconds: float | None) -> None:
        """`webhooks.Dispatcher`'s hook; `seconds` is None when no request was sent."""
        self.webhook_deliveries.labels(outcome).inc()
        if seconds is not None:
            self.webhook_latency.observe(seconds)

    def rows_pruned(self, what: str, count: int) -> None:
        """`jobs`' hook: a retention job removed `count` rows of `what`."""
        self.pruned.labels(what).inc(count)

    def webhook_dispatcher(self, up: bool) -> None:
        """`dispatchproc.DispatcherProcess`'s hook: its child started (True) or exited on its own."""
        self.webhook_dispatcher_up.set(1 if up else 0)
        if not up:
            self.webhook_dispatcher_exits.inc()

    def follower_process(self, up: bool) -> None:
        """`followproc.FollowerProcess`'s hook: its child started (True) or exited on its own."""
        self.follower_process_up.set(1 if up else 0)
        if not up:
            self.follower_process_exits.inc()

    def relayed(self, counts: Iterable[tuple[str, Sequence[str], float]]) -> None:
        """What the follower's process counted: (counter, its labels, increment) each."""
        for name, labels, amount in counts:
            if name not in RELAYED_COUNTERS:
                raise KeyError(name)
            getattr(self, name).labels(*labels).inc(amount)

    def webhook_breaker(self, endpoint: str, paused: bool) -> None:
        """`webhooks.Dispatcher`'s hook; `endpoint` is already shown without credentials."""
        self.webhook_paused.labels(endpoint).set(1 if paused else 0)

    # ------------------------------------------------------------------ scrape time

    def track(self, store: Store, chains: Callable[[], Iterable[ChainRow]]) -> None:
        """Read the chains' positions and the store's counts on every scrape."""
        for network, *_ in chains():
            self.blocks_processed.labels(network)  # shown at 0 from the start
        self.registry.register(_StateCollector(store, chains))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    def __init__(self, store: Store, chains: Callable[[], Iterable[ChainRow]]) -> None:
        self.store = store
        self.chains = chains

    def collect(self) -> Iterator[Metric]:
        head = GaugeMetricFamily(
            "watcher_head_block", "The node's latest block, as last read.", labels=["network"]
        )
        processed = GaugeMetricFamily(
            "watcher_last_processed_block",
            "The last block scanned and committed (the checkpoint).",
            labels=["network"],
        )
        lag = GaugeMetricFamily(
            "watcher_head_lag_blocks",
            "Blocks between the node's head and the checkpoint.",
            labels=["network"],
        )
        head_at = GaugeMetricFamily(
            "watcher_last_head_timestamp_seconds",
            "When the node's head was last read (unix time).",
            labels=["network"],
        )
        try:
            rows = list(self.chains())
        except sqlite3.Error as exc:
            log.warning("metrics_chains_unavailable", error=str(exc))
            rows = []
        for network, head_block, last_processed, lag_blocks, last_head_at in rows:
            for family, value in (
                (head, head_block),
                (processed, last_processed),
                (lag, lag_blocks),
                (head_at, last_head_at),
            ):
                if value is not None:
                    family.add_metric([network], value)
        yield from (head, processed, lag, head_at)

        # Stored state: if the database does not answer, these series are left out (and
        # /readyz says why) rather than failing the whole scrape.
        try:
            counts = invoice_counts(self.store)
            backlog = self.store.outbox.backlog()
            sizes = store_bytes(self.store)
        except sqlite3.Error as exc:
            log.warning("metrics_store_unavailable", error=str(exc))
            return
        size = GaugeMetricFamily(
            "watcher_store_bytes",
            "The database's size on disk: its pages (database) and its write-ahead log (wal).",
            labels=["file"],
        )
        for file, value in sizes.items():
            size.add_metric([file], value)
        yield size
        invoices = GaugeMetricFamily("watcher_invoices", "Stored invoices by status.", labels=["status"])
        for status in InvoiceStatus:
            invoices.add_metric([status.value], counts.get(status.value, 0))
        yield invoices
        yield GaugeMetricFamily(
            "watcher_webhook_outbox_backlog",
            "Webhook deliveries pending (due now or waiting for a retry).",
            value=backlog,
        )
