"""systemd's sd_notify protocol: one datagram per state change to $NOTIFY_SOCKET.

A few lines of stdlib instead of a dependency; without NOTIFY_SOCKET every call is a no-op,
so the daemon behaves the same outside systemd. What the daemon sends (contract §7):

- ``READY=1`` once the API serves every route (after the start-up's checks: watcher/startup.py)
  and again after a reload, with a ``STATUS=`` line; ``STATUS=starting: ...`` before;
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` while every loop of the daemon is alive;
- ``STATUS=<chain> lag <blocks>; ...`` with each chain's lag behind its head;
- ``RELOADING=1`` while SIGHUP re-reads the config, ``STOPPING=1`` when a stop begins.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address or None
        usec = env.get("WATCHDOG_USEC", "")
        # WATCHDOG_PID, when set, names the process the watchdog is meant for (sd_watchdog_enabled).
        pid = env.get("WATCHDOG_PID", "")
        for_us = not pid or (pid.isdigit() and int(pid) == os.getpid())
        enabled = usec.isdigit() and int(usec) > 0 and for_us
        # Half the timeout, as systemd recommends, so one late wake-up never kills the daemon.
        self.watchdog_interval = int(usec) / 2_000_000 if enabled else None

    def send(self, *fields: str) -> bool:
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (Type=notify-reload, v253+) match READY=1 to this reload.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")
