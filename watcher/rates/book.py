"""The live prices: each source's last accepted answer, refreshed in the background by an
apscheduler job per source, and each pair's value at a moment.

Creating an invoice never waits on a source: it reads `pair_values()`, which is only
arithmetic over the answers already held. A source that fails is asked again later and later
(doubling from its refresh interval up to `MAX_BACKOFF_SECONDS`); its last accepted answer
quotes until it is older than `max_age_seconds`. A refused answer withdraws the source's
value at once (the source itself says something is wrong).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from ..config import RateSettings
from .aggregate import PairValue, SourceView, combine
from .quoting import RateGraph
from .sources import Reading, Refused, Source, SourceFailed

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

log = structlog.get_logger("watcher.rates")

MAX_BACKOFF_SECONDS = 900.0
# A job that fires a little early still runs when its backoff is this close to over.
SCHEDULE_SLACK_SECONDS = 1.0

# (pair, source index, kind, outcome: "failed" or "refused")
OnSourceError = Callable[[str, int, str, str], None]


def backoff(refresh: float, failures: int) -> float:
    """Seconds before the next try after `failures` failures in a row."""
    if failures <= 0:
        return refresh
    return max(refresh, min(refresh * 2**failures, MAX_BACKOFF_SECONDS))


@dataclass
class SourceState:
    index: int  # in [[rates]]
    settings: RateSettings
    source: Source
    accepted: Reading | None = None
    error: str | None = None
    failures: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    last_attempt: float | None = None

    def view(self, now: float) -> SourceView:
        """What this source offers at `now`: its last accepted value while young enough."""
        label = f"rates[{self.index}] {self.settings.source}"
        if self.accepted is None:
            return SourceView(label, self.source.kind, None, None, self.error or "no answer yet")
        age = self.age(now)
        assert age is not None
        if age > self.settings.max_age_seconds:
            why = f"its last answer is {age:.0f} s old, over max_age_seconds {self.settings.max_age_seconds}"
            if self.error:
                why += f"; last try: {self.error}"
            return SourceView(label, self.source.kind, None, age, why)
        return SourceView(label, self.source.kind, self.accepted.value, age, None)

    def age(self, now: float) -> float | None:
        """The accepted answer's age: as old as it was when read, plus the time since."""
        if self.accepted is None:
            return None
        return self.accepted.age + max(0.0, now - self.accepted.read_at)


class RateBook:
    def __init__(
        self,
        rates: Sequence[RateSettings],
        sources: Sequence[Source],
        graph: RateGraph,
        *,
        clock: Callable[[], float] = time.time,
        on_source_error: OnSourceError | None = None,
    ) -> None:
        self.states = [SourceState(i, r, s) for i, (r, s) in enumerate(zip(rates, sources, strict=True))]
        self.graph = graph
        self.clock = clock
        self.on_source_error = on_source_error
        self.on_left_out: Callable[[str], None] | None = None  # a pair left an asset out of an invoice
        self.pairs = list(dict.fromkeys(r.pair for r in rates))
        self._quotable: dict[str, bool] = {}
        self._first: list[asyncio.Task] = []  # the first round's reads, until they end

    # ------------------------------------------------------------------ reading

    def pair_values(self, now: float | None = None) -> dict[str, PairValue]:
        """Every pair's value at `now` from the answers held: no I/O, never waits."""
        now = self.clock() if now is None else now
        return {
            pair: combine(pair, [s.view(now) for s in self.states if s.settings.pair == pair])
            for pair in self.pairs
        }

    def left_out(self, pairs: Sequence[str]) -> None:
        """An invoice left an asset out because these pairs could not quote (the metric)."""
        if self.on_left_out is not None:
            for pair in pairs:
                self.on_left_out(pair)

    # ------------------------------------------------------------------ refreshing

    async def refresh(self, index: int, *, force: bool = False) -> None:
        """Ask one source once, unless it is backing off (`force`: even then; tests and tools)."""
        state = self.states[index]
        now = self.clock()
        if not force and now + SCHEDULE_SLACK_SECONDS < state.next_attempt:
            return
        state.attempts += 1
        state.last_attempt = now
        pair = state.settings.pair
        try:
            reading = await state.source.read()
        except Refused as exc:
            state.accepted, state.error, state.failures = None, f"refused: {exc}", 0
            state.next_attempt = now + state.settings.refresh_seconds
            self._source_error(state, "refused", str(exc))
        except (SourceFailed, Exception) as exc:
            if not isinstance(exc, SourceFailed):
                log.exception("rate_source_crashed", pair=pair, source=state.settings.label())
            state.failures += 1
            state.error = str(exc) or type(exc).__name__
            state.next_attempt = now + backoff(state.settings.refresh_seconds, state.failures)
            self._source_error(state, "failed", state.error)
        else:
            if state.error is not None:
                log.info("rate_source_recovered", pair=pair, source=state.settings.label())
            state.accepted, state.error, state.failures = reading, None, 0
            state.next_attempt = now + state.settings.refresh_seconds
        self._note_pair(pair)

    def _source_error(self, state: SourceState, outcome: str, message: str) -> None:
        log.warning(
            "rate_source_error",
            outcome=outcome,
            pair=state.settings.pair,
            source=state.settings.label(),
            error=message,
            failures=state.failures,
            retry_in=round(max(0.0, state.next_attempt - self.clock())),
        )
        if self.on_source_error is not None:
            self.on_source_error(state.settings.pair, state.index, state.source.kind, outcome)

    def _note_pair(self, pair: str) -> None:
        """Log a pair's change between quoting and not (the state changed: news, once)."""
        value = self.pair_values()[pair]
        before = self._quotable.get(pair)
        self._quotable[pair] = value.quotable
        if value.quotable and before is False:
            log.info("rate_quotable", pair=pair, value=float(value.value or 0), sources=list(value.kinds))
        elif not value.quotable and before is not False:
            log.warning("rate_unquotable", pair=pair, reason=value.reason)

    async def refresh_all(self, *, force: bool = False) -> None:
        await asyncio.gather(*(self.refresh(i, force=force) for i in range(len(self.states))))

    async def first_round(self, timeout: float) -> None:
        """Ask every source once, waiting at most `timeout` seconds: prices are there before the
        API serves, unless a source is slow (it answers in the background, later)."""
        self._first = [asyncio.create_task(self.refresh(s.index)) for s in self.states]
        if not self._first:
            return
        _, pending = await asyncio.wait(self._first, timeout=timeout)
        if pending:
            log.warning(
                "rates_first_round_incomplete",
                waiting=[self.states[i].settings.label() for i, t in enumerate(self._first) if t in pending],
                timeout=timeout,
            )

    def schedule(self, scheduler: BaseScheduler) -> None:
        """One job per source, every refresh_seconds (the first round was asked at start)."""
        now = datetime.now(UTC)
        for state in self.states:
            scheduler.add_job(
                self.refresh,
                "interval",
                seconds=state.settings.refresh_seconds,
                args=[state.index],
                id=f"rate_source_{state.index}",
                max_instances=1,
                coalesce=True,
                next_run_time=now + timedelta(seconds=state.settings.refresh_seconds),
            )

    async def close(self) -> None:
        for task in self._first:
            task.cancel()
        await asyncio.gather(*self._first, return_exceptions=True)
        for state in self.states:
            await state.source.close()
