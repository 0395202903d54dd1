"""The follower against a FakeChain (tests/fakechain.py: a ChainReader that can mine, fork, lag and lie).

eth-tester and the end-to-end tests prove the real path; these make the chain's awkward
moments read like stories and check exactly what the follower asked the node for.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from fakechain import TOKEN, FakeChain, FakeNativeChain

from watcher.chain import BlockUnknown, RpcError
from watcher.follower import ChainChanged, Follower, ReorgTooDeep, WrongChainFollowed
from watcher.store import NewInvoice, OptionSpec, Store

NET = "fake"
OTHER_TOKEN = "0x" + "cc" * 20


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db", clock=lambda: 1_000_000.0)
    yield s
    s.close()


def invoice(store: Store, amount_atomic: int = 100) -> tuple[str, str]:
    spec = OptionSpec("address", NET, 1, "TOK", TOKEN, 0, str(amount_atomic), "1", amount_atomic, 2, xpub="x")
    new = NewInvoice(
        Decimal(amount_atomic), "USD", {}, {}, Decimal(0), {"mode": "immediate"}, 10**12, False, {}, [spec]
    )
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


def native_invoice(store: Store, amount_atomic: int = 100) -> tuple[str, str]:
    spec = OptionSpec("address", NET, 1, "ETH", None, 18, str(amount_atomic), "1", amount_atomic, 2, xpub="x")
    new = NewInvoice(
        Decimal(amount_atomic), "USD", {}, {}, Decimal(0), {"mode": "immediate"}, 10**12, False, {}, [spec]
    )
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
    assert sorted(r[1] for r in chain.log_requests if r[0] == "hash") == [
        1,
        2,
        3,
        4,
    ]  # (genesis was mined with one)
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
        return [None if n in (4, 5) else h for n, h in zip(numbers, await real(numbers), strict=True)]

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


async def test_a_reset_chain_below_our_checkpoint_is_told_apart_from_a_node_behind(store):
    chain = FakeChain()
    f = follower(chain, store)
    for _ in range(5):
        chain.mine()
    await catch_up(f)
    store.remember_genesis(NET, chain.blocks[0].hash)
    chain.visible_head = 2  # a node behind: waited for
    assert await f.run_once() == 0 and "behind our checkpoint" in f.status.last_error
    chain.visible_head = None
    chain.salt = "reset"
    chain.fork(-1)
    chain.mine()
    chain.mine()  # a reset chain, two blocks long
    with pytest.raises(WrongChainFollowed):
        await f.run_once()
    assert store.cursor(NET).number == 5


async def test_a_node_without_its_newest_header_still_gives_the_blocks_below_it(store):
    """An honest head whose newest header stays `null` (a backend behind, for good): the blocks
    below it are applied, the payment in one of them recorded; the missing one waits."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store)
    chain.mine()
    await catch_up(f)
    chain.mine((addr, 100))  # block 2
    chain.mine()  # block 3, whose header the node does not give
    chain.headers_head = 2
    assert await f.run_once() == 1
    assert store.cursor(NET).number == 2
    assert [p["amount_atomic"] for p in store.get_payments(inv_id)] == ["100"]
    with pytest.raises(ChainChanged):
        await f.run_once()  # block 3 alone: still nothing to take
    chain.headers_head = None
    await catch_up(f)
    assert store.cursor(NET).number == 3


async def test_an_untrusted_bloom_skips_nothing(store):
    """`trust_logs_bloom = false` (a chain whose blooms leave logs out): every block near the head
    is asked for its logs, even one whose bloom rules ours out."""
    from dataclasses import replace

    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store, trust_logs_bloom=False)
    chain.mine()
    block = chain.mine((addr, 100))
    chain.blocks[block.number] = replace(block, bloom=0)  # a bloom that leaves our log out
    await catch_up(f)
    assert [p["amount_atomic"] for p in store.get_payments(inv_id)] == ["100"]


