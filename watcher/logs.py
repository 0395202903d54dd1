"""structlog set-up: JSON lines under systemd (or when asked), readable console on a terminal.

Every log line is one event with a snake_case name (``webhook_delivered``) and fields.
Secrets are never passed to the logger; as a second line of defence every rendered value is
scrubbed of the secrets registered with ``register_secrets`` (the API key, webhook secrets),
``url`` fields lose any credentials (RPC providers put keys in URLs), and any text that quotes
a URL, or a piece of one the daemon knows, goes through ``redaction.redact_text``. Records of the
libraries that use the standard ``logging`` module (aiohttp, APScheduler, web3) go through the
same renderer, at warning and above.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TextIO

if "structlog" not in sys.modules and "rich" not in sys.modules:
    # structlog imports rich when it is installed (only the tests' schemathesis brings it) for
    # its rich tracebacks, which the watcher never shows: format_exc_info below turns every
    # exception into text before a renderer sees it. That import is a tenth of a second before
    # the API can answer, so rich stays hidden while structlog loads (watcher/cli.py imports
    # this module first). Imported later by anyone else, rich loads as usual.
    sys.modules["rich"] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    try:
        import structlog
    finally:
        del sys.modules["rich"]
import structlog  # noqa: E402
from structlog.typing import EventDict  # noqa: E402

from .redaction import redact_text, strip_credentials  # noqa: E402

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("json", "console")
REDACTED = "***"

_secrets: set[str] = set()


def get_logger(name: str) -> Any:
    """structlog's logger, for a module that must not import structlog before this one."""
    return structlog.get_logger(name)


def register_secrets(values: Iterable[str]) -> None:
    """Values that must never appear in a log line, whatever a caller passes by mistake."""
    _secrets.update(v for v in values if v and len(v) >= 8)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return redact_text(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    return value


def redact(_logger: Any, _method: str, event: EventDict) -> EventDict:
    """structlog processor: strip URL credentials and registered secrets from every value."""
    for key, value in event.items():
        if isinstance(value, str) and (key == "url" or key.endswith("_url")):
            value = strip_credentials(value)
        event[key] = _scrub(value)
    return event


# Warnings a node or endpoint that stays down repeats at every retry. The first of a run is
# the news (the state changed); the same one again is logged at most once a minute, with how
# many were held back. A recovery (`follower_recovered`) ends the run.
REPEATING = frozenset(
    {
        "rpc_retry",
        "rpc_endpoint_retry",
        "rpc_all_endpoints_failed",
        "follower_step_failed",
        "ws_heads_lost",
        "node_behind_checkpoint",
    }
)
RECOVERED = frozenset({"follower_recovered"})
REMINDER_SECONDS = 60.0


class RepeatThrottle:
    """structlog processor: lets the first of a run of repeating warnings through, then one
    reminder a minute (with `suppressed`, how many were dropped since the last line shown).
    A run is keyed by the event and its `network` or `url`; it ends with a recovery event or
    after a minute without that warning."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, every: float = REMINDER_SECONDS) -> None:
        self.clock = clock
        self.every = every
        self._runs: dict[tuple, list[float | int]] = {}  # key -> [last shown, last seen, dropped]
        self._lock = threading.Lock()

    def __call__(self, _logger: Any, _method: str, event: EventDict) -> EventDict:
        name = event.get("event")
        if name in RECOVERED:
            with self._lock:
                self._runs.clear()
            return event
        if name not in REPEATING:
            return event
        key = (name, event.get("network"), event.get("url"))
        now = self.clock()
        with self._lock:
            run = self._runs.get(key)
            if run is None or now - run[1] > self.every:  # a new run: the state changed
                self._runs[key] = [now, now, 0]
                return event
            run[1] = now
            if now - run[0] < self.every:
                run[2] += 1
                raise structlog.DropEvent
            event["suppressed"] = run[2]
            run[0], run[2] = now, 0
        return event


_throttle = RepeatThrottle()


def resolve_format(
    log_format: str | None, environ: Mapping[str, str] | None = None, stream: TextIO | None = None
) -> str:
    """The format to use: the configured one if the file sets ``log_format``; otherwise JSON
    under systemd (``JOURNAL_STREAM`` is set), console on a terminal, and JSON anywhere else
    (a pipe or a file is read by programs)."""
    if log_format is not None:
        return log_format
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    if env.get("JOURNAL_STREAM"):
        return "json"
    try:
        return "console" if out.isatty() else "json"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "json"


class _ClientErrorsWithoutTraceback(logging.Filter):
    """aiohttp logs a malformed request from a client (a bad header, say) with a traceback,
    after answering it 400; it is the client's error, so one line, no stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            from aiohttp.http_exceptions import HttpProcessingError

            if isinstance(record.exc_info[1], HttpProcessingError):
                record.msg = "bad_http_request: %s"
                record.args = (str(record.exc_info[1]).splitlines()[0],)
                record.exc_info = None
                record.exc_text = None
                record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging(log_format: str | None = None, level: str = "info") -> str:
    """Configure structlog (and route stdlib logging through it); returns the format chosen.
    ``log_format`` None means "not set in the config": see ``resolve_format``."""
    chosen = resolve_format(log_format)
    renderer: structlog.types.Processor
    if chosen == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[_throttle, *shared, structlog.processors.format_exc_info, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        # One write a line: PrintLogger's print() writes the line, then its newline, and
        # unbuffered (the unit's PYTHONUNBUFFERED=1) those are two writes, between which another
        # of the daemon's processes sharing the journal's stream could write a line of its own.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_watcher", False)]:
        root.removeHandler(old)
    handler._watcher = True  # type: ignore[attr-defined]
    handler.addFilter(_ClientErrorsWithoutTraceback())
    root.addHandler(handler)
    root.setLevel(max(LEVELS.get(level, logging.INFO), logging.WARNING))
    return chosen
