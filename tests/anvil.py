"""A real node for the tests: anvil (npm `@foundry-rs/anvil-linux-amd64`) on a free loopback port.

Started and stopped by the tests themselves; `scripts/test` installs the binary with
`npm ci --prefix contracts`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "contracts" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
# How long a test waits for one answer of anvil (see Anvil.rpc).
RPC_TIMEOUT_S = 30

# anvil's default dev accounts (mnemonic "test test ... junk"): well known, for tests only.
DEV_KEYS = [
    "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
    "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Anvil:
    """One anvil process; `rpc()` is a blocking JSON-RPC call for test setup."""

    def __init__(
        self,
        *,
        chain_id: int = 31337,
        block_time: float | None = None,
        args: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        self.port = (
            free_port() if port is None else port
        )  # a given port: a node restarted where clients expect it
        self.chain_id = chain_id
        command = [
            str(ANVIL),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chain-id",
            str(chain_id),
            "--silent",
        ]
        if block_time is not None:
            command += ["--block-time", str(block_time)]
        self.process = subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.rpc("eth_chainId")
                break
            except OSError as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise RuntimeError(f"anvil did not start: {stderr}") from exc
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def rpc(self, method: str, *params: Any) -> Any:
        request = urllib.request.Request(
            self.url,
            data=json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode(),
            headers={"Content-Type": "application/json"},
        )
        # On a busy shared machine anvil once stopped answering for over 10 s mid-test (an
        # `anvil_mine` of 300 blocks, well under 1 s otherwise, timed out at 10 s in a CI run).
        with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as response:
            answer = json.loads(response.read())
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", hex(blocks))

    def head(self) -> int:
        return int(self.rpc("eth_blockNumber"), 16)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def anvil_available() -> bool:
    return ANVIL.exists() and os.access(ANVIL, os.X_OK)
