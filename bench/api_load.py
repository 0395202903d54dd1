"""The status endpoint under load: GET /v1/invoices/{id}/status at a fixed 1,000 requests/s.

    python -m bench.api_load [--quick] [--rate 1000] [--seconds 10] [--block-time 2]
                             [--profile | --slow-callbacks 0.02] [--dump samples.json]

- Server: the real daemon, `watcher run --sandbox --listen 127.0.0.1:PORT --block-time 2
  --database TMP` (a subprocess; its log to a file), with 200 invoices created over the API
  and 20 of them paid through the sandbox route, so some status bodies carry a payment.
  The sandbox's chain (eth-tester) runs inside the daemon's process, in a thread that competes
  for the GIL with the event loop whenever a block is mined or read; `--chain anvil` runs the
  daemon as in production instead: `watcher run --config` on an anvil node (bench/live.py's
  setup: TUSD and the coin, blocks every --block-time s, polled every 1 s), the 20 paid by
  real token transfers.
- What happens during the window: the 20 payments are detected before the load starts; with 3
  confirmations the block that confirms them (20 invoices re-judged, 20 events written, one
  commit) comes 2 blocks later, inside the measured window, so the figures include the API
  answering while the follower does that work on the same event loop.
- Client: a SECOND process, open loop: request k is due at t0 + k/rate whatever happened to
  the earlier ones (each is its own task on one aiohttp session); 2 s of warm-up at the same
  rate, then `--seconds` measured. Latency is counted from the moment the request was DUE
  (so a client or server that falls behind shows in the tail instead of hiding it: no
  coordinated omission); the latency from the actual send is reported too. Achieved rate =
  answers in the measured window / its length. Errors: exceptions and non-200 answers.
- Baseline: a bare aiohttp server (its own process) answering the same path with a fixed
  body of the same size, hit by the same client the same way: what this client, aiohttp and
  this machine allow.
- Server CPU per request: the daemon's (or hello server's) CPU time over the run, from /proc,
  divided by the requests sent (the chain, follower and scheduler included).
- `--profile`: the daemon's side instead runs in-process as `Service` with a sandbox chain
  (what `watcher run --sandbox` builds) under pyinstrument, to show where a request's time
  goes (use a lower --rate: the profiler's own cost makes the server fall behind at 1,000/s).
  `--slow-callbacks S` runs it with asyncio's debug mode instead, which logs every callback
  that held the event loop longer than S seconds. `--dump` writes the daemon run's samples,
  to see when in the run the slow requests were.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.measure import api_started
from bench.watchset import CACHE, run_child

RATE = 1_000
SECONDS = 10.0
WARMUP = 2.0
INVOICES = 200
PAID = 20
GOAL_P99_MS = 5.0
CONNECTIONS = 32
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, key: str | None = None, body: Any = None, timeout: float = 30) -> Any:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def wait_up(url: str, process: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if api_started(urllib.request.urlopen(url, timeout=2).read()):
                return
        except OSError as exc:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start (exit {process.poll()})") from exc
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not finish starting (exit {process.poll()})")
        time.sleep(0.1)


# --------------------------------------------------------------------------- servers


class Server:
    def __init__(
        self, command: list[str], env: dict[str, str], log_path: Path, health: str, what: str
    ) -> None:
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, stdin=subprocess.PIPE
            )
        wait_up(health, self.process, what)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loaded(server: Server, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the load child against a server, with the server's CPU time per request."""
    before = cpu_seconds(server.process.pid)
    result = run_child("bench.api_load", spec, timeout=spec["seconds"] + 120)
    result["server_cpu_ms_per_request"] = (
        (cpu_seconds(server.process.pid) - before)
        * 1000
        / ((spec["warmup"] + spec["seconds"]) * spec["rate"] + 1)
    )
    return result


def start_daemon(
    tmp: Path, block_time: float, profile_to: str | None, slow_callbacks: float | None = None
) -> tuple[Server, str, str]:
    port = free_port()
    key = "sk_bench_" + secrets.token_urlsafe(24)
    env = {**os.environ, "WATCHER_API_KEY": key}
    if profile_to or slow_callbacks:
        command = [
            sys.executable,
            "-m",
            "bench.api_load",
            "--serve-profiled",
            json.dumps(
                {
                    "port": port,
                    "db": str(tmp / "watcher.db"),
                    "block_time": block_time,
                    "profile_to": profile_to,
                    "slow_callbacks": slow_callbacks,
                }
            ),
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "watcher.cli",
            "run",
            "--sandbox",
            "--listen",
            f"127.0.0.1:{port}",
            "--block-time",
            str(block_time),
            "--database",
            str(tmp / "watcher.db"),
        ]
    base = f"http://127.0.0.1:{port}"
    return Server(command, env, tmp / "daemon.log", base + "/healthz", "the daemon"), base, key


