"""The daemon's own steps, replayed on the store alone: `python -m bench.store_replay [--phases]`.

`bench store` pays its invoices with made-up transfers: every invoice for the same amount, one
payer, one block a step. A chain's steps differ: each invoice has an amount of its own (the
judging's caches of amounts miss), a step spans some 200 blocks, and the store holds the
invoices' creation events. Here the 100% profile's catch-up is run once through the daemon's
own path (`bench.catchup`'s watcher: anvil, the Follower, the store), every
`Store.apply_blocks` call is recorded (cached in bench/.cache/), and the calls are then
replayed on a fresh copy of the same store, on one thread, with nothing else running: what
the steps cost apart from the follower around them. `--phases` splits them as `bench store
--phases` does.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.catchup import prepare_store, settings_for, watcher
from bench.chain import CACHE, PROFILES, CachedNode, ensure, load_deposits
from watcher.store import Endpoint, Store

# Bumped when what is recorded (the calls' arguments, watcher's classes) changes shape.
FORMAT = 1

Call = tuple[str, list, list, int, Any]  # network, blocks, matched, confirmed_through, keep_above


def record(meta: dict[str, Any], template: Path, invoices: int) -> list[Call]:
    """Every apply_blocks call of one in-process catch-up over the profile's cached chain."""
    calls: list[Call] = []
    apply_blocks = Store.apply_blocks

    def recording(self: Store, network: str, blocks: Any, matched: Any, **kwargs: Any) -> Any:
        calls.append(
            (network, list(blocks), list(matched), kwargs["confirmed_through"], kwargs.get("keep_above"))
        )
        return apply_blocks(self, network, blocks, matched, **kwargs)

    Store.apply_blocks = recording  # type: ignore[method-assign]
    try:
        with CachedNode(meta) as node:
            expected = sum(d["transfers"] for d in load_deposits(meta)[:invoices])
            asyncio.run(watcher(node.url, meta, str(template), expected))
    finally:
        Store.apply_blocks = apply_blocks  # type: ignore[method-assign]
    return calls


def recorded_calls(profile_name: str, rebuild: bool) -> tuple[list[Call], Path, dict[str, Any]]:
    profile = PROFILES[profile_name]
    meta = ensure(profile)
    template = prepare_store(meta, profile.invoices)
    cached = CACHE / f"steps-v{FORMAT}-{Path(meta['files']['meta']).stem}-{profile.invoices}.pkl"
    if rebuild or not cached.exists():
        calls = record(meta, template, profile.invoices)
        cached.with_suffix(".building").write_bytes(pickle.dumps(calls, pickle.HIGHEST_PROTOCOL))
        cached.with_suffix(".building").rename(cached)
    return pickle.loads(cached.read_bytes()), template, meta


def replay(calls: list[Call], template: Path, meta: dict[str, Any], phases: bool) -> dict[str, float]:
    payments = sum(len(matched) for _, _, matched, _, _ in calls)
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        path = Path(tmp) / "watcher.db"
        shutil.copyfile(template, path)
        store = Store(path, clock=time.time)
        settings = settings_for("http://127.0.0.1:1", meta, str(path))  # the daemon's endpoints
        store.outbox.set_endpoints(Endpoint(w.url, tuple(w.events)) for w in settings.webhooks)

        def run() -> tuple[float, float, float]:
            before = resource.getrusage(resource.RUSAGE_THREAD)
            started = time.perf_counter()
            for network, blocks, matched, confirmed_through, keep_above in calls:
                store.apply_blocks(
                    network, blocks, matched, confirmed_through=confirmed_through, keep_above=keep_above
                )
            after = resource.getrusage(resource.RUSAGE_THREAD)
            return (
                time.perf_counter() - started,
                after.ru_utime - before.ru_utime,
                after.ru_stime - before.ru_stime,
            )

        if phases:
            from bench.store_phases import phases_timed, report

            with phases_timed() as clock:
                wall, user, system = run()
            report(clock, payments)
        else:
            wall, user, system = run()
        store.close()
    return {"payments": payments, "wall_s": wall, "user_s": user, "system_s": system}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_replay")
    parser.add_argument("--profile", choices=("100%", "100%x25"), default="100%")
    parser.add_argument(
        "--phases", action="store_true", help="each phase of the steps (bench/store_phases.py)"
    )
    parser.add_argument("--rebuild", action="store_true", help="record the daemon's steps again")
    args = parser.parse_args(argv)
    calls, template, meta = recorded_calls(args.profile, args.rebuild)
    blocks = sum(len(b) for _, b, _, _, _ in calls)
    print(
        f"== the daemon's steps replayed alone, profile {args.profile}: {len(calls)} steps, {blocks:,} blocks"
    )
    r = replay(calls, template, meta, args.phases)
    n = r["payments"]
    print(
        f"replayed: {n:,} payments in {r['wall_s']:.2f} s: {n / r['wall_s']:,.0f} payments/s; CPU "
        f"{(r['user_s'] + r['system_s']) / n * 1e6:.0f} us a payment (user {r['user_s']:.2f} s, "
        f"system {r['system_s']:.2f} s){'; slower by the phases timing' if args.phases else ''}"
    )


if __name__ == "__main__":
    main()
