"""The chains' followers in a process of their own (watcher/followproc.py), as `watcher run` runs
them, against a real node (anvil): payments followed from the child and reported to the daemon's
API, metrics and listeners; no step before the daemon's checks of the nodes; a child that dies
shown in /readyz and started again, losing nothing; new webhook endpoints get the child's events; a
clean stop."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time

from anvil_harness import AnvilHarness
from harness import Receiver
from test_ops import sample, scrape

from watcher.chainwiring import FollowedChain
from watcher.config import ChainSettings
from watcher.followproc import FollowerProcess
from watcher.store import Endpoint, Store


class ProcessHarness(AnvilHarness):
    follower_process = True


async def _child(h: AnvilHarness) -> FollowerProcess:
    """The service's followers' process, once its child runs and has reported."""
    assert h.service is not None
    child = h.service.follower_child
    assert isinstance(child, FollowerProcess)
    await h.wait_for(lambda: child.process is not None and child.followers[h.anvil.name].watch.loaded)
    return child


async def _pay_and_confirm(h: AnvilHarness, amount: str = "10") -> dict:
    invoice = await h.create(amount=amount, assets=["TUSD"])
    [option] = invoice["payment_options"]
    await h.anvil.run(h.anvil.transfer_token, option["destination_address"], int(amount) * 10**6)
    await h.mine(1)
    await h.wait_status(invoice["id"], "paid")
    await h.mine(3)
    return await h.wait_status(invoice["id"], "confirmed")


async def _process_alone(tmp_path, anvil_node, **kwargs):
    """A `FollowerProcess` of one anvil chain, without a daemon around it: (chain, database,
    process), the database created and migrated as the daemon does before starting the child."""
    from anvil_harness import AnvilChain

    chain = await asyncio.to_thread(AnvilChain(anvil_node(), "anvil0").setup)
    database = str(tmp_path / "watcher.db")
    Store(database, clock=time.time).close()
    settings = ChainSettings.model_validate(
        {
            "name": chain.name,
            "chain_id": chain.node.chain_id,
            "rpc_urls": [chain.node.url],
            "poll_interval_seconds": 0.05,
            "confirmations": 1,
            "start_block": 0,
            "assets": [{"symbol": "ETH", "kind": "native", "usd_rate": "1"}],
        }
    )
    followed = [FollowedChain.of(settings)]
    return (
        chain,
        database,
        FollowerProcess(database, followed, log_choice=("json", "info"), rpc_timeout=2, **kwargs),
    )


async def test_payments_are_followed_from_a_child_and_reported_to_the_daemon(harnesses, anvil_node):
    h = await harnesses(ProcessHarness, nodes=[anvil_node()])
    child = await _child(h)
    assert child.process is not None and child.process.pid != os.getpid()
    assert not any(t.get_name().startswith("follower:") for t in h.service._tasks)  # none in this process
    changed: list[str] = []
    h.service.store.outbox.event_listeners.append(changed.append)  # as the payment page's feed listens

    invoice = await _pay_and_confirm(h)
    [payment] = invoice["payments"]
    events = await h.wait_events(invoice["id"], "invoice.paid", "invoice.confirmed")
    assert h.receiver.bad_signatures == 0 and len({e.event_id for e in events}) == len(events)
    await h.wait_for(lambda: invoice["id"] in changed, what="the child's change reaching the listener")

    head = await h.anvil.run(h.anvil.head)

    async def chains_caught_up() -> dict | None:
        status, body, _ = await h.request("GET", "/v1/chains")
        assert status == 200, body
        [row] = body.get("data", body)
        return row if row["head_block"] == head and row["last_processed_block"] == head else None

    row = await h.wait_for(chains_caught_up, what="/v1/chains at the head")
    assert row["rpc_url"] == h.anvil.node.url and row["lag_blocks"] == 0
    status, ready, _ = await h.request("GET", "/readyz")
    assert status == 200, ready

    async def counted() -> list | None:
        samples = await scrape(h)
        done = sample(samples, "watcher_payments_recorded_total", network=h.anvil.name, role="counted")
        return samples if done == 1 else None

    samples = await h.wait_for(counted, what="the child's counts in /metrics")
    assert sample(samples, "watcher_blocks_processed_total", network=h.anvil.name) >= payment["block_number"]
    assert sample(samples, "watcher_rpc_calls_total", network=h.anvil.name, method="eth_blockNumber") > 0
    assert sample(samples, "watcher_follower_process_up") == 1


async def test_a_child_that_dies_shows_in_readyz_and_its_successor_misses_nothing(harnesses, anvil_node):
    h = await harnesses(ProcessHarness, nodes=[anvil_node()])
    child = await _child(h)
    first = child.process
    assert first is not None
    first.send_signal(signal.SIGKILL)
    await first.wait()

    async def not_ready() -> dict | None:
        status, body, _ = await h.request("GET", "/readyz")
        return body if status == 503 else None

    body = await h.wait_for(not_ready, what="/readyz 503 while no child runs")
    assert "the followers' process exited" in body["detail"], body
    invoice = await _pay_and_confirm(h)  # paid while no child runs, seen by the next one

    assert child.child.starts == 2 and child.process is not first
    assert len(invoice["payments"]) == 1
    await h.wait_for(lambda: h.service.ops.readiness()[0], what="ready again")
    samples = await scrape(h)
    assert sample(samples, "watcher_follower_process_exits_total") == 1
    assert sample(samples, "watcher_follower_process_up") == 1


async def test_a_new_webhook_endpoint_gets_the_events_the_childs_steps_append(harnesses, anvil_node):
    """The child is told nothing of the endpoints: they are in the database, where the
    dispatcher reads each one's events from its cursor."""
    h = await harnesses(ProcessHarness, nodes=[anvil_node()])
    await _child(h)
    second = Receiver(h.receiver.secret)
    await second.start()
    try:
        endpoints = [*h.service.store.outbox.endpoints, Endpoint(second.url, ("invoice.confirmed",))]
        h.service.store.outbox.set_endpoints(endpoints)  # as a reload does
        h.service.dispatcher.set_secrets({h.receiver.url: h.receiver.secret, second.url: second.secret})
        invoice = await _pay_and_confirm(h)
        await h.wait_for(lambda: second.types_for(invoice["id"]), what="the new endpoint's event")
        assert second.types_for(invoice["id"]) == ["invoice.confirmed"]  # its filter
        assert second.bad_signatures == 0
    finally:
        await second.stop()


