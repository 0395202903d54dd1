"""Follows one chain: canonical blocks in, payments and reorgs out, one checkpoint per step.

Each `run_once()` either handles a reorg (found by parent hash against the stored window)
or scans the next range of blocks, matches transfers to our deposit addresses and hands
the lot to the store in one transaction. A restart resumes from the checkpoint: the range
after it is scanned exactly once, and a payment seen twice is still recorded once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import structlog

from . import matching
from .chain import MAX_BATCH, METHOD_NOT_FOUND, BlockUnknown, ChainReader, FoundLogs, LogQuery, RpcError
from .domain import BlockRef, FullBlock, Transfer
from .matching import Match, WatchSet
from .offload import off_loop
from .store import MatchedTransfer, Store
from .watchload import load_watch_set

log = structlog.get_logger("watcher.follower")

T = TypeVar("T")


# eth_getLogs spans within a step, and how many are asked for at once (see _logged_payments).
LOG_SPAN = 100
LOGS_IN_FLIGHT = 2
# Blocks read by hash (near the head) go in one batch below twice this many.
MIN_BLOCKS_A_BATCH = 16
# Blocks remembered (linked by parent hash) to find a reorg's common ancestor: at least this
# many, and always the confirmations and this margin more.
MIN_WINDOW = 256
WINDOW_MARGIN = 64
# Below `head - RANGE_DEPTH_FACTOR * max(depth, WINDOW_MARGIN)` logs are read by number range;
# above it, block by block by hash (the unfinalised part, where nodes disagree).
RANGE_DEPTH_FACTOR = 2
# Up to this many deposit addresses (or payment ids) go in a topic filter of one block's logs.
BLOCK_TOPIC_LIMIT = 16
# A step records about this many payments at most: its transaction holds the database's write
# lock while it judges them (about 2 s for 5,000 here), and every other writer (the API creating
# an invoice, the webhook dispatcher recording attempts, in processes of their own) waits for it.
MAX_STEP_PAYMENTS = 5_000
# While `run()` catches up, a step's write waits for the last one's and would begin the moment
# it commits, holding the write lock back to back. The API's and the dispatcher's writes waiting
# for the lock look again every millisecond (engine.LOCK_POLL_S), but a gap of a few hundred
# microseconds between two steps is too short for a thread that must also win its process's
# GIL, and their busy timeout (the API's is 5 s) could pass. Once the steps' writes have held
# the lock back to back for WRITE_RUN_SECONDS, a step leaves it free WRITE_GAP_SECONDS after
# the last commit before it begins its own: enough for a writer looking every millisecond on a
# busy machine, and a few per cent of a catch-up (it was 0.12 s when writers relied on SQLite's
# busy handler, which looks again only every 100 ms: 13% of a 100%-ours catch-up). Every
# writer of the store takes the lock through engine.StoreDatabase; a connection that relies on
# SQLite's own busy handler instead (an operator's `sqlite3` shell writing) may miss 30 ms gaps.
# Shorter runs pause for nothing: at 1% ours a gap at every step was half of the catch-up
# (BENCHMARKS.md).
WRITE_GAP_SECONDS = 0.03
WRITE_RUN_SECONDS = 1.0


class ChainChanged(Exception):
    """What the node said moved under us mid-read (a reorg in progress, a node behind); try again."""


class ChainStopped(Exception):
    """Following on would risk a wrong payment: the chain stops (no block is applied, nothing
    confirmed) and `/readyz` says why until a step succeeds again or an operator acts."""


class WrongChainFollowed(ChainStopped):
    """The node's genesis is not the one the database recorded: another chain entirely."""


class ReorgTooDeep(ChainStopped):
    """The node has none of the blocks we remember: a reorg deeper than our window, or a
    node of another chain. Confirmed payments may be gone; a person must look."""


def reorg_depth(confirmations: int | str) -> int:
    """How deep reorgs are expected to go: the confirmations, or 64 blocks with "finalized"."""
    return confirmations if isinstance(confirmations, int) else 64


@dataclass
class FollowerStatus:
    head_block: int | None = None
    last_head_at: float | None = None
    last_error: str | None = None
    stopped: str | None = None  # why the chain is stopped (ChainStopped), None while it follows


class FollowerMetrics(Protocol):
    """What a follower reports after each committed range (the metrics)."""

    def blocks_applied(self, network: str, blocks: int, payment_roles: Sequence[str]) -> None: ...

    def step_failed(self, network: str, reason: str) -> None: ...


