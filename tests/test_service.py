"""Running as a service: sd_notify, signals (SIGTERM, SIGHUP reload), logs, systemd unit.

The daemon runs as a real process where it matters (signals, NOTIFY_SOCKET, exit codes, what
reaches stderr); reload logic is also driven in-process through `Service.reload()`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from harness import Harness, Receiver, free_port, started, wait_http
from structlog.testing import capture_logs

from watcher.config import load_settings
from watcher.logs import configure_logging, redact, register_secrets, resolve_format
from watcher.notify import Notifier
from watcher.sandbox import SandboxChain, sandbox_settings_data
from watcher.service import Service

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "watcher.service"
WATCHER = [sys.executable, "-m", "watcher.cli"]
API_KEY = "sk_test_Qm3v9XcT2pLr8KwZ4nYh7JdF6sBa1Ue5"
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(autouse=True)
def restore_structlog():
    """Reloads and the CLI reconfigure structlog globally; put it back for the other tests."""
    import logging

    saved, root = structlog.get_config(), logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers  # configure_logging's handler writes to this test's stderr
    root.setLevel(level)


# --------------------------------------------------------------------------- helpers


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for the settings: scalars, lists of scalars, tables, arrays of tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(type(v))

    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"\n[{prefix}{k}]\n" + to_toml(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            tables.extend(f"\n[[{prefix}{k}]]\n" + to_toml(x, f"{prefix}{k}.") for x in v)
        elif isinstance(v, (list, tuple)) and not v:
            lines.append(f"{k} = []")
        else:
            lines.append(f"{k} = {value(v)}")
    return "\n".join(lines) + "\n" + "".join(tables)


def api(base: str, method: str, path: str, body: dict | None = None, key: str = API_KEY) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def closed_port() -> int:
    return free_port()  # bound and released: nothing listens there


def sandbox_cmd(tmp_path: Path, port: int, *extra: str) -> list[str]:
    return [
        *WATCHER,
        "run",
        "--sandbox",
        "--listen",
        f"127.0.0.1:{port}",
        "--block-time",
        "0.3",
        "--database",
        str(tmp_path / "watcher.db"),
        *extra,
    ]


def log_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


# --------------------------------------------------------------------------- sd_notify


def test_notifier_is_a_no_op_without_systemd():
    n = Notifier({})
    assert n.address is None and n.watchdog_interval is None
    assert n.ready("x") is False and n.watchdog() is False


def test_notifier_watchdog_interval_is_half_the_timeout_and_only_for_its_pid():
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"


def test_the_daemon_speaks_sd_notify_under_a_fake_notify_socket(tmp_path):
    """READY=1 only once the API answers, STATUS= with the chain's lag, WATCHDOG=1 over and
    over, STOPPING=1 on SIGTERM and exit 0; SIGHUP in the sandbox (no file) is harmless."""
    sock_dir = tempfile.mkdtemp(prefix="wn", dir="/tmp")  # AF_UNIX paths are short
    sock_path = os.path.join(sock_dir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.5)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "400000", "WATCHER_API_KEY": API_KEY}
    env.pop("WATCHDOG_PID", None)
    with open(tmp_path / "stderr", "w") as stderr:  # the daemon keeps its own copy of the descriptor
        proc = subprocess.Popen(
            sandbox_cmd(tmp_path, port), stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
    messages: list[list[str]] = []

    def receive_until(predicate, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fields = sock.recv(4096).decode().split("\n")
            except TimeoutError:
                assert proc.poll() is None or predicate(), f"daemon exited {proc.returncode}"
                continue
            messages.append(fields)
            if "READY=1" in fields and sum("READY=1" in m for m in messages) == 1:
                # The API must already answer when READY=1 arrives.
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200 and started(r.read()), "READY=1 before the start-up was done"
            if predicate():
                return
        raise AssertionError(f"timed out; got {messages}")

    def count(field: str) -> int:
        return sum(field in m for m in messages)

    def lag_statuses() -> list[str]:
        return [f for m in messages for f in m if re.fullmatch(r"STATUS=sandbox lag \d+", f)]

    try:
        receive_until(lambda: count("READY=1") == 1, 60)
        first_ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
        assert not any("WATCHDOG=1" in m for m in messages[:first_ready])
        receive_until(lambda: count("WATCHDOG=1") >= 5 and lag_statuses(), 20)
        proc.send_signal(signal.SIGHUP)
        seen = len(messages)
        receive_until(lambda: sum("WATCHDOG=1" in m for m in messages[seen:]) >= 2, 10)
        assert proc.poll() is None, "SIGHUP must not stop the daemon"
        proc.send_signal(signal.SIGTERM)
        receive_until(lambda: count("STOPPING=1") == 1, 10)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    stopping = next(m for m in messages if "STOPPING=1" in m)
    assert "STATUS=stopping" in stopping
    events = [line["event"] for line in log_lines((tmp_path / "stderr").read_text())]
    assert "config_reload_skipped" in events and "watcher_stopped" in events


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_stops_within_seconds_keeping_undelivered_events_and_a_sound_database(tmp_path):
    """A webhook endpoint that is down: the events stay queued across the stop; the file is
    intact. The same run's stderr is checked for secrets (URL credentials included)."""
    port = free_port()
    hook = f"http://hook-user:hunter2-password@127.0.0.1:{closed_port()}/hooks?token=t0ken-value-1234567890"
    env = {**os.environ, "WATCHER_API_KEY": API_KEY}
    proc = subprocess.Popen(
        sandbox_cmd(tmp_path, port, "--webhook-url", hook),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        base = f"http://127.0.0.1:{port}"
        ids = [api(base, "POST", "/v1/invoices", {"amount": f"{n}.25"})["id"] for n in (1, 2, 3)]
        api(base, "POST", f"/v1/sandbox/invoices/{ids[0]}/pay", {})
        deadline = time.monotonic() + 30
        while api(base, "GET", f"/v1/invoices/{ids[0]}/status")["status"] == "pending":
            assert time.monotonic() < deadline, "the payment was never seen"
            time.sleep(0.1)

        def tried() -> dict[str, int]:  # a reader beside the running daemon (WAL)
            db = sqlite3.connect(f"file:{tmp_path / 'watcher.db'}?mode=ro", uri=True)
            try:
                return dict(db.execute("SELECT id, attempts FROM deliveries").fetchall())
            finally:
                db.close()

        while not (len(seen := tried()) >= 4 and all(a >= 1 for a in seen.values())):
            assert time.monotonic() < deadline, "deliveries were never attempted"
            time.sleep(0.1)
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    took = time.monotonic() - started
    assert proc.returncode == 0, err
    assert took < 5, f"stopping took {took:.1f} s"
    assert "Traceback" not in err

    db = sqlite3.connect(tmp_path / "watcher.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT status, attempts, event_type, id FROM deliveries").fetchall()
        events = db.execute("SELECT type, invoice_id FROM events").fetchall()
        invoices = db.execute("SELECT COUNT(*) FROM invoices").fetchone()[0]
    finally:
        db.close()
    assert invoices == 3
    assert len(rows) == len(events) >= 4  # 3 created, and at least the payment's
    assert {status for status, _, _, _ in rows} == {"pending"}, rows
    # Those tried before the stop kept their attempts (one queued in the last moment, by a block
    # mined meanwhile, may be untried: it is pending all the same).
    attempts = {delivery: n for _, n, _, delivery in rows}
    assert all(attempts[delivery] >= 1 for delivery in seen), "the endpoint should have been tried"
    assert sorted(i for t, i in events if t == "invoice.created") == sorted(ids)

    # Secrets: the banner (stdout) shows them on purpose; the logs never do.
    secret = re.search(r"webhook secret: (\S+)", out)[1]
    assert API_KEY in out and secret.startswith("whsec_")
    for value in (API_KEY, secret, secret[len("whsec_") :], "hunter2-password", "t0ken-value-1234567890"):
        assert value not in err
    lines = log_lines(err)
    assert lines and len(lines) == len(err.strip().splitlines()), "stderr into a pipe is JSON lines"
    assert all(SNAKE.match(line["event"]) for line in lines), [line["event"] for line in lines]
    retried = [line for line in lines if line["event"] == "webhook_retry_scheduled"]
    assert retried and all("127.0.0.1" in line["url"] for line in retried)


# --------------------------------------------------------------------------- SIGHUP, in-process


class FileHarness(Harness):
    """The harness's daemon, configured from a TOML file the test rewrites, secrets from `env`."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.path = tmp_path / "watcher.toml"
        self.env = {"API_KEY": self.api_key, "HOOK_SECRET": self.receiver.secret}
        self.data: dict[str, Any] = {}

    def write(self, **changes: Any) -> None:
        self.data.update(changes)
        self.path.write_text(to_toml(self.data))

    def make_service(self) -> Service:
        assert self.chain is not None
        if not self.data:
            self.write(
                database=str(self.tmp_path / "watcher.db"),
                log_level="warning",
                http={"listen": f"127.0.0.1:{free_port()}", "api_key_env": "API_KEY"},
                webhooks=[{"url": self.receiver.url, "secret_env": "HOOK_SECRET"}],
                chains=[sandbox_settings_data(self.chain, poll_interval=0.05)],
            )
        self.service = Service(
            load_settings(self.path, env=self.env),
            sandbox=self.chain,
            expiry_interval=0.2,
            config_path=self.path,
            env=self.env,
        )
        return self.service

    async def start_service(self) -> None:
        await self.make_service().start()


@pytest.fixture
async def fh(tmp_path):
    h = FileHarness(tmp_path)
    second = Receiver(new_secret())
    await second.start()
    h.second = second
    h.env["HOOK_SECRET_2"] = second.secret
    await h.start()
    try:
        yield h
    finally:
        await h.close()
        await second.stop()


def hooks(*receivers: tuple[Receiver, str]) -> list[dict]:
    return [{"url": r.url, "secret_env": env} for r, env in receivers]


async def test_reload_swaps_webhook_endpoints_and_secrets(fh):
    first = await fh.create(amount="1")
    await fh.wait_events(first["id"], "invoice.created")
    fh.write(webhooks=hooks((fh.second, "HOOK_SECRET_2")))
    with capture_logs() as logs:
        assert fh.service.reload() is True
    second = await fh.create(amount="2")
    await fh.wait_for(
        lambda: fh.second.types_for(second["id"]) == ["invoice.created"], what="event at the new URL"
    )
    assert fh.second.bad_signatures == 0  # signed with the new endpoint's secret
    assert fh.receiver.for_invoice(second["id"]) == []
    reloaded = [entry for entry in logs if entry["event"] == "config_reloaded"]
    assert reloaded and reloaded[0]["changes"] == {
        "webhooks_added": [fh.second.url],
        "webhooks_removed": [fh.receiver.url],
    }
    assert not [e for e in logs if e["event"] == "config_changes_need_restart"]
    assert fh.service.settings.webhooks[0].url == fh.second.url
    text = repr(logs)
    assert fh.receiver.secret not in text and fh.second.secret not in text and fh.api_key not in text


async def test_a_bad_file_is_logged_and_the_running_settings_stay(fh):
    for broken in ("webhooks = [ this is not toml", to_toml({**fh.data, "bogus_key": 1})):
        fh.path.write_text(broken)
        with capture_logs() as logs:
            assert fh.service.reload() is False
        failed = [e for e in logs if e["event"] == "config_reload_failed"]
        assert failed and failed[0]["log_level"] == "error", logs
    assert failed[0]["key"] == "bogus_key"
    # A secret variable that is missing is an error too, and the old secret stays in use.
    fh.write(webhooks=hooks((fh.second, "NOT_SET_ANYWHERE")))
    assert fh.service.reload() is False
    invoice = await fh.create()
    await fh.wait_events(invoice["id"], "invoice.created")
    assert fh.second.events == []


async def test_reload_names_the_keys_that_need_a_restart_and_applies_the_rest(fh):
    fh.write(
        http={"listen": "127.0.0.1:1", "api_key_env": "API_KEY"},
        invoices={"default_expiry_minutes": 5},
        webhooks=hooks((fh.receiver, "HOOK_SECRET"), (fh.second, "HOOK_SECRET_2")),
    )
    with capture_logs() as logs:
        assert fh.service.reload() is True
    warning = next(e for e in logs if e["event"] == "config_changes_need_restart")
    assert warning["keys"] == ["http", "invoices"] and warning["log_level"] == "warning"
    assert fh.service.settings.http.listen != "127.0.0.1:1"  # still the running one
    invoice = await fh.create()
    await fh.wait_for(
        lambda: fh.second.types_for(invoice["id"]) and fh.receiver.types_for(invoice["id"]),
        what="both endpoints",
    )


async def test_reload_changes_the_log_level_and_format(fh, capsys):
    configure_logging("console", "warning")
    fh.write(log_level="debug", log_format="json")
    assert fh.service.reload() is True
    structlog.get_logger("t").debug("probe_event", n=1)
    err = capsys.readouterr().err
    lines = log_lines(err)
    assert {"event": "probe_event", "n": 1}.items() <= next(
        e for e in lines if e["event"] == "probe_event"
    ).items()
    reloaded = next(e for e in lines if e["event"] == "config_reloaded")
    assert reloaded["changes"] == {"log_level": "warning -> debug", "log_format": "auto -> json"}
    fh.write(log_level="error")
    assert fh.service.reload() is True
    structlog.get_logger("t").warning("hidden_event")
    assert "hidden_event" not in capsys.readouterr().err


async def test_the_sandbox_has_nothing_to_reload(harness):
    with capture_logs() as logs:
        assert harness.service.reload() is False
    assert logs[0]["event"] == "config_reload_skipped" and "sandbox" in logs[0]["reason"]


async def test_sighup_reloads_through_the_running_loop_and_sigterm_stops(tmp_path):
    """The real signals, delivered to this process, handled by run_until_signalled."""
    h = FileHarness(tmp_path)
    second = Receiver(new_secret())
    await second.start()
    h.env["HOOK_SECRET_2"] = second.secret
    await h.receiver.start()
    h.chain = await asyncio.get_running_loop().run_in_executor(None, SandboxChain)
    h.http = aiohttp.ClientSession()
    try:
        service = h.make_service()
        task = asyncio.create_task(service.run_until_signalled())
        await h.wait_for(lambda: service.store is not None and service.base_url, what="service started")
        h.write(webhooks=hooks((second, "HOOK_SECRET_2")))
        os.kill(os.getpid(), signal.SIGHUP)
        await h.wait_for(lambda: service.settings.webhooks[0].url == second.url, what="reload")
        invoice = await h.create()
        await h.wait_for(
            lambda: second.types_for(invoice["id"]) == ["invoice.created"], what="event at the new URL"
        )
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, timeout=15)
        assert service.store is None  # stopped and closed
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # handlers removed again
        h.service = None
    finally:
        await h.close()
        await second.stop()


# --------------------------------------------------------------- SIGHUP, real process, real config


class LocalNode:
    """A JSON-RPC node over HTTP answered by an in-process eth-tester chain."""

    def __init__(self, chain: SandboxChain) -> None:
        self.chain = chain
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        payload = orjson.loads(await request.read())

        def answer(call: dict) -> dict:
            try:
                return {
                    "jsonrpc": "2.0",
                    "id": call["id"],
                    "result": self.chain.transport._answer(call["method"], call["params"]),
                }
            except Exception as exc:
                return {"jsonrpc": "2.0", "id": call["id"], "error": {"code": -32000, "message": str(exc)}}

        result = await self.chain.run(
            lambda: [answer(c) for c in payload] if isinstance(payload, list) else answer(payload)
        )
        return web.Response(body=orjson.dumps(result), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_watcher_run_with_a_config_file_reloads_on_sighup(tmp_path):
    """`watcher run --config`, as systemd starts it (JOURNAL_STREAM set, so JSON logs), against
    a local node: SIGHUP moves the webhooks to a new endpoint, a broken file changes nothing,
    SIGTERM exits 0."""
    chain = await asyncio.get_running_loop().run_in_executor(None, SandboxChain)
    node = LocalNode(chain)
    a, b = Receiver(new_secret()), Receiver(new_secret())
    for server in (node, a, b):
        await server.start()
    chain_data = sandbox_settings_data(chain, poll_interval=0.1)
    chain_data["rpc_urls"] = [node.url]
    port = free_port()
    data = {
        "database": str(tmp_path / "watcher.db"),
        "log_level": "info",
        "http": {"listen": f"127.0.0.1:{port}"},
        "webhooks": [{"url": a.url, "secret_env": "HOOK_A"}],
        "chains": [chain_data],
    }
    config = tmp_path / "watcher.toml"
    config.write_text(to_toml(data))
    env = {
        **os.environ,
        "WATCHER_API_KEY": API_KEY,
        "HOOK_A": a.secret,
        "HOOK_B": b.secret,
        "JOURNAL_STREAM": "8:12345",
    }
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *WATCHER, "run", "--config", str(config), stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
    base = f"http://127.0.0.1:{port}"

    async def request(method: str, path: str, body: dict | None = None) -> dict:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, base + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"}) as r,
        ):
            assert r.status in (200, 201), await r.text()
            return await r.json()

    async def wait(check, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            assert proc.returncode is None, stderr_path.read_text()
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{stderr_path.read_text()}")

    def logged(event: str) -> int:
        return sum(1 for line in log_lines(stderr_path.read_text()) if line["event"] == event)

    try:
        await wait(lambda: logged("watcher_started"), "start")
        one = await request("POST", "/v1/invoices", {"amount": "3"})
        await wait(lambda: a.types_for(one["id"]) == ["invoice.created"], "event at A")

        data["webhooks"] = [{"url": b.url, "secret_env": "HOOK_B", "events": ["invoice.created"]}]
        config.write_text(to_toml(data))
        proc.send_signal(signal.SIGHUP)
        await wait(lambda: logged("config_reloaded") == 1, "reload")
        two = await request("POST", "/v1/invoices", {"amount": "4"})
        await wait(lambda: b.types_for(two["id"]) == ["invoice.created"], "event at B")

        config.write_text("[[chains]\nbroken")
        proc.send_signal(signal.SIGHUP)
        await wait(lambda: logged("config_reload_failed") == 1, "failed reload")
        three = await request("POST", "/v1/invoices", {"amount": "5"})
        await wait(lambda: b.types_for(three["id"]) == ["invoice.created"], "event at B after a bad reload")
        assert a.for_invoice(two["id"]) == a.for_invoice(three["id"]) == []
        assert a.bad_signatures == b.bad_signatures == 0
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout=20)
        except TimeoutError:
            proc.kill()
            raise
        for server in (node, a, b):
            await server.stop()
        chain.close()
    err = stderr_path.read_text()
    assert code == 0, err
    lines = log_lines(err)
    assert len(lines) == len(err.strip().splitlines()), "JSON under systemd"
    assert all(SNAKE.match(line["event"]) for line in lines)
    for value in (API_KEY, a.secret, b.secret):
        assert value not in err
    assert lines[-1]["event"] == "watcher_stopped"


# --------------------------------------------------------------------------- logs


def test_log_format_follows_the_file_then_systemd_then_the_terminal():
    class Tty:
        def isatty(self) -> bool:
            return True

    class Pipe:
        def isatty(self) -> bool:
            return False

    assert resolve_format("console", {"JOURNAL_STREAM": "8:1"}, Pipe()) == "console"
    assert resolve_format("json", {}, Tty()) == "json"
    assert resolve_format(None, {"JOURNAL_STREAM": "8:1"}, Tty()) == "json"
    assert resolve_format(None, {}, Tty()) == "console"
    assert resolve_format(None, {}, Pipe()) == "json"


def test_redaction_strips_registered_secrets_and_url_credentials():
    register_secrets(["sk_live_abcdefgh12345678"])
    event = redact(
        None,
        "info",
        {
            "event": "x",
            "error": "boom sk_live_abcdefgh12345678",
            "nested": {"k": ["sk_live_abcdefgh12345678"]},
            "url": "https://u:p@rpc.example/v3/0123456789abcdef0123456789abcdef",
            "rpc_url": "https://x.example/?apikey=zzz",
        },
    )
    assert event["error"] == "boom ***" and event["nested"] == {"k": ["***"]}
    assert (
        event["url"] == "https://rpc.example/v3/***" and event["rpc_url"] == "https://x.example/?apikey=***"
    )


async def test_no_log_call_passes_a_secret_or_an_unnamed_event(harness):
    """In-process, before any redaction: what every call site hands to the logger."""
    with capture_logs() as logs:
        invoice = await harness.create(amount="2")
        await harness.pay(invoice["id"])
        await harness.mine(4)
        await harness.wait_events(invoice["id"], "invoice.confirmed")
        harness.receiver.fail_next = 1
        other = await harness.create(amount="1")
        await harness.wait_for(lambda: harness.receiver.attempts >= 4, what="a failed attempt")
        await harness.stop_service()
    assert other and logs
    text = repr(logs)
    assert harness.api_key not in text and harness.receiver.secret not in text
    assert harness.receiver.secret[len("whsec_") :] not in text
    assert all(SNAKE.match(e["event"]) for e in logs), [e["event"] for e in logs]


# --------------------------------------------------------------------------- systemd unit


def _verify_unit(tmp_path: Path, unit: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` on the shipped unit, unchanged. Its ExecStart names the real
    install path (/usr/local/bin/watcher), which does not exist on a build machine, so a
    drop-in found through SYSTEMD_UNIT_PATH points ExecStart at this checkout's entry point;
    every other line is verified as shipped."""
    entry = Path(sys.executable).with_name("watcher")
    assert os.access(entry, os.X_OK), f"{entry} (the installed console script) is missing"
    dropin = tmp_path / "units" / f"{unit.name}.d"
    dropin.mkdir(parents=True)
    (dropin / "ci.conf").write_text(
        f"[Service]\nExecStart=\nExecStart={entry} run --config /etc/watcher/watcher.toml\n"
    )
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path / 'units'}:", "SYSTEMD_LOG_COLOR": "0"}
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env, timeout=120
    )


systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed (apt-get install systemd); .ci/run installs it in CI",
)


@systemd_analyze
def test_systemd_analyze_verify_passes(tmp_path):
    result = _verify_unit(tmp_path, UNIT)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@systemd_analyze
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The check has teeth: a typo'd key and a wrong path fail it."""
    broken = tmp_path / "watcher.service"
    broken.write_text(UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes"))
    result = _verify_unit(tmp_path, broken)
    assert "ProtectHomme" in result.stderr
    missing = tmp_path / "other" / "watcher.service"
    missing.parent.mkdir()
    missing.write_text(UNIT.read_text())
    plain = subprocess.run(
        ["systemd-analyze", "verify", str(missing)], capture_output=True, text=True, timeout=120
    )
    if not Path("/usr/local/bin/watcher").exists():
        assert plain.returncode != 0 and "/usr/local/bin/watcher" in plain.stderr


def test_the_unit_is_what_the_contract_asks_for():
    text = UNIT.read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(("#", ";"))
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["ExecStart"] == "/usr/local/bin/watcher run --config /etc/watcher/watcher.toml"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["Restart"] == "on-failure" and settings["WatchdogSec"]
    assert settings["User"] == "watcher" and settings["StateDirectory"] == "watcher"
    assert settings["EnvironmentFile"].startswith("/etc/watcher/")
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices"):
        assert settings[option] == "yes", option
    assert settings["ProtectSystem"] == "strict"
    # Room for http.max_connections' default beside the descriptors the daemon keeps for itself.
    from watcher.httpserver import DEFAULT_MAX_CONNECTIONS, RESERVED_DESCRIPTORS

    assert int(settings["LimitNOFILE"]) >= DEFAULT_MAX_CONNECTIONS + RESERVED_DESCRIPTORS


LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "msg"}
SECRET_WORDS = re.compile(
    r"secret|api_?key|password|passwd|bearer|authorization|credential|mnemonic|private_key", re.IGNORECASE
)


def test_every_log_call_names_a_snake_case_event_and_passes_no_secret_field():
    """Read every `log.<level>(...)` call in watcher/: the first argument is a literal
    snake_case event name, and no field or value expression looks like a secret."""
    import ast

    calls = 0
    for path in sorted((ROOT / "watcher").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in ("log", "logger")
            ):
                continue
            calls += 1
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            assert (
                node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
            ), where
            assert SNAKE.match(node.args[0].value), f"{where}: {node.args[0].value!r}"
            for kw in node.keywords:
                assert kw.arg is not None and not SECRET_WORDS.search(kw.arg), f"{where}: field {kw.arg}"
                assert not SECRET_WORDS.search(ast.unparse(kw.value)), f"{where}: {ast.unparse(kw.value)}"
    assert calls >= 20
