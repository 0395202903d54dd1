"""The rates as the service runs them: the book of its configuration, with its metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from ..chain.transport import Transport
from ..config import Settings
from ..metrics import Metrics
from .book import RateBook
from .build import build_rate_book
from .metrics import RateMetrics

# At start-up, the service waits this long for every source's first answer before it says it
# is ready (a source that is slower answers later; invoices meanwhile leave its assets out).
FIRST_ROUND_SECONDS = 5.0


def running_rate_book(
    settings: Settings,
    transports: Mapping[str, Transport],
    metrics: Metrics,
    clock: Callable[[], float] = time.time,
) -> RateBook:
    book = build_rate_book(settings, transports, counts=metrics.rpc, clock=clock)
    RateMetrics(metrics.registry, book)
    return book
