"""Where a step's time goes, phase by phase: `python -m bench store --phases`.

Each phase of `Store.apply_blocks` is one function of the store's modules, wrapped here for
the run: recording's reads (the step's transactions' stored payments, its options), its plan
(pure) and its write; each slice's read, judging (pure) and write; and the COMMIT. What is
left of a step (the confirmations' UPDATE, the checkpoint's rows, the expiry candidates, the
BEGIN) is shown as the rest.

It also prices the one move left that would take Python off the store's writer: judging each
slice on another core. That needs the slice's rows shipped to another process and its writes
shipped back; both are pickled and unpickled here (timed apart from the phases) to show what
shipping alone costs the writer against what judging costs it.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from watcher.store import Store, engine, recording, rejudge

JUDGING = "slice: judge, render (pure)"
# (module, function name, phase): what each wrapped function's time counts as.
PHASES = (
    (recording, "read_existing", "recording: read stored payments"),
    (recording, "read_options", "recording: read options"),
    (recording, "plan_recording", "recording: plan (pure)"),
    (recording, "write_plan", "recording: write payments"),
    (rejudge, "read_batch", "slice: read invoices, payments"),
    (rejudge, "judge_slice", JUDGING),
    (rejudge, "write_slice", "slice: write invoices, events"),
)
COMMIT = "COMMIT"
STEP = "a step, in all"
# Shipping a slice: the writer pickles its rows and unpickles the writes that come back; the
# other process does the opposite. Only the writer's share is on the step's critical path.
SHIPPING_WRITER = "shipping: the writer's share"
SHIPPING_OTHER = "shipping: the judging process's share"


class PhaseClock:
    """Thread CPU and wall seconds by phase, and the bytes a slice would ship each way."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.shipped_in = 0
        self.shipped_out = 0

    def add(self, phase: str, started: tuple[float, float]) -> None:
        cpu, wall = time.thread_time() - started[0], time.perf_counter() - started[1]
        self.cpu[phase] = self.cpu.get(phase, 0.0) + cpu
        self.wall[phase] = self.wall.get(phase, 0.0) + wall

    def timed(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, started)

        return wrapper

    def judged_and_shipped(self, judge_slice: Callable[..., Any]) -> Callable[..., Any]:
        """judge_slice, timed, and its inputs and result pickled both ways, timed apart."""

        def wrapper(batch: Any, ids: Any, reasons: Any, now: str, tips: Any) -> Any:
            started = _now()
            sent = pickle.dumps((batch, {i: reasons[i] for i in ids}, now, tips), pickle.HIGHEST_PROTOCOL)
            self.add(SHIPPING_WRITER, started)
            started = _now()
            pickle.loads(sent)
            self.add(SHIPPING_OTHER, started)
            started = _now()
            judged = judge_slice(batch, ids, reasons, now, tips)
            self.add(JUDGING, started)
            started = _now()
            back = pickle.dumps(judged, pickle.HIGHEST_PROTOCOL)
            self.add(SHIPPING_OTHER, started)
            started = _now()
            pickle.loads(back)
            self.add(SHIPPING_WRITER, started)
            self.shipped_in += len(sent)
            self.shipped_out += len(back)
            return judged

        return wrapper


def _now() -> tuple[float, float]:
    return time.thread_time(), time.perf_counter()


@contextmanager
def phases_timed() -> Iterator[PhaseClock]:
    """The store's phase functions and its outermost COMMIT timed while inside."""
    clock = PhaseClock()
    saved = [(module, name, getattr(module, name)) for module, name, _ in PHASES]
    atomic = engine.StoreDatabase.atomic
    apply_blocks = Store.apply_blocks
    Store.apply_blocks = clock.timed(apply_blocks, STEP)  # type: ignore[method-assign]
    for module, name, phase in PHASES:
        fn = getattr(module, name)
        setattr(
            module, name, clock.judged_and_shipped(fn) if name == "judge_slice" else clock.timed(fn, phase)
        )

    @contextmanager
    def atomic_timed(db: engine.StoreDatabase) -> Iterator[Any]:
        outermost = not db.conn.in_transaction
        with atomic(db) as inside:
            yield inside
            started = _now()
        if outermost:
            clock.add(COMMIT, started)

    engine.StoreDatabase.atomic = atomic_timed  # type: ignore[method-assign,assignment]
    try:
        yield clock
    finally:
        engine.StoreDatabase.atomic = atomic  # type: ignore[method-assign]
        Store.apply_blocks = apply_blocks  # type: ignore[method-assign]
        for module, name, fn in saved:
            setattr(module, name, fn)


def report(clock: PhaseClock, payments: int) -> None:
    """The phases' table: µs of the writer's CPU and of wall time a payment, and their shares
    of a step (without the shipping, which a step does not do)."""
    shipping = (SHIPPING_WRITER, SHIPPING_OTHER)
    step_cpu = clock.cpu.get(STEP, 0.0) - sum(clock.cpu.get(p, 0.0) for p in shipping)
    step_wall = clock.wall.get(STEP, 0.0) - sum(clock.wall.get(p, 0.0) for p in shipping)
    order = [phase for _, _, phase in PHASES] + [COMMIT]
    rows = [(p, clock.cpu.get(p, 0.0), clock.wall.get(p, 0.0)) for p in order]
    rows.append(
        (
            "the rest of the step",
            step_cpu - sum(cpu for _, cpu, _ in rows),
            step_wall - sum(wall for _, _, wall in rows),
        )
    )
    print(f"{'phase':<38} {'CPU us':>7} {'wall us':>8} {'CPU share':>9}   (a payment; {payments:,} payments)")
    print("-" * 72)
    for phase, cpu, wall in rows:
        print(f"{phase:<38} {cpu / payments * 1e6:7.1f} {wall / payments * 1e6:8.1f} {cpu / step_cpu:9.0%}")
    print("-" * 72)
    print(f"{STEP:<38} {step_cpu / payments * 1e6:7.1f} {step_wall / payments * 1e6:8.1f}")
    judging = clock.cpu.get(JUDGING, 0.0)
    writer_share = clock.cpu.get(SHIPPING_WRITER, 0.0)
    print(
        f"judging on another core: each slice's rows shipped there ({clock.shipped_in / payments:,.0f} B a "
        f"payment) and its writes back ({clock.shipped_out / payments:,.0f} B), pickled: "
        f"{writer_share / payments * 1e6:.1f} us a payment on the writer (and "
        f"{clock.cpu.get(SHIPPING_OTHER, 0.0) / payments * 1e6:.1f} us on the other side), to take "
        f"{judging / payments * 1e6:.1f} us of judging off it: the writer would need "
        f"{(step_cpu - judging + writer_share) / payments * 1e6:.1f} us a payment"
    )
