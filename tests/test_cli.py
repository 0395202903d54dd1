"""The command line as a user runs it: real processes, real signals, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from harness import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "watcher.example.toml"
WATCHER = [sys.executable, "-m", "watcher.cli"]
ENV = {
    **os.environ,
    "WATCHER_API_KEY": "sk_test_0123456789abcdefghijkLMNOPQ",
    "WATCHER_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8,
}


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*WATCHER, *args], capture_output=True, text=True, env=env or ENV, timeout=60)


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip().startswith("watcher 0.")


def test_check_config_accepts_the_example_and_hides_secrets():
    result = run("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "ethereum" in result.stdout
    assert ENV["WATCHER_API_KEY"] not in result.stdout
    assert ENV["WATCHER_WEBHOOK_SECRET"] not in result.stdout


def test_check_config_names_the_bad_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace("confirmations = 12", "confirmations = 0", 1))
    result = run("check-config", "--config", str(bad))
    assert result.returncode == 2
    assert "chains[0].confirmations" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_and_bad_usage_exit_2(tmp_path):
    missing = run("check-config", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    usage = run("run", "--block-time", "soon")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def _api(base: str, key: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_sandbox_quick_start_pays_an_invoice_and_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "WATCHER_API_KEY"}
    proc = subprocess.Popen(
        [
            *WATCHER,
            "run",
            "--sandbox",
            "--listen",
            f"127.0.0.1:{port}",
            "--block-time",
            "0.3",
            "--database",
            str(tmp_path / "sandbox.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        key = None
        deadline = time.monotonic() + 60
        while key is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            if "API key:" in line:
                key = line.split("API key:")[1].strip()
        assert key and key.startswith("sk_sandbox_")
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", timeout=10)
        invoice = _api(base, key, "POST", "/v1/invoices", {"amount": "12.50"})
        assert invoice["status"] == "pending"
        _api(base, key, "POST", f"/v1/sandbox/invoices/{invoice['id']}/pay", {})
        status = None
        for _ in range(200):
            status = _api(base, key, "GET", f"/v1/invoices/{invoice['id']}/status")
            if status["status"] == "confirmed":
                break
            time.sleep(0.1)
        assert status is not None and status["status"] == "confirmed", status
        assert status["payment_summary"]["received_amount"] == "12.50"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "watcher_stopped" in out
    assert "Traceback" not in out


def test_an_address_already_in_use_is_one_clear_line_not_a_traceback(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(
            "run", "--sandbox", "--listen", f"127.0.0.1:{port}", "--database", str(tmp_path / "w.db")
        )
    assert result.returncode == 1
    assert (
        "listen_failed" in result.stdout + result.stderr
        and "address already in use" in result.stdout + result.stderr
    )
    assert "Traceback" not in result.stdout + result.stderr
    # It never started, so it does not say it stopped (before or after saying why it failed).
    assert "watcher_stopped" not in result.stdout + result.stderr


def test_a_database_that_cannot_be_created_is_one_line_and_exit_2(tmp_path):
    """Exit 2, so systemd's RestartPreventExitStatus=2 does not restart a daemon that would
    only fail the same way; one line that names the path and says why."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the database's directory should be")
    for database, why in ((blocker / "watcher.db", "is not a directory"), (tmp_path, "")):
        result = run("run", "--sandbox", "--listen", f"127.0.0.1:{free_port()}", "--database", str(database))
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr
        [line] = [line for line in result.stderr.splitlines() if "configuration error" in line]
        # The sandbox looks at an existing path first (is it a database of an earlier sandbox chain?).
        assert line.startswith(
            (
                f"watcher: configuration error: database: cannot open or create {database}",
                f"watcher: configuration error: --database: {database} is not a watcher database",
            )
        )
        assert why in line
        assert (
            "watcher_crashed" not in result.stdout + result.stderr and "watcher_stopped" not in result.stdout
        )


def test_the_sandbox_takes_its_webhook_secret_and_api_key_from_the_environment(tmp_path):
    port = free_port()
    pinned = {
        "WATCHER_API_KEY": "sk_pinned_Zq3vN8xK2pL7wR4tY9bC6mD1fG5hJ0aE",
        "WATCHER_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8,
    }
    proc = subprocess.Popen(
        [
            *WATCHER,
            "run",
            "--sandbox",
            "--listen",
            f"127.0.0.1:{port}",
            "--block-time",
            "0",
            "--checkout-listen",
            f"127.0.0.1:{free_port()}",  # not port + 1, which another socket may hold
            "--webhook-url",
            "http://127.0.0.1:9/hooks",
            "--database",
            str(tmp_path / "sandbox.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **pinned},
    )
    try:
        assert proc.stdout is not None
        shown: dict[str, str] = {}
        while "webhook secret" not in shown:
            line = proc.stdout.readline()
            assert line, "the sandbox stopped before printing its settings"
            name, sep, value = line.strip().partition(":")
            if sep and name in ("API key", "webhook secret"):
                shown[name] = value.strip()
        assert shown == {
            "API key": pinned["WATCHER_API_KEY"],
            "webhook secret": pinned["WATCHER_WEBHOOK_SECRET"],
        }
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=30)
        assert _api(f"http://127.0.0.1:{port}", pinned["WATCHER_API_KEY"], "GET", "/v1/chains")["data"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    bad = run(
        "run",
        "--sandbox",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--webhook-url",
        "http://127.0.0.1:9/hooks",
        env={**os.environ, "WATCHER_WEBHOOK_SECRET": "not-a-secret"},
    )
    assert bad.returncode == 2 and "WATCHER_WEBHOOK_SECRET" in bad.stderr
