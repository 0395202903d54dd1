"""A chain's reader and follower, built from its settings the same way in the daemon's process
and in the followers' (followproc.py), which gets them as `FollowedChain` (plain data: it
never imports the config's models)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .chain import JsonRpcReader
from .chain.failover import FailoverTransport
from .chain.reader import RpcCounts
from .follower import Follower, FollowerMetrics, Rails
from .redaction import strip_credentials
from .store import Store

if TYPE_CHECKING:
    from .config import ChainSettings


@dataclass(frozen=True)
class FollowedChain:
    """What following a chain needs of its settings (`[[chains]]`)."""

    name: str
    rpc_urls: tuple[str, ...]
    max_batch: int
    tokens: tuple[str, ...]  # the ERC-20 assets' contracts
    confirmations: int | str  # a count, or "finalized"
    start_block: int | str
    poll_interval_seconds: float
    native: bool  # a native asset is configured
    internal_transfers: Literal["auto", "on", "off"]
    trust_logs_bloom: bool

    @classmethod
    def of(cls, chain: ChainSettings) -> FollowedChain:
        return cls(
            name=chain.name,
            rpc_urls=tuple(chain.rpc_urls),
            max_batch=chain.max_batch,
            tokens=tuple(a.contract for a in chain.assets if a.kind == "erc20" and a.contract),
            confirmations=chain.confirmations,
            start_block=chain.start_block,
            poll_interval_seconds=chain.poll_interval_seconds,
            native=any(a.kind == "native" for a in chain.assets),
            internal_transfers=chain.internal_transfers,
            trust_logs_bloom=chain.trust_logs_bloom,
        )

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> FollowedChain:
        """As `dataclasses.asdict` gave it, through JSON."""
        return cls(**{**data, "rpc_urls": tuple(data["rpc_urls"]), "tokens": tuple(data["tokens"])})


class NodeMetrics(Protocol):
    """Where a chain's reader counts its requests, failures and failovers (`metrics.Metrics`)."""

    def rpc(self, network: str) -> RpcCounts: ...

    def endpoint_failed(self, network: str, kind: str) -> None: ...

    def endpoint_switched(self, network: str, direction: str) -> None: ...


def node_reader(chain: FollowedChain, metrics: NodeMetrics, timeout: float) -> JsonRpcReader:
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
    chain: FollowedChain,
    reader: JsonRpcReader,
    store: Store,
    metrics: FollowerMetrics,
    clock: Callable[[], float] = time.time,
) -> Follower:
    return Follower(
        network=chain.name,
        reader=reader,
        store=store,
        tokens=list(chain.tokens),
        confirmations=chain.confirmations,
        start_block=chain.start_block,
        poll_interval=chain.poll_interval_seconds,
        clock=clock,
        metrics=metrics,
        rails=Rails(native=chain.native, internal_transfers=chain.internal_transfers),
        max_batch=chain.max_batch,
        trust_logs_bloom=chain.trust_logs_bloom,
    )
