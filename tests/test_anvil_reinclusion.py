"""A batch payout re-included at shifted log indexes on a real node (anvil's `anvil_reorg`),
end to end through HTTP and the webhook receiver.

Contract §4: "A re-included transaction is the same payment only if it moves the same asset
and amount from and to the same addresses; its block and log index may change (the payment
shows the new ones)." One transaction pays two invoices (log 0 and log 1); a reorg puts
another token transfer before it in the new block, so its logs become 1 and 2. Matching by
the old (transaction, log index) would give the first invoice's log index to the second
invoice's payment: the first left unpaid, the second paid twice.
"""

from __future__ import annotations

from collections import Counter

from anvil_harness import PAYERS, AnvilHarness, calldata

CONFIRMATIONS = 5  # deep enough that the payments are unconfirmed when their block goes
PRICE = 10_000_000  # 10 TUSD
BYSTANDER = "0x" + "0b" * 20  # receives the transfer that lands first in the new block


async def test_a_batch_payout_re_included_at_shifted_logs_pays_each_invoice_once(anvil_node, harnesses):
    h = await harnesses(AnvilHarness, nodes=[anvil_node()], confirmations=CONFIRMATIONS)
    chain = h.anvil
    x = await h.create(amount="10", assets=["TUSD"])
    y = await h.create(amount="10", assets=["TUSD"])
    to_x, to_y = (inv["payment_options"][0]["destination_address"].lower() for inv in (x, y))

    await chain.run(chain.mint_tokens, chain.wallet, 2 * PRICE)
    await h.mine(1)
    tx = await chain.run(chain.wallet_transfer_tokens, [(to_x, PRICE), (to_y, PRICE)])
    await h.mine(1)
    first = {inv["id"]: (await h.wait_status(inv["id"], "paid"))["payments"] for inv in (x, y)}
    [px], [py] = first[x["id"]], first[y["id"]]
    assert (px["transaction_hash"], px["log_index"]) == (tx, 0)
    assert (py["transaction_hash"], py["log_index"]) == (tx, 1)
    old_block, old_hash = px["block_number"], px["block_hash"]
    head = await h.mine(1)
    await h.settle()

    # The new tip holds a bystander's token transfer first (a fresh transaction, one Transfer
    # log), then the batch payout, the same signed transaction, one log later each.
    raw = await chain.run(chain.node.rpc, "eth_getRawTransactionByHash", tx)
    before = {
        "from": PAYERS[1],
        "to": chain.token,
        "gas": hex(200_000),
        "data": calldata("transfer(address,uint256)", ["address", "uint256"], [BYSTANDER, 1]),
        "maxPriorityFeePerGas": hex(10**11),
        "maxFeePerGas": hex(10**12),
    }
    depth = head - old_block + 1
    await chain.run(chain.node.rpc, "anvil_reorg", depth, [[before, depth - 1], [raw, depth - 1]])
    receipt = await chain.run(chain.receipt, tx)
    assert receipt is not None and int(receipt["status"], 16) == 1
    new_block, new_hash = int(receipt["blockNumber"], 16), receipt["blockHash"]
    assert new_block == head and new_hash != old_hash
    shifted = {"0x" + log["topics"][2][-40:]: int(log["logIndex"], 16) for log in receipt["logs"]}
    assert shifted == {to_x: 1, to_y: 2}, shifted

    await h.mine(CONFIRMATIONS - 1)
    for inv in (x, y):
        await h.wait_status(inv["id"], "confirmed")
    await h.settle()

    for inv, old, log_index in ((x, px, 1), (y, py, 2)):
        done = await h.get(inv["id"])
        assert done["status"] == "confirmed" and done["exception"] is None
        assert done["payment_summary"] == {
            "payment_state": "exact",
            "received_amount": "10.00",
            "remaining_amount": "0",
            "overpaid_amount": "0",
        }
        [p] = done["payments"]  # the same payment, moved: no second one
        assert p["id"] == old["id"] and p["transaction_hash"] == tx
        assert (p["status"], p["role"], p["amount_atomic"]) == ("confirmed", "counted", str(PRICE))
        assert (p["block_number"], p["block_hash"], p["log_index"]) == (new_block, new_hash, log_index)
        assert p["to_address"].lower() == inv["payment_options"][0]["destination_address"].lower()
        assert (await h.request("GET", f"/v1/invoices/{inv['id']}/payments"))[1]["data"] == [p]

        events = h.receiver.for_invoice(inv["id"])
        assert h.receiver.bad_signatures == 0
        assert all(n == 1 for n in Counter(e.event_id for e in events).values())
        types = Counter(e.type for e in events)
        assert not any(t.startswith("invoice.exception") for t in types), types
        assert types["invoice.created"] == 1 and types["invoice.payment_reverted"] == 1
        assert types["invoice.confirmed"] == 1 and types["invoice.paid"] >= 1
        assert set(types) == {
            "invoice.created",
            "invoice.payment_detected",
            "invoice.paid",
            "invoice.payment_reverted",
            "invoice.confirmed",
        }, types
        # Every payment event names this invoice's one payment, to its own address.
        named = [e.body["data"]["payment"] for e in events if e.body["data"]["payment"] is not None]
        assert {q["id"] for q in named} == {old["id"]}
        assert {q["to_address"].lower() for q in named} == {
            inv["payment_options"][0]["destination_address"].lower()
        }
        by_version = sorted(events, key=lambda e: e.version)
        assert by_version[-1].type == "invoice.confirmed"
        [reverted] = [e for e in events if e.type == "invoice.payment_reverted"]
        assert (
            reverted.body["data"]["payment"]["block_hash"],
            reverted.body["data"]["payment"]["log_index"],
        ) == (old_hash, old["log_index"])
        last_detected = [e for e in by_version if e.type == "invoice.payment_detected"][-1]
        assert last_detected.version > reverted.version
        assert (
            last_detected.body["data"]["payment"]["block_hash"],
            last_detected.body["data"]["payment"]["log_index"],
        ) == (new_hash, log_index)
