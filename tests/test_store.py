"""The store on its own: exact uint256 amounts, one row per transfer, one transaction per change."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest

from watcher.domain import BlockRef, Transfer
from watcher.invoicing import finish_option
from watcher.store import MatchedTransfer, NewInvoice, OptionSpec, Store
from watcher.store.views import status_view

NET = "testnet"
TOKEN = "0x" + "aa" * 20
HUGE = 2**200 + 12345  # far beyond SQLite's 64-bit INTEGER


def block(n: int, ts: int = 1_000) -> BlockRef:
    return BlockRef(n, f"0x{n:064x}", f"0x{n - 1:064x}", ts + n)


def new_store(tmp_path) -> Store:
    return Store(tmp_path / "w.db", clock=lambda: 1_000.0)


def create(store: Store, amount_atomic: int = HUGE) -> dict:
    spec = OptionSpec(
        rail="address",
        network=NET,
        chain_id=1,
        asset="BIG",
        token_contract=TOKEN,
        decimals=18,
        quoted_amount="x",
        quote_rate="1",
        amount_atomic=amount_atomic,
        required_confirmations=2,
        xpub="xpub-test",
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
    invoice, created = store.create_invoice(
        new, derive=lambda xpub, index: f"0x{index + 1:040x}", finish=lambda s, d, i, o: (f"uri:{d}", None)
    )
    assert created
    return invoice


def transfer_to(
    invoice: dict, amount: int, *, tx: str = "0x" + "11" * 32, log_index: int = 0, n: int = 5
) -> MatchedTransfer:
    option = invoice["payment_options"][0]
    t = Transfer(
        tx,
        log_index,
        n,
        block(n).hash,
        TOKEN,
        "0x" + "bb" * 20,
        option["destination_address"].lower(),
        amount,
    )
    return MatchedTransfer(t, option["id"], block(n).timestamp)


def test_amounts_beyond_64_bits_are_stored_and_read_exactly(tmp_path):
    store = new_store(tmp_path)
    invoice = create(store)
    assert invoice["payment_options"][0]["amount_atomic"] == str(HUGE)
    store.apply_blocks(NET, [block(5)], [transfer_to(invoice, HUGE)], confirmed_through=3)
    got = store.get_invoice(invoice["id"])
    assert got["payments"][0]["amount_atomic"] == str(HUGE)
    assert got["status"] == "paid"
    column_types = {r["name"]: r["type"] for r in store.db.execute("PRAGMA table_info(payments)").fetchall()}
    assert column_types["amount_atomic"] == "TEXT"
    raw = store.db.execute("SELECT amount_atomic, typeof(amount_atomic) AS t FROM payments").fetchone()
    assert (raw["amount_atomic"], raw["t"]) == (str(HUGE), "text")


def test_the_same_transfer_seen_twice_is_one_payment(tmp_path):
    store = new_store(tmp_path)
    invoice = create(store)
    m = transfer_to(invoice, 5)
    first = store.apply_blocks(NET, [block(5)], [m], confirmed_through=3)
    again = store.apply_blocks(NET, [block(5)], [m], confirmed_through=3)
    assert (first.payments_added, again.payments_added) == (1, 0)
    assert len(store.get_payments(invoice["id"])) == 1
    events = [e["type"] for e in store.outbox.events_for(invoice["id"])]
    assert events.count("invoice.payment_detected") == 1


def test_a_failing_change_writes_nothing(tmp_path):
    store = new_store(tmp_path)
    invoice = create(store)
    events_before = store.outbox.events_for(invoice["id"])
    good = transfer_to(invoice, 5)
    broken = MatchedTransfer(good.transfer, "opt_does_not_exist", good.block_timestamp)
    with pytest.raises(LookupError, match="opt_does_not_exist"):
        store.apply_blocks(NET, [block(5)], [broken], confirmed_through=3)
    assert store.cursor(NET) is None
    assert store.recent_blocks(NET) == []
    assert store.get_payments(invoice["id"]) == []
    assert store.outbox.events_for(invoice["id"]) == events_before


def test_deposit_indexes_are_never_reused_and_survive_reopening(tmp_path):
    store = new_store(tmp_path)
    a, b = create(store), create(store)
    store.close()
    store = new_store(tmp_path)  # migrations run again: nothing to do, data kept
    c = create(store)
    rows = store.db.execute("SELECT derivation_index FROM payment_options ORDER BY rowid").fetchall()
    assert [r["derivation_index"] for r in rows] == [0, 1, 2]
    assert (
        len(
            {
                a["payment_options"][0]["destination_address"],
                b["payment_options"][0]["destination_address"],
                c["payment_options"][0]["destination_address"],
            }
        )
        == 3
    )


def test_revert_marks_orphaned_payments_and_rejudges(tmp_path):
    store = new_store(tmp_path)
    invoice = create(store, amount_atomic=10)
    store.apply_blocks(NET, [block(4)], [], confirmed_through=2)
    store.apply_blocks(NET, [block(5)], [transfer_to(invoice, 10)], confirmed_through=3)
    assert store.get_invoice(invoice["id"])["status"] == "paid"
    reverted = store.revert_to(NET, block(4))
    assert len(reverted) == 1
    got = store.get_invoice(invoice["id"])
    assert got["status"] == "pending"
    assert got["payments"][0]["status"] == "reverted"
    assert store.cursor(NET).number == 4
    types = [e["type"] for e in store.outbox.events_for(invoice["id"])]
    assert types[-1] == "invoice.payment_reverted"


def test_finish_option_builds_eip681_uris():
    spec = OptionSpec(
        "address", NET, 1, "USDT", "0xdac17f958d2ee523a2206206994597c13d831ec7", 6, "1", "1", 1_000_000, 12
    )
    uri, call = finish_option(spec, "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266", "inv_x", "opt_y")
    assert uri == (
        "ethereum:0xdAC17F958D2ee523a2206206994597C13D831ec7@1/transfer"
        "?address=0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266&uint256=1000000"
    )
    assert call is None


def test_resolving_one_of_two_open_exceptions_reports_it_and_shows_the_other(tmp_path):
    from watcher.domain import ResolutionAction

    store = new_store(tmp_path)
    invoice = create(store, amount_atomic=10)
    store.apply_blocks(NET, [block(5)], [transfer_to(invoice, 15, tx="0x" + "01" * 32)], confirmed_through=3)
    store.apply_blocks(
        NET, [block(6)], [transfer_to(invoice, 5, tx="0x" + "02" * 32, n=6)], confirmed_through=4
    )
    got = store.get_invoice(invoice["id"])
    assert [p["role"] for p in got["payments"]] == ["counted", "duplicate"]
    assert got["exception"]["type"] == "duplicate_payment"
    types = [e["type"] for e in store.outbox.events_for(invoice["id"])]
    assert types.count("invoice.exception_opened") == 2  # overpaid, then the duplicate

    after = store.resolve_exception(
        invoice["id"], ResolutionAction.MARK_DUPLICATE_PAYMENT_REVIEWED, "refunded"
    )
    assert after["exception"] == {
        "type": "overpaid",
        "status": "open",
        "resolution_action": None,
        "resolution_note": None,
        "resolved_at": None,
    }
    last = store.resolve_exception(invoice["id"], ResolutionAction.ACCEPT_OVERPAYMENT, None)
    assert (
        last["exception"]["status"] == "resolved"
        and last["exception"]["resolution_action"] == "accept_overpayment"
    )
    types = [e["type"] for e in store.outbox.events_for(invoice["id"])]
    assert types[-2:] == ["invoice.exception_resolved", "invoice.exception_resolved"]
    assert types.count("invoice.exception_opened") == 2
    with pytest.raises(Exception, match="no open exception"):
        store.resolve_exception(invoice["id"], ResolutionAction.OTHER, None)


def test_search_finds_payers_old_addresses_hashes_and_casefolded_text_in_one_stored_column(tmp_path):
    from watcher.domain import InvoiceStatus
    from watcher.store import NewSession

    store = new_store(tmp_path)
    other = create(store)
    spec = OptionSpec("address", NET, 1, "BIG", TOKEN, 18, "x", "1", 10, 2, xpub="xpub-test")
    new = NewInvoice(
        amount=Decimal("10"),
        currency="USD",
        fields={"product_name": "Straße", "merchant_reference": "abc", "bill_to": "def"},
        metadata={},
        tolerance_percent=Decimal(0),
        payment_timing={"mode": "immediate", "expires_after_minutes": 20, "payable_until": None},
        payable_until=10**10,
        draft=False,
        request={},
        options=[spec],
    )
    derive, finish = (lambda xpub, index: f"0x{index + 1:040x}"), (lambda s, d, i, o: (f"uri:{d}", None))
    invoice, _ = store.create_invoice(new, derive=derive, finish=finish)
    old_address = invoice["payment_options"][0]["destination_address"].lower()
    # A new checkout session: the first address is no longer offered, but still finds the invoice.
    invoice = store.start_session(
        invoice["id"],
        from_statuses=(InvoiceStatus.PENDING,),
        derive=derive,
        finish=finish,
        plan=lambda row: NewSession([spec], {"mode": "immediate", "payable_until": 10**10}, 10**10, {}),
    )
    assert old_address not in {o["destination_address"].lower() for o in invoice["payment_options"]}
    tx, payer = "0x" + "5e" * 32, "0x" + "c0ffee" * 6 + "abcd"
    t = Transfer(
        tx,
        0,
        5,
        block(5).hash,
        TOKEN,
        payer,
        invoice["payment_options"][0]["destination_address"].lower(),
        10,
    )
    store.apply_blocks(
        NET,
        [block(5)],
        [MatchedTransfer(t, invoice["payment_options"][0]["id"], block(5).timestamp)],
        confirmed_through=3,
    )

    def found(needle: str) -> list[str]:
        data, total = store.list_invoices({"search": needle}, 50, 0)
        assert total == len(data)
        return [i["id"] for i in data]

    assert (
        "strasse".casefold() == "straße".casefold() != "straße".lower()
    )  # Unicode case folding, not lower()
    for needle in (
        payer,
        payer.upper()[2:],
        old_address,
        old_address.upper(),
        tx,
        tx.upper(),
        "5E5E5E",
        "STRASSE",
        "straße",
        "STRAẞE",
        invoice["id"].upper(),
    ):
        assert found(needle) == [invoice["id"]], needle
    assert found(other["id"]) == [other["id"]]
    assert store.list_invoices({"search": "STRASSE"}, 50, 1) == ([], 1)  # a page past the end still counts
    # Literal: '%' and '_' are no wildcards; and no match runs across two fields.
    for needle in ("%", "str%", "s_rasse", "abcdef", "abc\x1fdef", "\x00"):
        assert found(needle) == [], needle
    assert store.invoice_stats({"search": "STRASSE"})["total"] == 1
    assert [r["id"] for chunk in store.export_rows({"search": payer}, 10, 0) for r in chunk] == [
        invoice["id"]
    ]


def test_the_status_read_from_the_row_is_the_status_of_the_whole_invoice(tmp_path):
    """The status route and the events render the status without the options (views.status_of):
    it must be the same shape, to the byte, as the whole invoice's status fields, in every state."""
    store = new_store(tmp_path)
    unpaid, under, paid = create(store), create(store), create(store, amount_atomic=7)
    store.apply_blocks(NET, [block(5)], [transfer_to(under, 3, tx="0x" + "22" * 32)], confirmed_through=3)
    store.apply_blocks(NET, [block(6)], [transfer_to(paid, 7, tx="0x" + "33" * 32, n=6)], confirmed_through=6)
    states = set()
    for invoice in (unpaid, under, paid):
        whole = store.get_invoice(invoice["id"])
        status = store.get_status(invoice["id"])
        assert orjson.dumps(status) == orjson.dumps(status_view(whole))
        states.add((whole["status"], len(whole["payments"]), whole["confirmations"]))
    assert states == {("pending", 0, 0), ("pending", 1, 2), ("confirmed", 1, 1)}
    # and what the events carry is that same status, as the invoice stood when it was written
    last = store.outbox.events_for(paid["id"])[-1]
    assert orjson.loads(last["body"])["data"]["invoice"] == status_view(store.get_invoice(paid["id"]))
    assert store.get_status("inv_nope") is None


