"""A Chainlink AggregatorV3Interface feed, read on a configured chain's own nodes.

Its answer is refused when it is not positive, when its round is incomplete
(`answeredInRound < roundId`), or when `updatedAt` is older than `max_age_seconds` by the
chain's latest block time (not the wall clock: a chain's time is what the feed is updated in).
On an L2 with a sequencer-uptime feed, nothing quotes while the sequencer is down or has been
back for less than an hour: prices there may be stale while it catches up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from fractions import Fraction

from ...chain.pricefeed import FeedReading, FeedUnreadable, PriceFeedReader
from .base import Reading, Refused, SourceFailed, value_problem

# Chainlink's own advice for L2 feeds: wait this long after the sequencer is back.
SEQUENCER_GRACE_SECONDS = 3600
# A feed's decimals beyond this would quote with more places than any rate is allowed.
MAX_FEED_DECIMALS = 36


def judge_round(reading: FeedReading, max_age: int) -> Fraction:
    """The feed's value, or Refused with why it must not quote. Pure: a table test holds it."""
    r = reading.round
    if reading.decimals > MAX_FEED_DECIMALS:
        raise Refused(f"the feed has {reading.decimals} decimals, more than {MAX_FEED_DECIMALS}")
    if r.answer <= 0:
        raise Refused(f"the answer {r.answer} is not positive")
    if r.round_id == 0 or r.updated_at == 0 or r.answered_in_round < r.round_id:
        raise Refused(
            f"round {r.round_id} is incomplete "
            f"(answeredInRound {r.answered_in_round}, updatedAt {r.updated_at})"
        )
    age = reading.block_timestamp - r.updated_at
    if age > max_age:
        raise Refused(
            f"the answer is {age} s old by the chain's time (block {reading.block_number}), "
            f"over max_age_seconds {max_age}"
        )
    value = Fraction(r.answer, 10**reading.decimals)
    if (problem := value_problem(value)) is not None:
        raise Refused(problem)
    return value


def judge_sequencer(reading: FeedReading) -> None:
    """Refused while the sequencer is down (answer 1) or back for less than the grace period."""
    status, since = reading.round.answer, reading.round.started_at
    if status == 1:
        raise Refused("the L2 sequencer is down (sequencer uptime feed)")
    if status != 0 or since == 0:
        raise Refused(f"the sequencer uptime feed answers {status} (started {since}): neither up nor down")
    up_for = reading.block_timestamp - since
    if up_for < SEQUENCER_GRACE_SECONDS:
        raise Refused(
            f"the L2 sequencer has been up for {up_for} s only (no quotes for {SEQUENCER_GRACE_SECONDS} s "
            "after it is back)"
        )


class ChainlinkSource:
    kind = "chainlink"

    def __init__(
        self,
        reader: PriceFeedReader,
        feed: str,
        max_age: int,
        *,
        sequencer_feed: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.reader = reader
        self.feed = feed
        self.max_age = max_age
        self.sequencer_feed = sequencer_feed
        self.clock = clock

    async def read(self) -> Reading:
        read_at = self.clock()
        try:
            block = await self.reader.latest_block()
            if self.sequencer_feed is not None:
                judge_sequencer(await self.reader.read(self.sequencer_feed, block))
            reading = await self.reader.read(self.feed, block)
        except FeedUnreadable as exc:
            raise SourceFailed(str(exc)) from None
        value = judge_round(reading, self.max_age)
        age = max(0, reading.block_timestamp - reading.round.updated_at)
        return Reading(value, reading.round.updated_at, age, read_at)

    async def close(self) -> None:
        return None  # the chain's transport is the service's to close
