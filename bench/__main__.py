"""python -m bench [SECTION] [--profile 1%|100%|100%x25] [--repeat N] [--rebuild] [--quick]

Sections: build, catchup, profile (the catch-up chains and runs), watchset, webhooks, api, checkout,
live, daemon (the real daemon catching up as an operator runs it). Without one: all of them
(profile only when pyinstrument is installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from typing import Any

from bench.catchup import prepare_store
from bench.chain import CACHE, DEFAULT_PROFILES, PROFILES, CachedNode, Profile, ensure, load_deposits
from bench.measure import Row, best_of, run_child, table

RAW_CHUNKS = (25, 50, 100)
# The other sections: each module has main(argv) and prints its own table and goal lines.
SECTIONS = {
    "watchset": "bench.watchset",
    "webhooks": "bench.webhooks",
    "api": "bench.api_load",
    "live": "bench.live",
    "checkout": "bench.checkout",
    "store": "bench.store_apply",
    "loop": "bench.loop_gil",
    "daemon": "bench.daemon",
}
# TOPIC_FILTER_LIMIT x TOPIC_FILTER_REQUESTS (watcher/matching.py): up to this many addresses the node filters
FILTER_LIMIT = 4000

# Goals from issue 5 (reported against, not asserted).
GOAL_VS_RAW = 0.8  # catch-up at 1% ours
GOAL_PAYMENTS_PER_S = 10_000  # at 100% ours
GOAL_VS_WEB3 = 10


def describe(meta: dict[str, Any]) -> str:
    return (
        f"blocks {meta['first_block']}-{meta['last_block']} "
        f"({meta['last_block'] - meta['first_block'] + 1}), "
        f"Transfer logs {' + '.join(f'{n:,}' for n in meta['logs_per_token'].values())} of 2 tokens, "
        f"{meta['native_transfers']} native transfers; {meta['deposit_addresses']:,} deposit addresses "
        f"({meta['paid_addresses']:,} paid), {meta['transfers_to_ours']:,} transfers to them; "
        f"cache built in {meta['build_seconds']} s"
    )


def watcher_runs(profile: Profile, meta: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, spec) of the watcher runs: every invoice; and when the paid ones are few enough
    for the follower's recipient filter, those alone (the node filters, so fewer logs come)."""
    deposits = load_deposits(meta)
    runs = []
    counts = [profile.invoices] + (
        [profile.paid] if profile.paid < profile.invoices and profile.paid <= FILTER_LIMIT else []
    )
    for n in counts:
        how = "node filters by recipient" if n <= FILTER_LIMIT else "all logs, matched here"
        spec = {
            "method": "watcher",
            "store": str(prepare_store(meta, n)),
            "expected": sum(d["transfers"] for d in deposits[:n]),
        }
        runs.append((f"watcher, {n:,} invoices ({how})", spec))
    return runs