async def test_backends_that_disagree_about_our_tip_fail_the_step_instead_of_spinning(store):
    """One backend says our tip is another block, the walk's says it is ours: nothing to undo,
    and the step fails (so it backs off) rather than report progress and go round at once."""
    from dataclasses import replace

    chain = FakeChain()
    f = follower(chain, store)
    for _ in range(3):
        chain.mine()
    await catch_up(f)
    real = chain.headers
    calls = []

    async def first_answer_from_another_backend(numbers):
        calls.append(list(numbers))
        answer = await real(numbers)
        return [replace(h, hash="0x" + "ab" * 32) for h in answer] if len(calls) == 1 else answer

    chain.headers = first_answer_from_another_backend
    with pytest.raises(ChainChanged, match="disagrees with itself"):
        await f.run_once()
    assert store.cursor(NET).hash == chain.blocks[3].hash


async def test_a_step_records_a_bounded_number_of_payments_and_the_rest_follows(store, monkeypatch):
    """A step's transaction holds the write lock while it judges (the API's writes wait in
    another process): past MAX_STEP_PAYMENTS it ends at a block boundary, and the next steps
    read as many blocks as it kept, so every payment is recorded once."""
    import watcher.follower

    monkeypatch.setattr(watcher.follower, "MAX_STEP_PAYMENTS", 4)

    class Steps:
        def __init__(self) -> None:
            self.payments: list[int] = []

        def blocks_applied(self, network: str, blocks: int, payment_roles) -> None:
            self.payments.append(len(payment_roles))

        def step_failed(self, network: str, reason: str) -> None:
            raise AssertionError(reason)

    chain = FakeChain()
    invoices = [invoice(store) for _ in range(10)]
    for i in range(0, 10, 2):  # two payments a block, five blocks
        chain.mine((invoices[i][1], 100), (invoices[i + 1][1], 100))
    for _ in range(300):  # far below the head: read by number range
        chain.mine()
    checks: list[int] = []  # payments whose blocks' hashes a check compared
    real_check = watcher.follower._check_block_hashes

    def counted_check(matched, by_number):
        checks.append(len(matched))
        return real_check(matched, by_number)

    monkeypatch.setattr(watcher.follower, "_check_block_hashes", counted_check)
    steps = Steps()
    f = follower(chain, store, chunk_size=100, metrics=steps)
    await catch_up(f)

    assert max(steps.payments) <= 4 and sum(steps.payments) == 10, steps.payments
    assert len(checks) == len(steps.payments), (checks, steps.payments)  # once a step, cut or not
    for inv_id, _ in invoices:
        [payment] = store.get_payments(inv_id)
        assert int(payment["amount_atomic"]) == 100
        assert store.get_invoice(inv_id)["status"] == "confirmed"
    assert store.cursor(NET).number == len(chain.blocks) - 1


class GatedWrites:
    """The store's writes held until `opened`, or failing once with `fail_next`: the write of a
    step in flight while `run()` reads the next range."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.opened = asyncio.Event()
        self.fail_next: Exception | None = None
        self.started = 0
        self._write = store.write
        store.write = self.write  # type: ignore[method-assign]

    async def write(self, change, *args, **kwargs):
        self.started += 1
        await self.opened.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        return await self._write(change, *args, **kwargs)


def ranged_chain(store: Store, payments: int) -> tuple[FakeChain, list[tuple[str, str]]]:
    """A payment in each of the first `payments` blocks, then enough empty blocks for all of
    them to be read by number range, in steps of 5 blocks."""
    chain = FakeChain()
    invoices = [invoice(store) for _ in range(payments)]
    for _, address in invoices:
        chain.mine((address, 100))
    for _ in range(300):
        chain.mine()
    return chain, invoices


async def test_the_next_range_is_read_while_the_last_steps_write_commits(store, tmp_path):
    """`run()` overlaps a step's write with the next step's reads; the next step waits for
    that write before its own, so the checkpoint only ever moves by committed steps."""
    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)

    assert await f.run_once(overlap=True) == 5  # blocks 0-4: read, their write in flight
    await asyncio.sleep(0)
    assert writes.started == 1 and store.cursor(NET) is None
    asked = len(chain.log_requests)
    second = asyncio.create_task(f.run_once(overlap=True))
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(chain.log_requests) > asked and chain.log_requests[-1][1:] == (5, 9)  # read meanwhile
    assert not second.done() and store.cursor(NET) is None  # and waiting for the first write
    writes.opened.set()
    assert await second == 5
    assert store.cursor(NET).number == 4  # the first step committed; the second's is in flight
    assert await f.run_once() == 5  # without `overlap` a step returns once committed
    assert store.cursor(NET).number == 14
    await catch_up(f)
    assert store.cursor(NET).number == len(chain.blocks) - 1
    for inv_id, _ in invoices:
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]


async def test_the_next_steps_payment_blocks_are_checked_while_the_last_write_commits(store):
    """The headers of a step's payment blocks (a ranged step reads only its ends' first) are
    read while the previous step's write is still in flight, so its own write can begin the
    moment that one commits; they are written with the step's blocks once it does."""
    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)

    assert await f.run_once(overlap=True) == 5  # blocks 0-4: their write held
    asked = len(chain.header_requests)
    second = asyncio.create_task(f.run_once(overlap=True))
    for _ in range(200):
        await asyncio.sleep(0)
    assert not second.done() and writes.started == 1 and store.cursor(NET) is None
    later = [n for numbers in chain.header_requests[asked:] for n in numbers]
    assert {6, 7, 8} <= set(later)  # blocks 5-9: their payments' blocks, read meanwhile
    writes.opened.set()
    assert await second == 5
    await f._settle()
    assert store.cursor(NET).number == 9
    assert {b["number"] for b in store.db.query("SELECT number FROM chain_blocks")} >= set(range(5, 10))


