"""Guest-to-host mapping: the L1 table, a bounded L2 cache, and decoding
L2 entries (standard and extended) into what each (sub)cluster holds.

The caller holds the disk's metadata lock.  Every L2 table is validated
as it enters the cache, so later code can trust its offsets.
"""

import array
import struct

from nbdplug.cache import Cache
from nbdplug.disk import BACKING, COMPRESSED, DATA, ZERO
from nbdplug.errors import CorruptImage
from . import structs as S
from . import overlap
from .overlap import ACTIVE_L1, ACTIVE_L2
from .tables import load_table

FMT = "qcow2"
L2_CACHE_BYTES = 32 << 20

# An entry is owned plain data when of these bits only COPIED is set.
_NOT_OWNED_PLAIN = S.QCOW_OFLAG_COPIED | S.QCOW_OFLAG_COMPRESSED | \
    S.QCOW_OFLAG_ZERO

# What a guest (sub)cluster holds, in nbdplug.disk's kinds: BACKING, ZERO
# (the host may hold a preallocation), DATA (plainly at a host offset) or
# COMPRESSED (at a host offset).


class Mapping:
    def __init__(self, file, geo, path, l1_offset, l1_size, validate=True):
        """The mapping through the L1 table at `l1_offset`; `validate`
        refuses an unaligned L1 entry now (check judges them itself)."""
        self.file = file
        self.path = path
        self.geo = geo
        self.cluster_bits = geo.cluster_bits
        self.cluster_size = geo.cluster_size
        self.extended = geo.extended_l2
        self.zero_flag = geo.version >= 3 and not self.extended
        self.l2_entries = geo.l2_entries
        self.l2_bits = geo.l2_bits
        self.l1_offset = l1_offset
        self.l1 = load_table(file, l1_offset, l1_size)
        # For each cached table, the host offset of every cluster that is
        # plain data we own (refcount one, all subclusters allocated), 0
        # elsewhere: the read fast path is one lookup in it.
        self.owned = {}                             # l2 offset -> array
        self.cache = Cache(max(4, L2_CACHE_BYTES // geo.cluster_size),
                           lambda offset, _: self.owned.pop(offset, None))
        self.bad = {}       # l2 offset -> {index: reason}, entries refused
        # Where metadata lies, for a writer (see overlap.py); empty here.
        self.overlaps = overlap.empty(geo, path)
        # Compressed descriptor split (see the spec's x).
        self.csize_shift = 62 - (geo.cluster_bits - 8)
        self.coffset_mask = (1 << self.csize_shift) - 1
        self.csize_mask = (1 << (geo.cluster_bits - 8)) - 1
        for i, entry in enumerate(self.l1 if validate else ()):
            if (entry & S.L1E_OFFSET_MASK) % geo.cluster_size:
                raise CorruptImage(path, FMT, f"L1 entry {i} is not "
                                   "cluster aligned", "L1 table")

    # --- L2 tables -------------------------------------------------------

    def l2_offset(self, l1_index):
        return self.l1[l1_index] & S.L1E_OFFSET_MASK

    def l2_shared(self, l1_index):
        """True when the L2 table may be shared (COPIED flag clear)."""
        return not self.l1[l1_index] & S.QCOW_OFLAG_COPIED

    def l2_table(self, offset):
        table = self.cache.get(offset)
        if table is not None:
            return table
        if offset + self.cluster_size > self.file.size():
            raise CorruptImage(self.path, FMT, f"L2 table at {offset:#x} "
                               "lies past the end of the file", "L1 table")
        table = load_table(self.file, offset, self.cluster_size // 8)
        bad = self._validate(table)
        if bad:
            self.bad[offset] = bad
        else:
            self.bad.pop(offset, None)
        owned = array.array("Q", bytes(8 * self.l2_entries))
        for i in range(self.l2_entries):
            if i not in bad:
                owned[i] = self._owned_host(*self._pair(table, i))
        self.owned[offset] = owned
        self.cache.put(offset, table)
        return table

    def forget(self, offset):
        """Drop a table from the cache (it moved)."""
        self.cache.pop(offset, None)
        self.owned.pop(offset, None)

    def _pair(self, table, i):
        if self.extended:
            return table[2 * i], table[2 * i + 1]
        return table[i], 0

    def _owned_host(self, entry, bitmap):
        if entry & _NOT_OWNED_PLAIN != S.QCOW_OFLAG_COPIED:
            return 0
        if self.extended and bitmap & 0xFFFFFFFF != 0xFFFFFFFF:
            return 0
        return entry & S.L2E_OFFSET_MASK

    def _validate(self, table):
        """Entries of a freshly loaded L2 table that cannot be trusted,
        as {index: reason}; using one of them is an error, the rest of
        the table stays usable."""
        size = self.file.size()
        step = 2 if self.extended else 1
        cs = self.cluster_size
        bad = {}
        for i in range(0, len(table), step):
            entry = table[i]
            if not entry and not (self.extended and table[i + 1]):
                continue
            reason = None
            if entry & S.QCOW_OFLAG_COMPRESSED:
                host, length = self.compressed_extent(entry)
                if host + length > size + 512 or host < cs:
                    reason = "compressed data lies outside the file"
                elif self.extended and table[i + 1]:
                    reason = "compressed cluster with a subcluster bitmap"
            elif entry & S.L2E_STD_RESERVED:
                reason = "reserved bits set or offset not cluster aligned"
            else:
                host = entry & S.L2E_OFFSET_MASK
                if host and host % cs:
                    reason = "offset not cluster aligned"
                elif host and host + cs > -(-size // cs) * cs:
                    reason = "data cluster lies past the end of the file"
                elif self.extended:
                    bitmap = table[i + 1]
                    if bitmap & (bitmap >> 32) & 0xFFFFFFFF:
                        reason = "subcluster both allocated and zero"
                    elif bitmap & 0xFFFFFFFF and not host:
                        reason = "allocated subclusters without a host " \
                                 "cluster"
                elif entry & S.QCOW_OFLAG_ZERO and not self.zero_flag:
                    reason = "zero flag in an image that cannot have it"
            if reason:
                bad[i // step] = reason
        return bad

    def entry(self, cluster):
        """(l2 entry, subcluster bitmap) of guest cluster `cluster`."""
        l1_index = cluster >> self.l2_bits
        offset = self.l1[l1_index] & S.L1E_OFFSET_MASK
        if not offset:
            return 0, 0
        table = self.l2_table(offset)
        i = cluster & (self.l2_entries - 1)
        if self.bad and offset in self.bad and i in self.bad[offset]:
            raise CorruptImage(self.path, FMT, f"L2 table at {offset:#x} "
                               f"entry {i}: {self.bad[offset][i]}",
                               "L2 table")
        if self.extended:
            return table[2 * i], table[2 * i + 1]
        return table[i], 0

    def set_entry(self, cluster, entry, bitmap=0):
        """Write one L2 entry through; its table must exist."""
        l1_index = cluster >> self.l2_bits
        offset = self.l1[l1_index] & S.L1E_OFFSET_MASK
        table = self.l2_table(offset)
        i = cluster & (self.l2_entries - 1)
        self.overlaps.check(offset, self.cluster_size, ACTIVE_L2)
        if self.extended:
            table[2 * i], table[2 * i + 1] = entry, bitmap
            self.file.pwrite(struct.pack(">QQ", entry, bitmap),
                             offset + 16 * i)
        else:
            table[i] = entry
            self.file.pwrite(struct.pack(">Q", entry), offset + 8 * i)
        self.owned[offset][i] = self._owned_host(entry, bitmap)

    def set_entries(self, updates):
        """Write many (cluster, entry, bitmap) updates through, one write
        per run of adjacent entries in a table."""
        size = 16 if self.extended else 8
        i = 0
        updates = sorted(updates)
        while i < len(updates):
            cluster = updates[i][0]
            offset = self.l1[cluster >> self.l2_bits] & S.L1E_OFFSET_MASK
            table = self.l2_table(offset)
            first = cluster & (self.l2_entries - 1)
            self.overlaps.check(offset, self.cluster_size, ACTIVE_L2)
            packed = bytearray()
            j = i
            while j < len(updates) and updates[j][0] == cluster + (j - i) \
                    and updates[j][0] >> self.l2_bits == \
                    cluster >> self.l2_bits:
                _, entry, bitmap = updates[j]
                k = first + (j - i)
                if self.extended:
                    table[2 * k], table[2 * k + 1] = entry, bitmap
                    packed += struct.pack(">QQ", entry, bitmap)
                else:
                    table[k] = entry
                    packed += struct.pack(">Q", entry)
                self.owned[offset][k] = self._owned_host(entry, bitmap)
                j += 1
            self.file.pwrite(packed, offset + size * first)
            i = j

    def set_l1(self, l1_index, entry):
        """Write one L1 entry through; the overlap map follows the L2
        table it leaves and the one it points at."""
        self.overlaps.check(self.l1_offset + 8 * l1_index, 8, ACTIVE_L1)
        old = self.l1[l1_index] & S.L1E_OFFSET_MASK
        self.l1[l1_index] = entry
        self.file.pwrite(struct.pack(">Q", entry),
                         self.l1_offset + 8 * l1_index)
        new = entry & S.L1E_OFFSET_MASK
        if new:
            self.overlaps.add(new, self.cluster_size, ACTIVE_L2)
        if old and old != new and old not in self.l1 and \
                old | S.QCOW_OFLAG_COPIED not in self.l1:
            self.overlaps.remove(old, self.cluster_size, ACTIVE_L2)

    # --- decoding --------------------------------------------------------

    def compressed_extent(self, entry):
        """(host offset, byte length) of a compressed cluster's data."""
        host = entry & self.coffset_mask
        sectors = (entry >> self.csize_shift) & self.csize_mask
        return host, (sectors + 1) * 512 - (host & 511)

    def kinds(self, entry, bitmap):
        """What each granule of a cluster holds: a list of (kind, host
        offset of the granule) — one granule per cluster, or 32 per
        cluster with extended L2 entries."""
        if entry & S.QCOW_OFLAG_COMPRESSED:
            return [(COMPRESSED, entry)] * (32 if self.extended else 1)
        host = entry & S.L2E_OFFSET_MASK
        if not self.extended:
            if entry & S.QCOW_OFLAG_ZERO:
                return [(ZERO, host)]
            return [(DATA, host)] if host else [(BACKING, 0)]
        sub = self.cluster_size // S.SUBCLUSTERS
        out = []
        for sc in range(S.SUBCLUSTERS):
            if bitmap >> sc & 1:
                out.append((DATA, host + sc * sub))
            elif bitmap >> (32 + sc) & 1:
                out.append((ZERO, 0))
            else:
                out.append((BACKING, 0))
        return out
