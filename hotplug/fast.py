"""The fast device: device-mapper over a loop device of each host file
and the image's NBD device (dm/fast.py says which range goes where).

    image --nbdkit + dm/plugin.py--> /dev/nbdN ---------------+
    each host file --losetup [--direct-io]--> /dev/loopM -----+--> dm
                                                                /dev/mapper/nbdplug-*

The table manager lives in the server (dm/manager.py); this side makes
the loop devices, asks the manager to make the device, and takes it all
down again.  `restart` swaps in a new server while the device stays: the
device is suspended (I/O waits in the kernel), the old server stopped,
a new one connected to a new NBD device, its table loaded, the device
resumed.

Loop devices use direct I/O where the host file system takes O_DIRECT:
the dm device above has its own page cache, so caching the file's pages
again would hold every block twice and copy it once more; the flush the
dm device passes down is an fsync of the file either way.  Where
O_DIRECT is refused (tmpfs), they read and write through the page cache.
"""

import contextlib
import os

from dm import fast as dmfast
from dm import manager
from dm import table as dmtable
from dm.ioctl import Device
from nbdplug.errors import UsageError

from . import devices, procs, state

PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "dm", "plugin.py")


def unavailable(disk):
    """Why `disk` cannot have a fast device here, or None."""
    files = disk.files()
    if not files or not all(os.path.exists(p) for p in files):
        return "a remote export has no host file to map"
    if not devices.nbd_available():
        return "this kernel has no NBD (modprobe nbd failed)"
    if not devices.dm_available():
        return "this kernel has no device-mapper (modprobe dm-mod failed)"
    return None


def server_args(args, record):
    """nbdplug's plugin arguments, for the fast plugin and its manager."""
    return ["python", PLUGIN] + args[2:] + \
        [f"dm-control={record['control']}"]


def direct_io(path):
    """Does the file system take O_DIRECT on `path`?"""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
        return True
    except OSError:
        return False


def make_loops(record, save):
    """One loop device per host file (a block device is used as it is),
    each recorded as it is made."""
    record["loops"] = {}
    for path in record["files"]:
        if dmfast.is_block_device(path):
            record["loops"][path] = path
            continue
        argv = []
        if direct_io(path):
            argv.append("--direct-io=on")
        dev = devices.loop_attach(path, record["readonly"], options=argv)
        record["loops"][path] = dev
        save(record)


def make_device(record):
    """Have the server's manager build the table and create the device."""
    name = record["dm_name"]
    reply = manager.request(record["control"], "start", name=name,
                            nbd=record["nbd"], loops=record["loops"],
                            readonly=record["readonly"])
    record["device"] = os.path.join("/dev/mapper", name)
    return reply


def remove_device(record, alive):
    """Take the fast device down (its partitions are gone): the manager
    stops first, then the device goes, then the pins."""
    if alive:
        with contextlib.suppress(Exception):
            manager.request(record["control"], "stop")
    if record.get("dm_name"):
        dmtable.remove(record["dm_name"])
    if alive:
        with contextlib.suppress(Exception):
            manager.request(record["control"], "release")


def remove_loops(record):
    for path, dev in reversed(list(record.get("loops", {}).items())):
        if dev != path:
            devices.loop_detach(dev)


def status(record):
    """The manager's figures for `list`, or None if it does not answer."""
    try:
        return manager.request(record["control"], "status", timeout=5)
    except (OSError, UsageError, ValueError):
        return None


def restart(record, start_server, alive):
    """Replace the server of a fast attachment, the device staying (and a
    filesystem on it mounted): `start_server(record)` starts the new one
    and records it."""
    device = Device(record["dm_name"])
    if not device.exists():
        raise UsageError(f"{record['device']}: the device is gone; "
                         "detach it")
    if alive:
        manager.request(record["control"], "stop")
    device.suspend()
    old_nbd, new_nbd = record["nbd"], None
    try:
        if alive:
            manager.request(record["control"], "release")
            procs.stop(record["server_pid"], record["server_start"])
        start_server(record)
        new_nbd = devices.nbd_connect(record["socket"], record["readonly"],
                                      taken_nbd())
        manager.request(record["control"], "start", name=record["dm_name"],
                        nbd=new_nbd, loops=record["loops"],
                        readonly=record["readonly"], create=False)
    except BaseException:
        with contextlib.suppress(Exception):
            device.resume()     # never leave the filesystem hanging
        if new_nbd:
            devices.nbd_disconnect(new_nbd)
        raise
    record["nbd"] = new_nbd
    state.save(record)
    devices.nbd_disconnect(old_nbd)


def taken_nbd():
    """The NBD devices our records hold."""
    return {r.get("nbd") or r.get("device") for r in state.load_all()}
