"""The public listener: the payment page, its status feed and its own assets, nothing else.

It reads invoices through the store (never through the API's handlers) and shows only what
`public.py` picks. Every answer carries a strict Content-Security-Policy: the page loads its
CSS and script from this listener and nothing from any other origin.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any
from urllib.parse import urlencode

import jinja2
import orjson
import structlog
from aiohttp import web

from ..addresses import to_checksum
from ..config import CheckoutSettings
from ..store import Store
from .feed import Feed
from .i18n import LANGUAGES, negotiate, translator
from .public import PAYABLE, amount_text, payment_uri_for, public_status, remaining_atomic
from .qr import qr_svg
from .wallet import wallet_steps

log = structlog.get_logger("watcher.checkout")

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}
INVOICE_ID = re.compile(r"^inv_[0-9A-HJKMNP-TV-Z]{26}$")
STATIC = {"checkout.css": "text/css", "checkout.js": "text/javascript", "favicon.svg": "image/svg+xml"}
# Strings the script shows (wallet steps and refusals, copy feedback, the countdown's end).
SCRIPT_STRINGS = [
    "copied",
    "copy_failed",
    "time_up",
    "wallet_connecting",
    "wallet_switching",
    "wallet_approving",
    "wallet_waiting_approval",
    "wallet_paying",
    "wallet_sent",
    "err_rejected",
    "err_unknown_chain",
    "err_pending",
    "err_unauthorized",
    "err_no_account",
    "err_approval_failed",
    "err_other",
    "redirect_note",
]

# Does a simulated payment for the sandbox: (invoice id, option id or None).
SandboxPay = Callable[[str, str | None], Awaitable[Any]]


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    version: str


def _load_assets() -> dict[str, Asset]:
    assets = {}
    for name, content_type in STATIC.items():
        body = files(__package__).joinpath("static", name).read_bytes()
        assets[name] = Asset(body, content_type, hashlib.sha256(body).hexdigest()[:12])
    return assets


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader(__package__, "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=False,
    )


def _time_left(seconds: int) -> str:
    """Server-rendered countdown (the script ticks it on): H:MM:SS, with days when far off."""
    seconds = max(seconds, 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes:02}:{secs:02}"
    return f"{days} d {hours:02}:{minutes:02}:{secs:02}" if days else clock


def _json_for_script(value: Any) -> str:
    """JSON safe inside <script type="application/json">: no `</script>` can end it early."""
    return (
        orjson.dumps(value).decode().replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    )


def make_checkout_app(
    store: Store,
    settings: CheckoutSettings,
    feed: Feed,
    *,
    sandbox_pay: SandboxPay | None = None,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    pages = CheckoutPages(store, settings, feed, sandbox_pay, clock)
    app = web.Application(middlewares=[pages.guard], client_max_size=4096)
    app.router.add_routes(pages.table())
    return app


class CheckoutPages:
    """The payment page's handlers, with what they share: the templates, the assets, the store."""

    def __init__(
        self,
        store: Store,
        settings: CheckoutSettings,
        feed: Feed,
        sandbox_pay: SandboxPay | None,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.feed = feed
        self.sandbox_pay = sandbox_pay
        self.clock = clock
        self.brand = settings.brand_name
        env = _environment()
        self.page_template = env.get_template("page.html")
        self.not_found_template = env.get_template("not_found.html")
        self.assets = _load_assets()
        self.asset_urls = {
            "css": f"/pay/static/checkout.css?v={self.assets['checkout.css'].version}",
            "js": f"/pay/static/checkout.js?v={self.assets['checkout.js'].version}",
            "icon": f"/pay/static/favicon.svg?v={self.assets['favicon.svg'].version}",
        }

    def table(self) -> list[web.RouteDef]:
        routes = [
            web.get("/pay/static/{name}", self.static),
            web.get("/pay/{id}", self.page),
            web.get("/pay/{id}/status", self.status_json),
            web.get("/pay/{id}/events", self.events),
        ]
        if self.sandbox_pay is not None:
            routes.append(web.post("/pay/{id}/simulate", self.simulate))
        routes.append(web.route("*", "/{tail:.*}", self.fallback))
        return routes

    @web.middleware
    async def guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPNotFound:
            response = self.not_found(request)
        except web.HTTPMethodNotAllowed as exc:
            response = web.Response(
                status=405,
                text="method not allowed",
                headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
            )
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = web.Response(status=exc.status, text=exc.reason)
        except Exception:
            log.exception("checkout_request_failed", method=request.method, path=request.path)
            response = web.Response(status=500, text="the page could not be shown; try again in a moment")
        response.headers.update(SECURITY_HEADERS)
        return response

    def not_found(self, request: web.Request) -> web.Response:
        lang = _language(request)
        body = self.not_found_template.render(
            t=translator(lang), lang=lang, brand=self.brand, assets=self.asset_urls
        )
        return _html(body, 404, lang)

    def shown_invoice(self, request: web.Request) -> dict | None:
        """The invoice a payer may see: drafts are as unknown as ids that never existed."""
        invoice_id = request.match_info["id"]
        if not INVOICE_ID.fullmatch(invoice_id):
            return None
        invoice = self.store.get_invoice(invoice_id)
        if invoice is None or invoice["status"] == "draft":
            return None
        return invoice

    async def page(self, request: web.Request) -> web.Response:
        invoice = self.shown_invoice(request)
        if invoice is None:
            return self.not_found(request)
        lang = _language(request)
        chosen_lang = _chosen_language(request)
        t = translator(lang)
        status = public_status(invoice)
        screen = status["screen"]
        options = invoice["payment_options"]
        wanted = request.query.get("option")
        option = next((o for o in options if o["id"] == wanted), options[0] if options else None)
        payable = screen in PAYABLE
        data: dict[str, Any] = {
            "id": invoice["id"],
            "screen": screen,
            "version": status["version"],
            "confirmations": status["confirmations"],
            "status_url": f"/pay/{invoice['id']}/status",
            "events_url": f"/pay/{invoice['id']}/events",
            "redirect_to": status["redirect_to"],
            "strings": t.strings(SCRIPT_STRINGS),
            "wallet": None,
        }
        shown_option = None
        if payable and option is not None:
            atomic = (
                remaining_atomic(invoice, option) if screen == "partial" else int(option["amount_atomic"])
            )
            shown_option = await _shown_option(option, atomic, t("qr_label"))
            data["wallet"] = {
                "chain_id": option["chain_id"],
                "network": option["network"],
                "steps": wallet_steps(option, atomic),
            }
        body = self.page_template.render(
            t=t,
            lang=lang,
            brand=self.brand or invoice.get("issued_by"),
            product=invoice.get("product_name"),
            assets=self.asset_urls,
            screen=screen,
            status=status,
            messages=_messages(status),
            payable=payable,
            deadline=self._deadline(invoice),
            option=shown_option,
            options=[
                {
                    "id": o["id"],
                    "asset": o["asset"],
                    "network": o["network"],
                    "rail": o["rail"],
                    "current": option is not None and o["id"] == option["id"],
                    "href": _page_url(invoice["id"], chosen_lang, o["id"]),
                }
                for o in options
            ],
            languages=[
                {
                    "code": code,
                    "name": translator(code)("lang_name"),
                    "current": code == lang,
                    "href": _page_url(invoice["id"], code, option["id"] if option and wanted else None),
                }
                for code in LANGUAGES
            ],
            refresh_href=_page_url(invoice["id"], chosen_lang, wanted if option and wanted else None),
            sandbox=self.sandbox_pay is not None,
            simulate_action=f"/pay/{invoice['id']}/simulate"
            + (f"?lang={chosen_lang}" if chosen_lang else ""),
            data_json=_json_for_script(data),
        )
        return _html(body, 200, lang)

    def _deadline(self, invoice: dict) -> dict | None:
        until = invoice["payment_timing"].get("payable_until")
        if not until:
            return None
        unix = store_time(until)
        return {
            "iso": until,
            "unix": unix,
            "left": _time_left(unix - int(self.clock())),
            "text": until.replace("T", " ")[:16] + " UTC",
        }

    async def status_json(self, request: web.Request) -> web.Response:
        invoice = self.shown_invoice(request)
        if invoice is None:
            return web.json_response({"error": "not_found", "detail": "no such payment page"}, status=404)
        return web.Response(
            body=orjson.dumps(public_status(invoice)),
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        invoice = self.shown_invoice(request)
        if invoice is None:
            return web.json_response({"error": "not_found", "detail": "no such payment page"}, status=404)
        return await self.feed.serve(request, invoice["id"])

    async def static(self, request: web.Request) -> web.Response:
        asset = self.assets.get(request.match_info["name"])
        if asset is None:
            return self.not_found(request)
        cache = (
            "public, max-age=31536000, immutable" if request.query.get("v") == asset.version else "no-cache"
        )
        return web.Response(
            body=asset.body,
            content_type=asset.content_type,
            charset="utf-8",
            headers={"Cache-Control": cache, "ETag": f'"{asset.version}"'},
        )

    async def simulate(self, request: web.Request) -> web.Response:
        assert self.sandbox_pay is not None
        invoice = self.shown_invoice(request)
        if invoice is None:
            return self.not_found(request)
        form = await request.post()
        option_id = form.get("payment_option_id")
        try:
            await self.sandbox_pay(
                invoice["id"], option_id if isinstance(option_id, str) and option_id else None
            )
        except (
            Exception
        ) as exc:  # a refused payment is shown by the page's unchanged state; say why in the log
            log.warning("sandbox_simulate_refused", invoice_id=invoice["id"], error=str(exc))
        raise web.HTTPSeeOther(
            _page_url(
                invoice["id"], _chosen_language(request), option_id if isinstance(option_id, str) else None
            )
        )

    async def fallback(self, request: web.Request) -> web.Response:
        return self.not_found(request)


def _language(request: web.Request) -> str:
    return negotiate(request.query.get("lang"), request.headers.get("Accept-Language"))


def _chosen_language(request: web.Request) -> str | None:
    """The language the payer picked on the page (`?lang=`), kept in the links it makes."""
    lang = request.query.get("lang")
    return lang if lang in LANGUAGES else None


def _html(body: str, status: int, lang: str) -> web.Response:
    return web.Response(
        body=body.encode(),
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Content-Language": lang, "Cache-Control": "no-store", "Vary": "Accept-Language"},
    )


def _page_url(invoice_id: str, lang: str | None, option_id: str | None) -> str:
    query = {k: v for k, v in (("option", option_id), ("lang", lang)) if v}
    return f"/pay/{invoice_id}" + (f"?{urlencode(query)}" if query else "")


def _messages(status: dict) -> dict[str, Any]:
    """The figures the page's sentences quote."""
    summary = status["payment_summary"]
    return {
        "amount": status["amount"],
        "currency": status["currency"],
        "received": summary["received_amount"],
        "remaining": summary["remaining_amount"],
        "overpaid": summary["overpaid_amount"],
        "n": min(status["confirmations"], status["required_confirmations"]),
        "m": status["required_confirmations"],
    }


async def _shown_option(option: dict, atomic: int, qr_label: str) -> dict[str, Any]:
    """The chosen option as the page shows it: what to send, where, and its QR code."""
    uri = payment_uri_for(option, atomic)
    contract = option["rail"] == "contract"
    return {
        "id": option["id"],
        "asset": option["asset"],
        "network": option["network"],
        "chain_id": option["chain_id"],
        "rail": option["rail"],
        "amount": amount_text(option, atomic),
        "uri": uri,
        "address": to_checksum(option["contract_call"]["router"])
        if contract
        else option["destination_address"],
        "two_steps": contract and option["token_contract"] is not None,
        # The first drawing of a code takes tens of ms (segno picks the most readable of
        # the 8 masks): in a thread, so the follower and the API are not held up meanwhile.
        "qr": await asyncio.to_thread(qr_svg, uri, qr_label),
    }


def store_time(text: str) -> int:
    """Unix seconds of an RFC 3339 `...Z` time as the store writes it."""
    return int(datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
