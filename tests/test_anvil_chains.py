"""Several chains at once on real nodes, and new heads over WebSocket with polling behind it."""

from __future__ import annotations

import time

from anvil_harness import AnvilHarness


async def chains_view(h: AnvilHarness) -> dict[str, dict]:
    status, body, _ = await h.request("GET", "/v1/chains")
    assert status == 200, body
    return {row["name"]: row for row in body["data"]}


async def test_two_chains_each_follow_their_own_node_and_one_failing_does_not_stall_the_other(
    harnesses, anvil_node
):
    first, second = anvil_node(chain_id=31337), anvil_node(chain_id=31338)
    h = await harnesses(AnvilHarness, nodes=[first, second], confirmations=2)
    a, b = h.chains
    invoice = await h.create(amount="10", assets=["anvil0:TUSD", "anvil1:TUSD"])
    by_network = {o["network"]: o for o in invoice["payment_options"]}
    assert set(by_network) == {"anvil0", "anvil1"} and by_network["anvil1"]["chain_id"] == 31338

    # Paid on the second chain: its follower finds it, with its own confirmations.
    tx = await b.run(b.transfer_token, by_network["anvil1"]["destination_address"], 10_000_000)
    await h.mine(1, chain=b)
    paid = await h.wait_status(invoice["id"], "paid")
    assert [(p["network"], p["transaction_hash"]) for p in paid["payments"]] == [("anvil1", tx)]
    await h.mine(5, chain=a)  # the other chain's blocks confirm nothing here
    await h.settle(a)
    assert (await h.get(invoice["id"]))["status"] == "paid"
    await h.mine(1, chain=b)
    await h.wait_status(invoice["id"], "confirmed")
    rows = await chains_view(h)
    assert rows["anvil0"]["chain_id"] == 31337 and rows["anvil1"]["chain_id"] == 31338
    assert rows["anvil0"]["head_block"] == a.head() and rows["anvil1"]["head_block"] == b.head()

    # The first chain's node dies: the second goes on detecting, and /readyz names the first.
    first.stop()
    later = await h.create(amount="5", assets=["anvil1:TUSD"])
    [option] = later["payment_options"]
    await b.run(b.transfer_token, option["destination_address"], 5_000_000)
    await h.mine(1, chain=b)
    await h.wait_status(later["id"], "paid")

    async def first_reported_failing() -> dict | None:
        status, body, _ = await h.request("GET", "/readyz", auth=False)
        rows = {c["network"]: c for c in body["chains"]}
        return body if rows["anvil0"]["last_error"] and rows["anvil1"]["last_error"] is None else None

    body = await h.wait_for(first_reported_failing, timeout=30, what="anvil0's error in /readyz")
    assert {c["network"]: c["ready"] for c in body["chains"]}["anvil1"] is True


async def test_new_heads_arrive_over_websocket_and_polling_takes_over_when_the_socket_drops(
    harnesses, anvil_node
):
    node = anvil_node()
    # A long poll interval: a payment found within a second was found because of the socket.
    h = await harnesses(AnvilHarness, nodes=[node], ws=True, poll_interval=30.0, confirmations=1)
    chain = h.anvil
    await h.wait_for(lambda: h.service.heads["anvil0"].mode == "ws", what="subscribed")
    await h.settle()
    assert (await chains_view(h))["anvil0"]["mode"] == "ws"

    invoice = await h.create(amount="10", assets=["TUSD"])
    [option] = invoice["payment_options"]
    await chain.run(chain.transfer_token, option["destination_address"], 10_000_000)
    mined_at = time.monotonic()
    await h.mine(1)
    await h.wait_status(invoice["id"], "confirmed")
    assert time.monotonic() - mined_at < 5.0, "the head came over the socket, not after a 30 s poll"
    _, metrics, _ = await h.request("GET", "/metrics", auth=False)
    assert 'watcher_ws_heads_connected{network="anvil0"} 1.0' in metrics

    # The node goes away: the subscription is lost and the chain is polled only.
    port = node.port
    node.stop()
    await h.wait_for(lambda: h.service.heads["anvil0"].mode == "poll", what="fallback to polling")
    assert (await chains_view(h))["anvil0"]["mode"] == "poll"
    _, metrics, _ = await h.request("GET", "/metrics", auth=False)
    assert 'watcher_ws_heads_connected{network="anvil0"} 0.0' in metrics

    # A node is back on the same address: the subscription returns.
    anvil_node(port=port)
    await h.wait_for(lambda: h.service.heads["anvil0"].mode == "ws", timeout=40, what="subscribed again")
    assert (await chains_view(h))["anvil0"]["mode"] == "ws"


async def test_finalized_confirmations_follow_the_nodes_finalized_block(harnesses, anvil_node):
    node = anvil_node()
    h = await harnesses(AnvilHarness, nodes=[node], confirmations="finalized")
    chain = h.anvil
    invoice = await h.create(amount="10", assets=["TUSD"])
    [option] = invoice["payment_options"]
    await chain.run(chain.transfer_token, option["destination_address"], 10_000_000)
    await h.mine(1)
    paid = await h.wait_status(invoice["id"], "paid")
    block = paid["payments"][0]["block_number"]
    await h.mine(10)
    await h.settle()
    finalized = int(node.rpc("eth_getBlockByNumber", "finalized", False)["number"], 16)
    assert finalized < block, "anvil finalizes well behind its head"
    assert (await h.get(invoice["id"]))["status"] == "paid"

    # Once the node's finalized block passes the payment's, it is confirmed.
    for _ in range(20):
        if int(node.rpc("eth_getBlockByNumber", "finalized", False)["number"], 16) >= block:
            break
        await h.mine(16)
    confirmed = await h.wait_status(invoice["id"], "confirmed")
    assert confirmed["payments"][0]["status"] == "confirmed"


async def test_every_rpc_url_must_serve_the_configured_chain(harnesses, anvil_node):
    """A failover URL of another chain would have its blocks read as ours: refused at start."""
    import pytest

    from watcher.config import ConfigError

    ours, other = anvil_node(chain_id=31337), anvil_node(chain_id=5)
    with pytest.raises(ConfigError) as refused:
        await harnesses(AnvilHarness, nodes=[ours], rpc_urls={"anvil0": [ours.url, other.url]})
    assert refused.value.key == "chains[0].chain_id"
    assert "rpc_urls[1] answers 5" in str(refused.value)
