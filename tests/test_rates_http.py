"""HTTP price sources against a real local server in the shape of an exchange's spot-price
JSON, and servers that misbehave: slow, redirecting, answering garbage or too much. None may
delay a create, and none may quote."""

from __future__ import annotations

import asyncio
import re
import time
from fractions import Fraction

import pytest
from aiohttp import web
from harness import Harness, free_port

from watcher.rates.sources import SourceFailed
from watcher.rates.sources import http as http_source
from watcher.rates.sources.http import HttpSource

SPOT = b'{"data": {"base": "ETH", "currency": "USD", "amount": 2000.123456789012345678}}'


class PriceServer:
    """Each path misbehaves its own way; `hits` counts the requests per path."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.times: list[float] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] = self.hits.get(path, 0) + 1
        self.times.append(time.monotonic())
        if path == "/spot":
            return web.Response(body=SPOT, content_type="application/json")
        if path == "/slow":
            await asyncio.sleep(30)
            return web.Response(body=SPOT, content_type="application/json")
        if path == "/redirect":
            raise web.HTTPFound("/target")
        if path == "/target":  # where the redirect points: must never be asked
            return web.Response(body=SPOT, content_type="application/json")
        if path == "/garbage":
            return web.Response(text="<html><body>rate limited</body></html>", content_type="text/html")
        if path == "/huge":
            return web.Response(body=b'{"data": {"amount": "1", "pad": "' + b"x" * 300_000 + b'"}}')
        if path == "/error":
            return web.Response(status=503, text="down")
        return web.Response(status=404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def prices():
    server = PriceServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


PAIRS = {
    "ETH/USD": "/spot",
    "EUR/USD": "/slow",
    "GBP/USD": "/redirect",
    "CHF/USD": "/garbage",
    "JPY/USD": "/huge",
}


class HttpRatesHarness(Harness):
    server: PriceServer

    def rates_settings(self) -> list[dict]:
        return [
            {
                "pair": pair,
                "source": "http",
                "url": self.server.url + path,
                "json_path": "data.amount",
                "max_age_seconds": 120,
            }
            for pair, path in PAIRS.items()
        ]


async def test_misbehaving_http_sources_never_delay_a_create_and_never_quote(harnesses, prices, monkeypatch):
    monkeypatch.setattr(http_source, "TIMEOUT_SECONDS", 1.5)
    monkeypatch.setattr(HttpRatesHarness, "server", prices, raising=False)
    h = await harnesses(HttpRatesHarness)
    book = h.service.rates

    # The good source, read exactly: 18 decimals of a JSON number, no float on the way.
    invoice = await h.create(amount="100", assets=["ETH"], currency="USD")
    [option] = invoice["payment_options"]
    assert option["quote_rate"] == "2000.123456789012345678" and option["quote_source"] == "http"
    assert int(option["amount_atomic"]) == -(-(100 * 10**18 * 10**18) // 2000123456789012345678)

    # A create while the slow source hangs answers at once.
    monkeypatch.setattr(book.states[1].source, "min_interval", 0.0)
    hanging = asyncio.create_task(book.refresh(1, force=True))
    await asyncio.sleep(0.2)
    assert not hanging.done()
    started = time.monotonic()
    await h.create(amount="5")
    assert time.monotonic() - started < 1.0
    await hanging

    rates = {r["pair"]: r for r in (await h.request("GET", "/v1/rates"))[1]["data"]}
    expected = {
        "EUR/USD": r"no answer within 1\.5 s",
        "GBP/USD": r"HTTP 302: a redirect, never followed",
        "CHF/USD": r"not JSON",
        "JPY/USD": r"longer than 256 KiB",
    }
    for pair, why in expected.items():
        assert rates[pair]["quotable"] is False and rates[pair]["value"] is None, pair
        assert re.search(why, rates[pair]["sources"][0]["error"]), rates[pair]
        status, body, _ = await h.request("POST", "/v1/invoices", json={"amount": "10", "currency": pair[:3]})
        assert status == 422 and pair in body["detail"] and re.search(why, body["detail"]), body
    assert (
        rates["ETH/USD"]["value"] == "2000.123456789012345678" and rates["ETH/USD"]["age_seconds"] is not None
    )
    assert prices.hits.get("/target", 0) == 0, "a redirect is never followed"
    assert prices.hits["/spot"] == 1, "asked once at start, not at every create"

    status, metrics, _ = await h.request("GET", "/metrics", auth=False)
    for index, pair in enumerate(PAIRS):
        if pair != "ETH/USD":
            labels = f'kind="http",outcome="failed",pair="{pair}",source="rates[{index}]"'
            line = f"watcher_rate_source_errors_total{{{labels}}}"
            assert re.search(re.escape(line) + r" [1-9]", metrics), line


async def test_an_http_source_is_never_asked_twice_within_its_interval(prices):
    source = HttpSource(prices.url + "/spot", "data.amount", min_interval=0.5)
    try:
        for _ in range(3):
            reading = await source.read()
            assert reading.value == Fraction("2000.123456789012345678")
    finally:
        await source.close()
    gaps = [b - a for a, b in zip(prices.times, prices.times[1:], strict=False)]
    assert len(gaps) == 2 and all(g >= 0.5 for g in gaps), gaps


async def test_an_error_status_is_a_failure_and_credentials_never_show(prices):
    source = HttpSource(
        prices.url.replace("http://", "http://user:hunter2@") + "/error?key=sekrit", "data.amount"
    )
    try:
        with pytest.raises(SourceFailed, match="HTTP 503"):
            await source.read()
    finally:
        await source.close()
    dead = HttpSource(f"http://127.0.0.1:{free_port()}/x?key=sekrit", "p", min_interval=0)
    try:
        with pytest.raises(SourceFailed) as caught:
            await dead.read()
        assert "sekrit" not in str(caught.value)
    finally:
        await dead.close()
