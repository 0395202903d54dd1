"""`watcher rewind`: the operator's way out of a reorg deeper than the watcher remembers.

Such a reorg stops the chain (nothing applied, nothing confirmed) because no block the
watcher holds is on the node's chain any more, so it cannot tell which of its payments are
gone. The operator picks a block both chains surely share (from a block explorer, or simply
well below the fork) and rewinds to it: every payment above it is marked reverted and its
invoice judged again (the events are queued like any reorg's), the checkpoint becomes the
node's block at that height, and the daemon reads everything above it again on its next
start, detecting again each payment that is still there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .chain import JsonRpcReader, RpcError
from .chain.failover import FailoverTransport
from .config import ConfigError, Settings
from .store import Endpoint, Store


@dataclass(frozen=True)
class Rewound:
    network: str
    block: int
    block_hash: str
    previous: int | None
    payments_reverted: int


async def rewind(settings: Settings, chain_name: str, to_block: int) -> Rewound:
    """Move `chain_name`'s checkpoint back to `to_block` as the node has it now. ConfigError for a
    chain that is not configured or a block that is not below the checkpoint; RpcError when the
    node cannot say what the block is. Run it with the daemon stopped."""
    names = [c.name for c in settings.chains]
    if chain_name not in names:
        raise ConfigError(
            "--chain", f"is {chain_name!r}, not one of the configured chains ({', '.join(names)})"
        )
    chain = settings.chains[names.index(chain_name)]
    if not Path(settings.database).is_file():
        raise ConfigError("database", f"{settings.database} does not exist: there is nothing to rewind")
    store = Store(settings.database, clock=time.time)
    store.outbox.set_endpoints(
        Endpoint(w.url, tuple(w.events)) for w in settings.webhooks
    )  # the events it queues
    transport = FailoverTransport(chain.rpc_urls, retry_delays=(0.5, 1.0))
    try:
        cursor = store.cursor(chain_name)
        if cursor is None:
            raise ConfigError("--chain", f"{chain_name} has no checkpoint yet: there is nothing to rewind")
        if not 0 <= to_block < cursor.number:
            raise ConfigError(
                "--to-block", f"must be below the checkpoint {cursor.number} (and not negative)"
            )
        reader = JsonRpcReader(transport, max_batch=chain.max_batch)
        if (node_chain_id := await reader.chain_id()) != chain.chain_id:
            raise ConfigError(
                f"chains[{names.index(chain_name)}].chain_id",
                f"is {chain.chain_id} but the node answers {node_chain_id}",
            )
        stored_genesis = store.genesis_hash(chain_name)
        below = [b for b in store.recent_blocks(chain_name) if b.number <= to_block]
        numbers = sorted({to_block, 0, *(b.number for b in below)})
        node = dict(zip(numbers, await reader.headers(numbers), strict=True))
        header = node[to_block]
        if header is None:
            raise RpcError("eth_getBlockByNumber", f"the node has no block {to_block}")
        if stored_genesis is not None and node[0] is not None and node[0].hash != stored_genesis:
            raise ConfigError(
                "--chain",
                f"the node serves another chain than this database follows (genesis {node[0].hash}, "
                f"the database's {stored_genesis}): fix rpc_urls, do not rewind",
            )
        if differing := [b.number for b in below if (ref := node[b.number]) is None or ref.hash != b.hash]:
            raise ConfigError(
                "--to-block",
                f"block {max(differing)} of this database is not on the node's chain: "
                f"{to_block} is above the fork, pick a block below {min(differing)}",
            )
        reverted = store.revert_to(chain_name, header)
        return Rewound(chain_name, header.number, header.hash, cursor.number, len(reverted))
    finally:
        await transport.close()
        store.close()