async def test_a_step_whose_previous_write_fails_cancels_its_check_and_leaves_nothing_running(store):
    """The previous step's write fails while this step's check of its payment blocks is still
    reading headers: the step raises that failure, its check is cancelled (not left running
    or unobserved), and the steps after start again from the checkpoint stored."""
    import sqlite3

    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    writes.fail_next = sqlite3.OperationalError("database is locked")
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)
    real_headers = chain.headers
    held = asyncio.Event()
    cancelled: list[list[int]] = []

    async def held_headers(numbers):
        if {6, 7, 8} & set(numbers):  # the second step's payment blocks
            try:
                await held.wait()
            except asyncio.CancelledError:
                cancelled.append(list(numbers))
                raise
        return await real_headers(numbers)

    chain.headers = held_headers
    assert await f.run_once(overlap=True) == 5  # blocks 0-4: their write held, then failing
    before = asyncio.all_tasks()
    second = asyncio.create_task(f.run_once(overlap=True))
    for _ in range(100):
        await asyncio.sleep(0)
    assert not second.done()  # its check waits on the node; it waits on the write
    writes.opened.set()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await second
    assert cancelled and {6, 7, 8} <= set(cancelled[0])
    assert asyncio.all_tasks() <= before  # nothing of the step left running
    assert store.cursor(NET) is None and f._writing is None
    chain.headers = real_headers
    await catch_up(f)
    for inv_id, _ in invoices:
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]


async def test_a_node_that_fails_a_steps_block_check_beside_the_last_write_loses_and_repeats_nothing(store):
    """The node fails the header read of a step's payment blocks while the previous step's
    write is still in flight: that write commits, this step's write is never made (the next
    step raises the node's error), and the steps after read its range again from the
    checkpoint, every payment recorded once."""
    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)
    real_headers = chain.headers
    failing = True
    failed: list[list[int]] = []

    async def flaky_headers(numbers):
        if failing and {6, 7, 8} & set(numbers):  # the second step's payment blocks
            failed.append(list(numbers))
            raise RpcError("eth_getBlockByNumber", "upstream unavailable")
        return await real_headers(numbers)

    chain.headers = flaky_headers
    assert await f.run_once(overlap=True) == 5  # blocks 0-4: their write held
    second = asyncio.create_task(f.run_once(overlap=True))  # blocks 5-9: their check fails
    for _ in range(100):
        await asyncio.sleep(0)
    assert failed and not second.done() and store.cursor(NET) is None  # failed while it was held
    writes.opened.set()
    assert await second == 5  # it read its range; its write task carries the failure
    with pytest.raises(RpcError, match="upstream unavailable"):
        await f.run_once(overlap=True)
    assert store.cursor(NET).number == 4  # the first write committed; nothing of 5-9
    assert writes.started == 1  # the failed check made no write
    failing = False
    asked = len(chain.log_requests)
    await catch_up(f)
    assert ("range", 5, 9) in chain.log_requests[asked:]  # read again from the checkpoint
    assert store.cursor(NET).number == len(chain.blocks) - 1
    for inv_id, _ in invoices:
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]


