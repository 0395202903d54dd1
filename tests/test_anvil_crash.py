"""Crash safety on a real node: the daemon (`watcher run --config`, a subprocess) is killed
with SIGKILL while it is recording a stream of payments and delivering their webhooks, the
chain moves on while it is down, and it is started again on the same database.

Contract §4: "After a restart the watcher resumes from its last checkpoint: no block is
skipped, no payment is recorded twice, no event is lost." §5: delivery is at least once, an
event being stored in the transaction of the change it reports, so a redelivery after a
crash carries the same id and body; a change is never reported under two ids.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from anvil import ROOT
from anvil_harness import DEPOSIT_MNEMONIC, MERCHANT, PAYERS, TOKEN_DECIMALS, AnvilChain
from harness import Receiver, free_port, started

from watcher.addresses import account_xpub_from_mnemonic

WATCHER = ROOT / ".venv" / "bin" / "watcher"
CONFIRMATIONS = 3
UNIT = 10**TOKEN_DECIMALS


def _running(pid: int) -> bool:
    """Not exited (a zombie nobody has reaped yet has exited)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _toml(value) -> str:
    """A TOML value (strings, numbers, lists of them): JSON's spelling is TOML's for these."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def write_config(
    path: Path,
    *,
    database: Path,
    listen: str,
    webhook_url: str,
    chain: AnvilChain,
    rpc_urls: list[str] | None = None,
) -> None:
    """The config an operator would write for this node (docs/operators.md), secrets by env var
    name; `rpc_urls` in place of the node's own URL (a FaultProxy in front of it, say)."""
    top = {"database": str(database), "log_format": "json", "log_level": "info"}
    http = {"listen": listen, "api_key_env": "WATCHER_API_KEY"}
    hook = {"url": webhook_url, "secret_env": "WATCHER_WEBHOOK_SECRET"}
    c = {
        "name": chain.name,
        "chain_id": chain.node.chain_id,
        "rpc_urls": rpc_urls or [chain.node.url],
        "poll_interval_seconds": 0.05,
        "confirmations": CONFIRMATIONS,
        "start_block": 0,
        "deposit_xpub": account_xpub_from_mnemonic(DEPOSIT_MNEMONIC),
        "router_address": chain.router,
        "merchant_address": MERCHANT,
    }
    token = {
        "symbol": "TUSD",
        "kind": "erc20",
        "contract": chain.token,
        "decimals": TOKEN_DECIMALS,
        "usd_rate": "1",
    }
    native = {"symbol": "ETH", "kind": "native", "usd_rate": "2000"}

    def table(d: dict) -> str:
        return "".join(f"{k} = {_toml(v)}\n" for k, v in d.items())

    path.write_text(
        table(top)
        + "\n[http]\n"
        + table(http)
        + "\n[[webhooks]]\n"
        + table(hook)
        + "\n[[chains]]\n"
        + table(c)
        + "\n[[chains.assets]]\n"
        + table(token)
        + "\n[[chains.assets]]\n"
        + table(native)
    )