def catchup(profile: Profile, repeat: int) -> None:
    meta = ensure(profile)
    blocks = meta["last_block"] - meta["first_block"] + 1
    logs = meta["token_transfers"]
    print(f"\n== catch-up, profile {profile.name}: {describe(meta)}", flush=True)
    watchers = watcher_runs(profile, meta)  # the stores are made (once) before anything is timed
    with CachedNode(meta) as node:
        base = {"url": node.url, "meta": meta["files"]["meta"]}
        run_child({**base, "method": "raw", "chunk": 100, "inflight": 1})  # warm the node up
        sweep: dict[tuple[int, int], dict[str, Any]] = {}
        for inflight in (1, 2):
            for chunk in RAW_CHUNKS:
                sweep[chunk, inflight] = best_of(
                    {**base, "method": "raw", "chunk": chunk, "inflight": inflight}, repeat
                )
        print(
            "raw sweep, logs/s by chunk size: "
            + "; ".join(
                f"{n} in flight: "
                + ", ".join(f"{c}: {logs / sweep[c, n]['wall_s']:,.0f}" for c in RAW_CHUNKS)
                for n in (1, 2)
            ),
            flush=True,
        )
        rows = []
        for inflight in (1, 2):
            chunk = min(RAW_CHUNKS, key=lambda c: sweep[c, inflight]["wall_s"])
            rows.append(
                Row(f"raw aiohttp+orjson, {inflight} in flight, chunk {chunk}", sweep[chunk, inflight])
            )
        raw_best = min(rows, key=lambda r: r.result["wall_s"])
        chunk = min(RAW_CHUNKS, key=lambda c: sweep[c, 1]["wall_s"])
        web3_events = Row(
            f"web3 contract.events.Transfer.get_logs, chunk {chunk}",
            best_of({**base, "method": "web3-events", "chunk": chunk}, repeat),
        )
        rows.append(web3_events)
        rows.append(
            Row(
                f"web3 w3.eth.get_logs, chunk {chunk}",
                best_of({**base, "method": "web3-getlogs", "chunk": chunk}, repeat),
            )
        )
        for label, spec in watchers:
            rows.append(Row(label, best_of({**base, **spec}, repeat)))
    print(table(rows, blocks=blocks, logs=logs))
    for row in rows[-len(watchers) :]:
        r = row.result
        print(
            f"{row.label}: watcher/raw = {raw_best.result['wall_s'] / r['wall_s']:.2f}, "
            f"watcher/web3 = {web3_events.result['wall_s'] / r['wall_s']:.1f}; runs "
            f"{[round(s, 2) for s in r['runs_s']]} s"
        )
        print(
            f"  {r['payments']:,} payments, {r['events']:,} events ({r['event_bytes'] / 1e6:,.1f} MB of "
            "bodies), "
            f"{r['steps']} steps, store {r['db_mb']:,.0f} MB after; invoices {r['invoices_by_status']}"
        )
    main = rows[-len(watchers)].result
    vs_raw = raw_best.result["wall_s"] / main["wall_s"]
    vs_web3 = web3_events.result["wall_s"] / main["wall_s"]
    if profile.share < 1:
        print(
            f"goal: catch-up >= {GOAL_VS_RAW} x raw: {vs_raw:.2f} "
            f"({'met' if vs_raw >= GOAL_VS_RAW else 'NOT met'})"
        )
    else:
        rate = main["payments"] / main["wall_s"]
        print(
            f"goal: >= {GOAL_PAYMENTS_PER_S:,} payments/s: {rate:,.0f} "
            f"({'met' if rate >= GOAL_PAYMENTS_PER_S else 'NOT met'})"
        )
    print(
        f"goal: >= {GOAL_VS_WEB3} x web3: {vs_web3:.1f} ({'met' if vs_web3 >= GOAL_VS_WEB3 else 'NOT met'})",
        flush=True,
    )


def profile_run(profile: Profile, top: int = 15) -> None:
    meta = ensure(profile)
    out = CACHE / f"profile-{profile.name.replace('%', 'pct')}.html"
    [(label, spec)] = watcher_runs(profile, meta)[:1]
    with CachedNode(meta) as node:
        result = run_child({"url": node.url, "meta": meta["files"]["meta"], **spec, "profile_to": str(out)})
    found = json.loads(out.with_suffix(".json").read_text())
    print(
        f"\n== profile of the {label}, profile {profile.name}: {result['wall_s']:.2f} s under pyinstrument, "
        f"{result['payments']:,} payments; tree: bench/{CACHE.name}/{out.name} (and .txt)"
    )
    for title, key in (
        ("self time (where the CPU goes)", "self"),
        ("inclusive time, watcher/ code", "inclusive_watcher"),
    ):
        print(f"-- top {top} by {title}")
        for f in found[key][:top]:
            print(f"  {f['share']:6.1%} {f['seconds']:7.3f} s  {f['function']}  {f['where']}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "section", nargs="?", choices=("all", "build", "catchup", "profile", *SECTIONS), default="all"
    )
    parser.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        action="append",
        help=f"default: {' and '.join(DEFAULT_PROFILES)}; repeat the option for several".replace("%", "%%"),
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per method; the fastest counts (default 3)"
    )
    parser.add_argument("--rebuild", action="store_true", help="build the chains again even when cached")
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes for watchset, webhooks, api and live"
    )
    args = parser.parse_args()
    profiles = [PROFILES[p] for p in args.profile or DEFAULT_PROFILES]
    profiling = args.section == "profile" or (
        args.section == "all" and importlib.util.find_spec("pyinstrument")
    )
    if args.section == "profile" and importlib.util.find_spec("pyinstrument") is None:
        parser.exit(2, "profile needs pyinstrument: .venv/bin/pip install pyinstrument\n")
    started = time.monotonic()
    if args.section in ("all", "build", "catchup", "profile"):
        for p in profiles:
            ensure(p, rebuild=args.rebuild)
    if args.section in ("all", "catchup"):
        for p in profiles:
            catchup(p, args.repeat)
    if profiling:
        for p in profiles:
            profile_run(p)
    for name, module in SECTIONS.items():
        if args.section in ("all", name):
            print(f"\n== {name}", flush=True)
            importlib.import_module(module).main(["--quick"] if args.quick else [])
    if args.section == "all" and not profiling:
        print("\n(profile left out: .venv/bin/pip install pyinstrument to include it)")
    print(f"\n(bench took {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
