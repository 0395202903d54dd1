"""The CSV export opened in a spreadsheet, whatever its locale: every field quoted, and nothing a
merchant's customer typed into an invoice field becomes a live formula, whether the file is
split on `,` (quotes honoured) or naively on `;` and line ends (a `;`-separated locale)."""

from __future__ import annotations

import csv
import io
import re

FORMULA = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")
EVIL = {
    "product_name": 'x;=HYPERLINK("http://evil";"click")',
    "merchant_reference": "\n=cmd|' /C calc'!A0",
    "customer_id": "\rcmd",
    "bill_to": "ok",
    "customer_email": "a@b.example",
}


async def export_text(h) -> str:
    async with h.http.get(
        h.base_url + "/v1/invoices/export", headers={"Authorization": f"Bearer {h.api_key}"}
    ) as r:
        assert r.status == 200
        return (await r.read()).decode()


async def test_every_field_is_quoted_and_no_locale_sees_a_formula(harness):
    plain = await harness.create(amount="1", product_name="Pro plan, monthly", merchant_reference="order_1")
    evil = await harness.create(amount="2", **EVIL)
    nul = await harness.create(amount="3", product_name="\0=1+1", merchant_reference="@SUM(A1);-2")
    text = await export_text(harness)

    # Every field, the header's and the empty ones too, is a quoted string.
    assert re.fullmatch(r'(?:"(?:[^"]|"")*"(?:,|\r\n))+', text), text[:300]

    # Read as a comma-separated file, the values come back with a leading apostrophe only.
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(text, newline=""))}
    assert rows[plain["id"]]["product_name"] == "Pro plan, monthly"
    assert rows[evil["id"]]["product_name"] == 'x;\'=HYPERLINK("http://evil";"click")'
    assert rows[evil["id"]]["merchant_reference"] == "'\n'=cmd|' /C calc'!A0"
    assert rows[evil["id"]]["customer_id"] == "'\rcmd"
    assert rows[nul["id"]]["product_name"] == "'\0=1+1"
    assert rows[nul["id"]]["merchant_reference"] == "'@SUM(A1);'-2"

    # Split the way a `;`-separated locale or a careless reader does: no piece is a formula.
    for piece in re.split(r"[;\r\n]", text):
        assert not piece.startswith(FORMULA), repr(piece)
    for row in csv.reader(io.StringIO(text, newline=""), delimiter=";"):
        for cell in row:
            assert not cell.startswith(FORMULA), repr(cell)
