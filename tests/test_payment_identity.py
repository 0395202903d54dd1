"""A payment is what it moves, not where its log sits (contract §4, the re-included-transaction
rule): a transaction re-included after a reorg at another position gets other log indexes,
and each of its payments must come back as itself, with its new block and log, never as a
neighbour's, never twice.

Store-level tables: one transaction, recorded, reverted by `revert_to`, then re-applied in a
new block at other log indexes, as the follower does after a reorg.
"""

from __future__ import annotations

import sqlite3
from decimal import Decimal

import pytest
from sqlite_utils import Database

from watcher.domain import BlockRef, Transfer
from watcher.store import MatchedTransfer, NewInvoice, OptionSpec, Store
from watcher.store.schema import migrations

NET = "testnet"
TOKEN = "0x" + "aa" * 20
PAYER = "0x" + "bb" * 20
MERCHANT = "0x" + "4d" * 20
ROUTER = "0x" + "70" * 20
TX = "0x" + "11" * 32
AMOUNT = 10_000_000  # each invoice's price, in atomic units


def block(n: int, fork: int = 0) -> BlockRef:
    """Block `n` of branch `fork` (another branch: other hashes, same heights)."""
    return BlockRef(
        n,
        f"0x{fork:02x}{n:062x}",
        f"0x{fork:02x}{n - 1:062x}" if n > 4 else f"0x{0:02x}{n - 1:062x}",
        1_000 + n,
    )


def new_store(tmp_path) -> Store:
    return Store(tmp_path / "w.db", clock=lambda: 1_000.0)


def create(store: Store, *, rail: str = "address") -> dict:
    spec = OptionSpec(
        rail=rail,
        network=NET,
        chain_id=1,
        asset="TUSD",
        token_contract=TOKEN,
        decimals=6,
        quoted_amount="10",
        quote_rate="1",
        amount_atomic=AMOUNT,
        required_confirmations=3,
        xpub="xpub-test" if rail == "address" else None,
        destination=MERCHANT if rail == "contract" else None,
        router=ROUTER if rail == "contract" else None,
    )
    new = NewInvoice(
        amount=Decimal("10"),
        currency="USD",
        fields={},
        metadata={},
        tolerance_percent=Decimal(0),
        payment_timing={"mode": "immediate", "expires_after_minutes": 20, "payable_until": None},
        payable_until=10**10,
        draft=False,
        request={},
        options=[spec],
    )
    invoice, _ = store.create_invoice(
        new, derive=lambda xpub, index: f"0x{index + 1:040x}", finish=lambda s, d, i, o: (f"uri:{d}", None)
    )
    return invoice


def paying(invoice: dict, log_index: int, b: BlockRef, amount: int = AMOUNT, tx: str = TX) -> MatchedTransfer:
    option = invoice["payment_options"][0]
    t = Transfer(tx, log_index, b.number, b.hash, TOKEN, PAYER, option["destination_address"].lower(), amount)
    return MatchedTransfer(t, option["id"], b.timestamp)


def mined_then_reorged(store: Store, first: list[MatchedTransfer]) -> list[str]:
    """Record `first` in block 5 of branch 0, then a reorg back to block 4; the reverted ids."""
    store.apply_blocks(NET, [block(4)], [], confirmed_through=1)
    store.apply_blocks(NET, [block(5)], first, confirmed_through=2)
    return store.revert_to(NET, block(4))


def payment_rows(store: Store) -> list[sqlite3.Row]:
    return store.db.execute("SELECT * FROM payments ORDER BY rowid").fetchall()


def event_types(store: Store, invoice: dict) -> list[str]:
    return [e["type"] for e in store.outbox.events_for(invoice["id"])]


def test_a_batch_payment_re_mined_one_log_later_revives_each_payment_as_itself(tmp_path):
    """X at log 3 and Y at log 4, re-mined at 4 and 5: X's payment comes back (not Y's at its
    old index), Y's comes back, nothing is recorded twice and no row is added."""
    store = new_store(tmp_path)
    x, y = create(store), create(store)
    old = block(5)
    reverted = mined_then_reorged(store, [paying(x, 3, old), paying(y, 4, old)])
    assert len(reverted) == 2
    before = {r["invoice_id"]: r["id"] for r in payment_rows(store)}
    assert store.get_invoice(x["id"])["status"] == store.get_invoice(y["id"])["status"] == "pending"

    new = block(5, fork=1)
    result = store.apply_blocks(NET, [new], [paying(x, 4, new), paying(y, 5, new)], confirmed_through=2)
    assert result.payments_added == 2

    rows = payment_rows(store)
    assert len(rows) == 2  # no new row
    for invoice, log_index in ((x, 4), (y, 5)):
        got = store.get_invoice(invoice["id"])
        assert got["status"] == "paid" and got["exception"] is None
        [p] = got["payments"]
        assert p["id"] == before[invoice["id"]]
        assert (p["status"], p["role"], p["log_index"], p["block_hash"]) == (
            "detected",
            "counted",
            log_index,
            new.hash,
        )
        assert p["to_address"].lower() == invoice["payment_options"][0]["destination_address"].lower()
        assert got["payment_summary"]["payment_state"] == "exact"
        assert "invoice.exception_opened" not in event_types(store, invoice)
    # The same block read again: every transfer is a live payment already.
    again = store.apply_blocks(NET, [new], [paying(x, 4, new), paying(y, 5, new)], confirmed_through=2)
    assert again.payments_added == 0 and len(payment_rows(store)) == 2