async def test_a_write_that_fails_in_flight_fails_the_next_step_which_reads_again_from_the_checkpoint(store):
    """The database refuses a step's write after `run()` went on to read the next range: the
    next step fails with that error instead of building on it, and the steps after start from
    the checkpoint stored. Every payment is recorded once."""
    import sqlite3

    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    writes.fail_next = sqlite3.OperationalError("database is locked")
    writes.opened.set()
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)

    assert await f.run_once(overlap=True) == 5  # blocks 0-4; the write fails in the background
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        await f.run_once(overlap=True)  # blocks 5-9 read on top of it: not written
    assert store.cursor(NET) is None
    await catch_up(f)
    assert store.cursor(NET).number == len(chain.blocks) - 1
    for inv_id, _ in invoices:
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]
        assert store.get_invoice(inv_id)["status"] == "confirmed"


async def test_run_catches_up_through_a_failed_write_and_ends_with_every_write_committed(store, monkeypatch):
    """The loop itself: a write refused once mid-catch-up is logged as a failed step, the chain
    is caught up anyway, and when the follower stops nothing it started is left uncommitted."""
    import sqlite3

    from structlog.testing import capture_logs

    import watcher.follower

    monkeypatch.setattr(watcher.follower, "WRITE_GAP_SECONDS", 0.0)  # 63 steps: no pause between

    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    writes.opened.set()
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)
    stopping = asyncio.Event()
    f.watch.loaded = True
    with capture_logs() as logs:
        writes.fail_next = sqlite3.OperationalError("database is locked")
        running = asyncio.create_task(f.run(stopping))
        for _ in range(500):
            cursor = store.cursor(NET)
            if cursor is not None and cursor.number == len(chain.blocks) - 1:
                break
            await asyncio.sleep(0.01)
        stopping.set()
        f.wake()
        await asyncio.wait_for(running, timeout=10)
    assert store.cursor(NET).number == len(chain.blocks) - 1
    assert f._writing is None
    assert [e for e in logs if e["event"] == "follower_step_crashed"], logs
    for inv_id, _ in invoices:
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]


async def test_a_write_that_fails_as_the_follower_stops_is_logged_and_nothing_is_kept(store):
    """The follower stops with its last step's write in flight: it waits for that write, and
    its failure is logged (there is no next step to fail with it); the checkpoint stays put."""
    import sqlite3

    from structlog.testing import capture_logs

    chain, invoices = ranged_chain(store, 3)
    stopping = asyncio.Event()

    class StopsWhileReading(FakeChain):
        async def range_logs(self, first, last, query, through=None):
            stopping.set()  # the stop comes while the first step reads
            return await FakeChain.range_logs(self, first, last, query, through)

    chain.__class__ = StopsWhileReading
    writes = GatedWrites(store)
    writes.fail_next = sqlite3.OperationalError("disk I/O error")
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)
    f.watch.loaded = True
    with capture_logs() as logs:
        running = asyncio.create_task(f.run(stopping))
        for _ in range(100):
            await asyncio.sleep(0)
        assert writes.started == 1 and not running.done()  # it waits for the write in flight
        writes.opened.set()
        await asyncio.wait_for(running, timeout=10)
    assert [e["error"] for e in logs if e["event"] == "follower_step_failed"] == ["disk I/O error"]
    assert store.cursor(NET) is None and f._writing is None
    assert all(store.get_payments(inv_id) == [] for inv_id, _ in invoices)


