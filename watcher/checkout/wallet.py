"""The transactions the "pay with browser wallet" button asks an EIP-1193 wallet to send.

They are encoded here, on the server, from the option the API shows: the page's script only
hands them to `window.ethereum`, so it needs no ABI code and cannot get an amount wrong.
"""

from __future__ import annotations

from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector

from ..addresses import to_checksum


def _call(signature: str, types: list[str], args: list) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, args)).hex()


def wallet_steps(option: dict, amount_atomic: int) -> list[dict[str, str]]:
    """`eth_sendTransaction` parameters (without `from`), in order: one transfer, or for the
    router with a token `approve(router, amount)` then `pay(...)`. Quantities are hex."""
    token = option["token_contract"]
    if option["rail"] == "contract":
        call = option["contract_call"]
        router = to_checksum(call["router"])
        pay = _call(
            "pay(bytes32,bytes32,address,address,uint256)",
            ["bytes32", "bytes32", "address", "address", "uint256"],
            [
                bytes.fromhex(call["invoice_id_hash"][2:]),
                bytes.fromhex(call["payment_id_hash"][2:]),
                to_checksum(call["token"]),
                to_checksum(call["recipient"]),
                amount_atomic,
            ],
        )
        if token is None:
            return [{"kind": "pay", "to": router, "value": hex(amount_atomic), "data": pay}]
        approve = _call("approve(address,uint256)", ["address", "uint256"], [router, amount_atomic])
        return [
            {"kind": "approve", "to": to_checksum(token), "value": "0x0", "data": approve},
            {"kind": "pay", "to": router, "value": "0x0", "data": pay},
        ]
    destination = to_checksum(option["destination_address"])
    if token is None:
        return [{"kind": "transfer", "to": destination, "value": hex(amount_atomic), "data": "0x"}]
    transfer = _call("transfer(address,uint256)", ["address", "uint256"], [destination, amount_atomic])
    return [{"kind": "transfer", "to": to_checksum(token), "value": "0x0", "data": transfer}]
