"""`nbdplug check` for qcow2: recount every reference and compare.

It judges as qemu-img check does (qemu's qcow2_check_refcounts), so the
two agree on what is corrupt: every table entry is looked at (reserved
bits, alignment, subcluster bitmaps, compressed clusters marked COPIED),
every cluster referenced is counted, a reference one cluster or more
past the end of the file is a corruption, each refcount block must be
referenced once, stored refcounts are compared with the references
counted (too low: a corruption; too high: a leak) and COPIED must be set
exactly where an active table's refcount is one.  Tables read past the
end of the file read as zeros, as qemu reads them.

Repair ('leaks' or 'all') writes corrected refcounts (and, for 'all',
COPIED flags) through the same refcount code the driver uses; damage
only rebuilding the refcount structures would mend is left, reported.
"""

import array
import collections
import struct

from nbdplug.errors import ImageError
from nbdplug.report import CheckReport
from . import bitmaps, structs as S
from .header import read_header
from .mapping import Mapping
from .refcount import Refcounts
from .tables import MAX_READABLE, load_table, read_at
from .snapshot import read_snapshots

FMT = "qcow2"
# Clusters of file a check counts references for: 4 bytes each, so a
# hostile sparse file cannot make the count take more than 1 GiB.
MAX_CHECKED_CLUSTERS = 1 << 28


