"""qcow: QEMU's original copy-on-write format (version 1), read and write.

Reference: the QCowHeader and the mapping described in qemu's
block/qcow.c.  A 48-byte big-endian header; the backing file name; the L1
table, one offset of an L2 table per 2^(cluster_bits + l2_bits) guest
bytes; L2 tables of 2^l2_bits entries, each the host offset of a data
cluster or, with bit 63 set, of a compressed cluster (raw deflate) whose
byte length sits in the bits just below bit 63.  There are no reference
counts: a cluster belongs to the one entry that points at it, and space
nothing points at is a leak.

Writes never move anything already written: new data clusters and L2
tables are appended at the end of the file and made durable before the
L2 or L1 entry that points at them is written, so a crash leaves at worst
a leaked cluster.  Trim unmaps whole clusters and punches their space;
zero punches plain clusters in place.  AES-encrypted images are refused.
"""

import array
import contextlib
import dataclasses
import os
import threading
import zlib

from nbdplug.report import CheckReport
from nbdplug import options
from nbdplug.cache import Cache
from nbdplug.disk import (BACKING, COMPRESSED, DATA, Disk, FormatSpec, Run,
                          add_run)
from nbdplug.errors import CorruptImage, UnsupportedFeature, UsageError
from nbdplug.formats.overlap import Overlaps
from nbdplug.hostfile import HostFile, beyond_qemu_reach
from nbdplug.layout import Layout, be64_array, be64_bytes

FORMAT = "qcow"

HEADER = Layout(">", "qcow header",
                "magic:I version:I backing_file_offset:Q "
                "backing_file_size:I mtime:I size:Q cluster_bits:B "
                "l2_bits:B padding:H crypt_method:I l1_table_offset:Q")

QCOW_MAGIC = 0x514649FB             # "QFI\xfb"
QCOW_VERSION = 1
QCOW_CRYPT_NONE = 0
QCOW_CRYPT_AES = 1
QCOW_OFLAG_COMPRESSED = 1 << 63

# qemu's limits: clusters and L2 tables of 512 bytes to 64 KiB, backing
# names under 1 KiB.
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 16
MIN_L2_BITS, MAX_L2_BITS = 6, 13
MAX_BACKING_NAME = 1023
# The L1 table is held in memory: 32 MiB of it maps 8 TiB with 4 KiB
# clusters, and far more with larger ones.
MAX_L1_BYTES = 32 << 20
# L2 tables kept in memory (each is at most 64 KiB).
L2_CACHE_BYTES = 8 << 20

# Where a reader takes the end of the file to be: what lies past the real
# end reads as zeros (HostFile.pread), as qemu reads it.
READER_LIMIT = 1 << 62

# What a writer guards (nbdplug/formats/overlap.py): the L2 tables, by
# sector, since qcow does not require them to be cluster aligned.  The
# header, backing name and L1 table need no guard: no entry may point
# below their end, and new clusters go past the end of the file.
L2_TABLE = 1
GUARDED = {L2_TABLE: "L2 table"}


# Maps each byte to its lowest bit (for the sector alignment of entries).
_LOW_BIT = bytes(i & 1 for i in range(256))


