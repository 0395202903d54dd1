"""Periodic work on apscheduler 3.x: the expiry sweep.

Expiry is also decided every time a chain's blocks are applied; the sweep covers invoices
whose deadline passes between two blocks of a quiet chain and those of chains that
processed nothing new.
"""

from __future__ import annotations

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from .store import Store

log = structlog.get_logger("watcher.jobs")


async def expire_sweep(store: Store) -> int:
    """A coroutine on purpose: it runs on the event loop, like every other store call,
    never in apscheduler's worker thread where it could interleave with their transactions."""
    changed = store.expire_due()
    if changed:
        log.info("invoices_expired", count=changed)
    return changed


def make_scheduler(store: Store, *, expiry_interval: float = 5.0) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone="UTC")
    scheduler.add_job(
        expire_sweep, "interval", seconds=expiry_interval, args=[store], id="expiry",
        max_instances=1, coalesce=True,
    )
    return scheduler
