"""Persistent dirty bitmaps (the bitmaps header extension): read, never
changed.

Backup tools keep these in the image.  We do not keep them up to date,
so the driver clears the extension's autoclear bit before its first
write; from then on the spec says readers ignore them.  Until then their
directory, tables and data clusters are references, which `check` must
count: counted as leaks, a leak repair would free clusters the bitmaps
still use.
"""

import typing

from nbdplug.errors import CorruptImage
from . import structs as S
from .tables import load_table, read_at

FMT = "qcow2"

# qemu's limits, which bound what a hostile image can make us read.
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS
MAX_TABLE_ENTRIES = 1 << 27
MAX_BITMAP_BYTES = 512 << 20    # of bitmap data one bitmap may store
MAX_NAME_BYTES = 1023
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
FLAG_NAMES = {0: "in-use", 1: "auto"}
KNOWN_FLAGS = 3
TYPE_DIRTY_TRACKING = 1
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00


class Bitmap(typing.NamedTuple):
    name: str
    granularity: int
    flags: list
    table_offset: int
    table_size: int


def parse_extension(data, path):
    """The extension's (count, directory size, directory offset)."""
    if len(data) != S.BITMAPS_EXTENSION.size:
        raise CorruptImage(path, FMT, "invalid extension length",
                           "bitmaps extension")
    ext = S.BITMAPS_EXTENSION.unpack_from(data)
    return ext.nb_bitmaps, ext.directory_size, ext.directory_offset, \
        ext.reserved


def read_bitmaps(file, geo, path):
    """The bitmaps the image holds; [] without the extension or once its
    autoclear bit is clear (they are stale then).  Validated as qemu
    validates them when it opens the image (which it refuses otherwise);
    what lies past the end of the file reads as zeros."""
    if geo.bitmaps is None or not \
            geo.autoclear_features & S.AUTOCLEAR_BITMAPS:
        return []
    count, size, offset, reserved = geo.bitmaps

    def bad(msg):
        return CorruptImage(path, FMT, msg, "bitmaps extension")
    if reserved:
        raise bad("reserved field is not zero")
    if not 0 < count <= MAX_BITMAPS:
        raise bad(f"{count} bitmaps (1-{MAX_BITMAPS} allowed)")
    if not 0 < size <= MAX_DIRECTORY_BYTES:
        raise bad(f"bitmap directory of {size} bytes")
    if offset % geo.cluster_size or offset + size >= 1 << 63:
        raise bad(f"invalid bitmap directory offset {offset:#x}")
    directory = bytes(read_at(file, size, offset))
    out = []
    pos = 0
    while pos < size:
        if pos + S.BITMAP_ENTRY.size > size:
            raise bad("broken bitmap directory")
        if len(out) == count:
            raise bad("more bitmaps found than the extension says")
        e = S.BITMAP_ENTRY.unpack_from(directory, pos)
        name_at = pos + S.BITMAP_ENTRY.size + e.extra_data_size
        pos = -(-(name_at + e.name_size) // 8) * 8
        if pos > size:
            raise bad("broken bitmap directory")
        name = directory[name_at:name_at + e.name_size].decode(
            errors="replace")
        if e.extra_data_size or not _sound(e, geo):
            raise bad(f"bitmap {name!r} does not satisfy the constraints")
        flags = [n for b, n in FLAG_NAMES.items() if e.flags >> b & 1]
        out.append(Bitmap(name, 1 << e.granularity_bits, flags,
                          e.table_offset, e.table_size))
    if len(out) != count:
        raise bad("fewer bitmaps found than the extension says")
    return out


def _sound(e, geo):
    """qemu's constraints on a directory entry."""
    cs = geo.cluster_size
    if not e.table_size or not e.table_offset or e.table_offset % cs or \
            e.table_size > MAX_TABLE_ENTRIES or \
            not MIN_GRANULARITY_BITS <= e.granularity_bits <= \
            MAX_GRANULARITY_BITS or e.flags & ~KNOWN_FLAGS or \
            e.name_size > MAX_NAME_BYTES or e.type != TYPE_DIRTY_TRACKING:
        return False
    stored = e.table_size * cs             # bytes of bitmap the table maps
    if stored > MAX_BITMAP_BYTES:
        return False
    in_use = e.flags & 1
    return in_use or geo.size <= (stored * 8) << e.granularity_bits


def references(file, geo, bitmaps):
    """(offset, length, what) of every cluster the bitmaps use: the
    directory, each table and each table's data clusters."""
    if not bitmaps:
        return
    _, size, offset, _ = geo.bitmaps
    yield offset, size, "bitmap directory"
    step = 1 << 16          # table entries read at a time: bounded memory
    for b in bitmaps:
        yield b.table_offset, 8 * b.table_size, "bitmap table"
        for first in range(0, b.table_size, step):
            n = min(step, b.table_size - first)
            for entry in load_table(file, b.table_offset + 8 * first, n):
                host = entry & ENTRY_OFFSET_MASK
                if host:
                    yield host, geo.cluster_size, "bitmap data cluster"
