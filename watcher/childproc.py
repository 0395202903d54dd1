"""A part of the daemon in a process of its own: the daemon's side supervises it, the child's
side runs it. The webhook dispatcher (dispatchproc.py) and the follower (followproc.py) run
this way under `watcher run`, so that each has a core and a GIL of its own and the API's
process is left to the API (BENCHMARKS.md, issue 13).

The daemon starts `python -m <module>` in a session of its own (a Ctrl-C on the terminal
reaches the daemon, which stops it) and talks to it in JSON lines:

- to the child, on its stdin: first `{"start": {...}}` (never on its command line: it may hold
  secrets, and the variables that hold them are left out of its environment), then whatever
  the part needs. End of input stops the child (the daemon stopping, or dead). SIGTERM
  (systemd signals the whole control group) does the same and exits `EXIT_SIGNALLED`.
- from the child, on its stdout: reports, which the part's daemon side reads.

Its log lines go to the daemon's stderr (the journal), in the daemon's format, with the same
redaction. A child that exits on its own is started again after a pause (`RESTART_DELAYS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import orjson

from . import logs  # before structlog: it imports structlog without rich, as the daemon does

log = logs.get_logger("watcher.childproc")


def logger(name: str) -> Any:
    """A module's logger, for the children's modules: `python -m` runs them first, so they
    import structlog through here, after `logs`."""
    return logs.get_logger(name)


# Pauses before starting the child again after it exited on its own (the last one repeats).
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
# A child that ran this long before it exited starts again after the first pause.
HEALTHY_RUN_SECONDS = 60.0
# Environment variables the child must not see: the daemon alone speaks to systemd.
PARENT_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# A line longer than this is not one of ours (it is dropped, not parsed).
MAX_LINE = 1 << 20
# The child's exit codes: stopped by a signal (systemd's SIGTERM to the whole service, which the
# daemon gets too), or a database whose schema is not this code's (another version migrated it).
EXIT_SIGNALLED = 3
EXIT_SCHEMA = 4

Report = dict[str, Any]


class ChildProcess:
    """The daemon's side: starts the child, hands it messages, passes on what it reports, and
    starts it again when it dies. `name` prefixes the log events (`<name>_exited`, ...)."""

    def __init__(
        self,
        module: str,
        name: str,
        *,
        start: Callable[[], Report],
        on_report: Callable[[Report], None],
        on_running: Callable[[bool], None] | None = None,
        on_gone: Callable[[int | None, float], None] | None = None,
        secret_env: Iterable[str] = (),
        restart_delays: Sequence[float] = RESTART_DELAYS,
        stop_timeout: float,
        silence_timeout: float | None = None,
        warm: WarmChildren | None = None,
    ) -> None:
        """``start()``: the first message of each child. ``on_running(True)`` hears of each
        child started, ``on_running(False)`` of each that exited on its own (not of the stop);
        ``on_gone(code, restart_in)`` of every child gone, after its last report.
        ``secret_env``: the environment variables that hold secrets (left out of its environment).
        ``silence_timeout``: a child that reports nothing for this long is stuck, and killed (it
        must report at least every few seconds; None: never). ``warm``: children `watcher run`
        started before the daemon's own imports; the first child is taken from there."""
        self.module = module
        self.name = name
        self.start = start
        self.on_report = on_report
        self.on_running = on_running
        self.on_gone = on_gone
        self.secret_env = set(secret_env)
        self.restart_delays = tuple(restart_delays) or RESTART_DELAYS
        self.stop_timeout = stop_timeout
        self.silence_timeout = silence_timeout
        self.warm = warm
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0  # children started so far
        self.loop: asyncio.AbstractEventLoop | None = None

    def send(self, message: Report) -> None:
        """A line to the running child (none to a child gone: the next gets `start()`)."""
        process = self.process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError):
            process.stdin.write(orjson.dumps(message) + b"\n")

    def unread(self) -> bool:
        """The child has not read everything sent to it yet."""
        stdin = None if self.process is None else self.process.stdin
        return stdin is not None and stdin.transport.get_write_buffer_size() > 0

    async def close(self) -> None:
        """Kill the child if it is still there (`run` normally ends it gracefully first)."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def run(self, stopping: asyncio.Event) -> None:
        """Keep a child running until `stopping`; then stop it and wait for it (killed after
        `stop_timeout`)."""
        self.loop = asyncio.get_running_loop()
        failures = 0
        while not stopping.is_set():
            started = time.monotonic()
            try:
                code = await self._run_child(stopping)
            except OSError as exc:  # the interpreter cannot be started (the machine is out of something)
                log.error("child_unstartable", process=self.name, error=str(exc))
                code = None
            except Exception:  # a bug of ours on this side: the child is gone, start another
                log.exception("child_supervision_failed", process=self.name)
                code = None
            failures = 0 if time.monotonic() - started >= HEALTHY_RUN_SECONDS else failures + 1
            delay = self.restart_delays[min(max(failures - 1, 0), len(self.restart_delays) - 1)]
            if self.on_gone is not None:
                self.on_gone(code, 0.0 if stopping.is_set() else delay)
            if stopping.is_set():
                return
            if code in (EXIT_SIGNALLED, -signal.SIGTERM):  # systemd's SIGTERM to the service (the
                # daemon's comes too), maybe before the child could handle it
                log.info("child_signalled", process=self.name, restart_in_seconds=delay)
            else:
                if self.on_running is not None:
                    self.on_running(False)
                log.error("child_exited", process=self.name, code=code, restart_in_seconds=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)

    async def _run_child(self, stopping: asyncio.Event) -> int | None:
        warm = self.warm.take(self.module, self.secret_env) if self.warm is not None else None
        self.process = process = warm or await spawn(self.module, self.secret_env)
        self.starts += 1
        if self.on_running is not None:
            self.on_running(True)
        self.send({"start": self.start()})
        reports = asyncio.create_task(self._read_reports(process), name=f"{self.name}-reports")
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
        """End of input tells the child to stop; it gets `stop_timeout` to end its work."""
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=self.stop_timeout)
        except TimeoutError:
            log.warning("child_killed", process=self.name, after_seconds=self.stop_timeout)
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def _read_reports(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            try:
                line = await asyncio.wait_for(process.stdout.readline(), timeout=self.silence_timeout)
            except ValueError:  # longer than MAX_LINE: not one of ours
                continue
            except TimeoutError:  # stuck: killed, and the supervision starts another
                log.error("child_silent", process=self.name, after_seconds=self.silence_timeout)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                continue  # to the end of its output
            if not line:
                return
            try:
                self.on_report(orjson.loads(line))
            except Exception:  # a line not ours, or a bug in its handling: the next may be fine
                log.exception(
                    "child_report_unread", process=self.name, line=line[:200].decode(errors="replace")
                )


def environment(secret_env: Iterable[str]) -> dict[str, str]:
    """The daemon's environment without the variables a child must not see."""
    hidden = {*PARENT_ONLY_ENV, *secret_env}
    return {k: v for k, v in os.environ.items() if k not in hidden}


