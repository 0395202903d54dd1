"""Which chain a node serves, beyond its chain id: its genesis block.

A chain id is only a number: a reset test chain, or another network, answers the same one.
Block 0's hash is what tells them apart. The database records it the first time it follows a
chain (`Store.remember_genesis`); from then on a node whose block 0 differs is refused, since
following it from the old checkpoint would read another chain's blocks as ours.
"""

from __future__ import annotations

from .chain import ChainReader
from .config import ConfigError


class WrongChain(ConfigError):
    """A node serves another chain than the one the database follows (exit 2 at start-up)."""


async def node_genesis(reader: ChainReader) -> str | None:
    """The hash of the node's block 0 (lowercase), or None when it does not serve that block."""
    [header] = await reader.headers([0])
    return None if header is None else header.hash


def wrong_chain_message(network: str, chain_id: int, stored: str, found: str, database: str) -> str:
    """One line for the operator: which chain, both hashes, and the two ways out."""
    return (
        f"chain {network!r} (chain id {chain_id}) is another chain than this database follows: "
        f"the node's genesis block is {found}, the database's is {stored} (a reset test chain, "
        "or another network with the same chain id); point rpc_urls at a node of the chain the "
        "database follows, or start on a fresh database "
        f"(move {database} aside) to follow this chain from scratch"
    )
