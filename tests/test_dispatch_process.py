"""The webhook dispatcher in a process of its own (watcher/dispatchproc.py), as `watcher run` runs
it: deliveries signed and counted, a child that dies started again, new secrets handed over, a
graceful stop, and no child left behind when the daemon itself is killed."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import sqlite3
import sys
import time
from pathlib import Path

import orjson
from aiohttp import web
from daemon import SandboxDaemon
from harness import Harness, Receiver
from test_ops import sample, scrape

from watcher import childproc
from watcher.dispatchproc import DispatcherProcess


class ProcessHarness(Harness):
    dispatcher_process = True


async def _received(h: Harness, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while len(h.receiver.events) < count:
        assert time.monotonic() < deadline, f"{len(h.receiver.events)} of {count} events received"
        await asyncio.sleep(0.05)


async def _recorded(h: Harness, count: int, timeout: float = 10.0) -> None:
    """Until `count` deliveries are recorded as delivered."""
    deadline = time.monotonic() + timeout
    while True:
        status, page, _ = await h.request("GET", "/v1/webhook-deliveries?status=delivered&limit=200")
        assert status == 200, page
        if len(page["data"]) >= count:
            return
        assert time.monotonic() < deadline, page
        await asyncio.sleep(0.02)


async def _child(h: Harness) -> DispatcherProcess:
    """The service's dispatcher, once its child has been started."""
    assert h.service is not None
    dispatcher = h.service.dispatcher
    assert isinstance(dispatcher, DispatcherProcess)
    deadline = time.monotonic() + 10
    while dispatcher.process is None:
        assert time.monotonic() < deadline, "no child started"
        await asyncio.sleep(0.01)
    return dispatcher


