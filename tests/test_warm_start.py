"""`watcher run --config` starts the followers' process before it imports its own modules and
validates its config (childproc.WarmChildren): that process has loaded its watch sets when the
daemon is ready. Started before the config is validated, it must still lack every secret the
config names, and it must never outlive a daemon that does not start."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from pathlib import Path

from test_anvil_crash import CONFIRMATIONS, WATCHER, operate

from watcher import childproc
from watcher.cli import EXIT_USAGE, _env_names


def _children(pid: int) -> dict[str, int]:
    """The process's children by the module they run (`python -m <module>`); one being started
    (forked, not yet running its interpreter) or just gone is left out."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except (FileNotFoundError, ProcessLookupError):
                continue
            if b"-m" in argv and argv[argv.index(b"-m") + 1] != b"watcher.cli":
                found[argv[argv.index(b"-m") + 1].decode()] = int(child)
    return found


def _environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in entries if b"=" in e)


async def test_the_followers_process_is_started_first_lacks_the_secrets_and_follows(anvil_node, tmp_path):
    """The API key comes from SHOP_API_KEY here; WATCHER_API_KEY is set too, and the config does
    not use it. Read before validation, the default's name is left out of the warm process's
    environment, and only of its: the dispatcher's process, started by the supervision once the
    config is validated, still has it. So the followers' process that runs is the warm one."""
    op = await operate(anvil_node(), tmp_path)
    text = op.config.read_text()
    assert 'api_key_env = "WATCHER_API_KEY"' in text
    op.config.write_text(text.replace('api_key_env = "WATCHER_API_KEY"', 'api_key_env = "SHOP_API_KEY"'))
    op.env["SHOP_API_KEY"] = op.env["WATCHER_API_KEY"]
    op.env["WATCHER_API_KEY"] = "sk_test_" + secrets.token_urlsafe(24)  # unused by this config
    try:
        await op.daemon.start(op.http)
        assert op.daemon.process is not None
        # The dispatcher's process starts once the chain is at its head (at most 2 s later).
        deadline = time.monotonic() + 10
        while set(children := _children(op.daemon.process.pid)) != {
            "watcher.followproc",
            "watcher.dispatchproc",
        }:
            assert time.monotonic() < deadline, children
            await asyncio.sleep(0.05)
        warm, dispatcher = (_environ(children[m]) for m in ("watcher.followproc", "watcher.dispatchproc"))
        for environ in (warm, dispatcher):
            assert "PATH" in environ
            assert not set(environ) & {"SHOP_API_KEY", "WATCHER_WEBHOOK_SECRET", "NOTIFY_SOCKET"}, environ
        assert "WATCHER_API_KEY" not in warm and "WATCHER_API_KEY" in dispatcher

        # The warm process is the one that follows: a payment is seen and confirmed.
        invoice = await op.api("POST", "/v1/invoices", json={"amount": "12", "assets": ["TUSD"]})
        option = invoice["payment_options"][0]
        await asyncio.to_thread(
            op.chain.transfer_token, option["destination_address"], int(option["amount_atomic"])
        )
        await asyncio.to_thread(op.chain.mine, CONFIRMATIONS)
        deadline = time.monotonic() + 30
        while (
            status := (await op.api("GET", f"/v1/invoices/{invoice['id']}/status"))["status"]
        ) != "confirmed":
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
        assert _children(op.daemon.process.pid)["watcher.followproc"] == children["watcher.followproc"]
        assert op.daemon.terminate() == 0
    finally:
        await op.close()


async def test_a_config_that_does_not_validate_leaves_no_warm_process_behind(tmp_path):
    """Valid TOML (the warm process starts), an invalid config (the daemon does not): exit 2
    with the config's error, and the warm process is gone with it."""
    config = tmp_path / "watcher.toml"
    config.write_text(f'database = "{tmp_path / "w.db"}"\n[http]\nlisten = "nowhere"\n')
    marker = secrets.token_hex(8)
    env = {**os.environ, "WARM_START_MARKER": marker}
    done = await asyncio.to_thread(
        subprocess.run,
        [str(WATCHER), "run", "--config", str(config)],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == EXIT_USAGE, done.stderr
    assert b"configuration error" in done.stderr
    assert b"Traceback" not in done.stderr
    left = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"watcher.followproc" in (proc / "cmdline").read_bytes() and (
                    _environ(int(proc.name)).get("WARM_START_MARKER") == marker
                ):
                    left.append(proc.name)
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to read
    assert left == []


def test_the_env_names_read_before_validation_cover_every_secret_the_config_names(tmp_path):
    config = tmp_path / "watcher.toml"
    config.write_text(
        '[http]\napi_key_env = "MY_KEY"\n[[http.api_keys]]\nname = "ro"\nkey_env = "RO_KEY"\n'
        '[[webhooks]]\nurl = "https://example.com/hooks"\nsecret_env = "HOOK_SECRET"\n'
    )
    assert _env_names(str(config)) == {"WATCHER_API_KEY", "MY_KEY", "RO_KEY", "HOOK_SECRET"}
    config.write_text("this is not = = toml")
    assert _env_names(str(config)) is None
    assert _env_names(str(tmp_path / "missing.toml")) is None


async def test_a_warm_process_is_taken_only_if_it_lacks_every_secret_of_the_validated_config():
    warm = childproc.WarmChildren()
    await warm.start(["watcher.followproc"], {"HOOK_SECRET"})
    [(process, _)] = warm._waiting.values()
    assert warm.take("watcher.followproc", {"HOOK_SECRET", "OTHER_SECRET"}) is None
    assert await asyncio.wait_for(process.wait(), timeout=10) != 0  # killed, not left running
    assert warm.take("watcher.followproc", set()) is None  # taken once at most

    await warm.start(["watcher.followproc"], {"HOOK_SECRET"})
    taken = warm.take("watcher.followproc", {"HOOK_SECRET"})
    assert taken is not None and taken.returncode is None
    taken.stdin.close()  # end of input before the start: the child exits on its own
    assert await asyncio.wait_for(taken.wait(), timeout=30) == 0

    await warm.start(["watcher.followproc"], set())
    [(left, _)] = warm._waiting.values()
    await warm.discard()
    assert left.returncode is not None