@dataclass(frozen=True)
class Rails:
    """What to look for on a chain besides ERC-20 transfers to deposit addresses (router
    payments are looked for whenever an option names a router: see WatchSet.routers)."""

    native: bool = False  # the chain's coin to deposit addresses (a native asset is configured)
    internal_transfers: Literal["auto", "on", "off"] = "auto"  # the coin sent by inner calls (tracers)


class TracerMissing(ChainStopped):
    """`internal_transfers = "on"` but the node offers no tracer: stop rather than miss payments."""


class Follower:
    def __init__(
        self,
        *,
        network: str,
        reader: ChainReader,
        store: Store,
        tokens: Sequence[str],
        confirmations: int | str,  # a count, or "finalized"
        start_block: int | str = "latest",
        chunk_size: int = 500,
        max_chunk_size: int = 2000,
        poll_interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        metrics: FollowerMetrics | None = None,
        rails: Rails = Rails(),
        max_batch: int = MAX_BATCH,
        trust_logs_bloom: bool = True,
    ) -> None:
        self.network = network
        self.reader = reader
        self.store = store
        self.tokens = [t.lower() for t in tokens]
        self.confirmations = confirmations
        # How deep reorgs are expected to go: headers are linked one by one above this depth.
        self.depth = reorg_depth(confirmations)
        # Blocks remembered below the checkpoint; with "finalized", also everything above the finalized block.
        self.window = max(MIN_WINDOW, self.depth + WINDOW_MARGIN)
        self.max_batch = max(1, max_batch)
        self.trust_logs_bloom = trust_logs_bloom
        self.start_block = start_block
        self.chunk_size = chunk_size
        self.max_chunk_size = max(max_chunk_size, chunk_size)
        self.poll_interval = poll_interval
        self.clock = clock
        self.metrics = metrics
        self.status = FollowerStatus()
        self.rails = rails
        self.watch = WatchSet(network)
        # The node's tracer for inner transfers: a method name, None for none, "" before asking.
        self.tracer: str | None = "" if rails.native and rails.internal_transfers != "off" else None
        self._wake = asyncio.Event()
        self._waiting_for: str | None = None  # set by a step that found the node behind us
        self._tip_verified = False  # set by a step that found our checkpoint still on the node's chain
        # The last step's write, still committing while `run()` reads the next range, and the
        # checkpoint it makes (see _settle).
        self._writing: asyncio.Task[None] | None = None
        self._writing_tip: BlockRef | None = None
        self._overlap = False  # the step in progress is `run()`'s (see run_once)
        self._committed_at = -WRITE_GAP_SECONDS  # time.monotonic() of the last step's commit
        self._run_since = 0.0  # when the steps' writes began holding the lock back to back
        # Headers asked for ahead of the step that reads them (see _prefetch_headers).
        self._prefetch: tuple[list[int], asyncio.Future[list[BlockRef | None]]] | None = None

    # ------------------------------------------------------------------ watch set

    def refresh_watch_set(self) -> None:
        """Pick up options created since the last look."""
        self.watch.refresh(self.store)

    async def load_watch_set(self, stopping: asyncio.Event) -> None:
        """The whole watch set, loaded off the event loop (watchload); retried until it is, as a step is."""
        backoff = 0.5
        while not self.watch.loaded and not stopping.is_set():
            try:
                await load_watch_set(self.watch, self.store)
            except sqlite3.Error as exc:
                log.warning("watch_set_load_failed", network=self.network, error=str(exc))
                self.status.last_error = f"watch set not loaded: {exc}"
                await _sleep_or(stopping, backoff)
                backoff = min(backoff * 2, 30.0)

    async def _native_deposits(self, blocks: Sequence[FullBlock]) -> list[Match]:
        """Plain transfers of the coin to a coin option's address, in transactions that succeeded."""
        candidates = self.watch.native(blocks)
        if not candidates:
            return []
        ok = await self.reader.successful_transactions(
            {t.tx_hash: (t.block_number, t.block_hash) for t, _ in candidates}
        )
        for t, _ in candidates:
            if t.tx_hash not in ok:
                log.info("failed_transaction_ignored", network=self.network, tx=t.tx_hash, to=t.to_address)
        return [(t, option) for t, option in candidates if t.tx_hash in ok]

    async def _internal_deposits(self, blocks: Sequence[FullBlock]) -> list[Match]:
        """The coin sent to a coin option's address by inner calls, read with the node's tracer."""
        assert self.tracer
        by_number = {b.ref.number: b for b in blocks}
        out = []
        try:
            traced = await self.reader.internal_transfers(list(by_number), self.tracer)
        except RpcError as exc:
            if exc.code == METHOD_NOT_FOUND:
                # A failover may have moved us to a node without this tracer: ask which it has.
                self.tracer = ""
            raise
        for inner, option_id in self.watch.inner(traced):
            block = by_number.get(inner.block_number)
            if block is None or inner.tx_hash not in block.tx_hashes:
                # Traces are read by number: make sure they are of the block we read.
                raise ChainChanged(
                    f"trace of tx {inner.tx_hash} is not of block {inner.block_number} as read"
                )
            transfer = Transfer(
                inner.tx_hash,
                None,
                block.ref.number,
                block.ref.hash,
                None,
                inner.from_address,
                inner.to_address,
                inner.amount,
                trace_position=inner.position,
            )
            out.append((transfer, option_id))
        return out

    async def _ensure_tracer(self, head: int) -> None:
        """Find the node's tracer once (`auto`: use it if there is one; `on`: insist)."""
        if self.tracer != "" or head < 1:
            # Asked already; or only genesis exists, which nodes refuse to trace (and holds no payment).
            return
        # A block a little below the head: a load-balanced provider's other backends may not have
        # the head yet.
        self.tracer = await self.reader.probe_tracer(max(1, head - 2))
        if self.tracer is None:
            if self.rails.internal_transfers == "on":
                self.tracer = ""
                raise TracerMissing(
                    'internal_transfers = "on" but the node has no tracer (neither '
                    "debug_traceBlockByNumber nor trace_block answers): not following the chain rather than "
                    "missing payments"
                )
            log.warning(
                "internal_transfers_unavailable",
                network=self.network,
                detail="the node has no tracer: the coin sent from inside contract calls is not seen",
            )
        else:
            log.info("internal_transfers_traced", network=self.network, method=self.tracer)

    # ------------------------------------------------------------------ one step

    async def run_once(self, *, overlap: bool = False) -> int:
        """Do one step of work; returns how many blocks it moved the checkpoint (0: caught up).
        With `overlap` (`run()` catching up), the step's write may still be committing when it
        returns: the next step reads its range meanwhile, and waits for it before it writes.

        `status.last_error` keeps the last failure until a step completes (a step that fails
        late must not look healthy for its duration); a node behind us is a completed step
        that still reports."""
        previous = self.status.last_error
        self._waiting_for = None
        self._tip_verified = False
        self._overlap = overlap
        moved = await self._step()
        if not overlap or not moved:
            await self._settle()  # caught up (or a caller that reads the store next): committed
        self.status.last_error = self._waiting_for
        if self.status.stopped is not None and (moved or self._tip_verified):
            log.warning("chain_resumed", network=self.network, was=self.status.stopped)
            self.status.stopped = None
        if self._waiting_for is not None and self._waiting_for != previous:
            log.warning("node_behind_checkpoint", network=self.network, detail=self._waiting_for)
        return moved

    async def _step(self) -> int:
        head = await self.reader.block_number()
        self.status.head_block = head
        self.status.last_head_at = self.clock()
        await self._ensure_tracer(head)
        cursor = self._checkpoint()

        if cursor is None:
            start = head if self.start_block == "latest" else int(self.start_block)
            if start > head:
                return 0
            first = start
        else:
            if head < cursor.number:
                # A node behind our checkpoint (a lagging provider) proves nothing: wait for it.
                # A real reorg shows when it has a different block at our height. (A reset test
                # chain starts low too: its genesis tells it apart.)
                await self._check_genesis()
                self._waiting_for = f"node head {head} is behind our checkpoint {cursor.number}"
                return 0
            if head == cursor.number:
                # Nothing new; make sure our tip is still canonical.
                [node_block] = await self.reader.headers([cursor.number])
                if node_block is not None and node_block.hash != cursor.hash:
                    await self._handle_reorg(cursor)
                    return 1
                self._tip_verified = node_block is not None
                return 0
            first = cursor.number + 1

        last = min(head, first + self.chunk_size - 1)
        return await self._scan(cursor, first, last, head)

    def _checkpoint(self) -> BlockRef | None:
        """The stored checkpoint, or the one the write in flight makes when it commits."""
        if self._writing is not None:
            return self._writing_tip
        return self.store.cursor(self.network)

    async def _settle(self) -> None:
        """Wait for the last step's write, if one is in flight. Its failure is raised here, in
        the step after it, which then fails as a whole: the next one starts again from the
        checkpoint stored, so nothing read on top of the failed write is kept."""
        writing, self._writing, self._writing_tip = self._writing, None, None
        if writing is not None:
            await writing

    async def _leave_the_lock_a_gap(self) -> None:
        """The other writers' turn, once the steps' writes have held the lock back to back for
        WRITE_RUN_SECONDS (see there)."""
        now = time.monotonic()
        gap = self._committed_at + WRITE_GAP_SECONDS - now
        if gap <= 0:
            self._run_since = now  # the lock was free long enough: a new run of writes
        elif now - self._run_since >= WRITE_RUN_SECONDS:
            await asyncio.sleep(gap)
            self._run_since = time.monotonic()

    def _range_ceiling(self, head: int, finalized: int | None) -> int:
        """The highest block whose logs may be read by number range: well below the head
        (and at or below the finalized block with "finalized"), where no node disagrees."""
        ceiling = head - RANGE_DEPTH_FACTOR * max(self.depth, WINDOW_MARGIN)
        return ceiling if finalized is None else min(ceiling, finalized)

    async def _scan(self, cursor: BlockRef | None, first: int, last: int, head: int) -> int:
        # Blocks (headers, or full blocks for native deposits, which also links them all) before
        # logs: if the chain moves between the reads, the checkpoint keeps the hash we saw
        # first, and the next step's parent-hash check finds the reorg.
        finalized = await self.reader.finalized_number() if self.confirmations == "finalized" else None
        ceiling = self._range_ceiling(head, finalized)
        near_head = last > ceiling
        if near_head and first <= ceiling:
            last, near_head = ceiling, False  # the ranged part now, the rest block by block next step
            ahead = list(range(ceiling + 1, min(head, ceiling + self.chunk_size) + 1))
        else:
            ahead = []
        whole = near_head or self.rails.native  # every block of the range read, not only its ends
        numbers = list(range(first, last + 1)) if whole else sorted({first, last})
        full_blocks: list[FullBlock] = []
        if self.rails.native:
            full_blocks = await self._full_blocks(numbers, partial=whole)
            by_number = {b.ref.number: b.ref for b in full_blocks}
        else:
            by_number = await self._headers(
                numbers, partial=whole, prefetched=await self._prefetched(numbers)
            )
        if whole and len(by_number) < len(numbers):
            # The node lacks the newest blocks for now (a backend behind): take the ones it has.
            numbers = numbers[: len(by_number)]
            last = numbers[-1]
        if cursor is not None and by_number[first].parent_hash != cursor.hash:
            await self._handle_reorg(cursor)
            return 1
        if len(numbers) == last - first + 1:
            _check_links(by_number, first, last)

        if ahead and not self.rails.native:
            self._prefetch_headers(ahead)
        self.refresh_watch_set()
        if near_head:
            matched = await self._block_logged_payments([by_number[n] for n in numbers])
        else:
            matched = await self._logged_payments(first, last, by_number[last])
        if self.rails.native:
            matched += await self._native_deposits(full_blocks)
            if self.tracer:
                matched += await self._internal_deposits(full_blocks)
        checked = False  # the payments' blocks read and their hashes checked
        if len(matched) > self._step_cap() and last > first:
            await self._check_matches(matched, by_number)  # the cut's block becomes the checkpoint
            last, matched = self._cut(first, matched, by_number)
            checked = True
        elif (
            last - first + 1 == self.chunk_size
            and self.chunk_size < self.max_chunk_size
            and len(matched) <= self._step_cap() // 2
        ):
            self.chunk_size = min(self.max_chunk_size, self.chunk_size * 2)
        await self._apply(first, last, finalized, by_number, matched, checked=checked)
        return last - first + 1

    def _step_cap(self) -> int:
        """MAX_STEP_PAYMENTS, shared by the webhook endpoints: each adds a delivery per event."""
        endpoints = len(getattr(self.store.outbox, "endpoints", ())) or 1
        return max(min(100, MAX_STEP_PAYMENTS), MAX_STEP_PAYMENTS // endpoints)

    def _cut(
        self, first: int, matched: list[Match], by_number: dict[int, BlockRef]
    ) -> tuple[int, list[Match]]:
        """End the step at the block of its `MAX_STEP_PAYMENTS`-th payment (whole blocks: every
        block that holds a payment has its header read, so it can be the checkpoint). The rest
        of the range is read again by the next steps, which read as many blocks as this one kept."""
        last = sorted(t.block_number for t, _ in matched)[self._step_cap() - 1]
        for number in [n for n in by_number if n > last]:
            del by_number[number]
        self.chunk_size = last - first + 1
        return last, [m for m in matched if m[0].block_number <= last]

    async def _check_matches(self, matched: list[Match], by_number: dict[int, BlockRef]) -> None:
        """Every matched transfer sits in a block we read (its header read now if not yet),
        under that block's hash."""
        missing = sorted({t.block_number for t, _ in matched} - set(by_number))
        if missing:
            by_number.update(await self._headers(missing))
        await off_loop(_check_block_hashes, matched, by_number, items=len(matched))

    async def _apply(
        self,
        first: int,
        last: int,
        finalized: int | None,
        by_number: dict[int, BlockRef],
        matched: list[Match],
        *,
        checked: bool = False,
    ) -> None:
        """Record the range in one change, on the store's writer thread (the loop stays free),
        once the previous step's write has committed. It is left in flight (`_writing`): the
        next step reads meanwhile.

        The check of the payments' blocks (their headers read) starts here, beside the previous
        step's write still in flight rather than after its commit: this step's write then begins
        as soon as that one commits, not after a round of header reads from the node
        (BENCHMARKS.md, issue 13, eighth round). A check that fails fails this step's write.
        `checked`: a step cut at its payment cap has checked them already (`_scan`)."""
        if finalized is not None:
            confirmed_through = min(last, finalized)
            keep_above = min(last - self.window, finalized - 1)
        else:
            confirmed_through = last - int(self.confirmations) + 1
            keep_above = last - self.window
        transfers = asyncio.ensure_future(self._checked_transfers(matched, by_number, check=not checked))
        transfers.add_done_callback(_observed)  # a write cancelled before it awaits the check
        try:
            await self._settle()
            if self._overlap:
                await self._leave_the_lock_a_gap()
        except BaseException:  # no write follows: the check is not left running unobserved
            transfers.cancel()
            await asyncio.gather(transfers, return_exceptions=True)
            raise
        self._writing = asyncio.create_task(
            self._record(first, last, by_number, transfers, confirmed_through, keep_above),
            name=f"follower-write-{self.network}",
        )
        self._writing_tip = by_number[last]

    async def _checked_transfers(
        self, matched: list[Match], by_number: dict[int, BlockRef], *, check: bool = True
    ) -> list[MatchedTransfer]:
        """The matched transfers with their blocks' times, every block read and checked (unless
        the caller has, `check=False`)."""
        if check:
            await self._check_matches(matched, by_number)
        return await off_loop(_matched_transfers, matched, by_number, items=len(matched))

    async def _record(
        self,
        first: int,
        last: int,
        by_number: dict[int, BlockRef],
        checked: asyncio.Future[list[MatchedTransfer]],
        confirmed_through: int,
        keep_above: int,
    ) -> None:
        """The write, once the payments' blocks are checked. A check that fails fails this
        write: the next step raises it (_settle)."""
        transfers = await checked
        blocks = [by_number[n] for n in sorted(by_number)]  # the payments' blocks too, now read
        try:
            result = await self.store.write(
                self.store.apply_blocks,
                self.network,
                blocks,
                transfers,
                confirmed_through=confirmed_through,
                keep_above=keep_above,
            )
        finally:
            self._committed_at = time.monotonic()  # the lock is free again, committed or not
        if self.metrics is not None:
            self.metrics.blocks_applied(self.network, last - first + 1, result.payment_roles)
        if result.payments_added or result.payments_confirmed or result.invoices_changed:
            log.info(
                "blocks_applied",
                network=self.network,
                first=first,
                last=last,
                payments=result.payments_added,
                confirmed=result.payments_confirmed,
                invoices_changed=result.invoices_changed,
                events=result.events,
            )

    def _log_query(self, transfers: bool = True, routed: bool = True, *, one_block: bool = False) -> LogQuery:
        """What to ask eth_getLogs for. One block holds few logs: past BLOCK_TOPIC_LIMIT
        addresses (or payment ids) its logs are asked unfiltered and matched here, rather than
        sending the whole list with every block's request."""
        recipients = self.watch.recipient_filter()
        payment_ids = self.watch.payment_id_filter()
        if one_block:
            recipients = (
                recipients if recipients is not None and len(recipients) <= BLOCK_TOPIC_LIMIT else None
            )
            payment_ids = (
                payment_ids if payment_ids is not None and len(payment_ids) <= BLOCK_TOPIC_LIMIT else None
            )
        return LogQuery(
            tokens=self.tokens if transfers else [],
            recipients=recipients,
            keep=self.watch.addresses if recipients is None else None,
            routers=sorted(self.watch.routers) if routed else [],
            payment_ids=payment_ids,
            topics_per_request=matching.TOPIC_FILTER_LIMIT,
        )

    async def _block_logged_payments(self, blocks: Sequence[BlockRef]) -> list[Match]:
        """Near the head: each block's logs asked by its hash, unless its logsBloom rules out
        every log we could want (most blocks, for most merchants: no request at all)."""
        wanted = []
        for block in blocks:
            transfers, routed = self.watch.may_pay(
                block.bloom if self.trust_logs_bloom else None, self.tokens
            )
            if transfers or routed:
                wanted.append((block, self._log_query(transfers, routed, one_block=True)))
        if not wanted:
            return []
        # A catch-up's last step reads up to 128 blocks here: in LOGS_IN_FLIGHT batches at once,
        # each closed by its own newest block's header, rather than one batch after another.
        size = max(MIN_BLOCKS_A_BATCH, -(-len(wanted) // LOGS_IN_FLIGHT))
        parts = await _all_or_none(
            [self.reader.block_logs(wanted[i : i + size]) for i in range(0, len(wanted), size)]
        )
        return self.watch.logged(
            [t for part in parts for t in part.transfers], [p for part in parts for p in part.routed]
        )

    async def _logged_payments(self, first: int, last: int, tip: BlockRef) -> list[Match]:
        """Token transfers and router payments of the range, matched to our options.

        The range is read in spans of at most LOG_SPAN blocks, LOGS_IN_FLIGHT at a time:
        nodes answer many mid-sized requests faster than one huge one, and two in flight
        keep the node busy while we decode. The step still commits once. Each span's answer
        comes with the header of its last block, so a node that lacks it cannot pass off
        a clamped range as complete."""
        query = self._log_query()
        if not query.requests():
            return []
        limit = asyncio.Semaphore(LOGS_IN_FLIGHT)

        async def span(a: int, b: int) -> FoundLogs:
            async with limit:
                return await self.reader.range_logs(a, b, query, tip if b == tip.number else None)

        size = min(LOG_SPAN, self.chunk_size)
        try:
            parts = await _all_or_none(
                [span(a, min(a + size - 1, last)) for a in range(first, last + 1, size)]
            )
        except BlockUnknown:
            raise
        except RpcError as exc:
            if last > first and exc.code != 429 and "rate" not in str(exc).lower():
                # Providers refuse ranges that are too large or too busy: ask for less next time.
                self.chunk_size = max(1, (last - first + 1) // 2)
                log.warning(
                    "log_range_shrunk", network=self.network, chunk_size=self.chunk_size, error=str(exc)
                )
            raise
        transfers = [t for part in parts for t in part.transfers]
        routed = [p for part in parts for p in part.routed]
        return await off_loop(self.watch.logged, transfers, routed, items=len(transfers) + len(routed))

    async def _full_blocks(self, numbers: list[int], *, partial: bool = False) -> list[FullBlock]:
        """The blocks; with `partial`, those before the first the node does not have (at least one)."""
        out: list[FullBlock] = []
        for n, block in zip(numbers, await self.reader.full_blocks(numbers), strict=True):
            if block is None:
                if partial and out:
                    break
                raise ChainChanged(f"block {n} vanished while reading")
            out.append(block)
        return out

    async def _headers(
        self, numbers: list[int], *, partial: bool = False, prefetched: Mapping[int, BlockRef] | None = None
    ) -> dict[int, BlockRef]:
        """The headers; with `partial`, those before the first the node does not have (at least
        one). The first of them may come `prefetched`; the rest are asked now."""
        by_number = dict(prefetched or {})
        rest = numbers[len(by_number) :]
        for n, h in zip(rest, await self.reader.headers(rest) if rest else [], strict=True):
            if h is None:
                if partial and by_number:
                    break
                raise ChainChanged(f"block {n} vanished while reading")
            by_number[n] = h
        return by_number

    def _prefetch_headers(self, numbers: list[int]) -> None:
        """Ask now for the headers the next step reads first: the blocks near the head that a
        step capped at the range ceiling leaves to the next one. They come while this step's
        spans are read, not after them. Read earlier, they prove no more than any header read
        before its logs: the next step links them to its checkpoint, and each batch of logs by
        block hash is closed by the newest block's header as the node has it then."""
        self._drop_prefetch()
        if numbers:
            self._prefetch = (numbers, asyncio.ensure_future(self.reader.headers(numbers)))

    async def _prefetched(self, numbers: list[int]) -> dict[int, BlockRef]:
        """The prefetched headers that begin `numbers`, up to the first the node did not have;
        none if the prefetch was of other blocks or failed (the step then asks for them all,
        and meets the node's failure itself)."""
        if self._prefetch is None:
            return {}
        asked, task = self._prefetch
        if asked[0] != numbers[0]:
            self._drop_prefetch()
            return {}
        self._prefetch = None
        try:
            headers = await task
        except Exception:  # whatever it was, the step's own read meets it again, or not
            return {}
        out: dict[int, BlockRef] = {}
        for n, m, header in zip(numbers, asked, headers, strict=False):
            if n != m or header is None:
                break
            out[n] = header
        return out

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            _, task = self._prefetch
            self._prefetch = None
            task.cancel()
            task.add_done_callback(_observed)  # its failure, if any, is no one's to raise

    async def _handle_reorg(self, cursor: BlockRef) -> None:
        """Walk our stored window down to the newest block the node still has; drop the rest."""
        await self._settle()  # the window, with the last step's blocks in it
        self._drop_prefetch()
        ancestor = await self._common_ancestor(cursor)
        if ancestor.number == cursor.number:
            # The node said another block was there, then that ours is: backends disagreeing
            # (a load balancer). Nothing to undo; fail the step so that it backs off.
            raise ChainChanged(f"the node disagrees with itself about block {cursor.number}")
        reverted = await self.store.write(self.store.revert_to, self.network, ancestor)
        log.warning(
            "reorg",
            network=self.network,
            old_tip=cursor.number,
            old_hash=cursor.hash,
            ancestor=ancestor.number,
            payments_reverted=len(reverted),
        )

    async def _common_ancestor(self, cursor: BlockRef) -> BlockRef:
        """The newest block of our window that the node has too, asked from the top in pages
        (8 headers, then twice as many up to `max_batch`): most reorgs are a block or two.
        (Far below the head the window holds only each ranged step's end blocks: a reorg that
        deep goes back to the end block below it, and payments above are detected again.)

        A `null` header at a height we hold is a node behind, not a different block: ask
        again (ChainChanged). No match in the whole window stops the chain (ReorgTooDeep):
        taking a block we never checked as the ancestor could keep a payment that is gone."""
        window = self.store.recent_blocks(self.network)
        page = min(8, self.max_batch)
        start = 0
        while start < len(window):
            ours = window[start : start + page]
            theirs = await self.reader.headers([b.number for b in ours])
            for mine, node_block in zip(ours, theirs, strict=True):
                if node_block is None:
                    raise ChainChanged(
                        f"the node has no block {mine.number} (behind?) while we look for a reorg's base"
                    )
                if node_block.hash == mine.hash:
                    return mine
            start += len(ours)
            page = min(page * 2, self.max_batch)
        oldest = window[-1].number if window else cursor.number
        await self._check_genesis()
        reason = (
            f"reorg deeper than the {len(window)} blocks remembered (blocks {oldest} to {cursor.number} all "
            "differ "
            "on the node): nothing on this chain is applied or confirmed until the node agrees again or an "
            "operator "
            f"runs `watcher rewind --chain {self.network} --to-block N` with a block below the fork"
        )
        log.error(
            "reorg_deeper_than_window",
            network=self.network,
            tip=cursor.number,
            oldest=oldest,
            window=len(window),
        )
        raise ReorgTooDeep(reason)

    async def _check_genesis(self) -> None:
        """After a reset test chain, or a failover to a node of another network with the same
        chain id, nothing we hold matches: say that, not "a deep reorg"."""
        stored = self.store.genesis_hash(self.network)
        if stored is None:
            return
        [genesis] = await self.reader.headers([0])
        if genesis is not None and genesis.hash != stored:
            log.error("wrong_chain", network=self.network, stored_genesis=stored, node_genesis=genesis.hash)
            raise WrongChainFollowed(
                f"the node serves another chain: its genesis block is {genesis.hash}, this database's is "
                f"{stored} "
                "(a reset test chain, or another network with the same chain id); nothing on this chain is "
                "applied "
                "until the node serves the right chain again (fix rpc_urls and restart if it does not)"
            )

    # ------------------------------------------------------------------ loop

    def wake(self) -> None:
        """A new head is known (or a test mined a block): look now rather than at the next poll."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        await self.load_watch_set(stopping)  # no step before every open option is watched
        try:
            await self._step_until(stopping)
        finally:  # cancelled at shutdown too: no request asked ahead is left to fail unobserved
            self._drop_prefetch()
        try:
            await self._settle()  # the last write committed (or failed) before the follower ends
        except Exception as exc:  # no next step to fail with it: the next start reads it again
            log.warning("follower_step_failed", network=self.network, error=str(exc))

    async def _step_until(self, stopping: asyncio.Event) -> None:
        """Step after step, each failure logged and retried after a growing pause."""
        backoff = 0.5
        failing_since: float | None = None  # the first failure of the current run of them
        while not stopping.is_set():
            self._wake.clear()  # a wake during the step below makes the next sleep end at once
            try:
                moved = await self.run_once(overlap=True)
                backoff = 0.5
            except ChainStopped as exc:
                if self.status.stopped != str(exc):
                    log.error("chain_stopped", network=self.network, reason=str(exc))
                self.status.last_error = self.status.stopped = str(exc)
                self._count_failure(exc)
            except (TimeoutError, RpcError, ChainChanged, OSError) as exc:
                failing_since = failing_since or time.monotonic()
                self.status.last_error = str(exc)
                log.warning("follower_step_failed", network=self.network, error=str(exc))
                self._count_failure(exc)
            except Exception as exc:  # a bug must not stop the chain for good: log it loudly, retry
                failing_since = failing_since or time.monotonic()
                self.status.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("follower_step_crashed", network=self.network)
                self._count_failure(exc)
            else:
                if failing_since is not None:  # the change of state back, once
                    log.info(
                        "follower_recovered",
                        network=self.network,
                        failed_for_seconds=round(time.monotonic() - failing_since, 1),
                    )
                    failing_since = None
                if moved:
                    continue
                await _sleep_or(stopping, self.poll_interval, self._wake)
                continue
            # The first half of the backoff is kept whatever happens (a failing node is not asked
            # again at every block); a new head during the second half means the node is likely
            # back: look then.
            await _sleep_or(stopping, backoff / 2)
            self._wake.clear()
            await _sleep_or(stopping, backoff / 2, self._wake)
            backoff = min(backoff * 2, 30.0)

    def _count_failure(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.step_failed(self.network, _failure_reason(exc))


def _failure_reason(exc: BaseException) -> str:
    """A metrics label for a failed step: few values, the log has the detail."""
    if isinstance(exc, TracerMissing):
        return "tracer_missing"
    if isinstance(exc, ReorgTooDeep):
        return "reorg_too_deep"
    if isinstance(exc, WrongChainFollowed):
        return "wrong_chain"
    if isinstance(exc, (ChainChanged, BlockUnknown)):
        return "chain_changed"
    if isinstance(exc, (RpcError, OSError, asyncio.TimeoutError)):
        return "rpc"
    return "other"


def _observed(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _check_links(by_number: dict[int, BlockRef], first: int, last: int) -> None:
    for n in range(first + 1, last + 1):
        if by_number[n].parent_hash != by_number[n - 1].hash:
            raise ChainChanged(f"blocks {n - 1} and {n} do not link")


async def _all_or_none(coroutines: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Their results in order; if one fails, the others are cancelled (and awaited) and that
    failure is raised, so nothing is left running or unobserved."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _sleep_or(stopping: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    waiters = [asyncio.ensure_future(stopping.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def _check_block_hashes(matched: Sequence[Match], by_number: Mapping[int, BlockRef]) -> None:
    """Every matched transfer names its block's canonical hash (ChainChanged if not)."""
    for t, _ in matched:
        if by_number[t.block_number].hash != t.block_hash:
            raise ChainChanged(
                f"log of tx {t.tx_hash} names block hash {t.block_hash}, not the canonical one"
            )


def _matched_transfers(matched: Sequence[Match], by_number: Mapping[int, BlockRef]) -> list[MatchedTransfer]:
    return [MatchedTransfer(t, option_id, by_number[t.block_number].timestamp) for t, option_id in matched]
