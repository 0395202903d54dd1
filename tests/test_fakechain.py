"""FakeChain's faults fire as documented, and the follower's stories with the ones that
test_follower.py does not tell: headers from a node behind while its logs are honest, and
the native coin's blocks from such a node.

A fault that silently does not fire would make a follower test pass for the wrong reason,
so each is checked here against what the real reader hands the follower.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from fakechain import TOKEN, FakeChain, FakeNativeChain

from watcher.chain import BlockUnknown, LogQuery, RpcError
from watcher.follower import ChainChanged, Follower, Rails
from watcher.store import NewInvoice, OptionSpec, Store

NET = "fake"
ADDR = "0x" + "01" * 20


def query(*recipients: str) -> LogQuery:
    return LogQuery(
        tokens=[TOKEN], recipients=list(recipients) or None, keep=None, routers=[], payment_ids=None
    )


def paid_chain(blocks: int = 6, paying: tuple[int, ...] = (3, 5)) -> FakeChain:
    chain = FakeChain()
    for n in range(1, blocks):
        chain.mine(*([(ADDR, n)] if n in paying else []))
    return chain


async def test_a_backend_behind_clamps_ranges_nulls_headers_and_refuses_logs_by_hash() -> None:
    chain = paid_chain()
    chain.lag(2)  # has blocks 0..3 of 0..5
    assert chain.backend_head == 3
    assert await chain.block_number() == 5  # the head is honest
    assert [h is None for h in await chain.headers([2, 3, 4, 5])] == [False, False, True, True]
    found = await chain.range_logs(0, 3, query())
    assert [t.block_number for t in found.transfers] == [3]
    with pytest.raises(BlockUnknown):  # a range past its head fails on the closing header
        await chain.range_logs(0, 5, query())
    with pytest.raises(RpcError, match="unknown block"):
        await chain.block_logs([(chain.blocks[5], query())])
    assert [t.amount for t in (await chain.block_logs([(chain.blocks[3], query())])).transfers] == [3]


async def test_logs_head_and_headers_head_each_lag_alone() -> None:
    chain = paid_chain()
    chain.logs_head = 4
    assert all(h is not None for h in await chain.headers([4, 5]))
    with pytest.raises(RpcError, match="unknown block"):
        await chain.block_logs([(chain.blocks[5], query())])

    chain.logs_head, chain.headers_head = None, 3
    assert [h is None for h in await chain.headers([3, 4, 5])] == [False, True, True]
    chain.headers_head, chain.null_headers = None, frozenset({4})
    assert [h is None for h in await chain.headers([3, 4, 5])] == [False, True, False]
    assert [t.amount for t in (await chain.block_logs([(chain.blocks[5], query())])).transfers] == [5]
    assert [t.amount for t in (await chain.range_logs(0, 5, query())).transfers] == [3, 5]


async def test_range_limit_cuts_a_range_short_behind_an_honest_closing_header() -> None:
    chain = paid_chain()
    chain.range_limit = 4  # blocks 1..4 of 1..5
    found = await chain.range_logs(1, 5, query(), through=chain.blocks[5])
    assert [t.block_number for t in found.transfers] == [3]  # block 5's payment silently missing
    assert chain.log_requests == [("range", 1, 5)]


async def test_batch_caps_refuse_longer_batches_of_anything() -> None:
    chain = FakeNativeChain()
    for _ in range(5):
        chain.mine_native((ADDR, 1, True))
    chain.header_cap = 3
    with pytest.raises(RpcError, match="batch size too large") as refused:
        await chain.headers([1, 2, 3, 4])
    assert refused.value.code == -32600
    assert len(await chain.headers([1, 2, 3])) == 3
    assert len(await chain.full_blocks([1, 2, 3, 4])) == 4  # header_cap is for headers only

    chain.header_cap, chain.batch_cap = None, 2
    for read in (
        chain.headers([1, 2, 3]),
        chain.full_blocks([1, 2, 3]),
        chain.block_logs([(chain.blocks[n], query()) for n in (1, 2, 3)]),
        chain.successful_transactions(
            {tx: (n, chain.blocks[n].hash) for n in (1, 2, 3) for tx, *_ in chain.native[n]}
        ),
    ):
        with pytest.raises(RpcError, match="batch size too large"):
            await read
    assert len(await chain.full_blocks([1, 2])) == 2


async def test_native_blocks_and_receipts_follow_the_lag_and_the_fork() -> None:
    chain = FakeNativeChain()
    block = chain.mine_native((ADDR, 7, True), (ADDR, 8, False))
    chain.headers_head = 0
    assert await chain.full_blocks([1]) == [None]
    chain.headers_head = None
    [full] = await chain.full_blocks([1])
    assert full.ref == block and [t.amount for t in full.transactions] == [7, 8]
    [ok_tx, failed_tx] = [tx for tx, *_ in chain.native[1]]
    assert await chain.successful_transactions({ok_tx: (1, block.hash), failed_tx: (1, block.hash)}) == {
        ok_tx
    }
    chain.fork(0)
    chain.mine()
    with pytest.raises(RpcError, match="another block"):
        await chain.successful_transactions({ok_tx: (1, block.hash)})


async def test_lying_log_hashes_and_missing_blooms() -> None:
    chain = FakeChain()
    chain.blooms = False
    block = chain.mine((ADDR, 1))
    assert block.bloom is None
    chain.lie_about_log_hashes = True
    [t] = (await chain.range_logs(1, 1, query())).transfers
    assert t.block_hash != block.hash and t.block_number == 1


# --------------------------------------------------------------------------- follower stories


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "w.db", clock=lambda: 1_000_000.0)
    yield s
    s.close()


def invoice(store: Store, token: str | None = TOKEN, amount_atomic: int = 100) -> tuple[str, str]:
    symbol, decimals = ("TOK", 0) if token else ("ETH", 18)
    spec = OptionSpec(
        "address", NET, 1, symbol, token, decimals, str(amount_atomic), "1", amount_atomic, 2, xpub="x"
    )
    new = NewInvoice(
        Decimal(amount_atomic), "USD", {}, {}, Decimal(0), {"mode": "immediate"}, 10**12, False, {}, [spec]
    )
    inv, _ = store.create_invoice(new, derive=lambda x, i: f"0x{i + 1:040x}", finish=lambda *a: ("uri", None))
    return inv["id"], inv["payment_options"][0]["destination_address"].lower()


def follower(chain: FakeChain, store: Store, **kw) -> Follower:
    kw.setdefault("confirmations", 2)
    return Follower(
        network=NET, reader=chain, store=store, tokens=[TOKEN], start_block=0, poll_interval=0, **kw
    )


async def catch_up(f: Follower) -> None:
    for _ in range(1000):
        if await f.run_once() == 0:
            return
    raise AssertionError("never caught up")


def reverted_events(store: Store) -> list:
    return list(store.db.execute("SELECT 1 FROM events WHERE type = 'invoice.payment_reverted'"))


async def test_null_headers_in_a_walk_wait_for_the_node_then_the_real_reorg_reverts_once(store):
    """A two-block reorg drops a payment. The scan's new block comes from an up-to-date
    backend, but the heights the walk asks for (which we hold) from one behind: `null`. The
    walk asks again and reverts nothing meanwhile; once that backend answers, the walk finds
    the real ancestor and the dropped payment is reverted, once."""
    chain = FakeChain()
    inv_id, addr = invoice(store)
    f = follower(chain, store, confirmations=3)
    for _ in range(4):
        chain.mine()
    chain.mine((addr, 100))  # block 5
    chain.mine()  # block 6: 2 of 3 confirmations
    await catch_up(f)
    assert store.get_invoice(inv_id)["status"] == "paid"
    chain.fork(4)
    for _ in range(3):
        chain.mine()  # 5', 6', 7': no payment
    chain.null_headers = frozenset({5, 6})
    before = len(chain.header_requests)
    for _ in range(3):
        with pytest.raises(ChainChanged):
            await f.run_once()
    walked = [r for r in chain.header_requests[before:] if 6 in r]
    assert walked, f"premise: the walk met the nulls (asked: {chain.header_requests[before:]})"
    got = store.get_invoice(inv_id)
    assert got["status"] == "paid" and got["payments"][0]["status"] == "detected"
    assert not reverted_events(store) and store.cursor(NET).number == 6

    chain.null_headers = frozenset()
    await catch_up(f)
    assert store.cursor(NET).hash == chain.blocks[-1].hash
    got = store.get_invoice(inv_id)
    assert got["status"] == "pending" and got["payments"][0]["status"] == "reverted"
    assert len(reverted_events(store)) == 1


async def test_native_blocks_from_a_node_behind_are_asked_again_never_skipped(store):
    """The coin rail reads full blocks: a `null` for the paying block (a backend behind) fails
    the step below it; nothing is skipped, and the payment is recorded once it answers."""
    chain = FakeNativeChain()
    inv_id, addr = invoice(store, token=None)
    f = follower(chain, store, rails=Rails(native=True, internal_transfers="off"))
    chain.mine()
    await catch_up(f)
    chain.mine_native((addr, 100, True))  # block 2
    chain.mine()  # block 3
    chain.headers_head = 1
    with pytest.raises(ChainChanged):
        await f.run_once()
    assert store.cursor(NET).number == 1 and store.get_payments(inv_id) == []
    chain.headers_head = None
    await catch_up(f)
    assert [p["amount_atomic"] for p in store.get_payments(inv_id)] == ["100"]
    assert store.get_invoice(inv_id)["status"] == "confirmed"


async def test_a_database_without_a_recorded_genesis_takes_none_from_a_node_without_its_blocks(tmp_path):
    """A database that follows a chain but recorded no genesis (made before it was kept) must not
    take a reset chain's block 0 as its own: the node must hold one of its blocks first."""
    from watcher.service import Service

    store = Store(tmp_path / "w.db", clock=lambda: 1_000_000.0)
    try:
        chain = FakeChain()
        f = Follower(
            network=NET,
            reader=chain,
            store=store,
            tokens=[TOKEN],
            confirmations=2,
            start_block=0,
            poll_interval=0,
        )
        for _ in range(4):
            chain.mine()
        while await f.run_once():
            pass
        service = Service.__new__(Service)  # only the check, not a daemon
        service.store = store
        assert await service._node_holds_our_blocks(NET, chain)
        chain.salt = "reset"
        chain.fork(-1)
        for _ in range(6):
            chain.mine()
        assert not await service._node_holds_our_blocks(NET, chain)
    finally:
        store.close()