def _last_status_bytes(store: Store, invoice_id: str) -> bytes:
    row = store.db.execute(
        "SELECT s.body FROM events e JOIN event_statuses s ON s.id = e.status_id WHERE e.invoice_id = ? "
        "ORDER BY e.seq DESC LIMIT 1",
        [invoice_id],
    ).fetchone()
    return bytes(row[0])


def test_each_events_status_is_the_invoices_status_to_the_byte_in_every_state(tmp_path):
    """A step puts the status its events carry together from parts already rendered
    (views.status_json): after each change it must be, byte for byte, what the API renders
    for the invoice then (orjson of its status view): paid, confirmed, underway, overpaid with
    a duplicate (an open exception), one resolved, a payment reverted."""
    from watcher.domain import ResolutionAction

    store = new_store(tmp_path)
    partial, exact, over = create(store, amount_atomic=10), create(store, amount_atomic=10), create(store, 10)
    seen: set[tuple] = set()

    def check(*invoices: dict) -> None:
        for invoice in invoices:
            whole = store.get_invoice(invoice["id"])
            assert _last_status_bytes(store, invoice["id"]) == orjson.dumps(status_view(whole))
            seen.add((whole["status"], (whole["exception"] or {}).get("status")))

    store.apply_blocks(
        NET,
        [block(5)],
        [
            transfer_to(partial, 4, tx="0x" + "01" * 32),
            transfer_to(exact, 10, tx="0x" + "02" * 32),
            transfer_to(over, 15, tx="0x" + "03" * 32),
        ],
        confirmed_through=3,
    )
    check(partial, exact, over)
    store.apply_blocks(NET, [block(6)], [transfer_to(over, 5, tx="0x" + "04" * 32, n=6)], confirmed_through=5)
    check(exact, over)
    store.resolve_exception(over["id"], ResolutionAction.MARK_DUPLICATE_PAYMENT_REVIEWED, "refunded \u2603")
    store.resolve_exception(over["id"], ResolutionAction.ACCEPT_OVERPAYMENT, None)
    check(over)
    store.revert_to(NET, block(4))
    check(partial, exact, over)
    assert seen >= {
        ("pending", None),
        ("paid", None),
        ("confirmed", None),
        ("paid", "open"),
        ("pending", "resolved"),
    }


