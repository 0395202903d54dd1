"""keccak-256, Ethereum's hash: EIP-55 checksums, log blooms, the router's id hashes.

From safe-pysha3's C extension, which imports in a few milliseconds. eth-hash (web3's) costs
about a tenth of a second before the API can answer (the config checks EIP-55 checksums):
its pycryptodome backend loads its C code through cffi, which parses C declarations at
import, and eth-hash reads its own version through importlib.metadata.
"""

from __future__ import annotations

from sha3 import keccak_256

__all__ = ["keccak"]


def keccak(data: bytes) -> bytes:
    """The 32-byte keccak-256 digest of `data` (Ethereum's, not the standardised SHA3-256)."""
    return keccak_256(data).digest()
