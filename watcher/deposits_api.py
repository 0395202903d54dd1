"""`GET /v1/deposit-balances`: the deposit addresses that still hold money, for sweeping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

import structlog
from aiohttp import web
from pydantic import BaseModel, Field

from .api import Problem, invalid, json_response, query_int, single_query
from .balances import BalanceError, BatchTransport, DepositAddress, funded_deposits
from .chain import RpcError
from .openapi import Operation
from .schemas import API_MODEL, QUERY_MODEL, Address, AtomicAmount, DecimalText
from .store import Store
from .store.deposits import paid_deposit_addresses

log = structlog.get_logger("watcher.deposits")


class _Out(BaseModel):
    model_config = API_MODEL


class DepositBalance(_Out):
    network: str
    address: Address
    derivation_index: int | None = Field(description="the address is <deposit_xpub>/0/<derivation_index>")
    asset: str
    amount_atomic: AtomicAmount = Field(
        description="what the address holds of the asset, at the node's latest block"
    )
    amount: DecimalText
    native_balance_atomic: AtomicAmount = Field(
        description="the chain's coin on the address: gas for a sweep"
    )


class DepositBalanceList(_Out):
    data: list[DepositBalance]
    total: int
    limit: int
    offset: int


class DepositBalanceQuery(BaseModel):
    model_config = QUERY_MODEL

    network: str | None = None
    limit: Annotated[int, Field(ge=1, le=200)] = 50
    offset: Annotated[int, Field(ge=0, le=10**9)] = 0


async def deposit_balances(
    store: Store,
    transports: Mapping[str, BatchTransport],
    max_batch: Mapping[str, int],
    network: str | None = None,
) -> list[dict]:
    """Every funded deposit address (of one network, or all), read from the nodes now."""
    networks = [network] if network is not None else list(transports)
    deposits = [
        DepositAddress(
            r["network"],
            r["address"].lower(),
            r["derivation_index"],
            r["asset"],
            r["token_contract"].lower() if r["token_contract"] else None,
            r["decimals"],
        )
        for r in paid_deposit_addresses(store.db, networks)
    ]
    return await funded_deposits(transports, deposits, max_batch=max_batch)


def add_deposit_balance_routes(
    app: web.Application, store: Store, transports: Mapping[str, BatchTransport], max_batch: Mapping[str, int]
) -> None:
    async def list_balances(request: web.Request) -> web.Response:
        for name in request.query:
            if name not in DepositBalanceQuery.model_fields:
                raise invalid(
                    name, f"unknown query parameter (known: {', '.join(DepositBalanceQuery.model_fields)})"
                )
        network = single_query(request, "network")
        if network is not None and network not in transports:
            raise invalid("network", f"is not a configured chain (configured: {', '.join(transports)})")
        limit = query_int(request, "limit", 50, 1, 200)
        offset = query_int(request, "offset", 0, 0, 10**9)
        try:
            rows = await deposit_balances(store, transports, max_batch, network)
        except (RpcError, BalanceError) as exc:
            log.warning("deposit_balances_failed", error=str(exc))
            raise Problem(
                503,
                "Node unavailable",
                f"could not read the balances from the node: {exc}",
                slug="node-unavailable",
            ) from None
        return json_response(
            {"data": rows[offset : offset + limit], "total": len(rows), "limit": limit, "offset": offset}
        )

    app.router.add_get("/v1/deposit-balances", list_balances)


OPERATIONS = [
    Operation(
        "GET",
        "/v1/deposit-balances",
        "Deposit addresses that still hold funds (read from the node now), with the coin they hold for gas",
        {200: DepositBalanceList},
        query=DepositBalanceQuery,
        tags=("operations",),
        problems=(422, 503),
    ),
]
