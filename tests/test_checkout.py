"""The hosted payment page over HTTP, through the real daemon on the sandbox chain: the public
listener and what it refuses, the invoice's checkout fields, the page's states, the status
JSON, the live event stream (resumption, caps, timeout) and the sandbox's simulate button.
The browser's view of the same page is in test_checkout_browser.py."""

from __future__ import annotations

import asyncio
import json
import re
import secrets

import aiohttp
import pytest
from checkout_harness import CheckoutHarness, read_sse
from harness import Harness
from test_e2e_rules import travel_past_deadline

from watcher import domain
from watcher.checkout.i18n import LANGUAGES, _catalogue, negotiate, placeholders
from watcher.checkout.public import screen_of
from watcher.config import ConfigError, settings_from_dict

PRIVATE = {
    "customer_email": "buyer.private@example.com",
    "merchant_reference": "order-SECRET-123",
    "customer_id": "cust-HIDDEN-9",
    "bill_to": "Jane Private Payer",
    "metadata": {"order_id": "ord-META-77", "notes": "VIP-NOTE-42"},
}
PRIVATE_STRINGS = [
    "buyer.private@example.com",
    "order-SECRET-123",
    "cust-HIDDEN-9",
    "Jane Private Payer",
    "ord-META-77",
    "VIP-NOTE-42",
]


@pytest.fixture
async def shop(harnesses) -> CheckoutHarness:
    return await harnesses(CheckoutHarness)


# --------------------------------------------------------------------------- config and invoice fields


def _config(tmp_path, **checkout) -> dict:
    return {
        "database": str(tmp_path / "w.db"),
        "http": {"listen": "127.0.0.1:8080"},
        "checkout": checkout,
        "chains": [
            {
                "name": "c",
                "chain_id": 1,
                "rpc_urls": ["http://127.0.0.1:1"],
                "poll_interval_seconds": 1.0,
                "confirmations": 1,
                "merchant_address": "0x" + "11" * 20,
                "router_address": "0x" + "22" * 20,
                "assets": [{"symbol": "ETH", "kind": "native"}],
            }
        ],
    }


def test_checkout_config_is_validated_with_the_key_named(tmp_path):
    env = {"WATCHER_API_KEY": "sk_test_Qm3v9XcT2pLr8KwZ4nYh7JdF6sBa1Ue5"}  # 32+ random characters
    ok = settings_from_dict(
        _config(tmp_path, listen="0.0.0.0:8081", public_base_url="https://pay.shop.example/"), env
    )
    assert (
        ok.checkout is not None and ok.checkout.public_base_url == "https://pay.shop.example"
    )  # no trailing slash
    assert ok.checkout.brand_name is None and ok.checkout.max_streams == 10_000
    for bad, key in [
        (
            {"listen": "127.0.0.1:8080", "public_base_url": "https://pay.example"},
            "checkout.listen",
        ),  # the API's own
        ({"listen": "0.0.0.0:8081", "public_base_url": "ftp://pay.example"}, "checkout.public_base_url"),
        (
            {"listen": "0.0.0.0:8081", "public_base_url": "https://u:p@pay.example"},
            "checkout.public_base_url",
        ),
        (
            {"listen": "0.0.0.0:8081", "public_base_url": "https://pay.example/?a=1"},
            "checkout.public_base_url",
        ),
        ({"listen": "0.0.0.0:8081"}, "checkout.public_base_url"),
        (
            {"listen": "0.0.0.0:8081", "public_base_url": "https://pay.example", "brand_name": ""},
            "checkout.brand_name",
        ),
        (
            {"listen": "0.0.0.0:8081", "public_base_url": "https://pay.example", "colour": "red"},
            "checkout.colour",
        ),
    ]:
        with pytest.raises(ConfigError) as err:
            settings_from_dict(_config(tmp_path, **bad), env)
        assert err.value.key == key, (bad, err.value)


async def test_invoices_carry_checkout_url_redirect_url_and_updated_at(shop):
    invoice = await shop.create(redirect_url="https://shop.example/orders/123?from=pay")
    assert invoice["checkout_url"] == f"{shop.public_url}/pay/{invoice['id']}"
    assert invoice["redirect_url"] == "https://shop.example/orders/123?from=pay"
    assert invoice["updated_at"] == invoice["created_at"]
    await shop.pay(invoice["id"])
    await shop.mine(1)
    paid = await shop.wait_status(invoice["id"], "paid")
    assert paid["version"] > invoice["version"] and paid["updated_at"] >= invoice["updated_at"]
    assert paid["checkout_url"] == invoice["checkout_url"]


