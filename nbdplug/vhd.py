"""vpc: Microsoft Virtual Hard Disk (VHD) images, fixed, dynamic and
differencing, read and write.

Reference: Microsoft, "Virtual Hard Disk Image Format Specification" 1.0
(October 2006).  Peer: qemu's block/vpc.c (format name "vpc").

    fixed:    guest bytes | footer
    dynamic:  footer copy | dynamic header | [parent locator data] | BAT |
              block | block | ... | footer
    block:    sector bitmap (a bit per 512-byte sector, most significant
              bit first, padded to whole sectors) | block_size data bytes

A sector whose bitmap bit is clear reads from the parent (differencing) or
as zeros (dynamic).  All values are big-endian.

Nothing points at bytes that are not yet durable: a new block's data,
bitmap and the footer moved past it, then its BAT entry; data before the
bitmap bits that claim it.  Discard clears bitmap bits and releases
blocks that become empty (the BAT entry is reset, durably, before the
space is truncated away or punched).  A crash may leave the end of the
file without its footer: the copy at offset 0, which never changes,
stands in (the specification keeps it for that), and a writable open or
`check -r leaks` puts the footer back.
"""

import array
import dataclasses
import os
import re
import struct
import sys
import threading
import time
import urllib.parse
import uuid

from .check import CheckReport
from .disk import Disk, Run
from .errors import (CorruptImage, ImageError, PolicyError, RequestError,
                     UnsupportedFeature, UsageError)
from .hostfile import HostFile
from .layout import Layout

FMT = "vpc"
SECTOR = 512
MiB = 1 << 20

FOOTER = Layout(">", "vhd footer",
                "cookie:8s features:I file_format_version:I data_offset:Q "
                "time_stamp:I creator_application:4s creator_version:I "
                "creator_host_os:4s original_size:Q current_size:Q "
                "cylinders:H heads:B sectors_per_track:B disk_type:I "
                "checksum:I unique_id:16s saved_state:B reserved:427s")
DYNAMIC_HEADER = Layout(">", "vhd dynamic header",
                        "cookie:8s data_offset:Q table_offset:Q "
                        "header_version:I max_table_entries:I block_size:I "
                        "checksum:I parent_unique_id:16s "
                        "parent_time_stamp:I reserved1:I "
                        "parent_unicode_name:512s "
                        "parent_locator_entries:192s reserved2:256s")
PARENT_LOCATOR = Layout(">", "vhd parent locator",
                        "platform_code:4s platform_data_space:I "
                        "platform_data_length:I reserved:I "
                        "platform_data_offset:Q")
BAT_ENTRY = struct.Struct(">I")

COOKIE = b"conectix"
DYNAMIC_COOKIE = b"cxsparse"
VERSION = 0x00010000
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4
SUBFORMATS = {FIXED: "fixed", DYNAMIC: "dynamic",
              DIFFERENCING: "differencing"}
UNUSED = 0xFFFFFFFF                 # BAT entry of a block not allocated
NO_OFFSET = 0xFFFFFFFFFFFFFFFF      # a fixed disk's data_offset

# Parent locator platform codes we follow, in the order we try them:
# Windows relative and absolute paths (UTF-16LE) and a file:// URL (UTF-8).
# "Mac " (an opaque Mac OS alias) and the deprecated Wi2r/Wi2k are skipped.
W2RU, W2KU, MACX = b"W2ru", b"W2ku", b"MacX"
LOCATOR_CODES = (W2RU, W2KU, MACX)

# The specification's limit: 2040 GiB (qemu's VHD_MAX_SECTORS).
MAX_SIZE = 2040 << 30
# Block sizes: powers of two; 2 MiB is the default everyone writes.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = SECTOR, 256 * MiB
DEFAULT_BLOCK_SIZE = 2 * MiB
# 4 Mi entries (16 MiB of BAT) map 2040 GiB with blocks of 512 KiB or more.
MAX_BAT_ENTRIES = 1 << 22
# A parent path longer than this is not a path (Windows' limit is 32767
# UTF-16 characters).
MAX_LOCATOR_LENGTH = 64 * 1024
# Bitmaps kept in memory (FIFO); full blocks cost a dict entry only.
BITMAP_CACHE = 65536
# Seconds from the Unix epoch to 2000-01-01 00:00:00 UTC, the VHD epoch.
VHD_EPOCH = 946684800
CREATOR_APPLICATION = b"nbdp"
MAX_GEOMETRY = (65535, 16, 255)