def test_the_status_put_together_from_its_parts_is_orjsons_rendering_of_it() -> None:
    """views.status_json against orjson.dumps(views.status_of(...)): a payment timing stored with
    other spacing is rendered as orjson renders it, and a status of no payments, of several,
    and of a resolved exception hold the same bytes."""
    from watcher.store.views import status_json, status_of

    summary = orjson.dumps({"payment_state": "partial", "received_amount": "1.5"}).decode()
    exception = orjson.dumps(
        {"type": "overpaid", "status": "resolved", "resolution_note": '\u00e9"x'}
    ).decode()
    payments = [
        {"id": "pay_a", "role": "counted", "status": "confirmed", "confirmations": 3, "amount": "1"},
        {"id": "pay_b", "role": "duplicate", "status": "reverted", "confirmations": 0, "amount": "2"},
    ]
    for row_exception, views in ((None, []), (exception, payments[:1]), (exception, payments)):
        row = {
            "id": "inv_1", "status": "paid", "payment_summary": summary, "exception": row_exception,
            "payment_timing": '{"mode": "immediate",  "payable_until": 12}',
            "last_payment_observed_at": None if not views else "2026-01-01T00:00:00Z", "version": 7,
        }  # fmt: skip
        assert status_json(row, views, [orjson.dumps(v) for v in views]) == orjson.dumps(
            status_of(row, views)
        )


