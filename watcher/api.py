"""The HTTP API: routes of the contract, bearer auth, and problem+json for every error.

No request, however malformed, gets a 500 or changes stored data: bodies are parsed and
validated completely before the store is touched, and the store's own checks (state,
idempotency) raise before anything is written.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import math
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit

import orjson
import structlog
from aiohttp import web
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from . import schemas
from .auth import FAILURES_PER_SECOND, ApiKey, auth_middleware
from .config import InvoiceSettings
from .domain import (
    DECIMAL_TEXT,
    ExceptionType,
    InvoiceStatus,
    ResolutionAction,
    exact_decimal,
    usd_rate_problem,
)
from .httpserver import harden
from .invoicing import Invoicing, OptionsError, finish_option, session_timing
from .openapi import Operation
from .startup import StartUp
from .store import IdempotencyConflict, NewInvoice, NewSession, StateConflict, Store

log = structlog.get_logger("watcher.api")

MAX_BODY = 64 * 1024
MAX_AMOUNT = Decimal(10) ** 15  # USD; anything above is a mistake, not an invoice
MAX_AMOUNT_PLACES = 18
MAX_METADATA_DEPTH = 32
# ASCII digits only: Decimal() alone would also take "1_000", "NaN" and non-ASCII digits such as "١٢".

PROBLEM = "application/problem+json"


# --------------------------------------------------------------------------- problems


def _text(value: Any) -> Any:
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else value


class Problem(Exception):
    def __init__(
        self, status: int, title: str, detail: str, errors: list[dict] | None = None, slug: str | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        # Field names and details can quote the request: keep lone surrogates from making them
        # unwritable as JSON.
        self.detail = _text(detail)
        self.errors = [{k: _text(v) for k, v in e.items()} for e in errors] if errors is not None else None
        self.slug = slug or title.lower().replace(" ", "-")

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "type": f"urn:watcher:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.errors is not None:
            body["errors"] = self.errors
        return web.Response(status=self.status, body=orjson.dumps(body), content_type=PROBLEM)


def invalid(field: str, message: str) -> Problem:
    return Problem(
        422, "Invalid request", f"{field}: {message}", [{"field": field, "message": message}], "validation"
    )


def _from_validation(exc: ValidationError) -> Problem:
    errors = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e["loc"]) or "body"
        message = e["msg"].removeprefix("Value error, ")
        errors.append({"field": field, "message": message})
    first = errors[0]
    return Problem(422, "Invalid request", f"{first['field']}: {first['message']}", errors, "validation")


# --------------------------------------------------------------------------- request models


def _decimal_in(value: Any, what: str) -> Decimal:
    """Money arrives as a decimal string (or an integer, or an exact JSON number); never a float."""
    number = exact_decimal(value)
    if number is None:
        if isinstance(value, Decimal) or (isinstance(value, str) and DECIMAL_TEXT.fullmatch(value.strip())):
            raise ValueError(f"{what} must be a finite number")
        raise ValueError(f'{what} must be a decimal string such as "49.99"')
    return number


def _places(number: Decimal) -> int:
    exponent = number.as_tuple().exponent
    return -exponent if isinstance(exponent, int) else 0


def _plain_json(value: Any, depth: int = 0) -> Any:
    """Metadata as values the store and the responses can write as JSON: JSON numbers with a
    fraction (parsed as Decimal) become doubles only when that is exact (else a 422: send them
    as strings), integers must fit in 64 bits, text must be valid
    Unicode, and nesting is bounded (each limit would otherwise fail later, as a 500)."""
    if depth > MAX_METADATA_DEPTH:
        raise ValueError(f"metadata must not be nested more than {MAX_METADATA_DEPTH} levels deep")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("metadata text must be valid Unicode (no lone surrogates)") from None
        return value
    if isinstance(value, dict):
        return {_plain_json(k, depth + 1): _plain_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v, depth + 1) for v in value]
    if isinstance(value, Decimal):
        # Stored as a JSON number only when that loses nothing; otherwise the caller must
        # send it as a string (metadata is the merchant's own data: never silently rounded).
        number = float(value)
        if not math.isfinite(number) or Decimal(repr(number)) != value:
            raise ValueError("metadata numbers must be exact as a double; send longer ones as strings")
        return number
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        raise ValueError("metadata integers must fit in 64 bits")
    return value


class TimingIn(BaseModel):
    model_config = schemas.API_MODEL
    mode: Literal["immediate", "due_date"] = "immediate"
    expires_after_minutes: Annotated[StrictInt, Field(ge=1, le=525_600)] | None = None
    due_after_days: Annotated[StrictInt, Field(ge=0, le=3650)] | None = None
    grace_period_days: Annotated[StrictInt, Field(ge=0, le=365)] | None = None

    @model_validator(mode="after")
    def _fits_mode(self) -> TimingIn:
        if self.mode == "immediate" and (
            self.due_after_days is not None or self.grace_period_days is not None
        ):
            raise ValueError('due_after_days and grace_period_days belong to mode "due_date"')
        if self.mode == "due_date":
            if self.expires_after_minutes is not None:
                raise ValueError('expires_after_minutes belongs to mode "immediate"')
            if self.due_after_days is None:
                raise ValueError('mode "due_date" needs due_after_days')
        return self


ShortText = Annotated[str, Field(max_length=200)]
AssetsIn = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=80)]], Field(min_length=1, max_length=50)
]
QuoteRatesIn = dict[Annotated[str, Field(min_length=1, max_length=80)], Decimal]


def _quote_rates_in(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError('quote_rates must be an object of "SYMBOL": "usd per unit"')
    rates = {}
    for symbol, rate in value.items():
        number = _decimal_in(rate, f"quote_rates.{symbol}")
        if (problem := usd_rate_problem(number)) is not None:
            raise ValueError(f"quote_rates.{symbol} {problem}")
        rates[symbol] = number
    return rates


class CreateInvoiceIn(BaseModel):
    model_config = schemas.API_MODEL
    amount: Decimal
    # An ISO 4217 code, in capitals; which ones the configured rates reach is checked when quoting.
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "USD"
    payment_timing: TimingIn | None = None
    assets: AssetsIn | None = None
    rails: Annotated[list[Literal["address", "contract"]], Field(min_length=1, max_length=2)] = ["address"]
    quote_rates: QuoteRatesIn | None = None
    product_name: ShortText | None = None
    issued_by: Annotated[str, Field(max_length=120)] | None = None
    bill_to: Annotated[str, Field(max_length=120)] | None = None
    merchant_reference: ShortText | None = None
    customer_id: ShortText | None = None
    customer_email: Annotated[str, Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")] | None = None
    metadata: dict[str, Any] | None = None
    redirect_url: Annotated[str, Field(max_length=2000)] | None = None
    draft: StrictBool = False

    @field_validator("redirect_url")
    @classmethod
    def _redirect_url(cls, value: str | None) -> str | None:
        return None if value is None else redirect_url_problem(value)

    @field_validator("amount", mode="before")
    @classmethod
    def _amount(cls, value: Any) -> Decimal:
        amount = _decimal_in(value, "amount")
        if amount < 0:
            raise ValueError("amount must be 0 or more")
        if amount > MAX_AMOUNT:
            raise ValueError(f"amount must be at most {MAX_AMOUNT:f}")
        if _places(amount) > MAX_AMOUNT_PLACES:
            raise ValueError(f"amount has more than {MAX_AMOUNT_PLACES} decimal places")
        if amount == 0:
            return Decimal(0)  # not "-0"
        return amount.normalize() if amount == amount.to_integral_value() else amount

    @field_validator("quote_rates", mode="before")
    @classmethod
    def _rates(cls, value: Any) -> Any:
        return _quote_rates_in(value)

    @field_validator("rails")
    @classmethod
    def _unique_rails(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("rails must not repeat")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        value = _plain_json(value)
        if len(orjson.dumps(value)) > 8 * 1024:
            raise ValueError("metadata must be at most 8 KiB as JSON")
        notes = value.get("notes")
        if notes is not None and (not isinstance(notes, str) or len(notes) > 140):
            raise ValueError("metadata.notes must be a string of at most 140 characters")
        return value


class CheckoutSessionIn(BaseModel):
    """A fresh payment session: `assets` and `quote_rates` as at create; absent, those of the
    invoice's last session are used."""

    model_config = schemas.API_MODEL
    assets: AssetsIn | None = None
    quote_rates: QuoteRatesIn | None = None

    @field_validator("quote_rates", mode="before")
    @classmethod
    def _rates(cls, value: Any) -> Any:
        return _quote_rates_in(value)


