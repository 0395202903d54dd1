"""web3.py over our own `Transport`: the price feeds' ABI work, on the chain's own nodes.

Its own module because web3 takes over a second to import: it is loaded at the first read
of a price feed (watcher/chain/pricefeed.py), not when the daemon starts.
"""

from __future__ import annotations

import itertools
from typing import Any

from web3 import AsyncWeb3
from web3.exceptions import Web3Exception
from web3.providers.async_base import AsyncBaseProvider
from web3.types import RPCEndpoint, RPCResponse

from .reader import RpcCounts
from .transport import Transport

__all__ = ["TransportProvider", "Web3Exception", "web3_over"]


class TransportProvider(AsyncBaseProvider):
    """web3's provider interface over our `Transport`, so web3 talks to the same nodes, with the
    same failover and retries, as the follower. Errors stay ours (`RpcError`)."""

    def __init__(self, transport: Transport, counts: RpcCounts | None = None) -> None:
        super().__init__()
        self.transport = transport
        self.counts = counts
        self._ids = itertools.count(1)

    async def make_request(self, method: RPCEndpoint, params: Any) -> RPCResponse:
        if self.counts is not None:
            self.counts.called(str(method))
        result = await self.transport.call(str(method), list(params))
        return {"jsonrpc": "2.0", "id": next(self._ids), "result": result}

    async def is_connected(self, show_traceback: bool = False) -> bool:
        return True


def web3_over(transport: Transport, counts: RpcCounts | None = None) -> AsyncWeb3:
    return AsyncWeb3(TransportProvider(transport, counts), middleware=[])
