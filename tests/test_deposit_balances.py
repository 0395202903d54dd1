"""GET /v1/deposit-balances: the deposit addresses that still hold money, read from the node
in batches, paginated; and the node misbehaving while they are read."""

from __future__ import annotations

import pytest

from watcher.addresses import AddressDeriver, account_xpub_from_mnemonic
from watcher.balances import BalanceError, DepositAddress, read_balances
from watcher.sandbox import SANDBOX_MNEMONIC


async def test_paid_deposit_addresses_are_listed_with_what_they_hold(harness):
    paid_full = await harness.create(amount="12.5")
    paid_part = await harness.create(amount="3")
    unpaid = await harness.create(amount="7")
    await harness.pay(paid_full["id"])
    await harness.pay(paid_part["id"], amount="1.25")
    await harness.mine(1)
    await harness.wait_invoice(paid_part["id"], lambda i: i["payments"] != [], "payment seen")
    await harness.wait_status(paid_full["id"], "paid")

    status, body, _ = await harness.request("GET", "/v1/deposit-balances")
    assert status == 200, body
    deriver = AddressDeriver(account_xpub_from_mnemonic(SANDBOX_MNEMONIC))
    rows = {row["address"]: row for row in body["data"]}
    assert body["total"] == 2 and body["limit"] == 50 and body["offset"] == 0
    full_option, part_option = paid_full["payment_options"][0], paid_part["payment_options"][0]
    assert rows[full_option["destination_address"]] == {
        "network": "sandbox",
        "address": full_option["destination_address"],
        "derivation_index": rows[full_option["destination_address"]]["derivation_index"],
        "asset": "TUSD",
        "amount_atomic": "12500000",
        "amount": "12.5",
        "native_balance_atomic": "0",
    }
    assert rows[part_option["destination_address"]]["amount_atomic"] == "1250000"
    assert rows[part_option["destination_address"]]["amount"] == "1.25"
    for address, row in rows.items():
        assert deriver.derive(row["derivation_index"]) == address.lower(), "the index names the address"
    assert unpaid["payment_options"][0]["destination_address"] not in rows

    # Pages: the same rows, two at most one at a time.
    first = (await harness.request("GET", "/v1/deposit-balances?limit=1"))[1]
    second = (await harness.request("GET", "/v1/deposit-balances?limit=1&offset=1"))[1]
    assert first["total"] == second["total"] == 2
    assert {first["data"][0]["address"], second["data"][0]["address"]} == set(rows)
    only = (await harness.request("GET", "/v1/deposit-balances?network=sandbox"))[1]
    assert only["total"] == 2
    for bad in ("network=nowhere", "limit=0", "limit=201", "offset=-1", "colour=red", "limit=1&limit=2"):
        status, problem, ctype = await harness.request("GET", f"/v1/deposit-balances?{bad}")
        assert status == 422 and ctype.startswith("application/problem+json"), (bad, problem)
    status, _, _ = await harness.request("GET", "/v1/deposit-balances", auth=False)
    assert status == 401


class RecordingTransport:
    """A node that answers balances from a table, or misbehaves as told."""

    def __init__(self, balances: dict[tuple[str, str | None], int], mode: str = "good") -> None:
        self.balances = balances
        self.mode = mode
        self.batches: list[int] = []

    async def batch(self, calls):
        self.batches.append(len(calls))
        out = []
        for method, params in calls:
            if method == "eth_getBalance":
                out.append(hex(self.balances.get((params[0], None), 0)))
            else:
                token, owner = params[0]["to"], "0x" + params[0]["data"][-40:]
                value = self.balances.get((owner, token), 0)
                out.append("0x" + format(value, "064x"))
        if self.mode == "short":
            return out[:-1]
        if self.mode == "garbled":
            return ["banana" for _ in out]
        if self.mode == "no_contract":
            return [a if m == "eth_getBalance" else "0x" for a, (m, _) in zip(out, calls, strict=True)]
        if self.mode == "huge":
            return ["0x1" + "0" * 64 for _ in out]
        return out


TOKEN = "0x" + "aa" * 20


