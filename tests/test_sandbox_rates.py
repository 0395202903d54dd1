"""The sandbox prices ETH live: a TestPriceFeed on its chain, read as a Chainlink feed, so a
plain invoice offers ETH without quote_rates."""

from __future__ import annotations

from checkout_harness import CheckoutHarness
from harness import Harness
from test_sandbox_restart import Sandbox

from watcher.sandbox import ETH_USD_PRICE, sandbox_rates_data


class LiveSandbox(Harness):
    def rates_settings(self) -> list[dict]:
        assert self.chain is not None
        return sandbox_rates_data(self.chain)


async def test_the_sandbox_quotes_eth_from_its_feed_and_it_is_paid(harnesses):
    h = await harnesses(LiveSandbox)
    invoice = await h.create(amount="49.99")
    options = {o["asset"]: o for o in invoice["payment_options"]}
    assert ETH_USD_PRICE == 2000 * 10**8
    assert options["ETH"]["quote_rate"] == "2000" and options["ETH"]["quote_source"] == "chainlink"
    assert options["ETH"]["amount_atomic"] == str(24_995 * 10**12)
    assert options["TUSD"]["quote_source"] == "config"
    await h.pay(invoice["id"], option_id=options["ETH"]["id"])
    await h.mine(3)
    done = await h.wait_status(invoice["id"], "confirmed")
    assert done["payment_summary"]["payment_state"] == "exact"


def test_watcher_run_sandbox_offers_eth_without_quote_rates(tmp_path):
    sandbox = Sandbox(tmp_path / "sandbox.db")
    try:
        invoice = sandbox.api("POST", "/v1/invoices", {"amount": "10"})
        assert {o["asset"]: o["quote_source"] for o in invoice["payment_options"]} == {
            "TUSD": "config",
            "ETH": "chainlink",
        }
    finally:
        sandbox.stop()


class EuroShop(CheckoutHarness):
    """The sandbox with its payment page, and an EUR/USD feed at 1.25 beside its ETH/USD one."""

    def rates_settings(self) -> list[dict]:
        assert self.chain is not None
        eur_usd = self.chain.deploy_contract(
            "TestPriceFeed", ["uint8", "string", "int256"], [8, "EUR / USD", 125 * 10**6]
        )
        return [
            *sandbox_rates_data(self.chain),
            {
                "pair": "EUR/USD",
                "source": "chainlink",
                "chain": "sandbox",
                "feed": eur_usd,
                "max_age_seconds": 86400,
            },
        ]


async def test_an_eur_invoice_sums_and_shows_its_amounts_in_eur(harnesses):
    shop = await harnesses(EuroShop)
    invoice = await shop.create(amount="10", currency="EUR", assets=["TUSD"])
    [option] = invoice["payment_options"]
    assert option["quote_rate"] == "0.8" and option["amount_atomic"] == "12500000"  # 10 EUR = 12.50 TUSD
    assert option["quote_source"] == "config+chainlink"
    await shop.pay(invoice["id"], amount="5")  # 4 EUR
    await shop.mine(1)
    partial = await shop.wait_invoice(
        invoice["id"], lambda i: i["payment_summary"]["payment_state"] == "partial", "partial"
    )
    assert partial["payment_summary"]["received_amount"] == "4.00"
    assert partial["payment_summary"]["remaining_amount"] == "6.00"
    status, html, _ = await shop.public(f"/pay/{invoice['id']}")
    assert status == 200
    assert "10 EUR" in html and "We received 4.00 EUR of 10 EUR" in html and "6.00 EUR" in html
    assert "USD" not in html.replace("TUSD", "")
