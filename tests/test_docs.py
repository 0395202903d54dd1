"""The docs say what the code does: the config reference is the settings model, the webhook
verification example verifies the watcher's signatures, the backup commands work on a
running watcher."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import typing
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from harness import free_port, wait_http
from pydantic import BaseModel

from watcher.config import EVENT_TYPES, Settings
from watcher.webhooks import secret_key, sign

ROOT = Path(__file__).resolve().parent.parent
OPERATORS = ROOT / "docs" / "operators.md"
INTEGRATORS = ROOT / "docs" / "integrators.md"
# Defaults the docs state differently from the model, on purpose.
DOC_DEFAULTS = {"log_format": "auto"}  # unset means: JSON under systemd or into a pipe, console on a terminal


def _model_of(annotation: typing.Any) -> type[BaseModel] | None:
    """The settings model of a field (a table or an array of tables), or None for a leaf."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def config_keys(model: type[BaseModel] = Settings, prefix: str = "") -> dict[str, str]:
    """Every key a config file may hold, dotted (`chains[].assets[].symbol`), with the default
    as the docs write it. Fields filled from the environment (excluded from dumps) are not keys."""
    keys: dict[str, str] = {}
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        sub = _model_of(field.annotation)
        if sub is not None:
            array = typing.get_origin(field.annotation) is tuple
            keys |= config_keys(sub, f"{prefix}{name}{'[]' if array else ''}.")
            continue
        key = prefix + name
        if key in DOC_DEFAULTS:
            keys[key] = DOC_DEFAULTS[key]
        elif field.is_required():
            keys[key] = "required"
        else:
            default = field.get_default(call_default_factory=True)
            if default is None:
                keys[key] = "—"
            elif isinstance(default, (str, Decimal)):
                keys[key] = f'"{default}"'
            elif isinstance(default, (tuple, bool)):
                keys[key] = json.dumps(list(default) if isinstance(default, tuple) else default)
            else:
                keys[key] = str(default)
    return keys