def test_a_change_writes_only_the_judged_columns_whose_value_changed(tmp_path):
    """Judging writes the invoice columns that changed, not all of them: a column in an UPDATE's
    SET list has its indexes' entries rewritten even when its value stays (`invoices_exception`
    on exception_type and exception_status, 3 us an invoice in `bench store`). A trigger on
    those columns sees which statements named them."""
    store = new_store(tmp_path)
    exact, over = create(store, amount_atomic=10), create(store, amount_atomic=10)
    store.db.execute("CREATE TEMP TABLE named (invoice_id TEXT)")
    store.db.execute(
        "CREATE TEMP TRIGGER exception_named AFTER UPDATE OF exception_type, exception_status, "
        "open_exceptions ON invoices BEGIN INSERT INTO named VALUES (new.id); END"
    )
    store.apply_blocks(
        NET,
        [block(5)],
        [transfer_to(exact, 10, tx="0x" + "01" * 32), transfer_to(over, 15, tx="0x" + "02" * 32)],
        confirmed_through=3,
    )
    assert store.get_invoice(exact["id"])["status"] == "paid"
    assert store.get_invoice(over["id"])["exception"]["type"] == "overpaid"
    assert [r[0] for r in store.db.execute("SELECT invoice_id FROM named")] == [over["id"]]
    store.apply_blocks(NET, [block(6)], [], confirmed_through=6)  # both confirmed: no exception changes
    assert store.get_invoice(exact["id"])["status"] == "confirmed"
    assert [r[0] for r in store.db.execute("SELECT invoice_id FROM named")] == [over["id"]]


