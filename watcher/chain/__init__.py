"""Talking to a node, and the only place that sees what nodes send.

`transport` speaks JSON-RPC over HTTP (batches, retries) and `failover` puts several
endpoints behind one transport; `reader` turns answers into our own types (`ChainReader`);
`traces` reads inner transfers from the node's tracers; `heads` follows `newHeads` over a
WebSocket. Imports run one way: transport <- failover <- traces <- reader; heads uses failover.
"""

from .reader import (
    BLOCK_BATCH,
    MAX_BATCH,
    TRACE_BATCH,
    TRANSFER_TOPIC,
    BlockUnknown,
    ChainReader,
    FoundLogs,
    JsonRpcReader,
    LogQuery,
    RpcCounts,
    address_topic,
    decode_full_block,
    decode_header,
    decode_router_log,
    decode_transfer_log,
)
from .transport import METHOD_NOT_FOUND, RETRY_DELAYS, BatchRefused, HttpTransport, RpcError, Transport

__all__ = [
    "BLOCK_BATCH",
    "MAX_BATCH",
    "METHOD_NOT_FOUND",
    "RETRY_DELAYS",
    "TRACE_BATCH",
    "TRANSFER_TOPIC",
    "BatchRefused",
    "BlockUnknown",
    "ChainReader",
    "FoundLogs",
    "HttpTransport",
    "JsonRpcReader",
    "LogQuery",
    "RpcCounts",
    "RpcError",
    "Transport",
    "address_topic",
    "decode_full_block",
    "decode_header",
    "decode_router_log",
    "decode_transfer_log",
]
