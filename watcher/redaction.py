"""Credentials in URLs: the one place that decides how a URL is shown, and that scrubs any text
that may quote one (contract §5: never in logs, API answers, metrics or error messages).

RPC providers put API keys in the path or the query, webhook receivers put tokens in the
query, and anyone may write ``user:password@`` in the host part. aiohttp quotes whole request
URLs in some of its errors, and a redirect's ``Location`` is a URL chosen by the receiver. So
every URL the daemon knows is registered here at start-up (and on reload), and every text
shown to someone goes through ``redact_text``: the known URLs' secret pieces become ``***``,
and any other URL in the text is shown as ``strip_credentials`` shows it.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "Redactor", "credential_pieces", "redact_text", "register_urls", "strip_credentials"]

REDACTED = "***"
_SECRET_PARAM = re.compile(r"key|token|secret|auth|pass|sig|cred", re.IGNORECASE)
_TOKEN_LIKE = re.compile(r"(?=.*[0-9])(?=.*[A-Za-z])[A-Za-z0-9_-]{20,}")
# A URL quoted in free text: up to the first space, quote or bracket that cannot be part of it.
_URL_IN_TEXT = re.compile(r"\b(?:https?|wss?)://[^\s\"'<>`]+", re.IGNORECASE)
# Pieces shorter than this are not masked in free text: "1" or "v3" would mangle every message.
MIN_PIECE = 6


@functools.lru_cache(maxsize=256)  # the same few URLs (nodes, endpoints) in every log line
def strip_credentials(url: str) -> str:
    """A URL safe to show: userinfo dropped, API-key-like path segments and query values
    replaced by ``***`` (RPC providers put keys in either place)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc.rpartition("@")[2]
    path = "/".join(REDACTED if _TOKEN_LIKE.fullmatch(seg) else seg for seg in parts.path.split("/"))
    query = []
    for item in parts.query.split("&") if parts.query else []:
        name, sep, value = item.partition("=")
        secret = _SECRET_PARAM.search(name) or _TOKEN_LIKE.fullmatch(value or name)
        query.append(f"{name}={REDACTED}" if secret and sep else (REDACTED if secret else item))
    return urlunsplit((parts.scheme, netloc, path, "&".join(query), ""))


def credential_pieces(url: str) -> list[str]:
    """The raw pieces of `url` that `strip_credentials` hides (userinfo, path segments, query
    values and names, the fragment), longest first: errors can quote them outside the URL."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    userinfo = parts.netloc.rpartition("@")[0]
    pieces = [userinfo, *userinfo.split(":"), parts.query, parts.fragment]
    safe_path = strip_credentials(url)
    pieces += [seg for seg in parts.path.split("/") if _TOKEN_LIKE.fullmatch(seg)]
    for item in parts.query.split("&") if parts.query else []:
        name, _, value = item.partition("=")
        if _SECRET_PARAM.search(name) or _TOKEN_LIKE.fullmatch(value or name):
            pieces += [value or name]
    found = {p for p in pieces if len(p) >= MIN_PIECE and p not in safe_path}
    return sorted(found, key=len, reverse=True)


class Redactor:
    """Scrubs text of the credentials of the URLs it was given, and of any URL's credentials."""

    def __init__(self, urls: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()  # logging from a library's thread may call it too
        self._urls: set[str] = set()
        self._pairs: list[tuple[str, str]] = []
        self.add(urls)

    def add(self, urls: Iterable[str]) -> None:
        with self._lock:
            new = {u for u in urls if u} - self._urls
            if not new:
                return
            self._urls |= new
            pairs = [(url, strip_credentials(url)) for url in self._urls]
            pairs += [(piece, REDACTED) for url in self._urls for piece in credential_pieces(url)]
            pairs.sort(key=lambda p: -len(p[0]))  # whole URLs before their parts
            self._pairs = pairs

    def __call__(self, text: str) -> str:
        for secret, shown in self._pairs:
            if secret in text:
                text = text.replace(secret, shown)
        if "://" in text:
            text = _URL_IN_TEXT.sub(_stripped_in_text, text)
        return text


def _stripped_in_text(match: re.Match[str]) -> str:
    """A URL found in prose, shown without credentials; punctuation after it stays prose."""
    url = match.group(0)
    core = url.rstrip(".,;:!?)]}")
    return strip_credentials(core) + url[len(core) :]


_known = Redactor()


def register_urls(urls: Iterable[str]) -> None:
    """URLs the daemon talks to (nodes, webhook endpoints): their credentials are masked
    wherever `redact_text` runs, even when an error quotes only a piece of them."""
    _known.add(urls)


def redact_text(text: str) -> str:
    """`text` with every registered URL's credentials, and any quoted URL's, masked."""
    return _known(text)
