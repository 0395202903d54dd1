"""The daemon as an operator runs it, catching up: `watcher run --config` on the cached chains.

    python -m bench.daemon [--profile 1%|100%] [--rate 200] [--raw-repeat 3] [--idle 3]

What runs, each in a process of its own, on the same machine:

- the node: anvil loaded with a profile's cached chain (bench/chain.py: 2,000 blocks, 50,000
  ERC-20 transfers; 1% or 100% of them to our deposit addresses);
- the daemon: `python -m watcher.cli run --config FILE`, the way systemd starts it: logs at
  `info` (JSON, to a file), one webhook endpoint for every event, `NOTIFY_SOCKET` pointing at
  this process (READY=1 is the daemon's readiness; WATCHDOG_USEC set, so its watchdog pings
  show whether a step ever made one late) and a copy of the profile's store (bench/catchup.py's
  `prepare_store`: the open invoices made as POST /v1/invoices makes them; their
  `invoice.created` deliveries marked delivered, as they were long before the downtime). Its
  checkpoint is before the range, so it starts by catching up on all of it. Its followers and
  its webhook dispatcher run in child processes (watcher/followproc.py, watcher/dispatchproc.py):
  the CPU figures count all three, the peak RSS is shown for the daemon and its children;
- a webhook receiver (bench/webhooks.py's: checks every signature, counts every id);
- an API client: open loop at `--rate` requests/s over one keep-alive pool, `GET
  /v1/invoices/{id}/status` of random open invoices and every tenth request `GET /v1/chains`,
  from the moment the API first answers until the end. Latency counts from the moment a
  request was due (no coordinated omission).

Timed, on this machine's monotonic clock (shared by the processes):

- time to the first API answer (`/healthz`) and to READY=1, from the daemon's spawn;
- catch-up: from READY=1 to the first moment the store's checkpoint is the chain's head (a
  read-only connection polls it every 20 ms); every payment is recorded in the same
  transaction as the checkpoint, so that is "every invoice paid". Payments/s over it.
- webhooks: from READY=1 to the receiver holding every event the catch-up wrote;
- the API's latency in three windows: during the catch-up, while only webhooks remain, and
  idle afterwards (`--idle` s);
- the watchdog: the longest gap between two WATCHDOG=1 pings during the run (sent every half
  WATCHDOG_USEC; a gap past it is a late ping).

Baselines in the same run: the bare aiohttp + orjson client reading the same range from the
same node with 2 requests in flight (bench/catchup.py's `raw`, best chunk size, best of
`--raw-repeat`), and a bare aiohttp server answering the same paths with a body of the same
size, hit by the same client at the same rate for as long as the catch-up took (5 to 30 s),
once the daemon has stopped. With `--bare-beside` (the default with 100% ours), a second bare
server is also hit by a client of its own through the whole run of the daemon: its latency in
the same windows is what the machine's shared cores alone cost any server, so the daemon's
API against it shows what the follower makes the API wait.

Checks (the run fails without them): every payment the chain holds for our invoices recorded
exactly once; every invoice paid; every event the daemon wrote delivered, received under its
own id, and none received twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shlex
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.api_load import cpu_seconds, free_port, start_hello
from bench.catchup import ENV, NETWORK, prepare_store
from bench.chain import DECIMALS, PROFILES, CachedNode, ensure, load_deposits
from bench.measure import api_started, best_of

ROOT = Path(__file__).resolve().parent.parent
RATE = 200.0
CHAINS_EVERY = 10  # every tenth request of the client is GET /v1/chains
RAW_CHUNKS = (25, 50, 100)
WATCHDOG_USEC = 2_000_000  # the daemon pings every 1 s
CONNECTIONS = 32
IDLE_SECONDS = 3.0
CATCHUP_TIMEOUT = 900.0
HOOKS_TIMEOUT = 900.0
# Goals of issue 13, reported against, not asserted.
GOAL_VS_RAW = 0.8  # catch-up with 1% ours
GOAL_PAYMENTS_PER_S = 10_000  # with 100% ours
GOAL_P99_RATIO = 1.5  # status route during a catch-up, against the bare server
GOAL_P99_MS = 50.0


# --------------------------------------------------------------------------- the daemon, as systemd starts it


class NotifyListener:
    """The sd_notify socket systemd would hold: every datagram with when it came."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            for line in data.decode(errors="replace").splitlines():
                self.messages.append((now, line))

    def first(self, message: str) -> float | None:
        return next((t for t, m in self.messages if m == message), None)

    def times(self, message: str) -> list[float]:
        return [t for t, m in self.messages if m == message]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Daemon:
    """`watcher run --config` spawned with a notify socket; when it first answered and was ready."""

    process: subprocess.Popen
    base: str
    notify: NotifyListener
    log: Any
    spawned: float
    first_answer: float | None = None
    first_answer_cpu_s: float | None = None  # the daemon's CPU by then: steadier than wall time under load
    extra: dict[str, Any] = field(default_factory=dict)

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Poll /healthz every 5 ms until it answers, then wait for READY=1; returns READY's time."""
        deadline = time.monotonic() + timeout
        while self.first_answer is None:
            try:
                urllib.request.urlopen(self.base + "/healthz", timeout=5).read()
                self.first_answer = time.monotonic()
                self.first_answer_cpu_s = cpu_seconds(self.process.pid)
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start (exit {self.process.poll()})") from None
                time.sleep(0.005)
        while (ready := self.notify.first("READY=1")) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon never sent READY=1 (exit {self.process.poll()})")
            time.sleep(0.005)
        return ready

    def children(self) -> list[int]:
        """The daemon's child processes (its followers' and its webhook dispatcher's)."""
        found: list[int] = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            found += [int(pid) for pid in (task / "children").read_text().split()]
        return found

    def cpu_seconds(self) -> float:
        """The daemon's CPU time and its children's (the followers and the dispatcher work there)."""
        return sum(cpu_seconds(pid) for pid in (self.process.pid, *self.children()))

    def peak_rss_mb(self) -> float:
        """The daemon's peak RSS."""
        return _peak_rss_mb(self.process.pid)

    def children_peak_rss_mb(self) -> float:
        return sum(_peak_rss_mb(pid) for pid in self.children())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.notify.close()
        self.log.close()


