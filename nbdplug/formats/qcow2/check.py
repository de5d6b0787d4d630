"""`nbdplug check` for qcow2: recount every reference and compare.

It counts as qemu-img check counts, so the two agree: one leak per
cluster whose stored refcount exceeds its references, one corruption per
cluster whose refcount is too low, per misaligned or out-of-file table
entry, and per COPIED flag that disagrees with a refcount of one.
Repair ('leaks' or 'all') writes corrected refcounts (and, for 'all',
COPIED flags) through the same refcount code the driver uses.
"""

import array
import struct

from nbdplug.report import CheckReport
from nbdplug.errors import ImageError
from . import bitmaps, structs as S
from .header import read_header
from .mapping import Mapping
from .refcount import Refcounts, load_table
from .snapshot import read_snapshots

FMT = "qcow2"


class _Counter:
    """References found, per host cluster, bounded by the file size."""

    def __init__(self, geo, file_size, report):
        self.cb = geo.cluster_bits
        self.n = -(-file_size // geo.cluster_size)
        self.refs = array.array("I", bytes(4 * self.n))
        self.report = report

    def add(self, offset, length, what):
        if length <= 0:
            return
        first = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        if last >= self.n:
            self.report.corrupt(f"{what} at offset {offset:#x} lies "
                                "beyond the end of the image")
            return
        for c in range(first, last + 1):
            if self.refs[c] == 0xFFFFFFFF:
                self.report.corrupt(f"too many references to cluster {c}")
                continue
            self.refs[c] += 1


def check(path, ctx, repair=None):
    file = ctx.open_file(path, readonly=repair is None)
    try:
        geo = read_header(file, path)
        report = _check(file, geo, path, repair)
        if repair and (report.leaks_fixed or report.corruptions_fixed):
            fixed = (report.leaks_fixed, report.corruptions_fixed)
            report = _check(file, read_header(file, path), path, None)
            report.leaks_fixed, report.corruptions_fixed = fixed
        return report
    finally:
        file.close()


def _check(file, geo, path, repair):
    report = CheckReport(filename=path, format=FMT)
    cs = geo.cluster_size
    file_size = file.size()
    counter = _Counter(geo, file_size, report)
    counter.add(0, cs, "header")
    snapshots, snap_len = read_snapshots(file, geo, path)
    if snap_len:
        counter.add(geo.snapshots_offset, snap_len, "snapshot table")

    active = Mapping(file, geo, path, geo.l1_table_offset, geo.l1_size)
    stats = {"allocated": 0, "compressed": 0, "fragmented": 0}
    _count_l1(active, geo, counter, report, stats, file_size)
    for snap in snapshots:
        m = Mapping(file, geo, path, snap.l1_table_offset, snap.l1_size)
        _count_l1(m, geo, counter, report, None, file_size)

    for offset, length, what in bitmaps.references(
            file, geo, bitmaps.read_bitmaps(file, geo, path)):
        counter.add(offset, length, what)

    refs = Refcounts(file, geo, path)
    counter.add(geo.refcount_table_offset, geo.refcount_table_clusters * cs,
                "refcount table")
    for i, entry in enumerate(refs.table):
        offset = entry & S.REFT_OFFSET_MASK
        if not offset:
            continue
        if offset % cs:
            report.corrupt(f"refcount block {i} is not cluster aligned")
            refs.table[i] = 0
        elif offset + cs > file_size:
            report.corrupt(f"refcount block {i} is outside image")
            refs.table[i] = 0
        else:
            counter.add(offset, cs, "refcount block")

    # Compare stored refcounts with the references counted.
    highest = 0
    # Like qemu-img, compare over the clusters the file holds.
    for c in range(counter.n):
        stored = _stored(refs, c)
        found = counter.refs[c]
        if found or stored:
            highest = c
        if stored == found:
            continue
        if stored > found:
            report.leak(f"cluster {c} refcount={stored} reference={found}")
            if repair in ("leaks", "all"):
                refs.set(c, found)
                report.leaks_fixed += 1
        else:
            report.corrupt(f"cluster {c} refcount={stored} "
                           f"reference={found}")
            if repair == "all":
                refs.set(c, min(found, refs.max))
                report.corruptions_fixed += 1
    _check_copied(active, refs, report, repair)
    if repair:
        file.flush()
        if geo.incompatible_features & S.INCOMPAT_DIRTY and repair == "all":
            pos = S.HEADER_V3.offset("incompatible_features")
            file.pwrite(struct.pack(">Q", geo.incompatible_features &
                                    ~S.INCOMPAT_DIRTY), pos)
            file.flush()
    if repair is None:
        report.leaks_fixed = report.corruptions_fixed = 0
    report.image_end_offset = (highest + 1) * cs
    report.total_clusters = -(-geo.size // cs)
    report.allocated_clusters = stats["allocated"]
    report.compressed_clusters = stats["compressed"]
    report.fragmented_clusters = stats["fragmented"]
    return report


def _stored(refs, c):
    try:
        return refs.get(c)
    except ImageError:
        return 0


def _count_l1(mapping, geo, counter, report, stats, file_size):
    cs = geo.cluster_size
    counter.add(mapping.l1_offset, len(mapping.l1) * 8, "L1 table")
    last_host = None
    for i, l1e in enumerate(mapping.l1):
        offset = l1e & S.L1E_OFFSET_MASK
        if not offset:
            continue
        if offset % cs:
            report.corrupt(f"L2 table at {offset:#x} (L1 index {i}) is not "
                           "cluster aligned")
            continue
        counter.add(offset, cs, "L2 table")
        if offset + cs > file_size:
            report.check_errors += 1
            continue
        table = load_table(mapping.file, offset, cs // 8)
        step = geo.l2_entry_size // 8
        for j in range(0, len(table), step):
            entry = table[j]
            if entry & S.QCOW_OFLAG_COMPRESSED:
                host, length = mapping.compressed_extent(entry)
                counter.add(host, length, "compressed cluster")
                if stats is not None:
                    stats["allocated"] += 1
                    stats["compressed"] += 1
                continue
            host = entry & S.L2E_OFFSET_MASK
            if not host:
                continue
            if host % cs:
                # Still counted over the clusters it spans, as qemu does.
                report.corrupt(f"data cluster at {host:#x} is not properly "
                               "aligned; L2 entry corrupted")
            counter.add(host, cs, "data cluster")
            if stats is not None:
                stats["allocated"] += 1
                if last_host is not None and host != last_host + cs:
                    stats["fragmented"] += 1
                last_host = host


def _check_copied(mapping, refs, report, repair):
    """COPIED must be set exactly where the refcount is one (active
    tables only)."""
    for i, l1e in enumerate(mapping.l1):
        offset = l1e & S.L1E_OFFSET_MASK
        if not offset or offset % mapping.cluster_size:
            continue
        one = _stored(refs, offset >> mapping.cluster_bits) == 1
        if one != bool(l1e & S.QCOW_OFLAG_COPIED):
            report.corrupt(f"OFLAG_COPIED L2 cluster: l1_index={i} "
                           f"l1_entry={l1e:#x}")
            if repair == "all":
                mapping.set_l1(i, l1e ^ S.QCOW_OFLAG_COPIED)
                report.corruptions_fixed += 1
        if offset + mapping.cluster_size > mapping.file.size():
            continue
        table = load_table(mapping.file, offset, mapping.cluster_size // 8)
        step = 2 if mapping.extended else 1
        for j in range(0, len(table), step):
            entry = table[j]
            host = entry & S.L2E_OFFSET_MASK
            if entry & S.QCOW_OFLAG_COMPRESSED or not host or \
                    host % mapping.cluster_size:
                continue
            one = _stored(refs, host >> mapping.cluster_bits) == 1
            if one != bool(entry & S.QCOW_OFLAG_COPIED):
                report.corrupt(f"OFLAG_COPIED data cluster: "
                               f"l2_entry={entry:#x}")
                if repair == "all":
                    fixed = entry ^ S.QCOW_OFLAG_COPIED
                    mapping.file.pwrite(struct.pack(">Q", fixed),
                                        offset + 8 * j)
                    report.corruptions_fixed += 1
