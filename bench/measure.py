"""Measuring: peak RSS, running one method in a process of its own, and the results table."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def api_started(body: bytes) -> bool:
    """Whether a 200 from the watcher's /healthz says it has finished starting (its /v1 routes
    answer 503 while it says `starting`); any other server's 200 counts as started."""
    try:
        return json.loads(body).get("status") != "starting"
    except (ValueError, AttributeError):
        return True


def peak_rss_mb() -> float:
    """This process's peak resident set size: VmHWM, which starts afresh at exec (ru_maxrss
    does not: a child reports its parent's peak at fork if that was higher)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: the best there is


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one method in a fresh interpreter (`python -m bench.catchup SPEC`), so its peak RSS
    is its own; the child prints its result as the last line of stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.catchup", json.dumps(spec)], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"{spec['method']} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(spec: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The fastest of `repeat` runs (each in its own process), with the highest peak RSS seen."""
    runs = [run_child(spec) for _ in range(repeat)]
    best = dict(min(runs, key=lambda r: r["wall_s"]))
    best["rss_mb"] = max(r["rss_mb"] for r in runs)
    best["runs_s"] = [r["wall_s"] for r in runs]
    return best


@dataclass
class Row:
    label: str
    result: dict[str, Any]

    def rate(self, key: str) -> float:
        return self.result[key] / self.result["wall_s"]


def table(rows: list[Row], *, blocks: int, logs: int) -> str:
    """Rates are of the range: its blocks and Transfer logs per second of wall time, whatever a
    method had to fetch to cover them (a node-side recipient filter fetches fewer)."""
    head = (
        f"{'method':<50} {'wall s':>7} {'logs/s':>9} {'blocks/s':>9} {'payments/s':>11} {'peak RSS MB':>12}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        r = row.result
        payments = f"{r['payments'] / r['wall_s']:>11,.0f}" if "payments" in r else f"{'':>11}"
        lines.append(
            f"{row.label:<50} {r['wall_s']:>7.2f} {logs / r['wall_s']:>9,.0f} {blocks / r['wall_s']:>9,.0f} "
            f"{payments} {r['rss_mb']:>12.0f}"
        )
    return "\n".join(lines)
