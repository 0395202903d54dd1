"""The database holds customers' emails and metadata: outside systemd (no UMask=), under a
permissive umask, the daemon still creates it, its -wal and -shm files 0600, and its
directory 0700."""

from __future__ import annotations

import os
import stat
import time

from daemon import SandboxDaemon

from watcher.store import Store


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_the_daemon_creates_its_database_private_under_any_umask(tmp_path):
    directory = tmp_path / "state" / "watcher"
    database = directory / "watcher.db"
    old = os.umask(0o022)  # the child inherits it: files would be 0644, directories 0755
    try:
        async with SandboxDaemon(tmp_path, database=database) as daemon:
            status, _ = await daemon.request("POST", "/v1/invoices", json={"amount": "1"})
            assert status == 201
            names = sorted(p.name for p in directory.iterdir())
            assert names == ["watcher.db", "watcher.db-shm", "watcher.db-wal"]
            assert {name: mode(directory / name) for name in names} == dict.fromkeys(names, 0o600)
            assert mode(directory) == 0o700
    finally:
        os.umask(old)
    assert mode(tmp_path / "state") == 0o755  # a parent the operator named is left as the umask makes it


def test_an_existing_database_keeps_the_mode_its_operator_gave_it(tmp_path):
    database = tmp_path / "watcher.db"
    Store(database, clock=time.time).close()
    assert mode(database) == 0o600
    os.chmod(database, 0o640)  # e.g. readable by a backup group
    Store(database, clock=time.time).close()
    assert mode(database) == 0o640