class NoBodyIn(BaseModel):
    """finalize and cancel take no fields: an empty body or `{}`."""

    model_config = schemas.API_MODEL


class ResolveIn(BaseModel):
    model_config = schemas.API_MODEL
    resolution_action: ResolutionAction
    resolution_note: Annotated[str, Field(max_length=500)] | None = None


# --------------------------------------------------------------------------- helpers


def redirect_url_problem(value: str) -> str:
    """Where the payment page sends the payer: an absolute http(s) URL with a host, nothing a
    browser would read another way (spaces, control characters) and no credentials (payers see it)."""
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must be an http(s) URL without spaces or control characters")
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise ValueError("must be a valid http(s) URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not hold credentials (the payer's browser is sent there)")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`{"amount": "1", "amount": "2"}` is ambiguous: refuse it rather than keep the last."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


async def read_json(request: web.Request, *, required: bool = True) -> Any:
    """The body as JSON with exact decimals; 415 when it is not sent as JSON, 400 when it is
    not JSON, 413 when too large."""
    if request.body_exists and request.content_type != "application/json":
        raise Problem(
            415,
            "Unsupported media type",
            "send the body as JSON, with Content-Type: application/json",
            slug="unsupported-media-type",
        )
    raw = await request.read()  # raises 413 past client_max_size
    if not raw.strip():
        if required:
            raise Problem(400, "Malformed JSON", "the request needs a JSON body", slug="malformed-json")
        if raw:  # a body of whitespace is sent, and is not JSON; only no body at all means "none"
            raise Problem(
                400,
                "Malformed JSON",
                "the body is only whitespace: send {} or no body",
                slug="malformed-json",
            )
        return {}
    try:
        return json.loads(
            raw, parse_float=Decimal, parse_constant=_reject_constant, object_pairs_hook=_unique_keys
        )
    except (ValueError, UnicodeDecodeError) as exc:
        raise Problem(
            400, "Malformed JSON", f"the body is not valid JSON: {exc}", slug="malformed-json"
        ) from None
    except RecursionError:
        raise Problem(400, "Malformed JSON", "the body is nested too deeply", slug="malformed-json") from None


