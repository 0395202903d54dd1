"""The composition root: builds every part from the settings, runs them, stops them in order.

Shutdown order matters: stop taking new work (followers, dispatcher, jobs), let the current
database transaction finish (store calls are synchronous, so none is ever half-done when a
task is cancelled at an await), stop the HTTP server, then close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from . import __version__, clienttls
from .api import INVOICE_OPERATIONS, make_app
from .apidocs import OPERATIONS as DOCS_OPERATIONS
from .apidocs import add_docs_routes
from .auth import FAILURES_PER_SECOND, ApiKey
from .chain import ChainReader, HttpTransport, JsonRpcReader, RpcError, Transport
from .chain.heads import HeadSubscriber
from .chainwiring import FollowedChain, chain_follower, node_reader
from .childproc import WarmChildren
from .config import ChainSettings, ConfigError, Settings, load_settings, strip_credentials
from .deposits_api import OPERATIONS as DEPOSIT_OPERATIONS
from .deposits_api import add_deposit_balance_routes
from .dispatchproc import DispatcherProcess
from .follower import Follower
from .followproc import FollowerProcess, RemoteFollower
from .genesis import WrongChain, node_genesis, wrong_chain_message
from .httpserver import Listener, harden, listen
from .invoicing import Invoicing
from .jobs import PRUNE_INTERVAL, make_scheduler
from .logs import configure_logging, register_secrets
from .matching import WatchSet
from .metrics import Metrics
from .notify import Notifier
from .openapi import add_openapi_route
from .ops import OPERATIONS as OPS_OPERATIONS
from .ops import Ops, add_ops_routes
from .rates.book import RateBook
from .rates.routes import OPERATIONS as RATE_OPERATIONS
from .rates.routes import add_rate_routes
from .rates.setup import FIRST_ROUND_SECONDS, running_rate_book
from .redaction import redact_text, register_urls
from .startup import StartUp
from .store import Endpoint, Store
from .store.engine import MEMORY
from .webhooks import Dispatcher

if TYPE_CHECKING:  # eth-tester (behind the sandbox) is imported only when a sandbox runs
    from .checkout import Feed
    from .sandbox import SandboxChain

# Seconds an RPC request may take before the endpoint counts as failed (and the next one is tried).
RPC_TIMEOUT = 5.0

# At stop, the chain loops get this long to end on their own before they are cancelled.
STOP_GRACE = 1.0
# ... and the rest (the dispatcher: an attempt in flight may take the whole HTTP timeout, then
# its record) this long. Well inside the unit's TimeoutStopSec=30s.
STOP_TIMEOUT = 15.0
CANCELLABLE_TASKS = ("follower:", "heads:", "sandbox-miner", "health")
# The dispatcher's process starts once every chain is at its head, or this long after the
# followers are released for their first step, whichever comes first (`_dispatch_after_catch_up`).
DISPATCHER_START_WAIT = 2.0

log = structlog.get_logger("watcher.service")


async def _finish(tasks: list[asyncio.Task], timeout: float) -> None:
    """Wait for tasks to end, cancelling what is still running after `timeout`."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


# What SIGHUP applies; every other top-level key takes a restart.
RELOADABLE = ("webhooks", "log_level", "log_format")


def _secrets_of(settings: Settings) -> list[str]:
    """Values no log line may show: the API key and each webhook secret (several while rotating)."""
    return [
        settings.http.api_key,
        *(k.key for k in settings.http.api_keys),
        *(part for w in settings.webhooks for part in w.secret.split()),
    ]


def _secret_env_of(settings: Settings) -> list[str]:
    """The environment variables that hold secrets (the webhook dispatcher's process lacks them)."""
    return [
        settings.http.api_key_env,
        *(k.key_env for k in settings.http.api_keys),
        *(w.secret_env for w in settings.webhooks),
    ]


def _urls_of(settings: Settings) -> list[str]:
    """Every URL the daemon talks to, for the redaction of their credentials wherever they appear."""
    return [
        *(u for c in settings.chains for u in (*c.rpc_urls, c.ws_url) if u),
        *(w.url for w in settings.webhooks),
        *(r.url for r in settings.rates if r.url),
    ]