async def test_without_checkout_the_url_is_null_and_redirect_url_is_still_kept(harness: Harness):
    invoice = await harness.create(redirect_url="http://localhost:3000/done")
    assert invoice["checkout_url"] is None and invoice["redirect_url"] == "http://localhost:3000/done"


@pytest.mark.parametrize(
    "url",
    [
        "javascript:alert(1)",
        "ftp://shop.example/x",
        "/relative/path",
        "https://",
        "https://shop.example/a b",
        "https://user:pw@shop.example/",
        "https://shop.example/\n",
        "https://shop.example/" + "a" * 2000,
        "",
    ],
)
async def test_a_bad_redirect_url_is_a_422_and_creates_nothing(harness: Harness, url):
    status, body, _ = await harness.request("POST", "/v1/invoices", json={"amount": "5", "redirect_url": url})
    assert status == 422, body
    assert body["errors"][0]["field"] == "redirect_url"
    _, listed, _ = await harness.request("GET", "/v1/invoices")
    assert listed["total"] == 0


def test_invoice_id_randomness_comes_from_secrets(monkeypatch):
    calls = []

    def fake(n: int) -> bytes:
        calls.append(n)
        return b"\xff" * n

    monkeypatch.setattr(secrets, "token_bytes", fake)
    made = domain.new_id("inv", 0)
    # 80 bits, all from secrets: five of each of 16 bytes (domain.new_ids)
    assert calls == [16] and made == "inv_" + "0" * 10 + "Z" * 16


# --------------------------------------------------------------------------- the public listener


async def test_the_public_listener_serves_only_the_page(shop):
    invoice = await shop.create()
    for path in (
        "/v1/invoices",
        f"/v1/invoices/{invoice['id']}",
        "/metrics",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/docs",
        "/v1/sandbox/mine",
        "/",
        "/pay",
        "/pay/static/../../watcher/config.py",
        "/pay/static/x.js",
    ):
        status, text, headers = await shop.public(path)
        assert status == 404, path
        assert invoice["id"] not in text and "Content-Security-Policy" in headers
    async with shop.http.post(
        f"{shop.public_url}/v1/invoices",
        json={"amount": "1"},
        headers={"Authorization": f"Bearer {shop.api_key}"},
    ) as r:
        assert r.status == 404
    # ...and the API does not serve the page.
    status, _, _ = await shop.request("GET", f"/pay/{invoice['id']}", auth=False)
    assert status == 404


async def test_page_shows_what_paying_needs_and_nothing_private(shop):
    invoice = await shop.create(product_name="Pro Plan - Monthly", issued_by="Issuer Ltd", **PRIVATE)
    option = invoice["payment_options"][0]
    status, html, headers = await shop.public(f"/pay/{invoice['id']}")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"
    assert "Acme, Inc." in html and "Pro Plan - Monthly" in html and "49.99 USD" in html
    assert option["destination_address"] in html and ">49.99<" in html
    assert option["payment_uri"].replace("&", "&amp;") in html
    assert re.search(r"<svg [^>]*class=\"qr\"", html)
    assert 'data-screen="waiting"' in html and 'id="countdown"' in html
    for secret in PRIVATE_STRINGS:
        assert secret not in html
    status, text, _ = await shop.public(f"/pay/{invoice['id']}/status")
    for secret in PRIVATE_STRINGS:
        assert secret not in text
    assert json.loads(text)["screen"] == "waiting"


async def test_unknown_malformed_and_draft_ids_get_the_404_page(shop):
    draft = await shop.create(draft=True)
    assert draft["checkout_url"].endswith(draft["id"])
    for invoice_id in (draft["id"], "inv_" + "0" * 26, "nope", "inv_01J'\"<script>", "x" * 500):
        status, html, headers = await shop.public(f"/pay/{invoice_id}")
        assert status == 404 and "Payment page not found" in html, invoice_id
        assert "<script>" not in html
        status, text, _ = await shop.public(f"/pay/{invoice_id}/status")
        assert status == 404 and json.loads(text)["error"] == "not_found"
        status, _, _ = await shop.public(f"/pay/{invoice_id}/events")
        assert status == 404
    status, html, _ = await shop.public(f"/pay/{draft['id']}", headers={"Accept-Language": "fr"})
    assert status == 404 and "Page de paiement introuvable" in html


