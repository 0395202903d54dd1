"""The watch set loads after the API serves (issue 13, start-up): `/readyz` says so, the
follower waits for it, and what loads last is watched like the rest.

The loader reads its batches on a thread of its own; these tests hold that thread between
two batches (a gate around `watch_batch`) to look at the daemon mid-load, on a real daemon
and a real (eth-tester) chain.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from harness import Harness

import watcher.watchload as watchload
from watcher.matching import WatchSet
from watcher.store import Store
from watcher.store.watchrows import watch_batch as real_watch_batch


class Gate:
    """Lets the loader read its first `free` batches, then holds it until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free: int) -> None:
        self.free = free
        self.reads = 0
        self.opened = threading.Event()
        self.held = threading.Event()  # the loader is waiting at the gate
        self.on_hold = None  # called once on the loader's thread when it first waits there
        monkeypatch.setattr(watchload, "watch_batch", self.watch_batch)

    def watch_batch(self, *args):
        self.reads += 1
        if self.reads > self.free and not self.opened.is_set():
            if self.on_hold is not None and not self.held.is_set():
                self.on_hold()
            self.held.set()
            assert self.opened.wait(30), "the test never opened the gate"
        return real_watch_batch(*args)


async def readyz(h: Harness) -> tuple[int, dict]:
    status, body, _ = await h.request("GET", "/readyz", auth=False)
    return status, body


async def test_readyz_is_503_while_the_watch_set_loads_and_a_payment_to_the_last_loaded_address_is_seen(
    tmp_path, monkeypatch
):
    h = await Harness(tmp_path).start()
    gate = None
    try:
        invoices = [await h.create(amount="5.00") for _ in range(12)]
        await h.settle()
        await h.stop_service()
        options = sum(len(i["payment_options"]) for i in invoices)
        monkeypatch.setattr(watchload, "BATCH", 5)
        gate = Gate(monkeypatch, free=1)
        await h.start_service()  # returns once the API serves: the load goes on behind it
        await h.wait_for(gate.held.is_set, what="the loader held after its first batch")

        status, body = await readyz(h)
        assert status == 503
        reasons = [r["reason"] for r in body["reasons"]]
        assert f"watch set loading: 5 of {options} options" in reasons
        assert "watch set loading: 5 of" in body["detail"]
        # The API answers meanwhile: the load is not on the event loop.
        assert (await h.get(invoices[0]["id"]))["status"] == "pending"

        last = invoices[-1]  # its options are the last rows the loader reads
        assert (
            last["payment_options"][-1]["destination_address"].lower()
            not in h.service.followers["sandbox"].watch.addresses
        )
        cursor = h.service.store.cursor("sandbox").number
        await h.pay(last["id"], option_id=last["payment_options"][-1]["id"])
        await h.mine(1)
        await asyncio.sleep(0.5)
        assert h.service.store.cursor("sandbox").number == cursor, "a step ran before the watch set loaded"

        gate.opened.set()
        await h.wait_status(last["id"], "paid")

        async def ready() -> bool:
            return (await readyz(h))[0] == 200

        await h.wait_for(ready, what="/readyz 200 once loaded")
        watch = h.service.followers["sandbox"].watch
        assert watch.loaded and watch.progress == (options, options)
    finally:
        if gate is not None:
            gate.opened.set()
        await h.close()


async def test_options_created_while_the_set_loads_are_watched(tmp_path, monkeypatch):
    """An invoice created through the API mid-load (after the rows the loader counted) is watched."""
    h = await Harness(tmp_path).start()
    gate = None
    try:
        for _ in range(6):
            await h.create(amount="5.00")
        await h.stop_service()
        monkeypatch.setattr(watchload, "BATCH", 2)
        gate = Gate(monkeypatch, free=1)
        await h.start_service()
        await h.wait_for(gate.held.is_set, what="the loader held after its first batch")
        late = await h.create(amount="7.00")
        gate.opened.set()
        await h.wait_status(late["id"], "pending")
        await h.pay(late["id"])
        await h.mine(1)
        await h.wait_status(late["id"], "paid")
    finally:
        if gate is not None:
            gate.opened.set()
        await h.close()


async def test_a_stop_during_the_load_ends_the_loader(tmp_path, monkeypatch):
    h = await Harness(tmp_path).start()
    gate = None
    try:
        for _ in range(4):
            await h.create(amount="5.00")
        await h.stop_service()
        monkeypatch.setattr(watchload, "BATCH", 1)
        gate = Gate(monkeypatch, free=1)
        await h.start_service()
        await h.wait_for(gate.held.is_set, what="the loader held after its first batch")
        reads = gate.reads
        await asyncio.wait_for(h.stop_service(), 10)  # does not wait for the load
        gate.opened.set()
        await asyncio.sleep(0.3)
        assert gate.reads == reads, "the loader read on after the daemon stopped"
    finally:
        if gate is not None:
            gate.opened.set()
        await h.close()


@pytest.mark.parametrize("in_memory", [False, True])
async def test_the_load_holds_what_a_refresh_holds(tmp_path, in_memory, monkeypatch):
    """Both ways of loading (a thread on its own connection; batches on the loop for a store in
    memory) give the set the follower's incremental refresh gives."""
    h = await Harness(tmp_path).start()
    try:
        for _ in range(7):
            await h.create(amount="3.00")
        await h.stop_service()
    finally:
        await h.close()
    path = ":memory:" if in_memory else str(tmp_path / "watcher.db")
    store = Store(tmp_path / "watcher.db", clock=lambda: 0.0)
    if in_memory:  # the same rows in a store held in memory
        memory = Store(":memory:", clock=lambda: 0.0)
        store.db.conn.backup(memory.db.conn)
        store.close()
        store = memory
    assert store.path == path
    monkeypatch.setattr(watchload, "BATCH", 3)
    loaded, refreshed = WatchSet("sandbox"), WatchSet("sandbox")
    await watchload.load_watch_set(loaded, store)
    refreshed.refresh(store)
    store.close()
    assert loaded.loaded and not refreshed.loaded
    assert loaded.addresses == refreshed.addresses and len(loaded.addresses) >= 7
    assert loaded.after_rowid == refreshed.after_rowid
    assert loaded.progress == (len(loaded.addresses), len(loaded.addresses))
