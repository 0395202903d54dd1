"""A reorg deeper than the watcher remembers, on a real node: the chain stops, `/readyz` says
why, nothing on it is confirmed, and `watcher rewind` is the operator's way out."""

from __future__ import annotations

import asyncio

from anvil_harness import AnvilHarness

from watcher.cli import main as cli_main


async def test_a_reorg_deeper_than_the_window_stops_the_chain_until_the_operator_rewinds(
    anvil_node, harnesses, tmp_path, capsys
):
    h = await harnesses(AnvilHarness, nodes=[anvil_node()], confirmations=3)
    chain = h.anvil
    dropped = await h.create(amount="10", assets=["TUSD"])
    kept = await h.create(amount="7", assets=["TUSD"])
    await h.mine(3)
    kept_tx = await chain.run(
        chain.transfer_token, kept["payment_options"][0]["destination_address"], 7_000_000
    )
    await h.mine(1)
    fork_base = await chain.run(chain.head)  # the kept payment is at or below here
    await h.mine(20)
    await chain.run(chain.transfer_token, dropped["payment_options"][0]["destination_address"], 10_000_000)
    await h.mine(300)
    await h.settle()
    assert (await h.get(dropped["id"]))["status"] == "confirmed"
    head = await chain.run(chain.head)

    # Replace everything above fork_base: deeper than the 256 blocks the watcher remembers.
    await chain.run(chain.node.rpc, "anvil_reorg", head - fork_base, [])
    head = await h.mine(1)
    follower = h.service.followers[chain.name]
    await h.wait_for(lambda: follower.status.stopped, what="the chain stopped")
    status, body, _ = await h.request("GET", "/readyz", auth=False)
    assert status == 503 and "deeper than" in body["detail"]
    await h.mine(5)
    status, body, _ = await h.request("GET", "/readyz", auth=False)
    assert status == 503
    # Nothing moved: the checkpoint stays, and the orphaned payment is neither reverted nor re-confirmed.
    assert h.service.store.cursor(chain.name).number < head
    assert (await h.get(dropped["id"]))["payments"][0]["status"] == "confirmed"
    assert "invoice.payment_reverted" not in h.receiver.types_for(dropped["id"])

    # The operator stops the daemon and rewinds to a block both chains share.
    await h.stop_service()
    config = tmp_path / "rewind.toml"
    config.write_text(_toml(h))
    above_fork = ["rewind", "--config", str(config), "--chain", chain.name, "--to-block", str(head - 10)]
    assert await asyncio.to_thread(cli_main, above_fork) == 2  # a block we hold that the node has another of
    assert "above the fork" in capsys.readouterr().err
    rewind = ["rewind", "--config", str(config), "--chain", chain.name, "--to-block", str(fork_base - 2)]
    assert await asyncio.to_thread(cli_main, rewind) == 0  # (the command runs its own event loop)
    assert "marked reverted" in capsys.readouterr().out
    assert await asyncio.to_thread(cli_main, [*rewind[:4], "nope", *rewind[5:]]) == 2
    await h.start_service()
    await h.mine(1)
    back = await h.wait_status(dropped["id"], "pending")
    assert back["payments"][0]["status"] == "reverted"
    await h.wait_events(dropped["id"], "invoice.payment_reverted")
    await h.settle()
    still = await h.get(kept["id"])
    assert still["status"] == "confirmed" and [p["transaction_hash"] for p in still["payments"]] == [kept_tx]
    assert still["payments"][0]["status"] == "confirmed"
    status, _, _ = await h.request("GET", "/readyz", auth=False)
    assert status == 200


def _toml(h: AnvilHarness) -> str:
    """The harness's settings as a config file (secrets by environment variable name, as always)."""
    import os

    s = h.settings()
    os.environ["API_KEY"] = h.api_key
    os.environ["HOOK_SECRET"] = h.receiver.secret
    [c] = s.chains
    token = next(a for a in c.assets if a.kind == "erc20")
    return f"""
database = "{s.database}"
[http]
listen = "{s.http.listen}"
api_key_env = "API_KEY"
[[webhooks]]
url = "{h.receiver.url}"
secret_env = "HOOK_SECRET"
[[chains]]
name = "{c.name}"
chain_id = {c.chain_id}
rpc_urls = ["{c.rpc_urls[0]}"]
poll_interval_seconds = 1
confirmations = 3
deposit_xpub = "{c.deposit_xpub}"
[[chains.assets]]
symbol = "TUSD"
kind = "erc20"
contract = "{token.contract}"
decimals = {token.decimals}
usd_rate = "1"
"""
