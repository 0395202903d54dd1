"""docs/from-sandbox-to-mainnet.md, step 2, followed as written: `scripts/devnet`, then the
guide's own command lines (run through bash, with only the directory and the port changed),
on a real anvil: `watcher xpub` on the known mnemonic gives the config's deposit xpub,
`watcher addresses` gives the API's first invoices' addresses in order, `scripts/devnet pay`
pays two invoices, and deposit-balances (API and `watcher balances`) lists both addresses."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from harness import free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "from-sandbox-to-mainnet.md"


def guide_lines() -> list[str]:
    """The command lines of the guide's devnet step, comments dropped."""
    section = GUIDE.read_text().split("## 2. A local devnet", 1)[1].split("\n## ", 1)[0]
    return [
        line.split("  #")[0].strip()
        for block in re.findall(r"```sh\n(.*?)```", section, re.S)
        for line in block.splitlines()
        if line.strip()
    ]


def guide_line(start: str) -> str:
    """The one command line of the guide's devnet step that starts with `start`."""
    lines = [line for line in guide_lines() if line.startswith(start)]
    assert len(lines) == 1, (start, lines)
    return lines[0]


@pytest.fixture
def devnet(tmp_path, anvil_node):  # anvil_node: skips (or fails in CI) without the anvil binary
    directory, port, listen = tmp_path / "devnet", free_port(), f"127.0.0.1:{free_port()}"
    assert "scripts/devnet" in guide_lines()
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            str(ROOT / "scripts" / "devnet"),
            "--dir",
            str(directory),
            "--port",
            str(port),
            "--listen",
            listen,
            "--block-time",
            "0.5",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("WATCHER_")},
    )
    try:
        wait_http(f"http://{listen}/healthz", timeout=120)
        yield directory, listen, started
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out


def bash(line: str, directory: Path, listen: str) -> str:
    """A command line of the guide, with the devnet's directory and API address as this test runs them."""
    command = line.replace(".devnet/", f"{directory}/").replace("127.0.0.1:8080", listen)
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result.stdout


def api(listen: str, key: str, method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://{listen}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_devnet_guide_works_as_written(devnet):
    directory, listen, started = devnet
    config = tomllib.loads((directory / "watcher.toml").read_text())
    key = (directory / "watcher.env").read_text().split("WATCHER_API_KEY=", 1)[1].split("\n", 1)[0]

    xpub = bash(guide_line('echo "test test'), directory, listen).strip()
    assert xpub == config["chains"][0]["deposit_xpub"]

    lines = bash(
        guide_line("( set -a; . .devnet/watcher.env; .venv/bin/watcher addresses"), directory, listen
    )
    addresses = [line.split() for line in lines.splitlines()]
    assert [a[:2] for a in addresses] == [["devnet", f"m/44'/60'/1'/0/{i}"] for i in range(3)]

    first = api(listen, key, "POST", "/v1/invoices", {"amount": "12.50"})
    second = api(listen, key, "POST", "/v1/invoices", {"amount": "20"})
    third = api(listen, key, "POST", "/v1/invoices", {"amount": "1"})
    shown = [inv["payment_options"][0]["destination_address"] for inv in (first, second, third)]
    assert shown == [a[2] for a in addresses], (
        "the xpub the watcher uses is the one derived from the mnemonic"
    )

    pay = guide_line("scripts/devnet pay")
    assert pay == "scripts/devnet pay inv_..."
    bash(pay.replace("inv_...", first["id"]) + f" --dir {directory}", directory, listen)
    bash(pay.replace("inv_...", second["id"]) + f" --dir {directory} --amount 5", directory, listen)

    status_line = guide_line(
        'curl -s -H "Authorization: Bearer $KEY" http://127.0.0.1:8080/v1/invoices/inv_.../status'
    )
    assert "/status" in status_line
    deadline = time.monotonic() + 60
    while (status := api(listen, key, "GET", f"/v1/invoices/{first['id']}/status"))["status"] != "confirmed":
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    print(f"\ndevnet: from `scripts/devnet` to a confirmed invoice: {time.monotonic() - started:.1f} s")
    assert status["payment_summary"]["received_amount"] == "12.50"
    partial = api(listen, key, "GET", f"/v1/invoices/{second['id']}")
    deadline = time.monotonic() + 30
    while not partial["payments"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
        partial = api(listen, key, "GET", f"/v1/invoices/{second['id']}")
    assert partial["payment_summary"]["payment_state"] == "partial"

    balances = api(listen, key, "GET", "/v1/deposit-balances")
    assert balances["total"] == 2
    assert [
        (r["address"], r["derivation_index"], r["asset"], r["amount"], r["native_balance_atomic"])
        for r in balances["data"]
    ] == [(shown[0], 0, "TUSD", "12.5", "0"), (shown[1], 1, "TUSD", "5", "0")]

    table = bash(
        "( set -a; . .devnet/watcher.env; .venv/bin/watcher balances --config .devnet/watcher.toml )",
        directory,
        listen,
    )
    assert shown[0] in table and shown[1] in table and shown[2] not in table

    checked = bash(
        "( set -a; . .devnet/watcher.env; .venv/bin/watcher check-config --config .devnet/watcher.toml )",
        directory,
        listen,
    )
    assert "holds the PaymentRouter's code" in checked
    assert "watcher check-config --config .devnet/watcher.toml" in GUIDE.read_text()
    assert "watcher balances --config .devnet/watcher.toml" in GUIDE.read_text()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_devnet_pay_without_a_devnet_says_so(tmp_path):
    result = subprocess.run(
        [str(ROOT / "scripts" / "devnet"), "pay", "inv_x", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "no devnet" in result.stderr and "Traceback" not in result.stderr
