"""Mount a guest image's filesystem, and undo exactly that.

mount = check the mountpoint, attach, choose the partition, mount with
nodev,nosuid (a guest's device nodes and setuid files mean nothing here);
umount = unmount, then detach what mount attached.  Any failure after
attaching detaches again, so a refused mount leaves nothing behind.
"""

import os
import subprocess

from nbdplug.errors import UsageError

from . import attach as _attach
from . import devices, partitions, state


def mount(image, mountpoint, fmt=None, partition=None, readonly=False,
          share=False, options=None, via=None, policy=None):
    """Mount; returns (record, device mounted)."""
    mnt = os.path.realpath(mountpoint)
    if not os.path.isdir(mnt):
        raise UsageError(f"{mountpoint}: no such directory")
    if devices.mounted(mnt):
        raise UsageError(f"{mountpoint}: something is already mounted there")
    record = _attach.attach(image, fmt, readonly, share, via, policy)
    try:
        dev = _choose(record, partition)
        opts = ["nodev", "nosuid"] + (["ro"] if readonly else []) + \
            [o for o in (options or "").split(",") if o]
        with state.locked():
            record["mounts"].append(mnt)
            state.save(record)
            proc = subprocess.run(["mount", "-o", ",".join(opts), dev, mnt],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                record["mounts"].remove(mnt)
                state.save(record)
                lines = proc.stderr.strip().splitlines()
                raise UsageError(f"mount {dev} on {mountpoint}: " +
                                 (lines[-1] if lines else "failed"))
    except BaseException:
        with state.locked():
            _attach.teardown(record)
        raise
    return record, dev


def _choose(record, number):
    """The device of the partition to mount: --partition N, else the one
    partition with a Linux filesystem, else the whole disk when it holds
    a filesystem and no table."""
    parts = record["partitions"]
    if record.get("whole_fs"):
        if number not in (None, 0):
            raise UsageError(f"{record['image']}: no partition table; the "
                             "filesystem is on the whole disk")
        return record["device"]
    if not record["table"]:
        raise UsageError(f"{record['image']}: no partition table and no "
                         "filesystem found")
    if not parts:
        raise UsageError(f"{record['image']}: the partition table is empty")
    listing = partitions.describe(partitions.Partition(
        p["number"], p["start"], p["size"], p["fs"]) for p in parts)
    if number is not None:
        for p in parts:
            if p["number"] == number:
                return p["device"]
        raise UsageError(f"{record['image']}: no partition {number}; it "
                         f"has {listing}")
    linux = [p for p in parts if p["fs"] in partitions.LINUX_FS]
    if len(linux) != 1:
        why = "no partition" if not linux else "several partitions"
        raise UsageError(f"{record['image']}: {why} with a Linux "
                         f"filesystem; say --partition N (it has {listing})")
    return linux[0]["device"]


def umount(mountpoint):
    """Unmount what nbdplug mount mounted there, and detach its image."""
    mnt = os.path.realpath(mountpoint)
    with state.locked():
        records = [r for r in state.load_all() if mnt in r.get("mounts", [])]
        if not records:
            raise UsageError(f"{mountpoint}: not mounted by nbdplug")
        for r in records:
            proc = subprocess.run(["umount", mnt], capture_output=True,
                                  text=True)
            if proc.returncode != 0 and _attach.alive(r):
                lines = proc.stderr.strip().splitlines()
                raise UsageError(f"umount {mountpoint}: " +
                                 (lines[-1] if lines else "failed"))
            _attach.teardown(r)
    return records
