"""Reading and validating a VHD: footer (or its copy), dynamic header,
parent locators and BAT, before anything else trusts them."""

import array
import dataclasses
import sys
import urllib.parse

from nbdplug.errors import CorruptImage, UnsupportedFeature
from ..differencing import windows_path
from .structs import (COOKIE, DIFFERENCING, DYNAMIC, DYNAMIC_COOKIE,
                      DYNAMIC_HEADER, FIXED, FMT, FOOTER, MACX,
                      MAX_BAT_ENTRIES, MAX_BLOCK_SIZE, MAX_GEOMETRY,
                      MAX_LOCATOR_LENGTH,
                      MAX_SIZE, MIN_BLOCK_SIZE, PARENT_LOCATOR, SECTOR,
                      SUBFORMATS, UNUSED, VERSION, checksum, round_up)


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
        return round_up(-(-self.sectors_per_block // 8), SECTOR)

    def metadata(self):
        """(offset, length, name) of every structure besides blocks."""
        regions = [(0, SECTOR, "footer copy"),
                   (self.data_offset, DYNAMIC_HEADER.size,
                    "dynamic header"),
                   (self.table_offset,
                    round_up(4 * self.max_table_entries, SECTOR), "BAT")]
        for code, offset, length in self.locators:
            regions.append((offset, round_up(length, SECTOR),
                            f"parent locator {code.decode()}"))
        return regions


def _parse_footer(buf):
    """The footer in `buf`, or None if its cookie or checksum is wrong."""
    footer = FOOTER.unpack_from(buf)
    if footer.cookie != COOKIE or \
            footer.checksum != checksum(buf, FOOTER.offset("checksum")):
        return None
    return footer


# Creators whose disks qemu sizes by current_size, not by the CHS geometry
# (Hyper-V, qemu's force_size, Disk2vhd, XenConverter, XenServer).
SIZED_BY_FOOTER = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")


def disk_size(footer):
    """The disk's size as qemu reads it: Virtual PC (and any creator not
    known to do otherwise) sizes a disk by its CHS geometry, unless that
    is the largest geometry, which stands for "see current_size"."""
    cylinders, heads, sectors = MAX_GEOMETRY
    chs = footer.cylinders * footer.heads * footer.sectors_per_track
    if footer.creator_application in SIZED_BY_FOOTER or \
            chs == cylinders * heads * sectors:
        return footer.current_size // SECTOR * SECTOR
    return chs * SECTOR


def _raise(error):
    raise error


def validate(file, path, tolerate=None):
    """Parse and validate the footer and dynamic header of `file`.

    Faults a reader can live with, because qemu reads past them and what
    is read stays bounded and inside the file, go to `tolerate` (without
    it they are raised, as a writer wants): an unknown format or dynamic
    header version, a dynamic header checksum mismatch, a fixed disk
    shorter than its size (the rest reads as zeros).
    """
    file_size = file.size()
    if file_size < SECTOR:
        raise CorruptImage(path, FMT, "file is too small for a VHD footer",
                           "footer")
    # A reader, as qemu, takes the file in whole sectors: a footer cut
    # short (by a copy that lost its last bytes) ends in zeros.
    footer_at = (file_size if tolerate is None else
                 round_up(file_size, SECTOR)) - SECTOR
    tolerate = tolerate or _raise
    end = bytes(file.read(SECTOR, footer_at))
    head = bytes(file.read(SECTOR, 0))
    footer_end, footer_head = _parse_footer(end), _parse_footer(head)
    copy_valid = footer_head is not None and \
        footer_head.disk_type in (DYNAMIC, DIFFERENCING)
    if copy_valid:
        # qemu reads the copy first, so where both are sound but differ
        # (the copy never changes after creation) it decides.
        footer, raw = footer_head, head
    elif footer_end is not None:
        # The footer itself: a fixed disk has no copy, and a damaged copy
        # is what the specification keeps the end footer for (qemu
        # refuses it, README "Deliberate leniencies").
        footer, raw = footer_end, end
    elif footer_head is not None and footer_head.disk_type not in SUBFORMATS:
        # A sound copy of a disk type we do not read (qemu reads it as a
        # fixed disk): refused below for its type, README "Deliberate
        # refusals".
        footer, raw = footer_head, head
    elif COOKIE in (end[:8], head[:8]):
        raise CorruptImage(path, FMT, "footer checksum mismatch",
                           "footer.checksum")
    else:
        raise CorruptImage(path, FMT, "no VHD footer ('conectix') at the "
                           "end of the file", "footer.cookie")
    if footer.file_format_version >> 16 != VERSION >> 16:
        tolerate(UnsupportedFeature(path, FMT, "format version "
                                    f"{footer.file_format_version:#x}",
                                    "footer.file_format_version"))
    if footer.disk_type not in SUBFORMATS:
        raise CorruptImage(path, FMT, f"disk type {footer.disk_type} is "
                           "not fixed (2), dynamic (3) or differencing (4)",
                           "footer.disk_type")
    size = disk_size(footer)
    if size > MAX_SIZE:
        raise UnsupportedFeature(path, FMT, f"size {size} exceeds the "
                                 "2040 GiB VHD limit", "footer.current_size")
    common = dict(disk_type=footer.disk_type, size=size, footer=bytes(raw),
                  footer_at_end=footer_end is not None,
                  copy_valid=copy_valid, unique_id=footer.unique_id,
                  creator=footer.creator_application.decode("latin-1"))
    if footer.disk_type == FIXED:
        if footer_at < size:
            tolerate(CorruptImage(path, FMT, f"file of {file_size} bytes is "
                                  f"too short for a disk of {size}",
                                  "footer.current_size"))
        return Geometry(**common)
    return Geometry(**common, **_dynamic_fields(file, path, footer, size,
                                                file_size, tolerate))


def _dynamic_fields(file, path, footer, size, file_size, tolerate):
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
        tolerate(CorruptImage(path, FMT, "dynamic header checksum mismatch",
                              "dynamic header.checksum"))
    if hdr.header_version >> 16 != VERSION >> 16:
        tolerate(UnsupportedFeature(path, FMT, "dynamic header version "
                                    f"{hdr.header_version:#x}",
                                    "dynamic header.header_version"))
    bs = hdr.block_size
    if bs & (bs - 1) or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE:
        raise CorruptImage(path, FMT, f"block size {bs} is not a power of "
                           f"two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}",
                           "dynamic header.block_size")
    needed = -(-size // bs)
    entries = hdr.max_table_entries
    if entries < needed:
        raise CorruptImage(path, FMT, f"{entries} BAT entries cannot map "
                           f"{size} bytes",
                           "dynamic header.max_table_entries")
    if entries > MAX_BAT_ENTRIES:
        raise UnsupportedFeature(path, FMT, f"BAT of {entries} entries is "
                                 f"larger than {MAX_BAT_ENTRIES}",
                                 "dynamic header.max_table_entries")
    table = hdr.table_offset
    if table < SECTOR or round_up(table + 4 * entries, SECTOR) > file_size:
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


def locator_name(path, code, raw, field):
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


def read_bat(file, geom):
    """The whole BAT, as sector numbers (entries past those that map the
    disk matter only to where blocks may lie)."""
    bat = array.array("I", file.read(4 * geom.max_table_entries,
                                     geom.table_offset))
    if sys.byteorder == "little":
        bat.byteswap()
    return bat


def block_problems(geom, bat, file_size, overlaps=True):
    """(field, message) for each block of the whole BAT outside the file
    (as qemu, which refuses such a table as truncated) or, with
    `overlaps`, each block mapping the disk that overlaps metadata or
    another such block."""
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
        if not overlaps or i >= geom.bat_entries:
            continue
        for m_start, m_len, name in metadata:
            if start < m_start + m_len and m_start < end:
                yield field, f"block at {start} overlaps the {name}"
        if start < prev_end:
            yield field, f"block at {start} overlaps the block of BAT[{prev}]"
        prev_end, prev = max(prev_end, end), i