def serve_profiled(spec: dict[str, Any]) -> None:
    """`watcher run --sandbox`, built the way cli._run_sandbox builds it, under pyinstrument until SIGTERM."""
    from pyinstrument import Profiler

    from watcher.config import settings_from_dict
    from watcher.logs import configure_logging
    from watcher.sandbox import SandboxChain, new_webhook_secret, sandbox_settings_data
    from watcher.service import Service

    chain = SandboxChain()
    settings = settings_from_dict(
        {
            "database": spec["db"],
            "log_level": "info",
            "http": {"listen": f"127.0.0.1:{spec['port']}", "api_key_env": "WATCHER_API_KEY"},
            "chains": [
                sandbox_settings_data(chain, poll_interval=min(max(spec["block_time"] / 4, 0.1), 2.0))
            ],
        },
        env={
            "WATCHER_API_KEY": os.environ["WATCHER_API_KEY"],
            "WATCHER_WEBHOOK_SECRET": new_webhook_secret(),
        },
    )
    configure_logging("json", "info")
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    slow = spec.get("slow_callbacks")

    async def go() -> None:
        service = Service(settings, sandbox=chain, block_time=spec["block_time"])
        loop = asyncio.get_running_loop()
        if slow:  # asyncio's debug mode names every callback that holds the loop longer than this
            loop.set_debug(True)
            loop.slow_callback_duration = slow
        profile_start = asyncio.Event()
        loop.add_signal_handler(__import__("signal").SIGUSR1, profile_start.set)
        task = asyncio.create_task(service.run_until_signalled())
        await profile_start.wait()
        if not slow:
            profiler.start()
        await task

    asyncio.run(go())
    if not slow:
        profiler.stop()
        Path(spec["profile_to"]).write_text(profiler.output_text(unicode=False, show_all=False))


