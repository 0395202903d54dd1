"""The store's recording path alone: payments/s through `Store.apply_blocks`.

    python -m bench store [--payments N] [--step K] [--endpoints E] [--in-order] [--quick] [--profile-html F]
                          [--phases]

A store holds N open invoices (one address option each), and N transfers, one per invoice for
exactly its amount, each in a transaction of its own with a random hash (`tx_hash`), arrive in
steps of K payments, in an order unrelated to the one the invoices were made in, as a chain
brings them (`--in-order`: in theirs, each step's invoices
neighbours on the same pages, which writes far fewer pages: the figures before issue 13's
seventh round) (one block per step, confirmed in the same
step as a catch-up far below the head confirms them): each step records the payments, judges
their invoices, appends their events (payment_detected, paid, confirmed), and commits with
`synchronous=FULL`. Each endpoint then reads the events from its cursor: the dispatcher queues
a delivery per event per endpoint in transactions of its own, off the step (store/outbox.py);
that work is measured after the steps, per delivery.

The baseline, in the same run and on the same disk: the same rows (payments, invoice updates,
a status per invoice change and the events' own parts of the same sizes) written by bare
`executemany` into the same schema, one transaction per step. It is the floor any Python store
built on sqlite3 stands on.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import tempfile
import time
from decimal import Decimal
from pathlib import Path

from bench.chain import CACHE
from bench.measure import peak_rss_mb
from watcher.domain import BlockRef, Transfer
from watcher.store import Endpoint, MatchedTransfer, NewInvoice, OptionSpec, Store
from watcher.store.views import _checksum

NET = "benchnet"
TOKEN = "0x" + "aa" * 20
AMOUNT = 25_000_000  # 25.00 of a 6-decimals token


def _block(n: int) -> BlockRef:
    return BlockRef(n, f"0x{n:064x}", f"0x{n - 1:064x}", 1_700_000_000 + n)


def _new_invoice() -> NewInvoice:
    spec = OptionSpec(
        rail="address", network=NET, chain_id=1, asset="USDT", token_contract=TOKEN, decimals=6,
        quoted_amount="25", quote_rate="1", amount_atomic=AMOUNT, required_confirmations=1, xpub="xpub-bench",
    )  # fmt: skip
    return NewInvoice(
        amount=Decimal("25"),
        currency="USD",
        fields={"product_name": "bench"},
        metadata={"order": "x" * 40},
        tolerance_percent=Decimal(0),
        payment_timing={"mode": "immediate", "expires_after_minutes": 20, "payable_until": 4_000_000_000},
        payable_until=4_000_000_000,
        draft=False,
        request={},
        options=[spec],
    )


def prepare(path: Path, invoices: int, endpoints: int) -> tuple[Store, list[tuple[str, str]]]:
    """A store with `invoices` open invoices; returns it and (option id, address) of each. The
    store is made once per size and cached (bench/.cache), and each run works on a copy. "v2":
    made since options store their destination's checksum (m011); an older cached store would
    be migrated with none, and its steps would hash every recipient."""
    cached = CACHE / f"store-apply-v2-{invoices}.db"
    if not cached.exists():
        made, _ = _make(cached.with_suffix(".building"), invoices)
        made.close()  # checkpoints the WAL into the file
        cached.with_suffix(".building").rename(cached)
        _checksum.cache_clear()  # making the invoices checksummed their addresses: start as a new process
    shutil.copy(cached, path)
    store = Store(path, clock=time.time)
    store.outbox.set_endpoints(
        Endpoint(f"http://127.0.0.1:{9000 + i}/hook", ("*",)) for i in range(endpoints)
    )
    options = [
        (r["id"], r["destination_address"])
        for r in store.db.execute("SELECT id, destination_address FROM payment_options ORDER BY rowid")
    ]
    return store, options


def _make(path: Path, invoices: int) -> tuple[Store, list[tuple[str, str]]]:
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()
    store = Store(path, clock=time.time)
    options = []
    new = _new_invoice()
    for start in range(0, invoices, 1000):
        with store.db.atomic():
            for _ in range(min(1000, invoices - start)):
                invoice, _ = store.create_invoice(
                    new,
                    derive=lambda xpub, i: f"0x{i + 1:040x}",
                    finish=lambda s, d, i, o: (f"uri:{d}", None),
                )
                [option] = invoice["payment_options"]
                options.append((option["id"], option["destination_address"].lower()))
    # The creation events are not what is measured: start with an empty outbox.
    store.db.execute("DELETE FROM deliveries")
    store.db.execute("DELETE FROM events")
    return store, options


def tx_hash(n: int) -> str:
    """The n-th transfer's transaction hash: as random as a chain's, so the indexes on it
    (`payments_tx`, `payments_live_log`) are written where a chain's hashes would put them. Until
    the ninth round of issue 13 they were `0x…n`, in order, which wrote those indexes at their end
    only: 8% more payments/s at 50,000 than a chain's hashes give."""
    return "0x" + hashlib.sha256(n.to_bytes(8, "big")).hexdigest()


