import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from faultproxy import FaultProxy  # noqa: E402
from harness import Harness  # noqa: E402


@pytest.fixture
async def harnesses(tmp_path):
    """Starts daemons on demand (`await harnesses(SomeHarness, **settings)`), closes them all after."""
    made: list[Harness] = []

    async def make(cls: type[Harness] = Harness, **kwargs) -> Harness:
        h = cls(tmp_path / f"h{len(made)}", **kwargs)
        made.append(h)
        await h.start()
        return h

    try:
        yield make
    finally:
        for h in made:
            await h.close()


@pytest.fixture
async def harness(harnesses):
    return await harnesses()


@pytest.fixture
def anvil_node():
    """Starts real anvil nodes on demand (`anvil_node(block_time=..., chain_id=...)`), stops them after.

    Absent binary: skipped on a developer machine, a failure in CI (CI=true), which installs it."""
    import os

    from anvil import Anvil, anvil_available

    if not anvil_available():
        if os.environ.get("CI"):
            pytest.fail("anvil is not installed: `npm ci --prefix contracts` installs it")
        pytest.skip("anvil is not installed: run `npm ci --prefix contracts`")
    made: list[Anvil] = []

    def make(**kwargs) -> Anvil:
        node = Anvil(**kwargs)
        made.append(node)
        return node

    try:
        yield make
    finally:
        for node in made:
            node.stop()


@pytest.fixture
async def proxies() -> AsyncIterator[Any]:
    """`await proxies(node_url)`: a started FaultProxy, closed after the test (and after the
    daemon, which is set up later and so torn down first)."""
    made: list[FaultProxy] = []

    async def make(upstream: str) -> FaultProxy:
        proxy = FaultProxy(upstream)
        await proxy.start()
        made.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in made:
            await proxy.close()
