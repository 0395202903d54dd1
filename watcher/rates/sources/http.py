"""A number in an HTTP source's JSON, such as an exchange's spot price.

The request has a timeout, follows no redirect, reads at most `MAX_BODY` bytes and is never
sent less than a minute after the previous one. The number is read exactly: JSON numbers are
parsed as `Decimal` (never through a float), and a decimal string is taken as it is.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import aiohttp

from ...domain import exact_decimal
from ...redaction import Redactor
from .base import Reading, Refused, SourceFailed, value_problem

TIMEOUT_SECONDS = 10.0
MAX_BODY = 256 * 1024
MIN_INTERVAL_SECONDS = 60.0
MAX_PLACES = 36


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_json(body: bytes) -> Any:
    """JSON with exact numbers: fractions as Decimal; NaN and Infinity refused."""
    try:
        return json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SourceFailed(f"the answer is not JSON: {str(exc)[:120]}") from None


def at_path(document: Any, path: str) -> Any:
    """The value at a dotted `json_path` ("data.amount", "result.0.price")."""
    node = document
    for i, key in enumerate(path.split(".")):
        where = ".".join(path.split(".")[: i + 1])
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and re.fullmatch(r"\d{1,6}", key) and int(key) < len(node):
            node = node[int(key)]
        else:
            raise SourceFailed(f"the answer has nothing at {where}")
    return node


def exact_number(value: Any, path: str) -> Fraction:
    """A decimal string or a JSON number, exactly; anything else is garbage."""
    number = exact_decimal(value)
    if number is None:
        raise SourceFailed(f"{path} is not a number or a decimal string")
    exponent = number.as_tuple().exponent
    if not isinstance(exponent, int) or abs(exponent) > 1000:
        raise SourceFailed(f"{path} is not a number of a sensible size")
    if -exponent > MAX_PLACES:
        number = number.normalize()
        exponent = number.as_tuple().exponent
        if isinstance(exponent, int) and -exponent > MAX_PLACES:
            raise Refused(f"{path} has more than {MAX_PLACES} decimal places")
    return Fraction(number)


class HttpSource:
    kind = "http"

    def __init__(
        self,
        url: str,
        json_path: str,
        *,
        timeout: float | None = None,
        min_interval: float | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.json_path = json_path
        self.timeout = TIMEOUT_SECONDS if timeout is None else timeout
        self.min_interval = MIN_INTERVAL_SECONDS if min_interval is None else min_interval
        self.clock = clock
        self.monotonic = monotonic
        self._redact = Redactor([url])
        self._session: aiohttp.ClientSession | None = None
        self._last_request: float | None = None
        self._one_at_a_time = asyncio.Lock()

    async def read(self) -> Reading:
        async with self._one_at_a_time:
            await self._keep_interval()
            read_at = self.clock()
            try:
                body = await self._fetch()
            finally:  # counted from the end of the last exchange: the server saw it no later
                self._last_request = self.monotonic()
        value = exact_number(at_path(parse_json(body), self.json_path), self.json_path)
        if (problem := value_problem(value)) is not None:
            raise Refused(problem)
        return Reading(value, read_at, 0.0, read_at)

    async def _keep_interval(self) -> None:
        """Never a request within `min_interval` of the last, whoever asks."""
        if self._last_request is not None:
            wait = self._last_request + self.min_interval - self.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)

    async def _fetch(self) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.get(
                self.url, allow_redirects=False, headers={"Accept": "application/json"}
            ) as response:
                if 300 <= response.status < 400:
                    raise SourceFailed(f"HTTP {response.status}: a redirect, never followed")
                if response.status != 200:
                    raise SourceFailed(f"HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_BODY:
                        raise SourceFailed(f"the answer is longer than {MAX_BODY // 1024} KiB")
                return bytes(body)
        except TimeoutError:
            raise SourceFailed(f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            detail = self._redact(f"{type(exc).__name__}: {exc}")
            raise SourceFailed(detail) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
