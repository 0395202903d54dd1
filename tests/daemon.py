"""The real daemon in a process of its own (`watcher run --sandbox`), for tests of what a peer on
the network sees: real sockets, real limits, its stderr and its memory from /proc."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from anvil import free_port
from harness import started

WATCHER = [sys.executable, "-m", "watcher.cli"]


def free_pair() -> int:
    """A free port whose next port is free too: the sandbox serves its payment pages there."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


class SandboxDaemon:
    """`async with SandboxDaemon(tmp_path, "--webhook-url", url) as d:` starts it and waits until
    /healthz answers; on exit SIGTERM, and the exit code must be 0."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        block_time: float = 0.5,
        database: Path | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.database = database or tmp_path / "watcher.db"
        self.port = free_pair()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = [
            "run",
            "--sandbox",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--block-time",
            str(block_time),
            "--database",
            str(self.database),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.stderr_path = tmp_path / "daemon.stderr"
        self.proc: asyncio.subprocess.Process | None = None
        self.api_key = ""
        self.webhook_secret = ""
        self.banner = ""
        self.preexec_fn = None  # e.g. a lower descriptor limit for the daemon alone

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def children(self) -> list[int]:
        """The daemon's child processes now (its webhook dispatcher)."""
        found = []
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            found += [int(pid) for pid in (task / "children").read_text().split()]
        return found

    def rss_kib(self) -> int:
        """Resident memory of the daemon and its children now."""
        total = 0
        for pid in (self.pid, *self.children()):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status)[1])
        return total

    async def __aenter__(self) -> SandboxDaemon:
        self.tmp_path.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "w") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                *WATCHER,
                *self.args,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=self.env,
                preexec_fn=self.preexec_fn,
            )
        try:
            await self._read_banner()
            await self._wait_healthy()
        except BaseException:
            await self._stop()
            raise
        return self

    async def _read_banner(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        lines = []
        while True:
            line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout=60)).decode()
            if not line:
                raise AssertionError(f"the daemon exited before its banner:\n{self.stderr()}")
            lines.append(line)
            if line.startswith("Try:"):
                break
        self.banner = "".join(lines)
        self.api_key = re.search(r"API key:\s+(\S+)", self.banner)[1]
        self.webhook_secret = re.search(r"webhook secret:\s+(\S+)", self.banner)[1]

    async def _wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                assert self.proc is not None and self.proc.returncode is None, self.stderr()
                try:
                    async with http.get(
                        self.base_url + "/healthz", timeout=aiohttp.ClientTimeout(total=1)
                    ) as r:
                        if r.status == 200 and started(await r.read()):
                            return
                except (TimeoutError, aiohttp.ClientError):
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.base_url}/healthz never answered:\n{self.stderr()}")

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        h = {"Authorization": f"Bearer {key or self.api_key}", **(headers or {})}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.base_url + path, json=json, headers=h) as r,
        ):
            body = await r.json(content_type=None) if r.content_length != 0 else None
            return r.status, body

    async def _stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout=30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"the daemon did not stop on SIGTERM:\n{self.stderr()}") from None

    async def __aexit__(self, *exc: Any) -> None:
        code = await self._stop()
        if exc[0] is None:
            assert code == 0, self.stderr()
