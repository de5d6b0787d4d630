"""Reading and validating the qcow2 header and its extensions.

One parse-and-validate step, before anything else is read: every field
that later code trusts (table offsets, sizes, bit widths) is checked here
against the file and against bounds that keep memory small.
"""

import dataclasses

from nbdplug.errors import CorruptImage, UnsupportedFeature
from . import bitmaps, structs as S

FMT = "qcow2"


@dataclasses.dataclass(frozen=True)
class Geometry:
    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    compatible_features: int
    autoclear_features: int
    refcount_order: int
    header_length: int
    compression_type: int
    backing_name: str
    backing_format: str
    data_file_name: str
    feature_names: dict
    extensions_end: int         # first byte after the extension area
    bitmaps: tuple              # (count, directory size, offset) or None
    migration: bytes = None     # our migration record, unverified
    migration_at: int = None    # where its data lies in the file

    @property
    def cluster_size(self):
        return 1 << self.cluster_bits

    @property
    def extended_l2(self):
        return bool(self.incompatible_features & S.INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self):
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self):
        return self.cluster_size // self.l2_entry_size

    @property
    def l2_bits(self):
        return self.l2_entries.bit_length() - 1

    @property
    def refcount_bits(self):
        return 1 << self.refcount_order

    @property
    def refcount_block_entries(self):
        return self.cluster_size * 8 // self.refcount_bits

    @property
    def subcluster_size(self):
        return self.cluster_size // (S.SUBCLUSTERS if self.extended_l2
                                     else 1)

    def l1_needed(self, size=None):
        """L1 entries needed to map a disk of `size` bytes."""
        span = self.cluster_size * self.l2_entries
        return -(-(self.size if size is None else size) // span)


def read_header(file, path):
    """Parse, validate and return the Geometry of the image in `file`."""
    file_size = file.size()

    def bad(field, reason):
        return CorruptImage(path, FMT, reason, field)

    head = file.read(S.HEADER_V3.size, 0)
    v2 = S.HEADER_V2.unpack_from(head)
    if v2.magic != S.MAGIC:
        raise bad("magic", "not a qcow2 image")
    if v2.version not in (2, 3):
        raise UnsupportedFeature(path, FMT, f"version {v2.version} is not "
                                 "supported (2 and 3 are)", "version")
    if not S.MIN_CLUSTER_BITS <= v2.cluster_bits <= S.MAX_CLUSTER_BITS:
        raise bad("cluster_bits", f"{v2.cluster_bits} is out of range "
                  f"({S.MIN_CLUSTER_BITS}-{S.MAX_CLUSTER_BITS})")
    cluster_size = 1 << v2.cluster_bits
    if v2.version == 3:
        h = S.HEADER_V3.unpack_from(head)
        incompatible, compatible = h.incompatible_features, \
            h.compatible_features
        autoclear, refcount_order = h.autoclear_features, h.refcount_order
        header_length = h.header_length
        if header_length < 104 or header_length % 8:
            raise bad("header_length", f"{header_length} is invalid "
                      "(at least 104, a multiple of 8)")
        if header_length > cluster_size:
            raise bad("header_length", "larger than a cluster")
        compression = h.compression_type if header_length > 104 else 0
    else:
        incompatible = compatible = autoclear = 0
        refcount_order, header_length, compression = 4, 72, 0
    if file_size < header_length:
        raise bad("header", "qcow2 header too short")
    if refcount_order > 6:
        raise bad("refcount_order", f"{refcount_order} is out of range "
                  "(0-6)")

    # The first cluster holds the header, the extensions and then the
    # backing file name; extensions end where the name begins.
    first = file.read(min(cluster_size, max(file_size, header_length)), 0)
    backing_name = None
    ext_limit = len(first)
    if v2.backing_file_offset:
        off, length = v2.backing_file_offset, v2.backing_file_size
        if length > S.MAX_BACKING_NAME:
            raise bad("backing_file_size", f"backing file name of {length} "
                      f"bytes is longer than {S.MAX_BACKING_NAME}")
        if off < header_length or off + length > len(first):
            raise bad("backing_file_offset", "backing file name does not "
                      "lie in the first cluster after the header")
        try:
            backing_name = first[off:off + length].decode()
        except UnicodeDecodeError:
            raise bad("backing_file_offset", "backing file name is not "
                      "UTF-8") from None
        ext_limit = off
    exts = _read_extensions(first[:ext_limit], header_length, path)
    feature_names = exts["feature_names"]

    unknown = incompatible & ~S.INCOMPAT_KNOWN
    if unknown:
        names = [feature_names.get((0, b), f"bit {b}")
                 for b in range(64) if unknown >> b & 1]
        raise UnsupportedFeature(path, FMT, "unsupported incompatible "
                                 "features: " + ", ".join(names),
                                 "incompatible_features")
    if v2.crypt_method:
        raise UnsupportedFeature(path, FMT, "encrypted images are not "
                                 "supported", "crypt_method")
    if incompatible & S.INCOMPAT_COMPRESSION:
        if compression not in S.COMPRESSION_NAMES or compression == 0:
            raise UnsupportedFeature(path, FMT, f"compression type "
                                     f"{compression} is not supported",
                                     "compression_type")
    elif compression:
        raise bad("compression_type", "set without its incompatible bit")
    extended = bool(incompatible & S.INCOMPAT_EXTL2)
    if extended and v2.cluster_bits < 14:
        raise bad("cluster_bits", "extended L2 entries need clusters of "
                  "at least 16 KiB")
    if incompatible & S.INCOMPAT_DATA_FILE:
        raise UnsupportedFeature(path, FMT, "external data files are not "
                                 "supported", "incompatible_features")
    if v2.size >= 1 << 63:
        raise bad("size", "virtual size is too large")

    geo = Geometry(
        version=v2.version, cluster_bits=v2.cluster_bits, size=v2.size,
        l1_size=v2.l1_size, l1_table_offset=v2.l1_table_offset,
        refcount_table_offset=v2.refcount_table_offset,
        refcount_table_clusters=v2.refcount_table_clusters,
        nb_snapshots=v2.nb_snapshots, snapshots_offset=v2.snapshots_offset,
        incompatible_features=incompatible, compatible_features=compatible,
        autoclear_features=autoclear, refcount_order=refcount_order,
        header_length=header_length, compression_type=compression,
        backing_name=backing_name, backing_format=exts["backing_format"],
        data_file_name=exts["data_file"], feature_names=feature_names,
        extensions_end=exts["end"], bitmaps=exts["bitmaps"],
        migration=exts["migration"], migration_at=exts["migration_at"])

    _check_table(path, "L1 table", "l1_table_offset", geo.l1_table_offset,
                 geo.l1_size * 8, S.MAX_L1_BYTES, cluster_size, file_size)
    if geo.l1_size < geo.l1_needed():
        raise bad("l1_size", "L1 table is too small for the virtual size")
    _check_table(path, "refcount table", "refcount_table_offset",
                 geo.refcount_table_offset,
                 geo.refcount_table_clusters * cluster_size,
                 S.MAX_REFTABLE_BYTES, cluster_size, file_size)
    if geo.refcount_table_clusters == 0:
        raise bad("refcount_table_clusters", "image has no refcount table")
    if geo.nb_snapshots > S.MAX_SNAPSHOTS:
        raise bad("nb_snapshots", f"{geo.nb_snapshots} snapshots exceed "
                  f"the limit of {S.MAX_SNAPSHOTS}")
    if geo.nb_snapshots:
        _check_table(path, "snapshot table", "snapshots_offset",
                     geo.snapshots_offset,
                     geo.nb_snapshots * S.SNAPSHOT_ENTRY.size,
                     S.MAX_SNAPSHOT_TABLE_BYTES, cluster_size, file_size)
    return geo


def _check_table(path, name, field, offset, length, limit, cluster_size,
                 file_size):
    """A table must be cluster aligned, not over the header, bounded in
    size, and inside the file."""
    if length > limit:
        raise CorruptImage(path, FMT, f"{name} of {length} bytes is too "
                           f"large (limit {limit})", field)
    if length == 0:
        return
    if offset % cluster_size:
        raise CorruptImage(path, FMT, f"{name} is not cluster aligned",
                           field)
    if offset == 0:
        raise CorruptImage(path, FMT, f"{name} overlaps the header", field)
    if offset + length > file_size:
        raise CorruptImage(path, FMT, f"{name} lies past the end of the "
                           "file", field)


def _read_extensions(first, start, path):
    """Walk the header extensions in the first cluster, bounded by it."""
    out = {"backing_format": None, "data_file": None, "feature_names": {},
           "bitmaps": None, "migration": None, "migration_at": None,
           "end": start}
    pos = start
    seen = set()
    while True:
        if pos + S.EXTENSION.size > len(first):
            # No end marker inside the cluster: treat as the end (qemu
            # tolerates a header that fills the cluster exactly).
            out["end"] = pos
            return out
        ext = S.EXTENSION.unpack_from(first, pos)
        pos += S.EXTENSION.size
        if ext.type == S.EXT_END:
            out["end"] = pos
            return out
        if ext.length > len(first) - pos:
            raise CorruptImage(path, FMT, f"header extension {ext.type:#x} "
                               f"of {ext.length} bytes overflows the first "
                               "cluster", "header extension")
        data = bytes(first[pos:pos + ext.length])
        if ext.type in seen and ext.type in (S.EXT_BACKING_FORMAT,
                                             S.EXT_DATA_FILE,
                                             S.EXT_FEATURE_NAMES,
                                             S.EXT_BITMAPS,
                                             S.EXT_NBDPLUG_MIGRATION):
            raise CorruptImage(path, FMT, f"header extension {ext.type:#x} "
                               "appears twice", "header extension")
        seen.add(ext.type)
        if ext.type == S.EXT_BACKING_FORMAT:
            out["backing_format"] = _string(data, path, "backing format")
        elif ext.type == S.EXT_DATA_FILE:
            out["data_file"] = _string(data, path, "data file name")
        elif ext.type == S.EXT_BITMAPS:
            out["bitmaps"] = bitmaps.parse_extension(data, path)
        elif ext.type == S.EXT_NBDPLUG_MIGRATION:
            out["migration"], out["migration_at"] = data, pos
        elif ext.type == S.EXT_FEATURE_NAMES:
            for i in range(0, len(data) - S.FEATURE_NAME.size + 1,
                           S.FEATURE_NAME.size):
                fn = S.FEATURE_NAME.unpack_from(data, i)
                name = fn.name.split(b"\0", 1)[0].decode(errors="replace")
                out["feature_names"][(fn.type, fn.bit)] = name
        pos += -(-ext.length // 8) * 8


def _string(data, path, what):
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise CorruptImage(path, FMT, f"{what} is not UTF-8",
                           "header extension") from None
