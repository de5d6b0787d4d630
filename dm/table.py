"""Device-mapper tables as data, and loading them with dmsetup.

A table maps consecutive ranges of a new device, in 512-byte sectors, to
targets (Documentation/admin-guide/device-mapper/linear.rst and
dmsetup(8)): "START LENGTH linear DEVICE OFFSET" per line.  Building the
table is pure data, so it can be checked without a kernel; load() and
remove() are the only parts that touch one.
"""

import os
import subprocess
import typing

from nbdplug.errors import UsageError

SECTOR = 512


class Target(typing.NamedTuple):
    start: int          # sectors into the new device
    length: int         # sectors
    kind: str           # "linear", "zero", "error"
    args: tuple = ()

    def line(self):
        return " ".join(str(x) for x in (self.start, self.length, self.kind,
                                         *self.args))


def sectors(nbytes, what):
    if nbytes % SECTOR:
        raise UsageError(f"{what} ({nbytes} bytes) is not a whole number of "
                         f"{SECTOR}-byte sectors")
    return nbytes // SECTOR


class Table:
    def __init__(self, targets=()):
        self.targets = []
        for t in targets:
            self.append(t.length, t.kind, *t.args)

    @property
    def length(self):
        """Sectors covered so far."""
        return sum(t.length for t in self.targets)

    def append(self, length, kind, *args):
        """Map the next `length` sectors to a target."""
        if length <= 0:
            raise UsageError("a device-mapper target needs a positive length")
        self.targets.append(Target(self.length, length, kind, tuple(args)))
        return self

    def linear(self, nbytes, device, offset=0):
        """The next `nbytes` come from `device` at byte `offset`."""
        return self.append(sectors(nbytes, "linear length"), "linear",
                           device, sectors(offset, "linear offset"))

    def text(self):
        return "".join(t.line() + "\n" for t in self.targets)


def concat(devices):
    """One device made of [(path, nbytes), ...] end to end."""
    table = Table()
    for path, nbytes in devices:
        table.linear(nbytes, path)
    return table


def load(name, table, readonly=False):
    """Create /dev/mapper/NAME from `table`; returns its path."""
    argv = ["dmsetup", "create", name]
    if readonly:
        argv.append("--readonly")
    proc = subprocess.run(argv, input=table.text(), capture_output=True,
                          text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise UsageError("dmsetup: " + (lines[-1] if lines else
                                        f"exit status {proc.returncode}"))
    # dmsetup waits for udev when it runs (udev cookie); without udev (a
    # minimal dom0, a container) it may leave the node to us.
    path = os.path.join("/dev/mapper", name)
    if not os.path.exists(path):
        subprocess.run(["dmsetup", "mknodes", name], capture_output=True)
    return path


def remove(name):
    subprocess.run(["dmsetup", "remove", "--retry", name],
                   capture_output=True)
