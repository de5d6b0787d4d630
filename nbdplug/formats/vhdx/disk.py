"""vhdx: Microsoft VHDX images (Hyper-V), fixed, dynamic and differencing,
read-only.

Reference: [MS-VHDX] "Virtual Hard Disk v2 (VHDX) File Format" 1.0.
Peer: qemu's block/vhdx.c (which refuses differencing images).

    0       file type identifier ("vhdxfile", creator)
    64 KiB  header 1;  128 KiB header 2   (sequence number, CRC-32C)
    192 KiB region table 1;  256 KiB region table 2  (where the BAT and
            the metadata region are)
    1 MiB.. log, BAT, metadata, payload blocks, sector bitmap blocks,
            all at 1 MiB boundaries

The BAT interleaves payload entries with one sector bitmap entry per chunk
(the payload blocks a 1 MiB bitmap block covers).  A partially present
block of a differencing disk reads the sectors whose bitmap bit is set
(least significant bit first) from this file, the others from the parent.
A log the header names is replayed into memory (log.py).  All values
are little-endian; GUIDs are stored as Windows lays them out.
"""

import array
import dataclasses
import sys
import threading
import uuid

from nbdplug.cache import Cache
from nbdplug.disk import BACKING, DATA, ZERO, Disk, HostRange, Run, add_run
from nbdplug.errors import CorruptImage, UnsupportedFeature
from nbdplug.layout import Layout
from ..differencing import bit_runs, open_parent, windows_path
from .log import checksum_ok, replay

FMT = "vhdx"
KiB, MiB = 1 << 10, 1 << 20

FILE_IDENTIFIER = Layout("<", "vhdx file identifier",
                         "signature:8s creator:512s")
HEADER = Layout("<", "vhdx header",
                "signature:4s checksum:I sequence_number:Q "
                "file_write_guid:16s data_write_guid:16s log_guid:16s "
                "log_version:H version:H log_length:I log_offset:Q")
REGION_TABLE_HEADER = Layout("<", "vhdx region table header",
                             "signature:4s checksum:I entry_count:I "
                             "reserved:I")
REGION_TABLE_ENTRY = Layout("<", "vhdx region table entry",
                            "guid:16s file_offset:Q length:I required:I")
METADATA_TABLE_HEADER = Layout("<", "vhdx metadata table header",
                               "signature:8s reserved:H entry_count:H "
                               "reserved2:20s")
METADATA_TABLE_ENTRY = Layout("<", "vhdx metadata table entry",
                              "item_id:16s offset:I length:I flags:I "
                              "reserved2:I")
FILE_PARAMETERS = Layout("<", "vhdx file parameters",
                         "block_size:I flags:I")
PARENT_LOCATOR_HEADER = Layout("<", "vhdx parent locator header",
                               "locator_type:16s reserved:H "
                               "key_value_count:H")
PARENT_LOCATOR_ENTRY = Layout("<", "vhdx parent locator entry",
                              "key_offset:I value_offset:I key_length:H "
                              "value_length:H")

HEADER_OFFSETS = (64 * KiB, 128 * KiB)
HEADER_SIZE = 4 * KiB
REGION_TABLE_OFFSETS = (192 * KiB, 256 * KiB)
REGION_TABLE_SIZE = 64 * KiB
METADATA_TABLE_SIZE = 64 * KiB
MAX_ENTRIES = 2047              # region and metadata table entries


def _guid(text):
    """A GUID as VHDX stores it."""
    return uuid.UUID(text).bytes_le


BAT_REGION = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_REGION = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_ITEM = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_ITEM = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
VIRTUAL_DISK_ID_ITEM = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE_ITEM = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE_ITEM = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_ITEM = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_LOCATOR = _guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")
# Metadata items we read, and the length each must have.
ITEMS = {FILE_PARAMETERS_ITEM: ("file parameters", 8),
         VIRTUAL_DISK_SIZE_ITEM: ("virtual disk size", 8),
         VIRTUAL_DISK_ID_ITEM: ("virtual disk id", 16),
         LOGICAL_SECTOR_SIZE_ITEM: ("logical sector size", 4),
         PHYSICAL_SECTOR_SIZE_ITEM: ("physical sector size", 4),
         PARENT_LOCATOR_ITEM: ("parent locator", None)}