async def spawn(module: str, secret_env: Iterable[str]) -> asyncio.subprocess.Process:
    """`python -m <module>`, its stdin and stdout ours, in a session of its own (a terminal's
    Ctrl-C reaches the daemon, which stops it)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=environment(secret_env),
        limit=MAX_LINE,
        start_new_session=True,
    )


class WarmChildren:
    """Children started by `watcher run` before the daemon imports its own modules and validates
    its config: their interpreters start and import beside the daemon's, on another core, and
    wait for their first line. Started before the config is validated, each leaves out of its
    environment every variable the config file names (`hidden`); the supervision takes one only
    if that covers the secrets of the config as validated, and starts its own otherwise."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.subprocess.Process, frozenset[str]]] = {}

    async def start(self, modules: Iterable[str], hidden: Iterable[str]) -> None:
        hidden = frozenset(hidden)
        for module in modules:
            with contextlib.suppress(OSError):  # none then: the supervision starts it as usual
                self._waiting[module] = (await spawn(module, hidden), hidden)

    def take(self, module: str, secret_env: Iterable[str]) -> asyncio.subprocess.Process | None:
        """The warm child of `module`, if it runs and lacks every variable in `secret_env`."""
        process, hidden = self._waiting.pop(module, (None, frozenset()))
        if process is None:
            return None
        if process.returncode is not None or not set(secret_env) <= hidden:
            _kill(process)  # its exit is collected by the loop's child watcher
            return None
        return process

    async def discard(self) -> None:
        """Stop the children nobody took (the daemon did not start, or runs without them)."""
        waiting = [process for process, _ in self._waiting.values()]
        self._waiting.clear()
        for process in waiting:
            _kill(process)
        await asyncio.gather(*(process.wait() for process in waiting))


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