def test_a_step_renders_its_recipients_from_the_checksums_their_options_stored(tmp_path, monkeypatch):
    """An option stores its destination's EIP-55 form when it is made (m011), and a step renders
    its payments' recipients from it: no keccak per new deposit address (only the payer's, once).
    An option from before the migration (no stored form) is checksummed when rendered, as
    before, and both show the same addresses as the API."""
    from watcher.keccak import keccak
    from watcher.store import views

    store = new_store(tmp_path)
    invoices = [create(store, amount_atomic=10) for _ in range(4)]
    store.db.execute(
        "UPDATE payment_options SET destination_checksum = NULL WHERE invoice_id = ?", [invoices[3]["id"]]
    )
    stored = store.db.execute(
        "SELECT destination_address, destination_checksum FROM payment_options"
    ).fetchall()
    assert [views.checksum(a) for a, c in stored if c is not None] == [c for a, c in stored if c is not None]
    hashed: list[bytes] = []

    def counting(data: bytes) -> bytes:
        hashed.append(data)
        return keccak(data)

    views._checksum.cache_clear()
    monkeypatch.setattr(views, "keccak", counting)
    paying = [
        transfer_to(inv, 10, tx=f"0x{k + 1:064x}") for k, inv in enumerate(invoices)
    ]  # one payer, four recipients
    store.apply_blocks(NET, [block(5)], paying, confirmed_through=5)
    old_option = invoices[3]["payment_options"][0]["destination_address"].lower()
    assert sorted(hashed) == sorted([b"bb" * 20, old_option[2:].encode()])  # the payer; the old option
    for invoice in invoices:
        [event] = [
            e for e in store.outbox.events_for(invoice["id"]) if e["type"] == "invoice.payment_detected"
        ]
        payment = orjson.loads(event["body"])["data"]["payment"]
        assert payment["to_address"] == invoice["payment_options"][0]["destination_address"]
        assert payment["to_address"] == views.checksum(payment["to_address"].lower())
        assert payment == store.get_invoice(invoice["id"])["payments"][0]


def _paying(invoices: list[dict], b: BlockRef, first_tx: int) -> list[MatchedTransfer]:
    """A transfer of 1000 to each invoice's first option, one transaction each, in block `b`."""
    return [
        MatchedTransfer(
            Transfer(f"0x{first_tx + k:064x}", 0, b.number, b.hash, TOKEN, "0x" + "bb" * 20,
                     inv["payment_options"][0]["destination_address"], 1000),
            inv["payment_options"][0]["id"],
            b.timestamp,
        )
        for k, inv in enumerate(invoices)
    ]  # fmt: skip


def _collector_seen_by(monkeypatch, module, name: str) -> list[bool]:
    """Whether the cyclic collector was on at each call of `module.name` (wrapped, still run)."""
    import gc

    seen: list[bool] = []
    real = getattr(module, name)

    def watching(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, watching)
    return seen


