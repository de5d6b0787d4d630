"""The VMDK Disk: a descriptor, its extents, and an optional parent.

A VMDK disk is a descriptor (a text file, or text embedded in a monolithic
sparse extent) listing extents that cover the guest disk in order; a delta
disk names its parent in parentFileNameHint and records the parent's
content ID (CID) in parentCID.  This module opens all of that and serves
the Disk interface; sparse.py, flat.py and descriptor.py hold the formats.

Every extent file resolves through the open policy: under the allowed
roots (symlinks followed), a regular file unless block devices are
allowed, never the descriptor itself (CVE-2022-47951 is qemu reading
/etc/passwd or the descriptor as an extent).  The extent lines of an
embedded descriptor are never followed: the monolithic file is its own
only extent, as in qemu.

The CID changes on the first write after opening, durably and before the
data (Virtual Disk Format 1.1, "CID"), so a delta disk made from this one
sees it changed and refuses to open.  The new CID keeps the width of the
old one, so the update is one small in-place write that a crash leaves
either old or new.
"""

import bisect
import os
import threading

from nbdplug.report import CheckReport
from nbdplug.disk import BACKING, COMPRESSED, DATA, ZERO, Disk, Run
from nbdplug.errors import (CorruptImage, ImageError, ReadOnlyDisk,
                            UnsupportedFeature)
from nbdplug.locking import ImageLock
from . import descriptor
from .flat import FlatExtent, ZeroExtent
from .sparse import FMT, MAX_CAPACITY_SECTORS, SparseExtent
from .structs import COWD_MAGIC, SECTOR, SPARSE_MAGIC

_ZEROS = memoryview(bytes(1 << 20))
_RESERVED_CIDS = (0xFFFFFFFF, 0xFFFFFFFE)   # "no parent", "not yet set"


def _fill_zero(view):
    for pos in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - pos)
        view[pos:pos + n] = _ZEROS[:n]


def _raise(error):
    raise error