async def test_languages_from_accept_language_and_lang(shop):
    invoice = await shop.create()
    path = f"/pay/{invoice['id']}"
    for header, query, lang, title in [
        ("de-CH,de;q=0.9,en;q=0.5", "", "de", "Wir warten auf Ihre Zahlung"),
        ("es", "", "es", "Esperando su pago"),
        ("ja,fr;q=0.4", "", "fr", "En attente de votre paiement"),
        ("ja", "", "en", "Waiting for your payment"),
        ("de", "?lang=es", "es", "Esperando su pago"),
        ("de", "?lang=xx", "de", "Wir warten auf Ihre Zahlung"),
    ]:
        status, html, headers = await shop.public(path + query, headers={"Accept-Language": header})
        assert status == 200 and headers["Content-Language"] == lang and f'<html lang="{lang}">' in html
        assert title in html, (header, query)


def test_catalogues_are_complete_with_the_same_placeholders():
    reference = _catalogue("en")
    for lang in LANGUAGES:
        catalogue = _catalogue(lang)
        assert set(catalogue) == set(reference), lang
        for key, text in catalogue.items():
            assert placeholders(text) == placeholders(reference[key]), (lang, key)
            assert text.strip(), (lang, key)
    assert negotiate(None, "fr;q=0.2, de;q=0.8") == "de"
    assert negotiate(None, "de;q=0, en") == "en"
    assert negotiate(None, "q=;;,,;") == "en"
    assert negotiate("FR", None) == "fr"


@pytest.mark.parametrize(
    "status, state, exception, screen",
    [
        ("pending", "unpaid", None, "waiting"),
        ("pending", "partial", None, "partial"),
        ("paid", "exact", None, "paid"),
        ("confirmed", "exact", None, "confirmed"),
        ("confirmed", "overpaid", {"type": "overpaid", "status": "open"}, "overpaid"),
        ("paid", "overpaid", {"type": "overpaid", "status": "open"}, "overpaid"),
        ("expired", "unpaid", None, "expired"),
        ("expired", "unpaid", {"type": "late_payment", "status": "open"}, "late"),
        ("expired", "unpaid", {"type": "late_payment", "status": "resolved"}, "expired"),
        ("cancelled", "unpaid", {"type": "late_payment", "status": "open"}, "late"),
        ("cancelled", "unpaid", None, "cancelled"),
        ("underpaid", "partial", {"type": "underpaid", "status": "open"}, "underpaid"),
    ],
)
def test_each_state_has_its_screen(status, state, exception, screen):
    invoice = {"status": status, "payment_summary": {"payment_state": state}, "exception": exception}
    assert screen_of(invoice) == screen


async def test_partly_paid_shows_what_remains_to_the_same_address(shop):
    invoice = await shop.create(amount="10")
    option = invoice["payment_options"][0]
    await shop.pay(invoice["id"], amount="4")
    await shop.mine(1)
    await shop.wait_invoice(
        invoice["id"], lambda i: i["payment_summary"]["payment_state"] == "partial", "partial"
    )
    status, html, _ = await shop.public(f"/pay/{invoice['id']}")
    assert 'data-screen="partial"' in html
    assert "We received 4.00 USD of 10 USD" in html and "6.00 USD" in html
    assert '<span id="pay-amount" class="mono">6</span>' in html
    assert option["destination_address"] in html
    rest_uri = option["payment_uri"].replace("uint256=10000000", "uint256=6000000")
    assert rest_uri.replace("&", "&amp;") in html
    status, text, _ = await shop.public(f"/pay/{invoice['id']}/status")
    body = json.loads(text)
    assert body["payment_summary"]["remaining_amount"] == "6.00" and len(body["payments"]) == 1
    assert set(body["payments"][0]) == {
        "transaction_hash",
        "network",
        "asset",
        "amount",
        "confirmations",
        "status",
        "late",
    }


