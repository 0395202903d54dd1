"""Chainlink price feeds (AggregatorV3Interface) read with `eth_call` on a chain's own nodes.

web3.py's contract interface does the ABI work here, over our own `Transport` (the chain's
failover transport): no other connection, no other service to trust. web3 is imported at the
first read (web3provider.py), not at start-up: it takes over a second. Every read is pinned to
one block, the node's latest, so the round and the chain time it is judged against agree.
What the answer means (stale, incomplete, non-positive) is decided by the caller: this module
only reads and normalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .reader import RpcCounts
from .transport import RpcError, Transport

if TYPE_CHECKING:
    from web3 import AsyncWeb3

_ROUND_OUTPUTS = [
    {"name": "roundId", "type": "uint80"},
    {"name": "answer", "type": "int256"},
    {"name": "startedAt", "type": "uint256"},
    {"name": "updatedAt", "type": "uint256"},
    {"name": "answeredInRound", "type": "uint80"},
]
AGGREGATOR_V3_ABI: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "decimals",
        "stateMutability": "view",
        "inputs": [],
        "outputs": [{"name": "", "type": "uint8"}],
    },
    {
        "type": "function",
        "name": "latestRoundData",
        "stateMutability": "view",
        "inputs": [],
        "outputs": _ROUND_OUTPUTS,
    },
]


class FeedUnreadable(RpcError):
    """The feed could not be read: no answer from the nodes, a revert, no contract at the
    address, or an answer that does not decode as AggregatorV3Interface."""


@dataclass(frozen=True)
class Round:
    round_id: int
    answer: int
    started_at: int
    updated_at: int
    answered_in_round: int


@dataclass(frozen=True)
class FeedReading:
    """A feed's latest round as of one block, with that block's number and timestamp."""

    feed: str
    decimals: int
    round: Round
    block_number: int
    block_timestamp: int


class PriceFeedReader:
    """Reads AggregatorV3Interface feeds on one chain. `decimals()` never changes for a feed,
    so it is read once per feed."""

    def __init__(self, transport: Transport, counts: RpcCounts | None = None) -> None:
        self.transport = transport
        self.counts = counts
        self._w3: AsyncWeb3 | None = None
        self._decimals: dict[str, int] = {}

    @property
    def w3(self) -> AsyncWeb3:
        if self._w3 is None:
            from .web3provider import web3_over  # web3 at the first read, not at start-up

            self._w3 = web3_over(self.transport, self.counts)
        return self._w3

    async def latest_block(self) -> tuple[int, int]:
        """(number, timestamp) of the node's latest block."""
        block = await self._call("eth_getBlockByNumber", ["latest", False])
        if not isinstance(block, dict):
            raise FeedUnreadable("eth_getBlockByNumber", "the node has no latest block")
        try:
            return int(block["number"], 16), int(block["timestamp"], 16)
        except (KeyError, TypeError, ValueError):
            raise FeedUnreadable(
                "eth_getBlockByNumber", "the latest block has no number or timestamp"
            ) from None

    async def read(self, feed: str, block: tuple[int, int] | None = None) -> FeedReading:
        """The feed's latest round as of `block` (number, timestamp): by default the latest."""
        from eth_utils import to_checksum_address  # loaded with web3 anyway

        from .web3provider import Web3Exception

        number, timestamp = block if block is not None else await self.latest_block()
        contract = self.w3.eth.contract(address=to_checksum_address(feed), abi=AGGREGATOR_V3_ABI)
        try:
            if feed not in self._decimals:
                self._decimals[feed] = int(await contract.functions.decimals().call(block_identifier=number))
            values = await contract.functions.latestRoundData().call(block_identifier=number)
        except RpcError as exc:
            raise FeedUnreadable("eth_call", f"feed {to_checksum_address(feed)}: {exc}") from None
        except (Web3Exception, ValueError, TypeError, OverflowError) as exc:
            raise FeedUnreadable(
                "eth_call",
                f"feed {to_checksum_address(feed)} does not answer as AggregatorV3Interface: {exc}",
            ) from None
        round_id, answer, started_at, updated_at, answered_in_round = (int(v) for v in values)
        return FeedReading(
            feed.lower(),
            self._decimals[feed],
            Round(round_id, answer, started_at, updated_at, answered_in_round),
            number,
            timestamp,
        )

    async def _call(self, method: str, params: list) -> Any:
        if self.counts is not None:
            self.counts.called(method)
        return await self.transport.call(method, params)
