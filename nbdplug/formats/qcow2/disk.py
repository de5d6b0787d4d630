"""The qcow2 driver: reads, allocating writes, zeroing, discard, flush.

Ordering on disk (each step durable before the next relies on it):
new cluster's refcount and its data -> flush -> the L2 entry (or the L1
entry for a new L2 table) that points at it.  A reference that goes away
is dropped from its table first; the cluster's refcount is decremented
only after a later flush has made that durable (the pending list), so a
crash can leak a cluster but never leave two owners of one.

One lock guards the tables, the caches and allocation; data I/O runs
outside it.  Guest clusters being allocated are marked busy so two
writers never allocate the same cluster twice, and clusters freed while
older I/O may still touch them wait for that I/O before reuse.
"""

import errno
import struct
import threading

from nbdplug.disk import (BACKING, COMPRESSED, DATA, ZERO, Disk, HostRange,
                          Run, add_host_range)
from nbdplug.errors import CorruptImage, UsageError
from nbdplug.layout import be64_bytes
from . import bitmaps, migration, overlap, structs as S
from .check import check
from .compress import compress, decompress
from .fill import Move
from .header import read_header, writable_problem
from .mapping import Mapping
from .refcount import Refcounts
from .snapshot import find, l1_problem, read_snapshots

FMT = "qcow2"
_NOT_PLAIN = S.QCOW_OFLAG_COMPRESSED | S.QCOW_OFLAG_ZERO


