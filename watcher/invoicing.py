"""Turns a validated create request into payment options: which assets, at what quote, where.

Pure apart from address derivation (which the store calls inside its transaction, so an
index is allocated exactly once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from eth_utils import keccak

from .addresses import AddressDeriver, native_payment_uri, router_payment_uri, token_payment_uri
from .config import ChainSettings, Settings
from .domain import UINT256_MAX, format_units, quote_atomic, rfc3339
from .store import OptionSpec


class OptionsError(ValueError):
    """The request cannot be turned into options; `field` says which part of it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


SUPPORTED_RAILS = ("address", "contract")
ZERO_ADDRESS = "0x" + "00" * 20


@dataclass(frozen=True)
class AssetRef:
    chain: ChainSettings
    symbol: str
    kind: str
    contract: str | None
    decimals: int
    usd_rate: Decimal | None


class Invoicing:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._derivers = {
            c.deposit_xpub: AddressDeriver(c.deposit_xpub) for c in settings.chains if c.deposit_xpub
        }
        self.assets: list[AssetRef] = [
            AssetRef(chain, a.symbol, a.kind, a.contract, a.decimals, a.usd_rate)
            for chain in settings.chains
            for a in chain.assets
        ]

    def derive(self, xpub: str, index: int) -> str:
        return self._derivers[xpub].derive(index)

    def select_assets(self, wanted: Sequence[str] | None) -> list[AssetRef]:
        """`SYMBOL` or `network:SYMBOL`, case-insensitive; default every configured asset."""
        if wanted is None:
            return list(self.assets)
        chosen: list[AssetRef] = []
        for i, name in enumerate(wanted):
            network, _, symbol = name.rpartition(":")
            found = [
                a
                for a in self.assets
                if a.symbol.lower() == symbol.lower() and (not network or a.chain.name == network.lower())
            ]
            if not found:
                raise OptionsError(f"assets[{i}]", f"no configured asset {name!r}")
            chosen += [a for a in found if a not in chosen]
        return chosen

    def build_or_refuse(
        self,
        amount: Decimal,
        assets: Sequence[str] | None,
        rails: Sequence[str],
        quote_rates: dict[str, Decimal],
    ) -> list[OptionSpec]:
        """`build`, refusing an empty result: no invoice to pay may end up with nothing to pay with."""
        specs = self.build(amount, assets, rails, quote_rates)
        if not specs:
            raise OptionsError(
                "assets",
                "no payment option can be built: no asset can be quoted (give quote_rates), or no chain has a "
                "deposit_xpub (address rail) or a router_address and merchant_address (contract rail)",
            )
        return specs

    def build_from_request(self, amount: Decimal, request: dict[str, Any]) -> list[OptionSpec]:
        """Options for an invoice's stored options request (`NewInvoice.request`): at finalize and
        at a checkout-session refresh. Quote rates are stored as decimal strings."""
        rates = {k: Decimal(v) for k, v in (request.get("quote_rates") or {}).items()}
        return self.build_or_refuse(amount, request.get("assets"), request.get("rails") or ["address"], rates)

    def build(
        self,
        amount: Decimal,
        assets: Sequence[str] | None,
        rails: Sequence[str],
        quote_rates: dict[str, Decimal],
    ) -> list[OptionSpec]:
        for i, rail in enumerate(rails):
            if rail not in SUPPORTED_RAILS:
                raise OptionsError(f"rails[{i}]", f"unknown rail {rail!r} (known: address, contract)")
        known = {a.symbol.lower() for a in self.assets} | {
            f"{a.chain.name}:{a.symbol}".lower() for a in self.assets
        }
        for name in quote_rates:
            if name.lower() not in known:
                raise OptionsError(
                    f"quote_rates.{name}",
                    f"no configured asset {name!r} (a rate names SYMBOL or network:SYMBOL)",
                )
        rates = {k.lower(): v for k, v in quote_rates.items()}
        specs: list[OptionSpec] = []
        for asset in self.select_assets(assets):
            rate = rates.get(
                f"{asset.chain.name}:{asset.symbol}".lower(), rates.get(asset.symbol.lower(), asset.usd_rate)
            )
            if rate is None:
                continue  # cannot be quoted: left out
            atomic = quote_atomic(amount, rate, asset.decimals)
            if atomic > UINT256_MAX:
                raise OptionsError("amount", f"the amount in {asset.symbol} does not fit in uint256")
            if atomic == 0:
                continue
            confirmations = asset.chain.confirmations if isinstance(asset.chain.confirmations, int) else 0
            common = dict(
                network=asset.chain.name,
                chain_id=asset.chain.chain_id,
                asset=asset.symbol,
                token_contract=asset.contract,
                decimals=asset.decimals,
                quoted_amount=format_units(atomic, asset.decimals),
                quote_rate=format(rate, "f"),
                amount_atomic=atomic,
                required_confirmations=confirmations,
            )
            for rail in rails:
                if rail == "address" and asset.chain.deposit_xpub:
                    specs.append(OptionSpec(rail="address", xpub=asset.chain.deposit_xpub, **common))
                elif rail == "contract" and asset.chain.router_address and asset.chain.merchant_address:
                    specs.append(
                        OptionSpec(
                            rail="contract",
                            destination=asset.chain.merchant_address,
                            router=asset.chain.router_address,
                            **common,
                        )
                    )
        return specs


def finish_option(
    spec: OptionSpec, destination: str, invoice_id: str, option_id: str
) -> tuple[str, dict | None]:
    """The EIP-681 URI once the destination and ids are known, and for the contract rail the
    router call that pays it (its hashes are what the follower finds in `PaymentReceived`)."""
    if spec.rail == "contract":
        assert spec.router is not None
        call = {
            "router": spec.router,
            "invoice_id_hash": "0x" + keccak(text=invoice_id).hex(),
            "payment_id_hash": "0x" + keccak(text=option_id).hex(),
            "token": spec.token_contract or ZERO_ADDRESS,
            "recipient": destination,
            "amount": str(spec.amount_atomic),
        }
        return router_payment_uri(call, spec.chain_id), call
    if spec.token_contract:
        return token_payment_uri(spec.token_contract, spec.chain_id, destination, spec.amount_atomic), None
    return native_payment_uri(destination, spec.chain_id, spec.amount_atomic), None


def session_timing(timing: dict[str, Any], now: float) -> tuple[dict[str, Any], int]:
    """A payment session's `payment_timing` started at `now`: its input fields (mode, minutes or
    days and grace) with `payable_until` (and `due_at`) computed; returns (timing, payable_until)."""
    if timing["mode"] == "immediate":
        minutes = timing["expires_after_minutes"]
        payable_until = int(now) + minutes * 60
        return {
            "mode": "immediate",
            "expires_after_minutes": minutes,
            "payable_until": rfc3339(payable_until),
        }, payable_until
    due_days = timing.get("due_after_days") or 0
    grace = timing.get("grace_period_days") or 0
    due_at = int(now) + due_days * 86400
    payable_until = due_at + grace * 86400
    return {
        "mode": "due_date",
        "due_after_days": due_days,
        "grace_period_days": grace,
        "due_at": rfc3339(due_at),
        "payable_until": rfc3339(payable_until),
    }, payable_until
