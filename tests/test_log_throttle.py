"""A node that stays unreachable is one warning when it goes, then a reminder at most once a
minute, not a line at every retry for as long as it is down."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import structlog
from harness import free_port

from watcher.logs import RepeatThrottle


def test_the_first_warning_of_a_run_passes_then_one_reminder_a_minute():
    now = [1000.0]
    throttle = RepeatThrottle(clock=lambda: now[0])

    def emit(event: str, **fields) -> dict | None:
        try:
            return throttle(None, "warning", {"event": event, **fields})
        except structlog.DropEvent:
            return None

    assert emit("rpc_endpoint_retry", url="http://node-a") is not None  # the change of state
    dropped = 0
    for _ in range(50):
        now[0] += 1.0
        dropped += emit("rpc_endpoint_retry", url="http://node-a") is None
    assert dropped == 50
    assert emit("rpc_endpoint_retry", url="http://node-b") is not None  # another endpoint: its own run
    assert emit("invoice_created") is not None  # other events are never held
    now[0] += 10.5  # 60.5 s after the first
    reminder = emit("rpc_endpoint_retry", url="http://node-a")
    assert reminder is not None and reminder["suppressed"] == 50
    now[0] += 1.0
    assert emit("rpc_endpoint_retry", url="http://node-a") is None
    # A recovery ends every run: the next failure is news again, at once.
    assert emit("follower_recovered", network="eth") is not None
    assert (
        again := emit("rpc_endpoint_retry", url="http://node-a")
    ) is not None and "suppressed" not in again
    # So does a minute of quiet.
    now[0] += 61.0
    assert (
        later := emit("rpc_endpoint_retry", url="http://node-a")
    ) is not None and "suppressed" not in later
    assert emit("follower_step_failed", network="eth") is not None
    assert emit("follower_step_failed", network="base") is not None  # per chain


def test_a_daemon_whose_node_is_down_logs_each_warning_once_in_ten_seconds(tmp_path):
    config = tmp_path / "watcher.toml"
    config.write_text(f"""
database = "{tmp_path / "watcher.db"}"
log_format = "json"
[http]
listen = "127.0.0.1:{free_port()}"
[[chains]]
name = "eth"
chain_id = 1
rpc_urls = ["http://127.0.0.1:{free_port()}"]
poll_interval_seconds = 0.2
confirmations = 3
[[chains.assets]]
symbol = "ETH"
kind = "native"
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "watcher.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "WATCHER_API_KEY": "sk_test_Zq3vN8xK2pL7wR4tY9bC6mD1fG5hJ0aE"},
    )
    lines: list[dict] = []
    try:
        assert proc.stdout is not None
        deadline = None
        while True:
            line = proc.stdout.readline()
            assert line, "the daemon stopped"
            lines.append(json.loads(line))
            if lines[-1]["event"] == "watcher_started":
                deadline = time.monotonic() + 10
                break
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    lines += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    counts = collections.Counter(entry["event"] for entry in lines)
    assert counts["rpc_endpoint_retry"] >= 1 or counts["rpc_all_endpoints_failed"] >= 1, counts
    repeated = {
        event: n for event, n in counts.items() if event.startswith(("rpc_", "follower_step")) and n > 1
    }
    assert repeated == {}, counts
