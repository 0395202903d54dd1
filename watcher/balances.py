"""What is still on the deposit addresses: their asset balance and the coin for gas, read
from the node.

Money paid to a deposit address stays there until the operator sweeps it with the
mnemonic (the watcher holds only the xpub and cannot move it). An ERC-20 address also needs
some of the chain's coin to pay for that sweep, hence `native_balance_atomic` beside each
row. Balances are read at the node's latest block in JSON-RPC batches (`balanceOf` by
`eth_call` for tokens, `eth_getBalance` for the coin), at most `max_batch` calls a request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .addresses import to_checksum
from .domain import format_units

BALANCE_OF = "0x70a08231"  # balanceOf(address)
DEFAULT_MAX_BATCH = 100


class BatchTransport(Protocol):
    async def batch(self, calls: Sequence[tuple[str, list]]) -> list[Any]: ...


class BalanceError(Exception):
    """The node did not answer a balance (or answered something that is not one)."""


@dataclass(frozen=True)
class DepositAddress:
    """An address-rail option's destination: where a payment in `asset` was sent."""

    network: str
    address: str  # lowercase
    derivation_index: int | None
    asset: str
    token_contract: str | None  # lowercase; None for the coin
    decimals: int


def _quantity(value: Any, what: str) -> int:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise BalanceError(f"{what}: the node answered {str(value)[:80]!r}, not a hex quantity")
    digits = value[2:] or "0"
    try:
        number = int(digits, 16)
    except ValueError:
        raise BalanceError(f"{what}: the node answered a malformed quantity") from None
    if number >= 2**256:
        raise BalanceError(f"{what}: the node answered more than a uint256")
    return number


def balance_calls(deposits: Sequence[DepositAddress]) -> list[tuple[str, list]]:
    """Per deposit, the coin's balance, then (for a token) its `balanceOf`."""
    calls: list[tuple[str, list]] = []
    for d in deposits:
        calls.append(("eth_getBalance", [d.address, "latest"]))
        if d.token_contract is not None:
            data = BALANCE_OF + "0" * 24 + d.address[2:]
            calls.append(("eth_call", [{"to": d.token_contract, "data": data}, "latest"]))
    return calls


async def read_balances(
    transport: BatchTransport, deposits: Sequence[DepositAddress], *, max_batch: int = DEFAULT_MAX_BATCH
) -> list[tuple[int, int]]:
    """(asset balance, native balance) per deposit, in order, asked in batches of at most
    `max_batch` calls. A deposit's calls may straddle two batches; that is fine, each call
    stands alone."""
    if max_batch < 1:
        raise ValueError("max_batch must be at least 1")
    calls = balance_calls(deposits)
    answers: list[Any] = []
    for start in range(0, len(calls), max_batch):
        chunk = calls[start : start + max_batch]
        got = await transport.batch(chunk)
        if not isinstance(got, list) or len(got) != len(chunk):
            raise BalanceError("the node's batch answer does not have one result per call")
        answers.extend(got)
    out, i = [], 0
    for d in deposits:
        native = _quantity(answers[i], f"eth_getBalance({d.address})")
        i += 1
        if d.token_contract is None:
            out.append((native, native))
            continue
        raw = answers[i]
        i += 1
        if raw in ("0x", None):
            raise BalanceError(
                f"balanceOf({d.address}) on {d.token_contract}: no answer (is it a token contract?)"
            )
        out.append((_quantity(raw, f"balanceOf({d.address})"), native))
    return out


def balance_row(deposit: DepositAddress, amount: int, native: int) -> dict:
    """A row of `GET /v1/deposit-balances`."""
    return {
        "network": deposit.network,
        "address": to_checksum(deposit.address),
        "derivation_index": deposit.derivation_index,
        "asset": deposit.asset,
        "amount_atomic": str(amount),
        "amount": format_units(amount, deposit.decimals),
        "native_balance_atomic": str(native),
    }


async def funded_deposits(
    transports: Mapping[str, BatchTransport],
    deposits: Iterable[DepositAddress],
    *,
    max_batch: Mapping[str, int] | None = None,
) -> list[dict]:
    """The rows of the deposits that still hold some of their asset, in the order given."""
    by_network: dict[str, list[DepositAddress]] = {}
    for d in deposits:
        by_network.setdefault(d.network, []).append(d)
    funded: dict[tuple[str, str], dict] = {}
    for network, group in by_network.items():
        transport = transports.get(network)
        if transport is None:
            raise BalanceError(f"no node for network {network!r} (is the chain still configured?)")
        cap = (max_batch or {}).get(network, DEFAULT_MAX_BATCH)
        for d, (amount, native) in zip(
            group, await read_balances(transport, group, max_batch=cap), strict=True
        ):
            if amount > 0:
                funded[(d.network, d.address)] = balance_row(d, amount, native)
    return [funded[key] for d in _ordered(by_network) if (key := (d.network, d.address)) in funded]


def _ordered(by_network: dict[str, list[DepositAddress]]) -> list[DepositAddress]:
    return [d for group in by_network.values() for d in group]
