"""A chain's reader and follower, built from its settings the same way in the daemon's process
and in the follower's (followproc.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from .chain import JsonRpcReader
from .chain.failover import FailoverTransport
from .chain.reader import RpcCounts
from .config import ChainSettings, strip_credentials
from .follower import Follower, FollowerMetrics, Rails
from .store import Store


class NodeMetrics(Protocol):
    """Where a chain's reader counts its requests, failures and failovers (`metrics.Metrics`)."""

    def rpc(self, network: str) -> RpcCounts: ...

    def endpoint_failed(self, network: str, kind: str) -> None: ...

    def endpoint_switched(self, network: str, direction: str) -> None: ...


def node_reader(chain: ChainSettings, metrics: NodeMetrics, timeout: float) -> JsonRpcReader:
    """A reader of the chain's nodes, failing over between its rpc_urls in order; `timeout`:
    seconds a request may take before its endpoint counts as failed."""
    name = chain.name
    shown = [strip_credentials(u) for u in chain.rpc_urls]  # as on_switch names them
    transport = FailoverTransport(
        chain.rpc_urls,
        timeout=timeout,
        on_switch=lambda old, new, reason: metrics.endpoint_switched(
            name, "back" if shown.index(new) < shown.index(old) else "over"
        ),
        on_failure=lambda kind: metrics.endpoint_failed(name, kind),
    )
    return JsonRpcReader(transport, metrics.rpc(name), max_batch=chain.max_batch)


def chain_follower(
    chain: ChainSettings,
    reader: JsonRpcReader,
    store: Store,
    metrics: FollowerMetrics,
    clock: Callable[[], float] = time.time,
) -> Follower:
    return Follower(
        network=chain.name,
        reader=reader,
        store=store,
        tokens=[a.contract for a in chain.assets if a.kind == "erc20" and a.contract],
        confirmations=chain.confirmations,
        start_block=chain.start_block,
        poll_interval=chain.poll_interval_seconds,
        clock=clock,
        metrics=metrics,
        rails=Rails(
            native=any(a.kind == "native" for a in chain.assets),
            internal_transfers=chain.internal_transfers,
        ),
        max_batch=chain.max_batch,
        trust_logs_bloom=chain.trust_logs_bloom,
    )
