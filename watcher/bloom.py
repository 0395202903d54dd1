"""A block header's `logsBloom`: which logs a block cannot hold.

Every log sets three of the bloom's 2,048 bits for its address and three for each topic
(the low 11 bits of the first three byte pairs of the item's keccak). A bloom has no false
negatives: if any bit of an item is clear, no log of the block names that item, so the
block need not be asked for such logs. It has false positives (a busy block sets most
bits), so a set bit proves nothing: what it may hold is read from the node, by block hash.
"""

from __future__ import annotations

from functools import lru_cache

from .keccak import keccak

__all__ = ["bloom_mask", "may_contain"]


@lru_cache(maxsize=65_536)
def bloom_mask(item: str) -> int:
    """The bloom bits of a 20-byte address or 32-byte topic given as `0x` hex, as an int
    (bit k of the int is bit k of the bloom read as one big-endian number)."""
    digest = keccak(bytes.fromhex(item[2:]))
    mask = 0
    for i in (0, 2, 4):
        mask |= 1 << (((digest[i] << 8) | digest[i + 1]) & 2047)
    return mask


def may_contain(bloom: int, mask: int) -> bool:
    """Might the block hold a log with every item of `mask` (the OR of their masks)?"""
    return bloom & mask == mask
