"""What `pip install .` ships: every Python package of `watcher/` is listed in pyproject.toml.

The tests run on an editable install, which finds any package on disk; a package missing from
`[tool.setuptools] packages` only breaks a real install (`scripts/sandbox`, the systemd unit),
with "No module named ..." at start."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_python_package_of_watcher_is_shipped():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "watcher").rglob("__init__.py")
    }
    assert on_disk - listed == set(), f"not in pyproject.toml's packages: {sorted(on_disk - listed)}"
