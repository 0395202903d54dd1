"""A catch-up of 5,000 payments through the real daemon (`watcher run --config`, a subprocess,
logs at info, a webhook endpoint that checks signatures), as an operator runs it after a day
of downtime: 1,000 invoices are created, the daemon stops, 5,000 payments (five per invoice,
in batch payouts of 250 transfers per transaction) are mined while it is down, and it starts
again. Every payment is recorded exactly once, every invoice is judged right, and every event
is delivered exactly once per id.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter

from anvil_harness import PAYERS, TOKEN_DECIMALS, AnvilChain, calldata
from test_anvil_crash import CONFIRMATIONS, integrity, operate

UNIT = 10**TOKEN_DECIMALS
INVOICES = 1_000
PAYMENTS_EACH = 5
PER_TRANSACTION = 250
TRANSACTIONS_PER_BLOCK = 3


def payout(chain: AnvilChain, payouts: list[tuple[str, int]]) -> str:
    """One batch payout from the TestWallet (gas for 250 fresh token balances)."""
    data = calldata(
        "transferTokens(address,address[],uint256[])",
        ["address", "address[]", "uint256[]"],
        [chain.token, [to for to, _ in payouts], [amount for _, amount in payouts]],
    )
    return chain.send(PAYERS[3], chain.wallet, data, gas=12_000_000)


async def test_a_catch_up_of_5000_payments_records_each_once_and_delivers_each_event_once(
    anvil_node, tmp_path
):
    op = await operate(anvil_node(), tmp_path)
    chain, receiver, database = op.chain, op.receiver, op.database
    daemon, http, api = op.daemon, op.http, op.api
    try:
        await daemon.start(http)
        limit = asyncio.Semaphore(8)

        async def create() -> dict:
            async with limit:
                return await api(
                    "POST", "/v1/invoices", json={"amount": str(PAYMENTS_EACH), "assets": ["TUSD"]}
                )

        invoices = await asyncio.gather(*(create() for _ in range(INVOICES)))
        address = {inv["id"]: inv["payment_options"][0]["destination_address"] for inv in invoices}
        assert len(set(address.values())) == INVOICES
        # Stopped off the test's loop: the webhook receiver runs on it and must answer the
        # attempts the daemon finishes while it stops (blocked, it would take each for a
        # timeout and see it again after the restart: at least once, but not what is measured).
        assert await asyncio.to_thread(daemon.terminate) == 0

        # ------------------------------------------------------------ the day of downtime
        await asyncio.to_thread(chain.mint_tokens, chain.wallet, INVOICES * PAYMENTS_EACH * UNIT)
        await asyncio.to_thread(chain.mine, 1)
        # Each invoice paid five times, its payments spread over the transactions and blocks.
        plan = [(address[inv["id"]], UNIT) for _ in range(PAYMENTS_EACH) for inv in invoices]
        sent = []
        for k in range(0, len(plan), PER_TRANSACTION):
            sent.append(await asyncio.to_thread(payout, chain, plan[k : k + PER_TRANSACTION]))
            if len(sent) % TRANSACTIONS_PER_BLOCK == 0:
                await asyncio.to_thread(chain.mine, 1)
        await asyncio.to_thread(chain.mine, CONFIRMATIONS)
        for tx in sent:
            receipt = await asyncio.to_thread(chain.receipt, tx)
            assert receipt is not None and int(receipt["status"], 16) == 1, tx
            assert len(receipt["logs"]) == PER_TRANSACTION
        head = await asyncio.to_thread(chain.head)

        # ------------------------------------------------------------ the catch-up
        started = time.monotonic()
        await daemon.start(http)
        deadline = time.monotonic() + 300
        while True:
            confirmed = await api("GET", "/v1/invoices", params={"status": "confirmed", "limit": "1"})
            [row] = (await api("GET", "/v1/chains"))["data"]
            pending = await api("GET", "/v1/webhook-deliveries", params={"status": "pending", "limit": "1"})
            if (
                confirmed["total"] == INVOICES
                and row["last_processed_block"] == head
                and pending["total"] == 0
            ):
                break
            assert time.monotonic() < deadline, (confirmed["total"], row, pending["total"])
            await asyncio.sleep(0.2)
        print(f"caught up with {len(plan)} payments in {time.monotonic() - started:.1f} s")
        failed = await api("GET", "/v1/webhook-deliveries", params={"status": "failed", "limit": "1"})
        assert failed["total"] == 0
        assert await asyncio.to_thread(daemon.terminate) == 0

        # ------------------------------------------------------------ every payment once
        assert integrity(database) == "ok"
        with sqlite3.connect(database) as db:
            rows = db.execute(
                "SELECT tx_hash, log_index, to_address, amount_atomic, status, role FROM payments"
            ).fetchall()
            stored_events = dict(db.execute("SELECT id, type FROM events").fetchall())
        assert len(rows) == len(plan), "a payment recorded twice, or missed"
        assert len({(tx, log) for tx, log, *_ in rows}) == len(plan)
        assert {tx for tx, *_ in rows} == set(sent)
        per_address = Counter(to for _, _, to, *_ in rows)
        assert set(per_address.values()) == {PAYMENTS_EACH} and len(per_address) == INVOICES
        assert {(amount, status, role) for *_, amount, status, role in rows} == {
            (str(UNIT), "confirmed", "counted")
        }

        # ------------------------------------------------------------ every event delivered once per id
        assert receiver.bad_signatures == 0 and receiver.schema_errors == []
        delivered = Counter(e.event_id for e in receiver.events)
        assert set(delivered) == set(stored_events), "an event never delivered, or one not stored"
        assert set(delivered.values()) == {1}, {i: n for i, n in delivered.items() if n > 1}
        per_invoice = Counter((e.invoice_id, e.type) for e in receiver.events)
        for inv in invoices:
            i = inv["id"]
            assert per_invoice[(i, "invoice.created")] == 1
            assert per_invoice[(i, "invoice.payment_detected")] == PAYMENTS_EACH
            assert per_invoice[(i, "invoice.paid")] == 1
            assert per_invoice[(i, "invoice.confirmed")] == 1
    finally:
        await op.close()