M = TypeVar("M", bound=BaseModel)


async def read_model(request: web.Request, model: type[M], *, required: bool = True) -> M:
    """The body, parsed and validated into `model`: 400 when it is not JSON, 422 when it does not fit."""
    return validate_body(model, await read_json(request, required=required), required=required)


def validate_body(model: type[M], body: Any, *, required: bool = True) -> M:
    if not isinstance(body, dict):
        raise invalid("body", "must be a JSON object" if required else "must be a JSON object (or empty)")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _from_validation(exc) from None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


def single_query(request: web.Request, name: str) -> str | None:
    """A query parameter given at most once: `?status=a&status=b` is a 422, not a silent pick."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise invalid(name, "must be given once")
    return values[0] if values else None


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """A whole-number query parameter in [low, high]: ASCII digits only (int() alone would take
    "+5", " 5" and "٥"), given at most once."""
    raw = single_query(request, name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or not (low <= int(raw) <= high):
        raise invalid(name, f"must be a whole number from {low} to {high}")
    return int(raw)


def _invoice_or_404(value: dict | list | None, invoice_id: str) -> Any:
    if value is None:
        raise Problem(404, "Not found", f"no invoice {invoice_id!r}", slug="not-found")
    return value


# --------------------------------------------------------------------------- the app


BUSY_RETRY_AFTER_SECONDS = 1


@web.middleware
async def problems(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as problem+json: ours, aiohttp's (404, 405, 413) and, logged, any other."""
    try:
        return await handler(request)
    except Problem as p:
        return p.response()
    except web.HTTPRequestEntityTooLarge:
        return Problem(413, "Payload too large", f"the body is over {MAX_BODY // 1024} KiB").response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = Problem(exc.status, exc.reason, exc.text or exc.reason).response()
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response
    except Exception as exc:
        if _busy(exc):
            # Another process held the database's write lock past the busy timeout: a step's new
            # payments are capped (about 2 s of lock), its confirmations of earlier ones are not
            # (docs/design.md). The change rolled back whole: nothing was written; try again.
            log.warning("request_database_busy", method=request.method, path=request.path, error=str(exc))
            response = Problem(
                503,
                "Database busy",
                "the database stayed busy with another write: nothing changed, try again",
            ).response()
            response.headers["Retry-After"] = str(BUSY_RETRY_AFTER_SECONDS)
            return response
        log.exception("request_failed", method=request.method, path=request.path)
        return Problem(
            500, "Internal error", "the server could not handle this request; see its log"
        ).response()


