"""What qcow2 metadata a writer guards (see nbdplug/formats/overlap.py).

The kinds are qemu's, with its names so the message reads the same: the
header, the active L1 and L2 tables, the refcount table and blocks, the
snapshot table, each snapshot's L1 table and the L2 tables it keeps, and
the bitmap directory.  The map is built when an image is opened writable
and follows every table the driver allocates or moves.
"""

from nbdplug.errors import UnsupportedFeature
from nbdplug.formats.overlap import Overlaps
from . import structs as S
from .snapshot import l1_problem
from .tables import load_table

FMT = "qcow2"

MAIN_HEADER = 1 << 0
ACTIVE_L1 = 1 << 1
ACTIVE_L2 = 1 << 2
REFCOUNT_TABLE = 1 << 3
REFCOUNT_BLOCK = 1 << 4
SNAPSHOT_TABLE = 1 << 5
INACTIVE_L1 = 1 << 6
INACTIVE_L2 = 1 << 7
BITMAP_DIRECTORY = 1 << 8

NAMES = {MAIN_HEADER: "qcow2_header", ACTIVE_L1: "active L1 table",
         ACTIVE_L2: "active L2 table", REFCOUNT_TABLE: "refcount table",
         REFCOUNT_BLOCK: "refcount block", SNAPSHOT_TABLE: "snapshot table",
         INACTIVE_L1: "inactive L1 table",
         INACTIVE_L2: "inactive L2 table",
         BITMAP_DIRECTORY: "bitmap directory"}

# Snapshot L1 tables are read whole to find the L2 tables they keep; this
# bounds the time and memory a hostile snapshot table can cost a writer.
MAX_INACTIVE_L1_BYTES = 8 * S.MAX_L1_BYTES


def empty(geo, path):
    """A map with nothing in it: what readers and `check` carry."""
    return Overlaps(geo.cluster_bits, path, FMT, NAMES)


def build(file, geo, path, l1, refcount_table, snapshots, snapshot_bytes,
          bitmap_directory):
    """The map of an image opened writable: `l1` and `refcount_table` as
    the driver holds them, the parsed snapshots and the snapshot table's
    length, the bitmap directory's (offset, length) or None."""
    cs = geo.cluster_size
    out = empty(geo, path)
    out.add(0, cs, MAIN_HEADER)
    out.add(geo.l1_table_offset, 8 * len(l1), ACTIVE_L1)
    for entry in l1:
        if entry & S.L1E_OFFSET_MASK:
            out.add(entry & S.L1E_OFFSET_MASK, cs, ACTIVE_L2)
    out.add(geo.refcount_table_offset, geo.refcount_table_clusters * cs,
            REFCOUNT_TABLE)
    for entry in refcount_table:
        if entry & S.REFT_OFFSET_MASK:
            out.add(entry & S.REFT_OFFSET_MASK, cs, REFCOUNT_BLOCK)
    out.add(geo.snapshots_offset, snapshot_bytes, SNAPSHOT_TABLE)
    # A snapshot table entry whose L1 table is unusable guards nothing
    # (check reports it; the snapshot cannot be opened).
    tables = {(s.l1_table_offset, s.l1_size) for s in snapshots
              if not l1_problem(s, geo, file.size())}
    if sum(size for _, size in tables) * 8 > MAX_INACTIVE_L1_BYTES:
        raise UnsupportedFeature(path, FMT, "snapshot L1 tables of more "
                                 f"than {MAX_INACTIVE_L1_BYTES >> 20} MiB "
                                 "cannot be guarded for writing; open it "
                                 "read-only", "snapshot table")
    for offset, size in sorted(tables):
        out.add(offset, 8 * size, INACTIVE_L1)
        for entry in load_table(file, offset, size):
            if entry & S.L1E_OFFSET_MASK:
                out.add(entry & S.L1E_OFFSET_MASK, cs, INACTIVE_L2)
    if bitmap_directory is not None:
        out.add(*bitmap_directory, BITMAP_DIRECTORY)
    return out
