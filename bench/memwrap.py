"""The daemon with its memory sampled: a `BENCH_DAEMON_PREFIX` for bench daemon.

    BENCH_KEEP=1 BENCH_DAEMON_PREFIX="python -m bench.memwrap --" python -m bench daemon --profile 100%
    BENCH_DAEMON_PREFIX="python -m bench.memwrap --trace --" ...   # with tracemalloc's top lines

It runs `watcher.cli` in this process (the words after `--` are `python -m watcher.cli ARGS`)
with a thread that writes to stderr (the daemon's log), every `--every` seconds, one `MEMSTAT`
line: the resident set and its high-water mark, and the C heap as glibc's mallinfo2 counts it
(in use, free but kept, mmapped). Python's own objects live in pymalloc's arenas within it.
With `--trace`, also tracemalloc's total and the lines that hold the most (slow: for finding
where, not for timing).
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from pathlib import Path
from typing import Any


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks")
        + ("uordblks", "fordblks", "keepcost")
    ]


def _mallinfo() -> _MallInfo2 | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc.mallinfo2()
    except (OSError, AttributeError):
        return None


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# (the opening thread's name, the connection): kept, as sqlite3 connections take no weak
# reference; one closed has a NULL handle and is skipped.
_connections: list[tuple[str, Any]] = []
DBSTATUS = {"cache": 1, "schema": 2, "stmt": 3}  # SQLITE_DBSTATUS_CACHE_USED, _SCHEMA_USED, _STMT_USED


def _watch_connections() -> None:
    """Remember each connection sqlite3 opens (and on which thread), to report its own memory."""
    import sqlite3

    opened = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = opened(*args, **kwargs)
        _connections.append((threading.current_thread().name, conn))
        return conn

    sqlite3.connect = connect


def _connection_memory() -> str:
    """Each open connection's page cache, schema and statements (sqlite3_db_status). The
    connection's `sqlite3 *` is the first field after the object header in CPython's
    pysqlite_Connection: a diagnostic's shortcut, not an API."""
    import _sqlite3

    lib = ctypes.CDLL(_sqlite3.__file__)
    out = []
    for thread, conn in _connections:
        handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not handle:
            continue
        parts = []
        for name, op in DBSTATUS.items():
            current, highest = ctypes.c_int(), ctypes.c_int()
            lib.sqlite3_db_status(
                ctypes.c_void_p(handle), op, ctypes.byref(current), ctypes.byref(highest), 0
            )
            parts.append(f"{name} {current.value / (1 << 20):.1f}")
        out.append(f"{thread}: " + " ".join(parts))
    return "; ".join(out)


def _sqlite_used() -> tuple[int, int] | None:
    """SQLite's own allocations (its page caches, statements, sorts): now, and the most so far."""
    try:
        import _sqlite3

        lib = ctypes.CDLL(_sqlite3.__file__)
        lib.sqlite3_memory_used.restype = lib.sqlite3_memory_highwater.restype = ctypes.c_int64
        return lib.sqlite3_memory_used(), lib.sqlite3_memory_highwater(0)
    except (OSError, AttributeError, ImportError):
        return None


def _sample(trace: bool, top: int) -> None:
    mb = 1 << 20
    info = _mallinfo()
    heap = (
        f" heap in use {info.uordblks / mb:.0f} MB, free kept {info.fordblks / mb:.0f} MB, "
        f"mmapped {info.hblkhd / mb:.0f} MB, arenas {info.arena / mb:.0f} MB"
        if info
        else ""
    )
    sqlite = _sqlite_used()
    if sqlite:
        heap += f", sqlite {sqlite[0] / mb:.0f} MB (most {sqlite[1] / mb:.0f})"
    heap += f", threads {_status_mb('Threads') * 1024:.0f}"
    heap += f", anon {_status_mb('RssAnon'):.0f} MB, file {_status_mb('RssFile'):.0f} MB"
    if _connections:
        heap += f" [{_connection_memory()}]"
    at = time.strftime("%H:%M:%S", time.gmtime())
    line = f"MEMSTAT {at} rss {_status_mb('VmRSS'):.0f} MB hwm {_status_mb('VmHWM'):.0f} MB{heap}"
    if trace:
        import tracemalloc

        current, peak = tracemalloc.get_traced_memory()
        line += f" traced {current / mb:.0f} MB (peak {peak / mb:.0f})"
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        line += "".join(f"\nMEMTOP {s.size / mb:7.1f} MB {s.count:8d} {s.traceback[0]}" for s in stats)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    options, rest = _split(argv)
    trace = "--trace" in options
    every = 5.0
    for i, word in enumerate(options):
        if word == "--every":
            every = float(options[i + 1])
    if trace:
        import tracemalloc

        tracemalloc.start(1)
    _watch_connections()

    def sampler() -> None:
        while True:
            _sample(trace, 12)
            time.sleep(every)

    threading.Thread(target=sampler, name="memwrap", daemon=True).start()
    python_m_module = 3  # the words after `--`: python -m watcher.cli
    from watcher import cli

    try:
        return cli.main(rest[python_m_module:])
    finally:
        _sample(trace, 25)


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """The wrapper's options, and the command after `--`."""
    if "--" not in argv:
        return [], argv
    at = argv.index("--")
    return argv[:at], argv[at + 1 :]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
