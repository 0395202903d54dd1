"""/openapi.json describes exactly the routes the server has, and real answers fit it."""

from __future__ import annotations

from openapi_spec_validator import validate

from watcher.schemas import Invoice, InvoiceStats


def _routes(app) -> set[tuple[str, str]]:
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method not in ("HEAD", "*") and route.resource is not None
    }


async def test_the_document_is_valid_openapi_31_and_lists_every_route(harness):
    status, document, ctype = await harness.request("GET", "/openapi.json", auth=False)
    assert status == 200 and ctype.startswith("application/json")
    assert document["openapi"] == "3.1.0"
    validate(document)
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    served = _routes(harness.service._runner.app)
    assert documented == served


async def test_stats_and_invoices_fit_their_models(harness):
    invoice = await harness.create(amount="3")
    await harness.pay(invoice["id"])
    await harness.mine(1)
    await harness.wait_status(invoice["id"], "paid")
    status, stats, _ = await harness.request("GET", "/v1/invoices/stats")
    assert status == 200
    InvoiceStats.model_validate(stats)
    Invoice.model_validate(await harness.get(invoice["id"]))
