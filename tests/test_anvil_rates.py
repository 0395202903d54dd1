"""Live prices on a real node: TestPriceFeed (AggregatorV3Interface) contracts on anvil, read
by the daemon as Chainlink feeds over the chain's own JSON-RPC transport, driven over HTTP."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

from anvil_harness import PAYERS, AnvilHarness, calldata

from watcher.schemas import Invoice

FEED_TYPES = ["uint8", "string", "int256"]
E8 = 10**8


class FeedHarness(AnvilHarness):
    """AnvilHarness with TestPriceFeeds deployed before the daemon starts: `feeds` maps a name
    to (decimals, answer); `rates` are [[rates]] entries whose `feed` names one of them."""

    def __init__(self, tmp_path: Any, *, feeds: dict[str, tuple[int, int]], rates: list[dict], **kwargs: Any):
        super().__init__(tmp_path, **kwargs)
        self.feed_specs = feeds
        self.rate_specs = rates
        self.feeds: dict[str, str] = {}

    async def start_service(self) -> None:
        chain = self.anvil
        for name, (decimals, answer) in self.feed_specs.items():
            if name not in self.feeds:
                self.feeds[name] = await chain.run(
                    chain.deploy, "TestPriceFeed", FEED_TYPES, [decimals, name, answer]
                )
        await super().start_service()

    def rates_settings(self) -> list[dict]:
        out = []
        for rate in self.rate_specs:
            entry = {"chain": self.anvil.name, "source": "chainlink", "max_age_seconds": 3600, **rate}
            for key in ("feed", "sequencer_uptime_feed"):
                if key in entry:
                    entry[key] = self.feeds[entry[key]]
            out.append(entry)
        return out

    async def feed_call(self, name: str, signature: str, types: list[str], args: list[Any]) -> None:
        """A setter of a feed, mined at once (with a block of its own)."""
        chain = self.anvil
        await chain.run(chain.send, PAYERS[0], self.feeds[name], calldata(signature, types, args))
        await self.mine(1)

    async def set_answer(self, name: str, answer: int) -> None:
        await self.feed_call(name, "setAnswer(int256)", ["int256"], [answer])

    async def set_round(
        self, name: str, round_id: int, answer: int, started: int, updated: int, answered: int
    ) -> None:
        await self.feed_call(
            name,
            "setRound(uint80,int256,uint256,uint256,uint80)",
            ["uint80", "int256", "uint256", "uint256", "uint80"],
            [round_id, answer, started, updated, answered],
        )

    async def refresh(self) -> None:
        assert self.service is not None and self.service.rates is not None
        await self.service.rates.refresh_all(force=True)

    async def chain_time(self) -> int:
        block = await self.anvil.run(self.anvil.node.rpc, "eth_getBlockByNumber", "latest", False)
        return int(block["timestamp"], 16)

    async def rates(self) -> dict[str, dict]:
        status, body, _ = await self.request("GET", "/v1/rates")
        assert status == 200, body
        return {r["pair"]: r for r in body["data"]}

    async def create_status(self, **fields: Any) -> tuple[int, Any]:
        fields.setdefault("amount", "100")
        status, body, _ = await self.request("POST", "/v1/invoices", json=fields)
        return status, body


def options_by_asset(invoice: dict) -> dict[str, dict]:
    return {o["asset"]: o for o in invoice["payment_options"]}


ETH_EUR = {
    "feeds": {"ETH / USD": (8, 2000 * E8), "EUR / USD": (8, 108 * E8 // 100)},
    "rates": [
        {"pair": "ETH/USD", "feed": "ETH / USD"},
        {"pair": "EUR/USD", "feed": "EUR / USD", "max_age_seconds": 86400},
    ],
}


async def test_invoices_are_quoted_from_the_feed_and_a_moved_feed_changes_only_new_invoices(
    harnesses, anvil_node
):
    h = await harnesses(FeedHarness, nodes=[anvil_node()], **ETH_EUR)
    first = await h.create(amount="100")
    options = options_by_asset(first)
    # ETH has a usd_rate of 2000 in the harness's config too: the live pair wins, and says so.
    assert options["ETH"]["quote_rate"] == "2000" and options["ETH"]["quote_source"] == "chainlink"
    assert options["ETH"]["amount_atomic"] == str(5 * 10**16)  # 100 USD at 2000
    assert options["TUSD"]["quote_source"] == "config" and options["TUSD"]["quote_rate"] == "1"
    assert options["ETH"]["quoted_at"] == first["created_at"]

    await h.set_answer("ETH / USD", 2500 * E8)
    await h.refresh()
    second = await h.create(amount="100")
    assert options_by_asset(second)["ETH"]["quote_rate"] == "2500"
    assert options_by_asset(second)["ETH"]["amount_atomic"] == str(4 * 10**16)
    again = await h.get(first["id"])
    assert options_by_asset(again)["ETH"] == options["ETH"], "a made invoice keeps its quote"

    # A new checkout session quotes again, at the price of now.
    status, refreshed, _ = await h.request("POST", f"/v1/invoices/{first['id']}/checkout-session", json={})
    assert status == 200, refreshed
    assert options_by_asset(refreshed)["ETH"]["quote_rate"] == "2500"

    rates = await h.rates()
    assert rates["ETH/USD"]["value"] == "2500" and rates["ETH/USD"]["quotable"] is True
    [source] = rates["ETH/USD"]["sources"]
    assert source["source"].startswith("chainlink anvil0 0x") and source["error"] is None
    assert rates["EUR/USD"]["value"] == "1.08"


async def test_an_invoice_in_eur_through_an_eur_usd_feed_is_paid_and_summed_in_eur(harnesses, anvil_node):
    h = await harnesses(FeedHarness, nodes=[anvil_node()], **ETH_EUR)
    invoice = await h.create(amount="54", currency="EUR")
    assert invoice["currency"] == "EUR"
    options = options_by_asset(invoice)
    eur_per_eth = Fraction(2000) / Fraction("1.08")
    assert options["ETH"]["quote_source"] == "chainlink"
    assert options["ETH"]["amount_atomic"] == str(math.ceil(Fraction(54) / eur_per_eth * 10**18))
    assert options["ETH"]["quote_rate"] == "1851.8518518518518519"  # shown to 20 digits, computed exactly
    # TUSD's usd_rate of 1, in EUR through EUR/USD: 54 EUR = 58.32 USD.
    assert (
        options["TUSD"]["quote_source"] == "config+chainlink"
        and options["TUSD"]["amount_atomic"] == "58320000"
    )

    await h.anvil.run(h.anvil.transfer_token, options["TUSD"]["destination_address"], 58_320_000)
    await h.mine(1)
    await h.mine(2)
    done = await h.wait_status(invoice["id"], "confirmed")
    assert done["payment_summary"] == {
        "payment_state": "exact",
        "received_amount": "54.00",
        "remaining_amount": "0",
        "overpaid_amount": "0",
    }
    Invoice.model_validate(done)

    status, body = await h.create_status(amount="10", currency="GBP")
    assert status == 422 and body["errors"][0]["field"] == "currency" and "EUR, USD" in body["detail"]


async def test_a_stale_an_incomplete_and_a_zero_answer_each_leave_the_asset_out(harnesses, anvil_node):
    h = await harnesses(FeedHarness, nodes=[anvil_node()], **ETH_EUR)
    assert "ETH" in options_by_asset(await h.create())

    async def refused(why: str) -> None:
        await h.refresh()
        invoice = await h.create()
        assert set(options_by_asset(invoice)) == {"TUSD"}, "left out; never the usd_rate of 2000"
        status, body = await h.create_status(assets=["ETH"])
        assert status == 422, body
        assert "ETH/USD" in body["detail"] and re.search(why, body["detail"]), body["detail"]
        rates = await h.rates()
        assert rates["ETH/USD"]["quotable"] is False and re.search(why, rates["ETH/USD"]["reason"])

    # Stale by the chain's clock: the chain moves two hours on, the wall clock does not.
    now = await h.chain_time()
    await h.anvil.run(h.anvil.node.rpc, "evm_setNextBlockTimestamp", hex(now + 7200))
    await h.mine(1)
    await refused(r"s old by the chain's time")
    await h.set_answer("ETH / USD", 2000 * E8)  # fresh again
    await h.refresh()
    assert "ETH" in options_by_asset(await h.create())

    now = await h.chain_time()
    await h.set_round("ETH / USD", 9, 2000 * E8, now, now, 8)
    await refused("incomplete")
    await h.set_answer("ETH / USD", 0)
    await refused("not positive")
    await h.set_answer("ETH / USD", -1)
    await refused("not positive")

    await h.set_answer("ETH / USD", 2100 * E8)
    await h.refresh()
    assert options_by_asset(await h.create())["ETH"]["quote_rate"] == "2100"
    status, metrics, _ = await h.request("GET", "/metrics", auth=False)
    assert status == 200
    assert re.search(
        r'watcher_rate_source_errors_total\{kind="chainlink",outcome="refused",'
        r'pair="ETH/USD",source="rates\[0\]"\} 4\.0',
        metrics,
    )
    assert 'watcher_rate_quotable{pair="ETH/USD"} 1.0' in metrics
    assert re.search(r'watcher_rate_assets_left_out_total\{pair="ETH/USD"\} [1-9]', metrics)


async def test_two_feeds_that_disagree_by_five_percent_refuse_to_quote(harnesses, anvil_node):
    h = await harnesses(
        FeedHarness,
        nodes=[anvil_node()],
        feeds={"A": (8, 2000 * E8), "B": (18, 2100 * 10**18)},  # 8 and 18 decimals
        rates=[{"pair": "ETH/USD", "feed": "A"}, {"pair": "ETH/USD", "feed": "B"}],
    )
    status, body = await h.create_status(assets=["ETH"])
    assert status == 422 and "ETH/USD" in body["detail"] and "disagree by 4.88%" in body["detail"]
    rates = await h.rates()
    assert rates["ETH/USD"]["value"] is None and rates["ETH/USD"]["quotable"] is False
    assert [s["value"] for s in rates["ETH/USD"]["sources"]] == ["2000", "2100"]
    assert "more than 2.00%" in rates["ETH/USD"]["reason"]
    status, metrics, _ = await h.request("GET", "/metrics", auth=False)
    assert 'watcher_rate_quotable{pair="ETH/USD"} 0.0' in metrics

    await h.feed_call("B", "setAnswer(int256)", ["int256"], [2020 * 10**18])  # 1%: the median quotes
    await h.refresh()
    invoice = await h.create(assets=["ETH"])
    [option] = invoice["payment_options"]
    assert option["quote_rate"] == "2010" and option["quote_source"] == "chainlink"


async def test_no_quote_while_the_l2_sequencer_is_down_or_just_back(harnesses, anvil_node):
    h = await harnesses(
        FeedHarness,
        nodes=[anvil_node()],
        feeds={"ETH / USD": (8, 2000 * E8), "sequencer": (0, 0)},
        rates=[{"pair": "ETH/USD", "feed": "ETH / USD", "sequencer_uptime_feed": "sequencer"}],
    )
    # Deployed just now with status 0 (up): up for less than an hour, so nothing quotes yet.
    status, body = await h.create_status(assets=["ETH"])
    assert status == 422 and "up for" in body["detail"]
    now = await h.chain_time()
    await h.set_round("sequencer", 2, 0, now - 7200, now - 7200, 2)
    await h.set_answer("ETH / USD", 2000 * E8)
    await h.refresh()
    assert options_by_asset(await h.create(assets=["ETH"]))["ETH"]["quote_rate"] == "2000"
    await h.set_round("sequencer", 3, 1, now, now, 3)  # down
    await h.refresh()
    status, body = await h.create_status(assets=["ETH"])
    assert status == 422 and "sequencer is down" in body["detail"]
