"""Partitions: read the table in userspace (pyparted), then give every
partition a block device: the kernel's own node where it scanned the
table and the node has the table's offset and size (once udev has run
its rules on it), otherwise one we make, a dm-linear target where
device-mapper exists or a loop device with offset and size limit.  The
kernel on a development machine may have no partition parsers at all,
so nothing here depends on it scanning."""

import os
import typing

import _ped
import parted

from nbdplug.errors import UsageError

from dm import table as dmtable
from . import devices

# Filesystems a Linux guest keeps its files on (parted's names).
LINUX_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "jfs", "reiserfs",
            "f2fs", "nilfs2")


class Partition(typing.NamedTuple):
    number: int
    start: int          # bytes
    size: int           # bytes
    fs: typing.Optional[str]


# What libparted raises on a table it cannot use (they share no base).
_PARTED_ERRORS = tuple(getattr(_ped, n) for n in dir(_ped)
                       if n.endswith("Exception"))


def read_table(dev):
    """The partitions of `dev` in table order; None if it has no table.
    Number 0 stands for a filesystem on the whole disk."""
    with devices.private_node(dev) as node:
        try:
            device = parted.getDevice(node)
        except _PARTED_ERRORS as e:
            raise UsageError(f"{dev}: cannot read: {e}")
        try:
            disk = parted.newDisk(device)
        except _PARTED_ERRORS:
            try:
                fs = parted.probeFileSystem(parted.Geometry(
                    device, start=0, length=device.length))
            except _PARTED_ERRORS:
                return None
            return [Partition(0, 0, device.length * device.sectorSize, fs)]
        if disk.type == "loop":
            # libparted's name for a filesystem on the whole disk.
            [p] = disk.partitions
            return [Partition(0, 0, device.length * device.sectorSize,
                              p.fileSystem.type if p.fileSystem else None)]
        out = []
        for p in disk.partitions:
            if p.type & parted.PARTITION_EXTENDED:
                continue        # the container of logical partitions
            fs = p.fileSystem.type if p.fileSystem else None
            out.append(Partition(p.number,
                                 p.geometry.start * device.sectorSize,
                                 p.geometry.length * device.sectorSize, fs))
        return out


def map_partitions(record, save, watcher):
    """Give each partition of record["device"] a device, recording each
    one (save) as it is made, so a failure halfway can be undone."""
    dev = record["device"]
    parts = read_table(dev)
    record["table"] = parts is not None
    record["partitions"] = []
    if parts and parts[0].number == 0:
        record["whole_fs"] = parts[0].fs
        return parts
    if not parts:
        return parts
    kernel = {}
    if record["via"] == "nbd":
        seqnum = devices.rescan_partitions(dev)
        if seqnum is not None:
            # A node is the partition's only if it has the table's bytes.
            made = devices.kernel_partitions(dev)
            kernel = {p.number: made[p.number][0] for p in parts
                      if made.get(p.number, ())[1:] == (p.start, p.size)}
            # devtmpfs made the nodes as the kernel scanned; udev runs
            # its rules on them after, announcing each: wait for that.
            watcher.wait_added([devices.sys_name(n) for n in
                                kernel.values()], after=seqnum)
    elif record["via"] == "loop":   # we never ask the kernel to scan loops
        devices.drop_partitions(dev)
    use_dm = devices.dm_available()
    for p in parts:
        entry = {"number": p.number, "start": p.start, "size": p.size,
                 "fs": p.fs}
        if p.number in kernel:
            entry.update(device=kernel[p.number], made="kernel")
        elif use_dm:
            name = f"nbdplug-{os.path.basename(record['dir'])}-p{p.number}"
            entry.update(made="dm", dm_name=name)
            record["partitions"].append(entry)
            save(record)
            entry["device"] = dmtable.load(
                name, dmtable.Table().linear(p.size, dev, p.start),
                record["readonly"])
            save(record)
            continue
        else:
            # Over the nbdfuse file itself where there is one: one layer
            # fewer, and a backing file the udev rules recognise.
            backing = os.path.join(record["fuse_dir"], "disk") \
                if record.get("fuse_dir") else dev
            entry.update(made="loop", device=devices.loop_attach(
                backing, record["readonly"], p.start, p.size))
        record["partitions"].append(entry)
        save(record)
    return parts


def unmap_partitions(record):
    for entry in reversed(record.get("partitions", [])):
        if entry.get("made") == "loop":
            devices.loop_detach(entry["device"])
        elif entry.get("made") == "dm":
            dmtable.remove(entry["dm_name"])


def describe(parts):
    """'p1 (ext4, 10 MiB), p2 (no filesystem, 4 MiB)'."""
    return ", ".join(f"p{p.number} ({p.fs or 'no filesystem'}, "
                     f"{p.size / (1 << 20):.4g} MiB)" for p in parts)