def _assert_collector_on_after_a_failing_step(store, monkeypatch, module, name: str, number: int) -> None:
    """A large step whose `module.name` raises rolls back whole and leaves the collector on."""
    import gc

    def failing(*args, **kwargs):
        raise RuntimeError(f"{name} failed")

    more = [create(store, amount_atomic=1000) for _ in range(150)]
    monkeypatch.setattr(module, name, failing)
    with pytest.raises(RuntimeError):
        store.apply_blocks(
            NET, [block(number)], _paying(more, block(number), number * 1000), confirmed_through=number
        )
    assert gc.isenabled()
    assert store.get_invoice(more[0]["id"])["status"] == "pending"  # the step rolled back


def test_a_large_step_judges_with_the_collector_paused_and_turns_it_back_on(tmp_path, monkeypatch) -> None:
    """Judging 150 invoices in a step runs with Python's cyclic collector off (its passes find
    nothing among the step's rows and views, and cost a tenth of the store's CPU), and the
    collector is on again afterwards, even when the step fails; a small change leaves it alone."""
    import gc

    from watcher.store import rejudge

    store = new_store(tmp_path)
    invoices = [create(store, amount_atomic=1000) for _ in range(150)]
    seen = _collector_seen_by(monkeypatch, rejudge, "_rejudge_slice")
    assert gc.isenabled()
    result = store.apply_blocks(NET, [block(5)], _paying(invoices, block(5), 0), confirmed_through=5)
    assert result.payments_added == 150 and result.invoices_changed == 150
    assert seen == [False] and gc.isenabled()
    # Changes of one invoice (the API's) keep the collector on.
    seen.clear()
    store.cancel_invoice(create(store)["id"])
    assert seen == [True, True] and gc.isenabled()  # its creation and its cancellation
    _assert_collector_on_after_a_failing_step(store, monkeypatch, rejudge, "_rejudge_slice", number=6)


def test_a_large_step_records_with_the_collector_paused_and_turns_it_back_on(tmp_path, monkeypatch) -> None:
    """Recording a step of more than 100 transfers (its plan, its rows) runs with the cyclic
    collector off too, not only its judging; a step of one transfer leaves it on; it is on
    again after either, and after a step that fails while recording."""
    import gc

    from watcher.store import recording

    store = new_store(tmp_path)
    invoices = [create(store, amount_atomic=1000) for _ in range(151)]
    seen = _collector_seen_by(monkeypatch, recording, "plan_recording")
    assert gc.isenabled()
    store.apply_blocks(NET, [block(5)], _paying(invoices[:150], block(5), 0), confirmed_through=5)
    assert seen == [False] and gc.isenabled()
    store.apply_blocks(NET, [block(6)], _paying(invoices[150:], block(6), 500), confirmed_through=6)
    assert seen == [False, True] and gc.isenabled()
    _assert_collector_on_after_a_failing_step(store, monkeypatch, recording, "plan_recording", number=7)


def test_finding_a_steps_stored_payments_does_not_read_the_whole_chain(tmp_path) -> None:
    """Which of a step's transactions are already payments is read by their hashes: the work
    (SQLite's VM instructions) for one transaction is the same over 10 or 400 stored payments.
    With the network in the statement, SQLite took the index that starts with the network and
    read every payment recorded on the chain, at every step."""
    from watcher.store import recording

    store = new_store(tmp_path)
    invoices = [create(store, amount_atomic=1000) for _ in range(400)]
    conn = store.db.conn

    def instructions(tx_hash: str) -> int:
        count = [0]

        def tick() -> int:
            count[0] += 1
            return 0

        conn.set_progress_handler(tick, 10)
        try:
            found = recording.read_existing(conn, NET, [tx_hash])
        finally:
            conn.set_progress_handler(None, 10)
        assert [r["tx_hash"] for rows in found.values() for r in rows] == [tx_hash]
        assert recording.read_existing(conn, "othernet", [tx_hash]) == {}  # by network still
        return count[0]

    store.apply_blocks(NET, [block(5)], _paying(invoices[:10], block(5), 0), confirmed_through=5)
    few = instructions(f"0x{3:064x}")
    store.apply_blocks(NET, [block(6)], _paying(invoices[10:], block(6), 10), confirmed_through=6)
    many = instructions(f"0x{3:064x}")
    assert many <= few + 5, (few, many)


