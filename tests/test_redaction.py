"""Credentials in URLs never show: not in logs, API answers, metrics, nor inside error text.

The daemon runs as `watcher run --config` (JSON logs), its first node and its webhook endpoint
redirecting in a loop with a key in their query: aiohttp's and the dispatcher's errors quote
those URLs, and every place they surface is read back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import aiohttp
from aiohttp import web
from harness import free_port
from test_service import API_KEY, WATCHER, LocalNode, log_lines, new_secret, to_toml

from watcher.logs import redact
from watcher.redaction import Redactor, credential_pieces, redact_text, register_urls, strip_credentials
from watcher.sandbox import SandboxChain, sandbox_settings_data

NODE_KEY = "NODEKEY0123456789abcdef"
HOOK_TOKEN = "HOOKTOKEN-9876543210"


def test_a_known_url_is_masked_even_where_an_error_quotes_only_a_piece_of_it():
    url = "https://alice:pa55word-xyz@rpc.example/v3/0123456789abcdef0123456789abcdef?apikey=K3Y-value-1234"
    redactor = Redactor([url])
    for text in (
        f"connect to {url} failed",
        "host alice:pa55word-xyz@rpc.example",
        "bad key K3Y-value-1234",
        "path /v3/0123456789abcdef0123456789abcdef",
    ):
        shown = redactor(text)
        assert not any(
            p in shown for p in ("pa55word-xyz", "K3Y-value-1234", "0123456789abcdef0123456789abcdef")
        ), shown
    assert redactor(f"connect to {url} failed") == f"connect to {strip_credentials(url)} failed"
    assert "pa55word-xyz" in credential_pieces(url)


def test_any_url_quoted_in_text_loses_its_credentials():
    text = "0, message='', url='http://127.0.0.1:1/?apikey=abc123secret&x=1'; then https://u:pw@x.example/a."
    assert (
        redact_text(text)
        == "0, message='', url='http://127.0.0.1:1/?apikey=***&x=1'; then https://x.example/a."
    )


def test_the_log_processor_masks_urls_in_every_field_not_only_url_fields():
    """The start-up chain-id probe logged `error` with aiohttp's text, which quotes the RPC URL."""
    register_urls(["https://rpc.example/?apikey=REGISTERED-123456"])
    event = redact(
        None,
        "warning",
        {
            "event": "chain_id_unchecked",
            "error": "eth_chainId: gave up: 0, message='', url='https://rpc.example/?apikey=REGISTERED-123456'",
            "detail": {"why": ["key REGISTERED-123456 refused"]},
        },
    )
    assert "REGISTERED-123456" not in repr(event)
    assert event["error"].endswith("url='https://rpc.example/?apikey=***'")


class Loop:
    """Answers every request with a redirect to itself, keeping the query (the key)."""

    def __init__(self) -> None:
        self.url = ""
        self.hits = 0
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=307, headers={"Location": str(request.url)})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_credentials_of_a_looping_node_and_endpoint_show_nowhere(tmp_path):
    chain = await asyncio.get_running_loop().run_in_executor(None, SandboxChain)
    node, loop = LocalNode(chain), Loop()
    for server in (node, loop):
        await server.start()
    chain_data = sandbox_settings_data(chain, poll_interval=0.1)
    chain_data["rpc_urls"] = [f"{loop.url}/rpc?apikey={NODE_KEY}", node.url]
    port = free_port()
    data = {
        "database": str(tmp_path / "watcher.db"),
        "log_level": "info",
        "http": {"listen": f"127.0.0.1:{port}"},
        "webhooks": [{"url": f"{loop.url}/hook?token={HOOK_TOKEN}", "secret_env": "HOOK"}],
        "chains": [chain_data],
    }
    config = tmp_path / "watcher.toml"
    config.write_text(to_toml(data))
    env = {**os.environ, "WATCHER_API_KEY": API_KEY, "HOOK": new_secret(), "JOURNAL_STREAM": "8:1"}
    stderr_path = tmp_path / "stderr"
    with open(stderr_path, "w") as stderr:
        proc = await asyncio.create_subprocess_exec(
            *WATCHER, "run", "--config", str(config), stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
    base = f"http://127.0.0.1:{port}"
    answers: list[str] = []
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as http:

            async def get(path: str) -> str:
                async with http.get(base + path) as r:
                    text = await r.text()
                    answers.append(text)
                    return text

            deadline = time.monotonic() + 60
            while True:
                assert proc.returncode is None, stderr_path.read_text()
                assert time.monotonic() < deadline, stderr_path.read_text()
                try:
                    async with http.post(base + "/v1/invoices", json={"amount": "2"}) as r:
                        if r.status == 201:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
            while '"attempts":1' not in await get("/v1/webhook-deliveries"):
                assert time.monotonic() < deadline, answers[-1]
                await asyncio.sleep(0.1)
            for path in ("/v1/chains", "/readyz", "/metrics"):
                await get(path)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
        for server in (node, loop):
            await server.stop()
        chain.close()
    err = stderr_path.read_text()
    assert code == 0, err
    assert loop.hits >= 2  # the node was asked and the webhook was tried
    [deliveries] = [a for a in answers if '"attempts":1' in a]
    assert "token=***" in deliveries and "redirect to" in deliveries
    events = {line["event"] for line in log_lines(err)}
    assert "chain_id_unchecked" in events and "webhook_retry_scheduled" in events
    for secret in (NODE_KEY, HOOK_TOKEN):
        assert secret not in err
        for answer in answers:
            assert secret not in answer
