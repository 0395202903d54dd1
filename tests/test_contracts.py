"""Tests for the Solidity contracts, their committed artifacts and the loader.

* The committed artifacts in contracts/build match their sources (cheaply via
  ``sourceHash``; fully via ``node contracts/build.js --check`` when the pinned
  solcjs is installed).
* TestToken and PaymentRouter behave as specified on a real (in-memory) chain:
  every state change below is a mined transaction on eth-tester / py-evm.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from eth_tester import EthereumTester, PyEVMBackend
from eth_utils import keccak
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract
from web3.logs import DISCARD

from watcher.contracts import (
    PAYMENT_RECEIVED_TOPIC,
    TRANSFER_TOPIC,
    load_artifact,
)

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS_DIR = ROOT / "contracts"
BUILD_DIR = CONTRACTS_DIR / "build"
SOURCES = {
    "TestToken": CONTRACTS_DIR / "TestToken.sol",
    "PaymentRouter": CONTRACTS_DIR / "PaymentRouter.sol",
    "TestWallet": CONTRACTS_DIR / "TestWallet.sol",
    "TestPriceFeed": CONTRACTS_DIR / "TestPriceFeed.sol",
}
ARTIFACT_KEYS = {"abi", "bytecode", "deployedBytecode", "compiler", "sourceHash"}

ZERO_ADDRESS = "0x" + "00" * 20
INVOICE_ID = keccak(text="invoice-0001")
PAYMENT_ID = keccak(text="payment-0001")
GAS = 300_000  # explicit gas: a reverting transaction is mined with status 0


# --------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_artifact_source_hash_matches_source(name: str) -> None:
    artifact = json.loads((BUILD_DIR / f"{name}.json").read_text(encoding="utf-8"))
    expected = hashlib.sha256(SOURCES[name].read_bytes()).hexdigest()
    assert artifact["sourceHash"] == expected, (
        f"contracts/build/{name}.json is stale: rebuild with "
        "`npm ci --prefix contracts && node contracts/build.js`"
    )


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_artifact_shape_and_format(name: str) -> None:
    path = BUILD_DIR / f"{name}.json"
    text = path.read_text(encoding="utf-8")
    artifact = json.loads(text)
    assert set(artifact) == ARTIFACT_KEYS
    # Deterministic serialisation: sorted keys, 2-space indent, trailing newline.
    assert text == json.dumps(artifact, indent=2, sort_keys=True) + "\n"
    for key in ("bytecode", "deployedBytecode"):
        assert artifact[key].startswith("0x")
        assert len(artifact[key]) > 2
        bytes.fromhex(artifact[key][2:])
    lock = json.loads((CONTRACTS_DIR / "package-lock.json").read_text(encoding="utf-8"))
    solc_version = lock["packages"]["node_modules/solc"]["version"]
    assert artifact["compiler"].startswith(f"solc-{solc_version}+commit.")
    assert load_artifact(name) == artifact


def test_solc_is_pinned_exactly() -> None:
    package = json.loads((CONTRACTS_DIR / "package.json").read_text(encoding="utf-8"))
    version = package["dependencies"]["solc"]
    assert version[0].isdigit() and version.count(".") == 2, version


def test_load_artifact_unknown_name() -> None:
    with pytest.raises(FileNotFoundError):
        load_artifact("NoSuchContract")
    with pytest.raises(ValueError):
        load_artifact("../TestToken")


def test_build_check_passes() -> None:
    node = shutil.which("node")
    missing = "node is not installed" if node is None else None
    if missing is None and not (CONTRACTS_DIR / "node_modules" / "solc").is_dir():
        missing = "solc is not installed: run `npm ci --prefix contracts`"
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(missing)  # CI installs both: a missing one must not pass as a skip
        pytest.skip(missing)
    assert node is not None
    result = subprocess.run(
        [node, str(CONTRACTS_DIR / "build.js"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_topic_constants() -> None:
    assert TRANSFER_TOPIC == ("0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")
    assert "0x" + keccak(text="Transfer(address,address,uint256)").hex() == TRANSFER_TOPIC
    assert (
        "0x" + keccak(text="PaymentReceived(bytes32,bytes32,address,address,address,uint256)").hex()
    ) == PAYMENT_RECEIVED_TOPIC
    assert PAYMENT_RECEIVED_TOPIC.lower() == PAYMENT_RECEIVED_TOPIC
    assert len(PAYMENT_RECEIVED_TOPIC) == 66


def _event_topic(abi: list[dict[str, Any]], name: str) -> str:
    (event,) = [e for e in abi if e["type"] == "event" and e["name"] == name]
    signature = f"{name}({','.join(i['type'] for i in event['inputs'])})"
    return "0x" + keccak(text=signature).hex()


def test_topic_constants_match_artifact_abis() -> None:
    assert _event_topic(load_artifact("TestToken")["abi"], "Transfer") == TRANSFER_TOPIC
    assert _event_topic(load_artifact("PaymentRouter")["abi"], "PaymentReceived") == PAYMENT_RECEIVED_TOPIC


# --------------------------------------------------------------------------
# On-chain behaviour (eth-tester / py-evm)
# --------------------------------------------------------------------------


@pytest.fixture
def w3() -> Iterator[Web3]:
    yield Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend())))


def _deploy(w3: Web3, name: str, *args: Any) -> Contract:
    artifact = load_artifact(name)
    factory = w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    tx_hash = factory.constructor(*args).transact({"from": w3.eth.accounts[0]})
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash)
    assert receipt["status"] == 1
    address = receipt["contractAddress"]
    code = w3.eth.get_code(address).hex().removeprefix("0x")
    expected = artifact["deployedBytecode"].removeprefix("0x")
    # Immutables (TestToken.decimals) are filled in at deploy time; the length
    # and, for contracts without immutables, every byte must match.
    assert len(code) == len(expected)
    if name == "PaymentRouter":
        assert code == expected
    return w3.eth.contract(address=address, abi=artifact["abi"])


def _send(w3: Web3, fn: Any, tx: dict[str, Any]) -> Any:
    """Mine a transaction with explicit gas and return its receipt."""
    tx_hash = fn.transact({"gas": GAS, **tx})
    return w3.eth.wait_for_transaction_receipt(tx_hash)


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


def _revert_data(exc: BaseException) -> bytes:
    """Raw revert data from an eth-tester ``TransactionFailed`` message.

    eth-tester reports custom-error reverts as the ``repr`` of the revert bytes
    (``"execution reverted: b'...'"``).
    """
    message = str(exc)
    for quote in ("b'", 'b"'):
        start = message.find(quote)
        if start != -1:
            data = ast.literal_eval(message[start:])
            assert isinstance(data, bytes)
            return data
    raise AssertionError(f"no revert data in {message!r}")


def _assert_reverts(w3: Web3, fn: Any, tx: dict[str, Any], error_signature: str) -> None:
    """Assert that ``fn`` reverts with ``error_signature`` when called and when mined."""
    with pytest.raises(Exception) as info:
        fn.call(tx)
    assert _revert_data(info.value)[:4] == _selector(error_signature), str(info.value)
    receipt = _send(w3, fn, tx)
    assert receipt["status"] == 0
    assert receipt["logs"] == []


@pytest.fixture
def token(w3: Web3) -> Contract:
    return _deploy(w3, "TestToken", "Test USD", "TUSD", 6)


@pytest.fixture
def router(w3: Web3) -> Contract:
    return _deploy(w3, "PaymentRouter")


def test_token_metadata_mint_and_transfer(w3: Web3, token: Contract) -> None:
    owner, alice, bob = w3.eth.accounts[:3]
    assert token.functions.name().call() == "Test USD"
    assert token.functions.symbol().call() == "TUSD"
    assert token.functions.decimals().call() == 6
    assert token.functions.totalSupply().call() == 0

    receipt = _send(w3, token.functions.mint(alice, 1_000_000_000), {"from": bob})
    assert receipt["status"] == 1
    (minted,) = token.events.Transfer().process_receipt(receipt)
    assert minted["args"] == {"from": ZERO_ADDRESS, "to": alice, "value": 1_000_000_000}
    assert token.functions.totalSupply().call() == 1_000_000_000
    assert token.functions.balanceOf(alice).call() == 1_000_000_000

    receipt = _send(w3, token.functions.transfer(bob, 250_000_000), {"from": alice})
    assert receipt["status"] == 1
    (log,) = receipt["logs"]
    assert log["address"] == token.address
    assert "0x" + log["topics"][0].hex().removeprefix("0x") == TRANSFER_TOPIC
    (transfer,) = token.events.Transfer().process_receipt(receipt)
    assert transfer["args"] == {"from": alice, "to": bob, "value": 250_000_000}
    assert token.functions.balanceOf(alice).call() == 750_000_000
    assert token.functions.balanceOf(bob).call() == 250_000_000
    assert token.functions.totalSupply().call() == 1_000_000_000
    assert token.functions.balanceOf(owner).call() == 0

    _assert_reverts(
        w3,
        token.functions.transfer(alice, 250_000_001),
        {"from": bob},
        "InsufficientBalance(address,uint256,uint256)",
    )


def test_token_approve_and_transfer_from(w3: Web3, token: Contract) -> None:
    alice, bob, carol = w3.eth.accounts[1:4]
    _send(w3, token.functions.mint(alice, 500), {"from": alice})

    receipt = _send(w3, token.functions.approve(bob, 300), {"from": alice})
    assert receipt["status"] == 1
    (approval,) = token.events.Approval().process_receipt(receipt)
    assert approval["args"] == {"owner": alice, "spender": bob, "value": 300}
    assert token.functions.allowance(alice, bob).call() == 300

    receipt = _send(w3, token.functions.transferFrom(alice, carol, 200), {"from": bob})
    assert receipt["status"] == 1
    (transfer,) = token.events.Transfer().process_receipt(receipt)
    assert transfer["args"] == {"from": alice, "to": carol, "value": 200}
    assert token.functions.allowance(alice, bob).call() == 100
    assert token.functions.balanceOf(alice).call() == 300
    assert token.functions.balanceOf(carol).call() == 200

    _assert_reverts(
        w3,
        token.functions.transferFrom(alice, carol, 101),
        {"from": bob},
        "InsufficientAllowance(address,uint256,uint256)",
    )
    assert token.functions.balanceOf(carol).call() == 200


def _payment_event(router: Contract, receipt: Any) -> dict[str, Any]:
    # The receipt also holds the token's Transfer log: skip it quietly.
    (event,) = router.events.PaymentReceived().process_receipt(receipt, errors=DISCARD)
    assert event["address"] == router.address
    return dict(event["args"])


def test_router_token_payment(w3: Web3, token: Contract, router: Contract) -> None:
    payer, merchant = w3.eth.accounts[1:3]
    _send(w3, token.functions.mint(payer, 10_000_000), {"from": payer})
    _send(w3, token.functions.approve(router.address, 10_000_000), {"from": payer})
    merchant_eth = w3.eth.get_balance(merchant)

    pay = router.functions.pay(INVOICE_ID, PAYMENT_ID, token.address, merchant, 2_500_000)
    receipt = _send(w3, pay, {"from": payer})
    assert receipt["status"] == 1

    assert token.functions.balanceOf(payer).call() == 7_500_000
    assert token.functions.balanceOf(merchant).call() == 2_500_000
    assert token.functions.balanceOf(router.address).call() == 0
    assert token.functions.allowance(payer, router.address).call() == 7_500_000
    assert w3.eth.get_balance(router.address) == 0
    assert w3.eth.get_balance(merchant) == merchant_eth

    assert _payment_event(router, receipt) == {
        "invoiceId": INVOICE_ID,
        "paymentId": PAYMENT_ID,
        "payer": payer,
        "token": token.address,
        "recipient": merchant,
        "amount": 2_500_000,
    }
    # Raw log layout the watcher relies on: token Transfer, then PaymentReceived
    # with the three ids indexed.
    transfer_log, payment_log = receipt["logs"]
    assert transfer_log["address"] == token.address
    assert "0x" + bytes(transfer_log["topics"][0]).hex() == TRANSFER_TOPIC
    assert "0x" + bytes(payment_log["topics"][0]).hex() == PAYMENT_RECEIVED_TOPIC
    assert bytes(payment_log["topics"][1]) == INVOICE_ID
    assert bytes(payment_log["topics"][2]) == PAYMENT_ID
    assert bytes(payment_log["topics"][3])[-20:] == bytes.fromhex(payer[2:])


def test_router_native_payment(w3: Web3, router: Contract) -> None:
    payer, merchant = w3.eth.accounts[1:3]
    amount = Web3.to_wei(1.25, "ether")
    payer_before = w3.eth.get_balance(payer)
    merchant_before = w3.eth.get_balance(merchant)

    pay = router.functions.pay(INVOICE_ID, PAYMENT_ID, ZERO_ADDRESS, merchant, amount)
    receipt = _send(w3, pay, {"from": payer, "value": amount})
    assert receipt["status"] == 1

    gas_cost = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert w3.eth.get_balance(merchant) == merchant_before + amount
    assert w3.eth.get_balance(payer) == payer_before - amount - gas_cost
    assert w3.eth.get_balance(router.address) == 0
    assert _payment_event(router, receipt) == {
        "invoiceId": INVOICE_ID,
        "paymentId": PAYMENT_ID,
        "payer": payer,
        "token": ZERO_ADDRESS,
        "recipient": merchant,
        "amount": amount,
    }


def test_router_rejects_mismatches(w3: Web3, token: Contract, router: Contract) -> None:
    payer, merchant = w3.eth.accounts[1:3]
    _send(w3, token.functions.mint(payer, 1_000), {"from": payer})
    _send(w3, token.functions.approve(router.address, 100), {"from": payer})

    def pay(token_address: str, recipient: str, amount: int) -> Any:
        return router.functions.pay(INVOICE_ID, PAYMENT_ID, token_address, recipient, amount)

    # Native coin with the wrong msg.value (too little, too much, none).
    for value in (99, 101, 0):
        _assert_reverts(
            w3,
            pay(ZERO_ADDRESS, merchant, 100),
            {"from": payer, "value": value},
            "WrongValue(uint256,uint256)",
        )
    # Token payment that also sends native coin.
    _assert_reverts(
        w3,
        pay(token.address, merchant, 100),
        {"from": payer, "value": 1},
        "UnexpectedValue(uint256)",
    )
    # Zero amount, token and native.
    _assert_reverts(w3, pay(token.address, merchant, 0), {"from": payer}, "ZeroAmount()")
    _assert_reverts(w3, pay(ZERO_ADDRESS, merchant, 0), {"from": payer}, "ZeroAmount()")
    # Zero recipient, token and native.
    _assert_reverts(w3, pay(token.address, ZERO_ADDRESS, 100), {"from": payer}, "ZeroRecipient()")
    _assert_reverts(
        w3,
        pay(ZERO_ADDRESS, ZERO_ADDRESS, 100),
        {"from": payer, "value": 100},
        "ZeroRecipient()",
    )
    # More than the allowance: the token's own error comes through.
    _assert_reverts(
        w3,
        pay(token.address, merchant, 101),
        {"from": payer},
        "InsufficientAllowance(address,uint256,uint256)",
    )
    # A "token" with no code would look like a USDT-style success.
    _assert_reverts(
        w3,
        pay(w3.eth.accounts[5], merchant, 100),
        {"from": payer},
        "NotAContract(address)",
    )

    # A native payment to a recipient that refuses the coin (TestToken has no
    # receive function) reverts instead of leaving the coin in the router.
    _assert_reverts(
        w3,
        pay(ZERO_ADDRESS, token.address, 100),
        {"from": payer, "value": 100},
        "NativeTransferFailed(address)",
    )

    # Nothing moved and the router holds nothing.
    assert token.functions.balanceOf(payer).call() == 1_000
    assert token.functions.balanceOf(merchant).call() == 0
    assert token.functions.allowance(payer, router.address).call() == 100
    assert w3.eth.get_balance(router.address) == 0


def test_router_has_no_receive_or_fallback(w3: Web3, router: Contract) -> None:
    sender = w3.eth.accounts[1]
    tx_hash = w3.eth.send_transaction({"from": sender, "to": router.address, "value": 1, "gas": GAS})
    assert w3.eth.wait_for_transaction_receipt(tx_hash)["status"] == 0
    assert w3.eth.get_balance(router.address) == 0
    assert not [e for e in router.abi if e["type"] in ("receive", "fallback")]


def test_price_feed_answers_as_aggregator_v3_with_every_field_settable(w3: Web3) -> None:
    """TestPriceFeed speaks AggregatorV3Interface (the ABI the watcher reads feeds with), and
    its setters give every answer a consumer must refuse: stale, incomplete, not positive."""
    from watcher.chain.pricefeed import AGGREGATOR_V3_ABI

    feed = _deploy(w3, "TestPriceFeed", 8, "ETH / USD", 2000_00000000)
    as_consumer = w3.eth.contract(address=feed.address, abi=AGGREGATOR_V3_ABI)
    assert as_consumer.functions.decimals().call() == 8
    assert feed.functions.description().call() == "ETH / USD" and feed.functions.version().call() == 4
    round_id, answer, started, updated, answered = as_consumer.functions.latestRoundData().call()
    deployed_at = w3.eth.get_block("latest")["timestamp"]
    assert (round_id, answer, answered) == (1, 2000_00000000, 1) and started == updated == deployed_at
    assert feed.functions.getRoundData(1).call()[1] == 2000_00000000

    _send(w3, feed.functions.setAnswer(2100_00000000), {"from": w3.eth.accounts[0]})
    assert as_consumer.functions.latestRoundData().call()[:2] == [2, 2100_00000000]
    _send(w3, feed.functions.setRound(9, 0, 5, 6, 8), {"from": w3.eth.accounts[0]})
    assert as_consumer.functions.latestRoundData().call() == [9, 0, 5, 6, 8]
    _send(w3, feed.functions.setUpdatedAt(123), {"from": w3.eth.accounts[0]})
    assert as_consumer.functions.latestRoundData().call() == [9, 0, 123, 123, 8]
    _send(w3, feed.functions.setRound(10, -1, 7, 7, 10), {"from": w3.eth.accounts[0]})
    assert as_consumer.functions.latestRoundData().call()[1] == -1
    with pytest.raises(Exception, match="execution reverted"):
        feed.functions.getRoundData(9).call()
