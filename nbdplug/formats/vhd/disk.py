"""The VHD Disk: mapping, reads, writes, discard and check."""

import threading
import uuid

from nbdplug.report import CheckReport
from nbdplug.cache import Cache
from nbdplug.disk import (BACKING, DATA, ZERO, Disk, Run, add_run,
                          host_ranges)
from nbdplug.errors import CorruptImage, ImageError
from .bitmaps import bits_of, raw_bitmap, span_bits
from .header import block_problems, locator_name, read_bat, validate
from ..differencing import bit_runs, open_parent
from .structs import (BAT_ENTRY, BITMAP_CACHE, COOKIE, DIFFERENCING, DYNAMIC,
                      FIXED, FMT, GRAIN, LOCATOR_CODES, MiB, PAGE, SECTOR,
                      SUBFORMATS, UNUSED, round_up)


class VhdDisk(Disk):
    format_name = FMT

    def __init__(self, file, geom, bat, readonly):
        super().__init__(file.path, geom.size, readonly)
        self.file = file
        self.geom = geom
        self.bat = bat
        self.unique_id = geom.unique_id
        self.backing_name = None
        self.can_trim = self.can_zero = not readonly
        if geom.disk_type != FIXED:
            self.cluster_size = geom.block_size
        self._grain = min(GRAIN, geom.block_size) if geom.block_size \
            else SECTOR
        self._lock = threading.RLock()
        self._quarantine = {}       # emptied block -> entry, still pinned
        self._bitmaps = Cache(BITMAP_CACHE)     # block -> sector bits
        self._full = span_bits(0, 8 * geom.bitmap_size)
        # Whether reads honour the sector bitmaps: a differencing disk's
        # clear bit shows the parent.  A dynamic disk's block reads whole,
        # as qemu reads it: its bits only say which sectors were written,
        # and writers (qemu, us) set them all when allocating and leave
        # the rest zero, so only a damaged bitmap tells the two apart.
        self._sparse_blocks = geom.disk_type == DIFFERENCING
        self._stored = file.size()      # a fixed disk's bytes in the file
        # Where the next block goes: over the end footer, or past the end
        # of a file whose end footer is missing.
        size = file.size()
        self._end = size - SECTOR if geom.footer_at_end else \
            round_up(size, SECTOR)

    @classmethod
    def probe(cls, file):
        size = file.size()
        return size >= SECTOR and COOKIE in (
            bytes(file.read(8, 0)), bytes(file.read(8, size - SECTOR)))

    @classmethod
    def open(cls, path, readonly, ctx):
        file = ctx.open_file(path, readonly)
        disk = None
        try:
            geom = validate(file, path,
                            (lambda error: None) if readonly else None)
            bat = read_bat(file, geom) if geom.disk_type != FIXED else None
            # A reader, as qemu, takes blocks that overlap metadata or
            # each other; a writer refuses them.  Both refuse a block
            # past the end of the file (qemu: "the image has been
            # truncated").
            if bat is not None:
                for field, message in block_problems(
                        geom, bat, file.size(), overlaps=not readonly):
                    raise CorruptImage(path, FMT, message, field)
                bat = bat[:geom.bat_entries]
            disk = cls(file, geom, bat, readonly)
            if geom.disk_type == DIFFERENCING:
                disk._open_parent(ctx)
            if not readonly and not geom.footer_at_end:
                disk._write_end_footer()
            return disk
        except BaseException:
            (disk or file).close()
            raise

    def _open_parent(self, ctx):
        """Follow the parent locators, relative first, to the parent
        whose unique id this disk records."""
        candidates = []
        for code in LOCATOR_CODES:
            field = f"parent locator {code.decode()}"
            for c, offset, length in self.geom.locators:
                if c != code:
                    continue
                name = locator_name(self.path, code,
                                     bytes(self.file.read(length, offset)),
                                     field)
                if name:
                    candidates.append((name, field))
        # A rebase that stopped after writing new locators: the parent
        # its (old) header names, by the name that header records.
        fallback = [(self.geom.parent_name, "parent unicode name")] \
            if self.geom.parent_name else []
        self.backing, name = open_parent(
            self, ctx, candidates,
            lambda p: p.unique_id == self.geom.parent_unique_id,
            "unique id", fallback)
        self.backing_name = self.geom.parent_name or name
        self.backing_format = FMT

    def _bitmap(self, block, entry):
        """The block's sector bitmap (bitmaps.bits_of)."""
        bits = self._bitmaps.get(block)
        if bits is None:
            bits = bits_of(self.file.read(self.geom.bitmap_size,
                                          entry * SECTOR))
            self._cache(block, bits)
        return bits

    def _cache(self, block, bits):
        if bits == self._full:
            bits = self._full       # one object for every full block
        self._bitmaps.put(block, bits)

    def _sectors_in(self, block):
        """Sectors of `block` that lie inside the disk."""
        spb = self.geom.sectors_per_block
        return min(spb, (self.size - block * self.geom.block_size)
                   // SECTOR)

    def _runs(self, offset, length, bitmaps=None):
        """This layer's runs (DATA, and BACKING or, without a parent,
        ZERO) covering the range in order; `bitmaps`: whether sector
        bitmaps decide (by default only a differencing disk's do)."""
        bitmaps = self._sparse_blocks if bitmaps is None else bitmaps
        if self.geom.disk_type == FIXED:
            # (A reader takes a file shorter than the disk: the rest
            # reads as zeros, as in qemu.)
            stored = max(0, min(length, self._stored - offset))
            runs = [Run(offset, stored, DATA, host=(self.path, offset))]
            if stored < length:
                runs.append(Run(offset + stored, length - stored, ZERO))
            return [run for run in runs if run.length]
        bs, bitmap_size = self.geom.block_size, self.geom.bitmap_size
        absent = Run(0, 0, BACKING if self.backing is not None else ZERO)
        runs = []
        end = offset + length
        with self._lock:
            while offset < end:
                block, within = divmod(offset, bs)
                n = min(end - offset, bs - within)
                entry = self.bat[block]
                if entry == UNUSED:
                    add_run(runs, absent._replace(offset=offset, length=n))
                    offset += n
                    continue
                data = entry * SECTOR + bitmap_size
                bits = self._bitmap(block, entry) if bitmaps else self._full
                first = within // SECTOR
                last = -(-(within + n) // SECTOR)
                for s, e, present in bit_runs(bits, first, last):
                    a = max(within, s * SECTOR)
                    b = min(within + n, e * SECTOR)
                    run = Run(offset + a - within, b - a, DATA,
                              host=(self.path, data + a)) if present else \
                        absent._replace(offset=offset + a - within,
                                        length=b - a)
                    add_run(runs, run)
                offset += n
        return runs

    def pread(self, buf, offset):
        geom = self.geom
        if geom.block_size:
            # Fast path: inside one block whose every sector is present.
            block, within = divmod(offset, geom.block_size)
            if 0 <= offset and within + len(buf) <= geom.block_size and \
                    offset + len(buf) <= self.size:
                entry = self.bat[block]
                if entry != UNUSED and (
                        not self._sparse_blocks or
                        self._bitmaps.peek(block) is self._full):
                    self.file.pread(buf, entry * SECTOR + geom.bitmap_size +
                                    within)
                    return
        self.fill(buf, self._runs(offset, len(buf)), self.file)

    def map(self, count, offset):
        return self.resolve(self._runs(offset, count))

    def host_mapping(self, count, offset):
        # Only sectors the bitmap already claims: a write that bypasses
        # us there must leave nothing to record for readers that honour
        # bitmaps (Windows), though we and qemu read dynamic blocks whole.
        return host_ranges(self.resolve(self._runs(offset, count, True)))

    def pwrite(self, buf, offset, fua=False):
        self.check_writable()
        with self._lock:
            self._write(memoryview(buf).cast("B"), offset)
            if fua:
                self.file.flush()

    def flush(self):
        self.file.flush()

    def _write(self, view, offset):
        """Write guest bytes; partial grains are read, patched, written."""
        if self.geom.disk_type == FIXED:
            self.file.pwrite(view, offset)
            return
        end, grain = offset + len(view), self._grain
        start, stop = offset - offset % grain, round_up(end, grain)
        if (start, stop) != (offset, end):
            whole = bytearray(stop - start)
            # The last grain may run past the end of a disk whose size is
            # not a whole number of grains: that part stays zero.
            for at in (start, stop - grain):
                n = max(0, min(grain, self.size - at))
                self.pread(memoryview(whole)[at - start:at - start + n], at)
            whole[offset - start:end - start] = view
            view, offset = memoryview(whole), start
        bs, pos = self.geom.block_size, 0
        while pos < len(view):
            block, within = divmod(offset + pos, bs)
            n = min(len(view) - pos, bs - within)
            self._write_block(block, within, view[pos:pos + n])
            pos += n

    def _write_block(self, block, within, data):
        entry = self.bat[block]
        if entry == UNUSED:
            self._allocate(block, within, data)
            return
        self.file.pwrite(data, entry * SECTOR + self.geom.bitmap_size
                         + within)
        bits = self._bitmap(block, entry)
        span = span_bits(within // SECTOR, (within + len(data)) // SECTOR)
        if bits & span == span:
            return
        # The data is durable before bitmap bits claim it.
        self.file.flush()
        self._store_bitmap(block, entry, bits | span)

    def _allocate(self, block, within, data):
        geom = self.geom
        start = self._end
        end = start + geom.bitmap_size + geom.block_size
        if start // SECTOR >= UNUSED:
            raise ImageError(self.path, FMT, "the image file would pass "
                             "the 2 TiB a BAT entry can address", "BAT")
        # 1. Bitmap and data (over the old footer) and the footer moved
        #    past the block, durable before the BAT entry points at them
        #    (qemu refuses a BAT entry past the end of the file).  A
        #    dynamic block's unwritten sectors are zeros (fresh file
        #    space), so it claims them all, as qemu does.
        if geom.disk_type == DYNAMIC:
            bits = span_bits(0, 8 * geom.bitmap_size)
        else:
            bits = span_bits(within // SECTOR,
                             (within + len(data)) // SECTOR)
        bitmap = raw_bitmap(bits, geom.bitmap_size)
        if within == 0:
            self.file.pwritev([bitmap, data], start)
        else:
            self.file.pwrite(bitmap, start)
            self.file.pwrite(data, start + geom.bitmap_size + within)
        self.file.pwrite(geom.footer, end)
        self.file.flush()
        # 2. The BAT entry: one sector, durable at the next flush.
        self._set_bat(block, start // SECTOR)
        self._end = end
        self._cache(block, bits)

    def _store_bitmap(self, block, entry, bits):
        self.file.pwrite(raw_bitmap(bits, self.geom.bitmap_size),
                         entry * SECTOR)
        self._cache(block, bits)

    def _set_bat(self, block, entry):
        self.file.pwrite(BAT_ENTRY.pack(entry),
                         self.geom.table_offset + 4 * block)
        self.bat[block] = entry

    def _write_end_footer(self):
        """Put the footer back at the end of a file that lost it."""
        self.file.pwrite(self.geom.footer, self._end)
        self.file.flush()

    def trim(self, count, offset, fua=False):
        self.check_writable()
        with self._lock:
            self._discard(count, offset)
            if fua:
                self.file.flush()

    def zero(self, count, offset, may_trim=False, fua=False):
        self.check_writable()
        with self._lock:
            end, grain = offset + count, self._grain
            start = round_up(offset, grain)
            stop = end // grain * grain
            if self.geom.disk_type == DIFFERENCING or start >= stop:
                # (A discarded sector of a differencing disk shows the
                # parent, not zeros.)
                self._write_zeros(count, offset)
            else:
                # Whole grains are discarded, and then read as zeros;
                # partial ones at the edges are written.
                self._write_zeros(start - offset, offset)
                self._discard(stop - start, start, zero=True)
                self._write_zeros(end - stop, stop)
            if fua:
                self.file.flush()

    def _write_zeros(self, count, offset):
        chunk = bytes(min(count, 4 * MiB))
        while count > 0:
            n = min(count, len(chunk))
            self._write(memoryview(chunk)[:n], offset)
            offset += n
            count -= n

    def _discard(self, count, offset, zero=False):
        """Drop whole grains: clear their bitmap bits, give the bytes
        back to the file system, release blocks left empty."""
        if self.geom.disk_type == FIXED:
            (self._zero_host if zero else self._punch)(offset, count)
            return
        grain = self._grain
        start = round_up(offset, grain)
        stop = (offset + count) // grain * grain
        bs = self.geom.block_size
        while start < stop:
            block, within = divmod(start, bs)
            n = min(stop - start, bs - within)
            self._discard_in_block(block, within // SECTOR,
                                   (within + n) // SECTOR)
            start += n

    def _discard_in_block(self, block, first, last):
        entry = self.bat[block]
        if entry == UNUSED:
            return
        bits = self._bitmap(block, entry) & ~span_bits(first, last)
        if not bits & span_bits(0, self._sectors_in(block)):
            if not self.pinned(self.path, entry * SECTOR,
                               self.geom.bitmap_size + self.geom.block_size):
                self._release(block, entry)
                return
            # A dm table maps the block: keep it, empty, until unpinned.
            self._quarantine[block] = entry
        # Bits first, so our reads fall through at once; then the bytes,
        # so readers that ignore bitmaps (qemu, Windows) read zeros too.
        self._store_bitmap(block, entry, bits)
        data = entry * SECTOR + self.geom.bitmap_size
        self._zero_host(data + first * SECTOR, (last - first) * SECTOR)

    def _release(self, block, entry):
        """Unmap an empty block and give its space back."""
        self._bitmaps.pop(block, None)
        self._set_bat(block, UNUSED)
        # Nothing may point at the space before it is reused or punched.
        self.file.flush()
        start = entry * SECTOR
        end = start + self.geom.bitmap_size + self.geom.block_size
        if end == self._end:
            self._shrink()
        else:
            self._punch(start, end - start)

    def unpinned(self):
        """Release the emptied blocks that waited for their pins to go,
        if they are still empty."""
        span = self.geom.bitmap_size + self.geom.block_size
        with self._lock:
            waiting, self._quarantine = self._quarantine, {}
            for block, entry in waiting.items():
                if self.bat[block] != entry or self._bitmap(block, entry) \
                        & span_bits(0, self._sectors_in(block)):
                    continue            # written again meanwhile
                if self.pinned(self.path, entry * SECTOR, span):
                    self._quarantine[block] = entry
                else:
                    self._release(block, entry)

    def _shrink(self):
        """Move the footer back to the end of what is in use and truncate
        the rest away."""
        span = self.geom.bitmap_size + self.geom.block_size
        end = max([o + n for o, n, _ in self.geom.metadata()] +
                  [e * SECTOR + span for e in self.bat if e != UNUSED])
        end = round_up(end, SECTOR)
        if end < self._end:
            self.file.pwrite(self.geom.footer, end)
            self.file.truncate(end + SECTOR)
            self._end = end

    def _punch(self, offset, length):
        """Free host bytes if the file system can; trim is advisory."""
        try:
            self.file.punch(offset, length)
        except OSError:
            pass

    def _zero_host(self, offset, length):
        """Make host bytes read as zeros, freeing them where possible."""
        try:
            self.file.punch(offset, length)
        except OSError:
            self.file.write_zeroes(offset, length)

    @classmethod
    def check(cls, path, ctx, repair):
        """Blocks against the file and each other, bitmaps, the two
        footers, and leaked space (as qemu-img check reports them)."""
        file = ctx.open_file(path, repair is None)
        report = CheckReport(path, FMT)
        try:
            geom = validate(file, path,
                            lambda error: report.corrupt(str(error)))
            report.image_end_offset = file.size()
            if geom.disk_type == FIXED:
                return report
            table = read_bat(file, geom)
            bat = table[:geom.bat_entries]
            report.total_clusters = geom.bat_entries
            report.allocated_clusters = sum(e != UNUSED for e in bat)
            disk = cls(file, geom, bat, repair is None)
            disk._check_footers(report, repair)
            bad = set()
            for field, message in block_problems(geom, table, file.size()):
                report.corrupt(f"{field}: {message}")
                bad.add(int(field[4:-1]))
            disk._check_bitmaps(report, bad, repair is not None)
            disk._check_leaks(report, repair is not None)
            report.image_end_offset = file.size()
            return report
        finally:
            file.close()

    def _check_footers(self, report, repair):
        """A lost end footer is harmless (the copy stands in), like a
        leak; a lost copy stops qemu, which reads the copy first."""
        geom = self.geom
        if not geom.footer_at_end:
            if repair:
                self._write_end_footer()
                report.leaks_fixed += 1
            else:
                report.leak("footer: missing at the end of the file (the "
                            "copy at offset 0 stands in)")
        if not geom.copy_valid:
            if repair == "all":
                self.file.pwrite(geom.footer, 0)
                self.file.flush()
                report.corruptions_fixed += 1
            else:
                report.corrupt("footer copy: missing or damaged at offset 0 "
                               "(qemu cannot open the image)")

    def _check_bitmaps(self, report, bad, repair):
        """A differencing disk's block whose bitmap holds no sector is a
        leak (a dynamic disk's reads whole)."""
        if not self._sparse_blocks:
            return
        for block, entry in enumerate(self.bat):
            if entry == UNUSED or block in bad:
                continue
            bits = bits_of(self.file.read(self.geom.bitmap_size,
                                          entry * SECTOR))
            if bits & span_bits(0, self._sectors_in(block)):
                continue
            if repair:
                self._release(block, entry)
                report.leaks_fixed += 1
            else:
                report.leak(f"block of BAT[{block}] at {entry * SECTOR} "
                            "holds no sectors")

    def _check_leaks(self, report, repair):
        """File space that nothing refers to, yet holds data.  (A punched
        block keeps the partial pages at its ends: blocks sit at sector,
        not page, boundaries.  Those do not count.)"""
        span = self.geom.bitmap_size + self.geom.block_size
        used = [(o, o + n) for o, n, _ in self.geom.metadata()]
        used += [(e * SECTOR, e * SECTOR + span) for e in self.bat
                 if e != UNUSED]
        used.append((self._end, self._end + SECTOR))
        pos = 0
        for start, end in sorted(used):
            gap_end = start - start % SECTOR
            if gap_end > pos and self._allocated(pos, gap_end) > \
                    2 * PAGE * (1 + (gap_end - pos) // span):
                if not repair:
                    report.leak(f"{gap_end - pos} bytes at {pos} hold data "
                                "nothing refers to")
                elif gap_end == self._end:
                    self._shrink()
                    report.leaks_fixed += 1
                else:
                    self._punch(pos, gap_end - pos)
                    report.leaks_fixed += 1
            pos = max(pos, round_up(end, SECTOR))

    def _allocated(self, start, end):
        """Host bytes allocated in [start, end) (of the file: a block
        may claim to reach past its end)."""
        end = min(end, self.file.size())
        total = 0
        while start < end:
            data = self.file.next_data(start)
            if data >= end:
                break
            hole = min(self.file.next_hole(data), end)
            total += hole - data
            start = hole
        return total

    def info(self):
        out = {"subformat": SUBFORMATS[self.geom.disk_type],
               "creator": self.geom.creator.rstrip("\0 "),
               "unique-id": str(uuid.UUID(bytes=self.unique_id))}
        if self.geom.disk_type == DIFFERENCING:
            out["parent-unique-id"] = str(uuid.UUID(
                bytes=self.geom.parent_unique_id))
            out["parent-name"] = self.geom.parent_name
        return out

    def close(self):
        super().close()
        self.file.close()