class Daemon:
    """`watcher run --config FILE` as its own process, as systemd would run it."""

    def __init__(self, config: Path, env: dict[str, str], base_url: str, log_dir: Path) -> None:
        self.config, self.env, self.base_url, self.log_dir = config, env, base_url, log_dir
        self.process: subprocess.Popen | None = None
        self.runs = 0
        self.logs: list[Path] = []

    def spawn(self) -> Path:
        """The process, started; returns its log file."""
        self.runs += 1
        log = self.log_dir / f"watcher-{self.runs}.log"
        self.logs.append(log)
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [str(WATCHER), "run", "--config", str(self.config)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return log

    async def start(self, http: aiohttp.ClientSession) -> None:
        """Spawned, and returns once it has finished starting (its /v1 routes serve)."""
        log = self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"watcher exited with {self.process.returncode}: {log.read_text()[-3000:]}"
                )
            try:
                async with http.get(self.base_url + "/healthz") as r:
                    if r.status == 200 and started(await r.read()):
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"watcher did not answer /healthz: {log.read_text()[-3000:]}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the daemon alone: its children (the followers', the dispatcher's) see their
        input close and exit on their own, so none outlives it beside the next daemon."""
        assert self.process is not None
        pid = self.process.pid
        children = [
            int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
        assert len(children) == 2, children
        os.kill(pid, signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{c}").exists() and _running(c) for c in children):
            assert time.monotonic() < deadline, f"children {children} outlived the daemon"
            time.sleep(0.05)

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass
class Operated:
    """The daemon as an operator runs it against one anvil node (`write_config`'s config, the
    secrets by environment variable), with a signature-checking webhook receiver and an
    authenticated API client. Started by `operate`; `close()` stops all of it."""

    chain: AnvilChain
    receiver: Receiver
    daemon: Daemon
    http: aiohttp.ClientSession
    config: Path
    database: Path
    listen: str
    env: dict[str, str]

    async def api(self, method: str, path: str, **kwargs) -> dict:
        """A request that must succeed (2xx); its JSON body."""
        async with self.http.request(method, self.daemon.base_url + path, **kwargs) as r:
            body = await r.json()
            assert 200 <= r.status < 300, (r.status, body)
            return body

    async def close(self) -> None:
        self.daemon.cleanup()
        await self.http.close()
        await self.receiver.stop()


async def operate(node, tmp_path: Path) -> Operated:
    """Our contracts on `node`, a receiver, the config and the environment; not started yet."""
    chain = await asyncio.to_thread(AnvilChain(node, "anvil0").setup)
    receiver = Receiver("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    await receiver.start()
    api_key = "sk_test_" + secrets.token_urlsafe(24)
    listen = f"127.0.0.1:{free_port()}"
    database = tmp_path / "watcher.db"
    config = tmp_path / "watcher.toml"
    write_config(config, database=database, listen=listen, webhook_url=receiver.url, chain=chain)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    env |= {"WATCHER_API_KEY": api_key, "WATCHER_WEBHOOK_SECRET": receiver.secret}
    daemon = Daemon(config, env, f"http://{listen}", tmp_path)
    http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"})
    return Operated(chain, receiver, daemon, http, config, database, listen, env)


def integrity(database: Path) -> str:
    with sqlite3.connect(database) as db:
        return db.execute("PRAGMA integrity_check").fetchone()[0]


async def test_sigkill_while_recording_payments_loses_and_repeats_nothing(anvil_node, tmp_path):
    """30 invoices; 25 payments in 5 blocks, mined a tenth of a second apart; SIGKILL as soon
    as two blocks' worth but not all of them show over HTTP (the follower is between or inside its steps,
    webhooks in flight); 9 more payments and the confirmations mined while it is down; then
    a restart. Every payment is recorded once, every invoice ends as its payments say, every
    change is reported once (a redelivered event keeps its id and body), and the database is
    intact both right after the kill and at the end."""
    op = await operate(anvil_node(), tmp_path)
    chain, receiver, database = op.chain, op.receiver, op.database
    daemon, http, api = op.daemon, op.http, op.api
    try:
        await daemon.start(http)

        # ------------------------------------------------------------ the invoices and their plan
        invoices = [
            await api("POST", "/v1/invoices", json={"amount": str(10 + i), "assets": ["TUSD"]})
            for i in range(30)
        ]
        ids = [inv["id"] for inv in invoices]
        address = {inv["id"]: inv["payment_options"][0]["destination_address"] for inv in invoices}
        atomic = {inv["id"]: int(inv["payment_options"][0]["amount_atomic"]) for inv in invoices}
        assert all(atomic[i] == (10 + n) * UNIT for n, i in enumerate(ids))
        exact, paid_while_down, in_halves, doubled, half_only = (
            ids[:20],
            ids[20:25],
            ids[25:28],
            ids[28],
            ids[29],
        )

        # (invoice, atomic amount) per transaction, in the order they are sent.
        before = [(i, atomic[i]) for i in exact] + [(i, atomic[i] // 2) for i in in_halves]
        before += [(doubled, atomic[doubled]), (half_only, atomic[half_only] // 2)]
        while_down = [(i, atomic[i]) for i in paid_while_down] + [
            (i, atomic[i] - atomic[i] // 2) for i in in_halves
        ]
        while_down += [(doubled, atomic[doubled])]  # a second full payment: a duplicate
        txs: dict[str, list[str]] = defaultdict(list)
        paid_in_phase_one = len(exact) + 1

        def pay_in_blocks(plan: list[tuple[str, int]], per_block: int, gap: float) -> None:
            pay_per_block(chain, [(address[i], i, amount) for i, amount in plan], txs, per_block, gap)

        async def paid_count() -> int:
            paid = await api("GET", "/v1/invoices", params={"status": "paid", "limit": "1"})
            confirmed = await api("GET", "/v1/invoices", params={"status": "confirmed", "limit": "1"})
            return paid["total"] + confirmed["total"]

        # ------------------------------------------------------------ pay, and kill mid-stream
        miner = asyncio.create_task(asyncio.to_thread(pay_in_blocks, before, 5, 0.1))
        seen = 0
        kill_at = 2 * 5  # two blocks in: three more and their webhooks still to come
        deadline = time.monotonic() + 15
        while not kill_at <= seen < paid_in_phase_one:
            assert not (miner.done() and seen >= paid_in_phase_one), (
                "every payment was recorded before the kill"
            )
            assert time.monotonic() < deadline, f"no payment recorded in time (seen {seen})"
            seen = await paid_count()
        daemon.kill()
        killed_at_paid = seen
        events_before_kill = len(receiver.events)
        await miner

        # The file as the kill left it (copied, so the restart itself recovers the original).
        assert integrity(copy_database(database, tmp_path / "after-kill")) == "ok"

        # ------------------------------------------------------------ the chain moves on while it is down
        await asyncio.to_thread(pay_in_blocks, while_down, 5, 0)
        await asyncio.to_thread(chain.mine, CONFIRMATIONS)
        head = await asyncio.to_thread(chain.head)
        for invoice_id, hashes in txs.items():
            for tx in hashes:
                receipt = await asyncio.to_thread(chain.receipt, tx)
                assert receipt is not None and int(receipt["status"], 16) == 1, (invoice_id, tx)

        # ------------------------------------------------------------ restart
        await daemon.start(http)
        expected_status = {i: "confirmed" for i in ids} | {half_only: "pending"}

        async def caught_up() -> bool:
            [row] = (await api("GET", "/v1/chains"))["data"]
            pending = await api("GET", "/v1/webhook-deliveries", params={"status": "pending", "limit": "1"})
            return row["last_processed_block"] == head and pending["total"] == 0

        deadline = time.monotonic() + 15
        while True:
            got = {i: await api("GET", f"/v1/invoices/{i}") for i in ids}
            if all(got[i]["status"] == expected_status[i] for i in ids) and await caught_up():
                break
            assert time.monotonic() < deadline, {
                i: got[i]["status"] for i in ids if got[i]["status"] != expected_status[i]
            }
            await asyncio.sleep(0.1)

        # ------------------------------------------------------------ every payment once, every invoice right
        assert_every_payment_once(got, txs, before + while_down)
        assert_judged(
            got, txs, exact=exact + paid_while_down + in_halves, doubled=doubled, half_only=half_only
        )
        failed = await api("GET", "/v1/webhook-deliveries", params={"status": "failed", "limit": "1"})
        assert failed["total"] == 0

        # ------------------------------------------------------------ every change reported once
        by_id = assert_every_change_reported_once(receiver)
        for n, i in enumerate(ids):
            delivered = Counter(
                by_id[event_id][0].type for event_id in {e.event_id for e in receiver.for_invoice(i)}
            )
            assert delivered == expected_types(len(txs[i]), paid=i != half_only, duplicate=i == doubled), (
                n,
                delivered,
            )

        # ---------------------------------------------- a clean stop, an intact file, no crash logged
        assert daemon.terminate() == 0
        assert integrity(database) == "ok"
        assert_no_crash_logged(daemon.logs)
        assert kill_at <= killed_at_paid < paid_in_phase_one
        print(
            f"killed with {killed_at_paid}/{paid_in_phase_one} paid "
            f"and {events_before_kill} events received; "
            f"{sum(len(c) > 1 for c in by_id.values())} events redelivered after the restart"
        )
    finally:
        await op.close()


def copy_database(database: Path, directory: Path) -> Path:
    """The database file and its WAL as they are, copied into `directory`; the copy's path."""
    directory.mkdir()
    for suffix in ("", "-wal"):
        if Path(f"{database}{suffix}").exists():
            shutil.copy(f"{database}{suffix}", directory / f"watcher.db{suffix}")
    return directory / "watcher.db"


