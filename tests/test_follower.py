"""The follower against a FakeChain (a ChainReader that can mine, fork, lag and lie).

eth-tester and the end-to-end tests prove the real path; these make the chain's awkward
moments read like stories and check exactly what the follower asked the node for.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal

import pytest

from watcher.bloom import bloom_mask
from watcher.chain import TRANSFER_TOPIC, BlockUnknown, FoundLogs, RpcError, address_topic
from watcher.domain import BlockRef, Transfer
from watcher.follower import ChainChanged, Follower, ReorgTooDeep, WrongChainFollowed
from watcher.store import NewInvoice, OptionSpec, Store

NET = "fake"
TOKEN = "0x" + "aa" * 20
OTHER_TOKEN = "0x" + "cc" * 20


class FakeChain:
    """A reader over a node. Its faults: `visible_head` (the whole node behind), and
    `backend_head` (a load balancer whose head is honest but whose logs and headers come
    from a backend that has blocks only up to there: ranges silently clamped, headers
    `null`, logs by hash refused), and `header_cap` (a provider refusing longer batches)."""

    def __init__(self) -> None:
        self.salt = "a"
        self.blocks: list[BlockRef] = []
        self.logs: dict[int, list[Transfer]] = {}
        self.visible_head: int | None = None  # a lagging node: pretend the head is lower
        self.backend_head: int | None = None  # a lagging backend behind an honest head (headers and logs)
        self.logs_head: int | None = None  # ...or one that lags for logs only
        self.header_cap: int | None = None
        self.lie_about_log_hashes = False
        self.header_requests: list[list[int]] = []
        self.log_requests: list[tuple] = []
        self.blooms = True  # headers carry a logsBloom
        self.mine()  # genesis

    def _hash(self, n: int, parent: str) -> str:
        return "0x" + hashlib.sha256(f"{self.salt}:{n}:{parent}".encode()).hexdigest()

    def mine(self, *payments: tuple[str, int], token: str = TOKEN) -> BlockRef:
        n = len(self.blocks)
        parent = self.blocks[-1].hash if self.blocks else "0x" + "00" * 32
        bloom = 0
        for to, _ in payments:  # as a node sets it: the log's address and each of its topics
            for item in (token, TRANSFER_TOPIC, address_topic("0x" + "bb" * 20), address_topic(to)):
                bloom |= bloom_mask(item)
        block = BlockRef(n, self._hash(n, parent), parent, 1_000_000 + n * 12, bloom if self.blooms else None)
        self.blocks.append(block)
        self.logs[n] = [
            Transfer(f"0x{n:032x}{i:032x}", i, n, block.hash, token, "0x" + "bb" * 20, to, amount)
            for i, (to, amount) in enumerate(payments)
        ]
        return block

    def fork(self, at: int) -> None:
        """Drop every block above `at`; new blocks get other hashes."""
        self.blocks = self.blocks[: at + 1]
        self.logs = {n: v for n, v in self.logs.items() if n <= at}
        self.salt += "'"

    # ChainReader
    async def chain_id(self) -> int:
        return 1

    async def block_number(self) -> int:
        head = len(self.blocks) - 1
        return head if self.visible_head is None else min(head, self.visible_head)

    def _has(self, n: int) -> bool:
        return n < len(self.blocks) and (self.backend_head is None or n <= self.backend_head)

    def _has_logs(self, n: int) -> bool:
        return self._has(n) and (self.logs_head is None or n <= self.logs_head)

    async def headers(self, numbers):
        self.header_requests.append(list(numbers))
        if self.header_cap is not None and len(numbers) > self.header_cap:
            raise RpcError("eth_getBlockByNumber", "batch size too large", -32600)
        return [self.blocks[n] if self._has(n) else None for n in numbers]

    async def range_logs(self, first, last, query, through=None):
        """As the real reader: the span's logs (clamped to what the backend has, silently, as
        geth does) and the header of `last` from the same backend, which must be there."""
        self.log_requests.append(("range", first, last))
        if not self._has_logs(last):
            raise BlockUnknown("eth_getBlockByNumber", f"the node answering has no block {last} yet")
        if through is not None and self.blocks[last].hash != through.hash:
            raise BlockUnknown("eth_getBlockByNumber", f"another block {last}")
        top = min(n for n in (last, self.backend_head, self.logs_head) if n is not None)
        return FoundLogs(await self.transfer_logs(first, top, query.tokens, query.recipients) if query.tokens else [])

    async def block_logs(self, wanted):
        found = FoundLogs()
        for block, query in wanted:
            self.log_requests.append(("hash", block.number))
            if not self._has_logs(block.number) or self.blocks[block.number].hash != block.hash:
                raise RpcError("eth_getLogs", f"unknown block {block.hash}", -32000)
            if query.tokens:
                found.transfers += await self.transfer_logs(block.number, block.number, query.tokens, query.recipients)
        return found

    async def finalized_number(self) -> int:
        return len(self.blocks) - 1

    async def transfer_logs(self, from_block, to_block, tokens, recipients):
        out = []
        for n in range(from_block, to_block + 1):
            for t in self.logs.get(n, []):
                if t.token in tokens and (recipients is None or t.to_address in recipients):
                    out.append(t if not self.lie_about_log_hashes else Transfer(
                        t.tx_hash, t.log_index, t.block_number, "0x" + "ee" * 32, t.token, t.from_address, t.to_address, t.amount))
        return out


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db", clock=lambda: 1_000_000.0)
    yield s
    s.close()


def invoice(store: Store, amount_atomic: int = 100) -> tuple[str, str]:
    spec = OptionSpec("address", NET, 1, "TOK", TOKEN, 0, str(amount_atomic), "1", amount_atomic, 2, xpub="x")
    new = NewInvoice(Decimal(amount_atomic), "USD", {}, {}, Decimal(0), {"mode": "immediate"}, 10**12, False, {}, [spec])
    inv, _ = store.create_invoice(new, derive=lambda x, i: f"0x{i + 1:040x}", finish=lambda *a: ("uri", None))
    return inv["id"], inv["payment_options"][0]["destination_address"].lower()


def follower(chain: FakeChain, store: Store, **kw) -> Follower:
    kw.setdefault("start_block", 0)
    kw.setdefault("confirmations", 2)
    return Follower(network=NET, reader=chain, store=store, tokens=[TOKEN], poll_interval=0, **kw)


async def catch_up(f: Follower) -> None:
    for _ in range(1000):
        if await f.run_once() == 0:
            return
    raise AssertionError("never caught up")


async def test_payment_detected_then_confirmed(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine((addr, 100))
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "paid"
    chain.mine()
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "confirmed"


async def test_a_lagging_node_reverts_nothing(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine((addr, 100))
    chain.mine()
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "confirmed"
    chain.visible_head = 0  # failover to a node far behind
    assert await f.run_once() == 0
    assert f.status.last_error and "behind" in f.status.last_error
    got = store.get_invoice(inv_id)
    assert got["status"] == "confirmed" and got["payments"][0]["status"] == "confirmed"
    chain.visible_head = None
    await catch_up(f)
    assert f.status.last_error is None


async def test_reorg_at_the_same_height_reverts_and_redetects(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine()
    chain.mine((addr, 100))
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "paid"
    chain.fork(1)
    chain.mine()  # block 2 again, without the payment
    await catch_up(f)
    got = store.get_invoice(inv_id)
    assert got["status"] == "pending" and got["payments"][0]["status"] == "reverted"
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_logs_that_name_another_block_are_refused(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine((addr, 100))
    chain.lie_about_log_hashes = True
    with pytest.raises(ChainChanged):
        await f.run_once()
    assert store.get_payments(inv_id) == []
    assert store.cursor(NET) is None  # nothing applied, the range will be read again


async def test_other_tokens_and_zero_values_are_not_payments(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine((addr, 0))
    chain.mine((addr, 100), token=OTHER_TOKEN)
    await catch_up(f)
    assert store.get_payments(inv_id) == []


async def test_restart_resumes_after_the_checkpoint_without_rereading(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store, chunk_size=3)
    for _ in range(7):
        chain.mine()
    await catch_up(f)
    checkpoint = store.cursor(NET).number
    chain.mine((addr, 60))
    chain.mine((addr, 40))
    before = len(chain.header_requests)
    restarted = follower(chain, store, chunk_size=3)
    await catch_up(restarted)
    asked = chain.header_requests[before:]
    assert asked[0] == [checkpoint + 1, checkpoint + 2]  # the range starts right after the checkpoint
    payments = store.get_payments(inv_id)
    assert sorted(int(p["amount_atomic"]) for p in payments) == [40, 60]
    assert store.get_invoice(inv_id)["status"] in ("paid", "confirmed")


async def test_deep_catch_up_fetches_only_the_headers_it_needs(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    for n in range(1, 400):
        chain.mine(*([(addr, 1)] if n == 150 else []))
    f = follower(chain, store, chunk_size=200)
    await f.run_once()  # blocks 0..199, far below the head
    assert chain.header_requests[-2:] == [[0, 199], [150]]  # the ends, then the block with our payment
    await catch_up(f)
    assert len(store.get_payments(inv_id)) == 1


async def test_node_errors_surface_as_rpc_errors(store):
    class Broken(FakeChain):
        async def block_number(self) -> int:
            raise RpcError("eth_blockNumber", "HTTP 503", 503)

    with pytest.raises(RpcError):
        await follower(Broken(), store).run_once()


async def test_a_reorg_between_headers_and_logs_is_found_on_the_next_step(store):
    chain = FakeChain()
    chain.blooms = False  # (a bloom would spare the empty block 2 its logs request)
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine()
    await catch_up(f)

    chain.mine()  # block 2 without the payment: the follower reads this header...
    real_logs = chain.transfer_logs

    async def logs_after_reorg(*args):
        chain.fork(1)
        chain.mine((addr, 100))  # ...but the logs come from block 2', which pays us
        return await real_logs(*args)

    chain.transfer_logs = logs_after_reorg
    with pytest.raises(ChainChanged):
        await f.run_once()  # the log names a block hash we did not read: refused
    assert store.get_payments(inv_id) == []
    chain.transfer_logs = real_logs
    chain.mine()
    await catch_up(f)
    got = store.get_invoice(inv_id)
    assert got["status"] in ("paid", "confirmed") and len(got["payments"]) == 1
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_an_invoice_created_while_the_head_is_read_is_watched_in_that_step(store):
    chain = FakeChain()
    f = follower(chain, store)
    await catch_up(f)
    created: list[tuple[str, str]] = []
    real_head = chain.block_number

    async def head_while_an_invoice_is_created() -> int:
        head = await real_head()
        if not created:
            created.append(invoice(store))
            chain.mine((created[0][1], 100))
            return head + 1
        return head

    chain.block_number = head_while_an_invoice_is_created
    await f.run_once()
    inv_id, _ = created[0]
    assert len(store.get_payments(inv_id)) == 1


async def test_no_common_ancestor_keeps_the_checkpoint(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine((addr, 100))
    await catch_up(f)
    chain.fork(-1)  # a different chain from genesis up: nothing we remember is on it
    for _ in range(3):
        chain.mine()
    with pytest.raises(ReorgTooDeep):
        await catch_up(f)
    assert store.cursor(NET).number == 1
    assert store.get_payments(inv_id)[0]["status"] != "reverted"


async def test_a_refused_log_range_is_asked_again_in_halves(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    for _ in range(40):
        chain.mine()
    chain.mine((addr, 100))
    for _ in range(300):  # far below the head: logs are read by range
        chain.mine()
    real_logs = chain.transfer_logs

    async def at_most_10_blocks(from_block, to_block, tokens, recipients):
        if to_block - from_block + 1 > 10:
            raise RpcError("eth_getLogs", "query returned more than 10000 results", -32005)
        return await real_logs(from_block, to_block, tokens, recipients)

    chain.transfer_logs = at_most_10_blocks
    f = follower(chain, store, chunk_size=64)
    for _ in range(50):
        try:
            await f.run_once()
        except RpcError:
            continue
        if store.cursor(NET).number >= 41:
            break
    assert f.chunk_size <= 20
    assert len(store.get_payments(inv_id)) == 1

    # The provider accepts more again: full ranges that succeed double the range (up to the cap).
    chain.transfer_logs = real_logs
    shrunk = f.chunk_size
    for _ in range(200):
        chain.mine()
    await catch_up(f)
    assert f.chunk_size >= 4 * shrunk


# --------------------------------------------------------------------------- native coin


class FakeNativeChain(FakeChain):
    """FakeChain whose blocks also carry native-coin transactions, receipts and traces."""

    def __init__(self) -> None:
        self.native: dict[int, list[tuple[str, str, int, bool]]] = {}  # block -> (tx, to, value, succeeded)
        self.inner: dict[int, list] = {}  # block -> InternalTransfer
        self.traces_from_another_block = False
        super().__init__()

    def mine_native(self, *txs: tuple[str, int, bool], inner: tuple[str, int] | None = None) -> BlockRef:
        from watcher.chain.traces import InternalTransfer

        block = self.mine()
        n = block.number
        self.native[n] = [(f"0x{n:032x}{i + 100:032x}", to, value, ok) for i, (to, value, ok) in enumerate(txs)]
        if inner is not None:
            to, value = inner
            wallet_tx = f"0x{n:032x}{999:032x}"
            self.native[n].append((wallet_tx, "0x" + "77" * 20, 0, True))  # the wallet call itself: no value to us
            self.inner[n] = [InternalTransfer(wallet_tx, 0, n, "0x" + "77" * 20, to, value)]
        return block

    async def full_blocks(self, numbers):
        from watcher.domain import FullBlock, NativeTransaction

        out = []
        for n in numbers:
            if n >= len(self.blocks):
                out.append(None)
                continue
            txs = self.native.get(n, [])
            moved = tuple(NativeTransaction(h, "0x" + "bb" * 20, to, v) for h, to, v, _ in txs if v)
            out.append(FullBlock(self.blocks[n], moved, frozenset(h for h, *_ in txs)))
        return out

    async def successful_transactions(self, candidates):
        ok = {h for txs in self.native.values() for h, _, _, good in txs if good}
        return {h for h in candidates if h in ok}

    async def probe_tracer(self, block_number):
        return "debug_traceBlockByNumber"

    async def internal_transfers(self, numbers, method):
        from dataclasses import replace

        out = [t for n in numbers for t in self.inner.get(n, [])]
        if self.traces_from_another_block:
            out = [replace(t, tx_hash="0x" + "99" * 32) for t in out]
        return out


def native_invoice(store: Store, amount_atomic: int = 100) -> tuple[str, str]:
    spec = OptionSpec("address", NET, 1, "ETH", None, 18, str(amount_atomic), "1", amount_atomic, 2, xpub="x")
    new = NewInvoice(Decimal(amount_atomic), "USD", {}, {}, Decimal(0), {"mode": "immediate"}, 10**12, False, {}, [spec])
    inv, _ = store.create_invoice(new, derive=lambda x, i: f"0x{i + 1:040x}", finish=lambda *a: ("uri", None))
    return inv["id"], inv["payment_options"][0]["destination_address"].lower()


async def test_native_payments_count_only_from_successful_transactions_and_inner_calls(store):
    from watcher.follower import Rails

    chain = FakeNativeChain()
    inv_id, addr = native_invoice(store)
    f = follower(chain, store, rails=Rails(native=True))
    chain.mine_native((addr, 40, False))  # a failed transaction: nothing moved
    chain.mine_native((addr, 30, True), inner=(addr, 70))
    await catch_up(f)
    payments = store.get_invoice(inv_id)["payments"]
    assert sorted((p["amount_atomic"], p["log_index"]) for p in payments) == [("30", None), ("70", None)]
    assert store.get_invoice(inv_id)["status"] == "paid"


async def test_traces_that_are_not_of_the_block_read_are_refused(store):
    """Traces are read by number: if the block changed between the two reads, the trace's
    transaction is not in the block we read, and nothing is recorded."""
    from watcher.follower import Rails

    chain = FakeNativeChain()
    inv_id, addr = native_invoice(store)
    f = follower(chain, store, rails=Rails(native=True))
    chain.mine_native(inner=(addr, 100))
    chain.traces_from_another_block = True
    with pytest.raises(ChainChanged):
        await catch_up(f)
    assert store.get_invoice(inv_id)["payments"] == []
    chain.traces_from_another_block = False
    await catch_up(f)
    assert [p["amount_atomic"] for p in store.get_invoice(inv_id)["payments"]] == ["100"]


async def test_a_tracer_that_goes_missing_is_asked_for_again(store):
    """A failover to a node without the tracer found at start: the step fails and the next
    one asks the node again which tracer it has (never carries on without looking)."""
    from watcher.follower import Rails

    chain = FakeNativeChain()
    inv_id, addr = native_invoice(store)
    f = follower(chain, store, rails=Rails(native=True))
    chain.mine()
    await catch_up(f)
    assert f.tracer == "debug_traceBlockByNumber"
    real = chain.internal_transfers
    probes = []

    async def missing(numbers, method):
        raise RpcError(method, "the method does not exist/is not available", -32601)

    async def probe(block_number):
        probes.append(block_number)
        return "trace_block"

    chain.internal_transfers = missing
    chain.probe_tracer = probe
    chain.mine_native(inner=(addr, 100))
    with pytest.raises(RpcError):
        await f.run_once()
    assert f.tracer == ""
    chain.internal_transfers = real
    await catch_up(f)
    assert probes and f.tracer == "trace_block"
    assert [p["amount_atomic"] for p in store.get_invoice(inv_id)["payments"]] == ["100"]


# --------------------------------------------------------------------------- nodes that cannot be trusted


async def test_logs_from_a_backend_behind_the_head_are_asked_again_not_taken_as_none(store):
    """Defect 1: near the head, logs are asked by block hash; a backend without the block
    errs, the step fails, and the checkpoint stays below the paying block until it is read."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine()
    await catch_up(f)
    chain.mine((addr, 100))
    chain.logs_head = 1  # headers honest, logs one block behind
    with pytest.raises(RpcError):
        await f.run_once()
    assert store.cursor(NET).number == 1
    chain.logs_head = None
    await catch_up(f)
    assert [p["amount_atomic"] for p in store.get_payments(inv_id)] == ["100"]


