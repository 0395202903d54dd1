"""Which of what a chain shows is ours: the watch set of one chain, held in memory.

Deposit addresses (both assets) and router payment ids are loaded from the store once and
then by rowid as options are created, so matching a block is a dictionary lookup per
transfer whatever the number of open invoices. No I/O besides that load; the follower
decides what to read from the node and hands the results here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from .bloom import bloom_mask, may_contain
from .chain import TRANSFER_TOPIC, address_topic
from .contracts import PAYMENT_RECEIVED_TOPIC
from .domain import FullBlock, RouterPayment, Transfer

if TYPE_CHECKING:
    from .chain.traces import InternalTransfer
    from .store import Store

log = structlog.get_logger("watcher.follower")

# Up to this many deposit addresses (or router payment ids) go in one eth_getLogs topic
# filter: providers refuse long topic lists.
TOPIC_FILTER_LIMIT = 1000
# A range is asked in up to this many filtered requests (one per TOPIC_FILTER_LIMIT
# recipients): the node's answer then holds only our logs. Past it we ask for every log of our
# tokens (or router) and match here: a node scans the range once per request, so many filtered
# requests cost it more than one unfiltered answer costs us to decode.
TOPIC_FILTER_REQUESTS = 4

Match = tuple[Transfer, str]  # a payment found, and the option it pays


def _filterable() -> int:
    """How many recipients (or payment ids) the node is asked to filter by, over all requests."""
    return TOPIC_FILTER_LIMIT * TOPIC_FILTER_REQUESTS


def _event_mask(address: str, topic: str) -> int:
    return bloom_mask(address) | bloom_mask(topic)


@dataclass(frozen=True, slots=True)
class WatchTarget:
    """An address-rail option: its deposit address is the key."""

    option_id: str
    token: str | None  # None: the native coin


@dataclass(frozen=True, slots=True)
class RouterTarget:
    """A contract-rail option, found by its payment id hash in the router's logs."""

    option_id: str
    token: str | None
    invoice_id_hash: str
    recipient: str
    router: str  # the router the option names (router_address when it was created)


