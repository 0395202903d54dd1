"""aiohttp's default TLS client contexts, built once the API serves rather than at import.

aiohttp builds two TLS client contexts when it is imported (aiohttp/connector.py: one that
verifies, one that does not), and each reads the system's whole CA bundle: about 0.1 s of CPU,
the largest single cost before the daemon can answer, for clients that first connect after
the API serves (the node checks, the price feeds, the webhooks). `import_aiohttp` imports it
with both contexts empty; `build_contexts` builds them, as aiohttp would have, before the
first connection.

Until then the verifying context trusts no certificate: a connection made too early fails
its TLS handshake, it never goes out unverified. When aiohttp is already imported (tests, a
tool) or its internals are not what this expects, nothing is deferred and nothing changes.
"""

from __future__ import annotations

import importlib.util
import ssl
import sys
from pathlib import Path
from typing import Any

_deferred = False
_built_late = False  # build_contexts built them (the daemon's import deferred them)


# What aiohttp/connector.py runs at import (3.10 to 3.14 at least): the contexts are deferred
# only when its source says so; another aiohttp is imported as it is.
_BUILT_AT_IMPORT = (
    "_SSL_CONTEXT_VERIFIED = _make_ssl_context(True)",
    "_SSL_CONTEXT_UNVERIFIED = _make_ssl_context(False)",
)


def import_aiohttp() -> None:
    """Import aiohttp (and its client) without reading the CA bundle now."""
    global _deferred
    if "aiohttp" in sys.modules or not _builds_contexts_at_import():
        import aiohttp  # noqa: F401  (as it is: nothing to defer)

        return
    create_default_context = ssl.create_default_context
    set_default_verify_paths = ssl.SSLContext.set_default_verify_paths

    def empty_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies (hostname, chain), trusts nothing yet

    def no_paths(self: ssl.SSLContext) -> None:
        return None

    ssl.create_default_context = empty_context
    ssl.SSLContext.set_default_verify_paths = no_paths  # type: ignore[method-assign]
    try:
        import aiohttp.connector  # noqa: F401
    finally:
        ssl.create_default_context = create_default_context
        ssl.SSLContext.set_default_verify_paths = set_default_verify_paths  # type: ignore[method-assign]
    _deferred = True


def _builds_contexts_at_import() -> bool:
    spec = importlib.util.find_spec("aiohttp")  # the package's, which does not import it
    if spec is None or spec.origin is None:
        return False
    try:
        source = (Path(spec.origin).parent / "connector.py").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return all(line in source for line in _BUILT_AT_IMPORT)


def build_contexts() -> None:
    """Build the contexts `import_aiohttp` left empty (blocking: reads the CA bundle). Once."""
    global _deferred, _built_late
    if not _deferred:
        return
    import aiohttp.connector as connector

    connector._SSL_CONTEXT_VERIFIED = connector._make_ssl_context(True)
    connector._SSL_CONTEXT_UNVERIFIED = connector._make_ssl_context(False)
    _deferred = False
    _built_late = True


def deferred() -> bool:
    """Are the contexts still empty?"""
    return _deferred


def built_late() -> bool:
    """Were they built by `build_contexts`, after an import that deferred them?"""
    return _built_late
