"""Every rail on the in-process chain, through HTTP only: the native coin to a deposit
address, and payments through the PaymentRouter (tokens and the coin)."""

from __future__ import annotations

from watcher.sandbox import SANDBOX_MERCHANT

ETH_QUOTE = {"ETH": "2000"}  # the sandbox's ETH has no usd_rate: a request quotes it


async def test_native_deposit_goes_pending_paid_confirmed(harness):
    invoice = await harness.create(amount="20", assets=["ETH"], quote_rates=ETH_QUOTE)
    [option] = invoice["payment_options"]
    assert option["amount_atomic"] == str(10**16) and option["token_contract"] is None
    assert option["payment_uri"].endswith(f"?value={10**16}") and "/transfer" not in option["payment_uri"]

    tx = await harness.pay(invoice["id"])
    await harness.mine(1)
    paid = await harness.wait_status(invoice["id"], "paid")
    [payment] = paid["payments"]
    assert payment["transaction_hash"] == tx and payment["log_index"] is None
    assert (
        payment["amount_atomic"] == str(10**16) and payment["amount"] == "0.01" and payment["asset"] == "ETH"
    )
    assert payment["to_address"] == option["destination_address"]

    await harness.mine(2)
    await harness.wait_status(invoice["id"], "confirmed")
    events = await harness.wait_events(
        invoice["id"], "invoice.payment_detected", "invoice.paid", "invoice.confirmed"
    )
    assert len({e.event_id for e in events}) == len(events)


async def test_each_option_counts_only_its_own_asset(harness):
    """Coin sent to a token option's address, or tokens to a coin option's, is not a payment."""
    chain = harness.chain
    native = await harness.create(amount="20", assets=["ETH"], quote_rates=ETH_QUOTE)
    token = await harness.create(amount="20", assets=["TUSD"])
    [native_option] = native["payment_options"]
    [token_option] = token["payment_options"]
    await harness.on_chain(
        chain.transfer_token, chain.deployed.token, native_option["destination_address"], 20_000_000
    )
    await harness.on_chain(chain.transfer_native, token_option["destination_address"], 10**16)
    await harness.mine(1)
    await harness.settle()
    assert (await harness.get(native["id"]))["payments"] == []
    assert (await harness.get(token["id"]))["payments"] == []

    # Each in its own asset does count, several payments adding up exactly.
    await harness.on_chain(chain.transfer_native, native_option["destination_address"], 4 * 10**15)
    await harness.on_chain(chain.transfer_native, native_option["destination_address"], 6 * 10**15)
    await harness.mine(1)
    paid = await harness.wait_status(native["id"], "paid")
    assert sorted(int(p["amount_atomic"]) for p in paid["payments"]) == [4 * 10**15, 6 * 10**15]
    assert paid["payment_summary"]["payment_state"] == "exact"


async def test_a_token_payment_through_the_router_is_counted_once(harness):
    invoice = await harness.create(amount="12.5", assets=["TUSD"], rails=["contract"])
    [option] = invoice["payment_options"]
    call = option["contract_call"]
    assert option["rail"] == "contract" and option["destination_address"].lower() == SANDBOX_MERCHANT
    assert (
        call["router"].lower() == harness.chain.deployed.router
        and call["recipient"].lower() == SANDBOX_MERCHANT
    )
    assert call["token"].lower() == harness.chain.deployed.token and call["amount"] == "12500000"
    assert (
        option["payment_uri"].startswith("ethereum:")
        and "/pay?bytes32=" + call["invoice_id_hash"] in option["payment_uri"]
    )

    tx = await harness.pay(invoice["id"])
    await harness.mine(1)
    paid = await harness.wait_status(invoice["id"], "paid")
    await harness.mine(2)
    confirmed = await harness.wait_status(invoice["id"], "confirmed")
    # The router's PaymentReceived is the payment; the token's own Transfer to the merchant in
    # the same transaction is not counted again.
    [payment] = confirmed["payments"]
    assert payment["transaction_hash"] == tx and payment["log_index"] is not None
    assert payment["to_address"].lower() == SANDBOX_MERCHANT and payment["amount_atomic"] == "12500000"
    assert payment["from_address"].lower() in [p.lower() for p in harness.chain.payers]
    assert paid["payment_summary"]["payment_state"] == "exact"


