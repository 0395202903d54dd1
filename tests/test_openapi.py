"""/openapi.json describes exactly the routes the server has, and real answers fit it."""

from __future__ import annotations

import re
from pathlib import Path

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


async def test_docs_render_the_document_from_assets_served_here_and_nowhere_else(harness):
    """/docs is Swagger UI from the installed package: every script, style and icon the page
    names is on this listener (a relative path that answers 200), the page loads /openapi.json,
    and its Content-Security-Policy forbids any other origin."""
    assert harness.http is not None
    async with harness.http.get(harness.base_url + "/docs") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/html")
        csp = r.headers["Content-Security-Policy"]
        page = await r.text()
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "http" not in csp
    assert "http://" not in page and "https://" not in page and "//" not in page.replace("<!--", "")
    linked = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert {
        "/docs/assets/swagger-ui-bundle.js",
        "/docs/assets/swagger-ui.css",
        "/docs/assets/watcher-docs.js",
    } <= set(linked)
    for path in linked:
        assert path.startswith("/") and not path.startswith("//"), path
        async with harness.http.get(harness.base_url + path) as r:
            body = await r.read()
            assert r.status == 200 and len(body) > 0, path
            if path.endswith(".js"):
                assert "javascript" in r.headers["Content-Type"]
                if path.endswith("watcher-docs.js"):
                    init = body.decode()
    assert '"/openapi.json"' in init and "validatorUrl: null" in init
    status, problem, ctype = await harness.request("GET", "/docs/assets/..%2Fcore.py", auth=False)
    assert status == 404 and ctype.startswith("application/problem+json")
    status, _, _ = await harness.request("GET", "/docs/assets/swagger-editor-bundle.js", auth=False)
    assert status == 404, "only the files the page uses are served"


API_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def documented_routes(text: str) -> set[tuple[str, str]]:
    """The routes docs/api.md gives a section: its headings "### `METHOD /path`"."""
    return {(m[1], m[2]) for m in re.finditer(r"^### `(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`$", text, re.M)}


async def test_the_api_reference_documents_exactly_the_routes_of_openapi_json(harness):
    """docs/api.md and /openapi.json (of the sandbox, which has every route) name the same
    routes: a route added to one and not the other fails here."""
    status, document, _ = await harness.request("GET", "/openapi.json", auth=False)
    assert status == 200
    served = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    documented = documented_routes(API_REFERENCE.read_text())
    assert ("POST", "/v1/invoices") in documented and ("GET", "/docs") in served
    assert sorted(served - documented) == [], "routes missing from docs/api.md"
    assert sorted(documented - served) == [], "routes in docs/api.md the watcher does not serve"


def test_the_route_check_reads_the_headings_it_should():
    text = "### `GET /v1/a`\n### `POST /v1/a/{id}/b`\n## `GET /v1/not-a-route-heading`\nsee `GET /v1/c`\n"
    assert documented_routes(text) == {("GET", "/v1/a"), ("POST", "/v1/a/{id}/b")}