def _gone(pid: int) -> bool:
    """Exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_the_dispatchers_process_starts_once_the_chains_are_at_their_head(harnesses, monkeypatch):
    """Its interpreter's start would share the cores with the catch-up after a downtime: it is
    started once every chain's checkpoint is at its head, which here is long before the wait
    runs out."""
    from watcher import service

    monkeypatch.setattr(service, "DISPATCHER_START_WAIT", 60.0)
    h = await harnesses(ProcessHarness)
    started = time.monotonic()
    child = await _child(h)
    assert time.monotonic() - started < 10
    assert h.service is not None and h.service.store is not None
    for name, follower in h.service.followers.items():
        cursor = h.service.store.cursor(name)
        assert cursor is not None and follower.status.head_block is not None
        assert cursor.number >= follower.status.head_block - 1  # at the head (a block mined since, at most)
    assert child.process is not None


async def test_the_dispatchers_process_starts_after_its_wait_when_a_chain_never_catches_up(
    harnesses, monkeypatch
):
    """A chain whose steps never end (a node that hangs), and whose checkpoint cannot even be
    read, holds the dispatcher's start back no longer than DISPATCHER_START_WAIT; the events
    appended meanwhile wait in the store and go out once it runs."""
    from watcher import service
    from watcher.follower import Follower

    async def never_steps(self, overlap: bool = False) -> int:
        await asyncio.Event().wait()
        return 0

    monkeypatch.setattr(service, "DISPATCHER_START_WAIT", 1.5)
    monkeypatch.setattr(Follower, "run_once", never_steps)
    h = await harnesses(ProcessHarness)
    assert h.service is not None and h.service.store is not None

    def unreadable(name: str) -> None:  # a checkpoint the disk fails to give: behind, not fatal
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(h.service.store, "cursor", unreadable)
    started = time.monotonic()
    created = await h.create()
    await asyncio.sleep(0.5)
    assert h.service is not None and h.service.dispatcher is not None
    assert h.service.dispatcher.process is None  # still waiting for the chain
    assert h.receiver.events == []
    await _child(h)
    assert time.monotonic() - started >= 1.0
    await _received(h, 1)
    assert [e.invoice_id for e in h.receiver.events] == [created["id"]]


async def test_events_go_out_from_a_child_process_signed_and_counted_in_the_daemons_metrics(harnesses):
    h = await harnesses(ProcessHarness)
    child = await _child(h)
    assert child.process is not None and child.process.pid != os.getpid()
    ids = [(await h.create())["id"] for _ in range(5)]

    await _received(h, 5)
    assert sorted(e.invoice_id for e in h.receiver.events) == sorted(ids)
    assert {e.type for e in h.receiver.events} == {"invoice.created"}
    assert h.receiver.bad_signatures == 0
    # The child's reports reach the daemon's /metrics (grouped every 50 ms).
    deadline = time.monotonic() + 5
    while sample(await scrape(h), "watcher_webhook_deliveries_total", outcome="delivered") != 5:
        assert time.monotonic() < deadline, await scrape(h)
        await asyncio.sleep(0.05)
    samples = await scrape(h)
    assert sample(samples, "watcher_webhook_delivery_duration_seconds_count") == 5


async def test_a_child_that_dies_is_started_again_and_delivers_what_was_queued_meanwhile(harnesses):
    h = await harnesses(ProcessHarness)
    child = await _child(h)
    await h.create()
    await _received(h, 1)
    await _recorded(h, 1)  # else the attempt is sent again after the restart (at least once)
    first = child.process
    assert first is not None
    first.send_signal(signal.SIGKILL)
    await first.wait()
    queued = [(await h.create())["id"] for _ in range(3)]  # while no child runs

    await _received(h, 4, timeout=20)
    assert child.starts == 2 and child.process is not first
    assert sorted(e.invoice_id for e in h.receiver.events[1:]) == sorted(queued)
    assert len({e.event_id for e in h.receiver.events}) == 4
    samples = await scrape(h)  # the operator sees it: one exit, and running again
    assert sample(samples, "watcher_webhook_dispatcher_exits_total") == 1
    assert sample(samples, "watcher_webhook_dispatcher_up") == 1


async def test_new_secrets_reach_the_child(harnesses):
    h = await harnesses(ProcessHarness)
    await h.create()
    await _received(h, 1)
    rotated = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    (await _child(h)).set_secrets({h.receiver.url: rotated})
    await asyncio.sleep(1.0)  # the message is read before the next event is queued (a loaded machine)
    h.receiver.secret = rotated  # the receiver now accepts only the new one

    await h.create()
    await _received(h, 2)
    assert h.receiver.bad_signatures == 0


class SlowReceiver(Receiver):
    """Answers each attempt a second late: the attempt is in flight when the stop begins."""

    answered = 0
    holding = 0

    async def _handle(self, request: web.Request) -> web.Response:
        self.holding += 1
        await asyncio.sleep(1.0)
        self.answered += 1
        return await super()._handle(request)


class SlowProcessHarness(ProcessHarness):
    receiver_class = SlowReceiver


async def test_the_child_records_its_attempt_in_flight_and_exits_when_the_daemon_stops(harnesses):
    h = await harnesses(SlowProcessHarness)
    process = (await _child(h)).process
    assert process is not None
    invoice = await h.create()
    assert isinstance(h.receiver, SlowReceiver)
    deadline = time.monotonic() + 15
    while not h.receiver.holding:  # the attempt is in flight now
        assert time.monotonic() < deadline, "no attempt came"
        await asyncio.sleep(0.01)
    assert h.service is not None and h.service.store is not None
    database = h.service.store.path
    await h.stop_service()

    assert h.receiver.answered == 1
    assert process.returncode == 0
    with sqlite3.connect(database) as conn:
        status = conn.execute(
            "SELECT status FROM deliveries WHERE invoice_id = ?", [invoice["id"]]
        ).fetchone()
    assert status == ("delivered",)


async def test_the_child_exits_when_the_daemon_is_killed(tmp_path):
    daemon = SandboxDaemon(tmp_path)
    await daemon.__aenter__()  # not `async with`: its exit wants the daemon to stop with 0
    assert daemon.proc is not None
    try:
        deadline = time.monotonic() + 10
        while not (children := daemon.children()):
            assert time.monotonic() < deadline, "no dispatcher started"
            await asyncio.sleep(0.05)
        assert len(children) == 1, children
        os.kill(daemon.pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while not _gone(children[0]):
            assert time.monotonic() < deadline, "the dispatcher outlived the daemon"
            await asyncio.sleep(0.1)
    finally:
        if daemon.proc.returncode is None:
            daemon.proc.kill()
        await daemon.proc.wait()


async def test_the_child_holds_no_secret_in_its_environment(harnesses, monkeypatch):
    h = await harnesses(ProcessHarness)
    process = (await _child(h)).process
    assert process is not None
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert "PATH" in names  # the rest of the environment is there
    assert not names & {"API_KEY", "HOOK_SECRET", "NOTIFY_SOCKET"}, names
    assert not any(h.receiver.secret.encode() in entry or h.api_key.encode() in entry for entry in environ)

    # A reload that names another variable: a child started after it lacks that one too.
    monkeypatch.setenv("NEW_HOOK_SECRET", "whsec_x")
    child = await _child(h)
    child.set_secrets({h.receiver.url: h.receiver.secret}, secret_env=["NEW_HOOK_SECRET"])
    environment = childproc.environment(child.child.secret_env)
    assert "NEW_HOOK_SECRET" not in environment and "HOOK_SECRET" not in environment


async def test_a_redelivery_asked_over_the_api_wakes_the_child_every_time(harnesses):
    h = await harnesses(ProcessHarness)
    invoice = await h.create()
    await _received(h, 1)
    await _recorded(h, 1)
    status, page, _ = await h.request("GET", f"/v1/webhook-deliveries?invoice_id={invoice['id']}")
    assert status == 200 and len(page["data"]) == 1, page
    delivery = page["data"][0]["id"]
    for n in (2, 3):  # twice: a wake-up that went wrong once would leave later ones undone
        status, body, _ = await h.request("POST", f"/v1/webhook-deliveries/{delivery}/redeliver")
        assert status == 200, body
        await _received(h, n, timeout=5)
        await _recorded(h, 1)
    assert {e.event_id for e in h.receiver.events} == {h.receiver.events[0].event_id}


async def test_attempts_wait_for_a_write_lock_held_past_the_busy_timeout_and_are_sent_once(harnesses):
    """The daemon's catch-up step may hold the write lock for many seconds: the child's record of
    a delivered attempt waits for it (and retries), it is never sent again for it."""
    h = await harnesses(ProcessHarness)
    await _child(h)
    assert h.service is not None and h.service.store is not None
    blocker = sqlite3.connect(h.service.store.path, isolation_level=None, timeout=30)
    h.receiver.answer_after = 1.0  # the attempt is in flight when the lock is taken
    invoice = await h.create()
    await _received(h, 1)  # queued by the child (a write of its own), and sent
    blocker.execute("BEGIN IMMEDIATE")  # before the attempt ends: its record must wait
    try:
        await asyncio.sleep(6.0)  # past the daemon's 5 s busy timeout
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    await _recorded(h, 1, timeout=15)
    await asyncio.sleep(1.0)  # time enough for a second attempt, had it been sent again
    assert [e.invoice_id for e in h.receiver.events] == [invoice["id"]]


async def test_the_child_stops_when_its_input_ends_even_on_a_line_cut_short(tmp_path):
    """The daemon died while writing: a partial line, then end of input. The child must stop, not
    linger beside the next daemon's."""
    from watcher.store import Store

    Store(tmp_path / "w.db", clock=time.time).close()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "watcher.dispatchproc",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None
    start = {
        "database": str(tmp_path / "w.db"),
        "secrets": {},
        "log_format": "json",
        "log_level": "info",
        "hidden": [],
        "urls": [],
    }
    child.stdin.write(orjson.dumps({"start": start}) + b"\n" + b'{"secrets": {"http://x/": "whsec_')
    await child.stdin.drain()
    await asyncio.sleep(1.0)
    child.stdin.close()
    try:
        code = await asyncio.wait_for(child.wait(), timeout=20)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.stderr is not None
    log = (await child.stderr.read()).decode()
    assert code == 0, log
    assert "child_message_unread" in log and "webhook_dispatcher" in log


async def test_log_settings_changed_on_reload_reach_the_child(harnesses, capfd):
    """The harness logs at warning (no line per delivery); at info the child's `webhook_delivered`
    lines appear on the daemon's stderr, which it shares."""
    h = await harnesses(ProcessHarness)
    child = await _child(h)
    await h.create()
    await _received(h, 1)
    await _recorded(h, 1)
    assert "webhook_delivered" not in capfd.readouterr().err
    child.set_logging(("json", "info"))
    await asyncio.sleep(1.0)  # read before the next event is queued (a loaded machine)
    await h.create()
    await _received(h, 2)
    await _recorded(h, 2)
    await asyncio.sleep(0.1)
    lines = [line for line in capfd.readouterr().err.splitlines() if "webhook_delivered" in line]
    assert len(lines) == 1 and orjson.loads(lines[0])["level"] == "info", lines
