"""The daemon's first answer: CPU and wall time from spawn, or instructions (issue 13 #5).

`watcher run --config` is spawned `--runs` times on a store (an empty one by default; `--store`
names another, e.g. the watch-set bench's 1,000,000-address one) and polled with a raw
`GET /healthz` every millisecond; at the first answer the daemon's CPU time is read from
/proc and it is stopped. No node is needed: the first answer comes before the nodes are asked
anything (its RPC URL refuses connections). The config is an operator's: logs in JSON at info,
a webhook endpoint, one chain with a deposit xpub and a checksummed token address.

On a shared machine the wall time follows the load and the CPU time less so; `--callgrind`
counts the instructions up to the first answer instead (valgrind, about a minute a run), which
do not move with the load at all. `--tree DIR` runs another checkout's `watcher/` (a "before").
Bytecode is compiled first, as `pip install` does (bench/daemon.py: compile_watcher).
"""

from __future__ import annotations

import argparse
import compileall
import glob
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.api_load import cpu_seconds, free_port
from bench.daemon import ROOT, config_head
from bench.watchset import MNEMONIC
from watcher.addresses import account_xpub_from_mnemonic

ENV = {
    "WATCHER_API_KEY": "sk_bench_q8Zr3LkP0vXw2Yt9Jm4Nc7Hb5Gf1Ds6Ae",
    "WATCHER_WEBHOOK_SECRET": "whsec_VFrapvGVj7xgQZ+oZ2tK6BzDVOOGO2zncVwrG8BjoTw=",
}
REQUEST = b"GET /healthz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def config(db: Path, port: int, xpub: str) -> str:
    return (
        config_head(db, port)
        + f'''
[[webhooks]]
url = "http://127.0.0.1:9/hook"
secret_env = "WATCHER_WEBHOOK_SECRET"

[[chains]]
name = "bench"
chain_id = 900001
rpc_urls = ["http://127.0.0.1:9"]
poll_interval_seconds = 1.0
confirmations = 3
start_block = "latest"
deposit_xpub = "{xpub}"

[[chains.assets]]
symbol = "TUSD"
kind = "erc20"
contract = "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
decimals = 6
usd_rate = "1"
'''
    )


def first_answer(tree: Path, db: Path, xpub: str, callgrind: bool) -> dict[str, float]:
    """One spawn: seconds and CPU seconds (or instructions) up to the first /healthz answer."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    port = free_port()
    (tmp / "watcher.toml").write_text(config(db, port, xpub))
    prefix = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.%p"] if callgrind else []
    spawned = time.monotonic()
    with open(tmp / "daemon.log", "w") as log:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "watcher.cli", "run", "--config", str(tmp / "watcher.toml")],
            env={**os.environ, **ENV},
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tree,
        )
    try:
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                    s.sendall(REQUEST)
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError((tmp / "daemon.log").read_text()[-2000:]) from None
                time.sleep(0.001)
        result = {"wall_s": time.monotonic() - spawned, "cpu_s": cpu_seconds(process.pid)}
        if callgrind:
            subprocess.run(["callgrind_control", "-d", str(process.pid)], capture_output=True, check=True)
            result["instructions"] = _dumped_instructions(tmp, process.pid)
    finally:
        process.kill()
        process.wait()
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _dumped_instructions(tmp: Path, pid: int) -> float:
    for path in glob.glob(f"{tmp}/cg.{pid}.1*"):
        for line in Path(path).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return float(line.split()[1])
    raise RuntimeError("callgrind wrote no dump")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="spawns per tree (10; 1 with --callgrind)")
    parser.add_argument("--store", type=Path, help="the store to start on (default: a new, empty one)")
    parser.add_argument("--tree", type=Path, action="append", help="checkout(s) to run (default: this one)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions (valgrind)")
    args = parser.parse_args(argv)
    trees = args.tree or [ROOT]
    xpub = account_xpub_from_mnemonic(MNEMONIC)
    for tree in trees:
        compileall.compile_dir(tree / "watcher", quiet=1)
    db = args.store or Path(tempfile.mkdtemp(prefix="bench-startup-db-")) / "watcher.db"
    if args.store is None:  # its schema made now: no run pays for creating it
        from watcher.store import Store

        Store(db, clock=time.time).close()
    runs = 1 if args.callgrind and args.runs == 10 else args.runs
    print(f"== start-up to the first answer: store {db} ({db.stat().st_size if db.exists() else 0:,} bytes)")
    results: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
    for _ in range(runs):  # the trees alternate, run by run
        for tree in trees:
            results[tree].append(first_answer(tree, db, xpub, args.callgrind))
    for tree, rs in results.items():
        cpu = sorted(r["cpu_s"] * 1000 for r in rs)
        wall = sorted(r["wall_s"] * 1000 for r in rs)
        line = (
            f"{str(tree):<40} CPU ms min {cpu[0]:.0f} median {statistics.median(cpu):.0f}; "
            f"wall ms min {wall[0]:.0f} median {statistics.median(wall):.0f} ({len(rs)} runs)"
        )
        if args.callgrind:
            line += f"; instructions {statistics.median(r['instructions'] for r in rs) / 1e6:,.0f} M"
        print(line, flush=True)


if __name__ == "__main__":
    main()