class _Counter:
    """References found, per host cluster of the file (and up to one
    cluster past its end, which qemu allows for a partly written last
    cluster)."""

    def __init__(self, geo, file_size, report):
        self.cb = geo.cluster_bits
        self.cs = geo.cluster_size
        # qemu takes the file's length in whole sectors
        self.file_size = file_size = -(-file_size // 512) * 512
        self.refs = array.array("I", bytes(4 * -(-file_size // self.cs)))
        self.report = report

    def add(self, offset, length):
        if length <= 0:
            return
        if offset + length - self.file_size >= self.cs:
            self.report.corrupt(f"counting reference for region exceeding "
                                f"the end of the file by one cluster or "
                                f"more: offset {offset:#x} size {length:#x}")
            return
        first, last = offset >> self.cb, (offset + length - 1) >> self.cb
        if last >= len(self.refs):
            self.refs.extend([0] * (last + 1 - len(self.refs)))
        for c in range(first, last + 1):
            if self.refs[c] == 0xFFFFFFFF:
                self.report.corrupt(f"overflow cluster offset="
                                    f"{c << self.cb:#x}")
                continue
            self.refs[c] += 1


def check(path, ctx, repair=None):
    file = ctx.open_file(path, readonly=repair is None)
    try:
        geo = read_header(file, path, check=True)
        report = _check(file, geo, path, repair)
        if repair and (report.leaks_fixed or report.corruptions_fixed):
            fixed = (report.leaks_fixed, report.corruptions_fixed)
            report = _check(file, read_header(file, path, check=True), path,
                            None)
            report.leaks_fixed, report.corruptions_fixed = fixed
        return report
    finally:
        file.close()


def _check(file, geo, path, repair):
    report = CheckReport(filename=path, format=FMT)
    cs = geo.cluster_size
    file_size = file.size()
    report.total_clusters = -(-geo.size // cs)
    if -(-file_size // cs) > MAX_CHECKED_CLUSTERS:
        report.check_errors += 1
        report.messages.append(f"ERROR the file holds more than "
                               f"{MAX_CHECKED_CLUSTERS} clusters to count")
        return report
    snapshots, snap_len = read_snapshots(file, geo, path)
    counter = _Counter(geo, file_size, report)
    stats = {"allocated": 0, "compressed": 0, "fragmented": 0}

    if geo.version >= 3:
        for n, snap in enumerate(snapshots):
            if snap.extra_data_size < S.SNAPSHOT_EXTRA.offset("icount"):
                report.corrupt(f"snapshot table entry {n} is incomplete")
    counter.add(0, cs)
    active = Mapping(file, geo, path, geo.l1_table_offset, geo.l1_size,
                     validate=False)
    _check_l1(active, counter, report, stats)
    for snap in snapshots:
        where = f"snapshot {snap.id} ({snap.name})"
        if snap.l1_table_offset % cs:
            report.corrupt(f"{where} l1_offset={snap.l1_table_offset:#x}: "
                           "L1 table is not cluster aligned; snapshot table "
                           "entry corrupted")
            continue
        if snap.l1_size * 8 > S.MAX_L1_BYTES:
            report.corrupt(f"{where} l1_size={snap.l1_size:#x}: L1 table is "
                           "too large; snapshot table entry corrupted")
            continue
        if not snap.l1_size:
            continue
        if snap.l1_table_offset + snap.l1_size * 8 > MAX_READABLE:
            report.check_errors += 1
            report.messages.append(f"ERROR {where}: its L1 table cannot be "
                                   "read")
            continue
        _check_l1(Mapping(file, geo, path, snap.l1_table_offset,
                          snap.l1_size, validate=False),
                  counter, report, None)
    counter.add(geo.snapshots_offset, snap_len)
    counter.add(geo.refcount_table_offset, geo.refcount_table_clusters * cs)
    for offset, length, _ in bitmaps.references(
            file, geo, bitmaps.read_bitmaps(file, geo, path)):
        counter.add(offset, length)

    refs = Refcounts(file, geo, path)
    rebuild = _check_refblocks(refs, counter, report)
    highest = _compare(refs, counter, report, None if rebuild else repair)
    _check_copied(active, refs, report, repair)
    if rebuild and repair:
        report.check_errors += 1
        report.messages.append("ERROR the refcount structures need "
                               "rebuilding, which nbdplug does not do")
    if repair:
        file.flush()
        if geo.incompatible_features & S.INCOMPAT_DIRTY and repair == "all" \
                and not rebuild:
            pos = S.HEADER_V3.offset("incompatible_features")
            file.pwrite(struct.pack(">Q", geo.incompatible_features &
                                    ~S.INCOMPAT_DIRTY), pos)
            file.flush()
    else:
        report.leaks_fixed = report.corruptions_fixed = 0
    report.image_end_offset = (highest + 1) * cs
    report.allocated_clusters = stats["allocated"]
    report.compressed_clusters = stats["compressed"]
    report.fragmented_clusters = stats["fragmented"]
    return report


def _check_l1(mapping, counter, report, stats):
    """Count an L1 table, its L2 tables and what they reference
    (`stats`, for the active table only, gathers qemu's figures)."""
    cs = mapping.cluster_size
    if not mapping.l1:
        return
    counter.add(mapping.l1_offset, len(mapping.l1) * 8)
    # A table several entries point at is read once, what it holds
    # counted for each (a hostile L1 can repeat one offset millions of
    # times); one wholly past the end of the file reads as zeros.
    repeated = {offset for offset, n in collections.Counter(
        e & S.L1E_OFFSET_MASK for e in mapping.l1 if e).items() if n > 1}
    seen = {}
    for l1e in mapping.l1:
        if not l1e:
            continue
        if l1e & S.L1E_RESERVED:
            report.corrupt(f"found L1 entry with reserved bits set: "
                           f"{l1e:x}")
        offset = l1e & S.L1E_OFFSET_MASK
        counter.add(offset, cs)
        if offset % cs:
            report.corrupt(f"l2_offset={offset:x}: Table is not cluster "
                           "aligned; L1 entry corrupted")
        if offset >= counter.file_size:
            continue
        if offset in repeated:
            if offset not in seen:
                seen[offset] = _Found()
                _check_l2(mapping, offset, seen[offset], seen[offset],
                          seen[offset].stats)
            seen[offset].count(counter, report, stats)
            continue
        _check_l2(mapping, offset, counter, report, stats)


class _Found:
    """What one L2 table references and what is wrong with it, to count
    again for every entry that points at it."""

    def __init__(self):
        self.adds, self.errors = [], []
        self.stats = {"allocated": 0, "compressed": 0, "fragmented": 0}

    def add(self, offset, length):
        self.adds.append((offset, length))

    def corrupt(self, message):
        self.errors.append(message)

    def count(self, counter, report, stats):
        for offset, length in self.adds:
            counter.add(offset, length)
        for message in self.errors:
            report.corrupt(message)
        if stats is not None:
            for key, n in self.stats.items():
                stats[key] += n


def _check_l2(mapping, l2_offset, counter, report, stats):
    cs = mapping.cluster_size
    table = load_table(mapping.file, l2_offset, cs // 8)
    step = 2 if mapping.extended else 1
    next_host = None
    for j in range(0, len(table), step):
        entry = table[j]
        bitmap = table[j + 1] if mapping.extended else 0
        if entry & S.QCOW_OFLAG_COMPRESSED:
            if entry & S.QCOW_OFLAG_COPIED:
                report.corrupt(f"coffset={entry & mapping.coffset_mask:#x}: "
                               "copied flag must never be set for "
                               "compressed clusters")
            if bitmap:
                report.corrupt(f"compressed cluster {j // step} with "
                               "non-zero subcluster allocation bitmap, "
                               f"entry={entry:#x}")
                continue
            counter.add(*mapping.compressed_extent(entry))
            if stats is not None:
                stats["allocated"] += 1
                stats["compressed"] += 1
                stats["fragmented"] += 1
            continue
        if entry & S.L2E_STD_RESERVED:
            report.corrupt(f"found l2 entry with reserved bits set: "
                           f"{entry:x}")
        host = entry & S.L2E_OFFSET_MASK
        if not host:
            if bitmap & 0xFFFFFFFF:
                report.corrupt("Unallocated cluster has non-zero "
                               "subcluster allocation map")
            continue
        if (bitmap >> 32) & bitmap:
            report.corrupt(f"offset={host:x}: Allocated cluster has "
                           "corrupted subcluster allocation bitmap")
        if host % cs:
            data = bitmap & 0xFFFFFFFF if mapping.extended else \
                not entry & S.QCOW_OFLAG_ZERO
            kind = "Data" if data else "Preallocated"
            report.corrupt(f"offset={host:x}: {kind} cluster is not "
                           "properly aligned; L2 entry corrupted.")
        if stats is not None:
            stats["allocated"] += 1
            if next_host is not None and host != next_host:
                stats["fragmented"] += 1
            next_host = host + cs
        counter.add(host, cs)


def _check_refblocks(refs, counter, report):
    """Count each refcount block; True when the refcount structures
    themselves are damaged (qemu would rebuild them)."""
    cs = refs.cluster_size
    rebuild = False
    for i, entry in enumerate(refs.table):
        offset = entry & S.REFT_OFFSET_MASK
        if entry & S.REFT_RESERVED:
            report.corrupt(f"refcount table entry {i} has reserved bits set")
            rebuild = True
        elif offset % cs:
            report.corrupt(f"refcount block {i} is not cluster aligned; "
                           "refcount table entry corrupted")
            rebuild = True
        elif offset >> refs.cluster_bits >= len(counter.refs):
            report.corrupt(f"refcount block {i} is outside image")
        elif offset:
            counter.add(offset, cs)
            found = counter.refs[offset >> refs.cluster_bits]
            if found != 1:
                report.corrupt(f"refcount block {i} refcount={found}")
                rebuild = True
    return rebuild


def _stored(refs, c):
    """Cluster `c`'s refcount as stored (None where it cannot be read:
    an unaligned refcount block); blocks past the end read as zeros."""
    index = c // refs.per_block
    if index >= len(refs.table):
        return 0
    offset = refs.table[index] & S.REFT_OFFSET_MASK
    if not offset:
        return 0
    if offset % refs.cluster_size or offset + refs.cluster_size > \
            MAX_READABLE:
        return None
    block = refs.blocks.get(offset)
    if block is None:
        block = read_at(refs.file, refs.cluster_size, offset)
        refs.blocks.put(offset, block)
    return refs._read_entry(block, c % refs.per_block)


def _compare(refs, counter, report, repair):
    """Stored refcounts against the references counted; returns the
    highest cluster in use.  Repairs what `repair` allows."""
    highest = 0
    for c in range(len(counter.refs)):
        stored = _stored(refs, c)
        found = counter.refs[c]
        if stored is None:
            report.check_errors += 1
            report.messages.append(f"Can't get refcount for cluster {c}: "
                                   "its refcount block cannot be read")
            continue
        if found or stored:
            highest = c
        if stored == found:
            continue
        fix = (repair in ("leaks", "all") and stored > found) or \
            (repair == "all" and stored < found)
        what = "Repairing" if fix else "ERROR" if stored < found \
            else "Leaked"
        report.messages.append(f"{what} cluster {c} refcount={stored} "
                               f"reference={found}")
        if fix:
            try:
                refs.set(c, min(found, refs.max))
            except ImageError:
                fix = False
        if fix and stored > found:
            report.leaks_fixed += 1
        elif fix:
            report.corruptions_fixed += 1
        elif stored < found:
            report.corruptions += 1
        else:
            report.leaks += 1
    return highest


def _check_copied(mapping, refs, report, repair):
    """COPIED must be set exactly where the refcount is one (active
    tables only); refcounts that cannot be read are passed over."""
    for i, l1e in enumerate(mapping.l1):
        offset = l1e & S.L1E_OFFSET_MASK
        if not offset:
            continue
        count = _stored(refs, offset >> mapping.cluster_bits)
        if count is not None and (count == 1) != bool(
                l1e & S.QCOW_OFLAG_COPIED):
            report.corrupt(f"OFLAG_COPIED L2 cluster: l1_index={i} "
                           f"l1_entry={l1e:x} refcount={count}")
            if repair == "all":
                mapping.set_l1(i, l1e ^ S.QCOW_OFLAG_COPIED)
                report.corruptions_fixed += 1
        table = load_table(mapping.file, offset, mapping.cluster_size // 8)
        step = 2 if mapping.extended else 1
        for j in range(0, len(table), step):
            entry = table[j]
            host = entry & S.L2E_OFFSET_MASK
            if entry & S.QCOW_OFLAG_COMPRESSED or not host:
                continue
            count = _stored(refs, host >> mapping.cluster_bits)
            if count is None or (count == 1) == bool(
                    entry & S.QCOW_OFLAG_COPIED):
                continue
            report.corrupt(f"OFLAG_COPIED data cluster: l2_entry={entry:x} "
                           f"refcount={count}")
            if repair == "all":
                fixed = entry ^ S.QCOW_OFLAG_COPIED
                mapping.file.pwrite(struct.pack(">Q", fixed),
                                    offset + 8 * j)
                report.corruptions_fixed += 1