def test_identical_transfers_of_one_transaction_pair_up_in_log_order(tmp_path):
    """One transaction pays the same invoice twice the same half (logs 3 and 4), re-mined at
    7 and 9: the first old payment takes 7, the second 9, both counted, no new row."""
    store = new_store(tmp_path)
    x = create(store)
    old = block(5)
    mined_then_reorged(store, [paying(x, 4, old, AMOUNT // 2), paying(x, 3, old, AMOUNT // 2)])
    first, second = [r["id"] for r in store.db.execute("SELECT id FROM payments ORDER BY log_key")]

    new = block(5, fork=1)
    store.apply_blocks(
        NET, [new], [paying(x, 9, new, AMOUNT // 2), paying(x, 7, new, AMOUNT // 2)], confirmed_through=2
    )
    got = store.get_invoice(x["id"])
    assert got["status"] == "paid" and got["exception"] is None
    by_id = {p["id"]: p for p in got["payments"]}
    assert set(by_id) == {first, second}
    assert (by_id[first]["log_index"], by_id[second]["log_index"]) == (7, 9)
    assert all(p["status"] == "detected" and p["role"] == "counted" for p in by_id.values())


def test_a_re_included_transaction_that_moves_another_amount_is_a_new_payment(tmp_path):
    """The same transaction re-included moves another amount (a token whose transfer depends
    on state): the old payment stays reverted and the new transfer is a payment of its own."""
    store = new_store(tmp_path)
    x = create(store)
    old = block(5)
    [old_id] = mined_then_reorged(store, [paying(x, 3, old)])

    new = block(5, fork=1)
    store.apply_blocks(NET, [new], [paying(x, 3, new, AMOUNT // 2)], confirmed_through=2)
    got = store.get_invoice(x["id"])
    by_id = {p["id"]: p for p in got["payments"]}
    assert len(by_id) == 2
    assert by_id[old_id]["status"] == "reverted" and by_id[old_id]["amount_atomic"] == str(AMOUNT)
    [fresh] = [p for pid, p in by_id.items() if pid != old_id]
    assert (fresh["status"], fresh["amount_atomic"], fresh["log_index"]) == ("detected", str(AMOUNT // 2), 3)
    assert fresh["block_hash"] == new.hash
    assert got["payment_summary"]["payment_state"] == "partial"


def test_router_payments_to_one_merchant_for_two_invoices_stay_with_their_invoices(tmp_path):
    """A router call pays two invoices to the same merchant, the same amount, in one
    transaction; re-mined with its logs shifted, each payment comes back to its own invoice."""
    store = new_store(tmp_path)
    a, b = create(store, rail="contract"), create(store, rail="contract")
    assert a["payment_options"][0]["destination_address"] == b["payment_options"][0]["destination_address"]
    old = block(5)
    mined_then_reorged(store, [paying(a, 1, old), paying(b, 3, old)])
    before = {r["invoice_id"]: r["id"] for r in payment_rows(store)}

    new = block(5, fork=1)
    store.apply_blocks(NET, [new], [paying(a, 3, new), paying(b, 5, new)], confirmed_through=2)
    assert len(payment_rows(store)) == 2
    for invoice, log_index in ((a, 3), (b, 5)):
        got = store.get_invoice(invoice["id"])
        [p] = got["payments"]
        assert (p["id"], p["log_index"], p["status"]) == (before[invoice["id"]], log_index, "detected")
        assert got["status"] == "paid" and got["exception"] is None


def test_a_live_payment_keeps_its_key_unique_but_a_reverted_one_does_not(tmp_path):
    """The table allows a reverted row and a live row at one (network, tx, log key) (a shift
    in progress) but never two live ones."""
    store = new_store(tmp_path)
    x, y = create(store), create(store)
    old = block(5)
    mined_then_reorged(store, [paying(x, 3, old)])
    new = block(5, fork=1)
    store.apply_blocks(NET, [new], [paying(y, 3, new)], confirmed_through=2)  # another transfer now at key 3
    assert sorted(r["status"] for r in payment_rows(store)) == ["detected", "reverted"]
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("UPDATE payments SET status = 'detected'")


def _old_database(path) -> None:
    """A database as the last release left it (before m003), with a payment in it."""
    db = Database(sqlite3.connect(path, isolation_level=None))
    migrations.apply(db, stop_before="m005_payment_identity")
    db.execute(
        "INSERT INTO invoices(id, status, amount, currency, metadata, tolerance_percent, payment_timing, "
        "payment_summary, request, version, created_at) "
        "VALUES ('inv_1', 'paid', '10', 'USD', '{}', '0', '{}', '{}', '{}', 3, '2026-01-01T00:00:00Z')"
    )
    db.execute(
        "INSERT INTO payment_options(id, invoice_id, position, rail, network, chain_id, asset, decimals, "
        "quoted_amount, quote_rate, amount_atomic, destination_address, payment_uri, required_confirmations) "
        "VALUES ('opt_1', 'inv_1', 0, 'address', 'testnet', 1, 'TUSD', 6, '10', '1', '10000000', '0x01', "
        "'uri', 3)"
    )
    db.execute(
        "INSERT INTO payments(id, network, tx_hash, log_index, log_key, invoice_id, option_id, asset, "
        "decimals, block_number, block_hash, block_timestamp, from_address, to_address, amount_atomic, "
        "status, role, observed_at) "
        f"VALUES ('pay_1', 'testnet', '{TX}', 3, 3, 'inv_1', 'opt_1', 'TUSD', 6, 5, '0x05', 1005, '{PAYER}', "
        f"'0x01', '{2**200}', 'detected', 'counted', '2026-01-01T00:00:00Z')"
    )
    db.close()


def test_the_migration_keeps_every_payment_and_index_and_moves_uniqueness_to_live_rows(tmp_path):
    path = tmp_path / "old.db"
    _old_database(path)
    before = sqlite3.connect(path)
    old_row = before.execute("SELECT * FROM payments").fetchall()
    # PRAGMA index_list: (seq, name, unique, origin, partial); origin "u" is a UNIQUE constraint.
    assert [r[3] for r in before.execute("PRAGMA index_list(payments)")].count(
        "u"
    ) == 1  # the table-wide UNIQUE
    before.close()

    store = Store(path, clock=lambda: 2_000.0)
    assert [tuple(r) for r in store.db.execute("SELECT * FROM payments")] == old_row
    columns = {r["name"]: r["type"] for r in store.db.execute("PRAGMA table_info(payments)")}
    assert columns["amount_atomic"] == "TEXT"
    indexes = {
        r["name"]: r["sql"]
        for r in store.db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='payments'"
        )
    }
    assert {"payments_invoice", "payments_unconfirmed", "payments_tx"} <= set(indexes)
    origins = {
        r["name"]: (r["origin"], r["partial"]) for r in store.db.execute("PRAGMA index_list(payments)")
    }
    assert "u" not in {origin for origin, _ in origins.values()}
    assert origins["payments_live_log"] == ("c", 1)
    assert "WHERE status != 'reverted'" in indexes["payments_live_log"]
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert store.get_invoice("inv_1")["payments"][0]["amount_atomic"] == str(2**200)
    # A reverted row and a live one may share the key now; two live ones may not.
    store.db.execute("UPDATE payments SET status = 'reverted'")
    store.db.execute(
        "INSERT INTO payments SELECT 'pay_2', network, tx_hash, log_index, log_key, invoice_id, option_id, "
        "asset, decimals, block_number, block_hash, block_timestamp, from_address, to_address, "
        "amount_atomic, 'detected', role, observed_at, confirmed_at FROM payments WHERE id = 'pay_1'"
    )
    with pytest.raises(sqlite3.IntegrityError):
        store.db.execute("UPDATE payments SET status = 'detected' WHERE id = 'pay_1'")
    store.close()
    Store(path, clock=lambda: 2_000.0).close()  # opened again: nothing left to migrate


def test_the_genesis_is_recorded_once_and_kept(tmp_path):
    store = new_store(tmp_path)
    assert store.genesis_hash(NET) is None
    assert store.remember_genesis(NET, "0xAB" + "00" * 31) == "0xab" + "00" * 31
    assert store.remember_genesis(NET, "0x" + "cd" * 32) == "0xab" + "00" * 31  # the first one stays
    store.close()
    store = new_store(tmp_path)
    assert store.genesis_hash(NET) == "0xab" + "00" * 31
    assert store.genesis_hash("other") is None