def steps(
    options: list[tuple[str, str]], step: int, first_block: int
) -> list[tuple[BlockRef, list[MatchedTransfer]]]:
    out = []
    for k, start in enumerate(range(0, len(options), step)):
        b = _block(first_block + k)
        matched = [
            MatchedTransfer(
                Transfer(tx_hash(start + i), 0, b.number, b.hash, TOKEN, "0x" + "bb" * 20, address, AMOUNT),
                option_id,
                b.timestamp,
            )
            for i, (option_id, address) in enumerate(options[start : start + step])
        ]
        out.append((b, matched))
    return out


def run_store(store: Store, work: list[tuple[BlockRef, list[MatchedTransfer]]]) -> dict:
    payments = events = 0
    cpu_started = time.process_time()
    started = time.perf_counter()
    longest = 0.0
    for b, matched in work:
        t0 = time.perf_counter()
        result = store.apply_blocks(NET, [b], matched, confirmed_through=b.number, keep_above=b.number - 256)
        longest = max(longest, time.perf_counter() - t0)
        payments += result.payments_added
        events += result.events
    # The last step's WAL checkpoint, which runs beside the next step, counts too.
    assert store.wait_for_checkpoints(60)
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {"wall_s": wall, "cpu_s": cpu, "payments": payments, "events": events, "longest_step_s": longest}


def run_queuing(store: Store) -> dict:
    """The dispatcher's queuing of the deliveries of every event the steps appended."""
    cpu_started = time.process_time()
    started = time.perf_counter()
    store.outbox.queue_all()
    deliveries = store.db.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "deliveries": deliveries,
    }