async def test_a_clamped_log_range_far_below_the_head_is_refused(store):
    """Defect 1, by range: the span's answer carries its last header from the same backend; a
    backend that lacks it (and so clamped toBlock) fails the step instead of moving past."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    for n in range(1, 400):
        chain.mine(*([(addr, 100)] if n == 180 else []))
    f = follower(chain, store, chunk_size=200)
    chain.logs_head = 150
    with pytest.raises(BlockUnknown):
        await f.run_once()
    assert store.cursor(NET) is None
    assert f.chunk_size == 200  # a node behind is not a range too large
    chain.logs_head = None
    await catch_up(f)
    assert [p["amount_atomic"] for p in store.get_payments(inv_id)] == ["100"]


async def test_blocks_the_bloom_rules_out_are_not_asked_for_logs(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    for _ in range(5):
        chain.mine()
    chain.mine((addr, 100))
    chain.mine(("0x" + "99" * 20, 5))  # our token, another recipient: the bloom rules it out too
    await catch_up(f)
    assert [r for r in chain.log_requests if r[0] == "hash"] == [("hash", 6)]
    assert [p["amount_atomic"] for p in store.get_payments(inv_id)] == ["100"]


async def test_without_a_bloom_every_block_is_asked(store):
    chain = FakeChain()
    chain.blooms = False
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    for _ in range(3):
        chain.mine()
    chain.mine((addr, 100))
    await catch_up(f)
    assert sorted(r[1] for r in chain.log_requests if r[0] == "hash") == [1, 2, 3, 4]  # (genesis was mined with one)
    assert len(store.get_payments(inv_id)) == 1


async def test_a_null_header_in_the_reorg_walk_is_asked_again_never_a_reorg(store):
    """Defect 5: a one-block reorg whose walk is answered by a node a few blocks behind
    (null for the newest heights) must not revert the confirmed payment below it."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    for _ in range(3):
        chain.mine()
    chain.mine((addr, 100))  # block 4
    chain.mine()  # block 5: the payment has 2 confirmations
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "confirmed"
    chain.fork(4)
    chain.mine()  # 5'
    chain.mine()  # 6'
    real = chain.headers

    async def walk_answered_by_a_lagging_node(numbers):
        return [None if n in (4, 5) else h for n, h in zip(numbers, await real(numbers))]

    chain.headers = walk_answered_by_a_lagging_node
    with pytest.raises(ChainChanged):
        await f.run_once()
    assert store.get_invoice(inv_id)["status"] == "confirmed"
    assert store.outbox.event_count() == sum(1 for _ in store.db.execute("SELECT 1 FROM events"))
    assert not list(store.db.execute("SELECT 1 FROM events WHERE type = 'invoice.payment_reverted'"))
    chain.headers = real
    await catch_up(f)
    got = store.get_invoice(inv_id)
    assert got["status"] == "confirmed" and got["payments"][0]["status"] == "confirmed"
    assert not list(store.db.execute("SELECT 1 FROM events WHERE type = 'invoice.payment_reverted'"))