# ---------------------------------------------------------------------- the child's side


def report(message: Report) -> None:
    """A line to the daemon, on stdout."""
    with contextlib.suppress(BrokenPipeError):  # the daemon is gone: the child is stopping anyway
        sys.stdout.buffer.write(orjson.dumps(message) + b"\n")
        sys.stdout.buffer.flush()


def hide(hidden: Iterable[str], urls: Iterable[str]) -> None:
    """What the child's log lines must never show: the secrets, and the credentials in URLs."""
    from .logs import register_secrets
    from .redaction import register_urls

    register_secrets(list(hidden))
    register_urls(list(urls))


async def listen(
    name: str,
    lines: asyncio.StreamReader,
    stopping: asyncio.Event,
    apply: Callable[[Report], None],
) -> None:
    """Apply each later line from the daemon; at end of input, stop the child (it never
    outlives the daemon)."""
    try:
        while not stopping.is_set():
            line = await lines.readline()
            if not line:
                return  # the daemon closed our input, or died
            try:
                apply(orjson.loads(line))
            except Exception as exc:  # a line cut short or not ours: the next may be fine
                log.warning("child_message_unread", process=name, error=str(exc))
    except Exception:
        log.exception("child_input_failed", process=name)
    finally:
        stopping.set()


ChildBody = Callable[[Report, asyncio.StreamReader, asyncio.Event], Awaitable[None]]


async def child_main(name: str, body: ChildBody, preload: Callable[[], None] = lambda: None) -> int:
    """The child's life: signals, the first line, logging as the daemon logs, then `body`.
    `preload` imports what the body needs before the interpreter's freeze (interpreter.tune)."""
    stopping = asyncio.Event()
    signalled = []
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        signalled.append(True)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):  # first thing: a signal during start-up is a stop too
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the daemon reloads and tells the child
    lines = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(lines, loop=loop), sys.stdin)

    collecting = gc.isenabled()
    gc.disable()  # during the imports, which are frozen below (as the daemon's are: cli.py)
    from . import interpreter
    from .logs import configure_logging
    from .store.core import SchemaMismatch

    preload()  # before the first line: a warm child (WarmChildren) is ready when it comes
    first = await lines.readline()
    if not first:
        return 0  # the daemon went away before it said anything
    start = orjson.loads(first)["start"]
    configure_logging(start["log_format"], start["log_level"])
    hide(start.get("hidden", ()), start.get("urls", ()))
    interpreter.tune()  # as the daemon does: the store's writes run on a writer thread
    if collecting:
        gc.enable()
    try:
        await body(start, lines, stopping)
    except SchemaMismatch as exc:  # another version's database: the daemon must be restarted
        log.error("child_wrong_schema", process=name, error=str(exc))
        return EXIT_SCHEMA
    except Exception as exc:  # one line in the journal, and the daemon starts another child
        log.exception("child_crashed", process=name, error=str(exc))
        return 1
    return EXIT_SIGNALLED if signalled else 0


def run_child(module: str, name: str, body: ChildBody, preload: Callable[[], None] = lambda: None) -> int:
    """`python -m <module>`: only the daemon starts it."""
    if sys.stdin.isatty():
        print(f"{module} is started by `watcher run`, not by hand", file=sys.stderr)
        return 2
    return asyncio.run(child_main(name, body, preload))