def _busy(exc: Exception) -> bool:
    """SQLite's "database is locked": another connection's write outlasted the busy timeout."""
    return isinstance(exc, sqlite3.OperationalError) and (
        getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
        or "database is locked" in str(exc)
    )


def make_app(
    store: Store,
    invoicing: Invoicing,
    invoice_settings: InvoiceSettings,
    *,
    api_key: str,
    api_keys: Sequence[ApiKey] = (),
    auth_failures_per_second: int | None = FAILURES_PER_SECOND,
    clock: Callable[[], float] = time.time,
    starting: StartUp | None = None,
) -> web.Application:
    """`api_key` is the `write` key of `api_key_env`; `api_keys` the others (`[[http.api_keys]]`).
    `starting`: the service's start-up, while it is not done only the open routes serve."""
    auth = auth_middleware(
        [ApiKey("api_key_env", api_key, "write"), *api_keys],
        lambda status, title, detail: Problem(status, title, detail).response(),
        failures_per_second=auth_failures_per_second,
    )
    gate = [] if starting is None else [starting.middleware()]
    app = web.Application(client_max_size=MAX_BODY, middlewares=[problems, *gate, auth])
    harden(app)
    app.router.add_routes(InvoiceRoutes(store, invoicing, invoice_settings, clock).table())

    async def healthz(request: web.Request) -> web.Response:
        if starting is not None and not starting.done:
            return json_response({"status": "starting", "waiting_for": starting.waiting_for})
        return json_response({"status": "ok"})

    app.router.add_get("/healthz", healthz)
    return app


