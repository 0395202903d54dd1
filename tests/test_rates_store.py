"""The store's side of live prices: m008_live_rates gives older options a quote_source and a
quoted_at, and new options keep what the quote says."""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database

from watcher.domain import new_id, rfc3339
from watcher.store import Store
from watcher.store.schema import migrations

MADE_AT_MS = 1_767_225_600_123  # 2026-01-01T00:00:00.123Z


def _database_before_m008(path) -> tuple[str, str]:
    db = Database(sqlite3.connect(path, isolation_level=None))
    migrations.apply(db, stop_before="m008_live_rates")
    db.execute(
        "INSERT INTO invoices(id, status, amount, currency, metadata, tolerance_percent, "
        "payment_timing, payment_summary, request, version, created_at) VALUES ('inv_1', 'pending', "
        "'10', 'USD', '{}', '0', '{}', '{}', '{\"quote_rates\": {\"testnet:eth\": \"2000\"}}', 1, "
        "'2026-01-01T00:00:00Z')"
    )
    eth, tusd = new_id("opt", MADE_AT_MS), new_id("opt", MADE_AT_MS + 5000)
    for option_id, asset in ((eth, "ETH"), (tusd, "TUSD"), ("opt_odd", "TUSD")):
        db.execute(
            "INSERT INTO payment_options(id, invoice_id, position, rail, network, chain_id, asset, "
            "decimals, quoted_amount, quote_rate, amount_atomic, destination_address, payment_uri, "
            "required_confirmations) "
            f"VALUES ('{option_id}', 'inv_1', 0, 'address', 'testnet', 1, '{asset}', 6, '10', '1', '10', "
            f"'0x0{len(asset)}{option_id[-3:]}', 'uri', 3)"
        )
    db.close()
    return eth, tusd


def test_m008_tells_request_quotes_from_config_ones_and_dates_them_by_their_id(tmp_path):
    path = tmp_path / "old.db"
    eth, tusd = _database_before_m008(path)
    store = Store(path, clock=lambda: 2_000_000_000.0)
    options = {o["id"]: o for o in store.get_invoice("inv_1")["payment_options"]}
    assert options[eth]["quote_source"] == "request"  # named by network:SYMBOL, in any case
    assert options[tusd]["quote_source"] == "config"
    assert options[eth]["quoted_at"] == "2026-01-01T00:00:00Z"
    assert options[tusd]["quoted_at"] == rfc3339((MADE_AT_MS + 5000) / 1000) == "2026-01-01T00:00:05Z"
    assert options["opt_odd"]["quoted_at"] == "2026-01-01T00:00:00Z"  # not a ULID: the invoice's time
    store.close()