def reference_table() -> dict[str, str]:
    text = OPERATORS.read_text()
    section = text.split("### Reference", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([^`]+)`\s*\|\s*([^|]+?)\s*\|", line)
        if m:
            rows[m[1]] = m[2].strip("`")
    return rows


def test_the_config_reference_lists_every_key_of_the_settings_model_and_no_other():
    documented, model = reference_table(), config_keys()
    assert "http.listen" in model and "chains[].assets[].symbol" in model and "webhooks[].secret" not in model
    assert sorted(set(model) - set(documented)) == [], "keys missing from docs/operators.md"
    assert sorted(set(documented) - set(model)) == [], "keys in docs/operators.md the watcher does not know"


def test_the_config_reference_states_each_default():
    documented = reference_table()
    wrong = {
        key: (documented[key], default)
        for key, default in config_keys().items()
        if documented[key] != default
    }
    assert wrong == {}, "(documented, actual)"


def test_the_example_config_uses_only_documented_keys():
    import tomllib

    def keys(data: dict, prefix: str = "") -> set[str]:
        found = set()
        for k, v in data.items():
            if isinstance(v, dict):
                found |= keys(v, f"{prefix}{k}.")
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                for x in v:
                    found |= keys(x, f"{prefix}{k}[].")
            else:
                found.add(prefix + k)
        return found

    example = tomllib.loads((ROOT / "config" / "watcher.example.toml").read_text())
    assert keys(example) <= set(reference_table())


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def verification_example() -> typing.Callable[..., bool]:
    [code] = [block for block in python_blocks(INTEGRATORS) if "def verify_webhook" in block]
    namespace: dict[str, typing.Any] = {}
    exec(compile(code, str(INTEGRATORS), "exec"), namespace)
    return namespace["verify_webhook"]


def test_the_webhook_verification_example_accepts_the_watchers_signatures_and_nothing_else():
    verify_webhook = verification_example()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    body = json.dumps({"id": "evt_1", "type": "invoice.paid", "data": {"invoice": {"version": 3}}}).encode()
    now = int(time.time())

    def headers(
        msg_id: str = "evt_1", ts: int = now, key: bytes = secret_key(secret), signed: bytes = body
    ) -> dict:
        return {
            "Webhook-Id": msg_id,
            "Webhook-Timestamp": str(ts),
            "Webhook-Signature": sign(key, msg_id, ts, signed),
        }

    assert verify_webhook(secret, headers(), body) is True
    # Several signatures (a secret being rotated): any valid v1 one will do.
    several = headers()
    several["Webhook-Signature"] = "v1,bm90IGl0 " + several["Webhook-Signature"]
    assert verify_webhook(secret, several, body) is True
    assert verify_webhook(secret, headers(), body + b" ") is False  # body changed
    assert verify_webhook(secret, headers(signed=body + b" "), body) is False
    assert verify_webhook(secret, headers(key=secrets.token_bytes(32)), body) is False  # another secret
    assert verify_webhook(secret, headers(ts=now - 3600), body) is False  # replayed later
    forged = headers()
    forged["Webhook-Id"] = "evt_2"  # id swapped
    assert verify_webhook(secret, forged, body) is False
    assert verify_webhook(secret, {}, body) is False
    unversioned = headers()
    unversioned["Webhook-Signature"] = unversioned["Webhook-Signature"].replace("v1,", "v2,")
    assert verify_webhook(secret, unversioned, body) is False


def test_the_integrators_page_lists_every_event_type():
    text = INTEGRATORS.read_text()
    section = text.split("Event types:", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`(invoice\.[a-z_]+)`", section)) == EVENT_TYPES


def test_the_docs_link_each_other_and_the_readme_links_both():
    readme = (ROOT / "README.md").read_text()
    assert "docs/operators.md" in readme and "docs/integrators.md" in readme
    assert "(integrators.md)" in OPERATORS.read_text() and "(operators.md)" in INTEGRATORS.read_text()


# --------------------------------------------------------------------------- backup


def backup_commands() -> tuple[str, str, str]:
    """The documented backup commands (sqlite3 shell, Python) and the check, as the watcher
    user would run them."""
    text = OPERATORS.read_text()
    section = text.split("## Back up the database", 1)[1].split("\n## ", 1)[0]
    lines = [
        line.removeprefix("runuser -u watcher -- ")
        for block in re.findall(r"```sh\n(.*?)```", section, re.S)
        for line in block.splitlines()
    ]

    def one(marker: str) -> str:
        [line] = [line for line in lines if marker in line]
        return line

    return one('".backup '), one("src.backup(dst)"), one("integrity_check")


@pytest.mark.skipif(
    shutil.which("sqlite3") is None and not os.environ.get("CI"),
    reason="the sqlite3 shell is not installed (apt-get install sqlite3); .ci/run installs it in CI",
)
def test_the_documented_backup_works_on_a_running_watcher(tmp_path):
    """Back up a WAL database while the daemon writes to it: the copy is sound and holds
    what was committed before it; both documented ways."""
    port = free_port()
    key = "sk_test_" + secrets.token_hex(12)
    database = tmp_path / "watcher.db"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "watcher.cli",
            "run",
            "--sandbox",
            "--listen",
            f"127.0.0.1:{port}",
            "--block-time",
            "0.2",
            "--database",
            str(database),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "WATCHER_API_KEY": key},
    )
    base = f"http://127.0.0.1:{port}"
    created: list[str] = []
    stop = threading.Event()

    def create() -> None:
        request = urllib.request.Request(
            base + "/v1/invoices",
            data=b'{"amount": "1.50"}',
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            created.append(json.loads(r.read())["id"])

    def keep_writing() -> None:
        while not stop.is_set():
            create()

    try:
        wait_http(base + "/healthz")  # started: its /v1 routes serve
        assert proc.poll() is None, "the sandbox did not start"
        for _ in range(5):
            create()
        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            time.sleep(0.3)
            shell, python, check = backup_commands()
            results = []
            for i, command in enumerate((shell, python)):
                before = len(created)
                copy = tmp_path / f"backup-{i}.db"
                command = command.replace("/var/lib/watcher/watcher.db", shlex.quote(str(database)))
                command = command.replace("/var/backups/watcher/watcher.db", shlex.quote(str(copy)))
                command = command.replace("python3 ", shlex.quote(sys.executable) + " ")
                run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
                assert run.returncode == 0, (command, run.stderr)
                checked = subprocess.run(
                    ["bash", "-c", check.replace("/var/backups/watcher/watcher.db", shlex.quote(str(copy)))],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert checked.stdout.strip() == "ok", checked
                results.append((copy, before))
        finally:
            stop.set()
            writer.join()
        assert proc.poll() is None, "the watcher kept running throughout"
        live = sqlite3.connect(database)
        try:
            assert live.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            live.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    for copy, before in results:
        db = sqlite3.connect(copy)
        try:
            ids = {row[0] for row in db.execute("SELECT id FROM invoices")}
            events = {
                row[0] for row in db.execute("SELECT invoice_id FROM events WHERE type = 'invoice.created'")
            }
        finally:
            db.close()
        assert set(created[:before]) <= ids, "everything committed before the backup is in it"
        assert ids == events, "an invoice and its event are in the copy together, or neither is"


# --------------------------------------------------------------------------- the repository stands alone

TOP_DIRS = ("bench", "config", "contracts", "docs", "scripts", "tests", "watcher", ".ci")
PARENT = ".." + "/"  # spelt apart so that this file does not match its own rule


def tracked_text_files() -> dict[Path, str]:
    """Every file a clone has (git's index; the tree without .venv and node_modules when this is
    not a git checkout), by path, with its text; binary files are left out."""
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        paths = [ROOT / name for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache"}
        paths = [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    texts = {}
    for path in paths:
        try:
            texts[path] = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
    return texts


def outside_references(path: Path, text: str) -> list[str]:
    """The paths `text` (the file at `path`) names that a clone does not have: a relative path
    climbing out of the repository, a Markdown link to a missing file, a `*.md` file the
    repository lacks, or a path under one of the repository's folders that does not exist."""
    found = []
    # Not inside a name or a URL path ("inv_.../pay", "/pay/static/" + PARENT + "x": a route, not a file).
    for m in re.finditer(r"(?<![\w./])" + re.escape(PARENT) + r"[\w./-]*", text):
        target = (path.parent / m[0]).resolve()
        if not target.is_relative_to(ROOT):
            found.append(m[0])
    if path.suffix == ".md":
        for m in re.finditer(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
            target = m[1]
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            resolved = (path.parent / target).resolve()
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                found.append(target)
    for m in re.finditer(r"(?<![\w/.:-])([\w.-][\w./*-]*\.md)\b", text):
        name = m[1]
        candidates = [ROOT / name, path.parent / name]
        if not any(c.resolve().is_relative_to(ROOT) and c.exists() for c in candidates) and not any(
            ROOT.glob("**/" + name)
        ):
            found.append(name)
    if path.suffix == ".md":
        folders = "|".join(map(re.escape, TOP_DIRS))
        for m in re.finditer(r"`((?:" + folders + r")/[^`\s]*)`", text):
            if not all(any(ROOT.glob(p.rstrip("/"))) for p in _braces(m[1])) and not _ignored(m[1]):
                found.append(m[1])
    return found


def _braces(pattern: str) -> list[str]:
    """Shell brace expansion, one level: `locales/{en,de}.json` is two paths."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [
        p for choice in m[1].split(",") for p in _braces(pattern[: m.start()] + choice + pattern[m.end() :])
    ]


def _ignored(path: str) -> bool:
    """A path git ignores: something the project makes (a cache), not a file it ships."""
    try:
        return subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT).returncode == 0
    except OSError:
        return False


def test_no_tracked_file_names_a_path_outside_the_repository():
    """A clone has only the repository: its docs, config and code must not send a reader to a
    file it lacks (the project's old spec sat next to the repository, not in it)."""
    texts = tracked_text_files()
    assert ROOT / "README.md" in texts and ROOT / "docs" / "operators.md" in texts
    this_file = Path(__file__).resolve()  # names missing files on purpose, to test the check
    bad = {
        str(path.relative_to(ROOT)): refs
        for path, text in texts.items()
        if path != this_file and (refs := outside_references(path, text))
    }
    assert bad == {}


def test_the_outside_reference_check_catches_each_kind(tmp_path):
    """The check above fails on each way a doc can point out of the repository."""
    doc = ROOT / "docs" / "example.md"
    assert outside_references(doc, "See [the spec](" + PARENT + PARENT + "shared/SPEC.md).") != []
    assert outside_references(doc, "the contract (`" + PARENT + PARENT + "shared/SPEC.md`)") != []
    assert outside_references(doc, "as NOWHERE" + ".md section 2 says") != []
    assert outside_references(doc, "[operators](missing.md)") == ["missing.md", "missing.md"]
    assert outside_references(doc, "run `scripts/no-such-script`") == ["scripts/no-such-script"]
    assert outside_references(doc, "curl .../v1/invoices/inv_" + "." * 3 + "/pay") == []
    assert outside_references(doc, "`docs/{operators,integrators}.md`") == []
    assert outside_references(doc, "`docs/{operators,nowhere}.md`") == ["docs/{operators,nowhere}.md"]
    assert outside_references(ROOT / "config" / "x.toml", "# see SPEC" + ".md section 2") == ["SPEC" + ".md"]
    assert (
        outside_references(
            doc,
            "[operators](operators.md), `docs/integrators.md`, `scripts/test`, "
            "`tests/test_anvil_*`, /usr/share/doc/watcher/operators.md, "
            "[site](https://example.com/x.md)",
        )
        == []
    )


def test_the_api_reference_lists_every_event_type():
    text = (ROOT / "docs" / "api.md").read_text()
    section = text.split("## Webhook events", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `(invoice\.[a-z_]+)` \|", section, re.M)) == EVENT_TYPES


def test_the_example_config_and_the_reference_state_the_tolerance_range_the_watcher_takes():
    """One range everywhere: what the settings accept, the reference table and the example's comment."""
    from watcher.config import ConfigError, settings_from_dict

    def accepts(value: str) -> bool:
        data = {
            "http": {"listen": "127.0.0.1:8080"},
            "invoices": {"payment_tolerance_percent": value},
            "chains": [
                {
                    "name": "c",
                    "chain_id": 1,
                    "rpc_urls": ["https://x.example"],
                    "poll_interval_seconds": 1.0,
                    "confirmations": 1,
                    "assets": [{"symbol": "ETH", "kind": "native"}],
                }
            ],
        }
        try:
            settings_from_dict(data, {"WATCHER_API_KEY": "sk_test_Zq3vN8xK2pL7wR4tY9bC6mD1fG5hJ0aE"})
            return True
        except ConfigError:
            return False

    assert (
        accepts("0")
        and accepts("99.99")
        and not accepts("100")
        and not accepts("99.991")
        and not accepts("-1")
    )
    row = next(
        line
        for line in OPERATORS.read_text().splitlines()
        if line.startswith("| `invoices.payment_tolerance_percent`")
    )
    assert '`"0"` to `"99.99"`' in row
    example = (ROOT / "config" / "watcher.example.toml").read_text()
    comment = next(line for line in example.splitlines() if line.startswith("payment_tolerance_percent"))
    assert '"0" to "99.99"' in comment
