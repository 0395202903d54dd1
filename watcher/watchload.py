"""Loading a chain's watch set at start-up without holding the event loop.

At start the follower's WatchSet takes every option of its chain: a million deposit
addresses take seconds to read and index. The API must answer meanwhile, and systemd's
watchdog be pinged, so the load runs once the API serves, on a thread with a read
connection of its own: SQLite releases the GIL while it reads, and building the map holds
it only in the interpreter's switch-interval slices, which the event loop shares. (Batches
on the event loop, yielding between them, took longer for the same rows and held the loop
for each batch: BENCHMARKS.md.) Until the load is over the follower waits, and `/readyz`
says "watch set loading: N of M options".

A store in memory (tests) has no second connection: there the load runs on the loop, in
batches that yield to it.
"""

from __future__ import annotations

import asyncio
import threading

import structlog

from .matching import WatchSet
from .store import Store
from .store.watchrows import count_watch_rows, read_connection, watch_batch

log = structlog.get_logger("watcher.follower")

# Options per read. Each read releases the GIL while SQLite works; smaller batches hand the
# event loop more turns (BENCHMARKS.md: 1,000 against 5,000, the loop's worst delay p99 18 ms
# against 27 ms, for the same load time).
BATCH = 1_000


def _load(path: str, watch: WatchSet, stop: threading.Event) -> None:
    """In a thread: every option after the watch set's last, on a read-only connection of its own."""
    with read_connection(path) as conn:
        total = count_watch_rows(conn, watch.network)
        done = 0
        watch.progress = (done, total)
        while not stop.is_set() and (rows := watch_batch(conn, watch.network, watch.after_rowid, BATCH)):
            done += watch.add(rows)
            watch.progress = (done, max(total, done))  # options created meanwhile count as they come


async def load_watch_set(watch: WatchSet, store: Store) -> None:
    """Fill `watch` with every option of its chain, then mark it loaded."""
    if store.path == ":memory:":
        total = count_watch_rows(store.db.conn, watch.network)
        watch.progress = (0, total)
        while rows := watch_batch(store.db.conn, watch.network, watch.after_rowid, BATCH):
            loaded = watch.progress[0] + watch.add(rows)
            watch.progress = (loaded, max(total, loaded))
            await asyncio.sleep(0)
    else:
        stop = threading.Event()
        try:
            await asyncio.to_thread(_load, store.path, watch, stop)
        except asyncio.CancelledError:
            stop.set()  # the thread ends at its next batch
            raise
    watch.refresh(store)  # options created since the thread's last read, on the loop: few
    watch.loaded = True
    log.info(
        "watch_set_loaded",
        network=watch.network,
        addresses=len(watch.addresses),
        payment_ids=len(watch.payment_ids),
    )
