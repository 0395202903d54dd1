"""Periodic work on apscheduler 3.x: the expiry sweep and the retention prunes.

Expiry is also decided every time a chain's blocks are applied; the sweep covers invoices
whose deadline passes between two blocks of a quiet chain and those of chains that
processed nothing new.

Retention (`[retention]`): each prune job removes at most one batch per run (see
store.retention), so a first run on an old database is worked off over several runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import structlog

from .matching import WatchSet
from .store import Store
from .store.retention import closed_watch_entries, prune_delivered_events, prune_idempotency_keys

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from .config import RetentionSettings

log = structlog.get_logger("watcher.jobs")

PRUNE_INTERVAL = 30.0
OnPruned = Callable[[str, int], None]


async def expire_sweep(store: Store) -> int:
    """A coroutine on purpose: apscheduler runs it on the event loop, which hands the change to
    the store's writer thread, one change at a time with every other write."""
    changed = await store.write(store.expire_due)
    if changed:
        log.info("invoices_expired", count=changed)
    return changed


async def prune_idempotency(
    store: Store, hours: int, clock: Callable[[], float], on_pruned: OnPruned | None
) -> int:
    removed = await store.write(prune_idempotency_keys, store, clock() - hours * 3600)
    if removed:
        log.info("idempotency_keys_pruned", count=removed)
        if on_pruned is not None:
            on_pruned("idempotency_keys", removed)
    return removed


async def prune_events(
    store: Store, days: int, clock: Callable[[], float], on_pruned: OnPruned | None
) -> int:
    events, deliveries, attempts = await store.write(prune_delivered_events, store, clock() - days * 86400)
    if events:
        log.info("delivered_events_pruned", events=events, deliveries=deliveries, attempts=attempts)
        if on_pruned is not None:
            for what, count in (
                ("events", events),
                ("deliveries", deliveries),
                ("delivery_attempts", attempts),
            ):
                on_pruned(what, count)
    return events


class Unwatcher:
    """Drops the options of long-closed invoices from each chain's watch set, one batch per chain
    per run, walking the closed invoices in the order they closed (a mark per chain: each run
    goes on where the last stopped; after a restart, which loads every option, from the start)."""

    def __init__(
        self,
        store: Store,
        watch_sets: Callable[[], Mapping[str, WatchSet]],
        days: int,
        clock: Callable[[], float],
        on_pruned: OnPruned | None,
    ) -> None:
        self.store = store
        self.watch_sets = watch_sets
        self.days = days
        self.clock = clock
        self.on_pruned = on_pruned
        self.marks: dict[str, tuple[str, int]] = {}

    async def run(self) -> int:
        cutoff = self.clock() - self.days * 86400
        total = 0
        for network, watch in self.watch_sets().items():
            rows = closed_watch_entries(self.store, network, cutoff, self.marks.get(network, ("", 0)))
            if not rows:
                continue
            self.marks[network] = (rows[-1]["updated_at"], rows[-1]["rowid"])
            forgotten = watch.forget(rows)
            if forgotten:
                total += forgotten
                log.info("closed_invoices_unwatched", network=network, options=forgotten, days=self.days)
        if total and self.on_pruned is not None:
            self.on_pruned("watched_options", total)
        return total


def make_scheduler(
    store: Store,
    *,
    expiry_interval: float = 5.0,
    retention: RetentionSettings | None = None,
    clock: Callable[[], float] = time.time,
    on_pruned: OnPruned | None = None,
    prune_interval: float = PRUNE_INTERVAL,
    watch_sets: Callable[[], Mapping[str, WatchSet]] | None = None,
) -> AsyncIOScheduler:
    """`watch_sets`: each chain's WatchSet (the followers'), for `watch_closed_invoices_days`."""
    from apscheduler.schedulers.asyncio import AsyncIOScheduler  # once the API serves, not before

    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(
        expire_sweep,
        "interval",
        seconds=expiry_interval,
        args=[store],
        id="expiry",
        max_instances=1,
        coalesce=True,
    )
    if retention is not None:
        scheduler.add_job(
            prune_idempotency,
            "interval",
            seconds=prune_interval,
            id="prune_idempotency_keys",
            args=[store, retention.idempotency_keys_hours, clock, on_pruned],
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            prune_events,
            "interval",
            seconds=prune_interval,
            id="prune_delivered_events",
            args=[store, retention.delivered_events_days, clock, on_pruned],
            max_instances=1,
            coalesce=True,
        )
        if retention.watch_closed_invoices_days and watch_sets is not None:
            unwatch = Unwatcher(store, watch_sets, retention.watch_closed_invoices_days, clock, on_pruned)
            scheduler.add_job(
                unwatch.run,
                "interval",
                seconds=prune_interval,
                id="unwatch_closed_invoices",
                max_instances=1,
                coalesce=True,
            )
    return scheduler
