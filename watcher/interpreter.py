"""How the daemon's processes tune the interpreter before they start work (the daemon and its
webhook dispatcher alike)."""

from __future__ import annotations

import gc
import sys

# A process's store writer thread runs long stretches of Python (judging a catch-up step,
# recording attempts), and its event loop waits for the GIL each time it wakes, up to the
# interpreter's switch interval. 1 ms instead of the default 5 shortens those waits
# (`python -m bench loop`; BENCHMARKS.md, issue 13).
SWITCH_INTERVAL_S = 0.001


def tune() -> None:
    """The switch interval above, and everything imported so far (modules, classes, functions:
    about 120,000 objects in the daemon) frozen: it lives as long as the process, and the
    collector's full passes, which hold the GIL, no longer walk it (BENCHMARKS.md, issue 13)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    gc.freeze()