def test_a_reorg_reverts_the_payments_above_the_ancestor_without_reading_the_older_ones(tmp_path) -> None:
    """Undoing a reorg reads the live payments above the common ancestor by the index, however
    many older payments the chain has (SQLite's VM instructions counted): with "status !=
    'reverted'" it walked every payment of the network. Each status is reverted as before."""
    store = new_store(tmp_path)
    invoices = [create(store, amount_atomic=1000) for _ in range(401)]
    conn = store.db.conn

    def revert_counting(ancestor: BlockRef) -> tuple[list[str], int]:
        """The ids reverted, and the instructions of the statement that finds them."""
        count = [0]
        current = [""]

        def tick() -> int:
            count[0] += current[0].startswith("UPDATE payments SET status = 'reverted'")
            return 0

        conn.set_trace_callback(lambda sql: current.__setitem__(0, sql))
        conn.set_progress_handler(tick, 1)
        try:
            return store.revert_to(NET, ancestor), count[0]
        finally:
            conn.set_progress_handler(None, 1)
            conn.set_trace_callback(None)

    store.apply_blocks(NET, [block(5)], _paying(invoices[:1], block(5), 0), confirmed_through=5)
    store.apply_blocks(NET, [block(6)], _paying(invoices[1:2], block(6), 1), confirmed_through=5)
    assert {r[0] for r in conn.execute("SELECT status FROM payments")} == {"confirmed", "detected"}
    reverted, few = revert_counting(block(4))
    assert len(reverted) == 2  # the confirmed one and the detected one
    store.apply_blocks(NET, [block(5)], _paying(invoices[2:400], block(5), 2), confirmed_through=5)
    store.apply_blocks(NET, [block(6)], _paying(invoices[400:], block(6), 400), confirmed_through=5)
    reverted, many = revert_counting(block(5))
    assert len(reverted) == 1  # the detected one above block 5; the 398 below it stay
    assert conn.execute("SELECT COUNT(*) FROM payments WHERE status = 'confirmed'").fetchone()[0] == 398
    assert many <= few * 3, (few, many)


@pytest.mark.parametrize(
    ("invoiced", "paid", "confirmed_through", "status", "events"),
    [
        (10, 10, 3, "paid", ["invoice.payment_detected", "invoice.paid"]),
        (10, 10, 5, "confirmed", ["invoice.payment_detected", "invoice.paid", "invoice.confirmed"]),
        (10, 4, 5, "pending", ["invoice.payment_detected"]),
        (10, 15, 3, "paid", ["invoice.payment_detected", "invoice.paid", "invoice.exception_opened"]),
    ],
)
def test_a_slice_is_judged_apart_from_its_reads_and_writes(
    tmp_path, invoiced, paid, confirmed_through, status, events
) -> None:
    """A step's slice is read (`read_batch`), judged (`judge_slice`, which is given no connection:
    the same batch judges the same way every time) and written (`write_slice`): what is stored
    and queued is what was judged. Each of the three is measured alone by `bench store --phases`."""
    from watcher.store import rejudge

    store = new_store(tmp_path)
    invoice = create(store, amount_atomic=invoiced)
    conn = store.db.conn
    now = store._now()
    with store.db.atomic():
        store._move_checkpoint(conn, NET, [block(5)], None, now)
        plan = store._record(conn, NET, [transfer_to(invoice, paid)], now, confirmed_through)
        [(payment_id, invoice_id)] = plan.recorded
        ids = [invoice_id]
        reasons = {invoice_id: rejudge.Reasons(new_payments=[payment_id])}
        batch = rejudge.read_batch(conn, ids)
        written_before = conn.total_changes
        judged = rejudge.judge_slice(batch, ids, reasons, now, store._tips())
        assert rejudge.judge_slice(batch, ids, reasons, now, store._tips()) == judged
        assert conn.total_changes == written_before
        assert judged.changed == 1
        assert [e.type for e in judged.events] == events
        [[*_, invoice_written]] = next(iter(judged.invoice_rows.values()))
        assert invoice_written == invoice_id
        rejudge.write_slice(conn, store.outbox, judged)
    stored = store.get_invoice(invoice_id)
    assert stored["status"] == status
    queued = store.db.execute("SELECT type FROM events WHERE invoice_id = ? ORDER BY seq", [invoice_id])
    assert [r[0] for r in queued] == ["invoice.created", *events]
