"""Processes we start and must later recognise: a pid is trusted only
with the start time recorded beside it, so a reused pid is never killed."""

import os
import select
import signal


def start_time(pid):
    """The process's start time (clock ticks since boot), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None         # a zombie has gone as far as we care
    return int(fields[19])


def alive(pid, started):
    return pid is not None and start_time(pid) == started


def wait_exit(pid, timeout):
    """Wait for `pid` to exit, on a pidfd (no polling); True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def stop(pid, started, timeout=10.0):
    """SIGTERM, then SIGKILL after `timeout`; only the process recorded."""
    if not alive(pid, started):
        return
    os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, timeout) and alive(pid, started):
        os.kill(pid, signal.SIGKILL)
        wait_exit(pid, timeout)
