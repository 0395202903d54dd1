"""A real daemon on a real (in-process eth-tester) chain, driven over HTTP, for end-to-end tests.

The webhook receiver is a real local HTTP server that checks every Standard Webhooks
signature and records what it got; nothing here mocks the chain, the API or the network.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from anvil import free_port  # noqa: F401  (re-exported: the tests take it from here)
from pydantic import ValidationError

from watcher.config import settings_from_dict
from watcher.sandbox import SandboxChain, sandbox_settings_data
from watcher.schemas import Invoice, WebhookEvent
from watcher.service import Service
from watcher.webhooks import secret_key, verify


def started(body: bytes) -> bool:
    """Whether a 200 from /healthz says the daemon has finished starting: it answers `starting`
    (and its /v1 routes 503) while it still checks the nodes and reads the first prices."""
    try:
        return orjson.loads(body).get("status") != "starting"
    except (orjson.JSONDecodeError, AttributeError):
        return True  # not the watcher's /healthz: its 200 is the answer waited for


def wait_http(url: str, timeout: float = 60.0) -> None:
    """Until a daemon started in another process answers `url` with 200 (for /healthz: has
    finished starting); fails on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200 and started(r.read()):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@dataclass
class Received:
    event_id: str
    type: str
    invoice_id: str
    version: int
    body: dict
    headers: dict


@dataclass
class Receiver:
    """A merchant's webhook endpoint: verifies signatures, records events, can fail on purpose."""

    secret: str
    events: list[Received] = field(default_factory=list)
    attempts: int = 0
    bad_signatures: int = 0
    schema_errors: list[str] = field(default_factory=list)  # bodies that break the documented shape
    fail_next: int = 0  # answer 500 to this many attempts
    answer_after: float = 0.0  # seconds a successful attempt waits for its answer, once received
    url: str = ""
    _runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()
        if not verify(secret_key(self.secret), request.headers, body, now=time.time()):
            self.bad_signatures += 1
            return web.Response(status=401, text="bad signature")
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500, text="failing on purpose")
        data = orjson.loads(body)
        assert request.headers["webhook-id"] == data["id"]
        try:
            WebhookEvent.model_validate(data)
        except ValidationError as exc:
            self.schema_errors.append(f"{data.get('type')}: {exc}")
        invoice = data["data"]["invoice"]
        self.events.append(
            Received(data["id"], data["type"], invoice["id"], invoice["version"], data, dict(request.headers))
        )
        if self.answer_after:
            await asyncio.sleep(self.answer_after)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hooks"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def for_invoice(self, invoice_id: str) -> list[Received]:
        return [e for e in self.events if e.invoice_id == invoice_id]

    def types_for(self, invoice_id: str) -> list[str]:
        return [e.type for e in self.for_invoice(invoice_id)]


