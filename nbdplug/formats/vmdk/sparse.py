"""Hosted sparse extents (KDMV): grain directory, grain tables, grains.

Layout (Virtual Disk Format 1.1, "Hosted Sparse Extents"): a header
(structs.SPARSE_HEADER), an optional embedded descriptor, a grain
directory (GD) of sector offsets of grain tables (GT), each GT holding
numGTEsPerGT sector offsets of grains, the same again as a redundant copy
(RGD and its tables), and the grains from overHead on.  Stream-optimized
extents deflate each grain behind a marker, and may keep the directory in
a footer at the end of the file ("Stream-Optimized Compressed Sparse
Extents").  Compare qemu's block/vmdk.c (vmdk_open_vmdk4, get_cluster_offset).

Writing keeps these rules:
- Tables are preallocated below overHead (VMware and qemu lay them out
  so); a writable extent never allocates metadata, and every grain lies at
  or past overHead, so no guest write can land on a table.
- A new grain is appended and made durable before any grain table entry
  points at it; then the primary entry is written, then the redundant one.
- uncleanShutdown is set durably before the first write and cleared after
  the last flush on close.  Finding it set, the first write copies the
  primary tables over the redundant ones, which a crash may have left
  behind.
- A grain of a stream-optimized extent is never rewritten in place: a
  write to it re-packs the whole grain (inflate, merge, deflate) into a
  new grain at the end, and the old one becomes unreferenced space.
"""

import array
import dataclasses
import struct
import sys
import threading
import typing
import zlib

from nbdplug.cache import Cache
from nbdplug.disk import BACKING, COMPRESSED, DATA, ZERO
from nbdplug.errors import CorruptImage, UnsupportedFeature
from nbdplug.hostfile import beyond_qemu_reach
from . import descriptor
from .extent import Extent
from .structs import (COMPRESSION_DEFLATE, FLAG_MARKERS, FLAG_REDUNDANT_GD,
                      FLAG_ZEROED_GRAIN, GD_AT_END, GRAIN_MARKER, GTE_SIZE,
                      MARKER_EOS, MARKER_FOOTER, METADATA_MARKER, SECTOR,
                      SPARSE_HEADER, SPARSE_MAGIC, ZEROED_GRAIN,
                      compress_bound)

FMT = "vmdk"

