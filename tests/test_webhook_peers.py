"""The real daemon (`watcher run --sandbox`, a process of its own) against webhook endpoints that
misbehave: one redirects, one never answers, one answers 50 MB; a healthy one beside them gets
every event at once, and the daemon's memory stays flat."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from daemon import SandboxDaemon
from harness import free_port

from watcher.webhooks import secret_key, verify

BIG = 50 * 1024 * 1024
CHUNK = b"x" * (1024 * 1024)
INVOICES = 40  # more than an endpoint's 16 attempts in flight, so the hanging one fills its lane


class Peers:
    """Four endpoints on one local server: /redirect, /hang, /huge and /ok (which checks signatures)."""

    def __init__(self) -> None:
        self.secret = ""
        self.ok_ids: list[str] = []
        self.bad_signatures = 0
        self.hits: dict[str, int] = {}
        self.huge_bytes_sent = 0
        self.huge_finished = 0
        self.base = ""
        self._runner: web.AppRunner | None = None

    def count(self, name: str) -> None:
        self.hits[name] = self.hits.get(name, 0) + 1

    async def redirect(self, request: web.Request) -> web.Response:
        self.count("redirect")
        return web.Response(
            status=307, headers={"Location": f"{self.base}/elsewhere?token=LOCATION-SECRET-77"}
        )

    async def elsewhere(self, request: web.Request) -> web.Response:
        self.count("elsewhere")
        return web.Response(status=204)

    async def hang(self, request: web.Request) -> web.Response:
        self.count("hang")
        await asyncio.sleep(120)
        return web.Response(status=204)

    async def huge(self, request: web.Request) -> web.StreamResponse:
        self.count("huge")
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
        response.content_length = BIG
        await response.prepare(request)
        try:
            for _ in range(BIG // len(CHUNK)):
                await response.write(CHUNK)
                self.huge_bytes_sent += len(CHUNK)
            self.huge_finished += 1
        except ConnectionError:
            pass
        return response

    async def ok(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not verify(secret_key(self.secret), request.headers, body, now=time.time()):
            self.bad_signatures += 1
            return web.Response(status=401)
        self.ok_ids.append(request.headers["webhook-id"])
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        for name in ("redirect", "hang", "huge", "ok"):
            app.router.add_post(f"/{name}", getattr(self, name))
        app.router.add_route("*", "/elsewhere", self.elsewhere)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.base = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def peers():
    made = Peers()
    await made.start()
    yield made
    await made.stop()


async def test_misbehaving_endpoints_hurt_only_themselves(tmp_path, peers):
    redirect_url = f"{peers.base}/redirect?token=ENDPOINT-SECRET-55"
    urls = [redirect_url, f"{peers.base}/hang", f"{peers.base}/huge", f"{peers.base}/ok"]
    args = [arg for url in urls for arg in ("--webhook-url", url)]
    async with SandboxDaemon(tmp_path, *args) as daemon:
        peers.secret = daemon.webhook_secret
        # The memory baseline once the dispatcher's process is up: its own start-up is not what
        # this checks (the first invoice's delivery to the healthy endpoint shows it is).
        status, first = await daemon.request("POST", "/v1/invoices", json={"amount": "0.50"})
        assert status == 201, first
        deadline = time.monotonic() + 15
        while not peers.ok_ids:
            assert time.monotonic() < deadline, "the healthy endpoint got nothing"
            await asyncio.sleep(0.02)
        rss_before = daemon.rss_kib()
        ids = [first["id"]]
        for n in range(1, INVOICES):
            status, invoice = await daemon.request("POST", "/v1/invoices", json={"amount": f"{n + 1}.50"})
            assert status == 201, invoice
            ids.append(invoice["id"])
        created = time.monotonic()

        # The healthy endpoint gets every invoice.created at once, whatever the others do.
        while len(peers.ok_ids) < INVOICES:
            assert time.monotonic() - created < 8, (
                f"the healthy endpoint got {len(peers.ok_ids)} of {INVOICES}"
            )
            await asyncio.sleep(0.05)
        assert len(set(peers.ok_ids)) == INVOICES and peers.bad_signatures == 0

        async def deliveries(url_part: str) -> list[dict]:
            status, page = await daemon.request("GET", "/v1/webhook-deliveries?limit=200")
            assert status == 200, page
            return [d for d in page["data"] if url_part in d["url"]]

        # 50 MB answers: delivered (a 200), read no further than 64 KiB, memory flat.
        deadline = time.monotonic() + 20
        while {d["status"] for d in await deliveries("/huge")} != {"delivered"}:
            assert time.monotonic() < deadline, await deliveries("/huge")
            await asyncio.sleep(0.1)
        assert peers.hits["huge"] == INVOICES and peers.huge_finished == 0
        assert peers.huge_bytes_sent < INVOICES * BIG / 4
        grown_mib = (daemon.rss_kib() - rss_before) / 1024
        assert grown_mib < 40, f"the daemon grew by {grown_mib:.0f} MiB"

        # A redirect: a failed attempt, never followed, its Location named with the token masked.
        # After 10 in a row the endpoint's breaker holds the rest, unattempted.
        redirected = await deliveries("/redirect")
        assert len(redirected) == INVOICES and {d["status"] for d in redirected} == {"pending"}
        tried = [d for d in redirected if d["attempts"]]
        assert len(tried) >= 10 and peers.hits["redirect"] == len(tried)
        for d in redirected:
            assert d["url"] == f"{peers.base}/redirect?token=***"
        for d in tried:
            assert d["last_status_code"] == 307
            assert d["last_error"] == (
                f"HTTP 307: a redirect to {peers.base}/elsewhere?token=***; redirects are not followed"
            )
        assert "elsewhere" not in peers.hits
        async with aiohttp.ClientSession() as http, http.get(daemon.base_url + "/metrics") as r:
            metrics = await r.text()
        assert f'watcher_webhook_endpoint_paused{{endpoint="{peers.base}/redirect?token=***"}} 1.0' in metrics
        assert "SECRET" not in metrics

        # The hanging endpoint holds only its own lane: 16 attempts in flight, the rest waiting.
        assert peers.hits["hang"] <= 16
        hung = await deliveries("/hang")
        assert len(hung) == INVOICES and {d["status"] for d in hung} == {"pending"}

    err = daemon.stderr()
    for secret in ("ENDPOINT-SECRET-55", "LOCATION-SECRET-77", daemon.api_key, daemon.webhook_secret):
        assert secret not in err
    assert "Traceback" not in err