class Harness:
    """Subclasses change one thing by overriding `expiry_interval`, `clock`, `chain_settings`,
    `http_settings`, `env` or `receiver_class`, not by copying the settings."""

    expiry_interval = 0.2  # the expiry sweep (production: 5 s)
    auth_failures_per_second: int | None = 10  # as in production; None for tables of bad keys
    prune_interval = 30.0  # the retention jobs (production: 30 s)
    receiver_class: type[Receiver] = Receiver
    dispatcher_process = False  # True: webhooks go out from a child process, as `watcher run` does

    def __init__(
        self, tmp_path: Path, *, confirmations: int | str = 3, expiry_minutes: int = 20, tolerance: str = "0"
    ) -> None:
        self.tmp_path = tmp_path
        self.confirmations = confirmations
        self.expiry_minutes = expiry_minutes
        self.tolerance = tolerance
        self.api_key = "sk_test_" + secrets.token_urlsafe(24)
        self.receiver = self.receiver_class("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
        self.chain: SandboxChain | None = None
        self.service: Service | None = None
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> Harness:
        await self.receiver.start()
        self.chain = await asyncio.get_running_loop().run_in_executor(None, SandboxChain)
        self.http = aiohttp.ClientSession()
        await self.start_service()
        return self

    def clock(self) -> float:
        return time.time()

    def chain_settings(self) -> dict:
        assert self.chain is not None
        return sandbox_settings_data(self.chain, confirmations=self.confirmations, poll_interval=0.05)

    def chains_settings(self) -> list[dict]:
        """Every chain's section (the sandbox's one here)."""
        return [self.chain_settings()]

    def rates_settings(self) -> list[dict]:
        """`[[rates]]`: none unless a test's harness prices assets live."""
        return []

    def http_settings(self) -> dict:
        return {"listen": f"127.0.0.1:{free_port()}", "api_key_env": "API_KEY"}

    def env(self) -> dict[str, str]:
        return {"API_KEY": self.api_key, "HOOK_SECRET": self.receiver.secret}

    def settings(self):
        return settings_from_dict(
            {
                "database": str(self.tmp_path / "watcher.db"),
                "log_format": "console",
                "log_level": "warning",
                "http": self.http_settings(),
                "invoices": {
                    "default_expiry_minutes": self.expiry_minutes,
                    "payment_tolerance_percent": self.tolerance,
                },
                "webhooks": [{"url": self.receiver.url, "secret_env": "HOOK_SECRET"}],
                "chains": self.chains_settings(),
                "rates": self.rates_settings(),
            },
            env=self.env(),
        )

    async def start_service(self) -> None:
        self.service = Service(
            self.settings(),
            sandbox=self.chain,
            expiry_interval=self.expiry_interval,
            clock=self.clock,
            auth_failures_per_second=self.auth_failures_per_second,
            prune_interval=self.prune_interval,
            dispatcher_process=self.dispatcher_process,
        )
        await self.service.start()

    async def stop_service(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    async def close(self) -> None:
        try:
            await self._close()
        finally:
            assert not self.receiver.schema_errors, self.receiver.schema_errors[:3]

    async def _close(self) -> None:
        await self.stop_service()
        if self.http is not None:
            await self.http.close()
        await self.receiver.stop()
        if self.chain is not None:
            self.chain.close()

    # ------------------------------------------------------------------ HTTP

    @property
    def base_url(self) -> str:
        assert self.service is not None
        return self.service.base_url

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any, str]:
        """Returns (status, parsed body or None, content type)."""
        assert self.http is not None
        h = {"Authorization": f"Bearer {self.api_key}"} if auth else {}
        h.update(headers or {})
        body = orjson.dumps(json) if json is not None else data
        if json is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.base_url + path, data=body, headers=h) as r:
            raw = await r.read()
            try:
                parsed = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                parsed = raw.decode(errors="replace")
            return r.status, parsed, r.headers.get("Content-Type", "")

    async def create(self, **fields: Any) -> dict:
        fields.setdefault("amount", "49.99")
        status, body, _ = await self.request("POST", "/v1/invoices", json=fields)
        assert status == 201, body
        return body

    async def get(self, invoice_id: str) -> dict:
        status, body, _ = await self.request("GET", f"/v1/invoices/{invoice_id}")
        assert status == 200, body
        Invoice.model_validate(body)  # the documented shape, every time
        return body

    async def pay(self, invoice_id: str, amount: str | None = None, option_id: str | None = None) -> str:
        payload: dict[str, Any] = {}
        if amount is not None:
            payload["amount"] = amount
        if option_id is not None:
            payload["payment_option_id"] = option_id
        status, body, _ = await self.request("POST", f"/v1/sandbox/invoices/{invoice_id}/pay", json=payload)
        assert status == 200, body
        return body["transaction_hash"]

    async def mine(self, blocks: int = 1) -> int:
        status, body, _ = await self.request("POST", "/v1/sandbox/mine", json={"blocks": blocks})
        assert status == 200, body
        return body["head_block"]

    # ------------------------------------------------------------------ chain, directly

    async def on_chain(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self.chain is not None
        return await self.chain.run(fn, *args)

    async def mine_direct(self, blocks: int = 1) -> None:
        """Mine without the API (while the daemon is down, say)."""
        assert self.chain is not None
        await self.chain.run(self.chain.mine, blocks)

    # ------------------------------------------------------------------ waiting

    async def wait_for(
        self, check: Callable[[], Any], *, timeout: float = 15.0, what: str = "condition"
    ) -> Any:
        """Poll `check` (sync or async) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = check()
            if asyncio.iscoroutine(last):
                last = await last
            if last:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last: {last!r}")

    async def wait_invoice(
        self, invoice_id: str, predicate: Callable[[dict], bool], what: str = "invoice state"
    ) -> dict:
        async def check() -> dict | None:
            invoice = await self.get(invoice_id)
            return invoice if predicate(invoice) else None

        return await self.wait_for(check, what=what)

    async def wait_status(self, invoice_id: str, status: str) -> dict:
        return await self.wait_invoice(invoice_id, lambda i: i["status"] == status, f"status {status}")

    async def wait_events(self, invoice_id: str, *types: str) -> list[Received]:
        def check() -> list[Received] | None:
            got = self.receiver.types_for(invoice_id)
            return self.receiver.for_invoice(invoice_id) if all(t in got for t in types) else None

        return await self.wait_for(check, what=f"events {types} for {invoice_id}")

    async def settle(self) -> None:
        """Wait until the follower has processed the head and the outbox is empty."""
        assert self.chain is not None and self.service is not None
        head = await self.on_chain(self.chain.head)
        store = self.service.store
        assert store is not None

        def caught_up() -> bool:
            cursor = store.cursor("sandbox")
            return cursor is not None and cursor.number >= head and store.outbox.next_delivery_at() is None

        await self.wait_for(caught_up, what="follower at head and outbox empty")