async def test_the_coin_through_the_router(harness):
    invoice = await harness.create(amount="40", assets=["ETH"], rails=["contract"], quote_rates=ETH_QUOTE)
    [option] = invoice["payment_options"]
    assert option["contract_call"]["token"] == "0x" + "00" * 20 and option["payment_uri"].endswith(
        f"&value={2 * 10**16}"
    )
    await harness.pay(invoice["id"])
    await harness.mine(3)
    confirmed = await harness.wait_status(invoice["id"], "confirmed")
    [payment] = confirmed["payments"]
    assert payment["asset"] == "ETH" and payment["amount"] == "0.02" and payment["log_index"] is not None


async def test_router_payments_that_do_not_fit_the_option_are_ignored(harness):
    chain = harness.chain
    invoice = await harness.create(amount="5", assets=["TUSD"], rails=["contract"])
    other = await harness.create(amount="5", assets=["TUSD"], rails=["contract"])
    [option] = invoice["payment_options"]
    call = option["contract_call"]
    stranger = "0x" + "12" * 20
    wrong = [
        {
            **call,
            "invoice_id_hash": other["payment_options"][0]["contract_call"]["invoice_id_hash"],
        },  # another invoice's id
        {**call, "recipient": stranger},  # not the merchant
        {**call, "token": "0x" + "00" * 20},  # the coin for a token option
        {**call, "payment_id_hash": "0x" + "ab" * 32},  # someone else's payment on a shared router
    ]
    for bad in wrong:
        await harness.on_chain(chain.pay_router, bad)
        await harness.mine(1)
    await harness.settle()
    assert (await harness.get(invoice["id"]))["payments"] == []
    assert (await harness.get(other["id"]))["payments"] == []

    await harness.on_chain(chain.pay_router, call)
    await harness.mine(1)
    paid = await harness.wait_status(invoice["id"], "paid")
    assert len(paid["payments"]) == 1


async def test_one_invoice_offers_every_rail_and_asset(harness):
    invoice = await harness.create(amount="10", rails=["address", "contract"], quote_rates=ETH_QUOTE)
    kinds = sorted((o["asset"], o["rail"]) for o in invoice["payment_options"])
    assert kinds == [("ETH", "address"), ("ETH", "contract"), ("TUSD", "address"), ("TUSD", "contract")]
    # Half in ETH to its address, half in TUSD through the router: paid exactly.
    by = {(o["asset"], o["rail"]): o for o in invoice["payment_options"]}
    await harness.pay(invoice["id"], "0.0025", by[("ETH", "address")]["id"])
    await harness.pay(invoice["id"], "5", by[("TUSD", "contract")]["id"])
    await harness.mine(1)
    paid = await harness.wait_status(invoice["id"], "paid")
    assert len(paid["payments"]) == 2 and paid["payment_summary"]["payment_state"] == "exact"


async def test_a_watch_set_too_large_for_a_topic_filter_is_matched_locally(harness, monkeypatch):
    """Past the topic-filter limit the node is asked for every transfer of our tokens (and
    every router payment); only those to our options are decoded and counted."""
    import watcher.matching

    monkeypatch.setattr(watcher.matching, "TOPIC_FILTER_LIMIT", 0)
    chain = harness.chain
    ours = await harness.create(amount="3", assets=["TUSD"])
    routed = await harness.create(amount="4", assets=["TUSD"], rails=["contract"])
    await harness.on_chain(
        chain.transfer_token, chain.deployed.token, "0x" + "5a" * 20, 1_000_000
    )  # someone else's
    await harness.pay(ours["id"])
    await harness.pay(routed["id"])
    await harness.mine(1)
    paid = await harness.wait_status(ours["id"], "paid")
    assert [p["amount_atomic"] for p in paid["payments"]] == ["3000000"]
    assert len((await harness.wait_status(routed["id"], "paid"))["payments"]) == 1
    follower = harness.service.followers["sandbox"]
    assert follower.watch.recipient_filter() is None and follower.watch.payment_id_filter() is None


