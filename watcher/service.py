"""The composition root: builds every part from the settings, runs them, stops them in order.

Shutdown order matters: stop taking new work (followers, dispatcher, jobs), let the current
database transaction finish (store calls are synchronous, so none is ever half-done when a
task is cancelled at an await), stop the HTTP server, then close the database.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING, Callable

import structlog
from aiohttp import web

from . import __version__
from .api import make_app
from .chain import ChainReader, HttpTransport, JsonRpcReader, RpcError, Transport
from .config import ConfigError, Settings
from .follower import Follower
from .invoicing import Invoicing
from .jobs import make_scheduler
from .notify import Notifier
from .store import Endpoint, Store
from .webhooks import Dispatcher

if TYPE_CHECKING:  # eth-tester (behind the sandbox) is imported only when a sandbox runs
    from .sandbox import SandboxChain

log = structlog.get_logger("watcher.service")


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        sandbox: SandboxChain | None = None,
        block_time: float = 0.0,
        clock: Callable[[], float] = time.time,
        expiry_interval: float = 5.0,
    ) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.block_time = block_time
        self.clock = clock
        self.expiry_interval = expiry_interval
        self.stopping = asyncio.Event()
        self.store: Store | None = None
        self.followers: dict[str, Follower] = {}
        self.dispatcher: Dispatcher | None = None
        self._transports: list[Transport] = []
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._scheduler = None
        self.base_url = ""
        self.notifier = Notifier()

    # ------------------------------------------------------------------ start

    def _reader_for(self, name: str, rpc_url: str) -> ChainReader:
        if self.sandbox is not None and name == self.sandbox.network:
            transport: Transport = self.sandbox.transport
        else:
            transport = HttpTransport(rpc_url)
            self._transports.append(transport)
        return JsonRpcReader(transport)

    async def start(self) -> None:
        s = self.settings
        self.store = store = Store(s.database, clock=self.clock)
        store.outbox.set_endpoints(Endpoint(w.url, tuple(w.events)) for w in s.webhooks)
        readers: dict[str, ChainReader] = {}
        for i, chain in enumerate(s.chains):
            reader = self._reader_for(chain.name, chain.rpc_urls[0])
            readers[chain.name] = reader
            try:
                node_chain_id = await reader.chain_id()
            except RpcError as exc:
                log.warning("chain_id_unchecked", network=chain.name, error=str(exc))
            else:
                if node_chain_id != chain.chain_id:
                    await self._close_resources()
                    raise ConfigError(f"chains[{i}].chain_id", f"is {chain.chain_id} but the node answers {node_chain_id}")
        for chain in s.chains:
            self.followers[chain.name] = Follower(
                network=chain.name,
                reader=readers[chain.name],
                store=store,
                tokens=[a.contract for a in chain.assets if a.kind == "erc20" and a.contract],
                confirmations=chain.confirmations,
                start_block=chain.start_block,
                poll_interval=chain.poll_interval_seconds,
                clock=self.clock,
            )
            if any(a.kind == "native" for a in chain.assets):
                log.warning("native_assets_not_watched_yet", network=chain.name)
        self.dispatcher = Dispatcher(store.outbox, {w.url: w.secret for w in s.webhooks}, clock=self.clock)
        store.outbox.on_delivery_queued = self.dispatcher.wake

        app = make_app(
            store, Invoicing(s), s.invoices, api_key=s.http.api_key, clock=self.clock,
        )
        if self.sandbox is not None:
            from .sandbox import add_sandbox_routes

            add_sandbox_routes(app, self.sandbox, store, self._wake_followers)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, s.http.host, s.http.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

        for follower in self.followers.values():
            self._tasks.append(asyncio.create_task(follower.run(self.stopping), name=f"follower:{follower.network}"))
        self._tasks.append(asyncio.create_task(self.dispatcher.run(self.stopping), name="dispatcher"))
        if self.sandbox is not None and self.block_time > 0:
            self._tasks.append(asyncio.create_task(self._mine_forever(), name="sandbox-miner"))
        self._scheduler = make_scheduler(store, expiry_interval=self.expiry_interval)
        self._scheduler.start()
        self.notifier.ready(self.status_line())
        self._tasks.append(asyncio.create_task(self._report_health(), name="health"))
        log.info("watcher_started", version=__version__, api=self.base_url, chains=[c.name for c in s.chains],
                 webhooks=len(s.webhooks), sandbox=self.sandbox is not None)

    def status_line(self) -> str:
        """Each chain's lag behind its head, for systemctl status."""
        parts = []
        assert self.store is not None
        for name, follower in self.followers.items():
            cursor = self.store.cursor(name)
            head = follower.status.head_block
            lag = "?" if head is None or cursor is None else str(max(head - cursor.number, 0))
            parts.append(f"{name} lag {lag}")
        return "; ".join(parts) or "no chains"

    async def _report_health(self) -> None:
        """WATCHDOG=1 only while every loop is alive, so systemd restarts a wedged daemon."""
        interval = self.notifier.watchdog_interval or 5.0
        while not self.stopping.is_set():
            loops = [t for t in self._tasks if t.get_name() != "health"]
            if all(not t.done() for t in loops):
                self.notifier.watchdog()
            self.notifier.status(self.status_line())
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass

    def _wake_followers(self) -> None:
        for follower in self.followers.values():
            follower.wake()

    async def _mine_forever(self) -> None:
        assert self.sandbox is not None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.block_time)
            except asyncio.TimeoutError:
                await self.sandbox.run(self.sandbox.mine, 1)
                self._wake_followers()

    # ------------------------------------------------------------------ stop

    async def stop(self, timeout: float = 10.0) -> None:
        self.notifier.stopping()
        self.stopping.set()
        if self._runner is not None:
            # Stop taking requests first (in-flight ones finish), then the loops.
            await self._runner.cleanup()
            self._runner = None
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._tasks = []
        await self._close_resources()
        log.info("watcher_stopped")

    async def _close_resources(self) -> None:
        if self.dispatcher is not None:
            await self.dispatcher.close()
        for transport in self._transports:
            await transport.close()
        self._transports = []
        if self.store is not None:
            self.store.close()
            self.store = None

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, wake.set)
        try:
            await self.start()
            await wake.wait()
            log.info("stop_requested")
        finally:
            await self.stop()