async def test_expired_cancelled_and_late_screens(shop):
    cancelled = await shop.create(amount="3")
    status, _, _ = await shop.request("POST", f"/v1/invoices/{cancelled['id']}/cancel")
    assert status == 200
    _, html, _ = await shop.public(f"/pay/{cancelled['id']}")
    assert 'data-screen="cancelled"' in html and 'id="pay"' not in html

    gone = await shop.create(amount="3")
    await travel_past_deadline(shop, gone)
    await shop.wait_status(gone["id"], "expired")
    _, html, _ = await shop.public(f"/pay/{gone['id']}")
    assert 'data-screen="expired"' in html and 'id="pay"' not in html and "ethereum:" not in html
    await shop.pay(gone["id"])
    await shop.mine(1)
    await shop.wait_invoice(gone["id"], lambda i: i["exception"] is not None, "late payment")
    _, html, _ = await shop.public(f"/pay/{gone['id']}")
    assert 'data-screen="late"' in html and "arrived late" in html


async def test_confirmed_sends_the_payer_to_redirect_url_with_the_invoice_id(shop):
    invoice = await shop.create(redirect_url="https://shop.example/done?order=7&invoice_id=forged")
    await shop.pay(invoice["id"])
    await shop.mine(4)
    await shop.wait_status(invoice["id"], "confirmed")
    _, text, _ = await shop.public(f"/pay/{invoice['id']}/status")
    target = json.loads(text)["redirect_to"]
    assert target == f"https://shop.example/done?order=7&invoice_id={invoice['id']}"
    _, html, _ = await shop.public(f"/pay/{invoice['id']}")
    assert 'data-screen="confirmed"' in html and 'id="redirect-link"' in html
    assert target.replace("&", "&amp;") in html


async def test_sandbox_simulate_button_pays_through_the_sandbox_route(shop):
    invoice = await shop.create(amount="7")
    option_id = invoice["payment_options"][0]["id"]
    async with shop.http.post(
        f"{shop.public_url}/pay/{invoice['id']}/simulate?lang=de",
        data={"payment_option_id": option_id},
        allow_redirects=False,
    ) as r:
        assert r.status == 303 and r.headers["Location"] == f"/pay/{invoice['id']}?option={option_id}&lang=de"
    await shop.mine(1)
    paid = await shop.wait_status(invoice["id"], "paid")
    assert paid["payments"][0]["amount"] == "7"


async def test_simulate_is_not_served_outside_the_sandbox(tmp_path):
    from watcher.checkout.routes import make_checkout_app
    from watcher.config import CheckoutSettings

    settings = CheckoutSettings(listen="127.0.0.1:1", public_base_url="https://pay.example")
    app = make_checkout_app(None, settings, None)  # type: ignore[arg-type]  # routes only: nothing is called
    assert not any(r.method == "POST" for r in app.router.routes())


# --------------------------------------------------------------------------- the live stream


async def test_stream_follows_payment_confirmations_and_resumes(shop):
    invoice = await shop.create()
    url = f"{shop.public_url}/pay/{invoice['id']}/events"
    async with shop.http.get(url) as stream:
        assert stream.status == 200 and stream.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(read_sse(stream), 5)
        assert first["event"] == "status" and first["retry"] == "3000"
        assert json.loads(first["data"])["screen"] == "waiting"
        await shop.pay(invoice["id"])
        await shop.mine(1)
        seen = json.loads((await asyncio.wait_for(read_sse(stream), 5))["data"])
        assert seen["screen"] == "paid" and seen["confirmations"] == 1 and seen["required_confirmations"] == 3
        await shop.mine(1)  # no webhook event for a confirmation: the blocks move it on
        message = await asyncio.wait_for(read_sse(stream), 5)
        assert json.loads(message["data"])["confirmations"] == 2
        last_id = message["id"]
        assert int(last_id) > int(first["id"])
    await shop.mine(2)
    await shop.wait_status(invoice["id"], "confirmed")
    async with shop.http.get(url, headers={"Last-Event-ID": last_id}) as stream:
        resumed = json.loads((await asyncio.wait_for(read_sse(stream), 5))["data"])
    assert resumed["screen"] == "confirmed" and resumed["missed_events"] == ["invoice.confirmed"]


class TightStreams(CheckoutHarness):
    checkout_extra = {"max_streams": 3, "max_streams_per_invoice": 2, "stream_timeout_seconds": 10}