def run_floor(store: Store, work: list[tuple[BlockRef, list[MatchedTransfer]]]) -> dict:
    """The same rows by bare executemany: what sqlite3 itself costs."""
    conn = store.db.conn
    conn.execute("PRAGMA wal_autocheckpoint=1000")  # SQLite's default, which the steps' connection left
    # Rows of the sizes the watcher wrote: an invoice's status, stored once for the events of
    # its change, and each event's own part (its payment).
    status_size, payment_size = (
        int(conn.execute(f"SELECT AVG(LENGTH(body)) FROM {table}").fetchone()[0] or 0)
        for table in ("event_statuses", "events")
    )
    status = os.urandom(status_size // 2).hex().encode()
    payment = os.urandom(payment_size // 2).hex().encode()
    first_status = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM event_statuses").fetchone()[0]
    invoice_of = dict(conn.execute("SELECT id, invoice_id FROM payment_options").fetchall())
    cpu_started = time.process_time()
    started = time.perf_counter()
    n = 0
    for b, matched in work:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO payments(id, network, tx_hash, log_index, log_key, invoice_id, option_id, asset, "
            "decimals, block_number, block_hash, block_timestamp, from_address, to_address, amount_atomic, "
            "status, role, observed_at, confirmed_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?, 'confirmed', 'counted', ?, ?)",
            [
                (f"floor{n + i}", NET, m.transfer.tx_hash + "f", 0, "k", invoice_of[m.option_id], m.option_id,
                 "USDT", 6, b.number, b.hash, b.timestamp, m.transfer.from_address, m.transfer.to_address,
                 str(AMOUNT), "now", "now")
                for i, m in enumerate(matched)
            ],
        )  # fmt: skip
        conn.executemany(
            "UPDATE invoices SET status = 'confirmed', payment_summary = ?, version = version + 1 WHERE id "
            "= ?",
            [("{}", invoice_of[m.option_id]) for m in matched],
        )
        conn.executemany(
            "INSERT INTO event_statuses(id, body) VALUES (?,?)",
            [(first_status + n + i, status) for i in range(len(matched))],
        )
        events = [
            (f"fevt{n}-{i}-{k}", "invoice.x", invoice_of[m.option_id], "now", payment, first_status + n + i)
            for i, m in enumerate(matched)
            for k in range(3)
        ]
        conn.executemany(
            "INSERT INTO events(id, type, invoice_id, created_at, body, status_id) VALUES (?,?,?,?,?,?)",
            events,
        )
        conn.execute("COMMIT")
        n += len(matched)
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "payments": n,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench store")
    parser.add_argument("--payments", type=int, default=20_000)
    parser.add_argument("--step", type=int, default=5_000)
    parser.add_argument("--endpoints", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="5,000 payments in steps of 2,500")
    parser.add_argument(
        "--in-order",
        action="store_true",
        help="payments in the order the invoices were made in, not shuffled as a chain brings them",
    )
    parser.add_argument(
        "--profile-html", help="write a pyinstrument profile of the store run to this HTML file"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="time each phase of the steps (reads, judging, writes, COMMIT) and what judging on "
        "another core would cost in shipping (bench/store_phases.py); slower than a plain run",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.payments, args.step = 5_000, 2_500
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        t0 = time.perf_counter()
        store, options = prepare(Path(tmp) / "w.db", args.payments, args.endpoints)
        print(
            f"== store: {args.payments:,} invoices made in {time.perf_counter() - t0:.1f} s; steps of "
            f"{args.step:,}"
        )
        if not args.in_order:
            random.Random(13).shuffle(options)
        work = steps(options, args.step, 100)
        if args.profile_html:
            from pyinstrument import Profiler

            with Profiler() as profiler:
                result = run_store(store, work)
            Path(args.profile_html).write_text(profiler.output_html())
            print(profiler.output_text(unicode=False, color=False, show_all=False)[:6000])
        elif args.phases:
            from bench.store_phases import phases_timed, report

            with phases_timed() as clock:
                result = run_store(store, work)
            report(clock, result["payments"])
        else:
            result = run_store(store, work)
        queuing = run_queuing(store)
        floor = run_floor(store, steps(options, args.step, 10_000))
        store.close()
    rate = result["payments"] / result["wall_s"]
    floor_rate = floor["payments"] / floor["wall_s"]
    print(
        f"watcher: {result['payments']:,} payments, {result['events']:,} events in {result['wall_s']:.2f} s: "
        f"{rate:,.0f} payments/s; CPU {result['cpu_s'] / result['payments'] * 1e6:.0f} us a payment; "
        f"longest step {result['longest_step_s'] * 1000:.0f} ms; peak RSS {peak_rss_mb():.0f} MB"
    )
    if queuing["deliveries"]:
        print(
            f"then the dispatcher queues their {queuing['deliveries']:,} deliveries ({args.endpoints} "
            f"endpoint(s)), off the steps: {queuing['wall_s']:.2f} s, "
            f"CPU {queuing['cpu_s'] / queuing['deliveries'] * 1e6:.1f} us a delivery"
        )
    print(
        f"floor (bare executemany, same rows, same run): {floor_rate:,.0f} payments/s; "
        f"CPU {floor['cpu_s'] / floor['payments'] * 1e6:.0f} us a payment; "
        f"watcher/floor {rate / floor_rate:.2f}"
    )
    print(f"goal: >= 10,000 payments/s: {'met' if rate >= 10_000 else 'not met'}")


if __name__ == "__main__":
    main()
