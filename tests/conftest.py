import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

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
