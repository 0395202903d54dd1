"""The rate book of a configuration: a source per `[[rates]]` entry, Chainlink ones on their
chain's own transport (one feed reader per chain)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from ..chain.pricefeed import PriceFeedReader
from ..chain.reader import RpcCounts
from ..chain.transport import Transport
from ..config import Settings
from .book import OnSourceError, RateBook
from .quoting import rate_graph
from .sources import Source
from .sources.chainlink import ChainlinkSource
from .sources.http import HttpSource


def build_rate_book(
    settings: Settings,
    transports: Mapping[str, Transport],
    *,
    counts: Callable[[str], RpcCounts] | None = None,
    clock: Callable[[], float] = time.time,
    on_source_error: OnSourceError | None = None,
) -> RateBook:
    """`transports`: each chain's transport (the follower's); `counts(chain)` counts its requests."""
    readers: dict[str, PriceFeedReader] = {}
    sources: list[Source] = []
    for rate in settings.rates:
        if rate.source == "chainlink":
            assert rate.chain is not None and rate.feed is not None
            if rate.chain not in readers:
                readers[rate.chain] = PriceFeedReader(
                    transports[rate.chain], counts(rate.chain) if counts else None
                )
            sources.append(
                ChainlinkSource(
                    readers[rate.chain],
                    rate.feed,
                    rate.max_age_seconds,
                    sequencer_feed=rate.sequencer_uptime_feed,
                    clock=clock,
                )
            )
        else:
            assert rate.url is not None and rate.json_path is not None
            sources.append(HttpSource(rate.url, rate.json_path, clock=clock))
    return RateBook(
        settings.rates, sources, rate_graph(settings), clock=clock, on_source_error=on_source_error
    )
