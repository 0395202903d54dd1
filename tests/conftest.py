import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Harness  # noqa: E402


@pytest.fixture
async def harness(tmp_path):
    h = Harness(tmp_path)
    await h.start()
    try:
        yield h
    finally:
        await h.close()
