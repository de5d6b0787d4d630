"""Growing a qcow2 image (`nbdplug resize`), from qemu's qcow2.txt.

Nothing the current header points at changes meaning until one write of
the header's size, l1_size and l1_table_offset (adjacent fields in one
sector, so the write lands whole).  Before it: a larger L1 table in new
clusters (or the L1 table's unused tail zeroed), and the new area made
to read as zeros where it would otherwise show the backing file or stale
bytes past the old end, all durable.  After it: the old L1 clusters and
any clusters the zeroing replaced are released.  A crash leaves the old
image or the new one, at worst with leaked clusters.
"""

import dataclasses
import struct

from nbdplug.errors import UnsupportedFeature, UsageError
from nbdplug.layout import be64_bytes
from . import structs as S
from .overlap import ACTIVE_L1, MAIN_HEADER

FMT = "qcow2"


def resize(disk, size, shrink=False):
    """Grow the open, writable qcow2 `disk` to `size` bytes."""
    geo, path, old = disk.geo, disk.path, disk.size
    if size % 512:
        raise UsageError(f"{path}: the new size must be a multiple of 512")
    if size < old:
        # qemu discards the tail; we have not needed it yet.
        raise UnsupportedFeature(path, FMT, "shrinking qcow2 images is not "
                                 "supported", "size")
    if size == old:
        return
    _refuse(disk)
    l1_size = geo.l1_needed(size)
    if l1_size * 8 > S.MAX_L1_BYTES:
        raise UnsupportedFeature(path, FMT, f"a size of {size} bytes needs "
                                 "an L1 table beyond the limit", "l1_size")
    m, cs = disk.map_, disk.cluster_size
    old_l1_offset, old_l1_size = m.l1_offset, len(m.l1)
    l1_offset, l1_size = old_l1_offset, max(l1_size, old_l1_size)
    old_l1_clusters = -(-old_l1_size * 8 // cs)
    with disk.lock:
        disk._prepare()
        if l1_size > old_l1_size:
            clusters = -(-l1_size * 8 // cs)
            if old_l1_size and clusters <= old_l1_clusters:
                # The spare tail of the L1 clusters may hold anything.
                disk.overlaps.check(l1_offset, clusters * cs, ACTIVE_L1)
                disk.file.pwrite(bytes(8 * (l1_size - old_l1_size)),
                                 l1_offset + 8 * old_l1_size)
            else:
                first = disk.refs.alloc_run(clusters)
                l1_offset = first << disk.cluster_bits
                disk.overlaps.check(l1_offset, clusters * cs)
                disk.overlaps.add(l1_offset, clusters * cs, ACTIVE_L1)
                table = be64_bytes(m.l1)
                disk.file.pwrite(table + bytes(clusters * cs - len(table)),
                                 l1_offset)
            disk.file.flush()
            # From here the driver maps through the new table, which the
            # header does not show yet: L2 tables it adds stay invisible.
            m.l1.extend([0] * (l1_size - old_l1_size))
            m.l1_offset = l1_offset
    disk.size = size
    _zero_tail(disk, old, size)
    # file.flush, not disk.flush: references dropped while zeroing may
    # still be held by the tables the header shows until it switches.
    disk.file.flush()
    disk.overlaps.check(0, S.HEADER_V2.size, MAIN_HEADER)
    disk.file.pwrite(struct.pack(">QIIQ", size, 0, l1_size, l1_offset),
                     S.HEADER_V2.offset("size"))
    disk.file.flush()
    disk.geo = dataclasses.replace(geo, size=size, l1_size=l1_size,
                                   l1_table_offset=l1_offset)
    if l1_offset != old_l1_offset:
        first = old_l1_offset >> disk.cluster_bits
        disk.overlaps.remove(old_l1_offset, old_l1_clusters * cs, ACTIVE_L1)
        with disk.lock:
            disk._drop(range(first, first + old_l1_clusters))
    disk.flush()        # releases what the old header referenced


def _refuse(disk):
    geo, path = disk.geo, disk.path
    if disk.snapshots and geo.version < 3:
        # As qemu-img: older readers of a v2 image take a snapshot's size
        # from the header, so growing would change the snapshots too.
        raise UnsupportedFeature(path, FMT, "can't resize a v2 image which "
                                 "has snapshots", "nb_snapshots")
    for snap in disk.snapshots:
        if snap.disk_size is None:
            raise UnsupportedFeature(path, FMT, f"snapshot {snap.id} does "
                                     "not record its disk size",
                                     "snapshot table")
    if geo.bitmaps and geo.autoclear_features & S.AUTOCLEAR_BITMAPS:
        # Their tables are sized for the old disk.
        raise UnsupportedFeature(path, FMT, "images with persistent "
                                 "bitmaps cannot be resized",
                                 "bitmaps extension")


def _zero_tail(disk, old, size):
    """Make [old, size) read as zeros where it would not: what the
    backing file holds there, and stale bytes in the granule that
    straddles the old end."""
    end = old
    if disk.backing is not None and disk.backing.size > old:
        end = min(size, disk.backing.size)
    g = disk.granule
    if old % g:
        part = min(size, -(-old // g) * g)
        if part > end and any(r.data for r in disk.map(part - old, old)):
            end = part
    if end > old:
        disk.zero(end - old, old, may_trim=False)
