"""A local devnet for the watcher: anvil, a test token and the PaymentRouter, a config, and the
daemon running against them. Run through `scripts/devnet` (which installs what it needs).

    scripts/devnet [--dir .devnet] [--port 8545] [--listen 127.0.0.1:8080] [--block-time 1]
    scripts/devnet pay INVOICE_ID [--amount 12.5] [--option opt_...] [--dir .devnet]

The first form starts everything and runs until Ctrl-C (or SIGTERM), which stops the daemon
and anvil. The second pays an invoice of that running devnet from the funded payer account,
as a customer's wallet would (a token transfer, the coin, or approve + pay on the router).
Everything here is for a throwaway local chain: the keys are anvil's public test keys.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from decimal import Decimal
from pathlib import Path

from eth_abi import encode
from eth_utils import function_signature_to_4byte_selector, keccak, to_checksum_address

from watcher.addresses import account_xpub_from_mnemonic
from watcher.contracts import load_artifact

ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "contracts" / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
WATCHER = Path(sys.executable).parent / "watcher"

# anvil's public test mnemonic. Its account 0 (m/44'/60'/0'/0/i) holds anvil's funded dev
# accounts, so the deposit xpub is account 1 (m/44'/60'/1'): addresses nobody funds but payers.
MNEMONIC = "test test test test test test test test test test test junk"
DEPLOYER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"  # anvil account 0
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"  # anvil account 1: has the test tokens
MERCHANT = "0x" + keccak(text="watcher devnet merchant")[-20:].hex()  # receives router payments
CHAIN_ID = 31337
TOKEN_DECIMALS = 6
PAYER_TOKENS = 1_000_000 * 10**TOKEN_DECIMALS


def rpc(url: str, method: str, *params: object) -> object:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error'].get('message', answer['error'])}")
    return answer["result"]


def calldata(signature: str, types: list[str], args: list[object]) -> str:
    return "0x" + (function_signature_to_4byte_selector(signature) + encode(types, args)).hex()


def send(
    url: str, sender: str, to: str | None, data: str = "0x", value: int = 0, gas: int = 3_000_000
) -> dict:
    """A transaction from an anvil account (they are unlocked), waited for; its receipt."""
    tx: dict[str, object] = {"from": sender, "data": data, "value": hex(value), "gas": hex(gas)}
    if to is not None:
        tx["to"] = to
    tx_hash = rpc(url, "eth_sendTransaction", tx)
    deadline = time.monotonic() + 60
    while (receipt := rpc(url, "eth_getTransactionReceipt", tx_hash)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{tx_hash} was not mined within a minute")
        time.sleep(0.1)
    assert isinstance(receipt, dict)
    if int(receipt["status"], 16) != 1:
        raise RuntimeError(f"{tx_hash} reverted")
    return receipt


def deploy(url: str, name: str, types: list[str], args: list[object]) -> str:
    receipt = send(url, DEPLOYER, None, load_artifact(name)["bytecode"] + encode(types, args).hex())
    return to_checksum_address(receipt["contractAddress"])


def start_anvil(port: int, block_time: float) -> subprocess.Popen:
    if not ANVIL.exists():
        raise SystemExit(f"anvil is missing: run `npm ci --prefix contracts` (expected at {ANVIL})")
    command = [
        str(ANVIL),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--chain-id",
        str(CHAIN_ID),
        "--block-time",
        f"{block_time:g}",
        "--silent",
    ]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc(url, "eth_chainId")
            return proc
        except OSError as exc:
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise SystemExit(
                    f"anvil did not start on port {port}: {err.strip() or 'port taken?'}"
                ) from exc
            time.sleep(0.1)


def write_config(
    directory: Path, rpc_url: str, listen: str, token: str, router: str, webhook_urls: list[str]
) -> Path:
    xpub = account_xpub_from_mnemonic(MNEMONIC, 1)
    hooks = "".join(
        f'\n[[webhooks]]\nurl = "{u}"\nsecret_env = "WATCHER_WEBHOOK_SECRET"\n' for u in webhook_urls
    )
    config = directory / "watcher.toml"
    config.write_text(f"""# Written by scripts/devnet: a local anvil chain (chain id {CHAIN_ID}),
# throwaway keys.
database = "{directory / "watcher.db"}"
log_format = "console"

[http]
listen = "{listen}"
api_key_env = "WATCHER_API_KEY"
{hooks}
[[chains]]
name = "devnet"
chain_id = {CHAIN_ID}
rpc_urls = ["{rpc_url}"]
poll_interval_seconds = 0.5
confirmations = 2
start_block = 0
# `echo "{MNEMONIC}" | watcher xpub --account 1`
deposit_xpub = "{xpub}"
router_address = "{router}"
merchant_address = "{to_checksum_address(MERCHANT)}"

[[chains.assets]]
symbol = "TUSD"
kind = "erc20"
contract = "{token}"
decimals = {TOKEN_DECIMALS}
usd_rate = "1"

