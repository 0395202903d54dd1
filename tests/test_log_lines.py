"""The daemon's processes (the API's, the follower's, the dispatcher's) share one stderr: the
journal's stream under systemd, where the unit sets PYTHONUNBUFFERED=1. Every log line must
reach it whole, whatever the others write meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WRITER = """
import sys
from watcher.logs import configure_logging, get_logger
configure_logging("json")
log = get_logger("watcher.test")
name = sys.argv[1]
for n in range(int(sys.argv[2])):
    log.info("line_written", writer=name, n=n, padding="x" * 150)
"""


def test_processes_logging_at_once_to_one_unbuffered_stream_never_split_a_line(tmp_path: Path) -> None:
    """Four processes log 4,000 lines each into one file at once, unbuffered, as under
    systemd: every line of the file is one whole JSON object, each written once."""
    out = tmp_path / "shared.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    writers, lines = 4, 4_000
    with out.open("wb") as shared:  # one open file, inherited by all: the journal's stream
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER, f"w{k}", str(lines)], stderr=shared, env=env)
            for k in range(writers)
        ]
        for p in procs:
            assert p.wait(timeout=120) == 0
    text = out.read_text()
    broken = [line for line in text.split("\n")[:-1] if not _one_object(line)]
    assert not broken, f"{len(broken)} broken lines, first: {broken[0][:300]!r}"
    seen = sorted((e["writer"], e["n"]) for e in map(json.loads, text.split("\n")[:-1]))
    assert seen == sorted((f"w{k}", n) for k in range(writers) for n in range(lines))


def _one_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
