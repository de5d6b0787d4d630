"""qcow2 reference counts: reading, updating, allocating clusters, and
growing the refcount structures.

The caller holds the disk's metadata lock around every call.  Updates are
written through to the file at once; callers flush before anything
references a newly counted cluster (data before metadata, refcount before
reference).
"""

import array
import struct

from nbdplug.cache import Cache
from nbdplug.errors import CorruptImage, UnsupportedFeature
from nbdplug.layout import be64_bytes
from . import structs as S
from .tables import load_table
from . import overlap
from .overlap import MAIN_HEADER, REFCOUNT_BLOCK, REFCOUNT_TABLE

FMT = "qcow2"
BLOCK_CACHE = 64                # refcount blocks kept in memory


class Refcounts:
    def __init__(self, file, geo, path):
        self.file = file
        self.path = path
        self.cluster_bits = geo.cluster_bits
        self.cluster_size = geo.cluster_size
        self.bits = geo.refcount_bits
        self.max = (1 << self.bits) - 1
        self.per_block = geo.refcount_block_entries
        self.table_offset = geo.refcount_table_offset
        self.table = load_table(file, self.table_offset,
                                geo.refcount_table_clusters *
                                self.cluster_size // 8)
        self.blocks = Cache(BLOCK_CACHE)            # offset -> bytearray
        self.end = -(-file.size() // self.cluster_size)
        self.free_hint = 0
        # Where metadata lies, for a writer (see overlap.py); empty here.
        self.overlaps = overlap.empty(geo, path)

    def validate(self):
        """Every refcount block a writer may touch is aligned and inside
        the file (a writer must not trust a hostile table)."""
        size = self.file.size()
        for index in range(len(self.table)):
            offset = self._block_offset(index)
            if offset and offset + self.cluster_size > size:
                raise CorruptImage(self.path, FMT, f"refcount block {index} "
                                   "lies past the end of the file",
                                   "refcount table")

    # --- reading ---------------------------------------------------------

    def _block_offset(self, index):
        """Host offset of refcount block `index`, 0 if not allocated."""
        if index >= len(self.table):
            return 0
        entry = self.table[index]
        if entry & S.REFT_RESERVED:
            raise CorruptImage(self.path, FMT, f"refcount table entry "
                               f"{index} has reserved bits set",
                               "refcount table")
        offset = entry & S.REFT_OFFSET_MASK
        if offset % self.cluster_size:
            raise CorruptImage(self.path, FMT, f"refcount block {index} is "
                               "not cluster aligned", "refcount table")
        return offset

    def _block(self, offset):
        block = self.blocks.get(offset)
        if block is not None:
            return block
        if offset + self.cluster_size > self.file.size():
            raise CorruptImage(self.path, FMT, f"refcount block at "
                               f"{offset:#x} lies past the end of the file",
                               "refcount table")
        block = self.file.read(self.cluster_size, offset)
        self.blocks.put(offset, block)
        return block

    def get(self, cluster):
        offset = self._block_offset(cluster // self.per_block)
        if not offset:
            return 0
        return self._read_entry(self._block(offset),
                                cluster % self.per_block)

    def _read_entry(self, block, i):
        bits = self.bits
        if bits >= 8:
            width = bits // 8
            return int.from_bytes(block[i * width:(i + 1) * width], "big")
        pos = i * bits
        return (block[pos // 8] >> (pos % 8)) & self.max

    # --- updating --------------------------------------------------------

    def set(self, cluster, value):
        """Write one refcount through to the file."""
        self.set_range(cluster, 1, value)

    def set_range(self, first, n, value):
        """Set the refcounts of clusters [first, first + n) to `value`,
        one write per refcount block touched."""
        if not 0 <= value <= self.max:
            raise UnsupportedFeature(self.path, FMT, f"refcount {value} of "
                                     f"cluster {first} exceeds "
                                     f"{self.bits}-bit refcounts",
                                     "refcount_order")
        bits = self.bits
        c, end = first, first + n
        while c < end:
            index = c // self.per_block
            offset = self._block_offset(index)
            if not offset:
                offset = self._new_block(index)
            block = self._block(offset)
            i0 = c % self.per_block
            i1 = min(self.per_block, i0 + end - c)
            if bits >= 8:
                width = bits // 8
                one = value.to_bytes(width, "big")
                block[i0 * width:i1 * width] = one * (i1 - i0)
                lo, hi = i0 * width, i1 * width
            else:
                for i in range(i0, i1):
                    pos, shift = (i * bits) // 8, (i * bits) % 8
                    block[pos] = (block[pos] & ~(self.max << shift) &
                                  0xFF) | (value << shift)
                lo, hi = (i0 * bits) // 8, ((i1 * bits) - 1) // 8 + 1
            self.overlaps.check(offset, self.cluster_size, REFCOUNT_BLOCK)
            self.file.pwrite(block[lo:hi], offset + lo)
            c += i1 - i0

    def add(self, cluster, delta):
        self.set(cluster, self.get(cluster) + delta)
        if delta < 0 and cluster < self.free_hint and not self.get(cluster):
            self.free_hint = cluster

    def _new_block(self, index, table=None):
        """Allocate refcount block `index` at the end of the file.  Its
        own refcount lives in itself when it falls in the range it
        describes, else in the block of the range it falls in (made first
        if missing).  Content and refcount are durable before the table
        entry points at the block."""
        if table is None:
            if index >= len(self.table):
                self._grow_table(index + 1)     # moves self.end
                if self.table[index]:           # growth made it already
                    return self.table[index] & S.REFT_OFFSET_MASK
            table = self.table
        while True:
            where = self.end
            home = where // self.per_block
            if home == index or (home < len(table) and table[home]):
                break
            self._new_block(home, None if table is self.table else table)
        offset = where << self.cluster_bits
        self.overlaps.check(offset, self.cluster_size)
        self.overlaps.add(offset, self.cluster_size, REFCOUNT_BLOCK)
        block = bytearray(self.cluster_size)
        self.blocks.put(offset, block)
        self.end = where + 1
        if home == index:
            self._put(block, where - index * self.per_block, 1)
            self.file.pwrite(block, offset)
        else:
            self.file.pwrite(block, offset)
            self._set_in(table, where, 1)
        self.file.flush()
        table[index] = offset
        if table is self.table:
            self.overlaps.check(self.table_offset + index * 8, 8,
                                REFCOUNT_TABLE)
            self.file.pwrite(struct.pack(">Q", offset),
                             self.table_offset + index * 8)
        return offset

    def _put(self, block, i, value):
        """Store entry `i` of a refcount block in memory."""
        if self.bits >= 8:
            width = self.bits // 8
            block[i * width:(i + 1) * width] = value.to_bytes(width, "big")
        else:
            pos, shift = (i * self.bits) // 8, (i * self.bits) % 8
            block[pos] = (block[pos] & ~(self.max << shift) & 0xFF) | \
                (value << shift)

    def _grow_table(self, min_entries):
        """Move the refcount table to a bigger place at the end of the
        file: new blocks and the new table first, durable; then the header
        points at it; then the old table's clusters are freed."""
        per_cluster = self.cluster_size // 8
        entries = max(min_entries, 2 * len(self.table))
        table = array.array("Q", self.table)
        while True:
            entries = -(-entries // per_cluster) * per_cluster
            if entries * 8 > S.MAX_REFTABLE_BYTES:
                raise UnsupportedFeature(self.path, FMT, "refcount table "
                                         "would exceed its size limit",
                                         "refcount_table_clusters")
            table.extend([0] * (entries - len(table)))
            clusters = entries // per_cluster
            start = self.end
            last = (start + clusters) // self.per_block
            if last >= entries:         # must also cover its own place
                entries = last + 1
                continue
            missing = [i for i in range(start // self.per_block, last + 1)
                       if not table[i]]
            if not missing:
                break
            self._new_block(missing[0], table)
        old_offset, old_clusters = self.table_offset, \
            len(self.table) // per_cluster
        self.end = start + clusters
        self._set_in(table, start, 1, clusters)
        new_offset = start << self.cluster_bits
        self.overlaps.check(new_offset, clusters * self.cluster_size)
        self.file.pwrite(be64_bytes(table), new_offset)
        self.file.flush()
        pos = S.HEADER_V2.offset("refcount_table_offset")
        self.overlaps.check(pos, 12, MAIN_HEADER)
        self.file.pwrite(struct.pack(">QI", new_offset, clusters), pos)
        self.file.flush()
        self.table, self.table_offset = table, new_offset
        self.overlaps.remove(old_offset, old_clusters * self.cluster_size,
                             REFCOUNT_TABLE)
        self.overlaps.add(new_offset, clusters * self.cluster_size,
                          REFCOUNT_TABLE)
        for c in range(old_offset >> self.cluster_bits,
                       (old_offset >> self.cluster_bits) + old_clusters):
            self.add(c, -1)

    def _set_in(self, table, first, value, n=1):
        """set_range() against `table` (a refcount table being built)."""
        saved, self.table = self.table, table
        try:
            self.set_range(first, n, value)
        finally:
            self.table = saved

    # --- allocation ------------------------------------------------------

    def alloc(self):
        """Allocate one free cluster (refcount 1, written, not flushed)."""
        return self.alloc_many(1)[0]

    def alloc_many(self, n):
        """Allocate `n` free clusters, contiguous where the free space
        allows; return their indexes in ascending order."""
        out = []
        c = self.free_hint
        while len(out) < n and c < self.end:
            index = c // self.per_block
            if not self._block_offset(index):
                # A range with no block below the end is not reused.
                c = (index + 1) * self.per_block
                continue
            if not self.get(c):
                out.append(c)
            c += 1
        self.free_hint = c
        c = max(c, self.end)
        while len(out) < n:
            index = c // self.per_block
            if not self._block_offset(index):
                self.end = max(self.end, c)
                self._new_block(index)              # lands at self.end
                c = max(c, self.end)
                continue
            if not self.get(c):                     # skip a leak past EOF
                out.append(c)
                self.end = c + 1
            c += 1
        self.free_hint = max(self.free_hint, c)    # all taken below c
        start = 0
        while start < len(out):                     # one write per run
            stop = start + 1
            while stop < len(out) and out[stop] == out[stop - 1] + 1:
                stop += 1
            self.set_range(out[start], stop - start, 1)
            start = stop
        return out

    def alloc_run(self, n):
        """`n` adjacent new clusters past the allocated end (refcount 1,
        written, not flushed), for a table that must be contiguous;
        returns the first.  Refcount blocks they need land after them."""
        first = self.end
        while True:
            used = [c for c in range(first, first + n) if self.get(c)]
            if not used:
                break
            first = used[-1] + 1    # a leak past the end: step over it
        self.end = first + n
        self.set_range(first, n, 1)
        return first

    def claim(self, cluster):
        """Take `cluster` (refcount 1) if it is free; False if not."""
        index = cluster // self.per_block
        if not self._block_offset(index):
            if cluster < self.end:
                return False
            self.end = cluster
            self._new_block(index)  # lands on `cluster` itself
        if self.get(cluster):
            return False
        self.set(cluster, 1)
        self.end = max(self.end, cluster + 1)
        return True
