"""The payment page in a real headless Chromium, through the real daemon: on anvil for real
payments (the page turns paid then confirmed without a reload; the browser-wallet button pays
through an injected EIP-1193 provider forwarding to anvil), on the sandbox chain for the rest
(the QR decodes to the option's exact payment_uri, German is German, no JavaScript still shows
the state, no other origin, nothing private). One browser serves the whole module."""

from __future__ import annotations

import io
import os
import re

import pytest
from anvil_harness import PAYERS, AnvilHarness
from browser import Browser, WalletBridge, available
from checkout_harness import CheckoutHarness
from test_checkout import PRIVATE, PRIVATE_STRINGS


@pytest.fixture(scope="module")
def browser():
    if not available():
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed: .ci/run installs them")
        pytest.skip(
            "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    b = Browser()
    try:
        yield b
    finally:
        b.quit()


class AnvilCheckout(CheckoutHarness, AnvilHarness):
    """Anvil chains (automining off: the test mines) with the payment page on."""


@pytest.fixture
async def shop(harnesses) -> CheckoutHarness:
    return await harnesses(CheckoutHarness)


def decode_qr(png: bytes) -> list[str]:
    import zxingcpp
    from PIL import Image

    return [r.text for r in zxingcpp.read_barcodes(Image.open(io.BytesIO(png)))]


# --------------------------------------------------------------------------- on anvil


async def test_page_turns_paid_then_confirmed_live_after_a_real_payment(harnesses, anvil_node, browser):
    h = await harnesses(AnvilCheckout, nodes=[anvil_node()])
    chain = h.anvil
    invoice = await h.create(amount="12.5", assets=["TUSD"], product_name="Pro Plan")
    [option] = invoice["payment_options"]
    await browser.reset()
    await browser.open(invoice["checkout_url"])
    assert await browser.screen() == "waiting"
    assert await browser.text("h1") == "Waiting for your payment"
    assert decode_qr(await browser.png("svg.qr")) == [option["payment_uri"]]
    await browser.js("window.__sameDocument = true;")  # gone if the page ever reloads
    await browser.wait(
        lambda: browser.js("return !!(window.EventSource && document.getElementById('countdown'));")
    )

    await chain.run(chain.transfer_token, option["destination_address"], 12_500_000)
    await h.mine(1)
    await browser.wait(
        lambda: browser.js("return document.getElementById('checkout').dataset.screen === 'paid';"),
        what="the page to show paid",
    )
    assert await browser.text("#progress-text") == "1 of 3 confirmations"
    assert "Payment seen" in await browser.text("#live")  # said to screen readers too
    await h.mine(1)
    await browser.wait(lambda: browser.text("#progress-text"), what="2 confirmations")
    await browser.wait(
        lambda: browser.js(
            "return document.getElementById('progress-text').textContent === '2 of 3 confirmations';"
        ),
        what="2 of 3 confirmations",
    )
    await h.mine(1)
    await browser.wait(
        lambda: browser.js("return document.getElementById('checkout').dataset.screen === 'confirmed';"),
        what="the page to show confirmed",
    )
    assert await browser.js("return window.__sameDocument === true;"), "the page reloaded"
    assert await browser.text("h1") == "Payment confirmed"
    rows = await browser.js(
        "return Array.from(document.querySelectorAll('#payments tbody tr')).map(r => r.textContent);"
    )
    assert len(rows) == 1 and "12.5 TUSD" in rows[0] and "confirmed" in rows[0]


async def test_browser_wallet_button_approves_then_pays_through_the_router(harnesses, anvil_node, browser):
    node = anvil_node()
    h = await harnesses(AnvilCheckout, nodes=[node])
    chain = h.anvil
    invoice = await h.create(amount="30", assets=["TUSD"], rails=["contract"])
    [option] = invoice["payment_options"]
    await browser.reset(wallet=True)
    await browser.open(invoice["checkout_url"])
    await browser.wait(
        lambda: browser.js("return !document.getElementById('wallet-button').hidden;"),
        what="the wallet button (shown only with a wallet)",
    )
    bridge = WalletBridge(browser, node.rpc, node.chain_id, lambda: h.mine(1))
    await browser.js("document.getElementById('wallet-button').click();")
    await browser.wait(
        lambda: browser.js("return document.getElementById('checkout').dataset.screen === 'paid';"),
        between=bridge.serve,
        what="the wallet's payment to be seen",
        timeout=30,
    )
    assert bridge.seen[:3] == ["eth_requestAccounts", "eth_chainId", "eth_sendTransaction"]
    assert [tx["to"].lower() for tx in bridge.sent] == [chain.token, chain.router]  # approve, then pay
    paid = await h.wait_status(invoice["id"], "paid")
    [payment] = paid["payments"]
    assert payment["amount_atomic"] == option["amount_atomic"] == "30000000"
    assert (
        payment["from_address"].lower() == PAYERS[0]
        and payment["to_address"].lower() == option["destination_address"].lower()
    )


async def test_wallet_refusals_are_said_in_plain_words(harnesses, anvil_node, browser):
    node = anvil_node()
    h = await harnesses(AnvilCheckout, nodes=[node])
    invoice = await h.create(amount="5", assets=["ETH"])
    for refusal, words in [
        (
            {"code": 4001, "message": "User rejected the request."},
            "You declined the request in your wallet. Nothing was sent.",
        ),
        (
            {"code": -32002, "message": "Request already pending"},
            "Your wallet already has a request open. Look at your wallet.",
        ),
        (
            {"code": -32603, "message": "insufficient funds"},
            "Your wallet could not send the payment: insufficient funds",
        ),
    ]:
        await browser.reset(wallet=True)
        await browser.open(invoice["checkout_url"])
        await browser.wait(lambda: browser.js("return !document.getElementById('wallet-button').hidden;"))
        bridge = WalletBridge(browser, node.rpc, node.chain_id, lambda: h.mine(1), refuse=refusal)
        await browser.js("document.getElementById('wallet-button').click();")
        await browser.wait(
            lambda: browser.js(
                "return document.getElementById('wallet-message').classList.contains('error');"
            ),
            between=bridge.serve,
            what="the refusal",
        )
        assert await browser.text("#wallet-message") == words
    # A wallet on another chain that does not know this one: switching fails with 4902.
    await browser.reset(wallet=True)
    await browser.open(invoice["checkout_url"])
    await browser.wait(lambda: browser.js("return !document.getElementById('wallet-button').hidden;"))
    bridge = WalletBridge(
        browser, node.rpc, node.chain_id, lambda: h.mine(1), wallet_chain_id=1, knows_chain=False
    )
    await browser.js("document.getElementById('wallet-button').click();")
    await browser.wait(
        lambda: browser.js("return document.getElementById('wallet-message').classList.contains('error');"),
        between=bridge.serve,
        what="the unknown chain",
    )
    assert await browser.text("#wallet-message") == (
        f"Your wallet does not know the anvil0 network (chain id {node.chain_id}). "
        "Add it to your wallet, then try again."
    )
    assert (await h.get(invoice["id"]))["payments"] == []


# --------------------------------------------------------------------------- on the sandbox chain


async def test_german_page_is_german_and_the_qr_is_the_exact_uri(shop, browser):
    invoice = await shop.create(amount="49.99", product_name="Jahresabo")
    [option] = invoice["payment_options"]
    await browser.reset(accept_language="de-DE,de;q=0.9")
    await browser.open(invoice["checkout_url"])
    assert await browser.js("return document.documentElement.lang;") == "de"
    assert await browser.text("h1") == "Wir warten auf Ihre Zahlung"
    assert await browser.text("#open-wallet") == "In der Wallet öffnen"
    assert await browser.text("#simulate") == "Zahlung simulieren"
    assert await browser.text(".summary dt") == "Zu zahlender Betrag"
    assert decode_qr(await browser.png("svg.qr")) == [option["payment_uri"]]
    # The language links keep working from there.
    await browser.js("document.querySelector('a[hreflang=fr]').click();")
    await browser.wait(lambda: browser.js("return document.documentElement.lang === 'fr';"))
    assert await browser.text("h1") == "En attente de votre paiement"


async def test_without_javascript_the_state_is_shown_with_a_refresh_link(shop, browser):
    invoice = await shop.create(amount="8")
    await shop.pay(invoice["id"])
    await shop.mine(1)
    await shop.wait_status(invoice["id"], "paid")
    await browser.reset(javascript=False)
    await browser.open(invoice["checkout_url"])
    assert (
        await browser.call(lambda: browser.driver.find_element("css selector", "h1").text) == "Payment seen"
    )
    assert "1 of 3 confirmations" in await browser.call(
        lambda: browser.driver.find_element("css selector", "#state").text
    )
    refresh = await browser.call(
        lambda: browser.driver.find_element("css selector", ".refresh a").get_attribute("href")
    )
    assert refresh == invoice["checkout_url"]
    await shop.mine(3)
    await shop.wait_status(invoice["id"], "confirmed")
    await browser.call(lambda: browser.driver.find_element("css selector", ".refresh a").click())
    assert (
        await browser.call(lambda: browser.driver.find_element("css selector", "h1").text)
        == "Payment confirmed"
    )

    # The simulate button is a plain form: it pays without JavaScript too.
    other = await shop.create(amount="3")
    await browser.open(other["checkout_url"])
    await browser.call(lambda: browser.driver.find_element("css selector", "#simulate").click())

    async def back_on_the_page() -> bool:  # the POST answered 303 to the page: the payment is sent
        return "option=" in await browser.call(lambda: browser.driver.current_url)

    await browser.wait(back_on_the_page, what="the simulate form's answer")
    await shop.mine(1)
    await shop.wait_status(other["id"], "paid")
    await browser.call(lambda: browser.driver.find_element("css selector", ".refresh a").click())
    assert (
        await browser.call(lambda: browser.driver.find_element("css selector", "h1").text) == "Payment seen"
    )


async def test_no_other_origin_nothing_private_and_no_api_on_the_public_listener(shop, browser):
    invoice = await shop.create(amount="20", product_name="Widget", **PRIVATE)
    origin = shop.public_url
    await browser.reset()
    await browser.open(invoice["checkout_url"])
    await browser.wait(lambda: browser.js("return document.readyState === 'complete';"))
    html = await browser.call(lambda: browser.driver.page_source)
    dom_text = await browser.js("return document.documentElement.outerHTML;")
    for secret in PRIVATE_STRINGS:
        assert secret not in html and secret not in dom_text
    assert re.findall(r"(?:https?:)?//[^\s\"'<>]+", html) == []  # no URL at all: every asset is a path here
    resources = await browser.js("return performance.getEntriesByType('resource').map(e => e.name);")
    assert resources and all(r.startswith(origin + "/") for r in resources), resources
    assert any(r.endswith(".css") or "checkout.css" in r for r in resources)
    problems = [e for e in await browser.logs() if e["level"] == "SEVERE"]
    assert problems == [], problems  # no CSP violation, no failed load, no script error
    await browser.open(origin + "/v1/invoices")
    assert await browser.text("h1") == "Payment page not found"
