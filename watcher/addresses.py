"""Deposit addresses from an account xpub, EIP-55 checksums and EIP-681 payment URIs.

The watcher only ever holds the account-level *public* key (m/44'/60'/account'), so it can
hand out a fresh deposit address per payment option without being able to spend from it.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from .domain import UINT256_MAX
from .keccak import keccak

if TYPE_CHECKING:
    from bip_utils.bip.bip32.base import Bip32Base

__all__ = [
    "AddressDeriver",
    "account_xpub_from_mnemonic",
    "check_xpub",
    "native_payment_uri",
    "normalize_address",
    "router_payment_uri",
    "parse_xpub",
    "to_checksum",
    "token_payment_uri",
]

_HARDENED = 2**31
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")


def _eip55(digits: str) -> str:
    """EIP-55: each letter of the lowercase hex address is upper case where the matching
    nibble of keccak(address text) is 8 or more. (eth_utils has it, but importing eth_utils
    costs a tenth of a second of start-up; this is the whole rule.)"""
    digest = keccak(digits.encode()).hex()
    return "0x" + "".join(
        c.upper() if int(h, 16) >= 8 else c for c, h in zip(digits, digest[:40], strict=True)
    )


def normalize_address(address: str) -> str:
    """Lowercase an address given in any case; a mixed-case one must carry a valid EIP-55
    checksum, because a wrong checksum means a typo and funds sent to a typo are lost."""
    if not isinstance(address, str) or not _ADDRESS_RE.match(address):
        raise ValueError("must be a 0x-prefixed 40-digit hex address")
    digits = address[2:]
    if digits != digits.lower() and digits != digits.upper() and _eip55(digits.lower()) != address:
        raise ValueError("has a bad EIP-55 checksum (mixed case that does not match); check for a typo")
    return "0x" + digits.lower()


def to_checksum(address: str) -> str:
    """EIP-55 form of an address, for output (the API and payment URIs show checksummed addresses)."""
    return _eip55(normalize_address(address)[2:])


_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_XPUB, _XPRV = bytes.fromhex("0488b21e"), bytes.fromhex("0488ade4")  # BIP-32 main-net versions
_SECP256K1_P = 2**256 - 2**32 - 977


def _base58check(text: str) -> bytes | None:
    number = 0
    for char in text:
        digit = _BASE58.find(char)
        if digit < 0:
            return None
        number = number * 58 + digit
    raw = b"\0" * (len(text) - len(text.lstrip("1"))) + number.to_bytes((number.bit_length() + 7) // 8, "big")
    body, checksum = raw[:-4], raw[-4:]
    return body if hashlib.sha256(hashlib.sha256(body).digest()).digest()[:4] == checksum else None


def check_xpub(xpub: str) -> None:
    """What `parse_xpub` checks, without bip_utils (a quarter of a second to import, at
    start-up, for the config's deposit_xpub): a base58check BIP-32 main-net public key of
    78 bytes, a master key's parent and index zero, and a compressed point on secp256k1.
    A private key is refused with its own message."""
    if not isinstance(xpub, str) or not xpub.strip():
        raise ValueError("must be an extended public key (xpub...)")
    raw = _base58check(xpub.strip())
    if raw is not None and raw[:4] == _XPRV:
        raise ValueError("is a private extended key; give the account xpub (m/44'/60'/0'), never the xprv")
    if raw is None or len(raw) != 78 or raw[:4] != _XPUB:
        raise ValueError("is not a valid extended public key (xpub...)")
    depth, parent, index, key = raw[4], raw[5:9], raw[9:13], raw[45:]
    x = int.from_bytes(key[1:], "big")
    on_curve = x < _SECP256K1_P and pow(x**3 + 7, (_SECP256K1_P - 1) // 2, _SECP256K1_P) in (0, 1)
    if key[0] not in (2, 3) or not on_curve or (depth == 0 and (any(parent) or any(index))):
        raise ValueError("is not a valid extended public key (xpub...)")


def parse_xpub(xpub: str) -> Bip32Base:
    """Parse an extended key and insist it is public: a private key must never reach the watcher."""
    check_xpub(xpub)
    from bip_utils import Bip32Secp256k1  # a quarter of a second: imported when an xpub is parsed

    try:
        node = Bip32Secp256k1.FromExtendedKey(xpub.strip())
    except Exception:  # bip_utils raises several types; the key text is deliberately not echoed
        raise ValueError("is not a valid extended public key (xpub...)") from None
    if not node.IsPublicOnly():
        raise ValueError("is a private extended key; give the account xpub (m/44'/60'/0'), never the xprv")
    return node


def account_xpub_from_mnemonic(mnemonic: str, account: int = 0, *, passphrase: str = "") -> str:
    """The xpub of m/44'/60'/account' for a BIP-39 mnemonic (and optional BIP-39 passphrase):
    `watcher xpub`, the sandbox and tests."""
    if not 0 <= account < _HARDENED:
        raise ValueError(f"account must be in 0..{_HARDENED - 1}")
    from bip_utils import Bip39SeedGenerator, Bip44, Bip44Coins

    seed = Bip39SeedGenerator(mnemonic).Generate(passphrase)
    ctx = Bip44.FromSeed(seed, Bip44Coins.ETHEREUM).Purpose().Coin().Account(account)
    return ctx.PublicKey().ToExtended()


class AddressDeriver:
    """Derives deposit addresses <xpub>/0/<index>. Built once per chain: the external-chain
    node (<xpub>/0) is derived here once so each derive() costs a single child derivation."""

    __slots__ = ("_external",)

    def __init__(self, xpub: str) -> None:
        self._external = parse_xpub(xpub).ChildKey(0)

    def derive(self, index: int) -> str:
        """Lowercase 0x address at <xpub>/0/<index> (non-hardened, so 0..2**31-1)."""
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < _HARDENED:
            raise ValueError(f"index must be an integer in 0..{_HARDENED - 1}")
        pub = self._external.ChildKey(index).PublicKey().KeyObject()
        raw = pub.RawUncompressed().ToBytes()  # 0x04 || X || Y
        return "0x" + keccak(raw[1:])[-20:].hex()

    def __repr__(self) -> str:  # the xpub reveals every address; keep it out of logs
        return "AddressDeriver(<xpub>)"


def _check_uri_numbers(chain_id: int, amount_atomic: int) -> None:
    if isinstance(chain_id, bool) or not isinstance(chain_id, int) or chain_id <= 0:
        raise ValueError("chain_id must be a positive integer")
    if isinstance(amount_atomic, bool) or not isinstance(amount_atomic, int):
        raise ValueError("amount_atomic must be an integer")
    if not 0 <= amount_atomic <= UINT256_MAX:
        raise ValueError("amount_atomic must fit in uint256")


def token_payment_uri(token: str, chain_id: int, destination: str, amount_atomic: int) -> str:
    """EIP-681 URI for an ERC-20 transfer, which wallets turn into transfer(destination, amount)."""
    _check_uri_numbers(chain_id, amount_atomic)
    return (
        f"ethereum:{to_checksum(token)}@{chain_id}/transfer"
        f"?address={to_checksum(destination)}&uint256={amount_atomic}"
    )


def native_payment_uri(destination: str, chain_id: int, amount_atomic: int) -> str:
    """EIP-681 URI for a plain transfer of the chain's native coin (value in wei)."""
    _check_uri_numbers(chain_id, amount_atomic)
    return f"ethereum:{to_checksum(destination)}@{chain_id}?value={amount_atomic}"


def router_payment_uri(call: dict[str, str], chain_id: int) -> str:
    """EIP-681 URI for `PaymentRouter.pay(invoiceId, paymentId, token, recipient, amount)`, with
    `value` when the coin itself is paid (token is the zero address). A token payment needs an
    `approve(router, amount)` first, which a URI cannot express; integrators show both steps."""
    amount = int(call["amount"])
    _check_uri_numbers(chain_id, amount)
    native = int(call["token"], 16) == 0
    return (
        f"ethereum:{to_checksum(call['router'])}@{chain_id}/pay"
        f"?bytes32={call['invoice_id_hash']}&bytes32={call['payment_id_hash']}"
        f"&address={to_checksum(call['token'])}&address={to_checksum(call['recipient'])}&uint256={amount}"
        + (f"&value={amount}" if native else "")
    )
