"""Live prices, the pure parts: a pair from its sources (median, 2% disagreement), an asset in
a currency through the pairs, exact quotes at the extremes, a feed's round judged, an HTTP
source's number read exactly, and the book's ages and backoff with sources that misbehave."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from watcher.chain.pricefeed import FeedReading, Round
from watcher.config import ConfigError, settings_from_dict
from watcher.rates.aggregate import PairValue, SourceView, combine, median
from watcher.rates.book import MAX_BACKOFF_SECONDS, RateBook, backoff
from watcher.rates.quoting import NoQuote, Quote, RateGraph, format_rate, price, quote_atomic, rate_graph
from watcher.rates.sources import Reading, Refused, SourceFailed
from watcher.rates.sources.chainlink import SEQUENCER_GRACE_SECONDS, judge_round, judge_sequencer
from watcher.rates.sources.http import at_path, exact_number, parse_json

F = Fraction


def view(
    value: str | None, kind: str = "chainlink", age: float = 1.0, reason: str | None = None
) -> SourceView:
    return SourceView(f"src-{value}", kind, None if value is None else F(value), age, reason)


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["2000"], "2000"),
        (["2000", "2010"], "2005"),  # even: the mean of the middle two
        (["2010", "2000", "2005"], "2005"),
        (["1", "3", "2", "100"], "2.5"),
    ],
)
def test_median(values: list[str], expected: str) -> None:
    assert median([F(v) for v in values]) == F(expected)


@pytest.mark.parametrize(
    ("values", "quotes", "value"),
    [
        (["2000"], True, "2000"),
        (["2000", "2040"], True, "2020"),  # 40 / 2020 = 1.98%: quotes
        (["2000", "2040.4"], True, "2020.2"),  # exactly 2% of the median: quotes
        (["2000", "2040.5"], False, None),  # just over 2%
        (["2000", "2100"], False, None),  # 5%: refused
        (["2000", None], True, "2000"),  # the median of those that answer
        ([None, None], False, None),
    ],
)
def test_combine_refuses_sources_that_disagree_by_more_than_two_percent(
    values: list[str | None], quotes: bool, value: str | None
) -> None:
    got = combine("ETH/USD", [view(v) for v in values])
    assert got.quotable is quotes
    assert got.value == (None if value is None else F(value))
    if not quotes:
        assert got.reason


def test_combine_says_why_and_which_sources_were_used() -> None:
    got = combine("ETH/USD", [view("2000"), view("2100", "http")])
    assert got.reason is not None and "disagree by 4.88%" in got.reason and "more than 2.00%" in got.reason
    ok = combine(
        "ETH/USD", [view("2000", age=5), view("2001", "http", age=30), view("2002", "chainlink", age=1)]
    )
    assert ok.kinds == ("chainlink", "http") and ok.age == 30 and ok.value == F(2001)
    none = combine("ETH/USD", [view(None, reason="HTTP 500"), view(None, reason="no answer yet")])
    assert none.reason is not None and "HTTP 500" in none.reason and "no answer yet" in none.reason


# --------------------------------------------------------------------------- the graph and prices


def pv(pair: str, value: str | None, kinds: tuple[str, ...] = ("chainlink",)) -> PairValue:
    return PairValue(
        pair, None if value is None else F(value), kinds if value else (), 1.0, None if value else "down"
    )


GRAPH = RateGraph(["ETH/USD", "EUR/USD", "BTC/EUR"], ["ETH", "USDC", "BTC", "TUSD"])


def test_the_currencies_are_usd_and_the_fiat_codes_the_pairs_reach() -> None:
    assert GRAPH.currencies == {"USD", "EUR"}
    assert RateGraph([], ["ETH"]).currencies == {"USD"}
    assert RateGraph(["GBP/EUR"], ["ETH"]).currencies == {"USD"}  # GBP and EUR: not reached from USD


@pytest.mark.parametrize(
    ("symbol", "usd_rate", "currency", "pairs", "expected"),
    [
        ("ETH", None, "USD", {"ETH/USD": "2000"}, Quote(F(2000), "chainlink")),
        ("ETH", None, "EUR", {"ETH/USD": "2000", "EUR/USD": "1.25"}, Quote(F(1600), "chainlink")),
        ("USDC", Decimal("1"), "USD", {}, Quote(F(1), "config")),
        ("USDC", Decimal("1"), "EUR", {"EUR/USD": "1.25"}, Quote(F(4, 5), "config+chainlink")),
        ("BTC", None, "EUR", {"BTC/EUR": "50000"}, Quote(F(50000), "chainlink")),
        ("BTC", None, "USD", {"BTC/EUR": "50000", "EUR/USD": "1.1"}, Quote(F(55000), "chainlink")),
    ],
)
def test_price_through_the_pairs(
    symbol: str, usd_rate: Decimal | None, currency: str, pairs: dict[str, str], expected: Quote
) -> None:
    values = {p: pv(p, v) for p, v in pairs.items()}
    assert price(GRAPH, symbol, usd_rate, currency, values) == expected


def test_an_asset_with_live_pairs_never_falls_back_to_its_usd_rate() -> None:
    got = price(GRAPH, "ETH", Decimal("1999"), "USD", {"ETH/USD": pv("ETH/USD", None)})
    assert isinstance(got, NoQuote) and got.pairs == ("ETH/USD",) and "ETH/USD" in got.reason
    # An EUR invoice of a usd_rate asset needs EUR/USD: without it, no quote (never "1 EUR = 1 USD").
    got = price(GRAPH, "USDC", Decimal("1"), "EUR", {"EUR/USD": pv("EUR/USD", None)})
    assert isinstance(got, NoQuote) and got.pairs == ("EUR/USD",)
    got = price(GRAPH, "TUSD", None, "USD", {})
    assert isinstance(got, NoQuote) and "quote_rates" in got.reason


def test_the_path_is_the_fewest_pairs_whatever_quotes_now() -> None:
    graph = RateGraph(["ETH/USD", "EUR/USD", "ETH/EUR"], ["ETH"])
    assert graph.path("ETH", "EUR") == (("ETH/EUR", False),)
    # ETH/EUR is down: no detour through ETH/USD and EUR/USD (a quote is always made the same way).
    values = {
        "ETH/USD": pv("ETH/USD", "2000"),
        "EUR/USD": pv("EUR/USD", "1.25"),
        "ETH/EUR": pv("ETH/EUR", None),
    }
    assert isinstance(price(graph, "ETH", None, "EUR", values), NoQuote)


# --------------------------------------------------------------------------- exact quotes at the extremes


def feed_rate(answer: int, feed_decimals: int) -> Fraction:
    return F(answer, 10**feed_decimals)


@pytest.mark.parametrize(
    ("amount", "answer", "feed_decimals", "token_decimals", "expected"),
    [
        # 8-decimal feed (ETH/USD style) and 18-decimal feed, tokens of 0, 6, 18 and 36 decimals.
        ("49.99", 2000_00000000, 8, 18, 24_995_000_000_000_000),
        ("49.99", 2000 * 10**18, 18, 18, 24_995_000_000_000_000),
        ("49.99", 2000_00000000, 8, 0, 1),  # 0.024995 of a unit with no decimals: rounded up to 1
        ("0.01", 1, 8, 0, 1_000_000),  # the smallest answer: 10^-8 per unit
        ("0.01", 1, 18, 36, 10**52),  # 10^-18 per unit, 36 decimals: 10^16 units, 10^52 atomic
        ("1000000000000000", 10**12 * 10**8, 8, 36, 10**39),  # the largest amount at the largest rate
        ("1", 3 * 10**8, 8, 6, 333_334),  # 1/3 of a unit: 333333.33... rounded up
        ("1", 3 * 10**18, 18, 36, 333_333_333_333_333_333_333_333_333_333_333_334),
        ("0.000000000000000001", 10**12 * 10**18, 18, 36, 1_000_000),
    ],
)
def test_quotes_at_the_extremes_are_exact_and_rounded_up(
    amount: str, answer: int, feed_decimals: int, token_decimals: int, expected: int
) -> None:
    rate = feed_rate(answer, feed_decimals)
    got = quote_atomic(Decimal(amount), rate, token_decimals)
    assert got == expected
    assert got == math.ceil(F(Decimal(amount)) * 10**token_decimals / rate)
    # never short: what is sent is worth at least the amount, and one atomic unit less is not
    assert F(got, 10**token_decimals) * rate >= F(Decimal(amount))
    assert F(got - 1, 10**token_decimals) * rate < F(Decimal(amount))


def test_a_cross_rate_is_exact_in_the_quote_and_rounded_only_in_its_display() -> None:
    eur_per_eth = F(2000) / F("1.08")  # 1851.851851...
    assert format_rate(eur_per_eth) == "1851.8518518518518519"
    assert quote_atomic(Decimal("100"), eur_per_eth, 18) == math.ceil(F(100) / eur_per_eth * 10**18)
    assert format_rate(F(2005)) == "2005" and format_rate(F("2000.5")) == "2000.5"
    assert format_rate(F(1, 10**18)) == "0.000000000000000001"
    assert format_rate(F(4, 5)) == "0.8"


# --------------------------------------------------------------------------- a feed's round


NOW = 1_800_000_000


def reading(
    answer: int = 2000_00000000,
    updated: int = NOW - 10,
    round_id: int = 7,
    answered: int | None = None,
    decimals: int = 8,
    started: int | None = None,
) -> FeedReading:
    r = Round(
        round_id,
        answer,
        updated if started is None else started,
        updated,
        round_id if answered is None else answered,
    )
    return FeedReading("0xfeed", decimals, r, 123, NOW)


@pytest.mark.parametrize(
    ("feed", "refusal"),
    [
        (reading(), None),
        (reading(updated=NOW - 3600), None),  # exactly max_age old
        (reading(updated=NOW - 3601), "3601 s old"),
        (reading(answer=0), "not positive"),
        (reading(answer=-5), "not positive"),
        (reading(answered=6), "incomplete"),
        (reading(updated=0), "incomplete"),
        (reading(round_id=0, answered=0), "incomplete"),
        (reading(decimals=37), "37 decimals"),
        (reading(answer=10**12 * 10**8 + 1), r"above 10\^12"),
    ],
)
def test_a_feed_answer_is_refused_when_stale_incomplete_or_not_positive(
    feed: FeedReading, refusal: str | None
) -> None:
    if refusal is None:
        assert judge_round(feed, 3600) == F(feed.round.answer, 10**feed.decimals)
    else:
        with pytest.raises(Refused, match=refusal):
            judge_round(feed, 3600)


@pytest.mark.parametrize(
    ("status", "since", "refusal"),
    [
        (0, NOW - SEQUENCER_GRACE_SECONDS, None),
        (0, NOW - SEQUENCER_GRACE_SECONDS + 1, "up for 3599 s"),
        (1, NOW - 10 * SEQUENCER_GRACE_SECONDS, "down"),
        (2, NOW - 10 * SEQUENCER_GRACE_SECONDS, "neither up nor down"),
    ],
)
def test_the_sequencer_must_be_up_for_an_hour(status: int, since: int, refusal: str | None) -> None:
    feed = reading(answer=status, started=since, updated=since, decimals=0)
    if refusal is None:
        judge_sequencer(feed)
    else:
        with pytest.raises(Refused, match=refusal):
            judge_sequencer(feed)


# --------------------------------------------------------------------------- an HTTP source's number


@pytest.mark.parametrize(
    ("body", "path", "expected"),
    [
        (b'{"data": {"amount": "2000.123456789012345678"}}', "data.amount", "2000.123456789012345678"),
        (b'{"data": {"amount": 2000.123456789012345678}}', "data.amount", "2000.123456789012345678"),
        (b'{"result": [{"price": 1.1}]}', "result.0.price", "1.1"),
        (b'{"price": 2000}', "price", "2000"),
    ],
)
def test_an_http_number_is_read_exactly(body: bytes, path: str, expected: str) -> None:
    assert exact_number(at_path(parse_json(body), path), path) == F(expected)
    assert F(0.1) != F("0.1")  # what a float would have given


@pytest.mark.parametrize(
    ("body", "path", "message"),
    [
        (b"<html>rate limited</html>", "data.amount", "not JSON"),
        (b'{"data": {"amount": NaN}}', "data.amount", "not JSON"),
        (b'{"data": {}}', "data.amount", "nothing at data.amount"),
        (b'{"data": {"amount": "1,000.5"}}', "data.amount", "not a number or a decimal string"),
        (b'{"data": {"amount": true}}', "data.amount", "not a number"),
        (b'{"data": {"amount": null}}', "data.amount", "not a number"),
        (b'{"data": [1]}', "data.5", "nothing at data.5"),
        (b'{"data": {"amount": 1e99999}}', "data.amount", "sensible size"),
    ],
)
def test_garbage_from_an_http_source_is_a_failure(body: bytes, path: str, message: str) -> None:
    with pytest.raises(SourceFailed, match=message):
        exact_number(at_path(parse_json(body), path), path)


# --------------------------------------------------------------------------- the book


class ScriptedSource:
    """A source that answers from a script: a Reading, or an exception to raise."""

    def __init__(self, kind: str, answers: list[Any]) -> None:
        self.kind = kind
        self.answers = answers
        self.calls = 0

    async def read(self) -> Reading:
        self.calls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def book_of(clock: Clock, *sources: tuple[dict, ScriptedSource]) -> RateBook:
    settings = config_with(*(r for r, _ in sources))
    return RateBook(settings.rates, [s for _, s in sources], rate_graph(settings), clock=clock)


CHAINLINK = {
    "pair": "ETH/USD",
    "source": "chainlink",
    "chain": "eth",
    "feed": "0x" + "11" * 20,
    "max_age_seconds": 600,
}
HTTP = {
    "pair": "ETH/USD",
    "source": "http",
    "url": "https://x.example/p",
    "json_path": "p",
    "max_age_seconds": 120,
}


async def test_a_source_quotes_until_its_last_answer_is_too_old_by_its_own_age() -> None:
    clock = Clock()
    feed = ScriptedSource("chainlink", [Reading(F(2000), NOW - 500, 500.0, NOW), SourceFailed("node down")])
    book = book_of(clock, (CHAINLINK, feed))
    await book.refresh(0)
    assert book.pair_values()["ETH/USD"].value == F(2000)
    clock.now += 60
    await book.refresh(0)  # the node is down: the last answer still quotes...
    assert book.pair_values()["ETH/USD"].value == F(2000)
    clock.now += 41  # ...until it is 500 + 101 s old, over 600
    value = book.pair_values()["ETH/USD"]
    assert value.value is None and "601 s old" in (value.reason or "") and "node down" in (value.reason or "")


async def test_a_refused_answer_withdraws_the_last_good_one_at_once() -> None:
    clock = Clock()
    feed = ScriptedSource("chainlink", [Reading(F(2000), NOW, 0.0, NOW), Refused("round 8 is incomplete")])
    book = book_of(clock, (CHAINLINK, feed))
    await book.refresh(0)
    clock.now += 60
    await book.refresh(0)
    value = book.pair_values()["ETH/USD"]
    assert value.value is None and "incomplete" in (value.reason or "")


async def test_a_failing_source_backs_off_and_recovers() -> None:
    clock = Clock()
    errors: list[SourceFailed | Reading] = [SourceFailed(f"HTTP 50{i}") for i in range(6)]
    source = ScriptedSource("http", [*errors, Reading(F(2001), NOW, 0.0, NOW)])
    book = book_of(clock, (HTTP, source))
    asked_at = []
    for _ in range(400):  # a job every 60 s for 400 minutes
        before = source.calls
        await book.refresh(0)
        if source.calls > before:
            asked_at.append(clock.now - NOW)
        clock.now += 60
    gaps = [b - a for a, b in zip(asked_at, asked_at[1:], strict=False)]
    assert gaps[:6] == [120, 240, 480, 900, 900, 900]  # doubling from the interval, up to the cap
    assert all(g == 60 for g in gaps[6:])  # answered again: back to every minute
    state = book.states[0]
    assert state.accepted is not None and state.accepted.value == F(2001) and state.failures == 0
    assert backoff(60, 0) == 60 and backoff(60, 30) == MAX_BACKOFF_SECONDS


async def test_two_sources_that_disagree_by_five_percent_do_not_quote() -> None:
    clock = Clock()
    a = ScriptedSource("chainlink", [Reading(F(2000), NOW, 0.0, NOW)])
    b = ScriptedSource("http", [Reading(F(2100), NOW, 0.0, NOW)])
    book = book_of(clock, (CHAINLINK, a), (HTTP, b))
    await book.refresh_all()
    value = book.pair_values()["ETH/USD"]
    assert value.value is None and "disagree by 4.88%" in (value.reason or "")


# --------------------------------------------------------------------------- configuration


def config_with(*rates: dict, assets: list[dict] | None = None) -> Any:
    return settings_from_dict(
        {
            "http": {"api_key_env": "K"},
            "chains": [
                {
                    "name": "eth",
                    "chain_id": 1,
                    "rpc_urls": ["https://rpc.example"],
                    "poll_interval_seconds": 1.0,
                    "confirmations": 1,
                    "assets": assets or [{"symbol": "ETH", "kind": "native"}],
                }
            ],
            "rates": list(rates),
        },
        env={"K": "k3y-0123456789abcdefghijklmnopqrstuvwxyz"},
    )


@pytest.mark.parametrize(
    ("rate", "key", "message"),
    [
        ({**CHAINLINK, "chain": "nope"}, "rates[0].chain", "not a configured chain"),
        ({**CHAINLINK, "feed": None}, "rates[0].feed", "required for a chainlink source"),
        ({k: v for k, v in CHAINLINK.items() if k != "feed"}, "rates[0].feed", "required"),
        ({**CHAINLINK, "url": "https://x.example"}, "rates[0].url", "another kind"),
        ({**HTTP, "url": "http://prices.example/eth"}, "rates[0].url", "https"),
        ({**HTTP, "refresh_seconds": 10}, "rates[0].refresh_seconds", "once a minute"),
        ({**HTTP, "pair": "ETH-USD"}, "rates[0].pair", "BASE/QUOTE"),
        ({**HTTP, "pair": "USD/ETH"}, "rates[0].pair", "a configured asset"),
        ({**HTTP, "pair": "DOGE/USD"}, "rates[0].pair", "neither a configured asset"),
        ({**HTTP, "max_age_seconds": 0}, "rates[0].max_age_seconds", ""),
        ({**HTTP, "max_age_seconds": 1.5}, "rates[0].max_age_seconds", ""),
        ({**HTTP, "colour": "red"}, "rates[0].colour", "unknown key"),
    ],
)
def test_a_bad_rate_names_its_key(rate: dict, key: str, message: str) -> None:
    rate = {k: v for k, v in rate.items() if v is not None}
    with pytest.raises(ConfigError) as caught:
        config_with(rate)
    assert caught.value.key == key and message in caught.value.message


def test_rates_config_loads_and_a_duplicate_source_is_refused() -> None:
    s = config_with(CHAINLINK, HTTP, {**HTTP, "url": "http://127.0.0.1:9/p", "pair": "eur/usd"})
    assert [r.pair for r in s.rates] == ["ETH/USD", "ETH/USD", "EUR/USD"]
    assert s.rates[1].refresh_seconds == 60
    with pytest.raises(ConfigError) as caught:
        config_with(HTTP, dict(HTTP))
    assert caught.value.key == "rates[1]" and "same source as rates[0]" in caught.value.message


async def test_each_source_has_its_own_apscheduler_job_and_a_slow_one_holds_up_no_other() -> None:
    import asyncio

    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    class Slow(ScriptedSource):
        async def read(self) -> Reading:
            self.calls += 1
            await asyncio.sleep(30)
            raise AssertionError("never answers")

    clock = Clock()
    fast = ScriptedSource("chainlink", [Reading(F(2000), NOW, 0.0, NOW)])
    slow = Slow("http", [])
    book = book_of(clock, (CHAINLINK, fast), (HTTP, slow))
    for state in book.states:  # faster than the configuration allows, for the test's sake
        state.settings = state.settings.model_copy(update={"refresh_seconds": 0.1})
    scheduler = AsyncIOScheduler(timezone="UTC")
    book.schedule(scheduler)
    scheduler.start()
    try:
        await asyncio.sleep(0.65)
    finally:
        scheduler.shutdown(wait=False)
    assert fast.calls >= 4, "its job ran on its own, every interval"
    assert slow.calls == 1, "one read at a time per source (max_instances=1)"
    assert book.pair_values()["ETH/USD"].value == F(2000)
    await book.close()


def test_check_config_lists_the_pairs_their_sources_and_the_currencies() -> None:
    from watcher.config import describe

    s = config_with(
        CHAINLINK,
        {**HTTP, "url": "https://user:pw@x.example/p?key=sekrit"},
        {**CHAINLINK, "pair": "EUR/USD", "feed": "0x" + "22" * 20, "sequencer_uptime_feed": "0x" + "33" * 20},
    )
    text = describe(s)
    assert "rate ETH/USD: median of 2 source(s)" in text and "rate EUR/USD: median of 1 source(s)" in text
    assert "chainlink eth 0x1111111111111111111111111111111111111111: max age 600 s" in text
    assert "sequencer uptime feed 0x3333333333333333333333333333333333333333" in text
    assert "invoice currencies: EUR, USD" in text and "asset eth:ETH: live" in text
    assert "sekrit" not in text and "pw@" not in text
    assert "no live prices" in describe(config_with())
