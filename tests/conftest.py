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
