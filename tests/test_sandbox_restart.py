"""The sandbox restarted on its old database (`watcher run --sandbox --database PATH` twice).

Its chain lives in memory and is new at every start, so the database of the last run follows
a chain that is gone. The watcher says so and starts a fresh database, keeping the old one
aside, instead of following the new chain from the old checkpoint (where, before, no payment
was ever detected again).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from harness import free_port, wait_http
from test_cli import WATCHER, _api


class Sandbox:
    def __init__(self, database: Path) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "WATCHER_API_KEY"}
        self.proc = subprocess.Popen(
            [
                *WATCHER,
                "run",
                "--sandbox",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--block-time",
                "0.3",
                "--database",
                str(database),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.banner: dict[str, str] = {}
        lines: list[str] = []
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 60
        while "API key" not in self.banner or "database" not in self.banner:
            assert time.monotonic() < deadline, "".join(lines)
            line = self.proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
            name, _, value = line.partition(":")
            if value and line.startswith("  "):
                self.banner[name.strip()] = value.strip()
        self.base = f"http://127.0.0.1:{self.port}"
        self.key = self.banner["API key"]
        wait_http(self.base + "/healthz", timeout=20)

    def api(self, method: str, path: str, body: dict | None = None) -> dict:
        return _api(self.base, self.key, method, path, body)

    def pay_and_confirm(self) -> dict:
        invoice = self.api("POST", "/v1/invoices", {"amount": "3.50"})
        self.api("POST", f"/v1/sandbox/invoices/{invoice['id']}/pay", {})
        deadline = time.monotonic() + 30
        while (status := self.api("GET", f"/v1/invoices/{invoice['id']}/status"))["status"] != "confirmed":
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        return invoice

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, out
        return out


def _rows(database: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(database) as db:
        return db.execute(sql).fetchall()


def test_a_restarted_sandbox_sets_the_old_chains_database_aside_and_detects_payments_again(tmp_path):
    database = tmp_path / "sandbox.db"
    first = Sandbox(database)
    try:
        assert first.banner["database"] == f"{database} (new)"
        old_invoice = first.pay_and_confirm()
    finally:
        first.stop()
    [(old_genesis,)] = _rows(database, "SELECT hash FROM chain_genesis WHERE network = 'sandbox'")

    second = Sandbox(database)
    try:
        note = second.banner["database"]
        assert note.startswith(f"{database} (new: the database there followed an earlier sandbox chain"), note
        aside = Path(note.split("moved to ")[1].rstrip(")"))
        assert (
            aside.parent == tmp_path and aside.name.startswith("sandbox.db.") and aside.name.endswith(".old")
        )
        # The old run's data is all in the file set aside, and the new database starts empty.
        assert _rows(aside, "SELECT id, status FROM invoices") == [(old_invoice["id"], "confirmed")]
        assert _rows(aside, "SELECT hash FROM chain_genesis") == [(old_genesis,)]
        assert second.api("GET", "/v1/invoices")["total"] == 0
        # Payments on the new chain are detected and confirmed.
        new_invoice = second.pay_and_confirm()
        [(new_genesis,)] = _rows(database, "SELECT hash FROM chain_genesis WHERE network = 'sandbox'")
        assert new_genesis != old_genesis
        assert [r["id"] for r in second.api("GET", "/v1/invoices")["data"]] == [new_invoice["id"]]
    finally:
        out = second.stop()
    assert "Traceback" not in out


def test_a_sandbox_database_that_followed_no_chain_is_kept(tmp_path):
    from watcher.store import Store

    database = tmp_path / "empty.db"
    Store(database, clock=time.time).close()  # created, migrated, never followed a chain
    sandbox = Sandbox(database)
    try:
        assert sandbox.banner["database"] == f"{database} (kept: it has followed no sandbox chain yet)"
        assert not list(tmp_path.glob("*.old"))
    finally:
        sandbox.stop()


def test_a_sandbox_database_path_that_is_not_a_database_is_exit_2(tmp_path):
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database, " * 100)
    result = subprocess.run(
        [*WATCHER, "run", "--sandbox", "--listen", f"127.0.0.1:{free_port()}", "--database", str(garbage)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--database" in result.stderr and "not a watcher database" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert garbage.read_text() == "not a database, " * 100