async def test_streams_are_capped_per_invoice_and_in_total_and_time_out(harnesses):
    h = await harnesses(TightStreams)
    a, b = await h.create(), await h.create()
    opened = []

    async def open_stream(invoice_id: str) -> aiohttp.ClientResponse:
        response = await h.http.get(f"{h.public_url}/pay/{invoice_id}/events")
        opened.append(response)
        return response

    try:
        for _ in range(2):
            assert (await open_stream(a["id"])).status == 200
        refused = await open_stream(a["id"])
        assert refused.status == 503 and refused.headers["Retry-After"] == "10"  # per invoice
        assert (await open_stream(b["id"])).status == 200
        assert (await open_stream(b["id"])).status == 503  # in total
        assert h.service.feed.open_streams == 3
        # The timeout ends a stream (the browser reconnects and resumes).
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(opened[0].read(), 20)
        assert 9 <= asyncio.get_running_loop().time() - started <= 20
        await h.wait_for(lambda: h.service.feed.open_streams <= 2, what="a stream closed")
    finally:
        for response in opened:
            response.close()
    await h.wait_for(lambda: h.service.feed.open_streams == 0, what="every stream closed")
    assert h.service.feed.channels == {}


async def test_the_page_and_its_assets_are_under_100_kb_and_cached(shop):
    invoice = await shop.create(amount="10", quote_rates={"ETH": "2000"}, rails=["address", "contract"])
    status, html, _ = await shop.public(f"/pay/{invoice['id']}")
    assert status == 200 and len(invoice["payment_options"]) == 4
    assets = re.findall(r'(?:href|src)="(/pay/static/[^"]+)"', html)
    assert len(assets) == 3
    total = len(html.encode())
    for path in assets:
        status, body, headers = await shop.public(path.replace("&amp;", "&"))
        assert status == 200 and headers["Cache-Control"] == "public, max-age=31536000, immutable"
        total += len(body.encode())
    assert total < 100 * 1024, total


async def test_overpaid_and_underpaid_screens_say_what_happened(shop):
    over = await shop.create(amount="5")
    await shop.pay(over["id"], amount="7")
    under = await shop.create(amount="10")
    await shop.pay(under["id"], amount="4")
    await shop.mine(1)
    await shop.wait_status(over["id"], "paid")
    _, html, _ = await shop.public(f"/pay/{over['id']}")
    assert 'data-screen="overpaid"' in html and "You sent 2.00 USD more than the 5 USD due" in html
    assert 'id="pay"' not in html and "1 of 3 confirmations" in html

    await travel_past_deadline(shop, under)
    await shop.wait_status(under["id"], "underpaid")
    _, html, headers = await shop.public(f"/pay/{under['id']}", headers={"Accept-Language": "es"})
    assert 'data-screen="underpaid"' in html and "Solo llegaron 4.00 USD de 10 USD antes del plazo" in html
    assert 'id="pay"' not in html and headers["Content-Language"] == "es"


def test_the_sandbox_prints_the_payment_pages_and_a_taken_address_is_named(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from harness import free_port, wait_http

    api, page = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "WATCHER_API_KEY"}
    command = [
        sys.executable,
        "-m",
        "watcher.cli",
        "run",
        "--sandbox",
        "--listen",
        f"127.0.0.1:{api}",
        "--checkout-listen",
        f"127.0.0.1:{page}",
        "--block-time",
        "0",
        "--database",
        str(tmp_path / "s.db"),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 60
        while not any("API key:" in line for line in lines) and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        [pages] = [line for line in lines if "payment pages:" in line]
        assert f"http://127.0.0.1:{page}/pay/<invoice id>" in pages
        key = next(line for line in lines if "API key:" in line).split("API key:")[1].strip()
        wait_http(f"http://127.0.0.1:{api}/healthz", timeout=20)
        request = urllib.request.Request(
            f"http://127.0.0.1:{api}/v1/invoices",
            data=b'{"amount": "3"}',
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            invoice = json.loads(r.read())
        assert invoice["checkout_url"] == f"http://127.0.0.1:{page}/pay/{invoice['id']}"
        with urllib.request.urlopen(invoice["checkout_url"], timeout=10) as r:
            html = r.read().decode()
        assert 'id="simulate"' in html and f'action="/pay/{invoice["id"]}/simulate"' in html
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "Traceback" not in out

    with socket.socket() as taken:  # the page's address is taken: one line naming it, exit 1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        command[command.index("--checkout-listen") + 1] = f"127.0.0.1:{busy}"
        command[command.index("--listen") + 1] = f"127.0.0.1:{free_port()}"
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output
    [line] = [line for line in output.splitlines() if "listen_failed" in line]
    assert f"127.0.0.1:{busy}" in line and "address already in use" in line
