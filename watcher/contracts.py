"""Compiled contract artifacts and the event topics the daemon filters on.

The Solidity sources live in ``contracts/`` and are compiled by
``node contracts/build.js`` into ``contracts/build/<Name>.json``. Those JSON
files are committed and shipped inside the Python package as
``watcher.contracts_build`` (see ``[tool.setuptools.package-dir]`` in
pyproject.toml), so the daemon never needs Node or solc at run time: it loads
ABIs and bytecode with :func:`load_artifact`.

The topic constants are the keccak-256 hashes of the canonical event
signatures. They are what ``eth_getLogs`` filters match in ``topics[0]``, so
the watcher can find ERC-20 ``Transfer`` and ``PaymentRouter.PaymentReceived``
logs without decoding every log on a block.
"""

from __future__ import annotations

import json
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Final

__all__ = [
    "ARTIFACT_PACKAGE",
    "PAYMENT_RECEIVED_SIGNATURE",
    "PAYMENT_RECEIVED_TOPIC",
    "TRANSFER_SIGNATURE",
    "TRANSFER_TOPIC",
    "load_artifact",
]

ARTIFACT_PACKAGE: Final = "watcher.contracts_build"

TRANSFER_SIGNATURE: Final = "Transfer(address,address,uint256)"
PAYMENT_RECEIVED_SIGNATURE: Final = "PaymentReceived(bytes32,bytes32,address,address,address,uint256)"

# keccak-256 of each signature, written out: hashing them at import loaded the keccak backend
# (a tenth of a second) before the API could answer. tests/test_contracts.py hashes them again
# and reads them from the compiled ABIs.
TRANSFER_TOPIC: Final = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
PAYMENT_RECEIVED_TOPIC: Final = "0xff438d93ac5ce59cba1703d63e75cc5f9302c797b58fc1040239ac6289685066"

# Used only when ``watcher.contracts_build`` is not importable, i.e. the code
# runs from a plain checkout that was never ``pip install``-ed (the package
# maps to a directory outside ``watcher/``, so only an install can expose it).
_SOURCE_TREE_BUILD_DIR: Final = Path(__file__).resolve().parent.parent / "contracts" / "build"


def _artifact_dir() -> Traversable:
    try:
        return resources.files(ARTIFACT_PACKAGE)
    except ModuleNotFoundError:
        return _SOURCE_TREE_BUILD_DIR


def load_artifact(name: str) -> dict[str, Any]:
    """Load the compiled artifact of contract ``name`` (e.g. ``"PaymentRouter"``).

    Returns a dict with the keys ``abi``, ``bytecode``, ``deployedBytecode``
    (both 0x-prefixed hex), ``compiler`` and ``sourceHash``.

    Raises ``FileNotFoundError`` if there is no artifact of that name.
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"invalid contract name: {name!r}")
    resource = _artifact_dir() / f"{name}.json"
    if not resource.is_file():
        raise FileNotFoundError(f"no compiled artifact for contract {name!r}")
    artifact: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return artifact
