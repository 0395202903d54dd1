"""The sandbox prices ETH live: a TestPriceFeed on its chain, read as a Chainlink feed, so a
plain invoice offers ETH without quote_rates."""

from __future__ import annotations

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
