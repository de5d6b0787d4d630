"""Waiting for udev on events, never on sleeps.

A Watcher is started before the action that makes devices (connecting
/dev/nbdN, re-reading its partition table), so no event can be missed;
wait_added then returns once udev has announced every named device.
Where no udev daemon runs (a minimal host), the kernel's devtmpfs has made
the nodes by the time the action returns, and there is nothing to await.
"""

import os
import time

import pyudev

from nbdplug.errors import UsageError

TIMEOUT = 60.0


def udev_running():
    return os.path.exists("/run/udev/control")


class Watcher:
    def __init__(self):
        self.monitor = None
        if udev_running():
            self.monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            self.monitor.filter_by("block")
            self.monitor.start()

    def wait_added(self, names, after=0, timeout=TIMEOUT):
        """Return once udev has processed an "add" of each sys name, of a
        uevent numbered above `after`."""
        missing = set(names)
        if self.monitor is None:
            absent = [n for n in missing if not os.path.exists("/dev/" + n)]
            if absent:
                raise UsageError("no device node for " + ", ".join(absent))
            return
        deadline = time.monotonic() + timeout
        while missing:
            event = self.monitor.poll(max(0, deadline - time.monotonic()))
            if event is None:
                raise UsageError("udev did not announce " +
                                 ", ".join(sorted(missing)) +
                                 f" within {timeout:g}s")
            if event.action == "add" and event.sequence_number > after:
                missing.discard(event.sys_name)

    def close(self):
        self.monitor = None     # the socket closes with the object
