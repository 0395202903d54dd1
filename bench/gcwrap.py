"""The daemon with the garbage collector's pauses counted: a `BENCH_DAEMON_PREFIX` for bench daemon.

    BENCH_DAEMON_PREFIX="python -m bench.gcwrap" python -m bench daemon --profile 100%
    BENCH_DAEMON_PREFIX="python -m bench.gcwrap --no-freeze" ...   # the baseline: nothing frozen

It runs `watcher.cli` in this process (the words after it are `python -m watcher.cli ARGS`)
with a `gc.callbacks` hook, and at exit writes to stderr (the daemon's log) how many
collections each generation made, their total and their longest: a collection holds the GIL,
so the event loop (the API, the watchdog) waits for it.
"""

from __future__ import annotations

import atexit
import gc
import sys
import time

stats: dict[int, list[float]] = {}
_started = [0.0]


def _count(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _started[0]
    entry = stats.setdefault(info["generation"], [0, 0.0, 0.0])
    entry[0] += 1
    entry[1] += took
    entry[2] = max(entry[2], took)


def _report() -> None:
    sys.stderr.write(f"GCSTAT frozen objects: {gc.get_freeze_count()}\n")
    for generation, (n, total, longest) in sorted(stats.items()):
        sys.stderr.write(
            f"GCSTAT gen{generation}: {n:.0f} collections, {total:.2f} s, longest {longest * 1000:.0f} ms\n"
        )


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--no-freeze":
        argv = argv[1:]
        gc.freeze = lambda: None  # the baseline: the daemon's freeze does nothing
    python_m_module = 3  # the prefix is followed by: python -m watcher.cli
    gc.callbacks.append(_count)
    atexit.register(_report)
    from watcher import cli

    return cli.main(argv[python_m_module:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