async def test_a_watch_set_past_one_topic_filter_is_asked_in_several_filtered_requests(harness, monkeypatch):
    """Past TOPIC_FILTER_LIMIT recipients, up to TOPIC_FILTER_REQUESTS filtered requests: the
    node still filters (its answer holds only our logs), no request names more recipients
    than the limit, and every payment is found whichever request it came in."""
    import watcher.chain
    import watcher.matching

    monkeypatch.setattr(watcher.matching, "TOPIC_FILTER_LIMIT", 2)
    chain = harness.chain
    invoices = [await harness.create(amount=str(n + 1), assets=["TUSD"]) for n in range(5)]
    follower = harness.service.followers["sandbox"]
    reader = follower.reader
    asked: list[list] = []
    batch = reader._batch

    async def recording(method, calls, **kw):
        asked.extend(params[0]["topics"] for m, params in calls if m == "eth_getLogs")
        return await batch(method, calls, **kw)

    monkeypatch.setattr(reader, "_batch", recording)
    await harness.on_chain(chain.transfer_token, chain.deployed.token, "0x" + "5a" * 20, 1_000_000)
    for invoice in invoices:
        await harness.pay(invoice["id"])
    await harness.mine(1)
    for n, invoice in enumerate(invoices):
        paid = await harness.wait_status(invoice["id"], "paid")
        assert [p["amount_atomic"] for p in paid["payments"]] == [str((n + 1) * 10**6)]
    assert len(follower.watch.recipient_filter() or []) == 5
    transfers = [t for t in asked if t[0] == watcher.chain.TRANSFER_TOPIC]
    assert transfers and all(len(t) == 3 and 1 <= len(t[2]) <= 2 for t in transfers)
    assert len({tuple(t[2]) for t in transfers}) == 3  # 5 recipients: 2 + 2 + 1


async def test_options_on_a_router_no_longer_configured_are_still_watched(harnesses):
    """router_address changed (a new deployment): an open invoice's option names the old
    router, and a payment through it still counts; new options use the new one."""
    from harness import Harness

    class Moved(Harness):
        router_override: str | None = None

        def chain_settings(self) -> dict:
            chain = super().chain_settings()
            if self.router_override is not None:
                chain["router_address"] = self.router_override
            return chain

    h = await harnesses(Moved)
    old = await h.create(amount="6", assets=["TUSD"], rails=["contract"])
    new_router = await h.on_chain(h.chain.deploy_contract, "PaymentRouter", [], [])
    await h.stop_service()
    h.router_override = new_router
    await h.start_service()
    fresh = await h.create(amount="7", assets=["TUSD"], rails=["contract"])
    assert fresh["payment_options"][0]["contract_call"]["router"].lower() == new_router
    await h.pay(old["id"])
    await h.pay(fresh["id"])
    await h.mine(1)
    for invoice in (old, fresh):
        paid = await h.wait_status(invoice["id"], "paid")
        assert len(paid["payments"]) == 1


async def test_sandbox_pay_of_more_than_the_payer_holds_is_a_409_and_sends_nothing(harness):
    invoice = await harness.create(
        amount="1000000000000000", assets=["ETH"], quote_rates={"ETH": "0.000000000001"}
    )
    head = await harness.on_chain(harness.chain.head)
    status, problem, ctype = await harness.request(
        "POST", f"/v1/sandbox/invoices/{invoice['id']}/pay", json={}
    )
    assert status == 409 and ctype.startswith("application/problem+json"), problem
    assert "more than the sandbox payer holds" in problem["detail"]
    await harness.mine(1)
    await harness.settle()
    assert await harness.on_chain(harness.chain.head) == head + 1
    assert (await harness.get(invoice["id"]))["payments"] == []
