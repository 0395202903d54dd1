"""Catch-up over the cached range, three ways; each call runs in a process of its own.

    python -m bench.catchup '{"method": "raw", "url": ..., "meta": ..., "chunk": 50, "inflight": 2}'

prints one JSON line: wall time, what was read (and recorded) and the peak RSS.

- raw: a bare aiohttp + orjson client, eth_getLogs of both tokens' Transfer logs per chunk,
  decoding `to` and `value` only (a slice and an int(x, 16)): the ceiling for any Python reader.
- web3-events / web3-getlogs: web3.py's AsyncWeb3, `contract.events.Transfer.get_logs` per
  token per chunk, and the raw `w3.eth.get_logs` for reference.
- watcher: the daemon's own path on a copy of a store whose open invoices were created as the
  API creates them (`prepare_store`), a Follower built as the service builds it, `run_once()`
  until the checkpoint reaches the cached head (headers, getLogs, matching, store, judge,
  outbox events and deliveries).
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.chain import CACHE, DECIMALS, load_deposits
from bench.measure import peak_rss_mb
from watcher.contracts import TRANSFER_TOPIC


def chunks(first: int, last: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size - 1, last)) for a in range(first, last + 1, size)]


async def raw(url: str, meta: dict[str, Any], chunk: int, inflight: int) -> dict[str, Any]:
    todo = iter(chunks(meta["first_block"], meta["last_block"], chunk))
    logs = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal logs
        for a, b in todo:  # the workers share one iterator: each takes the next chunk
            body = {
                "jsonrpc": "2.0",
                "id": a,
                "method": "eth_getLogs",
                "params": [
                    {
                        "fromBlock": hex(a),
                        "toBlock": hex(b),
                        "address": meta["tokens"],
                        "topics": [TRANSFER_TOPIC],
                    }
                ],
            }
            async with session.post(
                url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}
            ) as r:
                answer = orjson.loads(await r.read())
            decoded = [("0x" + log["topics"][2][26:], int(log["data"], 16)) for log in answer["result"]]
            logs += len(decoded)

    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(inflight)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "logs": logs}


async def web3(url: str, meta: dict[str, Any], chunk: int, events: bool) -> dict[str, Any]:
    from web3 import AsyncHTTPProvider, AsyncWeb3

    from watcher.contracts import load_artifact

    w3 = AsyncWeb3(AsyncHTTPProvider(url))
    tokens = [AsyncWeb3.to_checksum_address(t) for t in meta["tokens"]]
    contracts = [w3.eth.contract(address=t, abi=load_artifact("TestToken")["abi"]) for t in tokens]
    logs = 0
    started = time.perf_counter()
    for a, b in chunks(meta["first_block"], meta["last_block"], chunk):
        if events:
            for contract in contracts:
                found = await contract.events.Transfer.get_logs(from_block=a, to_block=b)
                decoded = [(event["args"]["to"], event["args"]["value"]) for event in found]
                logs += len(decoded)
        else:
            found = await w3.eth.get_logs(
                {"fromBlock": a, "toBlock": b, "address": tokens, "topics": [TRANSFER_TOPIC]}
            )
            decoded = [(log["topics"][2][12:], int.from_bytes(log["data"], "big")) for log in found]
            logs += len(decoded)
    wall = time.perf_counter() - started
    await w3.provider.disconnect()
    return {"wall_s": wall, "logs": logs}


NETWORK = "bench"
ENV = {
    "WATCHER_API_KEY": "bench-api-key-0123456789abcdefGHIJKLmn",
    "WATCHER_WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"bench-webhook-secret-32-bytes!!!").decode(),
}


def settings_for(url: str, meta: dict[str, Any], database: str) -> Any:
    from watcher.config import settings_from_dict

    return settings_from_dict(
        {
            "database": database,
            "http": {"listen": "127.0.0.1:8080"},  # never opened: no API runs here
            "webhooks": [{"url": "http://127.0.0.1:9/hooks", "secret_env": "WATCHER_WEBHOOK_SECRET"}],
            "chains": [
                {
                    "name": NETWORK,
                    "chain_id": meta["chain_id"],
                    "rpc_urls": [url],
                    "poll_interval_seconds": 2.0,
                    "confirmations": 12,
                    "start_block": meta["first_block"],
                    "deposit_xpub": meta["xpub"],
                    "assets": [
                        {
                            "symbol": f"BUSD{'AB'[i]}",
                            "kind": "erc20",
                            "contract": t,
                            "decimals": DECIMALS,
                            "usd_rate": "1",
                        }
                        for i, t in enumerate(meta["tokens"])
                    ],
                }
            ],
        },
        env=ENV,
    )


def prepare_store(meta: dict[str, Any], invoices: int) -> Path:
    """A store holding `invoices` open invoices, created once as POST /v1/invoices creates them
    (validated request, quoted options, `store.create_invoice`) and cached: each run copies it.
    Each invoice is for exactly what its address receives on the chain (25.00 when nothing).
    Block times are in 2023, so every payment is on time whenever the store was made."""
    from watcher.api import CreateInvoiceIn, build_new_invoice
    from watcher.invoicing import Invoicing, finish_option
    from watcher.store import Endpoint, Store

    path = CACHE / f"store-{Path(meta['files']['meta']).stem}-{invoices}.db"
    if path.exists():
        return path
    building = path.with_suffix(".building")
    for leftover in CACHE.glob(building.name + "*"):
        leftover.unlink()
    settings = settings_for("http://127.0.0.1:1", meta, str(building))
    store = Store(settings.database, clock=time.time)
    store.outbox.set_endpoints(Endpoint(w.url, tuple(w.events)) for w in settings.webhooks)
    invoicing = Invoicing(settings)
    symbols = {a.contract: a.symbol for a in settings.chains[0].assets}
    deposits = load_deposits(meta)[:invoices]
    for start in range(0, len(deposits), 1000):
        with store.db.atomic():  # a commit per thousand (each create_invoice is a savepoint in it)
            for d in deposits[start : start + 1000]:
                amount = (
                    Decimal(int(d["received_atomic"])).scaleb(-DECIMALS)
                    if d["transfers"]
                    else Decimal("25.00")
                )
                data = CreateInvoiceIn.model_validate(
                    {"amount": str(amount), "assets": [symbols[d["token"]]]}
                )
                new = build_new_invoice(data, invoicing, settings.invoices, time.time())
                invoice, _ = store.create_invoice(new, derive=invoicing.derive, finish=finish_option)
                [option] = invoice["payment_options"]
                if option["destination_address"].lower() != d["address"]:
                    raise RuntimeError(
                        f"invoice {d['index']} got {option['destination_address']}, the chain has "
                        f"{d['address']}"
                    )
    store.close()  # checkpoints the WAL into the file
    building.rename(path)
    return path


async def watcher(
    url: str, meta: dict[str, Any], store_template: str, expected: int, profile_to: str | None = None
) -> dict[str, Any]:
    from watcher.chain import JsonRpcReader
    from watcher.chain.failover import FailoverTransport
    from watcher.follower import Follower, Rails
    from watcher.logs import configure_logging
    from watcher.metrics import Metrics
    from watcher.service import RPC_TIMEOUT
    from watcher.store import Endpoint, Store

    configure_logging("json", "warning")  # as the daemon logs, without its info lines on our output
    tmp = Path(tempfile.mkdtemp(prefix="bench-watcher-"))
    try:
        shutil.copyfile(store_template, tmp / "watcher.db")
        settings = settings_for(url, meta, str(tmp / "watcher.db"))
        store = Store(settings.database, clock=time.time)  # as Service.start opens it
        store.outbox.set_endpoints(Endpoint(w.url, tuple(w.events)) for w in settings.webhooks)
        chain = settings.chains[0]
        metrics = Metrics()
        transport = FailoverTransport(
            chain.rpc_urls,
            timeout=RPC_TIMEOUT,
            on_switch=lambda old, new, reason: metrics.endpoint_switched(NETWORK, reason),
            on_failure=lambda kind: metrics.endpoint_failed(NETWORK, kind),
        )
        follower = Follower(  # as Service.start builds it
            network=chain.name,
            reader=JsonRpcReader(transport, metrics.rpc(chain.name), max_batch=chain.max_batch),
            store=store,
            tokens=[a.contract for a in chain.assets if a.kind == "erc20" and a.contract],
            confirmations=chain.confirmations,
            start_block=chain.start_block,
            poll_interval=chain.poll_interval_seconds,
            metrics=metrics,
            rails=Rails(
                native=any(a.kind == "native" for a in chain.assets),
                internal_transfers=chain.internal_transfers,
            ),
            max_batch=chain.max_batch,
        )
        count = lambda sql: store.db.execute(sql).fetchone()[0]  # noqa: E731
        events_before = count("SELECT COUNT(*) FROM events")
        profiler = None
        if profile_to is not None:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.001, async_mode="disabled")
            profiler.start()
        started = time.perf_counter()
        steps = 0
        while (cursor := store.cursor(NETWORK)) is None or cursor.number < meta["last_block"]:
            if not await follower.run_once():
                raise RuntimeError(f"the follower stopped at {cursor} before the head {meta['last_block']}")
            steps += 1
        wall = time.perf_counter() - started
        if profiler is not None:
            profiler.stop()
            Path(profile_to).write_text(profiler.output_html())
            Path(profile_to).with_suffix(".txt").write_text(
                profiler.output_text(unicode=False, show_all=False)
            )
            Path(profile_to).with_suffix(".json").write_text(json.dumps(top_frames(profiler.last_session)))
            profiler.last_session.save(
                str(Path(profile_to).with_suffix(".pyisession"))
            )  # pyinstrument --load
        await transport.close()
        result = {
            "wall_s": wall,
            "steps": steps,
            "payments": count("SELECT COUNT(*) FROM payments"),
            "events": count("SELECT COUNT(*) FROM events") - events_before,
            # The events' own parts and the statuses they share (stored once per change, m009).
            "event_bytes": count(
                "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM events WHERE type != 'invoice.created'"
            )
            + count(
                "SELECT COALESCE(SUM(LENGTH(s.body)), 0) FROM event_statuses s WHERE s.id IN "
                "(SELECT status_id FROM events WHERE type != 'invoice.created')"
            ),
            "invoices_by_status": dict(
                store.db.execute("SELECT status, COUNT(*) FROM invoices GROUP BY status").fetchall()
            ),
        }
        store.close()
        result["db_mb"] = sum(f.stat().st_size for f in tmp.iterdir()) / 1e6
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if result["payments"] != expected:
        raise RuntimeError(
            f"recorded {result['payments']} payments, the chain has {expected} to these invoices"
        )
    return result


def top_frames(session: Any, limit: int = 25) -> dict[str, Any]:
    """Self time per function (summed over every call path) and inclusive time of our own code."""
    own: dict[tuple[str, str, int], float] = {}
    inclusive: dict[tuple[str, str, int], float] = {}

    def walk(frame: Any, stack: frozenset) -> None:
        if frame.is_synthetic:
            return  # a [self] leaf: its time is its parent's total_self_time
        key = (frame.function, frame.file_path_short or "", frame.line_no or 0)
        own[key] = own.get(key, 0.0) + frame.total_self_time
        if key not in stack:  # recursion counts once
            inclusive[key] = inclusive.get(key, 0.0) + frame.time
        for child in frame.children:
            walk(child, stack | {key})

    root = session.root_frame()
    walk(root, frozenset())
    total = root.time

    def ranked(table: dict, only: str | None = None) -> list[dict[str, Any]]:
        items = [(k, v) for k, v in table.items() if only is None or only in k[1]]
        return [
            {"function": f, "where": f"{p}:{n}", "share": v / total, "seconds": v}
            for (f, p, n), v in sorted(items, key=lambda kv: -kv[1])[:limit]
        ]

    return {"total_s": total, "self": ranked(own), "inclusive_watcher": ranked(inclusive, "watcher/")}


METHODS = {
    "raw": lambda s: raw(s["url"], s["meta"], s["chunk"], s["inflight"]),
    "web3-events": lambda s: web3(s["url"], s["meta"], s["chunk"], events=True),
    "web3-getlogs": lambda s: web3(s["url"], s["meta"], s["chunk"], events=False),
    "watcher": lambda s: watcher(s["url"], s["meta"], s["store"], s["expected"], s.get("profile_to")),
}


def main(argv: list[str]) -> None:
    spec = json.loads(argv[1])
    spec["meta"] = json.loads((CACHE / spec["meta"]).read_text())
    result = asyncio.run(METHODS[spec["method"]](spec))
    result["rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
