"""Pure work too large for one callback of the event loop goes to a worker thread.

The API, the payment page and the watchdog share the event loop with the follower. Decoding a
span's 2,500 logs, or matching a step's 25,000 transfers, is 50 to 130 ms of Python in one
callback, and every request waits for it. On a worker thread the loop gets the interpreter back
at every switch interval (1 ms, watcher/interpreter.py) instead (BENCHMARKS.md, issue 13, third
round). Small batches stay on the loop, where a thread's hand-over would cost more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Items (logs, transfers) above which the work leaves the loop: about 10 ms of Python.
OFF_LOOP_ITEMS = 500


async def off_loop(fn: Callable[..., T], *args: Any, items: int) -> T:
    """`fn(*args)`, on a worker thread when it handles more than OFF_LOOP_ITEMS items. `fn`
    must touch nothing the loop changes meanwhile but through single dict reads."""
    if items <= OFF_LOOP_ITEMS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
