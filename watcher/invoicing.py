"""Turns a validated create request into payment options: which assets, at what quote, where.

Pure apart from address derivation (which the store calls inside its transaction, so an
index is allocated exactly once).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence

from .addresses import AddressDeriver, native_payment_uri, token_payment_uri
from .config import ChainSettings, Settings
from .domain import UINT256_MAX, format_units, quote_atomic
from .store import OptionSpec


class OptionsError(ValueError):
    """The request cannot be turned into options; `field` says which part of it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


SUPPORTED_RAILS = ("address",)
SUPPORTED_KINDS = ("erc20",)


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
        self._derivers = {c.deposit_xpub: AddressDeriver(c.deposit_xpub) for c in settings.chains if c.deposit_xpub}
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
            return [a for a in self.assets if a.kind in SUPPORTED_KINDS]
        chosen: list[AssetRef] = []
        for i, name in enumerate(wanted):
            network, _, symbol = name.rpartition(":")
            found = [
                a for a in self.assets
                if a.symbol.lower() == symbol.lower() and (not network or a.chain.name == network.lower())
            ]
            if not found:
                raise OptionsError(f"assets[{i}]", f"no configured asset {name!r}")
            unsupported = [a for a in found if a.kind not in SUPPORTED_KINDS]
            if unsupported and len(unsupported) == len(found):
                raise OptionsError(f"assets[{i}]", f"{name!r} is a {found[0].kind} asset; this version watches ERC-20 deposits only")
            chosen += [a for a in found if a not in chosen and a.kind in SUPPORTED_KINDS]
        return chosen

    def build(
        self,
        amount: Decimal,
        assets: Sequence[str] | None,
        rails: Sequence[str],
        quote_rates: dict[str, Decimal],
    ) -> list[OptionSpec]:
        for i, rail in enumerate(rails):
            if rail not in SUPPORTED_RAILS:
                raise OptionsError(f"rails[{i}]", f"rail {rail!r} is not supported by this version (supported: address)")
        rates = {k.lower(): v for k, v in quote_rates.items()}
        specs: list[OptionSpec] = []
        for asset in self.select_assets(assets):
            rate = rates.get(f"{asset.chain.name}:{asset.symbol}".lower(), rates.get(asset.symbol.lower(), asset.usd_rate))
            if rate is None:
                continue  # cannot be quoted: left out
            atomic = quote_atomic(amount, rate, asset.decimals)
            if atomic > UINT256_MAX:
                raise OptionsError("amount", f"the amount in {asset.symbol} does not fit in uint256")
            if atomic == 0:
                continue
            confirmations = asset.chain.confirmations if isinstance(asset.chain.confirmations, int) else 0
            for rail in rails:
                if rail == "address" and asset.chain.deposit_xpub:
                    specs.append(
                        OptionSpec(
                            rail="address", network=asset.chain.name, chain_id=asset.chain.chain_id, asset=asset.symbol,
                            token_contract=asset.contract, decimals=asset.decimals,
                            quoted_amount=format_units(atomic, asset.decimals), quote_rate=format(rate, "f"),
                            amount_atomic=atomic, required_confirmations=confirmations, xpub=asset.chain.deposit_xpub,
                        )
                    )
        return specs


def finish_option(spec: OptionSpec, destination: str, invoice_id: str, option_id: str) -> tuple[str, dict | None]:
    """The EIP-681 URI once the destination is known (the contract rail will add its router call)."""
    if spec.token_contract:
        return token_payment_uri(spec.token_contract, spec.chain_id, destination, spec.amount_atomic), None
    return native_payment_uri(destination, spec.chain_id, spec.amount_atomic), None