# Writes and discards change bitmaps a whole byte (8 sectors) at a time.
# libvhdi (20210425, Debian 12) misreads a bitmap byte that mixes set and
# clear bits: it takes every sector after the first set one as present.
GRAIN = 8 * SECTOR
PAGE = 4096         # host file system allocation unit, for leak checks



def checksum(buf, field_offset):
    """One's complement of the byte sum, without the checksum field."""
    total = sum(buf) - sum(buf[field_offset:field_offset + 4])
    return ~total & 0xFFFFFFFF


def _round_up(n, to):
    return -(-n // to) * to


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A validated VHD: what the footer and dynamic header say."""
    disk_type: int
    size: int
    footer: bytes               # the footer, as rewritten at the end
    footer_at_end: bool         # False: only the copy at offset 0 is valid
    copy_valid: bool            # the footer copy at offset 0 (dynamic)
    unique_id: bytes
    creator: str
    data_offset: int = 0
    table_offset: int = 0
    max_table_entries: int = 0
    block_size: int = 0
    parent_unique_id: bytes = b""
    parent_name: str = ""
    locators: tuple = ()        # (platform_code, offset, length) in use

    @property
    def bat_entries(self):
        """BAT entries that map the disk."""
        return -(-self.size // self.block_size) if self.block_size else 0

    @property
    def sectors_per_block(self):
        return self.block_size // SECTOR

    @property
    def bitmap_size(self):
        return _round_up(-(-self.sectors_per_block // 8), SECTOR)

    def metadata(self):
        """(offset, length, name) of every structure besides blocks."""
        regions = [(0, SECTOR, "footer copy"),
                   (self.data_offset, DYNAMIC_HEADER.size,
                    "dynamic header"),
                   (self.table_offset,
                    _round_up(4 * self.max_table_entries, SECTOR), "BAT")]
        for code, offset, length in self.locators:
            regions.append((offset, _round_up(length, SECTOR),
                            f"parent locator {code.decode()}"))
        return regions


def _parse_footer(buf):
    """The footer in `buf`, or None if its cookie or checksum is wrong."""
    footer = FOOTER.unpack_from(buf)
    if footer.cookie != COOKIE or \
            footer.checksum != checksum(buf, FOOTER.offset("checksum")):
        return None
    return footer


def validate(file, path):
    """Parse and validate the footer and dynamic header of `file`."""
    file_size = file.size()
    if file_size < SECTOR:
        raise CorruptImage(path, FMT, "file is too small for a VHD footer",
                           "footer")
    end = bytes(file.read(SECTOR, file_size - SECTOR))
    head = bytes(file.read(SECTOR, 0))
    footer_end, footer_head = _parse_footer(end), _parse_footer(head)
    copy_valid = footer_head is not None and \
        footer_head.disk_type in (DYNAMIC, DIFFERENCING)
    if footer_end is not None:
        footer, raw = footer_end, end
    elif copy_valid:
        # The specification keeps the copy for a damaged end footer.
        footer, raw = footer_head, head
    elif COOKIE in (end[:8], head[:8]):
        raise CorruptImage(path, FMT, "footer checksum mismatch",
                           "footer.checksum")
    else:
        raise CorruptImage(path, FMT, "no VHD footer ('conectix') at the "
                           "end of the file", "footer.cookie")
    if footer.file_format_version >> 16 != VERSION >> 16:
        raise UnsupportedFeature(path, FMT, "format version "
                                 f"{footer.file_format_version:#x}",
                                 "footer.file_format_version")
    if footer.disk_type not in SUBFORMATS:
        raise CorruptImage(path, FMT, f"disk type {footer.disk_type} is "
                           "not fixed (2), dynamic (3) or differencing (4)",
                           "footer.disk_type")
    size = footer.current_size
    if size % SECTOR:
        raise CorruptImage(path, FMT, f"size {size} is not a whole number "
                           "of sectors", "footer.current_size")
    if size > MAX_SIZE:
        raise UnsupportedFeature(path, FMT, f"size {size} exceeds the "
                                 "2040 GiB VHD limit", "footer.current_size")
    common = dict(disk_type=footer.disk_type, size=size, footer=bytes(raw),
                  footer_at_end=footer_end is not None,
                  copy_valid=copy_valid, unique_id=footer.unique_id,
                  creator=footer.creator_application.decode("latin-1"))
    if footer.disk_type == FIXED:
        if file_size - SECTOR < size:
            raise CorruptImage(path, FMT, f"file of {file_size} bytes is "
                               f"too short for a disk of {size}",
                               "footer.current_size")
        return Geometry(**common)
    return Geometry(**common, **_dynamic_fields(file, path, footer,
                                                file_size))


def _dynamic_fields(file, path, footer, file_size):
    """Validate the dynamic header; its fields for the Geometry."""
    offset = footer.data_offset
    if offset < SECTOR or offset % SECTOR or \
            offset + DYNAMIC_HEADER.size > file_size:
        raise CorruptImage(path, FMT, f"dynamic header offset {offset} is "
                           "outside the file", "footer.data_offset")
    buf = file.read(DYNAMIC_HEADER.size, offset)
    hdr = DYNAMIC_HEADER.unpack_from(buf)
    if hdr.cookie != DYNAMIC_COOKIE:
        raise CorruptImage(path, FMT, "no dynamic header ('cxsparse')",
                           "dynamic header.cookie")
    if hdr.checksum != checksum(buf, DYNAMIC_HEADER.offset("checksum")):
        raise CorruptImage(path, FMT, "dynamic header checksum mismatch",
                           "dynamic header.checksum")
    if hdr.header_version >> 16 != VERSION >> 16:
        raise UnsupportedFeature(path, FMT, "dynamic header version "
                                 f"{hdr.header_version:#x}",
                                 "dynamic header.header_version")
    bs = hdr.block_size
    if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise CorruptImage(path, FMT, f"block size {bs} is not a power of "
                           f"two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
                           "dynamic header.block_size")
    needed = -(-footer.current_size // bs)
    entries = hdr.max_table_entries
    if entries < needed:
        raise CorruptImage(path, FMT, f"{entries} BAT entries cannot map "
                           f"{footer.current_size} bytes",
                           "dynamic header.max_table_entries")
    if entries > MAX_BAT_ENTRIES:
        raise UnsupportedFeature(path, FMT, f"BAT of {entries} entries is "
                                 f"larger than {MAX_BAT_ENTRIES}",
                                 "dynamic header.max_table_entries")
    table = hdr.table_offset
    if table < SECTOR or table + 4 * entries > file_size:
        raise CorruptImage(path, FMT, f"BAT at {table} lies outside the "
                           "file", "dynamic header.table_offset")
    fields = dict(data_offset=offset, table_offset=table,
                  max_table_entries=entries, block_size=bs)
    if footer.disk_type == DIFFERENCING:
        fields.update(parent_unique_id=hdr.parent_unique_id,
                      # Informational only: the locators find the parent.
                      parent_name=_utf16(path, hdr.parent_unicode_name,
                                         "utf-16-be", None, "replace"),
                      locators=_locators(path, hdr, file_size))
    return fields


def _locators(path, hdr, file_size):
    """(platform_code, offset, length) of each parent locator in use."""
    out = []
    for i in range(8):
        loc = PARENT_LOCATOR.unpack_from(hdr.parent_locator_entries,
                                         i * PARENT_LOCATOR.size)
        if loc.platform_code == bytes(4):
            continue
        field = f"parent locator {i}"
        length, offset = loc.platform_data_length, loc.platform_data_offset
        if length > MAX_LOCATOR_LENGTH:
            raise CorruptImage(path, FMT, f"length {length} is absurd",
                               field)
        if offset < SECTOR or offset + length > file_size:
            raise CorruptImage(path, FMT, f"data at {offset}+{length} lies "
                               "outside the file", field)
        out.append((loc.platform_code, offset, length))
    return tuple(out)


def _utf16(path, raw, encoding, field, errors="strict"):
    """UTF-16 text up to its first NUL character."""
    for i in range(0, len(raw) - 1, 2):
        if raw[i] == raw[i + 1] == 0:
            raw = raw[:i]
            break
    try:
        return bytes(raw).decode(encoding, errors)
    except UnicodeDecodeError:
        raise CorruptImage(path, FMT, "not valid UTF-16", field) from None


def _locator_name(path, code, raw, field):
    """The parent's path a locator records, or None if it names none."""
    if code == MACX:
        try:
            url = urllib.parse.urlsplit(raw.decode("utf-8").rstrip("\0"))
        except (UnicodeDecodeError, ValueError):
            raise CorruptImage(path, FMT, "not a valid file URL",
                               field) from None
        if url.scheme != "file" or url.netloc not in ("", "localhost"):
            return None
        return urllib.parse.unquote(url.path) or None
    return windows_path(_utf16(path, raw, "utf-16-le", field)) or None


def windows_path(name):
    """A Windows path as a path here: slashes, and no drive letter (which
    means nothing here; the path below it may)."""
    return re.sub(r"^[A-Za-z]:(?=/)", "", name.replace("\\", "/"))


def read_bat(file, geom):
    """The BAT entries that map the disk, as sector numbers."""
    bat = array.array("I", file.read(4 * geom.bat_entries,
                                     geom.table_offset))
    if sys.byteorder == "little":
        bat.byteswap()
    return bat


def block_problems(geom, bat, file_size):
    """(field, message) for each block outside the file or overlapping
    metadata or another block."""
    span = geom.bitmap_size + geom.block_size
    metadata = geom.metadata()
    blocks = sorted((entry * SECTOR, i) for i, entry in enumerate(bat)
                    if entry != UNUSED)
    prev_end, prev = 0, None
    for start, i in blocks:
        field, end = f"BAT[{i}]", start + span
        if end > file_size:
            yield field, (f"block at {start} lies past the end of the file "
                          f"({file_size})")
        for m_start, m_len, name in metadata:
            if start < m_start + m_len and m_start < end:
                yield field, f"block at {start} overlaps the {name}"
        if start < prev_end:
            yield field, f"block at {start} overlaps the block of BAT[{prev}]"
        prev_end, prev = max(prev_end, end), i


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
        self._bitmaps = {}
        self._full = span_bits(0, 8 * geom.bitmap_size)
        # Where the next block goes: over the end footer, or past the end
        # of a file whose end footer is missing.
        size = file.size()
        self._end = size - SECTOR if geom.footer_at_end else \
            _round_up(size, SECTOR)

    # --- opening and creating ------------------------------------------

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
            geom = validate(file, path)
            bat = read_bat(file, geom) if geom.disk_type != FIXED else None
            if bat is not None:
                for field, message in block_problems(geom, bat, file.size()):
                    raise CorruptImage(path, FMT, message, field)
            disk = cls(file, geom, bat, readonly)
            if geom.disk_type == DIFFERENCING:
                disk._open_parent(ctx)
            if not readonly and not geom.footer_at_end:
                disk._write_end_footer()
            return disk
        except BaseException:
            if disk is not None:
                disk.close()
            else:
                file.close()
            raise

    def _open_parent(self, ctx):
        """Follow the parent locators to the parent whose unique id this
        disk records; the first refusal is the one reported."""
        errors = []
        by_code = sorted(self.geom.locators,
                         key=lambda loc: LOCATOR_CODES.index(loc[0])
                         if loc[0] in LOCATOR_CODES else len(LOCATOR_CODES))
        for code, offset, length in by_code:
            if code not in LOCATOR_CODES:
                continue
            field = f"parent locator {code.decode()}"
            name = _locator_name(self.path, code,
                                 bytes(self.file.read(length, offset)),
                                 field)
            if name is None:
                continue
            try:
                parent = ctx.open_backing(self.path, FMT, name, FMT, field)
            except ImageError as e:
                errors.append(e)
                continue
            if parent.unique_id != self.geom.parent_unique_id or \
                    parent.size != self.size:
                what = "unique id" if parent.size == self.size else "size"
                parent.close()
                errors.append(CorruptImage(
                    self.path, FMT, f"{name!r} is not the parent: its "
                    f"{what} differs", field))
                continue
            self.backing = parent
            self.backing_name = self.geom.parent_name or name
            return
        if errors:
            raise errors[0]
        raise CorruptImage(self.path, FMT, "differencing disk has no parent "
                           "locator we can follow", "parent locator")

    @classmethod
    def create(cls, path, size, options, backing=None, backing_fmt=None):
        opts = dict(options)
        subformat = opts.pop("subformat", "dynamic")
        block_size = _block_size_option(opts.pop("block_size", None))
        if opts:
            raise UsageError("vpc does not take -o "
                             + ",".join(sorted(opts)))
        if subformat not in ("fixed", "dynamic"):
            raise UsageError(f"subformat {subformat!r}: expected fixed or "
                             "dynamic")
        if size % SECTOR or size > MAX_SIZE:
            raise UsageError(f"size {size}: a VHD is a whole number of "
                             "512-byte sectors, at most 2040 GiB")
        parent = None
        if backing is not None:
            if subformat == "fixed":
                raise UsageError("a fixed VHD cannot have a parent")
            if backing_fmt not in (None, FMT):
                raise UsageError(f"the parent of a differencing VHD must be "
                                 f"a VHD, not {backing_fmt}")
            parent = _parent_facts(path, backing)
            if size != parent["size"]:
                raise UsageError(f"size {size} differs from the parent's "
                                 f"{parent['size']}")
        disk_type = FIXED if subformat == "fixed" else \
            DIFFERENCING if parent else DYNAMIC
        footer = _new_footer(size, disk_type)
        with open(path, "xb") as f:
            if disk_type == FIXED:
                f.truncate(size)
                f.seek(size)
                f.write(footer)
                return
            f.write(_dynamic_layout(size, block_size, footer, parent))

    # --- mapping -------------------------------------------------------

    def _bitmap(self, block, entry):
        """The block's sector bitmap as bits (see bits())."""
        bits = self._bitmaps.get(block)
        if bits is None:
            bits = bits_of(self.file.read(self.geom.bitmap_size,
                                          entry * SECTOR))
            self._cache(block, bits)
        return bits

    def _cache(self, block, bits):
        if bits == self._full:
            bits = self._full       # one object for every full block
        if len(self._bitmaps) >= BITMAP_CACHE:
            del self._bitmaps[next(iter(self._bitmaps))]
        self._bitmaps[block] = bits

    def _sectors_in(self, block):
        """Sectors of `block` that lie inside the disk."""
        spb = self.geom.sectors_per_block
        return min(spb, (self.size - block * self.geom.block_size)
                   // SECTOR)

    def _runs(self, offset, length):
        """(offset, length, host offset or None) covering the range in
        order; None: the bytes come from the parent, or are zeros."""
        if self.geom.disk_type == FIXED:
            return [(offset, length, offset)]
        bs, bitmap_size = self.geom.block_size, self.geom.bitmap_size
        runs = []

        def add(off, n, host):
            if runs:
                p_off, p_n, p_host = runs[-1]
                if (p_host is None and host is None) or (
                        p_host is not None and host == p_host + p_n):
                    runs[-1] = (p_off, p_n + n, p_host)
                    return
            runs.append((off, n, host))

        end = offset + length
        with self._lock:
            while offset < end:
                block, within = divmod(offset, bs)
                n = min(end - offset, bs - within)
                entry = self.bat[block]
                if entry == UNUSED:
                    add(offset, n, None)
                    offset += n
                    continue
                data = entry * SECTOR + bitmap_size
                bits = self._bitmap(block, entry)
                first = within // SECTOR
                last = -(-(within + n) // SECTOR)
                for s, e, present in bit_runs(bits, first, last):
                    a = max(within, s * SECTOR)
                    b = min(within + n, e * SECTOR)
                    add(offset + a - within, b - a,
                        data + a if present else None)
                offset += n
        return runs

    def pread(self, buf, offset):
        geom = self.geom
        if geom.block_size:
            # Fast path: inside one block whose every sector is present.
            block, within = divmod(offset, geom.block_size)
            if 0 <= offset and within + len(buf) <= geom.block_size and \
                    offset + len(buf) <= self.size and \
                    self._bitmaps.get(block) is self._full:
                self.file.pread(buf, self.bat[block] * SECTOR +
                                geom.bitmap_size + within)
                return
        self._check_request(len(buf), offset, write=False)
        view = memoryview(buf)
        pos = 0
        for off, n, host in self._runs(offset, len(buf)):
            part = view[pos:pos + n]
            if host is not None:
                self.file.pread(part, host)
            elif self.backing is not None:
                self.backing.pread(part, off)
            else:
                part[:] = bytes(n)
            pos += n

    def map(self, count, offset):
        out = []
        for off, n, host in self._runs(offset, count):
            if host is not None:
                out.append(Run(off, n, True, False, True, 0,
                               (self.path, host)))
            elif self.backing is not None:
                out.extend(r._replace(depth=r.depth + 1)
                           for r in self.backing.map(n, off))
            else:
                # Like qemu: the format defines unallocated sectors as zero.
                out.append(Run(off, n, True, True, False, 0, None))
        return out

    # --- writing -------------------------------------------------------

    def pwrite(self, buf, offset, fua=False):
        self._check_request(len(buf), offset)
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
        start, stop = offset - offset % grain, _round_up(end, grain)
        if (start, stop) != (offset, end):
            whole = bytearray(stop - start)
            self.pread(memoryview(whole)[:grain], start)
            self.pread(memoryview(whole)[-grain:], stop - grain)
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

    # --- discard -------------------------------------------------------

    def trim(self, count, offset, fua=False):
        self._check_request(count, offset)
        with self._lock:
            self._discard(count, offset)
            if fua:
                self.file.flush()

    def zero(self, count, offset, may_trim=False, fua=False):
        self._check_request(count, offset)
        with self._lock:
            end, grain = offset + count, self._grain
            start = _round_up(offset, grain)
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
        start = _round_up(offset, grain)
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
            self._release(block, entry)
            return
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

    def _shrink(self):
        """Move the footer back to the end of what is in use and truncate
        the rest away."""
        span = self.geom.bitmap_size + self.geom.block_size
        end = max([o + n for o, n, _ in self.geom.metadata()] +
                  [e * SECTOR + span for e in self.bat if e != UNUSED])
        end = _round_up(end, SECTOR)
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

    # --- checks and description ----------------------------------------

    def _check_request(self, count, offset, write=True):
        if write:
            self.check_writable()
        if offset < 0 or count < 0 or offset + count > self.size:
            raise RequestError(self.path, FMT, f"request {offset}+{count} "
                               f"is beyond the end of the disk "
                               f"({self.size})")

    @classmethod
    def check(cls, path, ctx, repair):
        """Blocks against the file and each other, bitmaps, the two
        footers, and leaked space (as qemu-img check reports them)."""
        file = ctx.open_file(path, repair is None)
        report = CheckReport(path, FMT)
        try:
            geom = validate(file, path)
            report.image_end_offset = file.size()
            if geom.disk_type == FIXED:
                return report
            bat = read_bat(file, geom)
            report.total_clusters = geom.bat_entries
            report.allocated_clusters = sum(e != UNUSED for e in bat)
            disk = cls(file, geom, bat, repair is None)
            disk._check_footers(report, repair)
            bad = set()
            for field, message in block_problems(geom, bat, file.size()):
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
        """A block whose bitmap holds no sector is a leak."""
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
            pos = max(pos, _round_up(end, SECTOR))

    def _allocated(self, start, end):
        """Host bytes allocated in [start, end)."""
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


# --- bitmaps ----------------------------------------------------------------

# Bit order reversed within each byte: VHD numbers a bitmap's bits from the
# most significant, VHDX from the least.
_REVERSE = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def bits_of(raw):
    """A VHD sector bitmap as an int whose bit i is sector i."""
    return int.from_bytes(bytes(raw).translate(_REVERSE), "little")


def raw_bitmap(bits, size):
    """The `size` bytes of a VHD sector bitmap holding `bits`."""
    return bits.to_bytes(size, "little").translate(_REVERSE)


def span_bits(first, last):
    """Bits first .. last - 1 set."""
    return ((1 << (last - first)) - 1) << first


def bit_runs(bits, first, last):
    """(start, end, present) runs of equal bits of the int `bits` in
    [first, last)."""
    i = first
    while i < last:
        present = bool(bits >> i & 1)
        # The run ends at the first bit that differs: the lowest set bit
        # of the rest, complemented when the run is of ones.
        rest = ~(bits >> i) if present else bits >> i
        j = min(last, i + (rest & -rest).bit_length() - 1) if rest else last
        yield i, j, present
        i = j


# --- creating ---------------------------------------------------------------

def _block_size_option(text):
    if text is None:
        return DEFAULT_BLOCK_SIZE
    from .cli import parse_size     # at call time: cli imports the drivers
    bs = parse_size(text)
    if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise UsageError(f"block_size {text}: a power of two from "
                         f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE // MiB}M")
    return bs


def chs_geometry(size):
    """Cylinders, heads, sectors per track: the specification's appendix
    algorithm, or the maximum geometry when the result does not multiply
    back to `size` (qemu then reads the footer's size, as Hyper-V does)."""
    total = min(size // SECTOR, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    cylinders = cth // heads
    if cylinders * heads * spt * SECTOR != size:
        return MAX_GEOMETRY
    return cylinders, heads, spt


def _now():
    return max(0, int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF


def _new_footer(size, disk_type):
    cylinders, heads, spt = chs_geometry(size)
    fields = dict(cookie=COOKIE, features=2, file_format_version=VERSION,
                  data_offset=NO_OFFSET if disk_type == FIXED else SECTOR,
                  time_stamp=_now(), creator_application=CREATOR_APPLICATION,
                  creator_version=0x00010000, creator_host_os=b"Wi2k",
                  original_size=size, current_size=size,
                  cylinders=cylinders, heads=heads, sectors_per_track=spt,
                  disk_type=disk_type, checksum=0,
                  unique_id=uuid.uuid4().bytes, saved_state=0,
                  reserved=bytes(427))
    return _with_checksum(FOOTER, fields)


def _with_checksum(layout, fields):
    raw = bytearray(layout.pack(**fields))
    struct.pack_into(">I", raw, layout.offset("checksum"),
                     checksum(raw, layout.offset("checksum")))
    return bytes(raw)


def _parent_facts(path, backing):
    """What a differencing child records of its parent (already vetted
    by the open policy): unique id, size, time stamp and locators."""
    child_dir = os.path.dirname(os.path.abspath(path))
    parent = os.path.abspath(os.path.join(child_dir, backing))
    file = HostFile(parent)
    try:
        geom = validate(file, parent)
        mtime = int(os.fstat(file.fd).st_mtime)
    finally:
        file.close()
    if len(backing) > 255:
        raise UsageError(f"parent name {backing!r} is longer than the 255 "
                         "characters a VHD records")
    relative = os.path.relpath(parent, child_dir)
    locators = [
        (W2RU, (".\\" + relative.replace("/", "\\")).encode("utf-16-le")),
        (W2KU, parent.replace("/", "\\").encode("utf-16-le")),
        (MACX, ("file://" + urllib.parse.quote(parent)).encode("utf-8")),
    ]
    return {"size": geom.size, "unique_id": geom.unique_id,
            "time_stamp": max(0, mtime - VHD_EPOCH) & 0xFFFFFFFF,
            "name": backing, "locators": locators}


def _dynamic_layout(size, block_size, footer, parent):
    """The bytes of a new dynamic or differencing VHD with an empty BAT:
    footer copy, dynamic header, locator data, BAT, footer."""
    entries = -(-size // block_size)
    pos = SECTOR + DYNAMIC_HEADER.size
    locator_entries, locator_data = bytearray(192), bytearray()
    for i, (code, data) in enumerate(parent["locators"] if parent else ()):
        space = _round_up(len(data), SECTOR)
        # Space in bytes, as Virtual PC and Hyper-V write it (the
        # specification says sectors).
        PARENT_LOCATOR.pack_into(locator_entries, i * PARENT_LOCATOR.size,
                                 PARENT_LOCATOR.tuple(code, space, len(data),
                                                      0, pos))
        locator_data += data + bytes(space - len(data))
        pos += space
    header = dict(cookie=DYNAMIC_COOKIE, data_offset=NO_OFFSET,
                  table_offset=pos, header_version=VERSION,
                  max_table_entries=entries, block_size=block_size,
                  checksum=0, parent_unique_id=bytes(16),
                  parent_time_stamp=0, reserved1=0,
                  parent_unicode_name=bytes(512),
                  parent_locator_entries=bytes(locator_entries),
                  reserved2=bytes(256))
    if parent:
        header.update(parent_unique_id=parent["unique_id"],
                      parent_time_stamp=parent["time_stamp"],
                      parent_unicode_name=parent["name"].encode(
                          "utf-16-be"))
    bat = b"\xff" * (4 * entries)
    bat += b"\xff" * (_round_up(len(bat), SECTOR) - len(bat))
    return b"".join([footer, _with_checksum(DYNAMIC_HEADER, header),
                     bytes(locator_data), bat, footer])
