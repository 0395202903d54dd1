"""The event loop's wait for the GIL while the store's writer thread judges a step.

    python -m bench loop [--payments 5000] [--step 5000] [--rounds 3]

The API, the payment page and the watchdog run on the event loop; the store's writes run on
their writer thread (docs/design.md). SQLite releases the GIL, but judging a step is Python, so
each time the loop wakes (a request arrives, a timer fires) it may wait for the writer to hand
the GIL over: up to the interpreter's switch interval, every time. This bench writes steps of
payments on the writer thread (`Store.write`, as the follower does) while a probe task on the
loop sleeps 2 ms again and again, and reports how late it wakes, at Python's default switch
interval (5 ms: the baseline) and at the daemon's (`watcher.interpreter.SWITCH_INTERVAL_S`), rounds
alternated so that the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench.store_apply import NET, prepare, steps
from watcher.interpreter import SWITCH_INTERVAL_S

DEFAULT_SWITCH_INTERVAL_S = 0.005
PROBE_SLEEP_S = 0.002


async def _probed_run(store, work) -> tuple[float, list[float]]:  # type: ignore[no-untyped-def]
    late: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        while not done.is_set():
            asked = time.perf_counter()
            await asyncio.sleep(PROBE_SLEEP_S)
            late.append(time.perf_counter() - asked - PROBE_SLEEP_S)

    task = asyncio.create_task(probe())
    started = time.perf_counter()
    for b, matched in work:
        await store.write(
            store.apply_blocks, NET, [b], matched, confirmed_through=b.number, keep_above=b.number - 256
        )
    wall = time.perf_counter() - started
    done.set()
    await task
    return wall, sorted(late)


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def run(payments: int, step: int, interval: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        store, options = prepare(Path(tmp) / "w.db", payments, 1)
        previous = sys.getswitchinterval()
        sys.setswitchinterval(interval)
        try:
            wall, late = asyncio.run(_probed_run(store, steps(options, step, 100)))
        finally:
            sys.setswitchinterval(previous)
            store.close()
    return {
        "interval_ms": interval * 1000,
        "payments_per_s": payments / wall,
        "wakeups": len(late),
        **{f"p{int(q * 100)}_ms": _quantile(late, q) for q in (0.5, 0.9, 0.99)},
        "max_ms": late[-1] * 1000,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench loop")
    parser.add_argument("--payments", type=int, default=5_000)
    parser.add_argument("--step", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"== loop: a probe on the event loop (sleeps {PROBE_SLEEP_S * 1000:g} ms) while the writer "
        f"thread records {args.payments:,} payments in steps of {args.step:,}; how late it wakes"
    )
    heads = ("payments/s", "wake-ups", "p50 ms", "p90 ms", "p99 ms", "max ms")
    print(
        f"{'switch interval':>16} "
        + " ".join(f"{h:>{11 if i == 0 else 9 if i == 1 else 7}}" for i, h in enumerate(heads))
    )
    results: dict[float, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for interval in (DEFAULT_SWITCH_INTERVAL_S, SWITCH_INTERVAL_S):
            r = run(args.payments, args.step, interval)
            results.setdefault(interval, []).append(r)
            print(
                f"{r['interval_ms']:>13.1f} ms {r['payments_per_s']:>11,.0f} {r['wakeups']:>9.0f} "
                f"{r['p50_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['max_ms']:>7.1f}",
                flush=True,
            )
    for interval, rs in results.items():
        p99 = sorted(r["p99_ms"] for r in rs)[len(rs) // 2]
        rate = sorted(r["payments_per_s"] for r in rs)[len(rs) // 2]
        label = "Python's default" if interval == DEFAULT_SWITCH_INTERVAL_S else "the daemon's"
        print(
            f"median of {len(rs)}, {label} ({interval * 1000:g} ms): p99 {p99:.1f} ms, {rate:,.0f} payments/s"
        )


if __name__ == "__main__":
    main()