async def test_the_window_covers_the_confirmations_so_a_deep_reorg_is_walked_not_guessed(store):
    """Defect 4: with confirmations = 300, a 299-block reorg must revert the payment it drops
    (the window once stopped at 256 and took an unchecked block as the base)."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store, confirmations=300)
    for _ in range(5):
        chain.mine()
    chain.mine((addr, 100))  # block 6
    for _ in range(294):
        chain.mine()  # to block 300
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "paid"
    assert len(store.recent_blocks(NET)) >= 300
    chain.fork(1)  # a 299-block reorg, without the payment
    for _ in range(320):
        chain.mine()
    await catch_up(f)
    got = store.get_invoice(inv_id)
    assert got["status"] == "pending" and got["payments"][0]["status"] == "reverted"
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_a_reorg_deeper_than_the_window_stops_the_chain_and_confirms_nothing(store):
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store, confirmations=3)
    for _ in range(299):
        chain.mine()
    chain.mine((addr, 100))  # block 300, not yet confirmed
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "paid"
    assert f.window == 256 and len(store.recent_blocks(NET)) <= 257
    chain.fork(10)  # 290 blocks deep: below everything remembered
    for _ in range(300):
        chain.mine()
    for _ in range(3):
        with pytest.raises(ReorgTooDeep, match="deeper than the"):
            await f.run_once()
    got = store.get_invoice(inv_id)
    assert got["status"] == "paid" and got["payments"][0]["status"] == "detected"
    assert store.cursor(NET).number == 300


async def test_a_stopped_chain_says_so_until_a_step_succeeds(store):
    import asyncio

    chain = FakeChain()
    f = follower(chain, store)
    for _ in range(3):
        chain.mine()
    await catch_up(f)
    chain.fork(-1)
    for _ in range(5):
        chain.mine()
    stopping = asyncio.Event()
    task = asyncio.create_task(f.run(stopping))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if f.status.stopped:
            break
    stopping.set()
    await task
    assert f.status.stopped and "deeper than" in f.status.stopped


async def test_the_reorg_walk_pages_from_the_top_and_stops_at_the_first_match(store):
    """Defect 3: the walk never asks the whole window at once; a one-block reorg costs one
    page of 8 headers, and no page passes max_batch."""
    chain = FakeChain()
    f = follower(chain, store, max_batch=100)
    for _ in range(299):
        chain.mine()
    await catch_up(f)
    chain.header_cap = 100
    chain.fork(298)
    chain.mine()  # 299'
    chain.mine()  # 300'
    before = len(chain.header_requests)
    await catch_up(f)
    walk = [r for r in chain.header_requests[before:] if len(r) > 1 and r[0] > r[-1]]
    assert walk == [list(range(299, 291, -1))]
    assert all(len(r) <= 100 for r in chain.header_requests[before:])
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_a_node_of_another_chain_found_while_following_stops_it_as_such(store):
    """Defect 6 at run time: a failover to a node whose genesis differs from the one the
    database recorded is not "a deep reorg": the chain stops and says what it is."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine((addr, 100))
    await catch_up(f)
    store.remember_genesis(NET, chain.blocks[0].hash)
    chain.salt = "another network"
    chain.fork(-1)
    for _ in range(4):
        chain.mine()
    with pytest.raises(WrongChainFollowed, match="another chain"):
        await f.run_once()
    assert store.get_payments(inv_id)[0]["status"] == "detected"
