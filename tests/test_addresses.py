"""Deposit address derivation, checksums and EIP-681 URIs."""

from __future__ import annotations

import pytest

from watcher.addresses import (
    AddressDeriver,
    account_xpub_from_mnemonic,
    native_payment_uri,
    normalize_address,
    to_checksum,
    token_payment_uri,
)

MNEMONIC = "test test test test test test test test test test test junk"
USDT = "0xdAC17F958D2ee523a2206206994597C13D831ec7"
DEST = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


@pytest.fixture(scope="module")
def deriver() -> AddressDeriver:
    return AddressDeriver(account_xpub_from_mnemonic(MNEMONIC))


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (0, "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
        (1, "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
        (2, "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"),
    ],
)
def test_derive_known_vectors(deriver: AddressDeriver, index: int, expected: str) -> None:
    address = deriver.derive(index)
    assert address == expected.lower()
    assert to_checksum(address) == expected


def test_other_account_differs() -> None:
    assert account_xpub_from_mnemonic(MNEMONIC, 1) != account_xpub_from_mnemonic(MNEMONIC, 0)


@pytest.mark.parametrize("index", [-1, 2**31, True, 1.0])
def test_derive_rejects_bad_index(deriver: AddressDeriver, index: object) -> None:
    with pytest.raises(ValueError):
        deriver.derive(index)  # type: ignore[arg-type]


def test_derive_accepts_max_index(deriver: AddressDeriver) -> None:
    assert deriver.derive(2**31 - 1).startswith("0x")


@pytest.mark.parametrize(
    "xpub", ["", "xpub123", "not a key", account_xpub_from_mnemonic(MNEMONIC)[:-1] + "x"]
)
def test_bad_xpub_rejected(xpub: str) -> None:
    with pytest.raises(ValueError):
        AddressDeriver(xpub)


def test_private_extended_key_rejected() -> None:
    from bip_utils import Bip39SeedGenerator, Bip44, Bip44Coins

    seed = Bip39SeedGenerator(MNEMONIC).Generate()
    xprv = Bip44.FromSeed(seed, Bip44Coins.ETHEREUM).Purpose().Coin().Account(0).PrivateKey().ToExtended()
    with pytest.raises(ValueError, match="private"):
        AddressDeriver(xprv)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (USDT.lower(), USDT.lower()),
        ("0x" + USDT[2:].upper(), USDT.lower()),
        (USDT, USDT.lower()),
    ],
)
def test_normalize_address(given: str, expected: str) -> None:
    assert normalize_address(given) == expected
    assert to_checksum(given) == USDT


@pytest.mark.parametrize(
    "bad",
    [
        "0x1234",
        "dAC17F958D2ee523a2206206994597C13D831ec7",
        "0xDac17F958D2ee523a2206206994597C13D831ec7",
        "0x" + "g" * 40,
    ],
)
def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        to_checksum(bad)


def test_token_payment_uri() -> None:
    uri = token_payment_uri(USDT.lower(), 1, DEST.lower(), 49990000)
    assert uri == f"ethereum:{USDT}@1/transfer?address={DEST}&uint256=49990000"


def test_native_payment_uri_handles_uint256_amounts() -> None:
    amount = 10**21  # 1000 ETH overflows 64 bits
    assert native_payment_uri(DEST.lower(), 8453, amount) == f"ethereum:{DEST}@8453?value={amount}"


@pytest.mark.parametrize(("chain_id", "amount"), [(0, 1), (1, -1), (1, 2**256), (1, 1.5)])
def test_uri_rejects_bad_numbers(chain_id: int, amount: int) -> None:
    with pytest.raises(ValueError):
        native_payment_uri(DEST, chain_id, amount)
    with pytest.raises(ValueError):
        token_payment_uri(USDT, chain_id, DEST, amount)


def test_the_views_checksum_every_address_as_eip55_does() -> None:
    """The views capitalise all 40 characters at once in integers (store/views.py): the same
    text as eth-utils' EIP-55, one character at a time, on the EIP's vectors and on random and
    edge addresses; a stored address of another shape still gets the rule character by character."""
    import random

    from eth_utils import to_checksum_address

    from watcher.keccak import keccak
    from watcher.store.views import _checksum_bits, checksum

    vectors = [
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB", "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        USDT, DEST,
    ]  # fmt: skip
    rng = random.Random(5)
    addresses = [v.lower() for v in vectors] + ["0x" + "0" * 40, "0x" + "f" * 40, "0x" + "a" * 40]
    addresses += ["0x" + rng.randbytes(20).hex() for _ in range(3_000)]
    for address in addresses:
        assert checksum(address) == to_checksum_address(address)
        assert "0x" + _checksum_bits(address[2:]) == to_checksum_address(address)
    assert [checksum(v.lower()) for v in vectors] == vectors
    digest = keccak(b"abc").hex()  # another shape: the rule a character at a time
    assert checksum("0xabc") == "0x" + "".join(
        c.upper() if digest[i] > "7" else c for i, c in enumerate("abc")
    )
    assert checksum(None) is None and checksum("") is None
