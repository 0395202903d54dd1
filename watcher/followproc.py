"""The chains' followers in a process of their own, beside the API's.

Why: a catch-up step decodes thousands of logs, matches them and judges their invoices. In the
daemon's process that work held the GIL the API needs: the status route's p99 rose from 3 ms to
58-112 ms during a catch-up, and the catch-up itself waited behind the API's requests
(BENCHMARKS.md, issue 13). In a process of its own the follower has a core and a GIL of its own.
It needs nothing of the daemon's but the database (SQLite shares it between processes: WAL, a
busy timeout, `BEGIN IMMEDIATE`) and the chains' settings; the API learns of new invoices from
the database too, since each step reads the options created since its last look.

The daemon (`FollowerProcess`, on its loop) supervises `python -m watcher.followproc` as
childproc.py says, and talks to it in JSON lines:

- to the child: first `{"start": {...}}` (the database, the chains' settings, the log settings,
  what logs must hide), then `{"wake": network}` when a newHeads subscription (kept in the
  daemon's process) sees a block, and `{"log": [format, level]}` on a reload. End of input stops
  it: its steps get `STOP_GRACE` to end, then are cancelled (a step's transaction is whole or
  absent), and it exits 0.
- from the child, every `REPORT_EVERY` s at most: `{"status": {network: {...}}}` when a chain's
  state changed (its head, last error, why it is stopped, the watch set's loading, the node it
  reads), `{"counts": [[counter, labels, n], ...]}` for the daemon's metrics, `{"changed":
  [invoice ids]}` and `{"blocks": [networks]}` for the payment page's live feed, and
  `{"queued": 1}` when deliveries were queued (the daemon wakes the webhook dispatcher).

While no child runs (it exited, and waits to be started again), each chain reads as stopped in
`/readyz`, with the reason.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import childproc, clienttls

# In the child (`python -m watcher.followproc`), aiohttp is imported without reading the CA
# bundle: a thread builds its TLS contexts while the watch sets load. Elsewhere it is imported
# already, and this changes nothing.
clienttls.import_aiohttp()


from .chainwiring import FollowedChain  # noqa: E402
from .follower import FollowerStatus, reorg_depth  # noqa: E402
from .redaction import strip_credentials  # noqa: E402

log = childproc.logger("watcher.followproc")

NAME = "follower_process"
# How long the child's steps get to end when the daemon stops, before they are cancelled.
STOP_GRACE = 1.0
# ... and how long the daemon waits for the child to exit (a step's last write, the writer
# thread's shutdown) before it kills it. Well inside the unit's TimeoutStopSec=30s.
STOP_TIMEOUT = 10.0
# The child reports at most this often (statuses, counts, the live feed's changes).
REPORT_EVERY = 0.05
# How long a step's write waits for another process's (the API's, the dispatcher's) write lock.
STEP_BUSY_TIMEOUT_MS = 60_000
# Invoice ids per `changed` line (a step of 5,000 payments changes as many invoices).
CHANGED_PER_LINE = 5_000
# The child says it is alive at least this often; the daemon kills one silent for SILENCE_TIMEOUT.
HEARTBEAT_SECONDS = 5.0
SILENCE_TIMEOUT = 60.0


@dataclass
class RemoteWatch:
    """A chain's watch set as the daemon's process sees it: whether it is loaded, and how far."""

    loaded: bool = False
    progress: tuple[int, int] = (0, 0)


class RemoteFollower:
    """What the daemon's process reads of a follower that runs in the followers' process: what
    `/readyz`, `/v1/chains`, the metrics and `systemctl status` read of a `Follower`."""

    def __init__(self, chain: FollowedChain, wake: Callable[[str], None]) -> None:
        self.network = chain.name
        self.depth = reorg_depth(chain.confirmations)
        self.poll_interval = chain.poll_interval_seconds
        self.status = FollowerStatus()
        self.watch = RemoteWatch()
        self.rpc_url: str | None = None  # the node it reads now (after a failover, not the first)
        self._wake = wake

    def wake(self) -> None:
        self._wake(self.network)

    def update(self, state: dict[str, Any]) -> None:
        status = self.status
        status.head_block = state["head_block"]
        status.last_head_at = state["last_head_at"]
        status.last_error = state["last_error"]
        status.stopped = state["stopped"]
        self.watch.loaded = bool(state["loaded"])
        self.watch.progress = (int(state["progress"][0]), int(state["progress"][1]))
        self.rpc_url = state["rpc_url"]

    def gone(self, why: str) -> None:
        """No child runs: the chain is not followed until one does."""
        self.status.stopped = self.status.last_error = why


class FollowerProcess:
    """The daemon's side: starts the child, wakes its followers, passes on what it reports (the
    chains' state, the metrics, the live feed's changes) and starts it again when it dies."""

    def __init__(
        self,
        database: str,
        chains: Sequence[FollowedChain],
        *,
        log_choice: tuple[str | None, str],
        rpc_timeout: float,
        hidden: Sequence[str] = (),
        urls: Sequence[str] = (),
        secret_env: Iterable[str] = (),
        checkout_base_url: str | None = None,
        unwatch_days: int | None = None,
        prune_interval: float = 3600.0,
        on_counts: Callable[[Iterable[tuple[str, Sequence[str], float]]], None] | None = None,
        on_invoice_changed: Callable[[str], None] | None = None,
        on_blocks_applied: Callable[[str], None] | None = None,
        on_queued: Callable[[], None] | None = None,
        on_running: Callable[[bool], None] | None = None,
        restart_delays: Sequence[float] = childproc.RESTART_DELAYS,
        stop_timeout: float = STOP_TIMEOUT,
        warm: childproc.WarmChildren | None = None,
        silence_timeout: float = SILENCE_TIMEOUT,
    ) -> None:
        """``unwatch_days``: the retention's `watch_closed_invoices_days` (the child drops those
        options from its watch sets every ``prune_interval`` s). The ``on_*`` hooks hear what
        the child reports; ``on_invoice_changed`` and ``on_blocks_applied`` are the store's
        listeners (the payment page's feed), called as if the daemon's own store had written."""
        self.database = database
        self.chains = list(chains)
        self.log_choice = log_choice
        self.rpc_timeout = rpc_timeout
        self.hidden = list(hidden)
        self.urls = list(urls)
        self.checkout_base_url = checkout_base_url
        self.unwatch_days = unwatch_days
        self.prune_interval = prune_interval
        self.on_counts = on_counts
        self.on_invoice_changed = on_invoice_changed
        self.on_blocks_applied = on_blocks_applied
        self.on_queued = on_queued
        self.released = False  # the daemon's checks of the nodes passed: the followers may step
        self.followers = {c.name: RemoteFollower(c, self.wake) for c in self.chains}
        for follower in self.followers.values():
            follower.gone("the followers' process has not started yet")
        self.child = childproc.ChildProcess(
            "watcher.followproc",
            NAME,
            start=self._start_message,
            on_report=self._take,
            on_running=on_running,
            on_gone=self._gone,
            secret_env=secret_env,
            restart_delays=restart_delays,
            stop_timeout=stop_timeout,
            warm=warm,
            silence_timeout=silence_timeout,
        )

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self.child.process

    def release(self) -> None:
        """The nodes serve the configured chains (the daemon checked their chain ids and
        geneses): the followers may step. Until then a child only imports and loads its watch
        sets, so that its start-up overlaps the daemon's."""
        self.released = True
        self.child.send({"go": 1})

    def wake(self, network: str) -> None:
        """A new head on `network` (newHeads): its follower looks now, not at its next poll."""
        self.child.send({"wake": network})

    def set_logging(self, log_choice: tuple[str | None, str]) -> None:
        """The log format and level (on reload)."""
        self.log_choice = log_choice
        self.child.send({"log": list(log_choice)})

    def set_hidden(self, hidden: Sequence[str], urls: Sequence[str], secret_env: Iterable[str]) -> None:
        """What logs must hide and the variables that hold secrets now (on reload)."""
        self.hidden = sorted({*self.hidden, *hidden})
        self.urls = sorted({*self.urls, *urls})
        self.child.secret_env |= set(secret_env)
        self.child.send({"hidden": self.hidden, "urls": self.urls})

    async def run(self, stopping: asyncio.Event) -> None:
        await self.child.run(stopping)

    async def close(self) -> None:
        await self.child.close()

    # ------------------------------------------------------------------ the child's reports

    def _start_message(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "chains": [dataclasses.asdict(c) for c in self.chains],
            "rpc_timeout": self.rpc_timeout,
            "go": self.released,
            "log_format": self.log_choice[0],
            "log_level": self.log_choice[1],
            "hidden": self.hidden,
            "urls": self.urls,
            "checkout_base_url": self.checkout_base_url,
            "report_changes": self.on_invoice_changed is not None or self.on_blocks_applied is not None,
            "unwatch_days": self.unwatch_days,
            "prune_interval": self.prune_interval,
        }

    def _take(self, report: dict[str, Any]) -> None:
        for network, state in report.get("status", {}).items():
            follower = self.followers.get(network)
            if follower is not None:
                follower.update(state)
        if "counts" in report and self.on_counts is not None:
            self.on_counts(
                (str(name), [str(v) for v in labels], float(n)) for name, labels, n in report["counts"]
            )
        if self.on_invoice_changed is not None:
            for invoice_id in report.get("changed", ()):
                self.on_invoice_changed(str(invoice_id))
        if self.on_blocks_applied is not None:
            for network in report.get("blocks", ()):
                self.on_blocks_applied(str(network))
        if report.get("queued") and self.on_queued is not None:
            self.on_queued()

    def _gone(self, code: int | None, restart_in: float) -> None:
        why = (
            "the followers' process stopped"
            if not restart_in
            else f"the followers' process exited (code {code}); it starts again in {restart_in:g} s"
        )
        for follower in self.followers.values():
            follower.gone(why)


# ---------------------------------------------------------------------- the child


class CountsRelay:
    """The child's metrics: the hooks of `metrics.Metrics` a follower and its reader call,
    counted here and sent to the daemon's metrics in one line per report."""

    def __init__(self, due: Callable[[], None]) -> None:
        self.counts: dict[tuple[str, tuple[str, ...]], float] = collections.defaultdict(float)
        self._due = due

    def add(self, counter: str, labels: tuple[str, ...], amount: float = 1) -> None:
        self.counts[counter, labels] += amount
        self._due()

    def take(self) -> list[tuple[str, tuple[str, ...], float]]:
        counts, self.counts = self.counts, collections.defaultdict(float)
        return [(name, labels, n) for (name, labels), n in counts.items()]

    def rpc(self, network: str) -> _RpcRelay:
        return _RpcRelay(self, network)

    def endpoint_failed(self, network: str, kind: str) -> None:
        self.add("rpc_endpoint_failures", (network, kind))

    def endpoint_switched(self, network: str, direction: str) -> None:
        self.add("rpc_failovers", (network, direction))

    def step_failed(self, network: str, reason: str) -> None:
        self.add("follower_step_failures", (network, reason))

    def blocks_applied(self, network: str, blocks: int, payment_roles: Sequence[str]) -> None:
        self.add("blocks_processed", (network,), blocks)
        for role, count in collections.Counter(payment_roles).items():
            self.add("payments_recorded", (network, role), count)

    def rows_pruned(self, what: str, count: int) -> None:
        self.add("pruned", (what,), count)


class _RpcRelay:
    def __init__(self, relay: CountsRelay, network: str) -> None:
        self.relay = relay
        self.network = network

    def called(self, method: str) -> None:
        self.relay.add("rpc_calls", (self.network, method))

    def failed(self, method: str) -> None:
        self.relay.add("rpc_errors", (self.network, method))


class _Reporter:
    """Everything the child tells the daemon, gathered and sent at most every `REPORT_EVERY` s;
    but what a step committed that someone waits for (deliveries to queue, invoices changed)
    goes at the loop's next pass (`soon`). A webhook and the payment page's feed wait for that
    report: held for REPORT_EVERY, it added 40-50 ms to every live payment's webhook
    (BENCHMARKS.md, issue 13, eighth round). The notifications of one commit arrive in one
    pass, so a step still makes one report."""

    def __init__(self, followers: dict[str, Any]) -> None:
        self.followers = followers
        self.counts = CountsRelay(self.due)
        self.changed: set[str] = set()
        self.blocks: set[str] = set()
        self.queued = False
        self._sent: dict[str, dict[str, Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        self._last_report = 0.0

    def due(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY, self.flush)

    def soon(self) -> None:
        if self._soon is None:
            self._soon = asyncio.get_running_loop().call_soon(self.flush)

    def invoice_changed(self, invoice_id: str) -> None:
        self.changed.add(invoice_id)
        self.soon()

    def blocks_applied(self, network: str) -> None:
        # Every step applies blocks, one a block near the head: gathered (the page's
        # confirmations can wait 50 ms), unless the commit also changed invoices.
        self.blocks.add(network)
        self.due()

    def deliveries_queued(self) -> None:
        self.queued = True
        self.soon()

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Each chain's state that changed since the last report."""
        changed = {}
        for network, follower in self.followers.items():
            status = follower.status
            state = {
                "head_block": status.head_block,
                "last_head_at": status.last_head_at,
                "last_error": status.last_error,
                "stopped": status.stopped,
                "loaded": follower.watch.loaded,
                "progress": list(follower.watch.progress),
                "rpc_url": _shown(getattr(follower.reader.transport, "url", None)),
            }
            if self._sent.get(network) != state:
                changed[network] = self._sent[network] = state
        return changed

    def flush(self) -> None:
        for pending in (self._timer, self._soon):
            if pending is not None:
                pending.cancel()
        self._timer = self._soon = None
        report: dict[str, Any] = {}
        if statuses := self.statuses():
            report["status"] = statuses
        if counts := self.counts.take():
            report["counts"] = counts
        if self.blocks:
            report["blocks"], self.blocks = sorted(self.blocks), set()
        if self.queued:
            report["queued"], self.queued = 1, False
        changed, self.changed = sorted(self.changed), set()
        for i in range(0, len(changed), CHANGED_PER_LINE):
            childproc.report({"changed": changed[i : i + CHANGED_PER_LINE]})
        now = time.monotonic()
        if not report and now - self._last_report >= HEARTBEAT_SECONDS:
            report["alive"] = 1  # the daemon kills a child silent for SILENCE_TIMEOUT
        if report:
            self._last_report = now
            childproc.report(report)

    async def run(self, stopping: asyncio.Event) -> None:
        """The chains' state, looked at every `REPORT_EVERY` s (a step changes it in many places)."""
        while not stopping.is_set():
            self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=REPORT_EVERY * 4)


def _shown(url: str | None) -> str | None:
    return None if url is None else strip_credentials(url)


async def _unwatch_forever(
    start: dict[str, Any], store: Any, followers: dict[str, Any], reporter: _Reporter, stopping: asyncio.Event
) -> None:
    """The retention's `watch_closed_invoices_days`: the options of long-closed invoices leave
    the watch sets, which live in this process (jobs.Unwatcher)."""
    from .jobs import Unwatcher

    unwatcher = Unwatcher(
        store,
        lambda: {n: f.watch for n, f in followers.items() if f.watch.loaded},
        int(start["unwatch_days"]),
        time.time,
        reporter.counts.rows_pruned,
    )
    every = float(start["prune_interval"])
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=every)
        if not stopping.is_set():
            try:
                await unwatcher.run()
            except Exception:  # the next run tries again; following goes on meanwhile
                log.exception("unwatch_failed")


async def _follow(follower: Any, go: asyncio.Event, tls: asyncio.Future, stopping: asyncio.Event) -> None:
    """Load the watch set at once, step once the daemon says the nodes passed its checks."""
    await follower.load_watch_set(stopping)
    try:
        await tls
    except Exception:  # TLS to a node fails then, and says so at each step; plain HTTP works
        log.exception("tls_contexts_failed")
    waiting = asyncio.create_task(stopping.wait())
    released = asyncio.create_task(go.wait())
    try:
        await asyncio.wait([waiting, released], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        released.cancel()
    if go.is_set() and not stopping.is_set():
        await follower.run(stopping)


class Broken(Exception):
    """A follower or a helper of the child ended while it was not stopping (a bug): the child
    exits 1 and the daemon starts another, rather than leave a chain unfollowed."""


async def _until_stopped_or_broken(
    tasks: list[asyncio.Task], helpers: list[asyncio.Task], stopping: asyncio.Event
) -> None:
    waiting = asyncio.create_task(stopping.wait())
    try:
        done, _ = await asyncio.wait([*tasks, *helpers, waiting], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
    if stopping.is_set():
        return
    task = next(t for t in done if t is not waiting)
    stopping.set()  # the others end as on a stop
    error = task.exception() if not task.cancelled() else None
    raise Broken(f"{task.get_name()} ended: {error!r}") from error


def _apply(message: dict[str, Any], store: Any, followers: dict[str, Any]) -> None:
    """A line from the daemon: a new head, log settings, what logs must hide."""
    from .logs import configure_logging

    if "wake" in message:
        follower = followers.get(message["wake"])
        if follower is not None:
            follower.wake()
    if "log" in message:
        configure_logging(*message["log"])
    if "hidden" in message:
        childproc.hide(message["hidden"], message.get("urls", ()))


async def _child(start: dict[str, Any], lines: asyncio.StreamReader, stopping: asyncio.Event) -> None:
    from .chainwiring import chain_follower, node_reader
    from .store import Store

    store = Store(start["database"], clock=time.time, migrate=False, busy_timeout_ms=STEP_BUSY_TIMEOUT_MS)
    store.checkout_base_url = start["checkout_base_url"]
    followers: dict[str, Any] = {}
    reporter = _Reporter(followers)
    for data in start["chains"]:
        chain = FollowedChain.from_data(data)
        reader = node_reader(chain, reporter.counts, float(start["rpc_timeout"]))
        followers[chain.name] = chain_follower(chain, reader, store, reporter.counts)
    store.outbox.on_delivery_queued = reporter.deliveries_queued
    if start["report_changes"]:
        store.outbox.event_listeners.append(reporter.invoice_changed)
        store.block_listeners.append(reporter.blocks_applied)

    go = asyncio.Event()
    if start["go"]:
        go.set()

    def apply(message: dict[str, Any]) -> None:
        if "go" in message:
            go.set()
        _apply(message, store, followers)

    helpers = [
        asyncio.create_task(childproc.listen(NAME, lines, stopping, apply)),
        asyncio.create_task(reporter.run(stopping)),
    ]
    tls = asyncio.ensure_future(asyncio.to_thread(clienttls.build_contexts))  # before the first connection
    tasks = [asyncio.create_task(_follow(f, go, tls, stopping), name=n) for n, f in followers.items()]
    if start["unwatch_days"]:
        helpers.append(asyncio.create_task(_unwatch_forever(start, store, followers, reporter, stopping)))
    try:
        await _until_stopped_or_broken(tasks, helpers, stopping)
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE)
        for task in pending:  # a step waiting on a node: cancelled at an await, its write whole or absent
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in (*tasks, *helpers):
            task.cancel()
        await asyncio.gather(*tasks, *helpers, return_exceptions=True)
        for follower in followers.values():
            with contextlib.suppress(Exception):
                await follower.reader.transport.close()
        store.close()  # waits for the writer thread's transaction in flight
        reporter.flush()


def _preload() -> None:
    """What the child needs, imported before the interpreter's freeze."""
    from . import chainwiring, jobs  # noqa: F401
    from .store import Store  # noqa: F401


def main() -> int:
    return childproc.run_child("watcher.followproc", NAME, _child, _preload)


if __name__ == "__main__":
    sys.exit(main())