async def test_back_to_back_writes_leave_the_other_writers_their_turn(store, monkeypatch):
    """`run()` catching up with writes that each hold the lock 0.3 s and reads that take no
    time (the next step's write waits for the last one's): another connection asking for the
    write lock as the store's writers do (engine.StoreDatabase, looking again every millisecond)
    with a 3 s busy timeout (the API waits 5 s), gets it every time."""
    import itertools
    import sqlite3
    import time

    from watcher.store import core, engine

    chain, invoices = ranged_chain(store, 40)
    record = core.Store._record

    apply_blocks = core.Store.apply_blocks
    writes: list[tuple[float, float]] = []  # each step's write: (began, ended)

    def slow_record(self, *args, **kwargs):  # inside apply_blocks's transaction
        time.sleep(0.3)
        return record(self, *args, **kwargs)

    def timed_apply_blocks(self, *args, **kwargs):
        began = time.monotonic()
        try:
            return apply_blocks(self, *args, **kwargs)
        finally:
            writes.append((began, time.monotonic()))

    monkeypatch.setattr(core.Store, "_record", slow_record)
    monkeypatch.setattr(core.Store, "apply_blocks", timed_apply_blocks)
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)
    f.watch.loaded = True
    stopping = asyncio.Event()
    outcomes: list[str] = []

    def other_writer() -> None:
        db = engine.open_database(store.path, busy_timeout_ms=3000)
        try:
            for _ in range(6):
                try:
                    with db.atomic():
                        pass
                    outcomes.append("got it")
                except sqlite3.OperationalError as exc:
                    outcomes.append(str(exc))
                time.sleep(0.05)
        finally:
            db.conn.close()

    running = asyncio.create_task(f.run(stopping))
    while store.cursor(NET) is None:  # the steps are under way, writing back to back
        await asyncio.sleep(0.01)
    other = asyncio.create_task(asyncio.to_thread(other_writer))
    for _ in range(600):  # a dozen writes back to back (3.6 s), however quick the other writer
        if len(writes) >= 12 and other.done():
            break
        await asyncio.sleep(0.05)
    stopping.set()
    await asyncio.wait_for(running, timeout=30)
    await other
    assert outcomes == ["got it"] * 6
    # No run of writes back to back (less than a gap between them) lasted much past
    # WRITE_RUN_SECONDS: a write of 0.3 s began before it ended, then a gap came.
    from watcher.follower import WRITE_GAP_SECONDS, WRITE_RUN_SECONDS

    runs, began = [], writes[0][0]
    for (_, ended), (next_began, _) in itertools.pairwise(writes):
        if next_began - ended >= WRITE_GAP_SECONDS * 0.9:
            runs.append(ended - began)
            began = next_began
    runs.append(writes[-1][1] - began)
    assert len(writes) >= 12 and len(runs) >= 3, writes
    assert max(runs) <= WRITE_RUN_SECONDS + 0.3 + 0.5, runs  # (a write and its sync, slack)


async def test_a_node_that_fails_the_next_read_while_a_write_commits_loses_and_repeats_nothing(store):
    """The node's log backend falls behind while the last step's write is in flight: the next
    step fails on the node, the write in flight still commits, and the steps after go on from
    its checkpoint (its blocks are not read again), every payment recorded once."""
    from watcher.chain import BlockUnknown

    chain, invoices = ranged_chain(store, 12)
    writes = GatedWrites(store)
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)

    assert await f.run_once(overlap=True) == 5  # blocks 0-4, their write held
    chain.logs_head = 4  # a backend behind: blocks 5-9's logs are not there yet
    with pytest.raises(BlockUnknown):
        await f.run_once(overlap=True)
    writes.opened.set()
    chain.logs_head = None
    asked = len(chain.log_requests)
    await catch_up(f)
    assert store.cursor(NET).number == len(chain.blocks) - 1
    assert ("range", 0, 4) not in chain.log_requests[asked:]  # went on from the write in flight
    for inv_id, _ in invoices:
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]


async def test_a_ranged_steps_payment_blocks_are_checked_beside_the_next_read_and_a_lie_fails_it(store):
    """A ranged step reads only its ends' headers before its logs; its payments' blocks are
    read and checked in its write's task, so `run()` reads the next range meanwhile. A log
    that names another hash than its block's fails that write: the next step raises it,
    nothing of either range is recorded, and once the node tells the truth every payment is
    recorded once, under its block's hash."""
    chain, invoices = ranged_chain(store, 12)
    held = asyncio.Event()
    real_headers = chain.headers

    async def held_headers(numbers):
        if not {0, 4} >= set(numbers):  # the payments' blocks 1-3, not the range's ends
            await held.wait()
        return await real_headers(numbers)

    chain.headers = held_headers
    chain.lie_about_log_hashes = True
    f = follower(chain, store, chunk_size=5, max_chunk_size=5)

    # It returns with its check still waiting (the check before the write would hang here).
    assert await asyncio.wait_for(f.run_once(overlap=True), 5) == 5
    assert chain.header_requests == [[0, 4]]
    held.set()
    asked = len(chain.log_requests)
    with pytest.raises(ChainChanged, match="not the canonical one"):
        await f.run_once(overlap=True)  # blocks 5-9 were read; the write of 0-4 failed
    assert ("range", 5, 9) in chain.log_requests[asked:]
    assert store.cursor(NET) is None
    assert all(store.get_payments(inv_id) == [] for inv_id, _ in invoices)

    chain.lie_about_log_hashes = False
    await catch_up(f)
    assert store.cursor(NET).number == len(chain.blocks) - 1
    for inv_id, _ in invoices:
        [payment] = store.get_payments(inv_id)
        assert payment["block_hash"] == chain.blocks[payment["block_number"]].hash