class Qcow2Disk(Disk):
    format_name = FMT
    can_trim = True
    can_zero = True

    def __init__(self, file, geo, readonly, path, snapshots, snapshot=None,
                 snapshot_bytes=0):
        size = geo.size
        l1_offset, l1_size = geo.l1_table_offset, geo.l1_size
        if snapshot is not None:
            size = snapshot.disk_size if snapshot.disk_size is not None \
                else geo.size
            l1_offset, l1_size = snapshot.l1_table_offset, snapshot.l1_size
            problem = l1_problem(snapshot, geo, file.size())
            if problem:
                raise CorruptImage(path, FMT, f"snapshot {snapshot.id}: "
                                   f"{problem}", "snapshot table")
            if l1_size < geo.l1_needed(size):
                raise CorruptImage(path, FMT, "snapshot L1 table is too "
                                   "small for its disk size",
                                   "snapshot table")
        super().__init__(path, size, readonly)
        self.file = file
        self.geo = geo
        self.snapshots = snapshots
        self.snapshot = snapshot
        self.cluster_bits = geo.cluster_bits
        self.cluster_size = geo.cluster_size
        self.granule = geo.subcluster_size
        self.extended = geo.extended_l2
        self.cluster_mask = self.cluster_size - 1
        self.l1_shift = geo.cluster_bits + geo.l2_bits
        self.l2_mask = geo.l2_entries - 1
        self.preferred_block = max(4096, min(self.cluster_size, 1 << 20))
        self.backing_name = geo.backing_name
        self.backing_format = geo.backing_format
        self.dirty = bool(geo.incompatible_features & S.INCOMPAT_DIRTY)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.map_ = Mapping(file, geo, path, l1_offset, l1_size)
        self.refs = None
        # Where metadata lies: every write is checked against it first.
        self.overlaps = self.map_.overlaps
        if not readonly:
            self.refs = Refcounts(file, geo, path)
            self.refs.validate()
            self.overlaps = self.map_.overlaps = self.refs.overlaps = \
                overlap.build(file, geo, path, self.map_.l1,
                              self.refs.table, snapshots, snapshot_bytes,
                              _bitmap_directory(file, geo, path))
        self.busy = set()           # guest clusters being allocated
        self.pending = []           # (seq, host cluster) to decrement
        self.inflight = {}          # I/O token -> True, oldest first
        self.seq = 0
        self.prepared = False
        self.last_compressed = (None, None)
        self.compress = False           # write whole clusters compressed
        self.compress_tail = None       # next free byte for compressed data
        self.move = None                # a move from the source (fill.py)
        self.moving = None              # its recorded state, for info

    @classmethod
    def open(cls, path, readonly, ctx):
        file = ctx.open_file(path, readonly)
        try:
            geo = read_header(file, path)
            if not readonly and geo.incompatible_features & \
                    S.INCOMPAT_DIRTY:
                # Refcounts may be stale (lazy refcounts, unclean
                # shutdown): rebuild them from the tables first.
                file.close()
                check(path, ctx, "all")
                file = ctx.open_file(path, readonly)
                geo = read_header(file, path)
            if not readonly and geo.incompatible_features & \
                    S.INCOMPAT_CORRUPT:
                raise CorruptImage(path, FMT, "image is corrupt; cannot be "
                                   "opened read/write (see nbdplug check)",
                                   "incompatible_features")
            problem = None if readonly else \
                writable_problem(geo, file.size())
            if problem:
                raise CorruptImage(path, FMT, f"{problem[1]}; cannot be "
                                   "opened read/write", problem[0])
            # As qemu, refuse damaged bitmaps (their data is not needed
            # to read the guest's, but qemu-img will not open the image).
            bitmaps.read_bitmaps(file, geo, path)
            snapshots, snapshot_bytes = read_snapshots(file, geo, path)
            snap = None
            key = ctx.options.get("snapshot")
            if key is not None:
                if not readonly:
                    raise UsageError("a snapshot can only be opened "
                                     "read-only")
                snap = find(snapshots, key, path)
            disk = cls(file, geo, readonly, path, snapshots, snap,
                       snapshot_bytes)
            disk.compress = bool(ctx.options.get("compress"))
            record = migration.verified(geo)
            if record is not None:
                disk.moving = migration.STATES[record.state]
                disk.backing = ctx.open_source(
                    path, FMT, geo.backing_name, geo.backing_format,
                    geo.size, "backing file")
                if not readonly:
                    disk.move = Move(disk, record,
                                     ctx.options.get("fill", True))
            elif geo.backing_name:
                disk.backing = ctx.open_backing(
                    path, FMT, geo.backing_name, geo.backing_format,
                    "backing file")
            return disk
        except BaseException:
            file.close()
            raise

    @classmethod
    def probe(cls, file):
        # qcow version 1 shares the magic: the version tells them apart.
        head = bytes(file.read(8, 0))
        return head[:4] == struct.pack(">I", S.MAGIC) and \
            struct.unpack(">I", head[4:8])[0] in (2, 3)

    # --- mapping walk ----------------------------------------------------

    def _runs(self, offset, length):
        """[guest offset, length, kind, host] runs, merged where adjacent
        granules agree (DATA: contiguous host; COMPRESSED: one cluster).
        Caller holds the lock."""
        runs = []
        cb, g = self.cluster_bits, self.granule
        end = offset + length
        pos = offset
        while pos < end:
            cluster = pos >> cb
            base = cluster << cb
            entry, bitmap = self.map_.entry(cluster)
            kinds = self.map_.kinds(entry, bitmap)
            gi = (pos - base) // g if len(kinds) > 1 else 0
            while gi < len(kinds) and pos < end:
                kind, host = kinds[gi]
                stop = min(base + (gi + 1) * (g if len(kinds) > 1
                                              else self.cluster_size), end)
                n = stop - pos
                if kind == DATA:
                    host += pos - base - gi * (g if len(kinds) > 1 else 0)
                if runs:
                    last = runs[-1]
                    if last[2] == kind and (
                            kind in (ZERO, BACKING) or
                            (kind == DATA and last[3] + last[1] == host) or
                            (kind == COMPRESSED and last[3] == host and
                             last[0] >> cb == cluster)):
                        last[1] += n
                        pos = stop
                        gi += 1
                        continue
                runs.append([pos, n, kind, host])
                pos = stop
                gi += 1
        return runs

    # --- reads -----------------------------------------------------------

    def _plain_host(self, offset, length, writing):
        """Fast path for the common request: inside one cluster whose L2
        table is cached and whose entry is plain data (for writes: owned,
        refcount one).  Returns the host offset, or None to take the
        general path.  Each step is one atomic operation on a built-in
        container, so readers may call this without the lock."""
        if self.extended or (offset & self.cluster_mask) + length > \
                self.cluster_size:
            return None
        m = self.map_
        l1e = m.l1[offset >> self.l1_shift]
        table = m.cache.peek(l1e & S.L1E_OFFSET_MASK)
        if table is None or m.bad or (writing and not
                                      l1e & S.QCOW_OFLAG_COPIED):
            return None
        entry = table[(offset >> self.cluster_bits) & self.l2_mask]
        if entry & _NOT_PLAIN or not entry & S.L2E_OFFSET_MASK or \
                (writing and not entry & S.QCOW_OFLAG_COPIED):
            return None
        return (entry & S.L2E_OFFSET_MASK) + (offset & self.cluster_mask)

    def pread(self, buf, offset):
        # Reads of owned plain clusters take no lock and no I/O token:
        # each step below is one atomic operation on a built-in container,
        # and a read racing a discard of the same range may return what
        # the cluster holds next, which NBD leaves undefined anyway.
        # Writes, which could damage another cluster, always register.
        m = self.map_
        owned = m.owned.get(m.l1[offset >> self.l1_shift] &
                            S.L1E_OFFSET_MASK)
        if owned is not None:
            host = owned[(offset >> self.cluster_bits) & self.l2_mask]
            rel = offset & self.cluster_mask
            if host and rel + len(buf) <= self.cluster_size:
                return self.file.pread(buf, host + rel)
        if self.move is not None:
            self.move.before_read(offset, len(buf))
        with self.lock:
            runs = self._runs(offset, len(buf))
            token = self._io_start()
        try:
            self._fill(memoryview(buf), offset, runs)
        finally:
            with self.lock:
                del self.inflight[token]

    def _fill(self, buf, offset, runs):
        """Read the bytes `runs` describe into `buf` (starting at guest
        `offset`); no lock held."""
        for goff, n, kind, host in runs:
            part = buf[goff - offset:goff - offset + n]
            if kind == DATA:
                self.file.pread(part, host)
            elif kind == ZERO:
                part[:] = bytes(n)
            elif kind == BACKING:
                self.read_backing(part, goff)
            else:
                data = self._decompressed(host)
                at = goff & (self.cluster_size - 1)
                part[:] = data[at:at + n]

    def _decompressed(self, entry):
        cached_entry, data = self.last_compressed
        if cached_entry == entry:
            return data
        host, length = self.map_.compressed_extent(entry)
        raw = self.file.read(length, host)
        data = decompress(bytes(raw), self.geo.compression_type,
                          self.cluster_size)
        if data is None:
            raise CorruptImage(self.path, FMT, f"compressed cluster at "
                               f"{host:#x} does not decompress to a "
                               "cluster", "L2 table")
        self.last_compressed = (entry, data)
        return data

    def _io_start(self):
        self.seq += 1
        self.inflight[self.seq] = True
        return self.seq

    # --- writes ----------------------------------------------------------

    def _prepare(self):
        """Before the first change: clear autoclear bits we do not keep
        up to date (bitmaps), durably, as the spec requires."""
        if self.prepared:
            return
        if self.geo.version >= 3 and self.geo.autoclear_features:
            pos = S.HEADER_V3.offset("autoclear_features")
            self.overlaps.check(pos, 8, overlap.MAIN_HEADER)
            self.file.pwrite(bytes(8), pos)
            self.file.flush()
        self.prepared = True

    def pwrite(self, buf, offset, fua=False):
        self.check_writable()
        if self.move is not None:
            self.move.kick()
        data = memoryview(buf)
        try:
            with self.lock:
                host = self._plain_host(offset, len(data), True) \
                    if self.prepared and not self.busy else None
                if host is not None:
                    self.overlaps.check(host, len(data))
                    token = self._io_start()
            if host is None:
                self._write(data, offset)
            else:
                try:
                    self.file.pwrite(data, host)
                finally:
                    with self.lock:
                        del self.inflight[token]
            if fua:
                self.flush()
        except CorruptImage as e:
            self.stop_writing(e)
            raise

    def _write(self, data, offset):
        cb, cs = self.cluster_bits, self.cluster_size
        first, last = offset >> cb, (offset + len(data) - 1) >> cb
        with self.lock:
            self._prepare()
            while any(c in self.busy for c in range(first, last + 1)):
                self.cond.wait()
            inplace, alloc = [], []
            for c in range(first, last + 1):
                a = max(offset, c << cb)
                b = min(offset + len(data), (c + 1) << cb)
                piece = data[a - offset:b - offset]
                host = self._inplace_host(c, a - (c << cb), b - (c << cb))
                if host is None:
                    alloc.append((c, a - (c << cb), piece))
                else:
                    inplace.append((host, piece))
            token = self._io_start()
            claimed = [c for c, _, _ in alloc]
            self.busy.update(claimed)
        try:
            self._write_inplace(inplace)
            if alloc and self.compress:
                whole = [it for it in alloc if len(it[2]) == cs]
                alloc = [it for it in alloc if len(it[2]) != cs] + \
                    self._compressed_write(whole)
            if alloc:
                self._allocating_write(alloc)
        finally:
            with self.lock:
                del self.inflight[token]
                if claimed:
                    self.busy.difference_update(claimed)
                    self.cond.notify_all()

    def _inplace_host(self, cluster, a, b):
        """Host offset for writing [a, b) of `cluster` in place, or None
        when the write must allocate (copy-on-write, zero flag, …)."""
        if self.map_.l2_shared(cluster >> self.map_.l2_bits):
            return None
        entry, bitmap = self.map_.entry(cluster)
        if not entry & S.QCOW_OFLAG_COPIED or \
                entry & (S.QCOW_OFLAG_COMPRESSED | S.QCOW_OFLAG_ZERO):
            return None
        host = entry & S.L2E_OFFSET_MASK
        if not host:
            return None
        if self.extended:
            g = self.granule
            for sc in range(a // g, (b - 1) // g + 1):
                if not bitmap >> sc & 1:
                    return None
        return host + a

    def _write_inplace(self, pieces, streaming=False):
        """Write guest data (host offset, bytes) pieces, contiguous ones
        in one call, after checking that none lands on metadata;
        `streaming`: a bulk copy's (HostFile.pwritev_streaming)."""
        groups = []
        i = 0
        while i < len(pieces):
            host, piece = pieces[i]
            group = [piece]
            end = host + len(piece)
            i += 1
            while i < len(pieces) and pieces[i][0] == end:
                group.append(pieces[i][1])
                end += len(pieces[i][1])
                i += 1
            self.overlaps.check(host, end - host)
            groups.append((host, group))
        for host, group in groups:
            if streaming:
                self.file.pwritev_streaming(group, host)
            else:
                self.file.pwritev(group, host)

    def _allocating_write(self, items):
        """Write pieces of clusters that need a (new or reused) host
        cluster: allocate under the lock (new clusters as one contiguous
        run), write data, flush, then point the L2 entries at it."""
        placed = self._place(items)
        self.file.flush()
        self._point(placed)

    def _place(self, items, streaming=False):
        """The first half of an allocating write: host clusters for
        `items` and their data written (`streaming`: a bulk copy's),
        not yet flushed.  Returns what _point() takes once a flush has
        made the data durable."""
        cb, cs, g = self.cluster_bits, self.cluster_size, self.granule
        plans = []
        with self.lock:
            bits = self.map_.l2_bits
            for c in {c >> bits: c for c, _, _ in items}.values():
                self._ensure_l2(c)          # once per table
            entries = [self.map_.entry(c) for c, _, _ in items]
            reuse = [bool(e & S.L2E_OFFSET_MASK and
                          not e & S.QCOW_OFLAG_COMPRESSED and
                          e & S.QCOW_OFLAG_COPIED) for e, _ in entries]
            fresh = reuse.count(False)
            new_clusters = iter(self.refs.alloc_many(fresh))
            for (c, a, piece), (entry, bitmap), kept in zip(items, entries,
                                                             reuse):
                compressed = entry & S.QCOW_OFLAG_COMPRESSED
                if kept:
                    host, drop = entry & S.L2E_OFFSET_MASK, []
                else:
                    host = next(new_clusters) << cb
                    drop = self._owned_clusters(entry) if entry else []
                b = a + len(piece)
                if self.extended:
                    touched = sum(1 << sc for sc in range(a // g,
                                                          (b - 1) // g + 1))
                    if compressed:
                        alloc_bits = 0xFFFFFFFF
                    else:
                        alloc_bits = (bitmap & 0xFFFFFFFF) | touched
                    zero_bits = (bitmap >> 32) & ~alloc_bits & 0xFFFFFFFF
                    new_bitmap = alloc_bits | (zero_bits << 32)
                    # Granules to write: the touched ones, plus every
                    # allocated one when the data moves to a new cluster.
                    moved = (bitmap & 0xFFFFFFFF) if not kept else 0
                    write_bits = touched | moved | (alloc_bits if compressed
                                                    else 0)
                else:
                    new_bitmap = 0
                    write_bits = 1
                runs = None
                if not (a == 0 and b == cs):
                    runs = self._runs(c << cb, cs)
                plans.append((c, a, piece, host, new_bitmap, write_bits,
                              runs, drop))
        # Data, outside the lock: whole clusters or the granules written,
        # old contents filling what the guest did not write; contiguous
        # host ranges go out in one call.
        segments = []
        for c, a, piece, host, new_bitmap, write_bits, runs, drop in plans:
            if runs is None:
                segments.append((host, piece))
                continue
            buf = bytearray(cs)
            self._fill(memoryview(buf), c << cb, runs)
            buf[a:a + len(piece)] = piece
            if not self.extended:
                segments.append((host, memoryview(buf)))
                continue
            for start, stop in _bit_ranges(write_bits):
                segments.append((host + start * g,
                                 memoryview(buf)[start * g:stop * g]))
        segments.sort(key=lambda seg: seg[0])
        self._write_inplace(segments, streaming)
        return plans

    def _point(self, plans):
        """Point the L2 entries at clusters _place() wrote (flushed)."""
        with self.lock:
            self.map_.set_entries([(p[0], p[3] | S.QCOW_OFLAG_COPIED, p[4])
                                   for p in plans])
            for p in plans:
                if p[7]:
                    self._drop(p[7])

    def _compressed_write(self, items):
        """Write whole clusters compressed (convert -c): each compressed
        stream is packed after the previous one, sharing host clusters
        as qemu does.  Returns the items that did not shrink, to be
        written plainly."""
        plain, packed = [], []
        for item in items:
            blob = compress(bytes(item[2]), self.geo.compression_type)
            (plain if blob is None else packed).append((item, blob))
        plans = []
        with self.lock:
            for (c, _, _), blob in packed:
                self._ensure_l2(c)
                entry, _ = self.map_.entry(c)
                drop = self._owned_clusters(entry)
                host = self._alloc_bytes(len(blob))
                sectors = ((host + len(blob) - 1) >> 9) - (host >> 9)
                desc = S.QCOW_OFLAG_COMPRESSED | host | \
                    (sectors << self.map_.csize_shift)
                plans.append((c, blob, host, desc, drop))
        for c, blob, host, desc, drop in plans:
            self.overlaps.check(host, len(blob))
        for c, blob, host, desc, drop in plans:
            self.file.pwrite(blob, host)
        self.file.flush()
        with self.lock:
            for c, blob, host, desc, drop in plans:
                self.map_.set_entry(c, desc, 0)
                self._drop(drop)
        return [item for item, _ in plain]

    def _alloc_bytes(self, n):
        """Host bytes for a compressed stream, right after the previous
        one when the clusters it spills into are free (each cluster it
        touches gains a reference), else at new clusters.  Caller holds
        the lock."""
        cb, mask = self.cluster_bits, self.cluster_mask
        tail = self.compress_tail
        if tail and tail & mask and self.refs.get(tail >> cb):
            first, last = tail >> cb, (tail + n - 1) >> cb
            taken = []
            for c in range(first + 1, last + 1):
                if not self.refs.claim(c):
                    break
                taken.append(c)
            if len(taken) == last - first:
                self.refs.add(first, 1)
                self.compress_tail = tail + n
                return tail
            for c in taken:             # not contiguous: give them back
                self.refs.set(c, 0)
        host = self.refs.alloc() << cb         # n is under a cluster
        self.compress_tail = host + n
        return host

    def _owned_clusters(self, entry):
        """Host clusters this L2 entry holds a reference on."""
        if entry & S.QCOW_OFLAG_COMPRESSED:
            host, length = self.map_.compressed_extent(entry)
            cb = self.cluster_bits
            return list(range(host >> cb, ((host + length - 1) >> cb) + 1))
        host = entry & S.L2E_OFFSET_MASK
        return [host >> self.cluster_bits] if host else []

    def _drop(self, clusters):
        """Decrement these refcounts after the next flush."""
        for c in clusters:
            self.pending.append((self.seq, c))

    def _ensure_l2(self, cluster):
        """Make the L2 table covering `cluster` exist and be ours alone
        (copying a shared one); caller holds the lock."""
        l1_index = cluster >> self.map_.l2_bits
        entry = self.map_.l1[l1_index]
        old = entry & S.L1E_OFFSET_MASK
        if old and entry & S.QCOW_OFLAG_COPIED:
            return
        new = self.refs.alloc() << self.cluster_bits
        self.overlaps.check(new, self.cluster_size)
        if old:
            table = self.map_.l2_table(old)
            content = bytearray(be64_bytes(table))
            # Shared data clusters: none of them has refcount 1 any more.
            for i in range(0, len(content), self.map_.geo.l2_entry_size):
                content[i] &= 0x7F
        else:
            content = bytes(self.cluster_size)
        self.file.pwrite(content, new)
        self.file.flush()
        self.map_.forget(old)
        self.map_.set_l1(l1_index, new | S.QCOW_OFLAG_COPIED)
        if old:
            self._drop([old >> self.cluster_bits])

    # --- zeroing and discard ----------------------------------------------

    def zero(self, count, offset, may_trim=False, fua=False):
        self.check_writable()
        try:
            self._zero(count, offset, may_trim)
            if fua:
                self.flush()
        except CorruptImage as e:
            self.stop_writing(e)
            raise

    def _zero(self, count, offset, may_trim):
        g = self.granule
        can_flag = self.geo.version >= 3 or self.backing is None
        start = -(-offset // g) * g
        end = (offset + count) // g * g
        if not can_flag or start >= end:
            return self._write_zeroes(offset, count)
        if start > offset:
            self._write_zeroes(offset, start - offset)
        self._set_clusters(start, end, zero=True, keep=not may_trim)
        if offset + count > end:
            self._write_zeroes(end, offset + count - end)

    def _write_zeroes(self, offset, count):
        chunk = 1 << 20
        zeros = bytes(min(chunk, count))
        while count:
            n = min(count, chunk)
            self._write(memoryview(zeros)[:n], offset)
            offset += n
            count -= n

    def trim(self, count, offset, fua=False):
        self.check_writable()
        cs = self.cluster_size
        start = -(-offset // cs) * cs
        end = (offset + count) // cs * cs
        try:
            if start < end:
                self._set_clusters(start, end, zero=False, keep=False)
            if fua:
                self.flush()
        except CorruptImage as e:
            self.stop_writing(e)
            raise

    def _set_clusters(self, start, end, zero, keep):
        """Make whole granules [start, end) read as zeros (zero=True) or
        discard them (zero=False: they read as zeros, or from the backing
        image in version 2), freeing host clusters unless `keep`."""
        cb, g = self.cluster_bits, self.granule
        first, last = start >> cb, (end - 1) >> cb
        with self.lock:
            self._prepare()
            while any(c in self.busy for c in range(first, last + 1)):
                self.cond.wait()
            partial_compressed = []
            for c in range(first, last + 1):
                a = max(start, c << cb) - (c << cb)
                b = min(end, (c + 1) << cb) - (c << cb)
                if not self._set_cluster(c, a // g, b // g, zero, keep):
                    partial_compressed.append((c, a, b))
        for c, a, b in partial_compressed:
            self._write_zeroes((c << cb) + a, b - a)

    def _set_cluster(self, c, g0, g1, zero, keep):
        """Apply a zero/discard to granules [g0, g1) of cluster `c`;
        return False for a compressed cluster only partly covered."""
        entry, bitmap = self.map_.entry(c)
        host = entry & S.L2E_OFFSET_MASK
        compressed = entry & S.QCOW_OFLAG_COMPRESSED
        backing = self.backing is not None
        # With a backing image, a discarded cluster must not show the
        # backing data where the format can say "zero" instead.
        as_zero = zero or (backing and self.geo.version >= 3)
        if not self.extended:
            if not entry and not backing:
                return True                 # already reads as zeros
            if as_zero and self.geo.version >= 3:
                if keep and host and not compressed and \
                        entry & S.QCOW_OFLAG_COPIED:
                    new = host | S.QCOW_OFLAG_COPIED | S.QCOW_OFLAG_ZERO
                    drop = []
                else:
                    new = S.QCOW_OFLAG_ZERO
                    drop = self._owned_clusters(entry)
            else:
                new, drop = 0, self._owned_clusters(entry)
            if new == entry:
                return True
            self._ensure_l2(c)
            self.map_.set_entry(c, new)
            self._drop(drop)
            return True
        whole = g0 == 0 and g1 == S.SUBCLUSTERS
        if compressed and not whole:
            return False
        bits = sum(1 << sc for sc in range(g0, g1))
        alloc = 0 if compressed else bitmap & 0xFFFFFFFF & ~bits
        zeros = (bitmap >> 32) & ~bits & 0xFFFFFFFF
        if as_zero:
            zeros |= bits
        new_entry = entry
        drop = []
        if compressed or (not alloc and not (keep and entry &
                                             S.QCOW_OFLAG_COPIED)):
            new_entry, drop = 0, self._owned_clusters(entry)
        new_bitmap = alloc | (zeros << 32)
        if (new_entry, new_bitmap) == (entry, bitmap):
            return True
        if not entry and not self.map_.l2_offset(c >> self.map_.l2_bits) \
                and not new_bitmap:
            return True
        self._ensure_l2(c)
        self.map_.set_entry(c, new_entry, new_bitmap)
        self._drop(drop)
        return True

    # --- flush --------------------------------------------------------------

    def flush(self):
        with self.lock:
            batch, self.pending = self.pending, []
        self.file.flush()
        if not batch or self.stopped is not None:
            return
        try:
            self._release(batch)
        except CorruptImage as e:
            self.stop_writing(e)
            raise

    def _release(self, batch):
        """Decrement the refcounts of clusters whose references a flush
        made durably gone."""
        with self.lock:
            oldest = next(iter(self.inflight), None)
            keep = []
            for seq, c in batch:
                # I/O that started before the free may still touch the
                # cluster, and a loaded dm table may map it (quarantine):
                # keep it counted until neither holds.
                if oldest is not None and oldest <= seq or \
                        self.pinned(self.path, c << self.cluster_bits,
                                    self.cluster_size):
                    keep.append((seq, c))
                    continue
                self.refs.add(c, -1)
                if self.compress_tail and self.compress_tail >> \
                        self.cluster_bits == c:
                    self.compress_tail = None
                if not self.refs.get(c):
                    self._punch(c)
            self.pending = keep + self.pending

    def _punch(self, cluster):
        offset = cluster << self.cluster_bits
        try:
            # A freed cluster that is still metadata: refcounts are wrong.
            self.overlaps.check(offset, self.cluster_size)
        except CorruptImage as e:
            self.stop_writing(e)
            return
        try:
            self.file.punch(offset, self.cluster_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS,
                               errno.EINVAL):
                raise

    def mark_corrupt(self):
        """The corrupt bit, as qemu sets it on finding inconsistent
        metadata (v3 only; v2 has no such bit)."""
        if self.geo.version >= 3:
            pos = S.HEADER_V3.offset("incompatible_features")
            features = self.geo.incompatible_features | S.INCOMPAT_CORRUPT
            try:
                self.file.pwrite(struct.pack(">Q", features), pos)
                self.file.flush()
            except OSError:
                pass

    # --- allocation map -----------------------------------------------------

    def map(self, count, offset):
        with self.lock:
            runs = self._runs(offset, count)
        out = []
        for goff, n, kind, host in runs:
            if kind == DATA:
                out.append(Run(goff, n, DATA, host=(self.path, host)))
            elif kind == ZERO:
                out.append(Run(goff, n, ZERO,
                               host=(self.path, host) if host and
                               not self.extended else None))
            elif kind == COMPRESSED:
                out.append(Run(goff, n, COMPRESSED))
            else:
                out.extend(self.map_backing(n, goff))
        return out

    def host_mapping(self, count, offset):
        """Clusters written in place without a metadata change: plain
        data whose L1 and L2 entries are COPIED (this image alone owns
        the table and the cluster; never one a snapshot shares) and,
        when writable, whose refcount is one; with extended L2 entries
        only the allocated subclusters."""
        cb = self.cluster_bits
        out, end = [], offset + count
        with self.lock:
            pos = offset
            while pos < end:
                c = pos >> cb
                stop = min(end, (c + 1) << cb)
                host = self._owned_alone(c)
                for a, b in self._allocated_granules(c, pos, stop) \
                        if host is not None else ():
                    if pos < a:
                        add_host_range(out, HostRange(pos, a - pos, None,
                                                      None))
                    add_host_range(out, HostRange(
                        a, b - a, self.path, host + (a & self.cluster_mask)))
                    pos = b
                if pos < stop:
                    add_host_range(out, HostRange(pos, stop - pos, None,
                                                  None))
                pos = stop
        return out

    def _owned_alone(self, cluster):
        """Host offset of `cluster` if it is uncompressed data only this
        image's active table references, else None (lock held)."""
        m = self.map_
        if m.l2_shared(cluster >> m.l2_bits):
            return None
        entry, _ = m.entry(cluster)
        host = entry & S.L2E_OFFSET_MASK
        if not host or not entry & S.QCOW_OFLAG_COPIED or \
                entry & (S.QCOW_OFLAG_COMPRESSED | S.QCOW_OFLAG_ZERO):
            return None
        if self.refs is not None and \
                self.refs.get(host >> self.cluster_bits) != 1:
            return None     # COPIED, yet shared: trust the count
        return host

    def _allocated_granules(self, cluster, start, stop):
        """[a, b) runs of [start, stop) inside `cluster` that hold its
        data: all of it with standard L2 entries, the allocated
        subclusters with extended ones."""
        if not self.extended:
            return [(start, stop)]
        _, bitmap = self.map_.entry(cluster)
        g, base = self.granule, cluster << self.cluster_bits
        out = []
        for sc0, sc1 in _bit_ranges(bitmap & 0xFFFFFFFF):
            a, b = max(start, base + sc0 * g), min(stop, base + sc1 * g)
            if a < b:
                out.append((a, b))
        return out

    def prepare_writes(self):
        with self.lock:
            self._prepare()

    # --- description ----------------------------------------------------------

    def info(self):
        geo = self.geo
        out = {"compat": "0.10" if geo.version == 2 else "1.1",
               "compression-type": S.COMPRESSION_NAMES.get(
                   geo.compression_type, str(geo.compression_type))}
        if geo.version >= 3:
            out["lazy-refcounts"] = bool(geo.compatible_features &
                                         S.COMPAT_LAZY_REFCOUNTS)
        out["refcount-bits"] = geo.refcount_bits
        if geo.version >= 3:
            out["corrupt"] = bool(geo.incompatible_features &
                                  S.INCOMPAT_CORRUPT)
            out["extended-l2"] = self.extended
        found = bitmaps.read_bitmaps(self.file, geo, self.path)
        if found:
            out["bitmaps"] = [{"flags": b.flags, "name": b.name,
                               "granularity": b.granularity}
                              for b in found]
        if self.snapshot is not None:
            out["snapshot"] = self.snapshot.id
        if self.moving is not None and self.backing_name is not None:
            out["migration"] = self.moving
        return out

    def close(self):
        if self.move is not None:
            self.move.close()
        if self.file.fd >= 0:
            if not self.readonly:
                self.flush()
            self.file.close()
        super().close()


def _bitmap_directory(file, geo, path):
    """(offset, length) of the bitmap directory qemu would load, or
    None."""
    if not bitmaps.read_bitmaps(file, geo, path):
        return None
    _, length, offset, _ = geo.bitmaps
    return offset, length


def _bit_ranges(bits):
    """[start, stop) runs of set bits in a 32-bit mask."""
    out = []
    sc = 0
    while sc < S.SUBCLUSTERS:
        if bits >> sc & 1:
            start = sc
            while sc < S.SUBCLUSTERS and bits >> sc & 1:
                sc += 1
            out.append((start, sc))
        else:
            sc += 1
    return out