class VmdkDisk(Disk):
    format_name = FMT
    can_zero = True
    # convert -c: streamOptimized grains are always deflated; the other
    # subformats store grains plainly and ignore it, as qemu-img does.

    def __init__(self, path, readonly, desc, desc_file, desc_base, extents,
                 locks):
        super().__init__(path, sum(e.length for e in extents), readonly)
        self.descriptor = desc          # None: a sparse file without one
        self._desc_file = desc_file
        self._desc_base = desc_base     # where the descriptor text starts
        self.parts = extents      # the extents, in guest order
        self._starts = [e.start for e in extents]
        self._locks = locks
        self._sparse = [e for e in extents if isinstance(e, SparseExtent)]
        self.cluster_size = self._sparse[0].grain if self._sparse else None
        self.dirty = any(e.unclean for e in self._sparse)
        self.backing_name = desc.parent_hint if desc else None
        self.backing_format = FMT if self.backing_name else None
        self._lock = threading.Lock()
        self._writing = False           # CID updated, extents marked
        self._dirty = set()
        self._dirty_lock = threading.Lock()

    # --- opening ------------------------------------------------------------

    @classmethod
    def probe(cls, file):
        head = bytes(file.read(64, 0))
        return head[:4] in (SPARSE_MAGIC, COWD_MAGIC) or \
            descriptor.is_descriptor(head)

    @classmethod
    def open(cls, path, readonly, ctx):
        disk = cls._open(path, readonly, ctx, _raise)
        try:
            disk._open_parent(ctx)
        except BaseException:
            disk.close()
            raise
        return disk

    @classmethod
    def _open(cls, path, readonly, ctx, problem, strict=False):
        """Open the descriptor and the extents (not the parent); faults
        found in the tables go to `problem`."""
        opened, locks = [], []
        try:
            file = ctx.open_file(path, readonly)
            opened.append(file)
            head = bytes(file.read(SECTOR, 0))
            if head[:4] == COWD_MAGIC:
                raise UnsupportedFeature(path, FMT, "ESX Server sparse "
                                         "(COWD) extents are not supported",
                                         "magicNumber")
            if head[:4] == SPARSE_MAGIC:
                ext = SparseExtent(path, file, 0, None, "RW", readonly)
                desc = ext.embedded_descriptor()
                if desc is None or desc.cid is None and not (
                        readonly and any("CID" in k for k in desc.keys)):
                    # qemu and libvmdk refuse it too: nothing says how
                    # the extent is used, or what its CID is.  (qemu
                    # reads on if it finds "CID" anywhere: a reader too.)
                    raise CorruptImage(path, FMT, "embedded descriptor is "
                                       "missing or blank (no CID)",
                                       "descriptor")
                base = ext.descriptor_offset
                extents = [ext]
            else:
                size, limit = file.size(), descriptor.MAX_DESCRIPTOR
                if size > limit:
                    raise CorruptImage(path, FMT, "no sparse extent magic, "
                                       "and too large for a descriptor "
                                       f"(more than {limit} bytes)",
                                       "descriptor")
                desc, base = descriptor.parse(file.read(size, 0), path), 0
                extents = cls._open_extents(path, desc, readonly, ctx,
                                            opened, locks)
            if not readonly and (desc is None or desc.cid is None):
                raise UnsupportedFeature(path, FMT, "no descriptor with a "
                                         "CID to update; open it read-only",
                                         "CID")
            for ext in extents:
                if isinstance(ext, SparseExtent):
                    ext.scan(problem, strict or not ext.readonly)
            return cls(path, readonly, desc, file, base, extents, locks)
        except BaseException:
            for f in opened:
                f.close()
            for lock in locks:
                lock.release()
            raise

    @classmethod
    def _open_extents(cls, path, desc, readonly, ctx, opened, locks):
        extents, seen, start = [], {}, 0
        for n, line in enumerate(desc.extents, 1):
            field = f"extent {n}"
            length = line.sectors * SECTOR
            if line.type == "ZERO" or line.access == "NOACCESS":
                extents.append(ZeroExtent(path, start, length, line.access))
                start += length
                continue
            ext_path = ctx.policy.resolve(path, line.filename, FMT, field)
            if ext_path in seen:
                raise CorruptImage(path, FMT, f"{line.filename!r} is "
                                   f"extent {seen[ext_path]} already", field)
            seen[ext_path] = n
            ro = readonly or line.access != "RW"
            locks.append(ImageLock(ext_path, ro, ctx.share))
            file = ctx.open_file(ext_path, ro)
            opened.append(file)
            if line.type == "SPARSE":
                ext = SparseExtent(ext_path, file, start, length,
                                   line.access, ro)
            else:
                ext = FlatExtent(ext_path, file, start, length, line.access,
                                 line.offset_sectors * SECTOR)
            extents.append(ext)
            start += length
        if start > MAX_CAPACITY_SECTORS * SECTOR:
            raise UnsupportedFeature(path, FMT, f"{start} bytes is more "
                                     "than supported", "extents")
        if not extents:
            raise CorruptImage(path, FMT, "no extents", "descriptor")
        return extents

    def _open_parent(self, ctx):
        desc = self.descriptor
        if desc is None or not desc.has_parent:
            return
        parent = ctx.open_backing(self.path, FMT, desc.parent_hint, FMT,
                                  "parentFileNameHint")
        if parent is None:
            return              # not opened (rebase -u)
        self.backing = parent
        if parent.cid != desc.parent_cid:
            found = "unset" if parent.cid is None else f"{parent.cid:x}"
            raise CorruptImage(self.path, FMT, f"{desc.parent_cid:x}, but "
                               f"the parent's CID is {found}: the parent "
                               "changed after this delta disk was made",
                               "parentCID")

    @property
    def cid(self):
        return self.descriptor.cid if self.descriptor else None

    def embedded_descriptor_room(self):
        """Bytes an embedded descriptor may fill (a fixed region of the
        sparse file), or None for a separate descriptor file."""
        first = self.parts[0]
        if isinstance(first, SparseExtent) and first.path == self.path:
            return first.geo.descriptor[1]
        return None

    # --- the guest's view ---------------------------------------------------

    def _split(self, offset, length):
        """(extent, offset in extent, length) pieces of a guest range."""
        if len(self.parts) == 1:
            return ((self.parts[0], offset, length),)
        out, end = [], offset + length
        i = bisect.bisect_right(self._starts, offset) - 1
        while offset < end:
            ext = self.parts[i]
            n = min(end, ext.start + ext.length) - offset
            out.append((ext, offset - ext.start, n))
            offset += n
            i += 1
        return out

    def pread(self, buf, offset):
        buf = memoryview(buf)
        pos = 0
        try:
            for ext, ext_off, n in self._split(offset, len(buf)):
                if ext.access == "NOACCESS":
                    raise ImageError(self.path, FMT, "is NOACCESS",
                                     f"extent at {ext.start}")
                for state, length, where in ext.segments(ext_off, n):
                    view = buf[pos:pos + length]
                    if state == DATA:
                        ext.file.pread(view, where)
                    elif state == BACKING:
                        self.read_backing(view, offset + pos)
                    elif state == ZERO:
                        _fill_zero(view)
                    else:
                        ext.read_compressed(view, where,
                                            (offset + pos - ext.start) %
                                            ext.grain)
                    pos += length
        except CorruptImage as e:
            self.stop_writing(e)
            raise

    def _background(self, offset, length):
        """read_backing into a new buffer (extents fill grains with it)."""
        buf = bytearray(length)
        self.read_backing(memoryview(buf), offset)
        return buf

    def _background_is_zero(self, offset, length):
        return self.backing is None or offset >= self.backing.size

    def map(self, count, offset):
        runs = []
        for ext, ext_off, n in self._split(offset, count):
            pos = ext.start + ext_off
            for state, length, where in ext.segments(ext_off, n):
                if state == DATA:
                    done = 0
                    for size, hole in ext.holes(where, length):
                        runs.append(Run(pos + done, size, DATA,
                                        host=(ext.path, where + done),
                                        sparse=hole))
                        done += size
                elif state == COMPRESSED:
                    runs.append(Run(pos, length, COMPRESSED))
                elif state == ZERO:
                    runs.append(Run(pos, length, ZERO))
                else:
                    runs += self.map_backing(length, pos)
                pos += length
        return runs

    def host_mapping(self, count, offset):
        """Allocated grains of sparse extents and flat extents, where this
        disk may write them: never an extent it opened read-only."""
        ranges = super().host_mapping(count, offset)
        writable = {e.path for e in self.parts if e.file is not None and
                    e.access == "RW"}
        if self.readonly or all(r.path in writable for r in ranges
                                if r.path):
            return ranges
        return [r if r.path in writable else
                r._replace(path=None, host_offset=None) for r in ranges]

    # --- writing ------------------------------------------------------------

    def _writable(self, count, offset):
        """The pieces of a write, once the disk is ready to take it."""
        self.check_writable()
        pieces = self._split(offset, count)
        for ext, _, _ in pieces:
            if ext.access != "RW":
                raise ReadOnlyDisk(self.path, FMT, f"is {ext.access}",
                                   f"extent at {ext.start}")
        if not self._writing:
            self._begin_writing()
        return pieces

    def prepare_writes(self):
        if not self.readonly:
            self._begin_writing()

    def _begin_writing(self):
        """Before the first write: a new CID, and uncleanShutdown set in
        every sparse extent (after copying the primary grain tables over
        the redundant ones if a crash may have left them apart), all
        durable before any data."""
        with self._lock:
            if self._writing:
                return
            desc = self.descriptor
            start, end = desc.cid_span
            width = end - start
            cid = desc.cid
            while cid == desc.cid or cid in _RESERVED_CIDS:
                cid = int.from_bytes(os.urandom(4), "little") % (16 ** width)
            self._desc_file.pwrite(f"{cid:0{width}x}".encode(),
                                   self._desc_base + start)
            self._desc_file.flush()
            desc.cid = cid
            for ext in self._sparse:
                if not ext.readonly:
                    if ext.unclean:
                        ext.sync_redundant()
                    ext.set_unclean(True)
                    ext.file.flush()
            self._writing = True

    def _written(self, ext):
        if ext.file is not None:                # a ZERO extent has none
            with self._dirty_lock:
                self._dirty.add(ext)

    def pwrite(self, buf, offset, fua=False):
        buf = memoryview(buf)
        pos = 0
        try:
            for ext, ext_off, n in self._writable(len(buf), offset):
                ext.pwrite(buf[pos:pos + n], ext_off, self._background)
                self._written(ext)
                pos += n
        except CorruptImage as e:
            self.stop_writing(e)
            raise
        if fua:
            self.flush()

    def zero(self, count, offset, may_trim=False, fua=False):
        try:
            for ext, ext_off, n in self._writable(count, offset):
                for at, length in ext.zero(ext_off, n,
                                           self._background_is_zero):
                    for pos in range(0, length, len(_ZEROS)):
                        ext.pwrite(_ZEROS[:min(len(_ZEROS), length - pos)],
                                   at + pos, self._background)
                self._written(ext)
        except CorruptImage as e:
            self.stop_writing(e)
            raise
        if fua:
            self.flush()

    def flush(self):
        with self._dirty_lock:
            extents = list(self._dirty)
            self._dirty.clear()
        for ext in extents:
            if isinstance(ext, SparseExtent) and ext.compressed:
                ext.write_footer()
            ext.file.flush()

    # --- description --------------------------------------------------------

    def files(self):
        return list(dict.fromkeys([self.path] + [e.path for e in self.parts
                                                 if e.file is not None]))

    def info(self):
        desc = self.descriptor
        out = {}
        if desc is not None:
            out.update({"cid": desc.cid, "parent-cid": desc.parent_cid,
                        "create-type": desc.create_type})
            for key, name in (("ddb.adapterType", "adapter-type"),
                              ("ddb.virtualHWVersion", "hwversion")):
                if key in desc.keys:
                    out[name] = desc.keys[key]
        out["extents"] = [e.info() for e in self.parts]
        return out

    # --- checking -----------------------------------------------------------

    @classmethod
    def check(cls, path, ctx, repair):
        """Grain tables that point outside the file or into the metadata,
        grains two entries share, redundant tables that differ, and
        leaked grains, like `qemu-img check`.  The parent is not opened."""
        if repair:
            raise UnsupportedFeature(path, FMT, "repairing VMDK images is "
                                     "not supported", "repair")
        report = CheckReport(path, FMT)
        disk = cls._open(path, True, ctx,
                         lambda error: report.corrupt(str(error)),
                         strict=True)
        try:
            total = allocated = compressed = 0
            for ext in disk._sparse:
                a, c, t = ext.audit(report)
                allocated, compressed, total = (allocated + a,
                                                compressed + c, total + t)
            if disk._sparse:
                report.total_clusters = total
                report.allocated_clusters = allocated
                report.compressed_clusters = compressed
        finally:
            disk.close()
        return report

    # --- lifetime -----------------------------------------------------------

    def close(self):
        try:
            if self._writing:
                # Everything durable, then the extents marked clean
                # (unless inconsistencies turned the disk read-only).
                self.flush()
                if not self.readonly:
                    for ext in self._sparse:
                        if not ext.readonly:
                            ext.set_unclean(False)
                            self._written(ext)
                    self.flush()
                self._writing = False
        finally:
            for f in dict.fromkeys([self._desc_file] +
                                   [e.file for e in self.parts]):
                if f is not None:
                    f.close()
            for lock in self._locks:
                lock.release()
            self._locks = []
            super().close()