def near_head_chain(store: Store) -> tuple[FakeChain, str, str]:
    """300 blocks: a payment deep in the range (block 5) and one near the head (block 250),
    which a follower 2 confirmations deep reads block by block (above the ceiling, 171)."""
    chain = FakeChain()
    deep, deep_addr = invoice(store)
    near, near_addr = invoice(store)
    for n in range(1, 300):
        chain.mine(*([(deep_addr, 100)] if n == 5 else [(near_addr, 100)] if n == 250 else []))
    return chain, deep, near


def record_calls(chain: FakeChain) -> list[tuple]:
    """Every header and range request, in the order they were made."""
    calls: list[tuple] = []
    headers, range_logs = chain.headers, chain.range_logs

    async def asked_headers(numbers):
        calls.append(("headers", numbers[0], numbers[-1]))
        return await headers(numbers)

    async def asked_range(first, last, *args):
        calls.append(("range", first, last))
        return await range_logs(first, last, *args)

    chain.headers, chain.range_logs = asked_headers, asked_range
    return calls


async def test_the_headers_near_the_head_are_asked_beside_the_ranged_step_before_them_and_once(store):
    """A step capped at the range ceiling asks for the headers of the blocks above it while
    its own spans are read; the next step, which reads those blocks one by one, does not ask
    for them again."""
    chain, deep, near = near_head_chain(store)
    calls = record_calls(chain)
    f = follower(chain, store)

    assert await f.run_once() == 172  # blocks 0-171 by range
    ahead = calls.index(("headers", 172, 299))
    assert ahead < max(i for i, c in enumerate(calls) if c[0] == "range")  # before the spans ended
    assert await f.run_once() == 128  # blocks 172-299 one by one
    assert [c for c in calls if c[0] == "headers" and c[1] <= 250 <= c[2]] == [("headers", 172, 299)]
    assert store.cursor(NET).hash == chain.blocks[-1].hash
    for inv_id in (deep, near):
        assert [int(p["amount_atomic"]) for p in store.get_payments(inv_id)] == [100]


