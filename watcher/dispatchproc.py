"""The webhook dispatcher in a process of its own, beside the daemon's.

Why: everything Python does in one process runs on one core at most. Delivering a webhook
(reading it, signing it, the HTTP exchange, recording the attempt) costs about 0.3 ms of CPU: in
a catch-up that writes 150,000 events, more than half of the daemon's work. In a process of its
own the dispatcher runs on another core, and the API and the follower no longer wait behind it
(BENCHMARKS.md, issue 13). It needs nothing of the daemon's but the database, which SQLite
shares between processes (WAL, a busy timeout, `BEGIN IMMEDIATE`), and its endpoints' secrets.

The daemon (`DispatcherProcess`, on its loop) supervises `python -m watcher.dispatchproc` as
childproc.py says, and talks to it in JSON lines:

- to the child: first `{"start": {...}}` (the database, the endpoints' secrets, the log
  settings, what logs must hide), then `{"wake": 1}` when events were appended (the child
  queues their deliveries from the endpoints' cursors) or a delivery re-queued, and
  `{"secrets": {...}, "hidden": [...], "urls": [...]}` and `{"log": [format, level]}` on a
  reload. End of input stops it: it starts nothing new, lets its attempts in flight end (at most
  the HTTP timeout) and records them, then exits 0.
- from the child: `{"attempts": [[outcome, seconds], ...]}` (grouped, every `REPORT_EVERY` s at
  most) and `{"breaker": [endpoint, open]}`, which the daemon's metrics count.

A child that exits on its own is started again after a pause; what it had in flight and not
recorded is sent again then (at least once, as ever: receivers deduplicate by webhook-id). It
records its attempts with a long busy timeout: a catch-up step of the follower holds the
database's write lock, and an outcome already known must wait for it, not be sent again.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import childproc
from .webhooks import TIMEOUT_SECONDS

log = childproc.logger("watcher.dispatchproc")

# How long the child gets to end its attempts in flight when the daemon stops: an attempt may
# take the whole HTTP timeout, then its record.
STOP_TIMEOUT = TIMEOUT_SECONDS + 2.0
# The child reports its attempts to the daemon's metrics at most this often.
REPORT_EVERY = 0.05
# How long the child's writes wait for the database's write lock (a catch-up step may hold it
# for seconds); past it, the group is written again later (webhooks.Dispatcher._record).
RECORD_BUSY_TIMEOUT_MS = 120_000
NAME = "webhook_dispatcher"


class DispatcherProcess:
    """The daemon's side: starts the child, wakes it, hands it new secrets, counts what it reports,
    and starts it again when it dies. Offers what the service uses of `webhooks.Dispatcher`."""

    def __init__(
        self,
        database: str,
        secrets: Mapping[str, str],
        *,
        log_choice: tuple[str | None, str],
        hidden: Sequence[str] = (),
        urls: Sequence[str] = (),
        secret_env: Iterable[str] = (),
        on_attempt: Callable[[str, float | None], None] | None = None,
        on_breaker: Callable[[str, bool], None] | None = None,
        on_running: Callable[[bool], None] | None = None,
        restart_delays: Sequence[float] = childproc.RESTART_DELAYS,
        stop_timeout: float = STOP_TIMEOUT,
        warm: childproc.WarmChildren | None = None,
    ) -> None:
        """``log_choice``: (log_format or None for automatic, log_level). ``hidden``: values no
        log line may show; ``urls``: those whose credentials are stripped wherever they appear;
        ``secret_env``: the environment variables that hold secrets (left out of the child's).
        ``on_running(True)`` hears of each child started, ``on_running(False)`` of each that
        exited on its own (not of the stop)."""
        self.database = database
        self.secrets = dict(secrets)
        self.log_choice = log_choice
        self.hidden = list(hidden)
        self.urls = list(urls)
        self.on_attempt = on_attempt
        self.on_breaker = on_breaker
        self.child = childproc.ChildProcess(
            "watcher.dispatchproc",
            NAME,
            start=self._start_message,
            on_report=self._count,
            on_running=on_running,
            on_gone=lambda code, delay: self._forget_breakers(),
            secret_env=secret_env,
            restart_delays=restart_delays,
            stop_timeout=stop_timeout,
            warm=warm,
        )
        self._wake_due = False
        self._paused: set[str] = set()  # endpoints the child reported paused

    @property
    def process(self) -> asyncio.subprocess.Process | None:
        return self.child.process

    @property
    def starts(self) -> int:
        return self.child.starts

    # ------------------------------------------------------------------ what the service calls

    def wake(self) -> None:
        """Events were appended or a delivery re-queued: tell the child soon (once per pass of the
        loop). Safe from any thread."""
        loop = self.child.loop
        if loop is None or self._wake_due:
            return
        self._wake_due = True
        loop.call_soon_threadsafe(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        if not self.child.unread():  # one unread wake-up is enough
            self.child.send({"wake": 1})

    def set_secrets(
        self,
        secrets: Mapping[str, str],
        *,
        hidden: Sequence[str] = (),
        urls: Sequence[str] = (),
        secret_env: Iterable[str] = (),
    ) -> None:
        """The configured endpoints and their secrets (on reload), what logs must hide and the
        variables that hold secrets now: the child uses them from now on, and a child started
        later gets them too (and lacks those variables)."""
        self.secrets = dict(secrets)
        self.child.secret_env |= set(secret_env)
        self.hidden = sorted({*self.hidden, *hidden})
        self.urls = sorted({*self.urls, *urls})
        self.child.send({"secrets": self.secrets, "hidden": self.hidden, "urls": self.urls})

    def set_logging(self, log_choice: tuple[str | None, str]) -> None:
        """The log format and level (on reload)."""
        self.log_choice = log_choice
        self.child.send({"log": list(log_choice)})

    def open_breakers(self) -> list[str]:
        return sorted(self._paused)

    async def run(self, stopping: asyncio.Event) -> None:
        await self.child.run(stopping)

    async def close(self) -> None:
        await self.child.close()

    # ------------------------------------------------------------------ the child's reports

    def _start_message(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "secrets": self.secrets,
            "log_format": self.log_choice[0],
            "log_level": self.log_choice[1],
            "hidden": self.hidden,
            "urls": self.urls,
        }

    def _count(self, report: dict[str, Any]) -> None:
        if "attempts" in report and self.on_attempt is not None:
            for outcome, seconds in report["attempts"]:
                self.on_attempt(str(outcome), None if seconds is None else float(seconds))
        if "breaker" in report:
            endpoint, is_open = str(report["breaker"][0]), bool(report["breaker"][1])
            (self._paused.add if is_open else self._paused.discard)(endpoint)
            if self.on_breaker is not None:
                self.on_breaker(endpoint, is_open)

    def _forget_breakers(self) -> None:
        """A child gone takes its breakers with it: the next starts with every endpoint closed."""
        paused, self._paused = self._paused, set()
        for endpoint in paused:
            if self.on_breaker is not None:
                self.on_breaker(endpoint, False)


# ---------------------------------------------------------------------- the child


class _Reporter:
    """The child's side of the metrics: attempts grouped into one line every `REPORT_EVERY` s."""

    def __init__(self) -> None:
        self._attempts: list[tuple[str, float | None]] = []
        self._timer: asyncio.TimerHandle | None = None

    def attempt(self, outcome: str, seconds: float | None) -> None:
        self._attempts.append((outcome, seconds))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY, self.flush)

    def breaker(self, endpoint: str, is_open: bool) -> None:
        self.flush()
        childproc.report({"breaker": [endpoint, is_open]})

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._attempts:
            attempts, self._attempts = self._attempts, []
            childproc.report({"attempts": attempts})