class WatchSet:
    def __init__(self, network: str) -> None:
        self.network = network
        self.addresses: dict[str, WatchTarget] = {}
        self.payment_ids: dict[str, RouterTarget] = {}
        # Every router an option names: one configured now, and any earlier router_address
        # whose options are still open (a changed setting must not orphan them).
        self.routers: set[str] = set()
        self._rowid = 0
        self._tokens: dict[str | None, str | None] = {}  # one string per token, not one per option
        # The first, whole load runs after the API serves (watcher/watchload.py): until it is
        # over the follower waits and `/readyz` shows `progress` (options loaded, to load).
        self.loaded = False
        self.progress = (0, 0)

    @property
    def after_rowid(self) -> int:
        """The last option loaded: the next look starts after it."""
        return self._rowid

    def refresh(self, store: Store) -> None:
        """Pick up options created since the last look (cheap: by rowid)."""
        self.add(store.watch_entries(self.network, self._rowid))

    def add(self, rows: Iterable[Any]) -> int:
        """Watch these options (rows as `Store.watch_entries` gives them, in rowid order);
        returns how many there were."""
        tokens = self._tokens
        count = 0
        for row in rows:
            count += 1
            if row["rail"] == "address":
                token = tokens.setdefault(row["token_contract"], row["token_contract"])
                self.addresses[row["destination_address"]] = WatchTarget(row["id"], token)
            elif row["contract_call"]:
                call = orjson.loads(row["contract_call"])
                token = call["token"].lower()
                router = call["router"].lower()
                self.payment_ids[call["payment_id_hash"]] = RouterTarget(
                    row["id"],
                    None if int(token, 16) == 0 else token,
                    call["invoice_id_hash"],
                    call["recipient"].lower(),
                    router,
                )
                self.routers.add(router)
            self._rowid = row["rowid"]
        return count

    def forget(self, rows: Iterable[Any]) -> int:
        """Stop watching these options (rows as `store.retention.closed_watch_entries` gives
        them: their invoices closed long ago); returns how many were still watched."""
        forgotten = 0
        for row in rows:
            if row["rail"] == "address":
                target = self.addresses.get(row["destination_address"])
                if target is not None and target.option_id == row["id"]:
                    del self.addresses[row["destination_address"]]
                    forgotten += 1
            elif row["contract_call"]:
                payment_id = orjson.loads(row["contract_call"])["payment_id_hash"]
                router_target = self.payment_ids.get(payment_id)
                if router_target is not None and router_target.option_id == row["id"]:
                    del self.payment_ids[payment_id]
                    forgotten += 1
        return forgotten

    def recipient_filter(self) -> list[str] | None:
        """The deposit addresses for a topic filter, or None when there are too many."""
        return list(self.addresses) if len(self.addresses) <= _filterable() else None

    def payment_id_filter(self) -> list[str] | None:
        return list(self.payment_ids) if len(self.payment_ids) <= _filterable() else None

    def may_pay(self, bloom: int | None, tokens: Sequence[str]) -> tuple[bool, bool]:
        """(may the block hold a Transfer of ours, may it hold a router payment of ours), by
        its logsBloom: False only when the bloom rules it out (a bloom has no false
        negatives). Recipients and payment ids are looked at while they fit a topic filter;
        past that, the token or router and its event alone decide."""
        transfers = bool(tokens) and bool(self.addresses)
        routed = bool(self.routers) and bool(self.payment_ids)
        if bloom is None:
            return transfers, routed
        if transfers:
            transfers = any(may_contain(bloom, _event_mask(t, TRANSFER_TOPIC)) for t in tokens) and (
                len(self.addresses) > TOPIC_FILTER_LIMIT
                or any(may_contain(bloom, bloom_mask(address_topic(a))) for a in self.addresses)
            )
        if routed:
            routed = any(
                may_contain(bloom, _event_mask(r, PAYMENT_RECEIVED_TOPIC)) for r in self.routers
            ) and (
                len(self.payment_ids) > TOPIC_FILTER_LIMIT
                or any(may_contain(bloom, bloom_mask(p)) for p in self.payment_ids)
            )
        return transfers, routed

    def transfers(self, transfers: Sequence[Transfer]) -> list[Match]:
        """Ours: to a deposit address, of that option's asset, and not zero."""
        out = []
        for t in transfers:
            target = self.addresses.get(t.to_address)
            if target is None:
                continue
            if t.amount == 0:
                log.info("zero_value_transfer_ignored", network=self.network, tx=t.tx_hash, to=t.to_address)
                continue
            if target.token != t.token:
                log.warning(
                    "wrong_asset_transfer_ignored",
                    network=self.network,
                    tx=t.tx_hash,
                    to=t.to_address,
                    token=t.token,
                )
                continue
            out.append((t, target.option_id))
        return out

    def router_payments(self, payments: Sequence[RouterPayment]) -> list[Match]:
        """Ours: from the option's router, for a known payment id of that invoice, to the merchant the
        option named (the merchant_address when it was created), in that option's asset, and
        not zero. Unknown payment ids are other merchants' business on a shared router."""
        out = []
        for p in payments:
            target = self.payment_ids.get(p.payment_id_hash)
            if target is None or p.router != target.router:
                continue
            problem = None
            if p.amount == 0:
                problem = "zero amount"
            elif p.invoice_id_hash != target.invoice_id_hash:
                problem = "invoice id hash does not match the option's invoice"
            elif p.recipient != target.recipient:
                problem = "recipient is not the option's merchant address"
            elif p.token != target.token:
                problem = "token is not the option's asset"
            if problem is not None:
                log.warning("router_payment_ignored", network=self.network, tx=p.tx_hash, reason=problem)
                continue
            out.append((p.as_transfer(), target.option_id))
        return out

    def logged(self, transfers: Sequence[Transfer], payments: Sequence[RouterPayment]) -> list[Match]:
        """Token transfers and router payments of one range together.

        A token payment through the router also emits the token's own Transfer (payer to
        merchant): the router's log is the payment, so that Transfer is not counted again.
        (It can only match a deposit address if the merchant address is one too: a guard for
        that misconfiguration.)"""
        routed = self.router_payments(payments)
        moved_by_router = {(t.tx_hash, t.token, t.to_address, t.amount) for t, _ in routed}
        direct = [
            m
            for m in self.transfers(transfers)
            if (m[0].tx_hash, m[0].token, m[0].to_address, m[0].amount) not in moved_by_router
        ]
        return direct + routed

    def native(self, blocks: Sequence[FullBlock]) -> list[Match]:
        """Transactions whose own value goes to a coin option's address (their success is
        for the caller to check: a failed transaction moved nothing)."""
        out = []
        for block in blocks:
            for tx in block.transactions:
                target = self._coin_target(tx.to_address, tx.tx_hash)
                if target is not None:
                    transfer = Transfer(
                        tx.tx_hash,
                        None,
                        block.ref.number,
                        block.ref.hash,
                        None,
                        tx.from_address,
                        tx.to_address,
                        tx.amount,
                    )
                    out.append((transfer, target.option_id))
        return out

    def inner(self, transfers: Sequence[InternalTransfer]) -> list[tuple[InternalTransfer, str]]:
        """Inner transfers (from the node's tracer) to a coin option's address."""
        out = []
        for inner in transfers:
            if (
                inner.amount > 0
                and (target := self._coin_target(inner.to_address, inner.tx_hash)) is not None
            ):
                out.append((inner, target.option_id))
        return out

    def _coin_target(self, to_address: str, tx_hash: str) -> WatchTarget | None:
        target = self.addresses.get(to_address)
        if target is not None and target.token is not None:
            log.warning(
                "wrong_asset_transfer_ignored", network=self.network, tx=tx_hash, to=to_address, token=None
            )
            return None
        return target