class InvoiceRoutes:
    """The handlers of /v1/invoices, with what they share: the store, the quoting, the clock."""

    def __init__(
        self, store: Store, invoicing: Invoicing, settings: InvoiceSettings, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.invoicing = invoicing
        self.settings = settings
        self.clock = clock

    def table(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/invoices", self.create_invoice),
            web.get("/v1/invoices", self.list_invoices),
            web.get("/v1/invoices/export", self.export_invoices),  # before {id}: the fixed paths win
            web.get("/v1/invoices/stats", self.invoice_stats),
            web.get("/v1/invoices/{id}", self.get_invoice),
            web.get("/v1/invoices/{id}/status", self.get_status),
            web.get("/v1/invoices/{id}/payments", self.get_payments),
            web.post("/v1/invoices/{id}/finalize", self.finalize_invoice),
            web.post("/v1/invoices/{id}/cancel", self.cancel_invoice),
            web.post("/v1/invoices/{id}/checkout-session", self.refresh_session),
            web.post("/v1/invoices/{id}/exception/resolve", self.resolve_exception),
        ]

    async def create_invoice(self, request: web.Request) -> web.Response:
        body = await read_json(request)  # kept: the Idempotency-Key compares the body as sent
        data = validate_body(CreateInvoiceIn, body)
        key = request.headers.get("Idempotency-Key")
        if key is not None and not (1 <= len(key) <= 255 and key.isascii() and key.isprintable()):
            raise invalid("Idempotency-Key", "must be 1 to 255 printable ASCII characters")
        new = build_new_invoice(data, self.invoicing, self.settings, self.clock())
        request_hash = hashlib.sha256(
            orjson.dumps(body, default=str, option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        try:
            invoice, created = await self.store.write(
                self.store.create_invoice,
                new,
                derive=self.invoicing.derive,
                finish=finish_option,
                idempotency_key=key,
                request_hash=request_hash,
            )
        except IdempotencyConflict:
            raise Problem(
                409,
                "Conflict",
                "this Idempotency-Key was used with another request body",
                slug="idempotency-conflict",
            ) from None
        if created:
            log.info(
                "invoice_created",
                invoice_id=invoice["id"],
                amount=invoice["amount"],
                options=len(invoice["payment_options"]),
            )
        return json_response(invoice, 201, None if created else {"Idempotent-Replayed": "true"})

    async def get_invoice(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        return json_response(_invoice_or_404(self.store.get_invoice(invoice_id), invoice_id))

    async def get_status(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        return json_response(_invoice_or_404(self.store.get_status(invoice_id), invoice_id))

    async def get_payments(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        return json_response({"data": _invoice_or_404(self.store.get_payments(invoice_id), invoice_id)})

    async def list_invoices(self, request: web.Request) -> web.Response:
        filters = parse_list_filters(request)
        limit = query_int(request, "limit", 50, 1, 200)
        offset = query_int(request, "offset", 0, 0, 10**9)
        data, total = self.store.list_invoices(filters, limit, offset)
        return json_response({"data": data, "total": total, "limit": limit, "offset": offset})

    async def resolve_exception(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        data = await read_model(request, ResolveIn)
        try:
            invoice = await self.store.write(
                self.store.resolve_exception, invoice_id, data.resolution_action, data.resolution_note
            )
        except StateConflict as exc:
            raise Problem(409, "Conflict", str(exc), slug="state-conflict") from None
        return json_response(_invoice_or_404(invoice, invoice_id))

    async def export_invoices(self, request: web.Request) -> web.StreamResponse:
        filters = parse_list_filters(request)
        limit = query_int(request, "limit", EXPORT_MAX_ROWS, 1, EXPORT_MAX_ROWS)
        offset = query_int(request, "offset", 0, 0, 10**9)
        total = self.store.count_invoices(filters)
        if "limit" not in request.query and total - offset > EXPORT_MAX_ROWS:
            raise invalid(
                "limit",
                f"{total - offset} invoices match, more than the {EXPORT_MAX_ROWS} an export holds: "
                "page with limit and offset, or narrow the filters",
            )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": 'attachment; filename="invoices.csv"',
                "X-Total-Count": str(total),
            }
        )
        await response.prepare(request)  # from here on nothing may fail as a problem: all checks are done
        try:
            await response.write(_csv_lines([EXPORT_COLUMNS]))
            if request.method != "HEAD":
                await self._write_export_rows(request, response, filters, limit, offset)
            await response.write_eof()
        except ConnectionResetError:  # the client went away mid-export: nothing to answer
            log.info("export_abandoned", path=request.path_qs)
        return response

    async def _write_export_rows(
        self,
        request: web.Request,
        response: web.StreamResponse,
        filters: dict[str, str],
        limit: int,
        offset: int,
    ) -> None:
        for rows in self.store.export_rows(filters, limit, offset):
            await response.write(_csv_lines([[row[c] for c in EXPORT_COLUMNS] for row in rows]))
            # A write returns at once while the socket takes it: let the follower, the
            # webhooks and the watchdog run between chunks, and stop once the client is gone.
            await asyncio.sleep(0)
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError("the client went away")

    async def invoice_stats(self, request: web.Request) -> web.Response:
        filters = parse_list_filters(request, paging=False)
        stats = self.store.invoice_stats(filters)
        # Every configured asset is listed, at zero when nothing was received in it.
        seen = {(r["network"], r["asset"]) for r in stats["received"]}
        for a in self.invoicing.assets:
            if (a.chain.name, a.symbol) not in seen:
                seen.add((a.chain.name, a.symbol))
                stats["received"].append(
                    {
                        "network": a.chain.name,
                        "asset": a.symbol,
                        "decimals": a.decimals,
                        "amount_atomic": "0",
                        "amount": "0",
                        "payments": 0,
                    }
                )
        stats["received"].sort(key=lambda r: (r["network"], r["asset"]))
        return json_response(stats)

    async def _start_session(
        self, invoice_id: str, from_statuses: tuple[InvoiceStatus, ...], plan: Callable[[dict], NewSession]
    ) -> dict:
        try:
            invoice = await self.store.write(
                self.store.start_session,
                invoice_id,
                from_statuses=from_statuses,
                plan=plan,
                derive=self.invoicing.derive,
                finish=finish_option,
            )
        except StateConflict as exc:
            raise Problem(409, "Conflict", str(exc), slug="state-conflict") from None
        except OptionsError as exc:
            raise invalid(exc.field, exc.message) from None
        return _invoice_or_404(invoice, invoice_id)

    async def finalize_invoice(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        await read_model(request, NoBodyIn, required=False)

        def plan(row: dict) -> NewSession:
            amount = Decimal(row["amount"])
            options_request = orjson.loads(row["request"])
            timing, payable_until = session_timing(orjson.loads(row["payment_timing"]), self.clock())
            options = (
                self.invoicing.build_from_request(amount, options_request, row["currency"])
                if amount > 0
                else []
            )
            return NewSession(options, timing, payable_until, options_request)

        invoice = await self._start_session(invoice_id, (InvoiceStatus.DRAFT,), plan)
        log.info(
            "invoice_finalized",
            invoice_id=invoice_id,
            status=invoice["status"],
            options=len(invoice["payment_options"]),
        )
        return json_response(invoice)

    async def refresh_session(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        data = await read_model(request, CheckoutSessionIn, required=False)
        try:
            if data.assets is not None:  # an unknown asset is the body's fault, whatever the invoice
                self.invoicing.select_assets(data.assets)
        except OptionsError as exc:
            raise invalid(exc.field, exc.message) from None

        def plan(row: dict) -> NewSession:
            options_request = orjson.loads(row["request"])
            if data.assets is not None:
                options_request["assets"] = data.assets
            if data.quote_rates is not None:
                options_request["quote_rates"] = {k: format(v, "f") for k, v in data.quote_rates.items()}
            timing, payable_until = session_timing(orjson.loads(row["payment_timing"]), self.clock())
            options = self.invoicing.build_from_request(
                Decimal(row["amount"]), options_request, row["currency"]
            )
            return NewSession(options, timing, payable_until, options_request)

        invoice = await self._start_session(invoice_id, (InvoiceStatus.PENDING, InvoiceStatus.EXPIRED), plan)
        log.info("invoice_session_refreshed", invoice_id=invoice_id, options=len(invoice["payment_options"]))
        return json_response(invoice)

    async def cancel_invoice(self, request: web.Request) -> web.Response:
        invoice_id = request.match_info["id"]
        await read_model(request, NoBodyIn, required=False)
        try:
            invoice = await self.store.write(self.store.cancel_invoice, invoice_id)
        except StateConflict as exc:
            raise Problem(409, "Conflict", str(exc), slug="state-conflict") from None
        invoice = _invoice_or_404(invoice, invoice_id)
        log.info("invoice_cancelled", invoice_id=invoice_id)
        return json_response(invoice)


LIST_FILTERS = (
    "status",
    "exception_type",
    "exception_status",
    "merchant_reference",
    "customer_id",
    "customer_email",
    "transaction_hash",
    "search",
)

# The CSV export: its columns, and the most rows one export holds (page with limit/offset past it).
EXPORT_MAX_ROWS = 100_000
EXPORT_COLUMNS = (
    "id",
    "status",
    "amount",
    "currency",
    "received_amount",
    "remaining_amount",
    "overpaid_amount",
    "payment_state",
    "exception_type",
    "exception_status",
    "merchant_reference",
    "customer_id",
    "customer_email",
    "product_name",
    "created_at",
    "paid_at",
    "confirmed_at",
    "cancelled_at",
    "transaction_hashes",
)
# A cell starting with one of these is a formula to a spreadsheet (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")


# Inside a field, a formula character after one of these starts a cell of its own for a
# spreadsheet that splits on `;` (many European locales) or reads the field unquoted.
_FORMULA_AFTER_SEPARATOR = re.compile(r"([;,\t\r\n])(?=[=+\-@\t\r\n\x00])")


def _csv_cell(value: Any) -> str:
    """A field no spreadsheet evaluates: `'` before a formula character at its start, and
    after a separator inside it (`x;=cmd()` becomes `x;'=cmd()`)."""
    if value is None:
        return ""
    text = _FORMULA_AFTER_SEPARATOR.sub(r"\1'", str(value))
    return "'" + text if text.startswith(FORMULA_START) else text


def _csv_lines(rows: list[Any]) -> bytes:
    """Every field quoted: a `;` or `,` inside one (`x;=cmd()`) never starts a cell of its own,
    whichever separator the spreadsheet's locale uses."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_ALL)  # RFC 4180
    writer.writerows([[_csv_cell(v) for v in row] for row in rows])
    return buffer.getvalue().encode("utf-8", "backslashreplace")


def _invoice_operations() -> list[Operation]:
    """The routes of this module, declared for /openapi.json with the models the handlers use."""
    inv = ("invoices",)
    many = (404, 409, 400, 413, 422)
    return [
        Operation(
            "POST",
            "/v1/invoices",
            "Create an invoice (Idempotency-Key: same key and body, same invoice)",
            {201: schemas.Invoice},
            body=CreateInvoiceIn,
            tags=inv,
            problems=(409,),
            extra={
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ]
            },
        ),
        Operation(
            "GET",
            "/v1/invoices",
            "List invoices, newest first",
            {200: schemas.InvoiceList},
            query=schemas.InvoicePage,
            tags=inv,
            problems=(422,),
        ),
        Operation(
            "GET",
            "/v1/invoices/export",
            "The filtered list as CSV with a header row",
            {200: ("text/csv", {"type": "string"})},
            query=schemas.ExportPage,
            tags=inv,
            problems=(422,),
        ),
        Operation(
            "GET",
            "/v1/invoices/stats",
            "Counts by status and open exception, amounts received per asset",
            {200: schemas.InvoiceStats},
            query=schemas.InvoiceFilters,
            tags=inv,
            problems=(422,),
        ),
        Operation(
            "GET", "/v1/invoices/{id}", "An invoice", {200: schemas.Invoice}, tags=inv, problems=(404,)
        ),
        Operation(
            "GET",
            "/v1/invoices/{id}/status",
            "The polling shape of an invoice",
            {200: schemas.InvoiceStatusView},
            tags=inv,
            problems=(404,),
        ),
        Operation(
            "GET",
            "/v1/invoices/{id}/payments",
            "An invoice's payments",
            {200: schemas.PaymentList},
            tags=inv,
            problems=(404,),
        ),
        Operation(
            "POST",
            "/v1/invoices/{id}/finalize",
            "draft -> pending: options built, the timer starts",
            {200: schemas.Invoice},
            body=NoBodyIn,
            body_required=False,
            tags=inv,
            problems=many,
        ),
        Operation(
            "POST",
            "/v1/invoices/{id}/cancel",
            "pending with nothing received -> cancelled",
            {200: schemas.Invoice},
            body=NoBodyIn,
            body_required=False,
            tags=inv,
            problems=many,
        ),
        Operation(
            "POST",
            "/v1/invoices/{id}/checkout-session",
            "A fresh payment session: new quote, new deadline",
            {200: schemas.Invoice},
            body=CheckoutSessionIn,
            body_required=False,
            tags=inv,
            problems=many,
        ),
        Operation(
            "POST",
            "/v1/invoices/{id}/exception/resolve",
            "Resolve the open exception",
            {200: schemas.Invoice},
            body=ResolveIn,
            tags=inv,
            problems=many,
        ),
        Operation(
            "GET",
            "/healthz",
            "200 while the process serves; `starting` until the start-up's checks are done",
            {200: schemas.Health},
            auth=False,
            tags=("operations",),
        ),
    ]


def parse_list_filters(request: web.Request, *, paging: bool = True) -> dict[str, str]:
    """Known filters only: a misspelt one must not silently return everything."""
    known = (*LIST_FILTERS, "limit", "offset") if paging else LIST_FILTERS
    for name in request.query:
        if name not in known:
            raise invalid(name, f"unknown query parameter (known: {', '.join(known)})")
    filters = {}
    for name in LIST_FILTERS:
        value = single_query(request, name)
        if value is None:
            continue
        if len(value) > 254:
            raise invalid(name, "is too long")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid(name, "is not valid UTF-8") from None
        filters[name] = value
    for name, check in _FILTER_CHECKS.items():
        if name in filters:
            filters[name] = check(filters[name])
    return filters


def _search(value: str) -> str:
    value = value.strip()
    if not value:
        raise invalid("search", "must not be blank (leave it out to list everything)")
    return value


def _one_of(name: str, allowed: Sequence[str], message: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in allowed:
            raise invalid(name, message)
        return value

    return check


def _transaction_hash(value: str) -> str:
    """A transaction hash as stored: 0x and 64 lowercase hex digits. Without the 0x (as some
    explorers copy it) it is the same hash; anything else would silently match nothing."""
    digits = value.strip().removeprefix("0x").removeprefix("0X")
    if len(digits) != 64 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        raise invalid("transaction_hash", "must be a transaction hash: 64 hex digits, with or without 0x")
    return "0x" + digits.lower()


# Each filter that only takes some values: its check, which returns the value as the store reads it.
_FILTER_CHECKS: dict[str, Callable[[str], str]] = {
    "transaction_hash": _transaction_hash,
    "search": _search,
    "status": _one_of(
        "status",
        [s.value for s in InvoiceStatus],
        f"must be one of {', '.join(s.value for s in InvoiceStatus)}",
    ),
    "exception_status": _one_of("exception_status", ("open", "resolved"), "must be open or resolved"),
    "exception_type": _one_of(
        "exception_type",
        [t.value for t in ExceptionType],
        "must be late_payment, underpaid, overpaid or duplicate_payment",
    ),
}


def build_new_invoice(
    data: CreateInvoiceIn, invoicing: Invoicing, settings: InvoiceSettings, now: float
) -> NewInvoice:
    """Quote the options and start the timer; raises Problem(422) when no option can be built."""
    timing_in = data.payment_timing or TimingIn()
    if timing_in.mode == "immediate":
        base: dict[str, Any] = {
            "mode": "immediate",
            "expires_after_minutes": timing_in.expires_after_minutes or settings.default_expiry_minutes,
        }
    else:
        base = {
            "mode": "due_date",
            "due_after_days": timing_in.due_after_days or 0,
            "grace_period_days": timing_in.grace_period_days or 0,
        }
    timing, payable_until = session_timing(base, now)
    payable: int | None = payable_until
    if data.draft:  # the timer starts at finalize
        timing["payable_until"] = None
        if "due_at" in timing:
            timing["due_at"] = None
        payable = None

    options = []
    rates = data.quote_rates or {}
    try:
        if data.amount > 0:
            # A draft's options are built at finalize, but built now too, so that a draft that
            # could never be finalized is refused at once.
            options = invoicing.build_or_refuse(data.amount, data.assets, data.rails, rates, data.currency)
        elif data.assets is not None or data.rails != ["address"]:
            # no options, but the request must make sense
            invoicing.build(Decimal(1), data.assets, data.rails, rates, data.currency)
        else:
            invoicing.check_currency(data.currency)
    except OptionsError as exc:
        raise invalid(exc.field, exc.message) from None
    if data.draft:
        options = []

    fields = {
        k: getattr(data, k)
        for k in (
            "product_name",
            "issued_by",
            "bill_to",
            "merchant_reference",
            "customer_id",
            "customer_email",
            "redirect_url",
        )
    }
    return NewInvoice(
        amount=data.amount,
        currency=data.currency,
        fields=fields,
        metadata=data.metadata or {},
        tolerance_percent=settings.payment_tolerance_percent,
        payment_timing=timing,
        payable_until=payable,
        draft=data.draft,
        request={
            "assets": data.assets,
            "rails": data.rails,
            "quote_rates": {k: format(v, "f") for k, v in (data.quote_rates or {}).items()},
            "payment_timing": timing_in.model_dump(exclude_none=True),
        },
        options=options,
    )


INVOICE_OPERATIONS = _invoice_operations()