def _hide_secrets(secrets: Mapping[str, str], hidden: Iterable[str], urls: Iterable[str]) -> None:
    """The endpoints' secrets and URLs too, besides what the daemon names."""
    childproc.hide(
        [*hidden, *(part for value in secrets.values() for part in value.split())], [*urls, *secrets]
    )


async def _child(start: dict[str, Any], lines: asyncio.StreamReader, stopping: asyncio.Event) -> None:
    from .logs import configure_logging
    from .store import Store
    from .webhooks import Dispatcher

    _hide_secrets(start["secrets"], start["hidden"], start["urls"])
    store = Store(start["database"], clock=time.time, migrate=False, busy_timeout_ms=RECORD_BUSY_TIMEOUT_MS)
    reporter = _Reporter()
    dispatcher = Dispatcher(
        store.outbox,
        start["secrets"],
        on_attempt=reporter.attempt,
        on_breaker=reporter.breaker,
    )
    stopping_watch = asyncio.create_task(stopping.wait())
    stopping_watch.add_done_callback(lambda _: dispatcher.wake())  # out of its idle wait at once

    def apply(message: dict[str, Any]) -> None:
        if "secrets" in message:
            _hide_secrets(message["secrets"], message.get("hidden", ()), message.get("urls", ()))
            dispatcher.set_secrets(message["secrets"])
        if "log" in message:
            configure_logging(*message["log"])
        dispatcher.wake()

    listener = asyncio.create_task(childproc.listen(NAME, lines, stopping, apply))
    try:
        await dispatcher.run(stopping)
    finally:
        listener.cancel()
        stopping_watch.cancel()
        reporter.flush()
        await dispatcher.close()
        store.close()


def _preload() -> None:
    from . import webhooks  # noqa: F401  (imported before the interpreter's freeze)
    from .store import Store  # noqa: F401


def main() -> int:
    return childproc.run_child("watcher.dispatchproc", NAME, _child, _preload)


if __name__ == "__main__":
    sys.exit(main())
