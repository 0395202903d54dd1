"""`/openapi.json`: an OpenAPI 3.1 document built from the models the routes are declared with.

Each route is declared once (`Operation`): its method and path, the pydantic model its
handler validates the body with, the query model, and the response models. The app is
routed from the same declarations, so a route cannot exist without its entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .schemas import Problem

JSON = "application/json"
PROBLEM = "application/problem+json"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    # a model, or (media type, schema); the schema may be a function that builds it (when the
    # document is built: at the first GET /openapi.json)
    responses: dict[int, type[BaseModel] | tuple[str, dict | Callable[[], dict]]]
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    auth: bool = True
    tags: tuple[str, ...] = ()
    problems: tuple[int, ...] = ()  # problem+json answers besides 401 (added when auth) and 413
    extra: dict[str, Any] = field(default_factory=dict)


def add_openapi_route(app: web.Application, operations: list[Operation], *, version: str) -> None:
    """Serve the document of every declared route (this one included) at /openapi.json. It is
    built at the first request, not at start-up: the JSON schemas of every model take a while
    (the models are built on first use too: `defer_build`)."""
    own = Operation(
        "GET",
        "/openapi.json",
        "This document (OpenAPI 3.1)",
        {200: (JSON, {"type": "object"})},
        auth=False,
        tags=("operations",),
    )
    body: bytes | None = None

    async def openapi(request: web.Request) -> web.Response:
        nonlocal body
        if body is None:
            body = orjson.dumps(build_document([*operations, own], version=version))
        return web.Response(body=body, content_type=JSON)

    app.router.add_get("/openapi.json", openapi)


def _models(operations: list[Operation]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = [Problem]
    for op in operations:
        for model in (op.body, op.query, *op.responses.values()):
            if isinstance(model, type) and issubclass(model, BaseModel) and model not in seen:
                seen.append(model)
    return seen


def _parameters(op: Operation) -> list[dict[str, Any]]:
    """The path's parameters, then the query model's fields."""
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for name in _path_params(op.path)
    ]
    if op.query is not None:
        query_schema = op.query.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, prop in query_schema.get("properties", {}).items():
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": name in query_schema.get("required", []),
                    "schema": {k: v for k, v in prop.items() if k != "title"},
                }
            )
    return parameters


def _implied_problems(op: Operation) -> list[int]:
    """The problems a route can answer beyond its own: auth's, and a body's."""
    statuses = set(op.problems) | ({401, 429} if op.auth else set())
    if op.auth and op.method.upper() not in ("GET", "HEAD"):
        statuses |= {403}  # a read key on a route that changes data
    if op.body is not None or 413 in op.problems:
        statuses |= {400, 413, 415, 422}
    return sorted(statuses)


def build_document(operations: list[Operation], *, version: str) -> dict:
    models = _models(operations)
    keyed, defs = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
    )
    schemas = dict(defs.get("$defs", {}))

    def ref(model: type[BaseModel]) -> dict:
        return keyed[(model, "validation")]

    def problem(description: str) -> dict:
        return {"description": description, "content": {PROBLEM: {"schema": ref(Problem)}}}

    paths: dict[str, dict] = {}
    for op in operations:
        entry: dict[str, Any] = {"summary": op.summary, "operationId": _operation_id(op), "responses": {}}
        if op.tags:
            entry["tags"] = list(op.tags)
        if op.auth:
            entry["security"] = [{"bearer": []}]
        if parameters := _parameters(op):
            entry["parameters"] = parameters
        if op.body is not None:
            entry["requestBody"] = {"required": op.body_required, "content": {JSON: {"schema": ref(op.body)}}}
        for status, model in op.responses.items():
            if isinstance(model, tuple):
                media, given = model
                schema = given() if callable(given) else given
            else:
                media, schema = (PROBLEM if model is Problem else JSON), ref(model)
            entry["responses"][str(status)] = {
                "description": _reason(status),
                "content": {media: {"schema": schema}},
            }
        for status in _implied_problems(op):
            entry["responses"].setdefault(str(status), problem(_reason(status)))
        entry.update(op.extra)
        paths.setdefault(_openapi_path(op.path), {})[op.method.lower()] = entry

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "watcher",
            "version": version,
            "description": "Watches EVM chains for invoice payments. Money is a decimal string, "
            "atomic amounts are uint256 base-10 strings.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _openapi_path(path: str) -> str:
    return path  # aiohttp's {name} is OpenAPI's {name}


def _operation_id(op: Operation) -> str:
    words = [p.strip("{}") for p in op.path.strip("/").split("/") if p not in ("v1",)]
    return op.method.lower() + "_" + "_".join(w.replace("-", "_") for w in words)


_REASONS = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "Malformed JSON",
    401: "Missing or wrong API key",
    403: "A read key on a route that changes data",
    404: "Not found",
    405: "Method not allowed",
    409: "State conflict",
    413: "Body over 64 KiB",
    415: "Body not sent as application/json",
    422: "Invalid field",
    429: "Too many failed authentications from this address",
    503: "Not ready",
}


def _reason(status: int) -> str:
    return _REASONS.get(status, str(status))