MAX_PARENT_LOCATOR = 64 * KiB
LEAVE_BLOCK_ALLOCATED, HAS_PARENT = 1, 2    # file parameters flags

# BAT entry states (the low 3 bits); the file offset is in bits 20-63.
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
SB_BLOCK_SIZE = MiB
CHUNK_SECTORS = 1 << 23         # sectors one sector bitmap block covers

MAX_SIZE = 64 << 40             # the specification's limit: 64 TiB
MAX_BAT_ENTRIES = 1 << 22       # 32 MiB of BAT held in memory
BITMAP_CACHE = 4096             # per-block bitmaps kept (FIFO)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A validated VHDX: header, regions and metadata."""
    header: tuple
    size: int
    block_size: int
    logical_sector_size: int
    physical_sector_size: int
    has_parent: bool
    fixed: bool                 # leave_block_allocated: blocks stay put
    virtual_disk_id: bytes
    bat_offset: int
    bat_entries: int
    regions: tuple              # (offset, length, name) the blocks avoid
    locator: dict               # parent locator key -> value
    creator: str

    @property
    def chunk_ratio(self):
        return CHUNK_SECTORS * self.logical_sector_size // self.block_size

    @property
    def payload_blocks(self):
        return -(-self.size // self.block_size)

    def bat_index(self, block):
        """BAT entry of payload block `block`."""
        return block + block // self.chunk_ratio

    def bitmap_index(self, block):
        """BAT entry of the sector bitmap block covering `block`."""
        return (block // self.chunk_ratio + 1) * (self.chunk_ratio + 1) - 1


def _current_header(file, path):
    """The valid header with the higher sequence number.  As qemu, a copy
    of another version is not valid (the other copy is used); the log's
    placement matters only when there is a log to replay."""
    best, versions = None, set()
    for offset in HEADER_OFFSETS:
        buf = file.read(HEADER_SIZE, offset)
        hdr = HEADER.unpack_from(buf)
        if hdr.signature != b"head" or not checksum_ok(buf):
            continue
        versions.add(hdr.version)
        if hdr.version == 1 and (best is None or hdr.sequence_number >
                                 best.sequence_number):
            best = hdr
    if best is None and versions:
        raise UnsupportedFeature(path, FMT, f"version {max(versions)}",
                                 "header.version")
    if best is None:
        raise CorruptImage(path, FMT, "neither header copy is valid "
                           "(signature or CRC-32C)", "header")
    if best.log_version != 0:
        raise UnsupportedFeature(path, FMT, f"log version "
                                 f"{best.log_version}", "header.log_version")
    if best.log_length and (best.log_offset % MiB or best.log_offset < MiB
                            or best.log_guid != bytes(16) and
                            best.log_length % MiB):
        raise CorruptImage(path, FMT, "log is not placed at 1 MiB "
                           "boundaries", "header.log_offset")
    if best.log_offset + best.log_length > file.size():
        raise CorruptImage(path, FMT, "log lies past the end of the file",
                           "header.log_length")
    return best


def _regions(src, path, header, file_size):
    """(BAT offset, BAT length, metadata offset, metadata length) from the
    first valid region table; regions must not overlap."""
    for offset in REGION_TABLE_OFFSETS:
        buf = src.read(REGION_TABLE_SIZE, offset)
        table = REGION_TABLE_HEADER.unpack_from(buf)
        if table.signature == b"regi" and checksum_ok(buf):
            break
    else:
        raise CorruptImage(path, FMT, "neither region table copy is valid "
                           "(signature or CRC-32C)", "region table")
    if table.entry_count > MAX_ENTRIES:
        raise CorruptImage(path, FMT, f"{table.entry_count} entries",
                           "region table.entry_count")
    found = {}
    used = [(0, MiB, "header section")]
    if header.log_length:
        used.append((header.log_offset, header.log_length, "log"))
    for i in range(table.entry_count):
        entry = REGION_TABLE_ENTRY.unpack_from(
            buf, REGION_TABLE_HEADER.size + i * REGION_TABLE_ENTRY.size)
        field = f"region table entry {i}"
        name = {BAT_REGION: "BAT", METADATA_REGION: "metadata"}.get(
            entry.guid)
        if name is None:
            if entry.required & 1:
                raise UnsupportedFeature(path, FMT, "unknown required "
                                         "region " + str(uuid.UUID(
                                             bytes_le=entry.guid)), field)
            continue
        if name in found:
            raise CorruptImage(path, FMT, f"a second {name} region", field)
        start, length = entry.file_offset, entry.length
        # (the specification wants whole MiB inside the file; qemu reads a
        # region of any length, and past the end of the file zeros: so do
        # we)
        if start % MiB or not length:
            raise CorruptImage(path, FMT, f"{name} region at {start}+"
                               f"{length} does not start at a whole MiB",
                               field)
        for u_start, u_len, u_name in used:
            if start < u_start + u_len and u_start < start + length:
                raise CorruptImage(path, FMT, f"{name} region overlaps the "
                                   f"{u_name}", field)
        used.append((start, length, name))
        found[name] = (start, length)
    for name in ("BAT", "metadata"):
        if name not in found:
            raise CorruptImage(path, FMT, f"no {name} region",
                               "region table")
    return found["BAT"], found["metadata"], tuple(used)


def _metadata(src, path, offset, length):
    """{item id: bytes} of the metadata items we know."""
    buf = src.read(METADATA_TABLE_SIZE, offset)
    table = METADATA_TABLE_HEADER.unpack_from(buf)
    if table.signature != b"metadata":
        raise CorruptImage(path, FMT, "no metadata table ('metadata')",
                           "metadata table")
    if table.entry_count > MAX_ENTRIES:
        raise CorruptImage(path, FMT, f"{table.entry_count} entries",
                           "metadata table.entry_count")
    items = {}
    for i in range(table.entry_count):
        entry = METADATA_TABLE_ENTRY.unpack_from(
            buf, METADATA_TABLE_HEADER.size + i * METADATA_TABLE_ENTRY.size)
        field = f"metadata table entry {i}"
        known = ITEMS.get(entry.item_id)
        if known is None:
            if entry.flags & 4:             # is_required
                raise UnsupportedFeature(path, FMT, "unknown required "
                                         "metadata item " + str(uuid.UUID(
                                             bytes_le=entry.item_id)), field)
            continue
        name, size = known
        if entry.item_id in items:
            raise CorruptImage(path, FMT, f"a second {name} item", field)
        if size is None and (entry.length > MAX_PARENT_LOCATOR or
                             entry.offset < METADATA_TABLE_SIZE or
                             entry.offset + entry.length > length):
            raise CorruptImage(path, FMT, f"{name} item at {entry.offset}+"
                               f"{entry.length} is out of range", field)
        # A fixed-size item is read at its size wherever it points, as
        # qemu reads it (past the end of the file: zeros).
        at = offset + entry.offset
        n = entry.length if size is None else size
        inside = max(0, min(n, src.size() - at))
        items[entry.item_id] = bytes(src.read(inside, at)).ljust(n, b"\0")
    for item, (name, _) in ITEMS.items():
        if item not in items and item != PARENT_LOCATOR_ITEM:
            raise CorruptImage(path, FMT, f"no {name} item", "metadata")
    return items


def validate(src, path, header):
    """Parse and validate regions and metadata into a Geometry."""
    file_size = src.size()
    (bat_offset, bat_length), (meta_offset, meta_length), regions = \
        _regions(src, path, header, file_size)
    items = _metadata(src, path, meta_offset, meta_length)
    params = FILE_PARAMETERS.unpack_from(items[FILE_PARAMETERS_ITEM])
    size = int.from_bytes(items[VIRTUAL_DISK_SIZE_ITEM], "little")
    lss = int.from_bytes(items[LOGICAL_SECTOR_SIZE_ITEM], "little")
    pss = int.from_bytes(items[PHYSICAL_SECTOR_SIZE_ITEM], "little")
    bs = params.block_size
    if bs & (bs - 1) or not MiB <= bs <= 256 * MiB:
        raise CorruptImage(path, FMT, f"block size {bs} is not a power of "
                           "two from 1 MiB to 256 MiB",
                           "file parameters.block_size")
    # As qemu: the physical sector size is only a hint; the size is
    # taken in whole 512-byte sectors.
    if lss not in (512, 4096):
        raise CorruptImage(path, FMT, f"logical sector size {lss} is not "
                           "512 or 4096", "logical sector size")
    size = size // 512 * 512
    if size > MAX_SIZE:
        raise CorruptImage(path, FMT, f"virtual disk size {size} is more "
                           "than 64 TiB", "virtual disk size")
    has_parent = bool(params.flags & HAS_PARENT)
    chunk_ratio = CHUNK_SECTORS * lss // bs
    blocks = -(-size // bs)
    if has_parent:
        entries = -(-blocks // chunk_ratio) * (chunk_ratio + 1)
    else:
        entries = blocks + max(0, blocks - 1) // chunk_ratio
    if entries > MAX_BAT_ENTRIES:
        raise UnsupportedFeature(path, FMT, f"BAT of {entries} entries is "
                                 f"larger than {MAX_BAT_ENTRIES}", "BAT")
    if entries * 8 > bat_length:
        raise CorruptImage(path, FMT, f"BAT region of {bat_length} bytes "
                           f"cannot hold {entries} entries", "BAT")
    locator = {}
    if has_parent:
        if PARENT_LOCATOR_ITEM not in items:
            raise CorruptImage(path, FMT, "differencing disk without a "
                               "parent locator", "metadata")
        locator = _parent_locator(path, items[PARENT_LOCATOR_ITEM])
    creator = bytes(src.read(FILE_IDENTIFIER.size, 0))[8:]
    return Geometry(header=header, size=size, block_size=bs,
                    logical_sector_size=lss, physical_sector_size=pss,
                    has_parent=has_parent,
                    fixed=bool(params.flags & LEAVE_BLOCK_ALLOCATED),
                    virtual_disk_id=items[VIRTUAL_DISK_ID_ITEM],
                    bat_offset=bat_offset, bat_entries=entries,
                    regions=regions, locator=locator,
                    creator=creator.decode("utf-16-le", "replace")
                    .split("\0", 1)[0])


def _parent_locator(path, item):
    """The VHDX parent locator's key/value pairs."""
    field = "parent locator"
    if len(item) < PARENT_LOCATOR_HEADER.size:
        raise CorruptImage(path, FMT, "too short", field)
    hdr = PARENT_LOCATOR_HEADER.unpack_from(item)
    if hdr.locator_type != VHDX_PARENT_LOCATOR:
        raise UnsupportedFeature(path, FMT, "locator type " + str(
            uuid.UUID(bytes_le=hdr.locator_type)), field)
    end = PARENT_LOCATOR_HEADER.size + \
        hdr.key_value_count * PARENT_LOCATOR_ENTRY.size
    if end > len(item):
        raise CorruptImage(path, FMT, f"{hdr.key_value_count} entries do "
                           "not fit", field)
    out = {}
    for i in range(hdr.key_value_count):
        e = PARENT_LOCATOR_ENTRY.unpack_from(
            item, PARENT_LOCATOR_HEADER.size + i * PARENT_LOCATOR_ENTRY.size)
        if e.key_offset + e.key_length > len(item) or \
                e.value_offset + e.value_length > len(item):
            raise CorruptImage(path, FMT, f"entry {i} lies outside the "
                               "item", field)
        try:
            key = item[e.key_offset:e.key_offset + e.key_length] \
                .decode("utf-16-le")
            value = item[e.value_offset:e.value_offset + e.value_length] \
                .decode("utf-16-le")
        except UnicodeDecodeError:
            raise CorruptImage(path, FMT, f"entry {i} is not UTF-16",
                               field) from None
        out[key] = value
    if "parent_linkage" not in out:
        raise CorruptImage(path, FMT, "no parent_linkage", field)
    return out


def read_bat(src, geom, path):
    """The BAT, every entry checked against the file and the regions."""
    bat = array.array("Q", src.read(8 * geom.bat_entries, geom.bat_offset))
    if sys.byteorder == "big":
        bat.byteswap()
    file_size = src.size()
    payload_states = {PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED,
                      PAYLOAD_BLOCK_ZERO, PAYLOAD_BLOCK_UNMAPPED,
                      PAYLOAD_BLOCK_FULLY_PRESENT}
    if geom.has_parent:
        payload_states.add(PAYLOAD_BLOCK_PARTIALLY_PRESENT)
    ratio = geom.chunk_ratio
    spans = []
    for i, entry in enumerate(bat):
        state, start = entry & 7, (entry >> 20) * MiB
        field = f"BAT[{i}]"
        bitmap = i % (ratio + 1) == ratio
        if bitmap:
            if state == SB_BLOCK_NOT_PRESENT:
                continue
            if state != SB_BLOCK_PRESENT or not geom.has_parent:
                raise CorruptImage(path, FMT, f"sector bitmap state "
                                   f"{state}", field)
            length = SB_BLOCK_SIZE
        else:
            if state not in payload_states:
                raise CorruptImage(path, FMT, f"payload block state "
                                   f"{state}", field)
            if state < PAYLOAD_BLOCK_FULLY_PRESENT:
                continue
            if state == PAYLOAD_BLOCK_PARTIALLY_PRESENT and \
                    bat[i - i % (ratio + 1) + ratio] & 7 != SB_BLOCK_PRESENT:
                raise CorruptImage(path, FMT, "partially present block "
                                   "without a sector bitmap", field)
            length = geom.block_size
        # As qemu, which takes the file's size in whole sectors: a block
        # cut short by less than a sector reads the rest as zeros.  A
        # payload block may lie over the header section (qemu does not
        # guard it; reading it is harmless).
        if start + length > -(-file_size // 512) * 512:
            raise CorruptImage(path, FMT, f"block at {start} lies past the "
                               f"end of the file ({file_size})", field)
        for r_start, r_len, name in geom.regions:
            if name == "header section" and not bitmap:
                continue
            if start < r_start + r_len and r_start < start + length:
                raise CorruptImage(path, FMT, f"block at {start} overlaps "
                                   f"the {name}", field)
        spans.append((start, length, i))
    prev_end = 0
    for start, length, i in sorted(spans):
        if start < prev_end:
            raise CorruptImage(path, FMT, f"block at {start} overlaps "
                               "another block", f"BAT[{i}]")
        prev_end = start + length
    return bat


class VhdxDisk(Disk):
    format_name = FMT
    can_trim = can_zero = False

    def __init__(self, file, src, geom, bat):
        super().__init__(file.path, geom.size, True)
        self.file = file
        self.src = src                  # the file, or the replayed log's view
        self.geom = geom
        self.bat = bat
        self.cluster_size = geom.block_size
        self.data_write_guid = geom.header.data_write_guid
        self.backing_name = None
        self._lock = threading.Lock()
        self._bitmaps = Cache(BITMAP_CACHE)     # block -> sector bits

    @classmethod
    def probe(cls, file):
        return bytes(file.read(8, 0)) == b"vhdxfile"

    @classmethod
    def open(cls, path, readonly, ctx):
        file = ctx.open_file(path, True)
        disk = None
        try:
            if file.size() < MiB or bytes(file.read(8, 0)) != b"vhdxfile":
                raise CorruptImage(path, FMT, "no VHDX file identifier "
                                   "('vhdxfile')", "file identifier")
            header = _current_header(file, path)
            src = replay(file, header, path) or file
            geom = validate(src, path, header)
            disk = cls(file, src, geom, read_bat(src, geom, path))
            if geom.has_parent:
                disk._open_parent(ctx)
            return disk
        except BaseException:
            (disk or file).close()
            raise

    def _open_parent(self, ctx):
        """Follow the locator's paths, in the specification's order, to
        the parent whose data write GUID it records."""
        loc = self.geom.locator
        linkage = {_linkage(self.path, loc.get(k), k)
                   for k in ("parent_linkage", "parent_linkage2")}
        candidates = [(windows_path(loc[key]), f"parent locator {key}")
                      for key in ("relative_path", "absolute_win32_path")
                      if loc.get(key)]
        self.backing_format = FMT
        self.backing, self.backing_name = open_parent(
            self, ctx, candidates,
            lambda p: p.data_write_guid in linkage, "data write GUID")

    # --- mapping -------------------------------------------------------

    def _bitmap(self, block):
        """Block `block`'s sector bits from its chunk's bitmap block."""
        bitmap = self._bitmaps.get(block)
        if bitmap is None:
            geom = self.geom
            sb = self.bat[geom.bitmap_index(block)] >> 20
            per_block = geom.block_size // geom.logical_sector_size // 8
            within = block % geom.chunk_ratio * per_block
            # Bit i of the int is sector i (least significant bit first).
            bitmap = int.from_bytes(self.src.read(per_block,
                                                  sb * MiB + within),
                                    "little")
            self._bitmaps.put(block, bitmap)
        return bitmap

    def _runs(self, offset, length):
        """This layer's runs (DATA, ZERO, and BACKING or, without a
        parent, ZERO) covering the range in order."""
        geom, runs = self.geom, []
        bs, lss = geom.block_size, geom.logical_sector_size
        absent = BACKING if self.backing is not None else ZERO
        end = offset + length
        while offset < end:
            block, within = divmod(offset, bs)
            n = min(end - offset, bs - within)
            entry = self.bat[geom.bat_index(block)]
            state, data = entry & 7, (entry >> 20) * MiB
            if state == PAYLOAD_BLOCK_FULLY_PRESENT:
                add_run(runs, Run(offset, n, DATA,
                                  host=(self.path, data + within)))
            elif state == PAYLOAD_BLOCK_PARTIALLY_PRESENT:
                with self._lock:
                    bitmap = self._bitmap(block)
                first, last = within // lss, -(-(within + n) // lss)
                for s, e, present in bit_runs(bitmap, first, last):
                    a, b = max(within, s * lss), min(within + n, e * lss)
                    add_run(runs, Run(offset + a - within, b - a, DATA,
                                      host=(self.path, data + a))
                            if present else
                            Run(offset + a - within, b - a, absent))
            elif state == PAYLOAD_BLOCK_NOT_PRESENT:
                add_run(runs, Run(offset, n, absent))
            else:
                # Zero, unmapped, undefined: zeros, as qemu reads them.
                add_run(runs, Run(offset, n, ZERO))
            offset += n
        return runs

    def pread(self, buf, offset):
        self.fill(buf, self._runs(offset, len(buf)), self.src)

    def map(self, count, offset):
        return self.resolve(self._runs(offset, count))

    def host_mapping(self, count, offset):
        """None where a log replayed in memory holds the newer bytes."""
        if self.src is not self.file:
            return [HostRange(offset, count, None, None)]
        return super().host_mapping(count, offset)

    def pwrite(self, buf, offset, fua=False):
        self.check_writable()

    def trim(self, count, offset, fua=False):
        self.check_writable()

    def zero(self, count, offset, may_trim=False, fua=False):
        self.check_writable()

    def info(self):
        geom = self.geom
        out = {"subformat": "differencing" if geom.has_parent else
               "fixed" if geom.fixed else "dynamic",
               "block-size": geom.block_size,
               "logical-sector-size": geom.logical_sector_size,
               "physical-sector-size": geom.physical_sector_size,
               "creator": geom.creator,
               "log-replayed": self.src is not self.file}
        if geom.has_parent:
            out["parent-locator"] = dict(geom.locator)
        return out

    def close(self):
        super().close()
        self.file.close()



def _linkage(path, text, key):
    """The GUID a parent_linkage value names, as stored, or None."""
    if text is None:
        return None
    try:
        return uuid.UUID(text.strip()).bytes_le
    except ValueError:
        raise CorruptImage(path, FMT, f"{text!r} is not a GUID",
                           f"parent locator {key}") from None