def _deposits(n: int) -> list[DepositAddress]:
    return [
        DepositAddress(
            "chain",
            "0x" + f"{i + 1:040x}",
            i,
            "TOK" if i % 2 == 0 else "ETH",
            TOKEN if i % 2 == 0 else None,
            6 if i % 2 == 0 else 18,
        )
        for i in range(n)
    ]


async def test_balances_are_read_in_batches_no_larger_than_the_cap():
    deposits = _deposits(7)
    table = {(d.address, d.token_contract): 10 * (i + 1) for i, d in enumerate(deposits)}
    table |= {(d.address, None): 3 for d in deposits if d.token_contract}  # gas on token addresses
    node = RecordingTransport(table)
    got = await read_balances(node, deposits, max_batch=3)
    assert max(node.batches) <= 3 and sum(node.batches) == 7 + 4  # a getBalance each, a balanceOf per token
    for i, d in enumerate(deposits):
        assert got[i] == ((10 * (i + 1), 3) if d.token_contract else (10 * (i + 1), 10 * (i + 1)))
    with pytest.raises(ValueError):
        await read_balances(node, deposits, max_batch=0)


@pytest.mark.parametrize("mode", ["short", "garbled", "no_contract", "huge"])
async def test_a_node_that_answers_nonsense_is_an_error_not_a_zero(mode):
    deposits = _deposits(4)
    node = RecordingTransport({(d.address, d.token_contract): 5 for d in deposits}, mode)
    with pytest.raises(BalanceError):
        await read_balances(node, deposits, max_batch=100)


async def test_on_a_real_node_behind_a_misbehaving_proxy(harnesses, anvil_node, monkeypatch):
    """anvil over HTTP: the paid addresses with what they hold, the coin for gas beside a
    token; then the node refusing balanceOf, or failing outright, is a 503 that says so,
    never a 500 or a row of zeros."""
    from anvil_harness import AnvilHarness
    from faultproxy import Fault, FaultProxy

    import watcher.service
    from watcher.chain.failover import FailoverTransport

    monkeypatch.setattr(watcher.service, "RPC_TIMEOUT", 0.5)
    defaults = FailoverTransport.__init__.__kwdefaults__
    monkeypatch.setitem(defaults, "retry_delays", (0.05, 0.1))
    node = anvil_node()
    proxy = FaultProxy(node.url)
    await proxy.start()
    try:
        h = await harnesses(AnvilHarness, nodes=[node], rpc_urls={"anvil0": [proxy.url]})
        token_paid = await h.create(amount="3")
        coin_paid = await h.create(amount="2", assets=["ETH"])
        token_address = token_paid["payment_options"][0]["destination_address"]
        coin_option = coin_paid["payment_options"][0]
        await h.anvil.run(h.anvil.transfer_token, token_address, 3_000_000)
        await h.anvil.run(h.anvil.transfer_native, token_address, 10**15)  # gas for a later sweep
        await h.anvil.run(
            h.anvil.transfer_native, coin_option["destination_address"], int(coin_option["amount_atomic"])
        )
        await h.mine(1)
        await h.wait_status(token_paid["id"], "paid")
        await h.wait_status(coin_paid["id"], "paid")

        status, body, _ = await h.request("GET", "/v1/deposit-balances")
        assert status == 200, body
        rows = {r["address"]: r for r in body["data"]}
        assert rows[token_address]["amount_atomic"] == "3000000" and rows[token_address][
            "native_balance_atomic"
        ] == str(10**15)
        coin_row = rows[coin_option["destination_address"]]
        assert (
            coin_row["asset"] == "ETH"
            and coin_row["amount_atomic"] == coin_row["native_balance_atomic"] == coin_option["amount_atomic"]
        )
        assert proxy.requests["eth_call"] >= 1 and proxy.requests["eth_getBalance"] >= 2

        for fault in (
            Fault("rpc_error", method="eth_call", message="execution timeout"),
            Fault("http_503", method="eth_getBalance"),
        ):
            proxy.inject(fault)
            status, problem, ctype = await h.request("GET", "/v1/deposit-balances")
            assert status == 503 and ctype.startswith("application/problem+json"), problem
            assert problem["title"] == "Node unavailable"
            proxy.clear()
        status, body, _ = await h.request("GET", "/v1/deposit-balances")
        assert status == 200 and body["total"] == 2, "answers again once the node does"
    finally:
        await proxy.close()
