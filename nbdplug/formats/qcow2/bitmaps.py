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
from .refcount import load_table

FMT = "qcow2"

# qemu's limits, which bound what a hostile image can make us read.
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 64 << 20
MAX_TABLE_ENTRIES = 1 << 27
MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS = 9, 31
FLAG_NAMES = {0: "in-use", 1: "auto"}
ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00


class Bitmap(typing.NamedTuple):
    name: str
    granularity: int
    flags: list
    table_offset: int
    table_size: int


def parse_extension(data, path):
    """The extension's (count, directory size, directory offset)."""
    if len(data) < S.BITMAPS_EXTENSION.size:
        raise CorruptImage(path, FMT, "bitmaps extension is too short",
                           "bitmaps extension")
    ext = S.BITMAPS_EXTENSION.unpack_from(data)
    return ext.nb_bitmaps, ext.directory_size, ext.directory_offset


def read_bitmaps(file, geo, path):
    """The bitmaps the image holds; [] without the extension or once its
    autoclear bit is clear (they are stale then)."""
    if geo.bitmaps is None or not \
            geo.autoclear_features & S.AUTOCLEAR_BITMAPS:
        return []
    count, size, offset = geo.bitmaps

    def bad(msg):
        return CorruptImage(path, FMT, msg, "bitmaps extension")
    if not 0 < count <= MAX_BITMAPS:
        raise bad(f"{count} bitmaps (1-{MAX_BITMAPS} allowed)")
    if not S.BITMAP_ENTRY.size <= size <= MAX_DIRECTORY_BYTES:
        raise bad(f"bitmap directory of {size} bytes")
    if offset % geo.cluster_size or offset + size > file.size():
        raise bad(f"bitmap directory at {offset:#x} is not aligned or "
                  "lies past the end of the file")
    directory = file.read(size, offset)
    out = []
    pos = 0
    for i in range(count):
        if pos + S.BITMAP_ENTRY.size > size:
            raise bad(f"bitmap directory ends inside entry {i}")
        e = S.BITMAP_ENTRY.unpack_from(directory, pos)
        name_at = pos + S.BITMAP_ENTRY.size + e.extra_data_size
        pos = -(-(name_at + e.name_size) // 8) * 8
        if pos > size:
            raise bad(f"bitmap {i} runs past the directory")
        if not MIN_GRANULARITY_BITS <= e.granularity_bits <= \
                MAX_GRANULARITY_BITS:
            raise bad(f"bitmap {i}: granularity_bits "
                      f"{e.granularity_bits} out of range")
        granularity = 1 << e.granularity_bits
        needed = -(-(-(-geo.size // granularity)) // (geo.cluster_size * 8))
        if e.table_size != needed or e.table_size > MAX_TABLE_ENTRIES:
            raise bad(f"bitmap {i}: table of {e.table_size} entries for "
                      f"a disk that needs {needed}")
        if e.table_offset % geo.cluster_size or \
                e.table_offset + 8 * e.table_size > file.size():
            raise bad(f"bitmap {i}: table at {e.table_offset:#x} is not "
                      "aligned or lies past the end of the file")
        name = bytes(directory[name_at:name_at + e.name_size]).decode(
            errors="replace")
        flags = [n for b, n in FLAG_NAMES.items() if e.flags >> b & 1]
        out.append(Bitmap(name, granularity, flags, e.table_offset,
                          e.table_size))
    return out


def references(file, geo, bitmaps):
    """(offset, length, what) of every cluster the bitmaps use: the
    directory, each table and each table's data clusters."""
    if not bitmaps:
        return
    _, size, offset = geo.bitmaps
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