def pay_per_block(
    chain: AnvilChain, plan: list[tuple[str, str, int]], txs: dict[str, list[str]], per_block: int, gap: float
) -> None:
    """(address, invoice, amount) transfers, `per_block` to a block (from three payers in turn),
    a block mined `gap` seconds apart; each transaction's hash noted under its invoice."""
    for k in range(0, len(plan), per_block):
        for to, invoice_id, amount in plan[k : k + per_block]:
            txs[invoice_id].append(chain.transfer_token(to, amount, PAYERS[1 + k // per_block % 3]))
        chain.mine(1)
        time.sleep(gap)


def assert_every_payment_once(
    got: dict[str, dict], txs: dict[str, list[str]], sent: list[tuple[str, int]]
) -> None:
    """Each invoice has exactly the transactions sent to it, each once, confirmed, for the amounts sent."""
    for n, (i, invoice) in enumerate(got.items()):
        payments = invoice["payments"]
        assert sorted(p["transaction_hash"] for p in payments) == sorted(txs[i]), (n, payments)
        assert len(payments) == len(txs[i]), (n, "a transaction recorded twice")
        assert all(p["status"] == "confirmed" for p in payments), (n, payments)
        assert sum(int(p["amount_atomic"]) for p in payments) == sum(a for j, a in sent if j == i)


def assert_judged(
    got: dict[str, dict], txs: dict[str, list[str]], *, exact: list[str], doubled: str, half_only: str
) -> None:
    """Paid in full (at once or in parts): exact; paid twice: a duplicate; half paid: partial."""
    for i in exact:
        assert got[i]["payment_summary"]["payment_state"] == "exact", got[i]["payment_summary"]
        assert got[i]["exception"] is None
        assert [p["role"] for p in got[i]["payments"]] == ["counted"] * len(txs[i])
    assert got[doubled]["exception"]["type"] == "duplicate_payment"
    assert got[doubled]["exception"]["status"] == "open"
    roles = {p["transaction_hash"]: p["role"] for p in got[doubled]["payments"]}
    assert roles == {txs[doubled][0]: "counted", txs[doubled][1]: "duplicate"}
    assert got[half_only]["payment_summary"]["payment_state"] == "partial"
    assert got[half_only]["payment_summary"]["received_amount"] == "19.50"


def assert_every_change_reported_once(receiver: Receiver) -> dict[str, list]:
    """Signed, a redelivery byte for byte the same event, no change under two ids; the events by id."""
    assert receiver.bad_signatures == 0
    by_id: dict[str, list] = defaultdict(list)
    for e in receiver.events:
        by_id[e.event_id].append(e)
    for event_id, copies in by_id.items():  # a redelivery is the same event, byte for byte
        assert all(c.body == copies[0].body for c in copies), event_id
    change_ids: dict[tuple, set[str]] = defaultdict(set)
    for e in receiver.events:
        payment = e.body["data"]["payment"]
        # Two payments found in one step share the invoice's version: the payment tells them apart.
        change_ids[(e.invoice_id, e.type, e.version, payment["id"] if payment else None)].add(e.event_id)
    twice = {k: v for k, v in change_ids.items() if len(v) > 1}
    assert not twice, f"a change reported under two ids: {twice}"
    return by_id


def expected_types(payments: int, *, paid: bool, duplicate: bool) -> Counter:
    if not paid:
        return Counter({"invoice.created": 1, "invoice.payment_detected": payments})
    types = Counter(
        {
            "invoice.created": 1,
            "invoice.payment_detected": payments,
            "invoice.paid": 1,
            "invoice.confirmed": 1,
        }
    )
    if duplicate:
        types["invoice.exception_opened"] = 1
    return types


def assert_no_crash_logged(logs: list[Path]) -> None:
    for log in logs:
        text = log.read_text()
        for bad in ("watcher_crashed", "follower_step_crashed", "dispatcher_step_failed", "Traceback"):
            assert bad not in text, f"{log.name}: {bad}"
