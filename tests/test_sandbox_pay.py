"""The sandbox pay route tells the truth about its transfer: a payment that would revert is
refused (409) and never sent; with the daemon mining, the route waits for the receipt and a
transfer that reverted on chain is a 409, not a 200 with a hash."""

from __future__ import annotations

from eth_utils import to_checksum_address
from harness import Harness

from watcher.sandbox import PAYER_FUNDS
from watcher.service import Service

SINK = "0x" + "5e" * 20


async def drain_payers(h: Harness) -> None:
    """Every sandbox payer sends all its tokens away: the next token payment must fail."""
    chain = h.chain
    assert chain is not None

    def balance(owner: str) -> int:
        data = "0x70a08231" + "0" * 24 + owner[2:].lower()
        answer = chain.tester.call(
            {
                "from": owner,
                "to": to_checksum_address(chain.deployed.token),
                "data": data,
                "gas": 100_000,
                "value": 0,
            },
            "latest",
        )
        return int(answer, 16)

    for payer in chain.payers:
        held = await h.on_chain(balance, payer)
        assert 0 < held <= PAYER_FUNDS
        await h.on_chain(chain.transfer_token, chain.deployed.token, SINK, held, payer)
        await h.on_chain(chain.mine, 1)
        assert await h.on_chain(balance, payer) == 0


async def test_a_payment_that_would_revert_is_a_409_and_sends_nothing(harness):
    invoice = await harness.create(amount="5")
    await drain_payers(harness)
    head = await harness.on_chain(harness.chain.head)
    status, problem, ctype = await harness.request(
        "POST", f"/v1/sandbox/invoices/{invoice['id']}/pay", json={}
    )
    assert status == 409 and ctype.startswith("application/problem+json"), problem
    assert "revert" in problem["detail"]
    assert harness.chain._pending_senders == set(), "nothing was sent"
    await harness.mine(2)
    await harness.settle()
    after = await harness.get(invoice["id"])
    assert after["payments"] == [] and after["status"] == "pending"
    assert await harness.on_chain(harness.chain.head) == head + 2


class MiningHarness(Harness):
    """The daemon mines a block every 0.2 s, as `watcher run --sandbox` does."""

    async def start_service(self) -> None:
        self.service = Service(
            self.settings(),
            sandbox=self.chain,
            expiry_interval=self.expiry_interval,
            clock=self.clock,
            block_time=0.2,
        )
        await self.service.start()


async def test_with_a_miner_the_route_answers_once_mined_and_409_when_it_reverted(harnesses):
    h = await harnesses(MiningHarness)
    paid = await h.create(amount="5")
    tx = await h.pay(paid["id"])
    assert await h.on_chain(h.chain.receipt_status, tx) == 1, "answered after the block holding it"

    # The chain changed between the check and the block (here: the check is skipped): the
    # receipt says reverted, and so does the route.
    h.chain.preflight = lambda *args, **kwargs: None
    reverted = await h.create(amount="5")
    await drain_payers(h)
    status, problem, _ = await h.request("POST", f"/v1/sandbox/invoices/{reverted['id']}/pay", json={})
    assert status == 409 and "reverted on chain" in problem["detail"], problem
    tx_hash = problem["detail"].split()[2]
    assert await h.on_chain(h.chain.receipt_status, tx_hash) == 0
    await h.settle()
    assert (await h.get(reverted["id"]))["payments"] == []