# Bounds on what a header may ask of us.  VMware writes 128-sector grains
# and 512-entry tables; qemu refuses larger tables too.  A grain is read
# whole when compressed or partly written, so its size bounds the memory a
# request takes.  64 TiB is above VMware's 62 TB maximum disk.
MAX_GRAIN_SECTORS = 1 << 15
QEMU_MAX_GRAIN = 1 << 21       # sectors (block/vmdk.c, vmdk_add_extent)
MAX_GTES = 512
MAX_CAPACITY_SECTORS = 1 << 37
MAX_GD_ENTRIES = 1 << 22
# Grain tables kept in memory: 4096 x 2 KiB maps 128 GiB of 64 KiB grains.
MAX_CACHED_GTS = 4096
MAX_CACHED_GRAINS = 16          # inflated compressed grains
TABLES_PER_READ = 512           # adjacent grain tables read at once
MAX_IOV = 512                   # buffers per pwritev, below IOV_MAX


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A validated header and what follows from it (bytes unless named)."""
    grain: int
    capacity: int
    gtes: int                   # entries per grain table
    gt_bytes: int
    gd_entries: int
    gd_offset: int
    rgd_offset: typing.Optional[int]
    overhead: int
    descriptor: typing.Optional[tuple]      # (offset, length)
    compressed: bool
    zeroed_grain: bool
    unclean: bool
    limit: int                  # end of the space tables and grains use
    footer: typing.Optional[int]  # offset of the footer in use, if any


def read_geometry(file, path, file_size, strict=True):
    """Read and validate the header (and the footer it may defer to).

    A reader (`strict` false) is as lenient as qemu where that is safe:
    any grain size within the bound, markers ignored when grains are not
    compressed, a directory past the end of the file read as zeros, and a
    descriptor the header places badly read where qemu reads it."""
    def corrupt(reason, field=None):
        return CorruptImage(path, FMT, reason, field)

    def unsupported(reason, field=None):
        return UnsupportedFeature(path, FMT, reason, field)

    if file_size < SECTOR:
        raise corrupt("file is shorter than a sparse extent header")
    hdr = SPARSE_HEADER.unpack_from(file.read(SECTOR, 0))
    if hdr.magicNumber != SPARSE_MAGIC:
        raise corrupt("not a hosted sparse extent", "magicNumber")
    if hdr.version not in (1, 2, 3):
        raise unsupported(f"{hdr.version} is not supported", "version")
    if hdr.capacity == 0 and hdr.descriptorOffset:
        # qemu then takes the file for a descriptor naming its extents.
        raise corrupt("0 sectors with an embedded descriptor: not a "
                      "sparse extent of its own", "capacity")
    # Unknown flags are ignored, as qemu ignores them.
    # The end-of-line test characters (a text-mode transfer would damage
    # them) are not checked: qemu ignores them, and the tables say more.
    # As qemu: the algorithm says whether grains are compressed (deflate)
    # or not (any other value); the flag does not.
    compressed = hdr.compressAlgorithm == COMPRESSION_DEFLATE
    if hdr.flags & FLAG_MARKERS and not compressed and strict:
        raise unsupported("markers without compression are not supported",
                          "flags")
    if compressed and not hdr.flags & FLAG_MARKERS:
        # (qemu reads such grains without a marker, and fails on ours)
        raise unsupported("compression without markers is not supported",
                          "flags")
    grain_sectors = hdr.grainSize
    # A reader holds only a compressed grain whole: an uncompressed one
    # may be as large as qemu lets it be.
    most = MAX_GRAIN_SECTORS if strict or compressed else QEMU_MAX_GRAIN
    if not 1 <= grain_sectors <= most or \
            strict and grain_sectors & (grain_sectors - 1):
        raise corrupt(f"{grain_sectors} sectors is not a power of two up to "
                      f"{most}", "grainSize")
    if not 1 <= hdr.numGTEsPerGT <= MAX_GTES:
        raise corrupt(f"{hdr.numGTEsPerGT} entries per grain table (1 to "
                      f"{MAX_GTES} are valid)", "numGTEsPerGT")
    if hdr.capacity > MAX_CAPACITY_SECTORS:
        raise unsupported(f"{hdr.capacity} sectors is more than the "
                          f"{MAX_CAPACITY_SECTORS} supported", "capacity")
    tables, limit, footer, space = hdr, file_size, None, "the file"
    if hdr.gdOffset == GD_AT_END:
        if not hdr.flags & FLAG_MARKERS:
            raise corrupt("a directory at the end needs markers", "gdOffset")
        footer = file_size - 3 * SECTOR
        tables = _footer(file, path, hdr, footer)
        limit, space = footer, "the file before its footer"
    if tables.overHead > -(-file_size // SECTOR):
        # (as qemu, which refuses it: "File truncated")
        raise corrupt(f"file truncated: {file_size} bytes, shorter than "
                      f"the {tables.overHead} sectors of metadata the "
                      "header counts", "overHead")
    grain = grain_sectors * SECTOR
    gd_entries = -(-hdr.capacity // (grain_sectors * hdr.numGTEsPerGT))
    if gd_entries > MAX_GD_ENTRIES:
        raise unsupported(f"{gd_entries} grain tables are more than "
                          f"{MAX_GD_ENTRIES}", "capacity")
    gd_bytes = gd_entries * GTE_SIZE
    if strict:
        gd_offset = _within(tables.gdOffset, gd_bytes, limit, space,
                            "gdOffset", corrupt)
    else:
        # Where qemu reads it: the sector count times 512 modulo 2**64,
        # over the header or past the end of the file (zeros) if so.
        gd_offset = (tables.gdOffset * SECTOR) & ((1 << 64) - 1)
        if beyond_qemu_reach(gd_offset, gd_bytes):
            raise corrupt(f"{gd_bytes} bytes at sector {tables.gdOffset} "
                          "lie past what a file can hold", "gdOffset")
    rgd_offset = None
    if hdr.flags & FLAG_REDUNDANT_GD and tables.rgdOffset:
        if beyond_qemu_reach(tables.rgdOffset * SECTOR, gd_bytes):
            raise corrupt(f"{gd_bytes} bytes at sector {tables.rgdOffset} "
                          "lie past what a file can hold", "rgdOffset")
        if tables.rgdOffset * SECTOR + gd_bytes <= limit:
            # (one outside the file is left alone, as qemu reads only
            # the primary directory)
            rgd_offset = tables.rgdOffset * SECTOR
    desc = None
    if hdr.descriptorSize:
        desc = _descriptor_region(hdr, file_size, strict, corrupt)
    return Geometry(
        grain=grain, capacity=hdr.capacity * SECTOR,
        gtes=hdr.numGTEsPerGT, gt_bytes=hdr.numGTEsPerGT * GTE_SIZE,
        gd_entries=gd_entries, gd_offset=gd_offset, rgd_offset=rgd_offset,
        overhead=hdr.overHead * SECTOR, descriptor=desc,
        compressed=compressed,
        zeroed_grain=bool(hdr.flags & FLAG_ZEROED_GRAIN),
        unclean=bool(hdr.uncleanShutdown), limit=limit, footer=footer)


# Where qemu reads an embedded descriptor whatever the header says: the
# 20 sectors after the header (block/vmdk.c, DESC_SIZE).
QEMU_DESCRIPTOR = (SECTOR, 20 * SECTOR)


def _descriptor_region(hdr, file_size, strict, corrupt):
    """(offset, length) of the embedded descriptor.  A writer refuses one
    the header places outside the file or makes too large; for a reader
    there is then none (embedded_descriptor() looks where qemu does)."""
    length = hdr.descriptorSize * SECTOR
    try:
        if length > descriptor.MAX_DESCRIPTOR:
            raise corrupt(f"{hdr.descriptorSize} sectors is more than a "
                          "descriptor may take", "descriptorSize")
        return (_within(hdr.descriptorOffset, length, file_size, "the file",
                        "descriptorOffset", corrupt), length)
    except CorruptImage:
        if strict:
            raise
        return None


def _within(sector, length, limit, space, field, corrupt):
    """Byte offset of `length` bytes at `sector`, refused unless they lie
    after the header and before `limit` (the end of `space`)."""
    if sector < 1 or sector * SECTOR + length > limit:
        raise corrupt(f"{length} bytes at sector {sector} lie outside "
                      f"{space}", field)
    return sector * SECTOR


def _footer(file, path, hdr, at):
    """The footer of a stream-optimized extent: a footer marker, a copy of
    the header with the real gdOffset, and the end-of-stream marker."""
    def corrupt(reason):
        return CorruptImage(path, FMT, reason, "footer")

    if at < SECTOR:
        raise corrupt("file is too short for a footer")
    tail = file.read(3 * SECTOR, at)
    marker = METADATA_MARKER.unpack_from(tail, 0)
    eos = METADATA_MARKER.unpack_from(tail, 2 * SECTOR)
    if (marker.val, marker.size, marker.type) != (1, 0, MARKER_FOOTER):
        raise corrupt("no footer marker 1536 bytes before the end")
    if (eos.val, eos.size, eos.type) != (0, 0, MARKER_EOS):
        raise corrupt("no end-of-stream marker in the last sector")
    foot = SPARSE_HEADER.unpack_from(tail, SECTOR)
    for field in ("magicNumber", "version", "flags", "capacity",
                  "grainSize", "numGTEsPerGT"):
        if getattr(foot, field) != getattr(hdr, field):
            raise corrupt(f"{field} differs from the header's")
    if foot.gdOffset == GD_AT_END:
        raise corrupt("gdOffset still points at the footer")
    return foot


def _region(region):
    offset, length, name, gdi = region
    return name if gdi is None else f"{name} entry {gdi}"


def _table(data):
    """uint32 little-endian entries as an array."""
    table = array.array("I")
    table.frombytes(data)
    if sys.byteorder == "big":
        table.byteswap()
    return table


class SparseExtent(Extent):
    kind = "SPARSE"

    def __init__(self, path, file, start, length, access, readonly):
        self.geo = geo = read_geometry(file, path, file.size(),
                                       strict=not readonly)
        if length is None:
            length = geo.capacity
        elif length > geo.capacity:
            raise CorruptImage(path, FMT, f"the descriptor gives {length} "
                               f"bytes, more than the {geo.capacity} of "
                               "its header", "capacity")
        super().__init__(path, file, start, length, access)
        self.readonly = readonly
        self.limit = geo.limit      # grows as grains are appended
        self.grain = geo.grain
        self.compressed = geo.compressed
        self.unclean = geo.unclean
        # Entries at or below this value point at no stored grain.
        self._unalloc_max = ZEROED_GRAIN if geo.zeroed_grain else 0
        self.gd = self._read_table(geo.gd_offset, geo.gd_entries * GTE_SIZE)
        self.rgd = None
        if geo.rgd_offset is not None:
            self.rgd = self._read_table(geo.rgd_offset,
                                        geo.gd_entries * GTE_SIZE)
        self._gts = Cache(MAX_CACHED_GTS)   # GD index -> grain table
        self._no_table = _table(bytes(geo.gt_bytes))    # never written
        self._inflated = Cache(MAX_CACHED_GRAINS)   # grain index -> grain
        self._cache_lock = threading.Lock()
        self._lock = threading.Lock()           # allocation and tables
        self._bad_tables = set()
        self.next_sector = None     # where the next grain goes (writable)
        self._footer_stale = False
        self.descriptor_offset = None   # set by embedded_descriptor()

    def _read_table(self, offset, length):
        return _table(self.file.read(length, offset))

    def _corrupt(self, reason, field=None):
        return CorruptImage(self.path, FMT, reason, field)

    def embedded_descriptor(self):
        """The descriptor text inside this extent, parsed, or None.  A
        reader whose header places it where no CID is found reads it
        where qemu does, whatever the header says."""
        desc = None
        for region in (self.geo.descriptor,
                       QEMU_DESCRIPTOR if self.readonly else None):
            if region is None:
                continue
            offset, length = region
            text = bytes(self.file.read(length, offset)).split(b"\0", 1)[0]
            if not text.strip():
                continue    # qemu leaves split extents' areas empty
            desc = descriptor.parse(text, self.path, lenient=self.readonly)
            self.descriptor_offset = offset
            if desc.cid is not None:
                break
        return desc

    # --- validation (open and check) ------------------------------------

    def scan(self, problem, strict=False):
        """Validate where the tables lie and every entry they hold.

        Each fault goes to `problem(CorruptImage)`, which raises when
        opening and collects when checking.  Tables with faults are left
        out of later walks.  `strict` (writable or checking) also refuses
        tables that overlap and grains below overHead.  A reader, as qemu,
        reads only the primary directory, lets tables overlap (reading
        them harms nothing), and takes a table or grain past the end of
        the file as zeros.
        """
        geo = self.geo
        if not strict:
            self.rgd = None
        # (offset, length, name, GD index) of every piece of metadata
        regions = [(0, SECTOR, "header", None),
                   (geo.gd_offset, geo.gd_entries * GTE_SIZE,
                    "grain directory", None)]
        if geo.descriptor is not None:
            regions.append(geo.descriptor + ("descriptor", None))
        if self.rgd is not None:
            regions.append((geo.rgd_offset, geo.gd_entries * GTE_SIZE,
                            "redundant grain directory", None))
        for name, directory in self._directories():
            for gdi, sector in enumerate(directory):
                if not sector:
                    continue
                if sector * SECTOR + geo.gt_bytes > geo.limit and \
                        not strict:
                    continue            # what lies past the end: zeros
                if sector * SECTOR + geo.gt_bytes > geo.limit:
                    problem(self._corrupt("grain table lies past the end "
                                          "of the file",
                                          f"{name} entry {gdi}"))
                    self._bad_tables.add(gdi)
                    continue
                regions.append((sector * SECTOR, geo.gt_bytes, name, gdi))
        regions.sort()
        for a, b in zip(regions, regions[1:]) if strict else ():
            if a[0] + a[1] > b[0]:
                problem(self._corrupt(f"overlaps the {_region(a)}",
                                      _region(b)))
        if not self.readonly:
            self._writable_layout(regions)
        end = geo.overhead
        for gdi, table in self._tables():
            end = max(end, self._scan_table(gdi, table, problem, strict))
        # Where grains are appended: after the last one when compressed
        # (overwriting the footer), else at the grain-aligned end of file.
        if self.compressed:
            self.next_sector = -(-end // SECTOR)
        else:
            tail = max(0, self.file.size() - geo.overhead)
            self.next_sector = (geo.overhead + -(-tail // self.grain) *
                                self.grain) // SECTOR

    def _directories(self):
        yield "grain directory", self.gd
        if self.rgd is not None:
            yield "redundant grain directory", self.rgd

    def _tables(self):
        """(GD index, grain table) for every sound primary table with an
        entry set, reading adjacent tables together."""
        size = self.geo.gt_bytes
        span = -(-size // SECTOR)
        empty = bytes(size)
        order = sorted((sector, gdi) for gdi, sector in enumerate(self.gd)
                       if sector and gdi not in self._bad_tables)
        i = 0
        while i < len(order):
            j = i + 1
            while j < len(order) and j - i < TABLES_PER_READ and \
                    order[j][0] == order[j - 1][0] + span:
                j += 1
            first = order[i][0]
            run = self.file.read((order[j - 1][0] - first) * SECTOR + size,
                                 first * SECTOR)
            for sector, gdi in order[i:j]:
                at = (sector - first) * SECTOR
                raw = run[at:at + size]
                if raw == empty:
                    continue
                table = _table(raw)
                if gdi not in self._gts:
                    self._gts.put(gdi, table)
                yield gdi, table
            i = j

    def _scan_table(self, gdi, table, problem, strict):
        """Check one table's entries: each grain within the file (and past
        the tables if `strict`), each compressed grain's marker.  Refused
        entries read as unallocated.  Returns the end of the last
        compressed grain."""
        # Entries past the capacity are never read, and qemu looks at
        # none of them: they are left out.
        used = max(0, -(-self.geo.capacity // self.grain) -
                   gdi * self.geo.gtes)
        if used < len(table):
            table[used:] = array.array("I", bytes(4 * (len(table) - used)))
        if max(table) <= self._unalloc_max:
            return 0
        if not self.compressed and max(table) * SECTOR < self.limit and (
                not strict or min(filter(None, table)) * SECTOR >=
                self.geo.overhead):
            return 0                    # the usual case, at C speed
        end = 0
        for i, entry in enumerate(table):
            if entry <= self._unalloc_max:
                continue
            if not self._grain_ok(entry, strict):
                where = "past the end of the file" if entry * SECTOR >= \
                    self.limit else "into the metadata, before overHead"
                problem(self._corrupt(f"entry {i} points {where}",
                                      f"grain table {gdi}"))
                table[i] = 0
            elif self.compressed:
                try:
                    pos, size = self._marker(gdi * self.geo.gtes + i, entry)
                    end = max(end, pos + size)
                except CorruptImage as e:
                    problem(e)
                    table[i] = 0
        return end

    def _grain_ok(self, entry, strict):
        """A grain after the header (after the tables, if `strict`) and
        inside the file; a reader takes an uncompressed one past the end
        as zeros, as qemu does."""
        low = self.geo.overhead if strict else SECTOR
        high = self.limit if strict or self.compressed else 1 << 62
        return low <= entry * SECTOR < high

    def _writable_layout(self, regions):
        """Refuse to write an extent whose tables are not preallocated
        below overHead, or whose directory lives in a footer."""
        geo, why = self.geo, None
        if geo.footer is not None:
            why = "its grain directory is in a footer"
        elif any(0 in d for _, d in self._directories()):
            why = "not all its grain tables are allocated"
        elif max(r[0] + r[1] for r in regions) > geo.overhead or \
                geo.overhead > self.file.size():
            why = "its tables do not all lie before overHead"
        if why:
            raise UnsupportedFeature(self.path, FMT, f"cannot be written: "
                                     f"{why}; open it read-only", "overHead")

    def _marker(self, gi, sector):
        """Validate grain `gi`'s marker at `sector`; return the offset and
        size of its compressed bytes."""
        offset = sector * SECTOR
        field = f"grain {gi}"
        if offset + GRAIN_MARKER.size > self.limit:
            raise self._corrupt("marker lies past the end of the file",
                                field)
        marker = GRAIN_MARKER.unpack_from(
            self.file.read(GRAIN_MARKER.size, offset))
        if marker.val != gi * (self.grain // SECTOR) and not self.readonly:
            # (qemu, reading, never looks at it)
            raise self._corrupt(f"marker names sector {marker.val}", field)
        bound = compress_bound(self.grain)
        if not 0 < marker.size <= bound:
            raise self._corrupt(f"{marker.size} compressed bytes, where a "
                                f"grain deflates to 1 to {bound}", field)
        if offset + GRAIN_MARKER.size + marker.size > self.limit:
            raise self._corrupt("compressed bytes run past the end of the "
                                "file", field)
        return offset + GRAIN_MARKER.size, marker.size

    # --- mapping ----------------------------------------------------------

    def lookup(self, gi):
        """The grain table entry of grain `gi`."""
        gdi, i = divmod(gi, self.geo.gtes)
        table = self._gts.peek(gdi)     # lock-free; _load takes the lock
        if table is None:
            table = self._load(gdi)
        return table[i]

    def _load(self, gdi):
        with self._cache_lock:
            table = self._gts.get(gdi)
            if table is not None:
                return table
            sector = self.gd[gdi]
            if not sector or gdi in self._bad_tables:
                return self._no_table
            table = self._read_table(sector * SECTOR, self.geo.gt_bytes)
            self._gts.put(gdi, table)
            return table

    def _pieces(self, offset, length):
        """(grain index, offset in grain, length) over a range."""
        grain, end = self.grain, offset + length
        while offset < end:
            gi, within = divmod(offset, grain)
            take = min(grain - within, end - offset)
            yield gi, within, take
            offset += take

    def _entries(self, offset, length):
        """(grain index, offset in grain, length, entry) over a range; a
        grain table never stored is one piece (a sparse disk of terabytes
        is mostly those)."""
        span, end = self.grain * self.geo.gtes, offset + length
        while offset < end:
            gdi = offset // span
            if not self.gd[gdi] or gdi in self._bad_tables:
                take = min(end, (gdi + 1) * span) - offset
                yield offset // self.grain, offset % self.grain, take, 0
                offset += take
                continue
            stop = min(end, (gdi + 1) * span)
            for gi, within, take in self._pieces(offset, stop - offset):
                yield gi, within, take, self.lookup(gi)
            offset = stop

    def segments(self, offset, length):
        out = []
        for gi, within, take, entry in self._entries(offset, length):
            if entry > self._unalloc_max:
                if self.compressed:
                    out.append((COMPRESSED, take, gi))
                    continue
                where = entry * SECTOR + within
                if out and out[-1][0] == DATA and \
                        out[-1][2] + out[-1][1] == where:
                    out[-1] = (DATA, out[-1][1] + take, out[-1][2])
                else:
                    out.append((DATA, take, where))
                continue
            state = BACKING if entry == 0 else ZERO
            if out and out[-1][0] == state:
                out[-1] = (state, out[-1][1] + take, None)
            else:
                out.append((state, take, None))
        return out

    def read_compressed(self, view, gi, within):
        view[:] = memoryview(self._inflate(gi))[within:within + len(view)]

    def _inflate(self, gi):
        data = self._inflated.peek(gi)
        if data is not None:
            return data
        pos, size = self._marker(gi, self.lookup(gi))
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(self.file.read(size, pos), self.grain)
        except zlib.error as e:
            raise self._corrupt(f"does not inflate: {e}", f"grain {gi}")
        if inflater.unconsumed_tail or not inflater.eof:
            raise self._corrupt("does not inflate to one grain",
                                f"grain {gi}")
        if len(data) < min(self.grain, self.length - gi * self.grain):
            # (qemu fails a read past what the grain inflates to)
            raise self._corrupt(f"inflates to {len(data)} bytes, short of "
                                "a grain", f"grain {gi}")
        data = data.ljust(self.grain, b"\0")
        self._remember(gi, data)
        return data

    def _remember(self, gi, data):
        with self._cache_lock:
            self._inflated.put(gi, data)

    # --- writing ------------------------------------------------------------

    def pwrite(self, buf, offset, background):
        pending, pos = [], 0
        for state, length, where in self.segments(offset, len(buf)):
            if state == DATA:
                self.file.pwrite(buf[pos:pos + length], where)
            else:
                pending.append((offset + pos, buf[pos:pos + length]))
            pos += length
        if pending:
            with self._lock:
                grains = []
                for at, data in pending:
                    grains += self._new_grains(at, data, background)
                if grains:
                    self._append(grains)

    def _new_grains(self, offset, data, background):
        """Whole new grains holding `data` at `offset` (merged with what
        the grain showed before); grains another write allocated in the
        meantime are written in place instead."""
        grains, pos = [], 0
        for gi, within, take in self._pieces(offset, len(data)):
            piece = data[pos:pos + take]
            pos += take
            entry = self.lookup(gi)
            if entry > self._unalloc_max and not self.compressed:
                self.file.pwrite(piece, entry * SECTOR + within)
                continue
            if take == self.grain:
                grains.append((gi, piece))
                continue
            content = bytearray(self._content(gi, entry, background))
            content[within:within + take] = piece
            grains.append((gi, content))
        return grains

    def _content(self, gi, entry, background):
        """What grain `gi` holds now, as a whole grain."""
        if entry > self._unalloc_max:
            return self._inflate(gi)
        if entry == ZEROED_GRAIN:
            return bytes(self.grain)
        start = gi * self.grain
        return bytes(background(self.start + start,
                                min(self.grain, self.length - start))
                     ).ljust(self.grain, b"\0")

    def _append(self, grains):
        """Store new grains at the end, durably, then point the tables at
        them (caller holds the lock)."""
        sector, placed, blobs = self.next_sector, [], []
        for gi, content in grains:
            if self.compressed:
                packed = zlib.compress(content)
                blob = GRAIN_MARKER.pack(gi * (self.grain // SECTOR),
                                         len(packed)) + packed
                blob += bytes(-len(blob) % SECTOR)
                self._remember(gi, bytes(content))
            else:
                blob = content
            placed.append((gi, sector))
            blobs.append(blob)
            sector += len(blob) // SECTOR
        pos = self.next_sector * SECTOR
        for i in range(0, len(blobs), MAX_IOV):
            chunk = blobs[i:i + MAX_IOV]
            self.file.pwritev(chunk, pos)
            pos += sum(len(b) for b in chunk)
        self.next_sector = sector
        self.limit = max(self.limit, sector * SECTOR)
        self._footer_stale = self.compressed
        # The grains are durable before any table entry points at them.
        self.file.flush()
        self._set_entries(placed)

    def zero(self, offset, length, background_is_zero):
        rest, marks = [], []
        for gi, within, take in self._pieces(offset, length):
            entry = self.lookup(gi)
            if self.geo.zeroed_grain and entry == ZEROED_GRAIN:
                continue                # a zeroed grain already
            if entry == 0 and background_is_zero(
                    self.start + gi * self.grain + within, take):
                continue
            if self.geo.zeroed_grain and take == self.grain:
                marks.append((gi, ZEROED_GRAIN))
            else:
                rest.append((gi * self.grain + within, take))
        if marks:
            with self._lock:
                self._set_entries(marks)
        return rest

    def _set_entries(self, placed):
        """Write grain table entries, primary tables first (caller holds
        the lock)."""
        gtes = self.geo.gtes
        runs = []                       # [gdi, first index, [values]]
        for gi, value in sorted(placed):
            gdi, i = divmod(gi, gtes)
            if runs and runs[-1][0] == gdi and \
                    runs[-1][1] + len(runs[-1][2]) == i:
                runs[-1][2].append(value)
            else:
                runs.append([gdi, i, [value]])
        for _, directory in self._directories():
            for gdi, i, values in runs:
                self.file.pwrite(struct.pack(f"<{len(values)}I", *values),
                                 directory[gdi] * SECTOR + i * GTE_SIZE)
        with self._cache_lock:      # see _load: no stale table survives
            for gdi, i, values in runs:
                table = self._gts.get(gdi)
                if table is not None:
                    table[i:i + len(values)] = array.array("I", values)

    def set_unclean(self, flag):
        """Write the uncleanShutdown byte (the caller flushes)."""
        self.file.pwrite(bytes([flag]),
                         SPARSE_HEADER.offset("uncleanShutdown"))
        self.unclean = flag
        self._footer_stale = self.compressed

    def sync_redundant(self):
        """Copy primary grain tables over differing redundant ones."""
        if self.rgd is None:
            return
        size = self.geo.gt_bytes
        for gdi, sector in enumerate(self.gd):
            primary = self.file.read(size, sector * SECTOR)
            if self.file.read(size, self.rgd[gdi] * SECTOR) != primary:
                self.file.pwrite(primary, self.rgd[gdi] * SECTOR)

    def write_footer(self):
        """End a written stream-optimized extent as the specification
        wants: footer marker, a copy of the header, end-of-stream marker.
        The next grain appended overwrites it."""
        if not self._footer_stale:
            return
        with self._lock:
            head = self.file.read(SECTOR, 0)
            pos = self.next_sector * SECTOR
            self.file.pwrite(
                METADATA_MARKER.pack(1, 0, MARKER_FOOTER, b"") + head +
                METADATA_MARKER.pack(0, 0, MARKER_EOS, b""), pos)
            if self.file.size() > pos + 3 * SECTOR:
                self.file.truncate(pos + 3 * SECTOR)
            self._footer_stale = False

    # --- checking -------------------------------------------------------

    def audit(self, report):
        """Count grains and leaks, find grains that overlap, compare the
        redundant tables (for `nbdplug check`, after scan()).  Returns
        (allocated grains, compressed grains, grains of the capacity)."""
        geo, grain = self.geo, self.grain
        size = self.file.size()
        # One mark per grain-sized slot from overHead: 2 where a grain
        # starts, 1 where one reaches.
        slots = bytearray(max(0, -(-(size - geo.overhead) // grain)))
        allocated = 0
        for gdi, table in self._tables():
            if max(table) <= self._unalloc_max:
                continue
            for i, entry in enumerate(table):
                if entry <= self._unalloc_max:
                    continue
                allocated += 1
                if self.compressed or not self._grain_ok(entry, True):
                    continue            # scan() judged these
                slot, rem = divmod(entry * SECTOR - geo.overhead, grain)
                if rem == 0 and slots[slot] == 2:
                    report.corrupt(str(self._corrupt(
                        f"entry {i} points at a grain another entry uses",
                        f"grain table {gdi}")))
                slots[slot] = 2 if rem == 0 else max(slots[slot], 1)
                if rem and slot + 1 < len(slots):
                    slots[slot + 1] = max(slots[slot + 1], 1)
        if not self.compressed:
            leaked = slots[:max(0, (size - geo.overhead) // grain)].count(0)
            if leaked:
                report.leaks += leaked
                report.messages.append(f"Leaked {leaked} grains in "
                                       f"{self.path}")
        self._audit_redundant(report)
        return (allocated, allocated if self.compressed else 0,
                -(-geo.capacity // grain))

    def _audit_redundant(self, report):
        if self.rgd is None:
            return
        differ, size = 0, self.geo.gt_bytes
        for gdi, sector in enumerate(self.gd):
            if not sector or not self.rgd[gdi] or gdi in self._bad_tables:
                continue
            primary = self.file.read(size, sector * SECTOR)
            copy = self.file.read(size, self.rgd[gdi] * SECTOR)
            if primary != copy:
                differ += sum(a != b for a, b in zip(_table(primary),
                                                     _table(copy)))
        if not differ:
            return
        reason = f"{differ} redundant grain table entries differ from the " \
            "primary tables"
        if self.unclean:
            # Expected after a crash; the next write copies them over.
            report.messages.append(str(self._corrupt(
                f"{reason} (not closed cleanly; the next write rewrites "
                "them)", "uncleanShutdown")))
        else:
            report.corrupt(str(self._corrupt(reason, "rgdOffset")))

    def info(self):
        out = super().info()
        out["cluster-size"] = self.grain
        if self.compressed:
            out["compressed"] = True
        return out
