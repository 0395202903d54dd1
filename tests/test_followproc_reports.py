"""What the followers' process tells the daemon, and when: what a step committed at once (a
webhook and the payment page wait for it), the rest gathered for REPORT_EVERY."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from watcher import followproc
from watcher.followproc import REPORT_EVERY, _Reporter


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    monkeypatch.setattr(followproc.childproc, "report", lines.append)
    return lines


async def passes(n: int = 3) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_what_a_step_committed_is_reported_at_the_next_pass_in_one_report(sent) -> None:
    """A commit's notifications (deliveries queued, its invoices changed, its blocks applied)
    arrive in one pass of the loop: one report of all of them, without waiting REPORT_EVERY."""
    reporter = _Reporter({})
    reporter.counts.add("rpc_calls", ("bench", "eth_getLogs"))  # counted while the step read
    reporter.blocks_applied("bench")
    reporter.deliveries_queued()
    for invoice_id in ("inv_b", "inv_a"):
        reporter.invoice_changed(invoice_id)
    await passes()
    assert sent == [
        {"changed": ["inv_a", "inv_b"]},
        {"counts": [("rpc_calls", ("bench", "eth_getLogs"), 1)], "blocks": ["bench"], "queued": 1},
    ]
    assert reporter._timer is None and reporter._soon is None  # nothing left pending
    reporter.counts.add("rpc_calls", ("bench", "eth_getLogs"))  # the next step reads
    await asyncio.sleep(REPORT_EVERY * 2)
    assert sent[2:] == [{"counts": [("rpc_calls", ("bench", "eth_getLogs"), 1)]}]


async def test_blocks_applied_alone_are_gathered(sent) -> None:
    """A step that applied blocks and changed no invoice (every block near the head) is
    reported with the counts, within REPORT_EVERY."""
    reporter = _Reporter({})
    reporter.blocks_applied("bench")
    await passes()
    assert sent == []
    await asyncio.sleep(REPORT_EVERY * 2)
    assert sent == [{"blocks": ["bench"]}]


async def test_counts_alone_wait_to_be_gathered(sent) -> None:
    """A step's RPC counts, thousands during a catch-up, go at most every REPORT_EVERY."""
    reporter = _Reporter({})
    for _ in range(50):
        reporter.counts.add("rpc_calls", ("bench", "eth_getLogs"))
    await passes()
    assert sent == []
    await asyncio.sleep(REPORT_EVERY * 2)
    assert sent == [{"counts": [("rpc_calls", ("bench", "eth_getLogs"), 50)]}]


async def test_a_later_commit_is_reported_again(sent) -> None:
    reporter = _Reporter({})
    reporter.deliveries_queued()
    await passes()
    reporter.invoice_changed("inv_a")
    await passes()
    assert sent == [{"queued": 1}, {"changed": ["inv_a"]}]