[[chains.assets]]
symbol = "ETH"
kind = "native"
""")
    return config


def up(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(
        "watcher.db*"
    ):  # a new chain: the old database's checkpoint is another chain's
        stale.unlink()
    anvil = start_anvil(args.port, args.block_time)
    url = f"http://127.0.0.1:{args.port}"
    daemon: subprocess.Popen | None = None
    try:
        token = deploy(url, "TestToken", ["string", "string", "uint8"], ["Test USD", "TUSD", TOKEN_DECIMALS])
        router = deploy(url, "PaymentRouter", [], [])
        send(
            url,
            DEPLOYER,
            token,
            calldata("mint(address,uint256)", ["address", "uint256"], [PAYER, PAYER_TOKENS]),
        )
        config = write_config(directory, url, args.listen, token, router, args.webhook_url)
        env_values = {
            "WATCHER_API_KEY": os.environ.get("WATCHER_API_KEY") or "sk_devnet_" + secrets.token_urlsafe(24),
            "WATCHER_WEBHOOK_SECRET": os.environ.get("WATCHER_WEBHOOK_SECRET")
            or "whsec_" + __import__("base64").b64encode(secrets.token_bytes(32)).decode(),
        }
        env_file = directory / "watcher.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in env_values.items()))
        env_file.chmod(0o600)
        (directory / "devnet.json").write_text(
            json.dumps(
                {
                    "rpc_url": url,
                    "chain_id": CHAIN_ID,
                    "token": token,
                    "router": router,
                    "payer": PAYER,
                    "merchant": to_checksum_address(MERCHANT),
                    "listen": args.listen,
                },
                indent=2,
            )
        )
        print(
            f"""watcher devnet
  anvil:        {url} (chain id {CHAIN_ID}, a block every {args.block_time:g} s)
  token:        TUSD {token} ({TOKEN_DECIMALS} decimals; the payer {PAYER} holds 1,000,000)
  router:       {router} (PaymentRouter; merchant {to_checksum_address(MERCHANT)})
  config:       {config}
  secrets:      {env_file}
  API:          http://{args.listen}/v1   key {env_values["WATCHER_API_KEY"]}
Try, in another shell:
  ( set -a; . {env_file}; watcher addresses --config {config} --count 3 )
  curl -s -H "Authorization: Bearer {env_values["WATCHER_API_KEY"]}" \\
    -H "Content-Type: application/json" -d '{{"amount": "12.50"}}' http://{args.listen}/v1/invoices
  scripts/devnet pay inv_...   # from the payer, as a wallet would
""",
            flush=True,
        )
        daemon = subprocess.Popen(
            [str(WATCHER), "run", "--config", str(config)], env={**os.environ, **env_values}
        )
        stop = {"now": False}

        def on_signal(signum: int, frame: object) -> None:
            stop["now"] = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop["now"] and daemon.poll() is None and anvil.poll() is None:
            time.sleep(0.2)
        return daemon.returncode or 0 if daemon.poll() is not None else 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        anvil.terminate()
        try:
            anvil.wait(10)
        except subprocess.TimeoutExpired:
            anvil.kill()


def pay(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    try:
        devnet = json.loads((directory / "devnet.json").read_text())
        env = dict(
            line.split("=", 1) for line in (directory / "watcher.env").read_text().splitlines() if "=" in line
        )
    except FileNotFoundError:
        raise SystemExit(f"no devnet in {directory}: start one with `scripts/devnet` first") from None
    request = urllib.request.Request(
        f"http://{devnet['listen']}/v1/invoices/{args.invoice}",
        headers={"Authorization": f"Bearer {env['WATCHER_API_KEY']}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            invoice = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"the watcher answered {exc.code} for {args.invoice}") from None
    options = invoice["payment_options"]
    option = next((o for o in options if args.option in (None, o["id"])), None)
    if option is None:
        raise SystemExit("no such payment option" if args.option else "the invoice has no payment option")
    amount = (
        int(Decimal(args.amount) * 10 ** option["decimals"])
        if args.amount is not None
        else int(option["amount_atomic"])
    )
    url = devnet["rpc_url"]
    if option["rail"] == "contract":
        call = option["contract_call"]
        native = int(call["token"], 16) == 0
        if not native:
            send(
                url,
                PAYER,
                call["token"],
                calldata("approve(address,uint256)", ["address", "uint256"], [call["router"], amount]),
            )
        receipt = send(
            url,
            PAYER,
            call["router"],
            calldata(
                "pay(bytes32,bytes32,address,address,uint256)",
                ["bytes32", "bytes32", "address", "address", "uint256"],
                [
                    bytes.fromhex(call["invoice_id_hash"][2:]),
                    bytes.fromhex(call["payment_id_hash"][2:]),
                    call["token"],
                    call["recipient"],
                    amount,
                ],
            ),
            value=amount if native else 0,
        )
    elif option["token_contract"]:
        receipt = send(
            url,
            PAYER,
            option["token_contract"],
            calldata(
                "transfer(address,uint256)", ["address", "uint256"], [option["destination_address"], amount]
            ),
            gas=100_000,
        )
    else:
        receipt = send(url, PAYER, option["destination_address"], value=amount, gas=21_000)
    print(
        f"paid {amount} atomic {option['asset']} to {option['destination_address']} "
        f"({option['rail']} rail) in {receipt['transactionHash']}, block {int(receipt['blockNumber'], 16)}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pay"]:
        parser = argparse.ArgumentParser(
            prog="scripts/devnet pay", description="pay a devnet invoice from the funded payer"
        )
        parser.add_argument("invoice", help="the invoice id (inv_...)")
        parser.add_argument("--amount", help="in the asset's units (default: the option's whole amount)")
        parser.add_argument("--option", help="the payment option id (default: the first)")
        parser.add_argument(
            "--dir", default=str(ROOT / ".devnet"), help="the devnet's directory (default .devnet)"
        )
        return pay(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="scripts/devnet", description="anvil + token + router + config + watcher"
    )
    parser.add_argument(
        "--dir",
        default=str(ROOT / ".devnet"),
        help="where the config, secrets and database go (default .devnet)",
    )
    parser.add_argument("--port", type=int, default=8545, help="anvil's port (default 8545)")
    parser.add_argument(
        "--listen", default="127.0.0.1:8080", help="the watcher's API (default 127.0.0.1:8080)"
    )
    parser.add_argument("--block-time", type=float, default=1.0, help="seconds between blocks (default 1)")
    parser.add_argument("--webhook-url", action="append", default=[], help="send webhooks here (repeatable)")
    return up(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
