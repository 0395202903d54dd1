"""`GET /v1/rates`: each configured pair's value now, its sources' answers, and why it would not
quote. Reads only what the book holds: it never asks a source."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from ..api import invalid, json_response
from ..domain import rfc3339
from ..openapi import Operation
from ..schemas import API_MODEL, DecimalText, Timestamp
from .book import RateBook
from .quoting import format_rate


class _Out(BaseModel):
    model_config = API_MODEL


class RateSource(_Out):
    source: str = Field(
        description="the kind and what it reads: a chain and feed, or a URL without credentials"
    )
    value: DecimalText | None = Field(description="its usable value now (null when it has none)")
    updated_at: Timestamp | None = Field(
        description="when its last accepted answer was updated: a feed's updatedAt, or when the URL answered"
    )
    error: str | None = Field(description="why it gives no value, or the last try's failure")


class Rate(_Out):
    pair: str
    value: DecimalText | None = Field(
        description="the median of the sources that answer; null when not quotable"
    )
    sources: list[RateSource]
    age_seconds: int | None = Field(description="age of the oldest answer used")
    quotable: bool
    reason: str | None = Field(description="why the pair does not quote now")


class RateList(_Out):
    data: list[Rate]


def rates_view(book: RateBook) -> list[dict]:
    now = book.clock()
    values = book.pair_values(now)
    out = []
    for pair, value in values.items():
        sources = []
        for state in book.states:
            if state.settings.pair != pair:
                continue
            view = state.view(now)
            sources.append(
                {
                    "source": state.settings.label(),
                    "value": None if view.value is None else format_rate(view.value),
                    "updated_at": rfc3339(state.accepted.updated_at) if state.accepted else None,
                    "error": view.reason or state.error,
                }
            )
        out.append(
            {
                "pair": pair,
                "value": None if value.value is None else format_rate(value.value),
                "sources": sources,
                "age_seconds": None if value.age is None or not value.quotable else round(value.age),
                "quotable": value.quotable,
                "reason": value.reason,
            }
        )
    return out


def add_rate_routes(app: web.Application, book: RateBook) -> None:
    async def list_rates(request: web.Request) -> web.Response:
        if request.query:
            raise invalid(next(iter(request.query)), "unknown query parameter (this route takes none)")
        return json_response({"data": rates_view(book)})

    app.router.add_get("/v1/rates", list_rates)


OPERATIONS = [
    Operation(
        "GET",
        "/v1/rates",
        "Each configured pair: its value now, its sources' answers, its age, and why it would not quote",
        {200: RateList},
        tags=("operations",),
        problems=(422,),
    ),
]
