"""The webhook dispatcher in a process of its own, beside the daemon's.

Why: the daemon's event loop and its GIL are shared by the API, the follower and the store's
writer thread, so everything Python does there runs on one core at most. Delivering a webhook
(reading it, signing it, the HTTP exchange, recording the attempt) costs about 0.3 ms of CPU: in
a catch-up that writes 150,000 events, more than half of the daemon's work. In a process of its
own the dispatcher runs on another core, and the API and the follower no longer wait behind it
(BENCHMARKS.md, issue 13). It needs nothing of the daemon's but the database, which SQLite
shares between processes (WAL, a busy timeout, `BEGIN IMMEDIATE`), and its endpoints' secrets.

The daemon (`DispatcherProcess`, on its loop) starts `python -m watcher.dispatchproc` in a
session of its own (a Ctrl-C on the terminal reaches the daemon, which stops it) and talks to it
in JSON lines:

- to the child, on its stdin: first `{"start": {...}}` (the database, the endpoints' secrets,
  the log settings, what logs must hide), then `{"wake": 1}` when deliveries are queued, and
  `{"secrets": {...}, "hidden": [...], "urls": [...]}` and `{"log": [format, level]}` on a
  reload. Secrets never go on its command line, and the variables that hold them are not in its
  environment. End of input stops it (the daemon stopping, or dead): it starts nothing new, lets
  its attempts in flight end (at most the HTTP timeout) and records them, then exits 0. SIGTERM
  (systemd signals the whole control group) does the same and exits `EXIT_SIGNALLED`.
- from the child, on its stdout: `{"attempts": [[outcome, seconds], ...]}` (grouped, every
  `REPORT_EVERY` s at most) and `{"breaker": [endpoint, open]}`, which the daemon's metrics count.

Its log lines go to the daemon's stderr (the journal), in the daemon's format. A child that
exits on its own is started again after a pause (`RESTART_DELAYS`); what it had in flight and
not recorded is sent again then (at least once, as ever: receivers deduplicate by webhook-id).
It records its attempts with a long busy timeout: a long catch-up step of the daemon holds the
database's write lock, and an outcome already known must wait for it, not be sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import orjson
import structlog

from .webhooks import TIMEOUT_SECONDS

log = structlog.get_logger("watcher.dispatchproc")

# Pauses before starting the child again after it exited on its own (the last one repeats).
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# A child that ran this long before it exited starts again after the first pause.
HEALTHY_RUN_SECONDS = 60.0
# How long the child gets to end its attempts in flight when the daemon stops: an attempt may
# take the whole HTTP timeout, then its record.
STOP_TIMEOUT = TIMEOUT_SECONDS + 2.0
# The child reports its attempts to the daemon's metrics at most this often.
REPORT_EVERY = 0.05
# Environment variables the child must not see: the daemon alone speaks to systemd.
PARENT_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# A line longer than this is not one of ours (it is dropped, not parsed).
MAX_LINE = 1 << 20
# How long the child's writes wait for the database's write lock (a catch-up step may hold it
# for tens of seconds); past it, the group is written again later (webhooks.Dispatcher._record).
RECORD_BUSY_TIMEOUT_MS = 120_000
# The child's exit codes: stopped by a signal (systemd's SIGTERM to the whole service, which the
# daemon gets too), or a database whose schema is not this code's (another version migrated it).
EXIT_SIGNALLED = 3
EXIT_SCHEMA = 4


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
        restart_delays: Sequence[float] = RESTART_DELAYS,
        stop_timeout: float = STOP_TIMEOUT,
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
        self.secret_env = set(secret_env)
        self.on_attempt = on_attempt
        self.on_breaker = on_breaker
        self.on_running = on_running
        self.restart_delays = tuple(restart_delays) or RESTART_DELAYS
        self.stop_timeout = stop_timeout
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0  # children started so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake_due = False
        self._paused: set[str] = set()  # endpoints the child reported paused

    # ------------------------------------------------------------------ what the service calls

    def wake(self) -> None:
        """Deliveries were queued: tell the child soon (once per pass of the loop). Safe from
        any thread."""
        loop = self._loop
        if loop is None or self._wake_due:
            return
        self._wake_due = True
        loop.call_soon_threadsafe(self._send_wake)

    def _send_wake(self) -> None:
        self._wake_due = False
        stdin = None if self.process is None else self.process.stdin
        if stdin is not None and stdin.transport.get_write_buffer_size() > 0:
            return  # it has not read the last one yet: one unread wake-up is enough
        self._send({"wake": 1})

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
        self.secret_env |= set(secret_env)
        self.hidden = sorted({*self.hidden, *hidden})
        self.urls = sorted({*self.urls, *urls})
        self._send({"secrets": self.secrets, "hidden": self.hidden, "urls": self.urls})

    def set_logging(self, log_choice: tuple[str | None, str]) -> None:
        """The log format and level (on reload)."""
        self.log_choice = log_choice
        self._send({"log": list(log_choice)})

    def open_breakers(self) -> list[str]:
        return sorted(self._paused)

    async def close(self) -> None:
        """Kill the child if it is still there (`run` normally ends it gracefully first)."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    # ------------------------------------------------------------------ the supervision

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep a child running until `stopping`; then stop it and wait for it (killed after
        `stop_timeout`)."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not stopping.is_set():
            started = time.monotonic()
            try:
                code = await self._run_child(stopping)
            except OSError as exc:  # the interpreter cannot be started (the machine is out of something)
                log.error("webhook_dispatcher_unstartable", error=str(exc))
                code = None
            self._forget_breakers()
            if stopping.is_set():
                return
            failures = 0 if time.monotonic() - started >= HEALTHY_RUN_SECONDS else failures + 1
            delay = self.restart_delays[min(max(failures - 1, 0), len(self.restart_delays) - 1)]
            if code == EXIT_SIGNALLED:  # systemd's SIGTERM to the service: the daemon's comes too
                log.info("webhook_dispatcher_signalled", restart_in_seconds=delay)
            else:
                if self.on_running is not None:
                    self.on_running(False)
                log.error("webhook_dispatcher_exited", code=code, restart_in_seconds=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)

    def _environment(self) -> dict[str, str]:
        hidden = {*PARENT_ONLY_ENV, *self.secret_env}
        return {k: v for k, v in os.environ.items() if k not in hidden}

    async def _run_child(self, stopping: asyncio.Event) -> int | None:
        self.process = process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "watcher.dispatchproc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._environment(),
            limit=MAX_LINE,
            start_new_session=True,  # a terminal's Ctrl-C reaches the daemon, which stops it
        )
        self.starts += 1
        if self.on_running is not None:
            self.on_running(True)
        self._send(
            {
                "start": {
                    "database": self.database,
                    "secrets": self.secrets,
                    "log_format": self.log_choice[0],
                    "log_level": self.log_choice[1],
                    "hidden": self.hidden,
                    "urls": self.urls,
                }
            }
        )
        reports = asyncio.create_task(self._read_reports(process), name="webhook-dispatcher-reports")
        stop = asyncio.create_task(stopping.wait())
        try:
            await asyncio.wait([reports, stop], return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():
                await self._stop_child(process)
            await reports  # its output read to the end: every report counted
            return await process.wait()
        finally:
            stop.cancel()
            if not reports.done():
                reports.cancel()
            if process.returncode is None:  # cancelled: no time to be graceful
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    async def _stop_child(self, process: asyncio.subprocess.Process) -> None:
        """End of input tells the child to stop; it gets `stop_timeout` to record its attempts."""
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            log.warning("webhook_dispatcher_killed", after_seconds=self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def _read_reports(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await process.stdout.readline()
            except ValueError:  # longer than MAX_LINE: not one of ours
                continue
            if not line:
                return
            try:
                self._count(orjson.loads(line))
            except (orjson.JSONDecodeError, TypeError, ValueError, KeyError):
                log.warning("webhook_dispatcher_report_unread", line=line[:200].decode(errors="replace"))

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

    def _send(self, message: dict[str, Any]) -> None:
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(orjson.dumps(message) + b"\n")


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
        _write({"breaker": [endpoint, is_open]})

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._attempts:
            attempts, self._attempts = self._attempts, []
            _write({"attempts": attempts})


def _write(message: dict[str, Any]) -> None:
    with contextlib.suppress(BrokenPipeError):  # the daemon is gone: the child is stopping anyway
        sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
        sys.stdout.buffer.flush()


def _hide(secrets: Mapping[str, str], hidden: Iterable[str], urls: Iterable[str]) -> None:
    """What the child's log lines must never show: the secrets, and the credentials in URLs."""
    from .logs import register_secrets
    from .redaction import register_urls

    register_secrets([*hidden, *(part for value in secrets.values() for part in value.split())])
    register_urls([*urls, *secrets])


async def _child(start: dict[str, Any], lines: asyncio.StreamReader, stopping: asyncio.Event) -> None:
    from .logs import configure_logging
    from .store import Store
    from .webhooks import Dispatcher

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
            _hide(message["secrets"], message.get("hidden", ()), message.get("urls", ()))
            dispatcher.set_secrets(message["secrets"])
        if "log" in message:
            configure_logging(*message["log"])
        dispatcher.wake()

    async def listen() -> None:
        try:
            while not stopping.is_set():
                line = await lines.readline()
                if not line:
                    return  # the daemon closed our input, or died
                try:
                    apply(orjson.loads(line))
                except Exception as exc:  # a line cut short or not ours: the next may be fine
                    log.warning("webhook_dispatcher_message_unread", error=str(exc))
        except Exception:
            log.exception("webhook_dispatcher_input_failed")
        finally:
            stopping.set()  # whatever ended the input, the child stops (never outlives the daemon)

    listener = asyncio.create_task(listen())
    try:
        await dispatcher.run(stopping)
    finally:
        listener.cancel()
        stopping_watch.cancel()
        reporter.flush()
        await dispatcher.close()
        store.close()


async def _child_main() -> int:
    stopping = asyncio.Event()
    signalled = []
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        signalled.append(True)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):  # first thing: a signal during start-up is a stop too
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the daemon reloads and sends the secrets
    lines = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines, loop=loop), sys.stdin)
    first = await lines.readline()
    if not first:
        return 0  # the daemon went away before it said anything
    start = orjson.loads(first)["start"]

    from . import interpreter, webhooks  # noqa: F401  (imported before the freeze below)
    from .logs import configure_logging
    from .store import Store  # noqa: F401
    from .store.core import SchemaMismatch

    configure_logging(start["log_format"], start["log_level"])
    _hide(start["secrets"], start["hidden"], start["urls"])
    interpreter.tune()  # as the daemon does: its attempts are recorded on a writer thread
    try:
        await _child(start, lines, stopping)
    except SchemaMismatch as exc:  # another version's database: the daemon must be restarted
        log.error("webhook_dispatcher_wrong_schema", error=str(exc))
        return EXIT_SCHEMA
    except Exception as exc:  # one line in the journal, and the daemon starts another child
        log.exception("webhook_dispatcher_crashed", error=str(exc))
        return 1
    return EXIT_SIGNALLED if signalled else 0


def main() -> int:
    if sys.stdin.isatty():
        print("watcher.dispatchproc is started by `watcher run`, not by hand", file=sys.stderr)
        return 2
    return asyncio.run(_child_main())


if __name__ == "__main__":
    sys.exit(main())