async def test_the_child_takes_no_step_before_the_daemon_releases_it(tmp_path, anvil_node):
    """The daemon releases the followers only once the nodes passed its checks (chain id, genesis):
    until then the child loads its watch sets and reads nothing of the chain into the store."""
    chain, database, process = await _process_alone(tmp_path, anvil_node)
    stopping = asyncio.Event()
    task = asyncio.create_task(process.run(stopping))
    follower = process.followers[chain.name]
    try:
        deadline = time.monotonic() + 20
        while not follower.watch.loaded:
            assert time.monotonic() < deadline, "the child never loaded its watch set"
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # twenty polls' worth

        def checkpoint() -> int | None:
            with sqlite3.connect(database) as conn:
                row = conn.execute(
                    "SELECT block_number FROM cursors WHERE network = ?", [chain.name]
                ).fetchone()
            return None if row is None else row[0]

        assert checkpoint() is None and follower.status.head_block is None
        process.release()
        head = await chain.run(chain.head)
        while checkpoint() != head:
            assert time.monotonic() < deadline + 10, "the child never followed once released"
            await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await task
    assert process.process is not None and process.process.returncode == 0


async def test_a_follower_that_ends_in_the_child_makes_it_exit_and_start_again(harnesses, anvil_node):
    """A chain must not go unfollowed while its process looks alive: a follower task that ends
    (here: an option its watch set cannot read) makes the child exit 1, counted and restarted."""
    h = await harnesses(ProcessHarness, nodes=[anvil_node()])
    child = await _child(h)
    await h.create(amount="30", assets=["TUSD"], rails=["contract"])
    with sqlite3.connect(h.service.store.path) as conn:
        conn.execute("UPDATE payment_options SET contract_call = '{' WHERE rail = 'contract'")
    first = child.process
    assert first is not None
    first.send_signal(signal.SIGKILL)  # the next child loads the watch set from the start

    async def crashed_again() -> bool:
        return sample(await scrape(h), "watcher_follower_process_exits_total") >= 2

    await h.wait_for(crashed_again, timeout=20, what="the next child's exit counted")
    assert (
        child.followers[h.anvil.name].status.stopped is not None
        or not child.followers[h.anvil.name].watch.loaded
    )


class WrongChainIdHarness(ProcessHarness):
    def chain_settings_for(self, chain):
        return {**super().chain_settings_for(chain), "chain_id": chain.node.chain_id + 1}


async def test_a_node_that_fails_the_daemons_checks_is_never_followed(tmp_path, anvil_node):
    """The daemon releases the followers' process only once every node passed its checks: a
    node of another chain id fails the start, and the child, started early, wrote nothing."""
    import contextlib

    import pytest

    from watcher.config import ConfigError

    h = WrongChainIdHarness(tmp_path / "h", nodes=[anvil_node()])
    try:
        with pytest.raises(ConfigError, match="chain_id"):
            await h.start()
        child = h.service.follower_child
        assert child is not None and child.process is not None  # it was started, early
        assert child.process.returncode is not None  # and is gone with the failed start
        with sqlite3.connect(h.service.settings.database) as conn:
            assert conn.execute("SELECT COUNT(*) FROM cursors").fetchone()[0] == 0
            assert conn.execute("SELECT COUNT(*) FROM chain_blocks").fetchone()[0] == 0
    finally:
        with contextlib.suppress(Exception):
            await h.close()