def hello_main(spec: dict[str, Any]) -> None:
    from aiohttp import web

    body = spec["body"].encode()

    async def status(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/v1/invoices/{id}/status", status)
    app.router.add_get("/v1/chains", status)  # bench/daemon.py's client asks for it too (the same body)
    app.router.add_get("/healthz", health)
    web.run_app(app, host="127.0.0.1", port=spec["port"], access_log=None, print=None)


def start_hello(tmp: Path, body: str) -> tuple[Server, str]:
    port = free_port()
    command = [sys.executable, "-m", "bench.api_load", "--hello", json.dumps({"port": port, "body": body})]
    base = f"http://127.0.0.1:{port}"
    return Server(command, dict(os.environ), tmp / "hello.log", base + "/healthz", "the hello server"), base


# --------------------------------------------------------------------------- the load (child process)


async def load(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    rate, warmup, seconds = spec["rate"], spec["warmup"], spec["seconds"]
    urls = [f"{spec['base']}/v1/invoices/{i}/status" for i in spec["ids"]]
    headers = {"Authorization": f"Bearer {spec['key']}"} if spec.get("key") else {}
    total = int(rate * (warmup + seconds))
    rnd = random.Random(7)
    samples: list[tuple[float, float, float, int]] = []  # (due, sent, done, status) relative to t0
    errors: dict[str, int] = {}
    loop = asyncio.get_running_loop()

    async def one(k: int, due: float, session: aiohttp.ClientSession) -> None:
        sent = loop.time()
        status = -1
        try:
            async with session.get(urls[rnd.randrange(len(urls))], headers=headers) as r:
                await r.read()
                status = r.status
        except Exception as exc:  # counted, not raised: the load goes on
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
        samples.append((due, sent, loop.time(), status))

    # A fixed pool of keep-alive connections (as wrk2 and most load generators): a request due while
    # all are busy waits for one, and that wait counts in its latency (measured from its due time).
    connector = aiohttp.TCPConnector(limit=spec.get("connections", CONNECTIONS))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        # one request to open a connection before the clock starts
        async with session.get(urls[0], headers=headers) as r:
            await r.read()
        tasks = []
        t0 = loop.time()
        for k in range(total):
            due = t0 + k / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(k, due, session)))
        await asyncio.gather(*tasks)
    measured = [(d - t0, s - t0, e - t0, st) for d, s, e, st in samples if d - t0 >= warmup]
    if spec.get("dump"):
        Path(spec["dump"]).write_text(json.dumps(sorted(measured)))
    ok = [m for m in measured if m[3] == 200]
    from_due = sorted((e - d) * 1000 for d, s, e, st in ok)
    from_sent = sorted((e - s) * 1000 for d, s, e, st in ok)
    send_lag = sorted((s - d) * 1000 for d, s, e, st in measured)
    window_end = max(e for d, s, e, st in measured)
    answered = sum(1 for m in measured if warmup <= m[2] <= warmup + seconds)
    non_200: dict[str, int] = {}
    for m in measured:
        if m[3] not in (200, -1):
            non_200[str(m[3])] = non_200.get(str(m[3]), 0) + 1

    # When the slow ones were: 100 ms windows (by due time) whose worst latency passed 20 ms.
    windows: dict[int, float] = {}
    for d, _sent, e, _status in measured:
        windows[int(d * 10)] = max(windows.get(int(d * 10), 0.0), (e - d) * 1000)
    slow = sorted(k for k, v in windows.items() if v > 20)
    spans: list[list[float]] = []
    for k in slow:
        if spans and k - spans[-1][1] <= 1:
            spans[-1][1] = k
            spans[-1][2] = max(spans[-1][2], windows[k])
        else:
            spans.append([k, k, windows[k]])

    def pct(values: list[float], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {
        "requests": len(measured),
        "ok": len(ok),
        "errors": errors,
        "non_200": non_200,
        "achieved_rate": answered / seconds,
        "last_answer_after_s": window_end - warmup,
        "p50": pct(from_due, 0.50),
        "p95": pct(from_due, 0.95),
        "p99": pct(from_due, 0.99),
        "max": from_due[-1] if from_due else None,
        "sent_p50": pct(from_sent, 0.50),
        "sent_p95": pct(from_sent, 0.95),
        "sent_p99": pct(from_sent, 0.99),
        "send_lag_p99": pct(send_lag, 0.99),
        "slow_spans": [
            (round(a / 10 - warmup, 1), round((b + 1) / 10 - warmup, 1), round(m, 1)) for a, b, m in spans
        ],
    }


# --------------------------------------------------------------------------- report


def prepare(base: str, key: str, chain: Any = None) -> tuple[list[str], str]:
    """INVOICES invoices over the API, PAID of them paid (the sandbox route, or a transfer on
    `chain`, an anvil node); their ids and one status body."""
    invoices = [
        http("POST", f"{base}/v1/invoices", key, {"amount": "49.99", "merchant_reference": f"load-{i}"})
        for i in range(INVOICES)
    ]
    ids = [i["id"] for i in invoices]
    for invoice in invoices[:PAID]:
        if chain is None:
            http("POST", f"{base}/v1/sandbox/invoices/{invoice['id']}/pay", key, {})
        else:
            option = invoice["payment_options"][0]
            chain.transfer_token(option["destination_address"].lower(), int(option["amount_atomic"]))
    if chain is None:
        http("POST", f"{base}/v1/sandbox/mine", key, {"blocks": 1})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = http("GET", f"{base}/v1/invoices/{ids[0]}/status", key)
        if body["payments"]:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError("the paid invoices were not seen by the follower")
    return ids, json.dumps(body)


def print_report(
    args: argparse.Namespace, seconds: float, ours: dict, bare: dict, body_size: int, *, profiled: bool
) -> None:
    """The table of both runs, what was slow or failed, their ratios and the goal."""
    head = (
        f"{'server':<44} {'rate/s':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'p99 sent':>8} {'errors':>6} {'CPU ms/req':>10}"
    )
    print(head)
    print("-" * len(head))
    for label, r in (
        ("bare aiohttp 'hello' (baseline)", bare),
        (
            "watcher daemon"
            + (" (profiled)" if profiled else " (asyncio debug)" if args.slow_callbacks else ""),
            ours,
        ),
    ):
        errs = sum(r["errors"].values()) + sum(r["non_200"].values())
        print(
            f"{label:<44} {r['achieved_rate']:>7,.0f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['p99']:>7.2f} "
            f"{r['max']:>7.1f} "
            f"{r['sent_p99']:>8.2f} {errs:>6} {r['server_cpu_ms_per_request']:>10.3f}"
        )
    print(
        f"(latency from the request's due time; 'p99 sent' from when the client actually sent it; "
        f"client send lag p99: daemon {ours['send_lag_p99']:.2f} ms, baseline {bare['send_lag_p99']:.2f} ms; "
        f"status body {body_size} bytes; {INVOICES} invoices, {PAID} paid; {CONNECTIONS} keep-alive "
        "connections; "
        "CPU ms/req: the server process's CPU time over the run / requests sent, chain and follower included)"
    )
    for label, r in (("daemon", ours), ("baseline", bare)):
        if r["slow_spans"]:
            print(
                f"  {label}: requests over 20 ms were due in "
                + ", ".join(f"{a:g}-{b:g} s (worst {m:g} ms)" for a, b, m in r["slow_spans"][:8])
                + (f" and {len(r['slow_spans']) - 8} more spans" if len(r["slow_spans"]) > 8 else "")
                + f" of the {seconds:g} s"
            )
        if r["errors"] or r["non_200"]:
            print(f"  {label}: exceptions {r['errors']}, non-200 {r['non_200']}")
    print(
        f"ratios daemon/baseline: p50 x{ours['p50'] / bare['p50']:.2f}, p95 "
        f"x{ours['p95'] / bare['p95']:.2f}, "
        f"p99 x{ours['p99'] / bare['p99']:.2f}"
    )
    met = ours["p99"] <= GOAL_P99_MS and ours["achieved_rate"] >= 0.98 * args.rate
    print(
        f"goal: p99 <= {GOAL_P99_MS:g} ms at {args.rate:,.0f} requests/s: p99 {ours['p99']:.2f} ms at "
        f"{ours['achieved_rate']:,.0f}/s -> {'met' if met else 'NOT met'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.api_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s measured instead of 10")
    parser.add_argument("--rate", type=float, default=RATE, help=f"requests per second (default {RATE:,})")
    parser.add_argument("--seconds", type=float, help=f"measured seconds (default {SECONDS:g})")
    parser.add_argument(
        "--block-time",
        type=float,
        default=2.0,
        help="the chain's block time (default 2, as `watcher run --sandbox`)",
    )
    parser.add_argument(
        "--chain",
        choices=("sandbox", "anvil"),
        default="sandbox",
        help="sandbox: `watcher run --sandbox` (its chain is eth-tester inside the daemon's process); "
        "anvil: `watcher run --config` on an anvil node mining every --block-time s, polled "
        "every 1 s, as in production",
    )
    parser.add_argument(
        "--profile", action="store_true", help="run the daemon in-process under pyinstrument (see doc)"
    )
    parser.add_argument(
        "--slow-callbacks",
        type=float,
        metavar="SECONDS",
        help="run the daemon in-process with asyncio debug on: every callback holding the loop longer "
        "than this is logged (with what it was) to the daemon's log, whose path is printed",
    )
    parser.add_argument(
        "--dump", help="write the daemon run's samples (due, sent, done, status) as JSON here"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hello", help=argparse.SUPPRESS)
    parser.add_argument("--serve-profiled", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asyncio.run(load(json.loads(args.child)))))
        return
    if args.hello:
        hello_main(json.loads(args.hello))
        return
    if args.serve_profiled:
        serve_profiled(json.loads(args.serve_profiled))
        return

    seconds = args.seconds or (5.0 if args.quick else SECONDS)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-api-"))
    profile_to = str(CACHE / "profile-api.txt") if args.profile else None
    CACHE.mkdir(parents=True, exist_ok=True)
    print(
        f"== API load: GET /v1/invoices/{{id}}/status, open loop at {args.rate:,.0f}/s for {seconds:g} s "
        f"(+{WARMUP:g} s warm-up), client in its own process; {args.chain} chain, a block every "
        f"{args.block_time:g} s",
        flush=True,
    )
    spec = {"rate": args.rate, "seconds": seconds, "warmup": WARMUP, "dump": args.dump}
    node = chain = None
    if args.chain == "anvil":
        from bench.live import start_daemon as start_on_node
        from bench.live import start_node

        if profile_to or args.slow_callbacks:
            raise SystemExit(
                "--profile and --slow-callbacks run the sandbox daemon in-process: use --chain sandbox"
            )
        node, chain = start_node(args.block_time)
        daemon, base, key = start_on_node(tmp, node, chain, None, ws=False, poll=1.0)
    else:
        daemon, base, key = start_daemon(tmp, args.block_time, profile_to, args.slow_callbacks)
    try:
        ids, body = prepare(base, key, chain)
        if profile_to or args.slow_callbacks:
            daemon.process.send_signal(__import__("signal").SIGUSR1)
        ours = loaded(daemon, {**spec, "base": base, "key": key, "ids": ids})
    finally:
        daemon.stop()
        if node is not None:
            node.stop()
    hello, hello_base = start_hello(tmp, body)
    try:
        bare = loaded(hello, {**spec, "base": hello_base, "ids": ids, "dump": None})
    finally:
        hello.stop()

    print_report(args, seconds, ours, bare, len(body), profiled=profile_to is not None)
    if profile_to:
        print(f"profile of the daemon under load: {profile_to}")
    if args.slow_callbacks:
        print(
            f"slow callbacks (asyncio debug, > {args.slow_callbacks * 1000:g} ms) logged in "
            f"{tmp / 'daemon.log'}"
        )
    print(f"(api_load took {time.monotonic() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