def compile_watcher() -> None:
    """Write watcher/'s bytecode, as `pip install` does: the daemon an operator runs imports
    .pyc files. Without them (PYTHONDONTWRITEBYTECODE set, as on the engineers' machine) every
    spawn compiled watcher/'s modules again: a quarter of its CPU up to the first answer, which
    no installed daemon spends. Unchanged modules are not compiled again."""
    import compileall

    compileall.compile_dir(ROOT / "watcher", quiet=1)


def spawn_daemon(tmp: Path, config: str, env: dict[str, str], port: int) -> Daemon:
    """Start `watcher run --config` as systemd would (Type=notify, a watchdog), logging to tmp/daemon.log."""
    compile_watcher()
    cfg = tmp / "watcher.toml"
    cfg.write_text(config)
    notify = NotifyListener(tmp / "notify.sock")
    log = open(tmp / "daemon.log", "w")  # noqa: SIM115  (open while the daemon runs; Daemon.stop closes it)
    full_env = {
        **os.environ,
        **env,
        "NOTIFY_SOCKET": str(tmp / "notify.sock"),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
    }
    full_env.pop("WATCHDOG_PID", None)
    spawned = time.monotonic()
    # BENCH_DAEMON_PREFIX="py-spy record -o daemon.svg --" profiles the daemon as it runs.
    prefix = shlex.split(os.environ.get("BENCH_DAEMON_PREFIX", ""))
    process = subprocess.Popen(
        [*prefix, sys.executable, "-m", "watcher.cli", "run", "--config", str(cfg)],
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    return Daemon(process, f"http://127.0.0.1:{port}", notify, log, spawned)


def config_head(db: Path | str, port: int) -> str:
    """The top of a config as an operator writes it: the database, logs at info (JSON), the API
    on loopback with its key from WATCHER_API_KEY."""
    return f'''database = "{db}"
log_format = "json"
log_level = "info"

[http]
listen = "127.0.0.1:{port}"
api_key_env = "WATCHER_API_KEY"
'''


def config_toml(db: Path, port: int, meta: dict[str, Any], node_url: str, hook_url: str) -> str:
    assets = "".join(
        f"""
[[chains.assets]]
symbol = "BUSD{"AB"[i]}"
kind = "erc20"
contract = "{token}"
decimals = {DECIMALS}
usd_rate = "1"
"""
        for i, token in enumerate(meta["tokens"])
    )
    return f'''{config_head(db, port)}
[[webhooks]]
url = "{hook_url}"
secret_env = "WATCHER_WEBHOOK_SECRET"

[[chains]]
name = "{NETWORK}"
chain_id = {meta["chain_id"]}
rpc_urls = ["{node_url}"]
poll_interval_seconds = 2.0
confirmations = 12
start_block = {meta["first_block"]}
deposit_xpub = "{meta["xpub"]}"
{assets}'''


# --------------------------------------------------------------------------- the store copy and its progress


def copy_store(template: Path, tmp: Path) -> tuple[Path, int, list[str]]:
    """A copy of the prepared store, its `invoice.created` events delivered long before the
    downtime: the deliveries of a store from before the endpoints' cursors (m010) marked
    delivered, and every endpoint's cursor moved past its events (a store built since has no
    deliveries, and its placeholder endpoint, not configured in the run, would otherwise have
    them queued at the daemon's start, where they stay pending); (path, the last event's seq
    before the run, invoice ids)."""
    db = tmp / "watcher.db"
    shutil.copyfile(template, db)
    # Its schema brought up to date before the daemon starts: an upgrade's migrations run once
    # in an operator's life, not at each start (m008 on the 100% store: 1.1 s of the daemon's
    # CPU before its first answer, when the cached store predates it).
    from watcher.store import Store

    Store(db, clock=time.time).close()
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(
        "UPDATE deliveries SET status = 'delivered', attempts = 1, next_attempt_at = NULL, "
        "delivered_at = created_at WHERE status = 'pending'"
    )
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    conn.execute("UPDATE webhook_endpoints SET after_seq = ?", [seq])
    ids = [r[0] for r in conn.execute("SELECT id FROM invoices ORDER BY rowid")]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return db, seq, ids


class Progress:
    """Polls the daemon's store read-only (as another process may: WAL) until its checkpoint is `last`."""

    def __init__(self, db: Path, last: int, interval: float = 0.02) -> None:
        self.db, self.last, self.interval = db, last, interval
        self.reached: float | None = None
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, isolation_level=None)
        try:
            while not self._stop.is_set():
                row = conn.execute("SELECT block_number FROM cursors WHERE network = ?", [NETWORK]).fetchone()
                now = time.monotonic()
                if row is not None:
                    self.samples.append((now, row[0]))
                    if row[0] >= self.last:
                        self.reached = now
                        return
                self._stop.wait(self.interval)
        finally:
            conn.close()

    def wait(self, timeout: float, process: subprocess.Popen) -> float:
        deadline = time.monotonic() + timeout
        while self.reached is None:
            if process.poll() is not None:
                raise RuntimeError(f"the daemon exited ({process.returncode}) before catching up")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no catch-up within {timeout:g} s (checkpoint {self.samples[-1:]})")
            time.sleep(0.01)
        self._thread.join()
        return self.reached

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def query(db: Path, sql: str, params: list[Any] | tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# --------------------------------------------------------------------------- the API client (child process)


async def client(spec: dict[str, Any]) -> dict[str, Any]:
    """Open loop from the API's first answer until stdin closes; samples written to spec["out"]."""
    import aiohttp

    base, rate = spec["base"], spec["rate"]
    headers = {"Authorization": f"Bearer {spec['key']}"} if spec.get("key") else {}
    ids = spec["ids"]
    rnd = random.Random(13)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(65536) else None)
    samples: list[tuple[float, float, float, int, str]] = []  # due, sent, done, status, kind
    errors: dict[str, int] = {}

    async def one(due: float, url: str, kind: str, session: aiohttp.ClientSession) -> None:
        sent, status = loop.time(), -1
        try:
            async with session.get(url, headers=headers) as r:
                await r.read()
                status = r.status
        except Exception as exc:  # counted, not raised: the load goes on
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        samples.append((due, sent, loop.time(), status, kind))

    connector = aiohttp.TCPConnector(limit=spec.get("connections", CONNECTIONS))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        print("polling", flush=True)  # imported and ready: Client spawns the daemon after this line
        while not stop.is_set():  # until the API answers (the daemon is spawned after us)
            try:
                async with session.get(base + "/healthz") as r:
                    if api_started(await r.read()):
                        break
                await asyncio.sleep(0.005)
            except aiohttp.ClientError:
                await asyncio.sleep(0.005)
        tasks: set[asyncio.Task] = set()
        every = spec.get("chains_every", CHAINS_EVERY)
        t0 = loop.time()
        k = 0
        while not stop.is_set():
            due = t0 + k / rate
            if (delay := due - loop.time()) > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    break
                except TimeoutError:
                    pass
            if k % every == every - 1:
                url, kind = base + "/v1/chains", "chains"
            else:
                url, kind = f"{base}/v1/invoices/{ids[rnd.randrange(len(ids))]}/status", "status"
            task = asyncio.create_task(one(due, url, kind, session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            k += 1
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    loop.remove_reader(sys.stdin.fileno())
    Path(spec["out"]).write_text(json.dumps(samples))
    return {"requests": len(samples), "errors": errors}


class Client:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.out = Path(spec["out"])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.daemon", "--client", str(self._spec_file(spec))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        # The child's imports (a third of a second of CPU) done before the daemon is spawned:
        # they would compete with the daemon's start-up for the cores that the bench measures.
        assert self.process.stdout is not None
        self.process.stdout.readline()

    def _spec_file(self, spec: dict[str, Any]) -> Path:
        """The spec in a file beside the samples: 50,000 invoice ids do not fit in argv."""
        path = self.out.with_suffix(".spec.json")
        path.write_text(json.dumps(spec))
        return path

    def finish(self) -> tuple[list[tuple[float, float, float, int, str]], dict[str, Any]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        out = self.process.stdout.read()
        if self.process.wait(120) != 0:
            raise RuntimeError(f"the API client failed (exit {self.process.returncode})")
        return [tuple(s) for s in json.loads(self.out.read_text())], json.loads(out.strip().splitlines()[-1])  # type: ignore[misc]


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def latency(
    samples: list[tuple], kind: str, start: float, end: float, answered: tuple[int, ...] = (200,)
) -> dict[str, Any]:
    """Percentiles (ms, from the due time) of the requests of `kind` due in [start, end) that
    got one of the `answered` statuses; the others count as failed."""
    chosen = [s for s in samples if s[4] == kind and start <= s[0] < end]
    ok = sorted((done - due) * 1000 for due, _, done, status, _ in chosen if status in answered)
    return {
        "n": len(chosen),
        "failed": sum(1 for s in chosen if s[3] not in answered),
        "p50": pct(ok, 0.5),
        "p95": pct(ok, 0.95),
        "p99": pct(ok, 0.99),
        "max": ok[-1] if ok else float("nan"),
        "ms": ok,  # every answered request's latency: `report_medians` pools the runs' with them
    }


# --------------------------------------------------------------------------- one run


def raw_baseline(node_url: str, meta: dict[str, Any], repeat: int) -> dict[str, Any]:
    """The bare client on the same range and node, 2 in flight: its best chunk size, best of `repeat`."""
    base = {"url": node_url, "meta": meta["files"]["meta"], "method": "raw", "inflight": 2}
    best_of({**base, "chunk": 100}, 1)  # warm the node up
    runs = {chunk: best_of({**base, "chunk": chunk}, repeat) for chunk in RAW_CHUNKS}
    chunk = min(runs, key=lambda c: runs[c]["wall_s"])
    return {**runs[chunk], "chunk": chunk}


def run(profile_name: str, rate: float, raw_repeat: int, idle: float, beside: bool = False) -> dict[str, Any]:
    from bench.webhooks import ReceiverProcess
    from watcher.store.outbox import event_bodies

    profile = PROFILES[profile_name]
    meta = ensure(profile)
    deposits = load_deposits(meta)[: profile.invoices]
    expected_payments = sum(d["transfers"] for d in deposits)
    expected_paid = sum(1 for d in deposits if d["transfers"])
    template = prepare_store(meta, profile.invoices)
    tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    result: dict[str, Any] = {"profile": profile_name, "rate": rate, "tmp": str(tmp)}
    try:
        db, seq_before, ids = copy_store(template, tmp)
        with CachedNode(meta) as node, ReceiverProcess() as receiver:
            result["raw"] = raw_baseline(node.url, meta, raw_repeat)
            port = free_port()
            key = "sk_bench_" + secrets.token_urlsafe(24)
            twin = BareBeside(tmp, template_status_body(db), ids, rate) if beside else None
            api_client = Client(
                {
                    "base": f"http://127.0.0.1:{port}",
                    "key": key,
                    "ids": ids,
                    "rate": rate,
                    "out": str(tmp / "client.json"),
                }
            )
            daemon = spawn_daemon(
                tmp,
                config_toml(db, port, meta, node.url, receiver.url),
                {"WATCHER_API_KEY": key, "WATCHER_WEBHOOK_SECRET": ENV["WATCHER_WEBHOOK_SECRET"]},
                port,
            )
            progress = None
            try:
                ready = daemon.wait_ready()
                cpu_at_ready = daemon.cpu_seconds()
                others = {"node": node.node.process.pid, "receiver": receiver.process.pid}
                others["API client"] = api_client.process.pid
                split_at_ready = cpu_split(daemon, others)
                progress = Progress(db, meta["last_block"])
                caught_up = progress.wait(CATCHUP_TIMEOUT, daemon.process)
                cpu_catchup = daemon.cpu_seconds() - cpu_at_ready
                split = cpu_split(daemon, others)
                result["cpu_split_s"] = {k: v - split_at_ready.get(k, 0.0) for k, v in split.items()}
                by_status = dict(query(db, "SELECT status, COUNT(*) FROM invoices GROUP BY status"))
                new_events = query(db, "SELECT COUNT(*) FROM events WHERE seq > ?", [seq_before])[0][0]
                deadline = time.monotonic() + HOOKS_TIMEOUT
                while True:
                    stats = receiver.stats()
                    pending = query(db, "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'")[0][0]
                    if not pending and stats["distinct_ids"] >= new_events:
                        hooks_done = time.monotonic()
                        break
                    if time.monotonic() > deadline or daemon.process.poll() is not None:
                        raise RuntimeError(f"webhooks not all delivered: {pending} pending, {stats}")
                    time.sleep(0.05)
                time.sleep(idle)
                end = time.monotonic()
                result["daemon_peak_rss_mb"] = daemon.peak_rss_mb()
                result["children_peak_rss_mb"] = daemon.children_peak_rss_mb()
            finally:
                if progress is not None:
                    progress.stop()
                try:
                    samples, client_summary = api_client.finish()
                    daemon.stop()
                finally:
                    twin_samples = twin.finish() if twin is not None else None
            hook_ids = receiver.ids()
        events = {r[0] for r in query(db, "SELECT id FROM events WHERE seq > ?", [seq_before])}
        payments = query(
            db, "SELECT COUNT(*), COUNT(DISTINCT network || tx_hash || ':' || log_key) FROM payments"
        )[0]
        undelivered = query(
            db,
            "SELECT COUNT(*) FROM deliveries d JOIN events e ON e.id = d.event_id WHERE e.seq > ? "
            "AND d.status != 'delivered'",
            [seq_before],
        )[0][0]
        watchdog = [t for t in daemon.notify.times("WATCHDOG=1") if ready <= t <= end]
        gaps = [b - a for a, b in zip([ready, *watchdog], [*watchdog, end], strict=True)]
        windows = {
            "catch-up": (ready, caught_up),
            "webhooks only": (caught_up, hooks_done),
            "idle": (hooks_done, end),
        }
        result.update(
            spawn_to_answer_s=daemon.first_answer - daemon.spawned,  # type: ignore[operator]
            answer_cpu_s=daemon.first_answer_cpu_s,
            spawn_to_ready_s=ready - daemon.spawned,
            catchup_s=caught_up - ready,
            hooks_s=hooks_done - ready,
            cpu_catchup_s=cpu_catchup,
            payments=payments[0],
            distinct_payments=payments[1],
            expected_payments=expected_payments,
            paid_invoices=by_status.get("paid", 0) + by_status.get("confirmed", 0),
            expected_paid=expected_paid,
            by_status=by_status,
            events=len(events),
            undelivered=undelivered,
            hooks_received=sum(hook_ids.values()),
            hooks_distinct=len(hook_ids),
            hooks_twice=sum(1 for n in hook_ids.values() if n > 1),
            hooks_unknown=sum(1 for i in hook_ids if i not in events),
            hooks_missing=sum(1 for i in events if i not in hook_ids),
            watchdog_pings=len(watchdog),
            watchdog_max_gap_s=max(gaps) if gaps else None,
            api={
                name: {k: latency(samples, k, a, b) for k in ("status", "chains")}
                for name, (a, b) in windows.items()
            },
            client=client_summary,
            beside=None
            if twin_samples is None
            else {
                name: {k: latency(twin_samples, k, a, b) for k in ("status", "chains")}
                for name, (a, b) in windows.items()
            },
            log_lines=len((tmp / "daemon.log").read_bytes().splitlines()),
        )
        # The bare server, the same client and rate, as long as the catch-up took (5 to 30 s).
        [last_event] = query(db, "SELECT id FROM events ORDER BY seq DESC LIMIT 1")
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            status_body = next(iter(event_bodies(conn, [last_event[0]]).values()))
        status_body = json.dumps(json.loads(status_body)["data"]["invoice"])
        result["bare"] = bare_run(tmp, status_body, ids, rate, min(max(caught_up - ready, 5.0), 30.0))
        result["problems"] = check(result)
    finally:
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def cpu_split(daemon: Daemon, others: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process on the machine's cores during a run: the daemon, its
    children (named by their module), and the bench's own (the node, the receiver, the client)."""
    out = {"daemon": cpu_seconds(daemon.process.pid)}
    for pid in daemon.children():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        name = next((w.decode() for w in cmdline if w.startswith(b"watcher.")), str(pid))
        out[name] = out.get(name, 0.0) + cpu_seconds(pid)
    for name, pid in others.items():
        out[name] = cpu_seconds(pid)
    return out


def template_status_body(db: Path) -> str:
    """A status body as the daemon renders it (the newest invoice's, from its event): the bare
    server's answer, of the same size."""
    from watcher.store.outbox import event_bodies

    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        [last] = conn.execute("SELECT id FROM events ORDER BY seq DESC LIMIT 1").fetchall()
        body = next(iter(event_bodies(conn, [last[0]]).values()))
    return json.dumps(json.loads(body)["data"]["invoice"])


class BareBeside:
    """The bare server, hit by its own client at the same rate, all through the daemon's run:
    what any aiohttp server answers on this machine while the catch-up loads its cores. The
    daemon's API against it shows what the follower itself makes the API wait, apart from
    the cores it shares."""

    def __init__(self, tmp: Path, body: str, ids: list[str], rate: float) -> None:
        self.server, base = start_hello(tmp, body)
        try:
            self.client = Client({"base": base, "ids": ids, "rate": rate, "out": str(tmp / "beside.json")})
        except BaseException:
            self.server.stop()
            raise

    def finish(self) -> list[tuple]:
        try:
            samples, _ = self.client.finish()
        finally:
            self.server.stop()
        return samples


def bare_run(tmp: Path, body: str, ids: list[str], rate: float, seconds: float) -> dict[str, Any]:
    hello, base = start_hello(tmp, body)
    try:
        api_client = Client({"base": base, "ids": ids, "rate": rate, "out": str(tmp / "bare.json")})
        time.sleep(seconds + 1.0)  # the client's own start-up, then `seconds` measured
        samples, _ = api_client.finish()
    finally:
        hello.stop()
    start = min(s[0] for s in samples) + 1.0 if samples else 0.0
    return {k: latency(samples, k, start, start + seconds) for k in ("status", "chains")}


def check(r: dict[str, Any]) -> list[str]:
    """What is wrong with the run (empty: nothing)."""
    wrong = []
    if r["payments"] != r["expected_payments"] or r["distinct_payments"] != r["payments"]:
        wrong.append(
            f"{r['payments']} payments recorded ({r['distinct_payments']} distinct), "
            f"the chain has {r['expected_payments']}"
        )
    if r["paid_invoices"] != r["expected_paid"]:
        wrong.append(f"{r['paid_invoices']} invoices paid of {r['expected_paid']}: {r['by_status']}")
    if r["undelivered"] or r["hooks_missing"] or r["hooks_unknown"]:
        wrong.append(
            f"webhooks: {r['undelivered']} not delivered, {r['hooks_missing']} events never received, "
            f"{r['hooks_unknown']} ids received that the store never wrote"
        )
    if r["hooks_twice"]:
        wrong.append(f"{r['hooks_twice']} event ids received more than once")
    return wrong


# --------------------------------------------------------------------------- report


def report(r: dict[str, Any]) -> None:
    raw = r["raw"]
    ratio = raw["wall_s"] / r["catchup_s"]
    rate = r["payments"] / r["catchup_s"]
    print(
        f"start: first API answer {r['spawn_to_answer_s'] * 1000:,.0f} ms after spawn "
        f"({r['answer_cpu_s'] * 1000:,.0f} ms of the daemon's CPU), READY=1 at "
        f"{r['spawn_to_ready_s'] * 1000:,.0f} ms; daemon peak RSS {r['daemon_peak_rss_mb']:,.0f} MB "
        f"(its children's {r.get('children_peak_rss_mb', 0):,.0f} MB); "
        f"{r['log_lines']:,} log lines"
    )
    print(
        f"catch-up (READY=1 to checkpoint at the head): {r['catchup_s']:.2f} s, {r['payments']:,} payments "
        f"({rate:,.0f}/s), daemon CPU (with its children's) {r['cpu_catchup_s']:.2f} s; "
        f"bare client, 2 in flight, chunk {raw['chunk']}: "
        f"{raw['wall_s']:.2f} s -> daemon/raw = {ratio:.2f}"
    )
    if r.get("cpu_split_s"):
        split = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_split_s"].items())
        print(
            f"CPU over the catch-up, s: {split}; all {sum(r['cpu_split_s'].values()):.2f} of the "
            f"{os.cpu_count()} cores' {os.cpu_count() * r['catchup_s']:.2f}"  # type: ignore[operator]
        )
    print(
        f"webhooks: {r['events']:,} events, every one delivered {r['hooks_s']:.2f} s after READY=1 "
        f"({r['events'] / r['hooks_s']:,.0f}/s); watchdog: {r['watchdog_pings']} pings, longest gap "
        f"{r['watchdog_max_gap_s']:.2f} s (pinged every {WATCHDOG_USEC / 2e6:g} s)"
    )
    title = f"API, {r['rate']:g} requests/s"
    head = f"{title:<34} {'n':>6} {'fail':>4} " + " ".join(
        f"{c:>8}" for c in ("p50 ms", "p95 ms", "p99 ms", "max ms")
    )
    print(head)
    print("-" * len(head))
    rows = [(f"bare aiohttp, {k}", r["bare"][k]) for k in ("status", "chains")]
    rows += [(f"daemon {w}, {k}", r["api"][w][k]) for w in r["api"] for k in ("status", "chains")]
    if r.get("beside"):
        twin = r["beside"]
        rows += [(f"bare beside, {w}, {k}", twin[w][k]) for w in twin for k in ("status", "chains")]
    for label, x in rows:
        if x["n"]:
            print(
                f"{label:<34} {x['n']:>6} {x['failed']:>4} "
                + " ".join(f"{x[q]:>8.2f}" for q in ("p50", "p95", "p99", "max"))
            )
    during, bare = r["api"]["catch-up"]["status"], r["bare"]["status"]
    p99_ratio = during["p99"] / bare["p99"]
    print(
        "checks: "
        + (
            "FAILED: " + "; ".join(r["problems"])
            if r["problems"]
            else "every payment recorded once, every invoice paid, every event delivered once, under its id"
        )
    )
    if PROFILES[r["profile"]].share < 1:
        print(
            f"goal (issue 13 #2): catch-up >= {GOAL_VS_RAW} x raw: {ratio:.2f} "
            f"({'met' if ratio >= GOAL_VS_RAW else 'NOT met'})"
        )
    else:
        print(
            f"goal (issue 13 #1): >= {GOAL_PAYMENTS_PER_S:,} payments/s: {rate:,.0f} "
            f"({'met' if rate >= GOAL_PAYMENTS_PER_S else 'NOT met'})"
        )
    met = p99_ratio <= GOAL_P99_RATIO and during["p99"] <= GOAL_P99_MS
    print(
        f"goal (issue 13 #3): status p99 during the catch-up <= {GOAL_P99_RATIO} x bare "
        f"and <= {GOAL_P99_MS:g} ms: "
        f"{during['p99']:.2f} ms, x{p99_ratio:.2f} ({'met' if met else 'NOT met'})",
        flush=True,
    )
    if r.get("beside"):
        twin = r["beside"]["catch-up"]["status"]
        ratio_beside = during["p99"] / twin["p99"]
        met = ratio_beside <= GOAL_P99_RATIO and during["p99"] <= GOAL_P99_MS
        print(
            f"goal (issue 13 #3), against the bare server beside it in the same window "
            f"({twin['p99']:.2f} ms): x{ratio_beside:.2f} ({'met' if met else 'NOT met'})",
            flush=True,
        )


def report_medians(runs: list[dict[str, Any]]) -> None:
    """The goals over several runs of one profile: each run's figure, and their median."""
    ratios = [r["raw"]["wall_s"] / r["catchup_s"] for r in runs]
    rates = [r["payments"] / r["catchup_s"] for r in runs]
    p99s = [r["api"]["catch-up"]["status"]["p99"] for r in runs]
    bare = [r["bare"]["status"]["p99"] for r in runs]

    def listed(values: list[float], fmt: str) -> str:
        return (
            ", ".join(format(v, fmt) for v in values) + f"; median {format(statistics.median(values), fmt)}"
        )

    print(f"== {len(runs)} runs of profile {runs[0]['profile']}")
    print(f"catch-up, s: {listed([r['catchup_s'] for r in runs], '.2f')}")
    print(f"bare client, s: {listed([r['raw']['wall_s'] for r in runs], '.2f')}")
    print(f"daemon/raw: {listed(ratios, '.2f')}")
    print(f"payments/s: {listed(rates, ',.0f')}")
    print(f"status p99 during the catch-up, ms: {listed(p99s, '.1f')} (bare, after: {listed(bare, '.1f')})")
    if all(r.get("beside") for r in runs):
        twin = [r["beside"]["catch-up"]["status"]["p99"] for r in runs]
        print(f"bare server beside it, same windows, p99 ms: {listed(twin, '.1f')}")
        print(f"daemon p99 / beside p99: {listed([a / b for a, b in zip(p99s, twin, strict=True)], '.2f')}")
        # A p99 of one run's 2,000 requests is decided by its 20 slowest: pooled, the runs'
        # requests give one p99 of several times as many.
        pooled = {
            who: sorted(ms for r in runs for ms in r[who]["catch-up"]["status"]["ms"])
            for who in ("api", "beside")
        }
        ours, theirs = (pct(pooled[who], 0.99) for who in ("api", "beside"))
        print(
            f"pooled over the {len(runs)} runs ({len(pooled['api']):,} and {len(pooled['beside']):,} "
            f"requests): status p99 {ours:.1f} ms, bare beside {theirs:.1f} ms: x{ours / theirs:.2f} "
            f"(goal #3: <= {GOAL_P99_RATIO})"
        )
    ratio = statistics.median(ratios)
    if PROFILES[runs[0]["profile"]].share < 1:
        print(
            f"goal (issue 13 #2), median of {len(runs)} runs: catch-up >= {GOAL_VS_RAW} x raw: {ratio:.2f} "
            f"({'met' if ratio >= GOAL_VS_RAW else 'NOT met'})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.daemon", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--profile", choices=("1%", "100%", "100%x25"), action="append", help="default: 1%% and 100%%"
    )
    parser.add_argument("--rate", type=float, default=RATE, help=f"API requests/s (default {RATE:g})")
    parser.add_argument("--raw-repeat", type=int, default=3, help="runs of the bare client per chunk size")
    parser.add_argument("--idle", type=float, default=IDLE_SECONDS, help="seconds measured idle at the end")
    parser.add_argument("--quick", action="store_true", help="the 1%% profile only, the bare client once")
    parser.add_argument(
        "--bare-beside",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also poll a bare server through the daemon's run (default: with 100%% ours)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs of each profile, the bare client measured again before each; the goals are "
        "judged on the medians (one run's catch-up moves by a third with the machine's load)",
    )
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        print(json.dumps(asyncio.run(client(json.loads(Path(args.client).read_text())))))
        return
    profiles = args.profile or (["1%"] if args.quick else ["1%", "100%"])
    started = time.monotonic()
    results = []
    for name in profiles:
        print(
            f"== daemon catch-up, profile {name}: `watcher run --config` (logs at info, a webhook endpoint, "
            f"the API polled at {args.rate:g}/s) on the cached chain",
            flush=True,
        )
        beside = args.bare_beside if args.bare_beside is not None else PROFILES[name].share >= 1
        runs = []
        for _ in range(max(1, args.repeat)):
            r = run(name, args.rate, 1 if args.quick else args.raw_repeat, args.idle, beside)
            report(r)
            runs.append(r)
        if len(runs) > 1:
            report_medians(runs)
        results += runs
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"(daemon took {time.monotonic() - started:.0f} s)", flush=True)
    if any(r["problems"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
