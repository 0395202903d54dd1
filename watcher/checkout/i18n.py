"""The page's languages: one JSON catalogue per language under `locales/`, that a translator
edits without touching code (a key's text with `{name}` placeholders). English is the
reference: a key missing elsewhere falls back to it, and a test keeps the catalogues whole."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

LANGUAGES = ("en", "es", "de", "fr")
DEFAULT = "en"


@cache
def _catalogue(lang: str) -> dict[str, str]:
    return json.loads(files(__package__).joinpath("locales", f"{lang}.json").read_text("utf-8"))


def placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


@dataclass(frozen=True)
class Translator:
    lang: str

    def __call__(self, key: str, **values: Any) -> str:
        text = _catalogue(self.lang).get(key) or _catalogue(DEFAULT)[key]
        return text.format(**values) if values else text

    def strings(self, keys: list[str]) -> dict[str, str]:
        return {k: self(k) for k in keys}


def negotiate(query_lang: str | None, accept_language: str | None) -> str:
    """`?lang=` when it names a language we speak, else the best of `Accept-Language`
    (q-values honoured, `de-CH` matching `de`), else English."""
    if query_lang and query_lang.lower() in LANGUAGES:
        return query_lang.lower()
    best, best_q = DEFAULT, 0.0
    for item in (accept_language or "")[:1000].split(","):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        primary = tag.strip().lower().split("-")[0]
        # Earlier entries win ties, as the header lists the user's order.
        if primary in LANGUAGES and q > best_q and 0 < q <= 1:
            best, best_q = primary, q
    return best


def translator(lang: str) -> Translator:
    return Translator(lang if lang in LANGUAGES else DEFAULT)