@pytest.mark.parametrize(
    ("serves_side_blocks", "refusal"),
    [(False, "unknown block"), (True, "is not")],
    ids=["node-forgot-the-old-branch", "node-still-serves-it"],
)
async def test_headers_asked_ahead_of_a_reorg_are_refused_and_the_new_branch_recorded(
    store, serves_side_blocks: bool, refusal: str
):
    """The chain reorganises between the step that asked for the headers near the head and
    the step that uses them. A node that forgot the old branch's blocks refuses their logs by
    hash; one that still serves them (as geth does) answers, and the batch's closing header,
    the newest block's as the node has it now, is the new branch's. Either way the step fails,
    nothing of the old branch is recorded, and the next step reads the new branch afresh."""
    chain, deep, near = near_head_chain(store)
    chain.serves_side_blocks = serves_side_blocks
    f = follower(chain, store)
    assert await f.run_once() == 172  # the headers of 172-299 (the old branch) asked meanwhile

    chain.fork(200)  # blocks 201-299 replaced; the payment moves from block 250 to block 260
    addr = store.get_invoice(near)["payment_options"][0]["destination_address"].lower()
    for n in range(201, 300):
        chain.mine(*([(addr, 100)] if n == 260 else []))
    asked = len(chain.log_requests)
    with pytest.raises(RpcError, match=refusal):
        await f.run_once()
    assert ("hash", 250) in chain.log_requests[asked:]  # the old branch's payment block was asked
    assert store.get_payments(near) == [] and store.cursor(NET).number == 171
    await catch_up(f)
    [payment] = store.get_payments(near)
    assert payment["block_number"] == 260 and payment["block_hash"] == chain.blocks[260].hash
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_headers_asked_ahead_that_fail_are_asked_again_by_the_step_that_needs_them(store):
    """The node fails the request made ahead: the step that needs the headers asks for them
    itself, and records the same as without it."""
    chain, deep, near = near_head_chain(store)
    calls = record_calls(chain)
    asked, failed = chain.headers, []

    async def failing_ahead(numbers):
        answer = await asked(numbers)
        if numbers[0] == 172 and not failed:
            failed.append(numbers)
            raise RpcError("eth_getBlockByNumber", "HTTP 503")
        return answer

    chain.headers = failing_ahead
    f = follower(chain, store)
    assert await f.run_once() == 172
    assert await f.run_once() == 128
    assert calls.count(("headers", 172, 299)) == 2  # asked ahead (failed), then by the step
    [payment] = store.get_payments(near)
    assert payment["block_hash"] == chain.blocks[250].hash
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_headers_asked_ahead_from_a_node_behind_are_used_up_to_its_head_and_the_rest_asked(store):
    """The node answered the request made ahead from a backend behind: `null` for the newest
    blocks. The step uses the headers it got and asks for the rest itself, and records the
    same as without it."""
    chain, deep, near = near_head_chain(store)
    calls = record_calls(chain)
    chain.headers_head = 240  # behind for headers only, while the first step reads its spans
    f = follower(chain, store)
    assert await f.run_once() == 172
    chain.headers_head = None
    assert await f.run_once() == 128
    asked = [c for c in calls if c[0] == "headers" and c[2] >= 172]
    assert asked[:2] == [("headers", 172, 299), ("headers", 241, 299)]  # ahead, then the rest
    [payment] = store.get_payments(near)
    assert payment["block_hash"] == chain.blocks[250].hash
    assert store.cursor(NET).hash == chain.blocks[-1].hash


async def test_headers_asked_ahead_are_cancelled_when_the_follower_is_cancelled(store):
    """Shutdown cancels `run()` after its grace period: a request made ahead that the node
    has not answered is cancelled with it, not left running against a closed transport."""
    chain, deep, near = near_head_chain(store)
    asked, hanging, cancelled = chain.headers, asyncio.Event(), asyncio.Event()

    async def never_answered_ahead(numbers):
        if numbers[0] != 172:
            return await asked(numbers)
        hanging.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def spans_never_answered(*args):
        await asyncio.Event().wait()

    chain.headers, chain.range_logs = never_answered_ahead, spans_never_answered
    f = follower(chain, store)
    running = asyncio.create_task(f.run(asyncio.Event()))
    await asyncio.wait_for(hanging.wait(), 5)  # asked ahead while the step reads its spans
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.wait_for(cancelled.wait(), 1)
    assert f._prefetch is None


async def test_the_blocks_near_the_head_are_read_in_batches_at_once_and_one_failing_fails_the_step(store):
    """The 128 blocks a catch-up reads by hash go in two batches at once, not one after the
    other. A batch the node fails fails the step: nothing of its blocks is recorded, and the
    next step reads them all again, each payment recorded once."""
    chain, deep, near = near_head_chain(store)
    f = follower(chain, store, trust_logs_bloom=False)  # every block's logs asked
    assert await f.run_once() == 172

    real, in_flight, most, fail = chain.block_logs, [0], [0], [True]

    async def block_logs(wanted):
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        try:
            await asyncio.sleep(0.01)
            if fail[0] and wanted[0][0].number > 172:  # the second batch, once
                fail[0] = False
                raise RpcError("eth_getLogs", "HTTP 503")
            return await real(wanted)
        finally:
            in_flight[0] -= 1

    chain.block_logs = block_logs
    with pytest.raises(RpcError, match="503"):
        await f.run_once()
    assert most[0] == 2
    assert store.get_payments(near) == [] and store.cursor(NET).number == 171
    asked = len(chain.log_requests)
    assert await f.run_once() == 128
    assert sorted(n for kind, n in chain.log_requests[asked:]) == list(range(172, 300))
    assert [int(p["amount_atomic"]) for p in store.get_payments(near)] == [100]
    assert store.cursor(NET).hash == chain.blocks[-1].hash