def _log_choice(settings: Settings) -> tuple[str | None, str]:
    """(log_format as set in the file or None for automatic, log_level)."""
    explicit = "log_format" in settings.model_fields_set
    return (settings.log_format if explicit else None, settings.log_level)


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        sandbox: SandboxChain | None = None,
        block_time: float = 0.0,
        clock: Callable[[], float] = time.time,
        expiry_interval: float = 5.0,
        config_path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        auth_failures_per_second: int | None = FAILURES_PER_SECOND,
        prune_interval: float = PRUNE_INTERVAL,
        dispatcher_process: bool = False,
        follower_process: bool = False,
        warm: WarmChildren | None = None,
    ) -> None:
        """``config_path`` is the file SIGHUP re-reads (None: nothing to reload, as in the
        sandbox); ``env`` is where its secrets are looked up (default: the process's).
        ``dispatcher_process``: webhooks are delivered by a process of their own
        (watcher/dispatchproc.py), as `watcher run` does; else on this loop (most tests: a
        child cannot share their clock). ``follower_process``: the chains are followed by a
        process of their own (watcher/followproc.py), as `watcher run` does; never with a sandbox,
        whose chain lives in this process. ``warm``: those processes, started by `watcher run`
        before its imports (childproc.WarmChildren)."""
        self.settings = settings
        self.config_path = None if config_path is None else os.fspath(config_path)
        self.env = env
        self.auth_failures_per_second = (
            auth_failures_per_second  # None: no 429 (tests that fail auth on purpose)
        )
        self._log_choice = _log_choice(settings)
        register_secrets(_secrets_of(settings))
        register_urls(_urls_of(settings))
        self.sandbox = sandbox
        self.block_time = block_time
        self.clock = clock
        self.expiry_interval = expiry_interval
        self.prune_interval = prune_interval
        self.dispatcher_process = dispatcher_process and settings.database != MEMORY
        self.follower_process = follower_process and sandbox is None and settings.database != MEMORY
        self.warm = warm
        self.stopping = asyncio.Event()
        self.store: Store | None = None
        self.followers: dict[str, Follower | RemoteFollower] = {}
        self.follower_child: FollowerProcess | None = None  # with follower_process
        self.heads: dict[str, HeadSubscriber] = {}
        self.dispatcher: Dispatcher | DispatcherProcess | None = None
        self._transports: list[Transport] = []
        self._tasks: list[asyncio.Task] = []
        self._runner: web.AppRunner | None = None
        self._checkout_runner: web.AppRunner | None = None
        self._listeners: list[Listener] = []
        self.feed: Feed | None = None
        self.checkout_url = ""  # where the public listener answers (its own address, not public_base_url)
        self._scheduler: Any = None  # an AsyncIOScheduler once started (apscheduler has no types)
        self.base_url = ""
        self.notifier = Notifier()
        self.metrics = Metrics()  # a registry of its own: several services can share a process
        self.ops: Ops | None = None
        self.rates: RateBook | None = None  # the live prices ([[rates]])
        self.started = False  # watcher_started was logged: only then is watcher_stopped
        self.starting = StartUp()  # what the API's 503s and /readyz say until start() is done

    # ------------------------------------------------------------------ start

    def _reader_for(self, chain: ChainSettings) -> ChainReader:
        if self.sandbox is not None and chain.name == self.sandbox.network:
            return JsonRpcReader(
                self.sandbox.transport, self.metrics.rpc(chain.name), max_batch=chain.max_batch
            )
        reader = node_reader(FollowedChain.of(chain), self.metrics, RPC_TIMEOUT)
        self._transports.append(reader.transport)
        return reader

    async def _check_nodes(
        self, index: int, chain: ChainSettings, reader: ChainReader
    ) -> list[tuple[int | None, str]]:
        """Every rpc_url must serve the configured chain: a failover to a node of another chain
        would read its blocks as ours. One that does not answer now is checked by nobody; say so.
        Returns (rpc_urls index, or None for the sandbox, genesis hash) of each node that told
        its block 0, for `_check_genesis`."""
        answers: list[tuple[int | None, int, str | None]]
        if self.sandbox is not None and chain.name == self.sandbox.network:
            answers = [(None, await reader.chain_id(), await node_genesis(reader))]
        else:
            answers = []
            for j, url in enumerate(chain.rpc_urls):
                probe = HttpTransport(url, timeout=RPC_TIMEOUT, retry_delays=(0.2,))
                shown = strip_credentials(url)
                try:
                    node_chain_id = await JsonRpcReader(probe).chain_id()
                    try:
                        genesis = await node_genesis(JsonRpcReader(probe))
                    except RpcError as exc:
                        genesis = None
                        log.warning(
                            "genesis_unchecked",
                            network=chain.name,
                            rpc_url=shown,
                            error=redact_text(str(exc)),
                        )
                    answers.append((j, node_chain_id, genesis))
                except RpcError as exc:
                    log.warning(
                        "chain_id_unchecked", network=chain.name, rpc_url=shown, error=redact_text(str(exc))
                    )
                finally:
                    await probe.close()
        for at, node_chain_id, _ in answers:
            if node_chain_id != chain.chain_id:
                where = "the node" if at is None else f"rpc_urls[{at}]"
                raise ConfigError(
                    f"chains[{index}].chain_id", f"is {chain.chain_id} but {where} answers {node_chain_id}"
                )
        for at, _, genesis in answers:
            if genesis is None:
                where = "the node" if at is None else f"rpc_urls[{at}]"
                log.warning(
                    "genesis_unchecked",
                    network=chain.name,
                    node=where,
                    error="the node does not serve block 0",
                )
        return [(j, genesis) for j, _, genesis in answers if genesis is not None]

    def _check_genesis(
        self, index: int, chain: ChainSettings, geneses: list[tuple[int | None, str]]
    ) -> str | None:
        """Refuse a node of another chain with the same chain id (a reset test chain, another
        network): its block 0 is not the one the database recorded, or, on a database that
        follows nothing yet, not the other nodes'. Returns the genesis to record, if any."""
        assert self.store is not None
        stored = self.store.genesis_hash(chain.name)
        for j, found in geneses:
            if stored is not None and found != stored:
                key = f"chains[{index}]" + ("" if j is None else f".rpc_urls[{j}]")
                raise WrongChain(
                    key,
                    wrong_chain_message(chain.name, chain.chain_id, stored, found, self.settings.database),
                )
        if len({found for _, found in geneses}) > 1:
            a, first = geneses[0]
            b, second = next((j, found) for j, found in geneses if found != first)
            raise WrongChain(
                f"chains[{index}].rpc_urls",
                f"rpc_urls[{a}] and rpc_urls[{b}] serve two chains with chain id {chain.chain_id} "
                f"(genesis {first} and {second}): keep only nodes of the chain {chain.name!r} is",
            )
        return None if stored is not None or not geneses else geneses[0][1]

    async def _node_holds_our_blocks(self, name: str, reader: ChainReader) -> bool:
        """Before a database that already follows the chain records its first genesis (one from
        before genesis hashes were kept): the node must have one of the blocks it holds, or it
        may be another chain; the follower then stops on it rather than take it as ours."""
        assert self.store is not None
        window = self.store.recent_blocks(name)
        if not window:
            return True
        try:
            theirs = await reader.headers([b.number for b in window])
        except RpcError as exc:
            log.warning("genesis_unrecorded", network=name, error=redact_text(str(exc)))
            return False
        if any(t is not None and t.hash == b.hash for b, t in zip(window, theirs, strict=True)):
            return True
        log.warning(
            "genesis_unrecorded",
            network=name,
            error="the node has none of the blocks this database holds: its genesis is not recorded as ours",
        )
        return False

    def _heads_for(self, chain: ChainSettings, follower: Follower | RemoteFollower) -> HeadSubscriber | None:
        """newHeads over WebSocket when the chain has a ws_url: the follower looks at once
        instead of at its next poll (which goes on regardless, so a dead socket loses nothing)."""
        if chain.ws_url is None or (self.sandbox is not None and chain.name == self.sandbox.network):
            return None
        name = chain.name
        self.metrics.heads_mode(name, "poll")
        return HeadSubscriber(
            chain.ws_url,
            lambda number: follower.wake(),
            on_mode=lambda mode: self.metrics.heads_mode(name, mode),
        )

    def _open_store(self) -> Store:
        """The database, or a ConfigError (exit 2: a restart would only fail the same way)
        naming the path when it cannot be opened or created."""
        path = self.settings.database
        try:
            return Store(path, clock=self.clock)
        except (sqlite3.Error, OSError) as exc:
            where = Path(path).parent
            hint = (
                f"{where} is not a directory"
                if where.exists() and not where.is_dir()
                else f"its directory {where} cannot be created"
                if not where.is_dir()
                else f"the watcher may not write to {where}"
                if not os.access(where, os.W_OK)
                else "it is not a database file the watcher can open"
            )
            raise ConfigError("database", f"cannot open or create {path}: {exc} ({hint})") from None

    async def start(self) -> None:
        """Open the database and serve the API at once, then do the start-up work that talks to
        the nodes (their chain ids and geneses, the live prices' first round) and start the
        loops. Until that work is done the `/v1` routes answer 503 (watcher/startup.py); a check
        that fails closes the listener and raises, as it did before the API served."""
        s = self.settings
        self.store = store = self._open_store()
        store.outbox.set_endpoints(Endpoint(w.url, tuple(w.events)) for w in s.webhooks)
        readers = {chain.name: self._reader_for(chain) for chain in s.chains}
        if self.follower_process:
            self.follower_child = self._follower_process_for(store)
            self.followers.update(self.follower_child.followers)
        for chain in s.chains:
            if not self.follower_process:
                self.followers[chain.name] = self._follower_for(chain, readers[chain.name])
            if (heads := self._heads_for(chain, self.followers[chain.name])) is not None:
                self.heads[chain.name] = heads
        self.dispatcher = self._dispatcher_for(store)
        store.outbox.on_delivery_queued = self.dispatcher.wake
        transports = {name: r.transport for name, r in readers.items()}  # type: ignore[attr-defined]
        self.rates = running_rate_book(s, transports, self.metrics, clock=self.clock)
        try:
            await self._serve_api(store, readers, transports)
            if self.follower_child is not None:  # its watch sets loaded beside our checks, once
                # the API serves: loading a million addresses must not hold back its first answer
                self._tasks.append(
                    asyncio.create_task(self.follower_child.run(self.stopping), name="follower-process")
                )
            self._starting("reading the system's CA certificates (TLS to the nodes and endpoints)")
            await asyncio.to_thread(clienttls.build_contexts)  # before the first TLS connection
            await self._check_chains(readers)
            self._starting(f"the live prices' first round (at most {FIRST_ROUND_SECONDS:g} s)")
            await self.rates.first_round(FIRST_ROUND_SECONDS)  # prices before invoices, unless slow
            if s.checkout is not None:
                self._starting("the payment page's listener")
                await self._start_checkout(store)
        except BaseException:
            await _finish(self._tasks, 0)  # the followers' process, started early
            self._tasks = []
            await self._close_listeners()
            await self._close_resources()
            raise
        self._start_loops(store)
        self.starting.finish()
        self.notifier.ready(self.status_line())
        self._tasks.append(asyncio.create_task(self._report_health(), name="health"))
        self.started = True
        log.info(
            "watcher_started",
            version=__version__,
            api=self.base_url,
            chains=[c.name for c in s.chains],
            webhooks=len(s.webhooks),
            sandbox=self.sandbox is not None,
        )

    def _dispatcher_for(self, store: Store) -> Dispatcher | DispatcherProcess:
        s = self.settings
        secrets = {w.url: w.secret for w in s.webhooks}
        if self.dispatcher_process:
            return DispatcherProcess(
                s.database,
                secrets,
                log_choice=self._log_choice,
                hidden=_secrets_of(s),
                urls=_urls_of(s),
                secret_env=_secret_env_of(s),
                on_attempt=self.metrics.webhook_attempt,
                on_breaker=self.metrics.webhook_breaker,
                on_running=self.metrics.webhook_dispatcher,
                warm=self.warm,
            )
        return Dispatcher(
            store.outbox,
            secrets,
            clock=self.clock,
            on_attempt=self.metrics.webhook_attempt,
            on_breaker=self.metrics.webhook_breaker,
        )

    def _follower_process_for(self, store: Store) -> FollowerProcess:
        """The chains followed by a process of their own; what it reports lands here as if this
        process's followers and store had done it (metrics, the page's feed, the dispatcher)."""
        s = self.settings

        def invoice_changed(invoice_id: str) -> None:
            for listener in store.outbox.event_listeners:
                listener(invoice_id)

        def blocks_applied(network: str) -> None:
            for listener in store.block_listeners:
                listener(network)

        return FollowerProcess(
            s.database,
            [FollowedChain.of(c) for c in s.chains],
            log_choice=self._log_choice,
            rpc_timeout=RPC_TIMEOUT,
            hidden=_secrets_of(s),
            urls=_urls_of(s),
            secret_env=_secret_env_of(s),
            checkout_base_url=s.checkout.public_base_url if s.checkout is not None else None,
            unwatch_days=s.retention.watch_closed_invoices_days,
            prune_interval=self.prune_interval,
            on_counts=self.metrics.relayed,
            # The payment page's feed is the only listener: without it, no ids cross over.
            on_invoice_changed=invoice_changed if s.checkout is not None else None,
            on_blocks_applied=blocks_applied if s.checkout is not None else None,
            on_queued=lambda: self.dispatcher.wake() if self.dispatcher is not None else None,
            on_running=self.metrics.follower_process,
            warm=self.warm,
        )

    def _starting(self, what: str) -> None:
        """A start-up step: `/readyz` and `systemctl status` say what the daemon waits for."""
        self.starting.step(what)
        self.notifier.status(f"starting: {what}")

    def _follower_for(self, chain: ChainSettings, reader: ChainReader) -> Follower:
        assert self.store is not None  # opened by start() first
        return chain_follower(FollowedChain.of(chain), reader, self.store, self.metrics, self.clock)  # type: ignore[arg-type]

    async def _check_chains(self, readers: Mapping[str, ChainReader]) -> None:
        """Every chain's nodes serve the configured chain (chain id, genesis); the geneses seen
        for the first time are recorded only once every chain has passed its checks."""
        assert self.store is not None
        first_seen: dict[str, str] = {}
        for i, chain in enumerate(self.settings.chains):
            self._starting(f"checking the nodes of {chain.name}: chain id and genesis")
            genesis = self._check_genesis(i, chain, await self._check_nodes(i, chain, readers[chain.name]))
            if genesis is not None and await self._node_holds_our_blocks(chain.name, readers[chain.name]):
                first_seen[chain.name] = genesis
        for name, genesis in first_seen.items():
            self.store.remember_genesis(name, genesis)
            log.info("genesis_recorded", network=name, genesis=genesis)

    async def _serve_api(
        self, store: Store, readers: Mapping[str, ChainReader], transports: Mapping[str, Transport]
    ) -> None:
        """Every route of the API, bound now: the start-up gate holds the `/v1` ones back."""
        s = self.settings
        assert self.rates is not None
        app = make_app(
            store,
            Invoicing(s, self.rates, clock=self.clock),
            s.invoices,
            api_key=s.http.api_key,
            api_keys=[ApiKey(k.name, k.key, k.scope) for k in s.http.api_keys],
            clock=self.clock,
            auth_failures_per_second=self.auth_failures_per_second,
            starting=self.starting,
        )
        add_rate_routes(app, self.rates)
        operations = [
            *INVOICE_OPERATIONS,
            *OPS_OPERATIONS,
            *DOCS_OPERATIONS,
            *DEPOSIT_OPERATIONS,
            *RATE_OPERATIONS,
        ]
        if self.sandbox is not None:
            from .sandbox import OPERATIONS as SANDBOX_OPERATIONS
            from .sandbox import add_sandbox_routes

            add_sandbox_routes(app, self.sandbox, store, self._wake_followers, block_time=self.block_time)
            operations += SANDBOX_OPERATIONS
        self.ops = Ops(
            s, store, self.followers, readers, heads=self.heads, clock=self.clock, starting=self.starting
        )
        self.metrics.track(store, self.ops.positions)
        add_ops_routes(app, self.ops, self.metrics)
        add_deposit_balance_routes(
            app, store, transports, {c.name: getattr(c, "max_batch", 100) for c in s.chains}
        )
        add_openapi_route(app, operations, version=__version__)
        add_docs_routes(app)
        # In-flight requests get 5 s at shutdown: well inside the unit's TimeoutStopSec.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self._runner.setup()
        listener = await listen(
            self._runner, s.http.host, s.http.port, max_connections=s.http.max_connections
        )
        self._listeners.append(listener)
        host, port = listener.addresses[0][:2]
        self.base_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def _start_loops(self, store: Store) -> None:
        """The followers, the newHeads subscribers, the dispatcher, the sandbox's miner, the jobs."""
        assert self.dispatcher is not None and self.rates is not None
        if self.follower_child is not None:
            self.follower_child.release()
        for follower in self.followers.values():
            if isinstance(follower, Follower):
                self._tasks.append(
                    asyncio.create_task(follower.run(self.stopping), name=f"follower:{follower.network}")
                )
        for name, heads in self.heads.items():
            self._tasks.append(asyncio.create_task(heads.run(self.stopping), name=f"heads:{name}"))
        self._tasks.append(asyncio.create_task(self._dispatch_after_catch_up(store), name="dispatcher"))
        if self.sandbox is not None and self.block_time > 0:
            self._tasks.append(asyncio.create_task(self._mine_forever(), name="sandbox-miner"))
        self._scheduler = make_scheduler(
            store,
            expiry_interval=self.expiry_interval,
            retention=self.settings.retention,
            clock=self.clock,
            on_pruned=self.metrics.rows_pruned,
            prune_interval=self.prune_interval,
            # The followers' process drops those options from its own watch sets.
            watch_sets=None if self.follower_child is not None else self._watch_sets,
        )
        self.rates.schedule(self._scheduler)
        self._scheduler.start()

    def _watch_sets(self) -> dict[str, WatchSet]:
        """The loaded watch sets of the followers in this process."""
        return {n: f.watch for n, f in self.followers.items() if isinstance(f, Follower) and f.watch.loaded}

    async def _start_checkout(self, store: Store) -> None:
        """The payment page on its own public listener: the page, its feed and its assets only."""
        # Imported here, not at start-up: the page's templates, QR codes and ABI encoding are
        # work only a daemon with [checkout] does.
        from .checkout import Feed, make_checkout_app

        checkout = self.settings.checkout
        assert checkout is not None
        store.checkout_base_url = checkout.public_base_url
        self.feed = feed = Feed(
            store,
            max_streams=checkout.max_streams,
            max_per_invoice=checkout.max_streams_per_invoice,
            timeout=checkout.stream_timeout_seconds,
        )
        store.outbox.event_listeners.append(feed.invoice_changed)
        store.block_listeners.append(feed.blocks_applied)
        sandbox_pay = None
        if self.sandbox is not None:
            from .sandbox import pay_invoice

            sandbox = self.sandbox

            async def sandbox_pay(invoice_id: str, option_id: str | None) -> str:
                return await pay_invoice(
                    sandbox, store, invoice_id, {"payment_option_id": option_id} if option_id else {}
                )

        app = make_checkout_app(store, checkout, feed, sandbox_pay=sandbox_pay, clock=self.clock)
        self._checkout_runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=2.0
        )
        harden(app)
        await self._checkout_runner.setup()
        # The public listener: the same header and idle timeouts as the API's; its connections
        # are the page's requests and its live streams, each capped.
        try:
            listener = await listen(
                self._checkout_runner,
                checkout.host,
                checkout.port,
                max_connections=self.settings.http.max_connections + checkout.max_streams,
            )
        except OSError as exc:
            exc.listen = checkout.listen  # type: ignore[attr-defined]  # which address (the CLI's one line names it)
            raise
        self._listeners.append(listener)
        host, port = listener.addresses[0][:2]
        self.checkout_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        log.info("checkout_started", listen=self.checkout_url, public_base_url=checkout.public_base_url)

    async def _dispatch_after_catch_up(self, store: Store) -> None:
        """The dispatcher's process, started once the chains have caught up with their heads
        (or after DISPATCHER_START_WAIT). Its interpreter's start (0.2-0.3 s of CPU) would
        otherwise share two cores with the catch-up after a downtime, and take twice the
        followers' CPU of a short one. Events appended meanwhile wait in the store, as they
        wait for any dispatcher's start; the one on this loop starts at once."""
        assert self.dispatcher is not None
        if isinstance(self.dispatcher, DispatcherProcess):
            deadline = time.monotonic() + DISPATCHER_START_WAIT
            while not self.stopping.is_set() and time.monotonic() < deadline and not self._caught_up(store):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), timeout=0.05)
        await self.dispatcher.run(self.stopping)

    def _caught_up(self, store: Store) -> bool:
        """Every chain's checkpoint at the head its follower last saw. A checkpoint that cannot
        be read counts as behind: the dispatcher then starts after its wait, never not at all."""
        for name, follower in self.followers.items():
            head = follower.status.head_block
            try:
                cursor = store.cursor(name)
            except sqlite3.Error:
                return False
            if head is None or cursor is None or cursor.number < head:
                return False
        return True

    def status_line(self) -> str:
        """Each chain's lag behind its head, for systemctl status."""
        parts = []
        assert self.store is not None
        for name, follower in self.followers.items():
            cursor = self.store.cursor(name)
            head = follower.status.head_block
            lag = "?" if head is None or cursor is None else str(max(head - cursor.number, 0))
            if not follower.watch.loaded:
                loaded, total = follower.watch.progress
                parts.append(f"{name} loading its watch set ({loaded:,} of {total:,} options)")
                continue
            parts.append(f"{name} lag {lag}")
        return "; ".join(parts) or "no chains"

    async def _report_health(self) -> None:
        """WATCHDOG=1 only while every loop is alive, so systemd restarts a wedged daemon."""
        interval = self.notifier.watchdog_interval or 5.0
        while not self.stopping.is_set():
            loops = [t for t in self._tasks if t.get_name() != "health"]
            if all(not t.done() for t in loops):
                self.notifier.watchdog()
            try:
                self.notifier.status(self.status_line())
            except Exception:  # a status line is not worth stopping the watchdog for
                log.exception("status_line_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=interval)

    def _wake_followers(self) -> None:
        for follower in self.followers.values():
            follower.wake()

    async def _mine_forever(self) -> None:
        assert self.sandbox is not None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=self.block_time)
            except TimeoutError:
                await self.sandbox.run(self.sandbox.mine, 1)
                self._wake_followers()

    # ------------------------------------------------------------------ stop

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self.notifier.stopping()
        self.stopping.set()
        if self.feed is not None:
            self.feed.close()  # live status streams end now, not at the server's shutdown timeout
        await self._close_listeners()  # stop taking requests first (in-flight ones finish), then the loops
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self.dispatcher is not None:
            self.dispatcher.wake()  # it sees `stopping` now, not at the end of its idle wait
        for follower in self.followers.values():
            follower.wake()
        # Chain reads (a follower waiting out a node's retries) are safe to cancel after a
        # moment: a step's database change has no await inside it, so it is whole or absent.
        # The dispatcher gets the full timeout to record the attempts it has in flight.
        readers = [t for t in self._tasks if t.get_name().startswith(CANCELLABLE_TASKS)]
        await _finish(readers, STOP_GRACE)
        await _finish([t for t in self._tasks if t not in readers], timeout)
        self._tasks = []
        await self._close_resources()
        if self.started:  # a start that failed is reported by its caller (listen_failed, ...), not as a stop
            self.started = False
            log.info("watcher_stopped")

    async def _close_listeners(self) -> None:
        for listener in self._listeners:  # accept no new connection; the cleanups close the open ones
            await listener.close()
        self._listeners = []
        if self._checkout_runner is not None:
            await self._checkout_runner.cleanup()
            self._checkout_runner = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _close_resources(self) -> None:
        if self.follower_child is not None:
            await self.follower_child.close()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        if self.rates is not None:
            await self.rates.close()
            self.rates = None
        for transport in self._transports:
            await transport.close()
        self._transports = []
        if self.store is not None:
            self.store.close()
            self.store = None

    # ------------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config file and apply what can change without a restart: the webhook
        endpoints (URLs, event filters, secrets) and the log level and format. A file that
        does not validate is logged and ignored (the running settings stay); changes to other
        keys are named in a warning and wait for a restart. Returns True if applied."""
        if self.config_path is None:
            log.warning("config_reload_skipped", reason="no config file to reload (sandbox)")
            return False
        if self.store is None or self.dispatcher is None or self.stopping.is_set():
            log.warning("config_reload_skipped", reason="the service is not running")
            return False
        self.notifier.reloading()
        try:
            return self._reload()
        except Exception as exc:  # a reload must never take the daemon down
            log.exception("config_reload_failed", config=self.config_path, error=type(exc).__name__)
            return False
        finally:
            self.notifier.ready(self.status_line())

    def _apply_reload(self, new: Settings, choice: tuple[str | None, str]) -> None:
        """The new endpoints, secrets and log settings, here and in the processes of their own."""
        assert self.store is not None and self.dispatcher is not None
        register_secrets(_secrets_of(new))
        register_urls(_urls_of(new))
        self.store.outbox.set_endpoints(Endpoint(w.url, tuple(w.events)) for w in new.webhooks)
        if self.follower_child is not None:
            self.follower_child.set_hidden(_secrets_of(new), _urls_of(new), _secret_env_of(new))
        if isinstance(self.dispatcher, DispatcherProcess):
            self.dispatcher.set_secrets(
                {w.url: w.secret for w in new.webhooks},
                hidden=_secrets_of(new),
                urls=_urls_of(new),
                secret_env=_secret_env_of(new),
            )
        else:
            self.dispatcher.set_secrets({w.url: w.secret for w in new.webhooks})
        if choice != self._log_choice:
            configure_logging(*choice)
            self._log_choice = choice
            if isinstance(self.dispatcher, DispatcherProcess):
                self.dispatcher.set_logging(choice)
            if self.follower_child is not None:
                self.follower_child.set_logging(choice)

    def _reload(self) -> bool:
        assert self.store is not None and self.dispatcher is not None
        try:
            new = load_settings(self.config_path, env=self.env)  # type: ignore[arg-type]
        except ConfigError as exc:  # the message names the key, never a secret's value
            log.error("config_reload_failed", config=self.config_path, key=exc.key, error=exc.message)
            return False
        old = self.settings
        changes: dict[str, Any] = {}
        old_hooks = {w.url: w for w in old.webhooks}
        new_hooks = {w.url: w for w in new.webhooks}
        if added := [strip_credentials(u) for u in new_hooks if u not in old_hooks]:
            changes["webhooks_added"] = added
        if removed := [strip_credentials(u) for u in old_hooks if u not in new_hooks]:
            changes["webhooks_removed"] = removed
        for url in new_hooks.keys() & old_hooks.keys():
            a, b = old_hooks[url], new_hooks[url]
            what = [
                name
                for name, differs in (
                    ("events", a.events != b.events),
                    ("secret", (a.secret_env, a.secret) != (b.secret_env, b.secret)),
                )
                if differs
            ]
            if what:
                changes.setdefault("webhooks_changed", {})[strip_credentials(url)] = what
        choice = _log_choice(new)
        if choice[1] != self._log_choice[1]:
            changes["log_level"] = f"{self._log_choice[1]} -> {choice[1]}"
        if choice[0] != self._log_choice[0]:
            changes["log_format"] = f"{self._log_choice[0] or 'auto'} -> {choice[0] or 'auto'}"

        self._apply_reload(new, choice)
        update = {key: getattr(new, key) for key in RELOADABLE}
        self.settings = old.model_copy(update=update)
        log.info(
            "config_reloaded", config=self.config_path, changes=changes or "none", webhooks=len(new.webhooks)
        )
        ignored = [
            key
            for key in type(new).model_fields
            if key not in RELOADABLE and getattr(new, key) != getattr(old, key)
        ]
        if ignored:
            log.warning(
                "config_changes_need_restart",
                keys=ignored,
                hint="these keys are applied only at start-up: restart the watcher",
            )
        return True

    # ------------------------------------------------------------------ signals

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully; SIGHUP calls reload()."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        hup_early = False

        def on_hup() -> None:
            nonlocal hup_early
            if not self.starting.done:  # still starting: reload once started
                hup_early = True
            else:
                self.reload()

        handlers = {signal.SIGTERM: wake.set, signal.SIGINT: wake.set, signal.SIGHUP: on_hup}
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
        try:
            await self.start()
            if hup_early:
                self.reload()
            await wake.wait()
            log.info("stop_requested")
        finally:
            try:
                await self.stop()
            finally:
                for sig in handlers:
                    loop.remove_signal_handler(sig)
