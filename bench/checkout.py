"""The payment page: time to first byte and bytes of the page, and live status streams held.

    python -m bench.checkout [--quick] [--streams 5000] [--paid 50] [--pages 200]

- Server: the real daemon, `watcher run --sandbox --block-time 0` (a subprocess) with its
  public listener, webhooks to a receiver in this process, `--streams / 20` invoices (20
  streams each: the default per-invoice cap).
- Page: `--pages` GETs of `/pay/{id}` of as many invoices, one after another (each one's
  first view: its QR code is drawn), then the same again (drawn codes are cached); time to
  the response's headers (TTFB) and to its last byte; bytes of the page and its assets.
- Streams: `--streams` Server-Sent Events streams opened from this process (one aiohttp
  session), each reads its first message. Then `--paid` invoices are paid through the sandbox
  route (the sandbox mines a block whenever its 10 payer accounts are busy, and one more is
  mined at the end): each of their streams must get the change. Per stream, the time its
  message arrived minus the time the invoice's first webhook of that change
  (`invoice.payment_detected`) arrived at the receiver, both on this process's clock. The
  daemon's RSS before and with the streams open.
- Baseline (same run): a bare aiohttp server in its own process (`python -m bench.checkout
  bare`) serving a page of the same bytes, and holding the same number of aiohttp-sse streams
  to which one POST broadcasts a message: what aiohttp, this client and this machine allow.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from bench.api_load import free_port
from bench.measure import api_started

ROOT = Path(__file__).resolve().parent.parent
PER_INVOICE = 20  # [checkout] max_streams_per_invoice's default
GOAL_STREAMS = 5_000
GOAL_MS = 100.0


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def spread(values: list[float]) -> str:
    return (
        f"p50 {pct(values, 0.5):.1f} ms, p95 {pct(values, 0.95):.1f}, "
        f"p99 {pct(values, 0.99):.1f}, max {max(values):.1f}"
    )


async def wait_up(session: aiohttp.ClientSession, url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as r:
                if r.status < 500 and api_started(await r.read()):
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} never answered")


# --------------------------------------------------------------------------- the bare baseline


def bare(port: int, page_bytes: int) -> None:
    """The baseline server: a fixed page, and aiohttp-sse streams that a POST broadcasts to."""
    from aiohttp_sse import sse_response

    page = b"<!doctype html>" + b"x" * max(page_bytes - 15, 0)
    streams: set[asyncio.Queue] = set()

    async def get_page(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html")

    async def events(request: web.Request) -> web.StreamResponse:
        queue: asyncio.Queue = asyncio.Queue()
        streams.add(queue)
        try:
            async with sse_response(request) as response:
                await response.send('{"hello": true}', id="0", event="status")
                while response.is_connected():
                    data = await queue.get()
                    await response.send(data, id="1", event="status")
        finally:
            streams.discard(queue)
        return response

    async def broadcast(request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        for queue in streams:
            queue.put_nowait(body)
        return web.json_response({"streams": len(streams)})

    app = web.Application()
    app.router.add_get("/page", get_page)
    app.router.add_get("/events", events)
    app.router.add_post("/broadcast", broadcast)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --------------------------------------------------------------------------- measuring


async def ttfb(session: aiohttp.ClientSession, urls: list[str]) -> tuple[list[float], list[float], int]:
    first, whole, size = [], [], 0
    for url in urls:
        t0 = time.perf_counter()
        async with session.get(url) as r:
            t1 = time.perf_counter()
            body = await r.read()
            t2 = time.perf_counter()
            assert r.status == 200, (r.status, url)
        first.append((t1 - t0) * 1000)
        whole.append((t2 - t0) * 1000)
        size = len(body)
    return first, whole, size


async def next_event(response: aiohttp.ClientResponse) -> bytes:
    data = b""
    while True:
        line = await response.content.readline()
        if not line:
            raise ConnectionError("stream ended")
        if line in (b"\r\n", b"\n") and data:
            return data
        if line.startswith(b"data:"):
            data += line[5:].strip()


class Streams:
    """N open streams; `arrivals[i]` is when stream i got its second message."""

    def __init__(self, session: aiohttp.ClientSession, urls: list[str]) -> None:
        self.session = session
        self.urls = urls
        self.opened = 0
        self.failed: list[str] = []
        self.arrivals: dict[int, float] = {}
        self.ready = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def _one(self, i: int, url: str) -> None:
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as r:
                if r.status != 200:
                    self.failed.append(f"HTTP {r.status}")
                    return
                await next_event(r)
                self.opened += 1
                if self.opened + len(self.failed) == len(self.urls):
                    self.ready.set()
                await next_event(r)
                self.arrivals[i] = time.perf_counter()
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            self.failed.append(type(exc).__name__)
        finally:
            if self.opened + len(self.failed) == len(self.urls):
                self.ready.set()

    async def open(self, timeout: float) -> None:
        self.tasks = [asyncio.create_task(self._one(i, u)) for i, u in enumerate(self.urls)]
        await asyncio.wait_for(self.ready.wait(), timeout)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def run(args: argparse.Namespace) -> None:
    raise_fd_limit()
    invoices_n = max(args.streams // PER_INVOICE, args.paid)
    api_port, page_port, hook_port, bare_port = free_port(), free_port(), free_port(), free_port()
    key = "sk_bench_" + secrets.token_urlsafe(24)
    hooks: dict[str, float] = {}

    async def receive(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if body["type"] == "invoice.payment_detected":
            hooks.setdefault(body["data"]["invoice"]["id"], time.perf_counter())
        return web.Response(status=204)

    hook_app = web.Application()
    hook_app.router.add_post("/hooks", receive)
    hook_runner = web.AppRunner(hook_app, access_log=None)
    await hook_runner.setup()
    await web.TCPSite(hook_runner, "127.0.0.1", hook_port).start()

    workdir = Path(tempfile.mkdtemp(prefix="watcher-bench-checkout-"))
    with open(workdir / "daemon.log", "wb") as log:  # the daemon keeps its own copy of the descriptor
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "watcher.cli",
                "run",
                "--sandbox",
                "--listen",
                f"127.0.0.1:{api_port}",
                "--checkout-listen",
                f"127.0.0.1:{page_port}",
                "--block-time",
                "0",
                "--database",
                str(workdir / "w.db"),
                "--webhook-url",
                f"http://127.0.0.1:{hook_port}/hooks",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "WATCHER_API_KEY": key},
            cwd=ROOT,
        )
    bare_proc = None
    connector = aiohttp.TCPConnector(limit=0)
    session = aiohttp.ClientSession(connector=connector)
    api = f"http://127.0.0.1:{api_port}"
    auth = {"Authorization": f"Bearer {key}"}
    try:
        await wait_up(session, api + "/healthz")
        ids = []
        for _ in range(invoices_n):
            async with session.post(
                api + "/v1/invoices", json={"amount": "49.99", "product_name": "Pro Plan"}, headers=auth
            ) as r:
                ids.append((await r.json())["id"])
        page_urls = [f"http://127.0.0.1:{page_port}/pay/{ids[-1 - i % len(ids)]}" for i in range(args.pages)]

        # ---- the page: each invoice's first view (its QR code drawn), then a second view (cached)
        first, whole, page_size = await ttfb(session, page_urls)
        warm_first, warm_whole, _ = await ttfb(session, page_urls)
        async with session.get(page_urls[0]) as r:
            html = await r.text()
        import re

        asset_bytes = 0
        for path in re.findall(r'(?:href|src)="(/pay/static/[^"]+)"', html):
            async with session.get(f"http://127.0.0.1:{page_port}{path.replace('&amp;', '&')}") as r:
                asset_bytes += len(await r.read())
        bare_proc = subprocess.Popen(
            [sys.executable, "-m", "bench.checkout", "bare", str(bare_port), str(page_size)], cwd=ROOT
        )
        await wait_up(session, f"http://127.0.0.1:{bare_port}/page")
        bare_urls = [f"http://127.0.0.1:{bare_port}/page"] * args.pages
        await ttfb(session, bare_urls[:10])
        bare_first, bare_whole, _ = await ttfb(session, bare_urls)

        # ---- streams on the daemon
        rss_before = rss_mb(daemon.pid)
        urls = [
            f"http://127.0.0.1:{page_port}/pay/{ids[i // PER_INVOICE]}/events" for i in range(args.streams)
        ]
        streams = Streams(session, urls)
        t_open = time.perf_counter()
        await streams.open(timeout=300)
        open_s = time.perf_counter() - t_open
        await asyncio.sleep(1)
        rss_streams = rss_mb(daemon.pid)
        paid = ids[: args.paid]
        for invoice_id in paid:  # the sandbox mines a block whenever its 10 payer accounts are all pending
            async with session.post(
                f"{api}/v1/sandbox/invoices/{invoice_id}/pay", json={}, headers=auth
            ) as r:
                assert r.status == 200, await r.text()
        async with session.post(f"{api}/v1/sandbox/mine", json={"blocks": 1}, headers=auth) as r:
            assert r.status == 200  # the last payments' block
        expected = {i for i in range(args.streams) if ids[i // PER_INVOICE] in set(paid)}
        deadline = time.perf_counter() + 60
        while (
            not expected <= set(streams.arrivals) or len(hooks) < len(paid)
        ) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        missing = sorted({ids[i // PER_INVOICE] for i in expected - set(streams.arrivals)})
        if missing:
            print(
                f"(no stream message for {len(missing)} paid invoices: {missing[:3]}; webhook seen for "
                f"{sum(1 for m in missing if m in hooks)} of them)"
            )
        vs_hook = [
            (streams.arrivals[i] - hooks[ids[i // PER_INVOICE]]) * 1000
            for i in expected
            if i in streams.arrivals and ids[i // PER_INVOICE] in hooks
        ]
        await streams.close()

        # ---- streams on the bare server
        bare_rss_before = rss_mb(bare_proc.pid)
        bare_streams = Streams(session, [f"http://127.0.0.1:{bare_port}/events"] * args.streams)
        t_open = time.perf_counter()
        await bare_streams.open(timeout=300)
        bare_open_s = time.perf_counter() - t_open
        await asyncio.sleep(1)
        bare_rss = rss_mb(bare_proc.pid)
        t_send = time.perf_counter()
        async with session.post(f"http://127.0.0.1:{bare_port}/broadcast", data=b'{"status": "paid"}') as r:
            assert r.status == 200
        deadline = time.perf_counter() + 60
        while len(bare_streams.arrivals) < bare_streams.opened and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        bare_lat = [(t - t_send) * 1000 for t in bare_streams.arrivals.values()]
        await bare_streams.close()

        print(
            f"\n== checkout page and live streams ({args.streams:,} streams, {args.paid} invoices paid, "
            f"{args.pages} page loads)"
        )
        print(
            f"page: {page_size:,} bytes of HTML + {asset_bytes:,} of assets = {page_size + asset_bytes:,} "
            "bytes "
            f"(goal < 100 KB: {'met' if page_size + asset_bytes < 100 * 1024 else 'NOT met'})"
        )
        print(
            f"page TTFB       watcher, first view: {spread(first)}; again: {spread(warm_first)}   "
            f"bare aiohttp, same bytes: {spread(bare_first)}"
        )
        print(
            f"page last byte  watcher, first view: {spread(whole)}; again: {spread(warm_whole)}   bare: "
            f"{spread(bare_whole)}"
        )
        print(
            f"streams opened  watcher: {streams.opened:,} in {open_s:.1f} s ({len(streams.failed)} "
            "refused/failed; "
            f"RSS {rss_before:.0f} -> {rss_streams:.0f} MB)   bare aiohttp-sse: {bare_streams.opened:,} in "
            f"{bare_open_s:.1f} s (RSS {bare_rss_before:.0f} -> {bare_rss:.0f} MB)"
        )
        print(
            f"event delivery  watcher, {len(vs_hook):,} streams of {len(paid)} paid invoices: "
            f"after their webhook {spread(vs_hook)} (negative: before it)"
        )
        print(f"                bare, one broadcast to {len(bare_lat):,} streams: {spread(bare_lat)}")
        events_met = bool(vs_hook) and max(vs_hook) <= GOAL_MS and len(vs_hook) == len(expected)
        print(
            f"goal: {GOAL_STREAMS:,} open streams: {'met' if streams.opened >= GOAL_STREAMS else 'NOT met'}; "
            f"each event within {GOAL_MS:.0f} ms of its webhook: {'met' if events_met else 'NOT met'} "
            f"({len(vs_hook)} of {len(expected)} measured)"
        )
    finally:
        await session.close()
        for proc in (daemon, bare_proc):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        await hook_runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bare"]:
        raise_fd_limit()
        bare(int(argv[1]), int(argv[2]))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.checkout")
    parser.add_argument("--streams", type=int, default=GOAL_STREAMS)
    parser.add_argument("--paid", type=int, default=50)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="500 streams, 10 paid, 50 pages")
    args = parser.parse_args(argv)
    if args.quick:
        args.streams, args.paid, args.pages = 500, 10, 50
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
