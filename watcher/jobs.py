"""Periodic work on apscheduler 3.x: the expiry sweep and the retention prunes.

Expiry is also decided every time a chain's blocks are applied; the sweep covers invoices
whose deadline passes between two blocks of a quiet chain and those of chains that
processed nothing new.

A job that finds the store's write lock held (a follower's step, the dispatcher's records) gives
way: it skips that run instead of waiting for the lock, for a minute at most (GivingWay).

Retention (`[retention]`): each prune job removes at most one batch per run (see
store.retention), so a first run on an old database is worked off over several runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from .matching import WatchSet
from .store import Store
from .store.engine import WriteLockBusy
from .store.retention import closed_watch_entries, prune_delivered_events, prune_idempotency_keys

if TYPE_CHECKING:
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    from .config import RetentionSettings

log = structlog.get_logger("watcher.jobs")

PRUNE_INTERVAL = 30.0
# How long a job gives way at most: after that long without a run done, it waits for the lock
# as any writer does, so a catch-up holding the lock for an hour delays a sweep by a minute.
GIVE_WAY_AT_MOST_S = 60.0
OnPruned = Callable[[str, int], None]
T = TypeVar("T")


class GivingWay:
    """One periodic job's writes, which give way to the other writers: a write that finds the
    lock held skips the run (the job comes back at its next interval) instead of waiting.

    Waiting is not free for the API: a waiting writer looks for the lock every millisecond
    (store/engine.py), from a thread of the API's process, and during a catch-up a follower's
    steps hold the lock nearly all the time: a thousand wake-ups a second, each taking the
    process's GIL from the loop that answers requests. On the chain whose steps hold the
    lock nothing is late for that: each step expires that chain's invoices past their deadline."""

    def __init__(
        self,
        store: Store,
        job: str,
        clock: Callable[[], float] = time.monotonic,
        at_most: float = GIVE_WAY_AT_MOST_S,
    ) -> None:
        self.store = store
        self.job = job
        self.clock = clock
        self.at_most = at_most
        self.done_at = clock()

    async def write(self, change: Callable[..., T], *args: Any) -> T | None:
        """`change(*args)` on the store's writer thread, or None if it gave way."""
        try:
            if self.clock() - self.done_at < self.at_most:
                result = await self.store.write_if_free(change, *args)
            else:
                result = await self.store.write(change, *args)
        except WriteLockBusy:
            log.debug("job_gave_way", job=self.job, since_done_s=round(self.clock() - self.done_at, 1))
            return None
        self.done_at = self.clock()
        return result


async def expire_sweep(way: GivingWay) -> int:
    """A coroutine on purpose: apscheduler runs it on the event loop, which hands the change to
    the store's writer thread, one change at a time with every other write."""
    changed = await way.write(way.store.expire_due) or 0
    if changed:
        log.info("invoices_expired", count=changed)
    return changed


async def prune_idempotency(
    way: GivingWay, hours: int, clock: Callable[[], float], on_pruned: OnPruned | None
) -> int:
    removed = await way.write(prune_idempotency_keys, way.store, clock() - hours * 3600) or 0
    if removed:
        log.info("idempotency_keys_pruned", count=removed)
        if on_pruned is not None:
            on_pruned("idempotency_keys", removed)
    return removed


async def prune_events(
    way: GivingWay, days: int, clock: Callable[[], float], on_pruned: OnPruned | None
) -> int:
    pruned = await way.write(prune_delivered_events, way.store, clock() - days * 86400)
    events, deliveries, attempts = pruned or (0, 0, 0)
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
        args=[GivingWay(store, "expiry")],
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
            args=[
                GivingWay(store, "prune_idempotency_keys"),
                retention.idempotency_keys_hours,
                clock,
                on_pruned,
            ],
            max_instances=1,
            coalesce=True,
        )
        scheduler.add_job(
            prune_events,
            "interval",
            seconds=prune_interval,
            id="prune_delivered_events",
            args=[
                GivingWay(store, "prune_delivered_events"),
                retention.delivered_events_days,
                clock,
                on_pruned,
            ],
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
