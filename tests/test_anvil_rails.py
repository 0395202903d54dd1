"""Every rail against a real node (anvil over JSON-RPC), through HTTP and the webhook receiver."""

from __future__ import annotations

from anvil_harness import MERCHANT, PAYERS, AnvilHarness


async def test_token_native_router_and_wallet_payments_on_a_real_node(harnesses, anvil_node):
    h = await harnesses(AnvilHarness, nodes=[anvil_node()])
    chain = h.anvil
    token_inv = await h.create(amount="10", assets=["TUSD"])
    native_inv = await h.create(amount="20", assets=["ETH"])
    router_inv = await h.create(amount="30", assets=["TUSD"], rails=["contract"])
    wallet_inv = await h.create(amount="40", assets=["ETH"])
    [token_opt] = token_inv["payment_options"]
    [native_opt] = native_inv["payment_options"]
    [router_opt] = router_inv["payment_options"]
    [wallet_opt] = wallet_inv["payment_options"]

    txs = {
        "token": await chain.run(chain.transfer_token, token_opt["destination_address"], 10_000_000),
        "native": await chain.run(chain.transfer_native, native_opt["destination_address"], 10**16),
        "router": await chain.run(chain.pay_router, router_opt["contract_call"]),
        "wallet": await chain.run(chain.wallet_forward, wallet_opt["destination_address"], 2 * 10**16),
    }
    await h.mine(1)
    for inv in (token_inv, native_inv, router_inv, wallet_inv):
        await h.wait_status(inv["id"], "paid")
    await h.mine(2)
    results = {
        name: await h.wait_status(inv["id"], "confirmed")
        for name, inv in [
            ("token", token_inv),
            ("native", native_inv),
            ("router", router_inv),
            ("wallet", wallet_inv),
        ]
    }
    for name, invoice in results.items():
        [payment] = invoice["payments"]
        assert payment["transaction_hash"] == txs[name], name
        assert invoice["payment_summary"]["payment_state"] == "exact", name
    assert results["native"]["payments"][0]["log_index"] is None
    assert results["wallet"]["payments"][0]["log_index"] is None
    assert results["wallet"]["payments"][0]["from_address"].lower() == chain.wallet
    assert results["router"]["payments"][0]["to_address"].lower() == MERCHANT
    for inv in (token_inv, native_inv, router_inv, wallet_inv):
        events = await h.wait_events(inv["id"], "invoice.paid", "invoice.confirmed")
        assert len({e.event_id for e in events}) == len(events)


async def test_a_failed_transaction_to_a_deposit_address_never_counts(harnesses, anvil_node):
    """A deposit address with code that rejects the coin (anvil_setCode): the transfer's
    transaction fails (status 0) and is not a payment; a later good one is."""
    h = await harnesses(AnvilHarness, nodes=[anvil_node()])
    chain = h.anvil
    invoice = await h.create(amount="20", assets=["ETH"])
    [option] = invoice["payment_options"]
    address = option["destination_address"]
    await chain.run(chain.node.rpc, "anvil_setCode", address, "0x60006000fd")  # PUSH 0 PUSH 0 REVERT
    failed = await chain.run(chain.send, PAYERS[1], address, "0x", 10**16, 100_000)
    await h.mine(1)
    assert int((await chain.run(chain.receipt, failed))["status"], 16) == 0
    await h.settle()
    assert (await h.get(invoice["id"]))["payments"] == []

    await chain.run(chain.node.rpc, "anvil_setCode", address, "0x")
    good = await chain.run(chain.transfer_native, address, 10**16)
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    assert [p["transaction_hash"] for p in paid["payments"]] == [good]


async def test_internal_transfers_off_misses_wallet_payments(harnesses, anvil_node):
    h = await harnesses(AnvilHarness, nodes=[anvil_node()], internal_transfers="off")
    chain = h.anvil
    invoice = await h.create(amount="20", assets=["ETH"])
    [option] = invoice["payment_options"]
    await chain.run(chain.wallet_forward, option["destination_address"], 10**16)
    await h.mine(1)
    await h.settle()
    assert (await h.get(invoice["id"]))["payments"] == []


async def test_internal_transfers_on_without_a_tracer_stops_the_chain_rather_than_miss_payments(
    harnesses, anvil_node
):
    """A node without tracers (the proxy answers "method not found" for both): with
    `internal_transfers = "on"` the chain does not move and /readyz says why."""
    from faultproxy import Fault, FaultProxy

    node = anvil_node()
    async with FaultProxy(node.url) as proxy:
        for method in ("debug_traceBlockByNumber", "trace_block"):
            proxy.inject(
                Fault("rpc_error", method=method, code=-32601, message=f"the method {method} does not exist")
            )
        h = await harnesses(
            AnvilHarness, nodes=[node], rpc_urls={"anvil0": [proxy.url]}, internal_transfers="on"
        )

        async def reported() -> dict | None:
            _, body, _ = await h.request("GET", "/readyz", auth=False)
            [chain] = body["chains"]
            return chain if chain["last_error"] and "tracer" in chain["last_error"] else None

        chain = await h.wait_for(reported, what="the missing tracer in /readyz")
        assert chain["last_processed_block"] is None
        assert proxy.injected[("rpc_error", "debug_traceBlockByNumber")] >= 1
        assert proxy.injected[("rpc_error", "trace_block")] >= 1
