"""The wrong chain under the same chain id (contract §4, "Trusting no node"): the database
records each chain's genesis block hash the first time it follows it, and a node whose block 0
differs (a reset test chain, another network with the same id) is refused at start-up with
exit 2 and one line naming the chain, both hashes and the way out.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import time

import pytest
from anvil_harness import AnvilChain, AnvilHarness
from test_anvil_crash import WATCHER, operate, write_config

from watcher.genesis import WrongChain


def _genesis(node) -> str:
    return node.rpc("eth_getBlockByNumber", "0x0", False)["hash"]


def _stored(database) -> dict:
    with sqlite3.connect(database) as db:
        genesis = dict(db.execute("SELECT network, hash FROM chain_genesis").fetchall())
        cursor = db.execute("SELECT network, block_number, block_hash FROM cursors").fetchall()
    return {"genesis": genesis, "cursors": cursor}


async def test_a_reset_chain_behind_an_old_database_is_refused_with_exit_2(anvil_node, tmp_path):
    """The daemon follows an anvil node and records a payment; the node is replaced by a new
    one (same port, same chain id, the same contracts at the same addresses: a reset test
    chain). `watcher run` on the old database exits 2 at once, with one line naming the chain,
    the stored and the node's genesis hashes and what to do, and changes nothing stored; on
    a fresh database (the way out it names) the same config starts."""
    node = anvil_node()
    op = await operate(node, tmp_path)
    chain, receiver, database, config = op.chain, op.receiver, op.database, op.config
    daemon, http, listen, env = op.daemon, op.http, op.listen, op.env
    try:
        await daemon.start(http)
        async with http.post(daemon.base_url + "/v1/invoices", json={"amount": "5", "assets": ["TUSD"]}) as r:
            invoice = await r.json()
        await asyncio.to_thread(
            chain.transfer_token, invoice["payment_options"][0]["destination_address"], 5_000_000
        )
        await asyncio.to_thread(chain.mine, 1)
        deadline = time.monotonic() + 15
        while True:
            async with http.get(daemon.base_url + f"/v1/invoices/{invoice['id']}") as r:
                if (await r.json())["status"] == "paid":
                    break
            assert time.monotonic() < deadline, "the payment was never recorded"
            await asyncio.sleep(0.05)
        assert daemon.terminate() == 0
        old_genesis = _genesis(node)
        before = _stored(database)
        assert before["genesis"] == {"anvil0": old_genesis}

        # The test chain is reset: a new node where the old one was, same chain id, same contracts.
        node.stop()
        # (anvil dates its genesis to the second: a later one makes sure it is another block 0)
        reset = anvil_node(
            port=node.port, chain_id=node.chain_id, args=("--timestamp", str(int(time.time()) + 3600))
        )
        again = await asyncio.to_thread(AnvilChain(reset, "anvil0").setup)
        assert (again.token, again.router) == (chain.token, chain.router)
        new_genesis = _genesis(reset)
        assert new_genesis != old_genesis
        await asyncio.to_thread(reset.mine, 10)  # past the old checkpoint: nothing else gives it away

        result = await asyncio.to_thread(
            subprocess.run,
            [str(WATCHER), "run", "--config", str(config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
        # One line for the operator; the rest is the JSON log (the daemon never started).
        [line] = [x for x in result.stderr.splitlines() if x.strip() and not x.startswith("{")]
        assert line.startswith(
            "watcher: configuration error: chains[0].rpc_urls[0]: chain 'anvil0' (chain id 31337)"
        )
        assert old_genesis in line and new_genesis in line
        assert "fresh database" in line and str(database) in line and "rpc_urls" in line
        assert "Traceback" not in result.stdout + result.stderr
        assert "watcher_started" not in result.stdout + result.stderr
        assert _stored(database) == before  # nothing followed, nothing recorded

        # The way out the line names: a fresh database follows the new chain.
        fresh = tmp_path / "fresh.db"
        write_config(config, database=fresh, listen=listen, webhook_url=receiver.url, chain=again)
        await daemon.start(http)
        assert daemon.terminate() == 0
        assert _stored(fresh)["genesis"] == {"anvil0": new_genesis}
    finally:
        await op.close()


async def test_two_rpc_urls_of_two_chains_with_one_chain_id_are_refused(anvil_node, harnesses):
    """On a database that follows nothing yet there is no recorded genesis to compare with,
    but two nodes of one chain agree on theirs: nodes that do not are two chains, and the
    watcher starts on neither (it cannot tell which one the operator means)."""
    a, b = anvil_node(), anvil_node(args=("--timestamp", str(int(time.time()) + 3600)))
    assert _genesis(a) != _genesis(b)
    with pytest.raises(WrongChain) as refused:
        await harnesses(AnvilHarness, nodes=[a], rpc_urls={"anvil0": [a.url, b.url]})
    assert refused.value.key == "chains[0].rpc_urls"
    assert "rpc_urls[0] and rpc_urls[1]" in refused.value.message
    assert _genesis(a) in refused.value.message and _genesis(b) in refused.value.message