def _align_up(n, alignment):
    return -(-n // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A validated header and what follows from it."""
    size: int               # guest bytes: whole sectors, as qemu reads it
    cluster_bits: int
    l2_bits: int
    l1_table_offset: int
    l1_entries: int
    backing_name: str       # None without a backing file
    metadata_end: int       # header, backing name and L1 table end here

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def l2_bytes(self):
        return 8 << self.l2_bits

    @property
    def l1_bytes(self):
        return 8 * self.l1_entries

    def extent(self, entry):
        """(host offset, length) of the bytes an L2 entry points at: a
        compressed cluster keeps its length in the bits below bit 63."""
        if not entry & QCOW_OFLAG_COMPRESSED:
            return entry, self.cluster_size
        shift = 63 - self.cluster_bits
        return (entry & ((1 << shift) - 1),
                (entry >> shift) & (self.cluster_size - 1))

    def entry_problem(self, entry, file_size, strict=True):
        """Why an L2 entry cannot be used, or None if it can.  A reader
        (not `strict`) refuses only what qemu cannot read; a writer also
        clusters over the header or L1 table."""
        offset, length = self.extent(entry)
        if length == 0:
            return f"compressed cluster at {offset:#x} has length 0"
        if offset < self.metadata_end and strict:
            return f"cluster at {offset:#x} overlaps the header or L1 table"
        if not entry & QCOW_OFLAG_COMPRESSED and offset % 512:
            return f"cluster at {offset:#x} is not sector aligned"
        if offset + length > file_size:
            return f"cluster at {offset:#x} is past the end of the file"
        return None

    def table_problem(self, l2_offset, file_size, strict=True):
        """Why an L1 entry (an L2 table offset) cannot be used, or None."""
        if l2_offset & QCOW_OFLAG_COMPRESSED:
            return f"L2 table offset {l2_offset:#x} is invalid"
        if l2_offset < self.metadata_end and strict:
            return (f"L2 table at {l2_offset:#x} overlaps the header or "
                    "L1 table")
        if l2_offset + self.l2_bytes > file_size:
            return f"L2 table at {l2_offset:#x} is past the end of the file"
        return None


def read_geometry(file, path, strict=True):
    """Parse and validate the header of the qcow image in `file`.  A
    reader (not `strict`) takes an L1 table anywhere, as qemu does: over
    the header, or past the end of the file (zeros)."""
    file_size = file.size()
    if file_size < HEADER.size:
        raise CorruptImage(path, FORMAT, "file too short for a qcow header",
                           "header")
    hdr = HEADER.unpack_from(file.read(HEADER.size, 0))
    if hdr.magic != QCOW_MAGIC:
        raise CorruptImage(path, FORMAT, "not a qcow image", "magic")
    if hdr.version != QCOW_VERSION:
        raise UnsupportedFeature(path, FORMAT,
                                 f"qcow version {hdr.version} (this driver "
                                 "reads version 1)", "version")
    if hdr.crypt_method == QCOW_CRYPT_AES:
        raise UnsupportedFeature(path, FORMAT, "AES-encrypted qcow images "
                                 "are not supported", "crypt_method")
    if hdr.crypt_method != QCOW_CRYPT_NONE:
        raise CorruptImage(path, FORMAT, f"invalid encryption method "
                           f"{hdr.crypt_method}", "crypt_method")
    if not MIN_CLUSTER_BITS <= hdr.cluster_bits <= MAX_CLUSTER_BITS:
        raise CorruptImage(path, FORMAT, f"cluster size 2^{hdr.cluster_bits}"
                           " is not between 512 and 64k", "cluster_bits")
    if not MIN_L2_BITS <= hdr.l2_bits <= MAX_L2_BITS:
        raise CorruptImage(path, FORMAT, f"L2 table size 2^{hdr.l2_bits + 3}"
                           " is not between 512 and 64k", "l2_bits")
    if hdr.size <= 1:
        raise CorruptImage(path, FORMAT, "image size is too small", "size")
    shift = hdr.cluster_bits + hdr.l2_bits
    l1_entries = -(-hdr.size >> shift)
    if 8 * l1_entries > MAX_L1_BYTES:
        raise CorruptImage(path, FORMAT, f"image size {hdr.size} needs an L1 "
                           f"table larger than {MAX_L1_BYTES >> 20} MiB",
                           "size")
    l1_end = hdr.l1_table_offset + 8 * l1_entries
    if hdr.l1_table_offset < HEADER.size and strict:
        raise CorruptImage(path, FORMAT, "L1 table overlaps the header",
                           "l1_table_offset")
    if l1_end > (file_size if strict else READER_LIMIT):
        raise CorruptImage(path, FORMAT, f"L1 table at "
                           f"{hdr.l1_table_offset:#x} is past the end of the "
                           "file", "l1_table_offset")
    metadata_end = l1_end
    backing_name = None
    if hdr.backing_file_offset and beyond_qemu_reach(
            hdr.backing_file_offset, hdr.backing_file_size):
        # (qemu cannot read there either)
        raise CorruptImage(path, FORMAT, "backing file name lies past what "
                           "a file can hold", "backing_file_offset")
    if hdr.backing_file_offset and hdr.backing_file_size:
        if hdr.backing_file_size > MAX_BACKING_NAME:
            raise CorruptImage(path, FORMAT, f"backing file name of "
                               f"{hdr.backing_file_size} bytes is too long",
                               "backing_file_size")
        name_end = hdr.backing_file_offset + hdr.backing_file_size
        if hdr.backing_file_offset < HEADER.size or name_end > file_size:
            raise CorruptImage(path, FORMAT, "backing file name lies outside "
                               "the file or over the header",
                               "backing_file_offset")
        raw = bytes(file.read(hdr.backing_file_size, hdr.backing_file_offset))
        if b"\0" in raw:
            raise CorruptImage(path, FORMAT, "backing file name contains a "
                               "NUL byte", "backing_file_offset")
        backing_name = os.fsdecode(raw)
        metadata_end = max(metadata_end, name_end)
    return Geometry(hdr.size // 512 * 512, hdr.cluster_bits, hdr.l2_bits,
                    hdr.l1_table_offset, l1_entries, backing_name,
                    metadata_end)


class QcowDisk(Disk):
    format_name = FORMAT
    can_trim = True
    can_zero = True

    def __init__(self, file, geo, l1, readonly):
        super().__init__(file.path, geo.size, readonly)
        self.file = file
        self.geo = geo
        self.backing_name = geo.backing_name
        self.cluster_size = geo.cluster_size
        self.preferred_block = max(4096, geo.cluster_size)
        self._l1 = l1
        # (offset, entries in use) of an L2 table only the last L1 entry
        # points at, which maps past the end of the disk.
        last = len(l1) - 1
        self._last_table = (None, 0)
        if l1[last] and l1.count(l1[last]) == 1:
            self._last_table = (l1[last], -(-(geo.size - (
                last << (geo.cluster_bits + geo.l2_bits))) >>
                geo.cluster_bits))
        self._l2 = Cache(max(16, L2_CACHE_BYTES // geo.l2_bytes))
        self._inflated = (None, None)           # (entry, cluster bytes)
        self._file_size = file.size()
        # New clusters go at the end, cluster aligned.
        self._end = _align_up(self._file_size, geo.cluster_size)
        # Guards the tables, their cache and allocation; held across the
        # data writes of an allocation, never across plain reads/writes.
        self._lock = threading.Lock()
        self._overlaps = Overlaps(9, file.path, FORMAT, GUARDED)
        if not readonly:
            for l2_offset in l1:
                if l2_offset:
                    self._overlaps.add(l2_offset, geo.l2_bytes, L2_TABLE)

    # --- open / create ------------------------------------------------

    @classmethod
    def probe(cls, file):
        hdr = file.read(8, 0)
        return int.from_bytes(hdr[:4], "big") == QCOW_MAGIC and \
            int.from_bytes(hdr[4:8], "big") == QCOW_VERSION

    @classmethod
    def open(cls, path, readonly, ctx):
        file = ctx.open_file(path, readonly)
        backing = None
        try:
            geo = read_geometry(file, path, strict=not readonly)
            l1 = be64_array(file.read(geo.l1_bytes, geo.l1_table_offset))
            file_size = file.size()
            if readonly:
                # Tables past the end of the file read as zeros: nothing
                # to read (qemu reads them so).
                for index, l2_offset in enumerate(l1):
                    if l2_offset >= file_size and \
                            not l2_offset & QCOW_OFLAG_COMPRESSED:
                        l1[index] = 0
            # Distinct L2 tables cannot share bytes, so more of them than
            # the file holds is corrupt; this also bounds the reads below.
            if (len(l1) - l1.count(0)) * geo.l2_bytes > file_size:
                raise CorruptImage(path, FORMAT, "L1 table refers to more L2 "
                                   "tables than the file holds", "L1 table")
            # A reader, as qemu, takes tables and clusters past the end of
            # the file as zeros; a writer refuses them.
            limit = file_size if not readonly else READER_LIMIT
            for index, l2_offset in enumerate(l1):
                if l2_offset:
                    problem = geo.table_problem(l2_offset, limit,
                                                not readonly)
                    if problem:
                        raise CorruptImage(path, FORMAT, problem,
                                           f"L1 entry {index}")
            if not readonly:
                _refuse_shared_tables(l1, geo, path)
            disk = cls(file, geo, l1, readonly)
            # Validate every L2 table now, so a bad one is refused at
            # open rather than met halfway through serving.
            with disk._lock:
                for l2_offset in l1:
                    if l2_offset:
                        disk._table(l2_offset)
            if geo.backing_name is not None:
                # qcow records no backing format: probe it (read-only).
                backing = ctx.open_backing(path, FORMAT, geo.backing_name,
                                           None, "backing_file")
                disk.backing = backing
            return disk
        except BaseException:
            if backing is not None:
                backing.close()
            file.close()
            raise

    @staticmethod
    def create(path, size, opts, backing=None):
        """A new image; `opts` parsed from OPTIONS, `backing` an
        nbdplug.disk.Backing or None."""
        cluster_size = opts["cluster_size"]
        cluster_bits = cluster_size.bit_length() - 1
        if cluster_size != 1 << cluster_bits or not \
                MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
            raise UsageError(f"cluster_size {cluster_size}: must be a power "
                             "of two from 512 to 65536")
        size = _align_up(size, 512)
        if size < 512:
            raise UsageError("a qcow image needs a size of at least 512")
        # An L2 table fills at most one cluster and maps at most 128 MiB:
        # qemu reads any, libqcow only these.
        l2_bits = min(cluster_bits - 3, 27 - cluster_bits)
        l1_entries = -(-size >> (cluster_bits + l2_bits))
        if 8 * l1_entries > MAX_L1_BYTES:
            raise UsageError(f"size {size} is too large for cluster_size "
                             f"{cluster_size}")
        name = b""
        if backing is not None:
            name = os.fsencode(backing.name)
            if len(name) > MAX_BACKING_NAME or b"\0" in name:
                raise UsageError(f"backing file name {backing.name!r} is too "
                                 "long for qcow")
            # qcow records no backing format: the backing file will be
            # probed, so it must probe as what the caller says it is (the
            # opener opened it so, probing when not told).
            if backing.probed_as != backing.format:
                raise UsageError(f"qcow cannot record a backing format, and "
                                 f"{backing.name!r} would be read as "
                                 f"{backing.probed_as}, not {backing.format}")
        l1_offset = _align_up(HEADER.size + len(name), 8)
        header = HEADER.pack(
            magic=QCOW_MAGIC, version=QCOW_VERSION,
            backing_file_offset=HEADER.size if name else 0,
            backing_file_size=len(name), mtime=0, size=size,
            cluster_bits=cluster_bits, l2_bits=l2_bits, padding=0,
            crypt_method=QCOW_CRYPT_NONE, l1_table_offset=l1_offset)
        # The L1 table padded to whole sectors, as qemu writes it (libqcow
        # refuses a file shorter than its header read).
        image = bytearray(l1_offset + _align_up(8 * l1_entries, 512))
        image[:len(header)] = header
        image[HEADER.size:HEADER.size + len(name)] = name
        file = HostFile(path, readonly=False, create=True)
        try:
            file.pwrite(image, 0)
            file.flush()
        finally:
            file.close()
        dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)

    # --- mapping ------------------------------------------------------

    def _table(self, l2_offset):
        """The L2 table at `l2_offset`, validated (lock held)."""
        table = self._l2.get(l2_offset)
        if table is not None:
            return table
        raw = self.file.read(self.geo.l2_bytes, l2_offset)
        table = be64_array(raw)
        # Entries past the end of the disk are never read, and qemu looks
        # at none of them: they are left out.
        if l2_offset == self._last_table[0]:
            used = self._last_table[1]
            table[used:] = array.array("Q", bytes(8 * (len(table) - used)))
            raw = be64_bytes(table)
        # C-speed tests pass a table of sector-aligned plain clusters; the
        # loop names the bad entry (and checks compressed ones).
        limit = READER_LIMIT if self.readonly else self._file_size
        top = max(table)
        if top and (top >= QCOW_OFLAG_COMPRESSED or
                    top + self.cluster_size > limit or
                    raw[7::8].count(0) != len(table) or
                    raw[6::8].translate(_LOW_BIT).count(0) != len(table) or
                    not self.readonly and
                    min(set(table) - {0}) < self.geo.metadata_end):
            for index, entry in enumerate(table):
                problem = entry and self.geo.entry_problem(
                    entry, limit, not self.readonly)
                if problem:
                    self._corrupt(problem, f"L2 table at {l2_offset:#x} "
                                  f"entry {index}")
        self._cache(l2_offset, table)
        return table

    def _cache(self, l2_offset, table):
        self._l2.put(l2_offset, table)

    def _segments(self, offset, length):
        """[(guest offset, length, kind, where)] covering the range, in
        order: DATA where = host offset (runs merged while the host
        offsets continue); COMPRESSED where = (entry, offset in cluster),
        one cluster each; BACKING where = None.  Lock held."""
        bits = self.geo.cluster_bits
        mask = (1 << self.geo.l2_bits) - 1
        span = bits + self.geo.l2_bits
        out = []
        pos, end = offset, offset + length
        while pos < end:
            l1_index = pos >> span
            table_end = min(end, (l1_index + 1) << span)
            l2_offset = self._l1[l1_index]
            if not l2_offset:
                self._add(out, pos, table_end - pos, BACKING, None)
                pos = table_end
                continue
            table = self._table(l2_offset)
            while pos < table_end:
                cluster = pos >> bits
                stop = min(table_end, (cluster + 1) << bits)
                entry = table[cluster & mask]
                inside = pos - (cluster << bits)
                if not entry:
                    self._add(out, pos, stop - pos, BACKING, None)
                elif entry & QCOW_OFLAG_COMPRESSED:
                    out.append((pos, stop - pos, COMPRESSED, (entry, inside)))
                else:
                    self._add(out, pos, stop - pos, DATA, entry + inside)
                pos = stop
        return out

    @staticmethod
    def _add(out, pos, length, kind, where):
        if out:
            last_pos, last_len, last_kind, last_where = out[-1]
            if last_kind == kind and (
                    kind == BACKING or last_where + last_len == where):
                out[-1] = (last_pos, last_len + length, kind, last_where)
                return
        out.append((pos, length, kind, where))

    def map(self, count, offset):
        with self._lock:
            segments = self._segments(offset, count)
        runs = []
        for pos, length, kind, where in segments:
            if kind == DATA:
                add_run(runs, Run(pos, length, DATA, host=(self.path, where)))
            elif kind == COMPRESSED:
                add_run(runs, Run(pos, length, COMPRESSED))
            else:
                runs += self.map_backing(length, pos)
        return runs

    # --- reads --------------------------------------------------------

    def pread(self, buf, offset):
        with self._lock:
            segments = self._segments(offset, len(buf))
        self._read_segments(memoryview(buf), offset, segments)

    def _read_segments(self, view, base, segments):
        for pos, length, kind, where in segments:
            part = view[pos - base:pos - base + length]
            if kind == DATA:
                self.file.pread(part, where)
            elif kind == COMPRESSED:
                entry, inside = where
                part[:] = self._inflate(entry)[inside:inside + length]
            else:
                self.read_backing(part, pos)

    def _inflate(self, entry):
        """A compressed cluster's bytes (the last one is cached)."""
        cached_entry, data = self._inflated
        if cached_entry == entry:
            return data
        offset, length = self.geo.extent(entry)
        raw = self.file.read(length, offset)
        try:
            # qemu deflates with a 4 KiB window and no zlib header.
            data = zlib.decompressobj(-12).decompress(raw, self.cluster_size)
        except zlib.error:
            data = b""
        if len(data) != self.cluster_size:
            self._corrupt(f"compressed cluster at {offset:#x} does not "
                          "inflate to a whole cluster", "L2 entry")
        self._inflated = (entry, data)
        return data

    # --- writes -------------------------------------------------------

    def pwrite(self, buf, offset, fua=False):
        self.check_writable()
        view = memoryview(buf)
        with self._lock:
            segments = self._segments(offset, len(view))
            self._guard(segments)
            if any(kind != DATA for _, _, kind, _ in segments):
                self._write_allocating(view, offset, segments)
                segments = ()
        for pos, length, _, host in segments:
            self.file.pwrite(view[pos - offset:pos - offset + length], host)
        if fua:
            self.file.flush()

    def _write_allocating(self, view, offset, segments):
        """Write where some clusters need allocating (lock held): plain
        parts in place; the rest into new clusters at the end of the
        file, filled around the write from their old contents."""
        bits, size = self.geo.cluster_bits, self.cluster_size
        fresh = []
        for pos, length, kind, host in segments:
            if kind == DATA:
                self.file.pwrite(view[pos - offset:pos - offset + length],
                                 host)
            else:
                fresh += range(pos >> bits, ((pos + length - 1) >> bits) + 1)
        data = bytearray(len(fresh) * size)
        end = offset + len(view)
        for i, cluster in enumerate(fresh):
            start = cluster << bits
            dest = memoryview(data)[i * size:(i + 1) * size]
            lo, hi = max(offset, start), min(end, start + size)
            if lo > start or hi < min(start + size, self.size):
                old = min(size, self.size - start)
                self._read_segments(dest, start,
                                    self._segments(start, old))
            dest[lo - start:hi - start] = view[lo - offset:hi - offset]
        host = self._end
        self.file.pwrite(data, host)
        self._end += len(data)
        new_tables = self._place(fresh, host)
        self._file_size = max(self._file_size, self._end)
        # Data and new L2 tables durable before any entry points at them.
        self.file.flush()
        self._point(fresh, host, new_tables)

    def _place(self, clusters, host):
        """Write new L2 tables (already holding their entries) after the
        new data clusters; returns {L1 index: table offset}."""
        bits, size = self.geo.cluster_bits, self.cluster_size
        mask = (1 << self.geo.l2_bits) - 1
        tables = {}
        for i, cluster in enumerate(clusters):
            l1_index = cluster >> self.geo.l2_bits
            if self._l1[l1_index]:
                continue
            table = tables.get(l1_index)
            if table is None:
                table = tables[l1_index] = \
                    array.array("Q", [0]) * (1 << self.geo.l2_bits)
            table[cluster & mask] = host + (i << bits)
        placed = {}
        for l1_index, table in tables.items():
            offset = self._end
            self._overlaps.add(offset, self.geo.l2_bytes, L2_TABLE)
            self.file.pwrite(be64_bytes(table), offset)
            self._end += _align_up(self.geo.l2_bytes, size)
            self._cache(offset, table)
            placed[l1_index] = offset
        return placed

    def _point(self, clusters, host, new_tables):
        """Write the entries for clusters now at host, host + size, ...:
        L2 entries in existing tables (one write per run), then L1 entries
        for the new tables.  Memory follows each write."""
        bits = self.geo.cluster_bits
        mask = (1 << self.geo.l2_bits) - 1
        runs = []           # [l2 offset, first index, [entries]]
        for i, cluster in enumerate(clusters):
            l1_index = cluster >> self.geo.l2_bits
            if l1_index in new_tables:
                continue
            l2_offset, index = self._l1[l1_index], cluster & mask
            if runs and runs[-1][0] == l2_offset and \
                    runs[-1][1] + len(runs[-1][2]) == index:
                runs[-1][2].append(host + (i << bits))
            else:
                runs.append([l2_offset, index, [host + (i << bits)]])
        for l2_offset, index, entries in runs:
            self._set_entries(l2_offset, index, entries)
        for l1_index, l2_offset in new_tables.items():
            self.file.pwrite(be64_bytes([l2_offset]),
                             self.geo.l1_table_offset + 8 * l1_index)
            self._l1[l1_index] = l2_offset

    def _set_entries(self, l2_offset, index, entries):
        self.file.pwrite(be64_bytes(entries), l2_offset + 8 * index)
        table = self._table(l2_offset)
        table[index:index + len(entries)] = array.array("Q", entries)

    def flush(self):
        self.file.flush()

    def trim(self, count, offset, fua=False):
        """Unmap the whole clusters in the range (they then read from the
        backing file, or as zeros) and punch their space."""
        self.check_writable()
        bits = self.geo.cluster_bits
        end = offset + count
        first = -(-offset >> bits)
        last = (end >> bits) if end < self.size else -(-end >> bits)
        if first < last:
            with self._lock:
                self._unmap(first, last)
        if fua:
            self.file.flush()

    def _unmap(self, first, last):
        """Clear the entries of clusters [first, last), then punch the
        plain ones: a crash in between leaves entries to punched space,
        which reads as zeros, an allowed result of a trim."""
        mask = (1 << self.geo.l2_bits) - 1
        clears, punches = [], []
        cluster = first
        while cluster < last:
            l1_index = cluster >> self.geo.l2_bits
            stop = min(last, (l1_index + 1) << self.geo.l2_bits)
            l2_offset = self._l1[l1_index]
            if l2_offset:
                table = self._table(l2_offset)
                lo, hi = cluster & mask, ((stop - 1) & mask) + 1
                old = table[lo:hi]
                if any(old):
                    clears.append((l2_offset, lo, hi))
                    punches += [e for e in old
                                if e and not e & QCOW_OFLAG_COMPRESSED]
            cluster = stop
        self._guard([(0, self.cluster_size, DATA, host)
                     for host in punches])
        for l2_offset, lo, hi in clears:
            self._set_entries(l2_offset, lo, [0] * (hi - lo))
        for host in punches:
            with contextlib.suppress(OSError):      # freeing is best effort
                self.file.punch(host, self.cluster_size)

    def zero(self, count, offset, may_trim=False, fua=False):
        """Plain clusters are punched in place (still allocated, reading
        zeros); unallocated ones already read zeros unless a backing file
        shows through; the rest gets zeros written."""
        self.check_writable()
        with self._lock:
            segments = self._segments(offset, count)
            self._guard(segments)
        for pos, length, kind, where in segments:
            if kind == DATA:
                try:
                    self.file.punch(where, length)
                except OSError:
                    self.file.write_zeroes(where, length)
                continue
            if kind == BACKING and (self.backing is None or
                                        pos >= self.backing.size):
                continue
            zeros = bytes(min(length, 1 << 20))
            for at in range(pos, pos + length, len(zeros)):
                self.pwrite(zeros[:pos + length - at], at)
        if fua:
            self.file.flush()

    # --- checks -------------------------------------------------------

    def _guard(self, segments):
        """Before guest data is written to (or punched from) the DATA
        segments' host bytes: refuse, and stop writing, if an L2 table
        lies there (a hostile or damaged entry)."""
        try:
            for _, length, kind, host in segments:
                if kind == DATA:
                    self._overlaps.check(host, length)
        except CorruptImage as e:
            self.stop_writing(e)
            raise

    def _corrupt(self, reason, field):
        """Inconsistent metadata met while serving: refuse writes from now
        on and fail this request (the caller reports the error)."""
        error = CorruptImage(self.path, FORMAT, reason, field)
        self.stop_writing(error)
        raise error

    @classmethod
    def check(cls, path, ctx, repair=None):
        """Recount what the tables claim: entries past the end of the file
        or over other metadata, clusters claimed twice (corruptions), and
        data nothing claims (leaks; holes in the file do not count).
        Repair punches leaked space; corruptions are only reported."""
        report = CheckReport(path, FORMAT)
        file = ctx.open_file(path, readonly=repair is None)
        try:
            geo = read_geometry(file, path)
            file_size = file.size()
            space = _Space(geo.cluster_size, file_size)
            space.claim(0, geo.metadata_end)
            # qemu writes the L1 table in whole sectors: the padding is
            # metadata too, not a leak.
            padded = geo.l1_table_offset + _align_up(geo.l1_bytes, 512)
            if min(padded, file_size) > geo.metadata_end:
                space.claim(geo.metadata_end,
                            min(padded, file_size) - geo.metadata_end)
            l1 = be64_array(file.read(geo.l1_bytes, geo.l1_table_offset))
            allocated = compressed = 0
            for l1_index, l2_offset in enumerate(l1):
                if not l2_offset:
                    continue
                problem = geo.table_problem(l2_offset, file_size)
                if problem is None and not space.claim(l2_offset,
                                                       geo.l2_bytes):
                    problem = (f"L2 table at {l2_offset:#x} overlaps other "
                               "metadata or data")
                if problem:
                    report.corrupt(f"L1 entry {l1_index}: {problem}")
                    continue
                table = be64_array(file.read(geo.l2_bytes, l2_offset))
                for index, entry in enumerate(table):
                    if not entry:
                        continue
                    allocated += 1
                    where = f"L2 table at {l2_offset:#x} entry {index}"
                    problem = geo.entry_problem(entry, file_size)
                    if problem:
                        report.corrupt(f"{where}: {problem}")
                        continue
                    compressed += entry >> 63
                    start, length = geo.extent(entry)
                    if not space.claim(start, length):
                        report.corrupt(f"{where}: cluster at {start:#x} "
                                       "overlaps other metadata or data")
            report.total_clusters = -(-geo.size >> geo.cluster_bits)
            report.allocated_clusters = allocated
            report.compressed_clusters = compressed
            report.image_end_offset = file_size
            for start, length in space.unclaimed(file):
                report.leaks += -(-length >> geo.cluster_bits)
                report.messages.append(f"Leaked {length} bytes at "
                                       f"{start:#x}")
                if repair:
                    file.punch(start, length)
            if repair and report.leaks:
                file.flush()
                report.leaks_fixed, report.leaks = report.leaks, 0
            return report
        finally:
            file.close()

    # --- description --------------------------------------------------

    def info(self):
        return {"l2-bits": self.geo.l2_bits}

    def close(self):
        super().close()
        self.file.close()


def _refuse_shared_tables(l1, geo, path):
    """A writer refuses L2 tables that share bytes: writing an entry of
    one would change the other's."""
    offsets = sorted(offset for offset in l1 if offset)
    for a, b in zip(offsets, offsets[1:]):
        if a + geo.l2_bytes > b:
            raise CorruptImage(path, FORMAT, f"L2 tables at {a:#x} and "
                               f"{b:#x} overlap; open it read-only",
                               "L1 table")


class _Space:
    """Which bytes of an image file its tables claim: whole clusters as
    a bitmap, and exact byte ranges for clusters only partly claimed (the
    header, table tails, compressed clusters), which are few."""

    def __init__(self, cluster_size, file_size):
        self.bits = cluster_size.bit_length() - 1
        self.file_size = file_size
        self.whole = bytearray((file_size >> self.bits) // 8 + 1)
        self.parts = {}         # cluster number → [(start, end)]

    def _is_whole(self, n):
        return self.whole[n >> 3] & (1 << (n & 7))

    def claim(self, start, length):
        """Mark [start, start + length); False if any of it was marked."""
        clean = True
        size = 1 << self.bits
        end = start + length
        for n in range(start >> self.bits, ((end - 1) >> self.bits) + 1):
            lo, hi = max(start, n << self.bits), min(end, (n + 1) << self.bits)
            if self._is_whole(n):
                clean = False
                continue
            if hi - lo == size:
                if n in self.parts:
                    clean = False
                self.whole[n >> 3] |= 1 << (n & 7)
                continue
            ranges = self.parts.setdefault(n, [])
            if any(lo < b and a < hi for a, b in ranges):
                clean = False
            ranges.append((lo, hi))
        return clean

    def unclaimed(self, file):
        """(offset, length) runs of clusters holding data in the file that
        nothing claims at all."""
        runs = []
        pos = 0
        while pos < self.file_size:
            data = file.next_data(pos)
            if data >= self.file_size:
                break
            hole = min(file.next_hole(data), self.file_size)
            for n in range(data >> self.bits,
                           ((hole - 1) >> self.bits) + 1):
                if self._is_whole(n) or n in self.parts:
                    continue
                start = n << self.bits
                length = min(1 << self.bits, self.file_size - start)
                if runs and sum(runs[-1]) == start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + length)
                else:
                    runs.append((start, length))
            pos = hole
        return runs


SPEC = FormatSpec(FORMAT, open=QcowDisk.open, probe=QcowDisk.probe,
                  create=QcowDisk.create,
                  create_options={"cluster_size": options.size(4096)},
                  backing=True, check=QcowDisk.check)
