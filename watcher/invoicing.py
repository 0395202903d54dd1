"""Turns a validated create request into payment options: which assets, at what quote, where.

Pure apart from address derivation (which the store calls inside its transaction, so an
index is allocated exactly once).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .addresses import AddressDeriver, native_payment_uri, router_payment_uri, token_payment_uri
from .config import ChainSettings, Settings
from .domain import UINT256_MAX, format_units, rfc3339
from .keccak import keccak
from .rates.aggregate import PairValue
from .rates.book import RateBook
from .rates.quoting import USD, NoQuote, Quote, format_rate, price, quote_atomic, rate_graph
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


@dataclass(frozen=True)
class LeftOut:
    """An asset that could not be quoted, and why."""

    asset: AssetRef
    why: NoQuote

    def describe(self) -> str:
        return f"{self.asset.chain.name}:{self.asset.symbol} ({self.why.reason})"


class Invoicing:
    def __init__(
        self, settings: Settings, rates: RateBook | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        """`rates`: the live prices (None: no source has answered, so live assets do not quote)."""
        self.settings = settings
        self.rates = rates
        self.clock = clock
        self.graph = rate_graph(settings)
        # Invoices may be in USD or in any fiat code the configured pairs reach from USD.
        self.currencies = self.graph.currencies
        # Built at the first derivation: bip_utils is imported then, not at start-up.
        self._derivers: dict[str, AddressDeriver] = {}
        self.assets: list[AssetRef] = [
            AssetRef(chain, a.symbol, a.kind, a.contract, a.decimals, a.usd_rate)
            for chain in settings.chains
            for a in chain.assets
        ]

    def derive(self, xpub: str, index: int) -> str:
        deriver = self._derivers.get(xpub)
        if deriver is None:
            deriver = self._derivers[xpub] = AddressDeriver(xpub)
        return deriver.derive(index)

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
        currency: str = USD,
    ) -> list[OptionSpec]:
        """`build`, refusing an empty result: no invoice to pay may end up with nothing to pay with."""
        specs, left_out = self.quote(amount, assets, rails, quote_rates, currency)
        if not specs:
            pairs = list(dict.fromkeys(p for lo in left_out for p in lo.why.pairs))
            why = (
                "no asset can be quoted"
                + (f" (pairs that cannot quote now: {', '.join(pairs)})" if pairs else "")
                + (": " + "; ".join(lo.describe() for lo in left_out) if left_out else "")
            )
            raise OptionsError(
                "assets",
                f"no payment option can be built: {why}. Give quote_rates, or check that a chain has a "
                "deposit_xpub (address rail) or a router_address and merchant_address (contract rail)",
            )
        return specs

    def build_from_request(
        self, amount: Decimal, request: dict[str, Any], currency: str = USD
    ) -> list[OptionSpec]:
        """Options for an invoice's stored options request (`NewInvoice.request`): at finalize and
        at a checkout-session refresh, quoted anew. Quote rates are stored as decimal strings."""
        rates = {k: Decimal(v) for k, v in (request.get("quote_rates") or {}).items()}
        return self.build_or_refuse(
            amount, request.get("assets"), request.get("rails") or ["address"], rates, currency
        )

    def build(
        self,
        amount: Decimal,
        assets: Sequence[str] | None,
        rails: Sequence[str],
        quote_rates: dict[str, Decimal],
        currency: str = USD,
    ) -> list[OptionSpec]:
        return self.quote(amount, assets, rails, quote_rates, currency)[0]

    def check_currency(self, currency: str) -> None:
        if currency not in self.currencies:
            raise OptionsError(
                "currency",
                f"must be USD or a currency the configured [[rates]] reach from USD "
                f"(here: {', '.join(sorted(self.currencies))})",
            )

    def price(
        self, asset: AssetRef, currency: str, rates: dict[str, Fraction], pairs: Mapping[str, PairValue]
    ) -> Quote | NoQuote:
        """The request's quote_rates first, then live pairs, then the fixed usd_rate."""
        requested = rates.get(f"{asset.chain.name}:{asset.symbol}".lower(), rates.get(asset.symbol.lower()))
        if requested is not None:
            return Quote(requested, "request")
        return price(self.graph, asset.symbol, asset.usd_rate, currency, pairs)

    def quote(
        self,
        amount: Decimal,
        assets: Sequence[str] | None,
        rails: Sequence[str],
        quote_rates: dict[str, Decimal],
        currency: str = USD,
    ) -> tuple[list[OptionSpec], list[LeftOut]]:
        """The options, and the assets left out because they cannot be quoted now."""
        for i, rail in enumerate(rails):
            if rail not in SUPPORTED_RAILS:
                raise OptionsError(f"rails[{i}]", f"unknown rail {rail!r} (known: address, contract)")
        self.check_currency(currency)
        known = {a.symbol.lower() for a in self.assets} | {
            f"{a.chain.name}:{a.symbol}".lower() for a in self.assets
        }
        for name in quote_rates:
            if name.lower() not in known:
                raise OptionsError(
                    f"quote_rates.{name}",
                    f"no configured asset {name!r} (a rate names SYMBOL or network:SYMBOL)",
                )
        rates = {k.lower(): Fraction(v) for k, v in quote_rates.items()}
        now = self.clock()
        pairs = self.rates.pair_values(now) if self.rates is not None else {}
        specs: list[OptionSpec] = []
        left_out: list[LeftOut] = []
        for asset in self.select_assets(assets):
            quote = self.price(asset, currency, rates, pairs)
            if isinstance(quote, NoQuote):
                left_out.append(LeftOut(asset, quote))
                if quote.pairs and self.rates is not None:
                    self.rates.left_out(quote.pairs)
                continue
            atomic = quote_atomic(amount, quote.rate, asset.decimals)
            if atomic > UINT256_MAX:
                raise OptionsError("amount", f"the amount in {asset.symbol} does not fit in uint256")
            if atomic == 0:
                continue
            specs += self._specs(asset, rails, quote, atomic, now)
        return specs, left_out

    def _specs(
        self, asset: AssetRef, rails: Sequence[str], quote: Quote, atomic: int, now: float
    ) -> list[OptionSpec]:
        """One option per rail the asset's chain offers."""
        chain = asset.chain
        base = OptionSpec(
            rail="address",
            network=chain.name,
            chain_id=chain.chain_id,
            asset=asset.symbol,
            token_contract=asset.contract,
            decimals=asset.decimals,
            quoted_amount=format_units(atomic, asset.decimals),
            quote_rate=format_rate(quote.rate),
            amount_atomic=atomic,
            required_confirmations=chain.confirmations if isinstance(chain.confirmations, int) else 0,
            quote_source=quote.source,
            quoted_at=now,
        )
        specs: list[OptionSpec] = []
        for rail in rails:
            if rail == "address" and chain.deposit_xpub:
                specs.append(replace(base, xpub=chain.deposit_xpub))
            elif rail == "contract" and chain.router_address and chain.merchant_address:
                specs.append(
                    replace(
                        base, rail="contract", destination=chain.merchant_address, router=chain.router_address
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
            "invoice_id_hash": "0x" + keccak(invoice_id.encode()).hex(),
            "payment_id_hash": "0x" + keccak(option_id.encode()).hex(),
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