async def test_the_child_holds_no_secret_in_its_environment(harnesses, anvil_node, monkeypatch):
    """The variables that hold the API keys and the webhook secrets are left out of the
    followers' process's environment (it needs none of them), and so is systemd's socket."""
    from pathlib import Path

    for name in ("API_KEY", "HOOK_SECRET", "NOTIFY_SOCKET"):
        monkeypatch.setenv(name, f"value-of-{name}")
    h = await harnesses(ProcessHarness, nodes=[anvil_node()])
    process = (await _child(h)).process
    assert process is not None
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert "PATH" in names and os.environ["API_KEY"] == "value-of-API_KEY"  # set in the daemon's
    assert not names & {"API_KEY", "HOOK_SECRET", "NOTIFY_SOCKET"}, names


async def test_a_failover_in_the_child_shows_in_the_daemons_api_and_metrics(proxies, harnesses, anvil_node):
    """rpc_urls = [a, b] with a answering 502: the child reads through b, and the daemon's
    /v1/chains names b (the node the child reads, not its own first URL), /metrics counts the
    child's failover and a's failures."""
    from faultproxy import Fault

    node = anvil_node()
    a, b = await proxies(node.url), await proxies(node.url)
    a.inject(Fault("http_502"))  # every request, until cleared
    h = await harnesses(ProcessHarness, nodes=[node], rpc_urls={"anvil0": [a.url, b.url]})
    await _child(h)
    await _pay_and_confirm(h)

    async def named_b() -> bool:
        status, body, _ = await h.request("GET", "/v1/chains")
        [row] = body.get("data", body)
        return row["rpc_url"] == b.url

    await h.wait_for(named_b, what="/v1/chains naming the node the child reads")
    samples = await scrape(h)
    assert sample(samples, "watcher_rpc_failovers_total", network="anvil0", direction="over") >= 1
    assert sample(samples, "watcher_rpc_endpoint_failures_total", network="anvil0", kind="http_5xx") >= 1
    assert b.requests["eth_getLogs"] + b.requests["eth_getBlockByHash"] >= 1


async def test_a_child_that_stops_reporting_is_killed_and_started_again(tmp_path, anvil_node):
    """A followers' process that is stuck (SIGSTOP here) says nothing: past the silence timeout
    the daemon kills it and starts another, which follows on."""
    chain, _, process = await _process_alone(tmp_path, anvil_node, silence_timeout=2.0, restart_delays=(0.1,))
    process.release()
    stopping = asyncio.Event()
    task = asyncio.create_task(process.run(stopping))
    try:
        deadline = time.monotonic() + 20
        while process.process is None or not process.followers[chain.name].watch.loaded:
            assert time.monotonic() < deadline, "the child never reported"
            await asyncio.sleep(0.05)
        stuck = process.process
        stuck.send_signal(signal.SIGSTOP)
        while process.child.starts < 2 or not process.followers[chain.name].watch.loaded:
            assert time.monotonic() < deadline + 10, "the stuck child was never replaced"
            await asyncio.sleep(0.05)
        assert stuck.returncode == -signal.SIGKILL
        await chain.run(chain.mine, 2)
        head = await chain.run(chain.head)
        while process.followers[chain.name].status.head_block != head:
            assert time.monotonic() < deadline + 20, "the new child does not follow"
            await asyncio.sleep(0.05)
    finally:
        stopping.set()
        await task


class ReloadingHarness(ProcessHarness):
    """The daemon configured from a TOML file the test rewrites, its followers in their process."""

    async def start_service(self) -> None:
        from test_service import to_toml

        from watcher.config import load_settings
        from watcher.service import Service

        self.tmp_path.mkdir(parents=True, exist_ok=True)
        self.path = self.tmp_path / "watcher.toml"
        self.data = {
            "database": str(self.tmp_path / "watcher.db"),
            "log_level": "warning",
            "http": self.http_settings(),
            "webhooks": [{"url": self.receiver.url, "secret_env": "HOOK_SECRET"}],
            "chains": self.chains_settings(),
        }
        self.path.write_text(to_toml(self.data))
        self.environment = self.env()
        self.service = Service(
            load_settings(self.path, env=self.environment),
            config_path=self.path,
            env=self.environment,
            follower_process=True,
        )
        await self.service.start()


async def test_a_reload_gives_a_new_endpoint_the_events_the_child_appends_after_it(harnesses, anvil_node):
    """SIGHUP's reload adds an endpoint that wants only `invoice.confirmed`: the events the
    child's steps append from then on go to it too, filtered by the dispatcher's queuing."""
    from test_service import to_toml

    h = await harnesses(ReloadingHarness, nodes=[anvil_node()])
    await _child(h)
    second = Receiver(h.receiver.secret)
    await second.start()
    try:
        h.environment["HOOK_SECRET_2"] = second.secret
        h.data["webhooks"] = [
            *h.data["webhooks"],
            {"url": second.url, "secret_env": "HOOK_SECRET_2", "events": ["invoice.confirmed"]},
        ]
        h.path.write_text(to_toml(h.data))
        assert h.service.reload() is True
        invoice = await _pay_and_confirm(h)
        await h.wait_for(lambda: second.types_for(invoice["id"]), what="the new endpoint's event")
        assert second.types_for(invoice["id"]) == ["invoice.confirmed"]
        assert second.bad_signatures == 0
    finally:
        await second.stop()
