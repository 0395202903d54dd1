"""The operator's commands: `watcher xpub`, `addresses`, `router-deploy-tx`, and check-config
asking the node whether router_address holds our PaymentRouter."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from watcher.addresses import AddressDeriver, account_xpub_from_mnemonic
from watcher.contracts import load_artifact
from watcher.tools import NETWORK_WARNING, run_xpub

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "watcher.example.toml"
WATCHER = [sys.executable, "-m", "watcher.cli"]
MNEMONIC = "test test test test test test test test test test test junk"
# m/44'/60'/0' of MNEMONIC, as every wallet derives it (its /0/0 is the well-known 0xf39F...2266).
KNOWN_XPUB = (
    "xpub6Ce9NcJvTk36xtLSrJLZqE7wtgA5deCeYs7rSQtreh4cj6ByPtrg9sD7V2FNFLPnf8heNP3FGkeV9qwfz"
    "vZNSd54JoNXVsXFYSYwHsnJxqP"
)


def watcher(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")}
    return subprocess.run(
        [*WATCHER, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def test_xpub_reads_the_mnemonic_from_stdin_and_prints_the_account_xpub_only():
    result = watcher("xpub", stdin=MNEMONIC + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == KNOWN_XPUB + "\n"
    assert "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266" in result.stderr, (
        "the first address, to check in a wallet"
    )
    for word_run in ("test test", "junk"):
        assert word_run not in result.stdout + result.stderr, "the mnemonic is never echoed"
    # Extra blanks and capitals are the same mnemonic.
    assert (
        watcher("xpub", stdin="  Test test TEST test test test test test test test test   junk ").stdout
        == KNOWN_XPUB + "\n"
    )


def test_xpub_takes_the_mnemonic_from_nowhere_but_stdin():
    from_argv = watcher("xpub", *MNEMONIC.split())
    assert from_argv.returncode == 2 and "unrecognized arguments" in from_argv.stderr
    from_env = watcher("xpub", env={"WATCHER_MNEMONIC": MNEMONIC, "MNEMONIC": MNEMONIC})
    assert from_env.returncode == 2 and "no mnemonic" in from_env.stderr and from_env.stdout == ""


def test_xpub_refuses_a_bad_mnemonic_without_echoing_it():
    typo = MNEMONIC.replace("junk", "junc")
    result = watcher("xpub", stdin=typo)
    assert result.returncode == 2 and result.stdout == ""
    assert "not a valid BIP-39 mnemonic" in result.stderr and "junc" not in result.stderr
    swapped = watcher("xpub", stdin="junk " + " ".join(["test"] * 11))  # right words, bad checksum
    assert swapped.returncode == 2


def test_xpub_with_an_account_and_a_passphrase():
    other = watcher("xpub", "--account", "1", stdin=MNEMONIC)
    assert other.stdout.strip() == account_xpub_from_mnemonic(MNEMONIC, 1) != KNOWN_XPUB
    with_pass = watcher("xpub", "--passphrase", stdin=MNEMONIC + "\nopen sesame\n")
    assert with_pass.returncode == 0, with_pass.stderr
    assert with_pass.stdout.strip() == account_xpub_from_mnemonic(MNEMONIC, passphrase="open sesame")
    assert with_pass.stdout.strip() != KNOWN_XPUB and "sesame" not in with_pass.stderr
    assert watcher("xpub", "--account", "-1", stdin=MNEMONIC).returncode == 2


def test_xpub_warns_on_a_machine_with_a_network_and_not_on_one_without():
    for networked in (True, False):
        out, err = io.StringIO(), io.StringIO()
        assert (
            run_xpub(
                0,
                False,
                stdin=io.StringIO(MNEMONIC),
                out=out,
                err=err,
                network=lambda networked=networked: networked,
            )
            == 0
        )
        assert out.getvalue() == KNOWN_XPUB + "\n"
        assert (NETWORK_WARNING in err.getvalue()) is networked


def test_addresses_prints_the_first_deposit_addresses_with_their_paths(tmp_path):
    result = watcher("addresses", "--config", str(EXAMPLE), "--count", "3", "--chain", "base")
    assert result.returncode == 0, result.stderr  # no secret is needed to list addresses
    deriver = AddressDeriver(KNOWN_XPUB)
    lines = [line.split() for line in result.stdout.splitlines()]
    assert [line[:2] for line in lines] == [["base", f"m/44'/60'/0'/0/{i}"] for i in range(3)]
    assert [line[2].lower() for line in lines] == [deriver.derive(i) for i in range(3)]
    assert lines[0][2] == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    both = watcher("addresses", "--config", str(EXAMPLE), "--count", "2")
    assert [line.split()[0] for line in both.stdout.splitlines()] == ["ethereum", "ethereum", "base", "base"]
    unknown = watcher("addresses", "--config", str(EXAMPLE), "--chain", "nowhere")
    assert unknown.returncode == 2 and "no such chain" in unknown.stderr and "Traceback" not in unknown.stderr
    assert watcher("addresses", "--config", str(EXAMPLE), "--count", "0").returncode == 2
    assert watcher("addresses", "--config", str(tmp_path / "missing.toml")).returncode == 2


def test_router_deploy_tx_prints_the_creation_data_only():
    result = watcher("router-deploy-tx")
    assert result.returncode == 0
    assert result.stdout == load_artifact("PaymentRouter")["bytecode"] + "\n"
    assert "--create" in result.stderr


def _config_with_router(tmp_path: Path, rpc_url: str, chain_id: int, router: str) -> Path:
    text = EXAMPLE.read_text()
    first, rest = text.split("[[chains]]", 2)[:2]
    chain = rest.replace(
        'rpc_urls = ["https://rpc-a.example", "https://rpc-b.example"]', f'rpc_urls = ["{rpc_url}"]'
    )
    chain = chain.replace("chain_id = 1 ", f"chain_id = {chain_id} ").replace(
        'ws_url = "wss://rpc-a.example"', ""
    )
    chain = chain.replace('# router_address = "0x..."', f'router_address = "{router}"')
    path = tmp_path / "watcher.toml"
    path.write_text(first + "[[chains]]" + chain)
    return path


def test_check_config_checks_the_router_code_on_the_node(tmp_path, anvil_node):
    """Deployed from `watcher router-deploy-tx`'s data, the router passes; a token, an empty
    address and an unreachable node do not pass silently."""
    from anvil_harness import AnvilChain

    node = anvil_node()
    chain = AnvilChain(node, "devnet").setup()
    data = watcher("router-deploy-tx").stdout.strip()
    tx = chain.send("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266", None, data, gas=3_000_000)
    node.mine(1)
    router = chain.receipt(tx)["contractAddress"]
    env = {
        "WATCHER_API_KEY": "sk_test_Zq3vN8xK2pL7wR4tY9bC6mD1fG5hJ0aE",
        "WATCHER_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8,
    }

    good = watcher(
        "check-config", "--config", str(_config_with_router(tmp_path, node.url, 31337, router)), env=env
    )
    assert good.returncode == 0, good.stderr
    assert "holds the PaymentRouter's code" in good.stdout

    token = watcher(
        "check-config", "--config", str(_config_with_router(tmp_path, node.url, 31337, chain.token)), env=env
    )
    assert (
        token.returncode == 2
        and "chains[0].router_address" in token.stderr
        and "not the watcher's PaymentRouter" in token.stderr
    )

    empty = "0x" + "12" * 20
    nothing = watcher(
        "check-config", "--config", str(_config_with_router(tmp_path, node.url, 31337, empty)), env=env
    )
    assert nothing.returncode == 2 and "holds no contract" in nothing.stderr

    down = watcher(
        "check-config",
        "--config",
        str(_config_with_router(tmp_path, "http://127.0.0.1:9", 31337, router)),
        env=env,
    )
    assert down.returncode == 0 and "not checked" in down.stdout
    offline = watcher(
        "check-config",
        "--offline",
        "--config",
        str(_config_with_router(tmp_path, node.url, 31337, chain.token)),
        env=env,
    )
    assert offline.returncode == 0, "--offline asks no node"


def test_balances_without_a_running_watcher_is_one_line_and_exit_1(tmp_path):
    from harness import free_port

    config = tmp_path / "watcher.toml"
    config.write_text(
        EXAMPLE.read_text().replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{free_port()}"')
    )
    env = {
        "WATCHER_API_KEY": "sk_test_Zq3vN8xK2pL7wR4tY9bC6mD1fG5hJ0aE",
        "WATCHER_WEBHOOK_SECRET": "whsec_" + "QUJD" * 8,
    }
    result = watcher("balances", "--config", str(config), env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        result.stderr.startswith("watcher balances: cannot reach the watcher's API")
        and result.stderr.count("\n") == 1
    )
    assert env["WATCHER_API_KEY"] not in result.stderr
