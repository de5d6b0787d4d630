"""qcow2 on-disk structures and constants, named as in qemu's
docs/interop/qcow2.txt.  All numbers are big-endian."""

from nbdplug.layout import Layout

MAGIC = 0x514649FB                  # "QFI\xfb"

HEADER_V2 = Layout(">", "qcow2 header", """
    magic:I version:I backing_file_offset:Q backing_file_size:I
    cluster_bits:I size:Q crypt_method:I l1_size:I l1_table_offset:Q
    refcount_table_offset:Q refcount_table_clusters:I nb_snapshots:I
    snapshots_offset:Q""")

HEADER_V3 = Layout(">", "qcow2 header", """
    magic:I version:I backing_file_offset:Q backing_file_size:I
    cluster_bits:I size:Q crypt_method:I l1_size:I l1_table_offset:Q
    refcount_table_offset:Q refcount_table_clusters:I nb_snapshots:I
    snapshots_offset:Q incompatible_features:Q compatible_features:Q
    autoclear_features:Q refcount_order:I header_length:I
    compression_type:B""")

# Header length qemu writes for version 3 (compression_type + padding).
V3_HEADER_LENGTH = 112

EXTENSION = Layout(">", "qcow2 header extension", "type:I length:I")
FEATURE_NAME = Layout(">", "qcow2 feature name", "type:B bit:B name:46s")

BITMAPS_EXTENSION = Layout(">", "qcow2 bitmaps extension",
                           "nb_bitmaps:I reserved:I directory_size:Q "
                           "directory_offset:Q")
BITMAP_ENTRY = Layout(">", "qcow2 bitmap directory entry",
                      "table_offset:Q table_size:I flags:I type:B "
                      "granularity_bits:B name_size:H extra_data_size:I")

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# Ours (qemu keeps extensions it does not know): the record of a move in
# progress that `nbdplug migrate start` wrote (formats/qcow2/migration.py).
EXT_NBDPLUG_MIGRATION = 0x6E62706D          # "nbpm"

MIGRATION_RECORD = Layout(">", "nbdplug migration record",
                          "version:B state:B reserved:6s rate:Q mac:32s")

# incompatible_features
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE |
                  INCOMPAT_COMPRESSION | INCOMPAT_EXTL2)
# compatible_features
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear_features
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES = [               # (type, bit, name): our feature table
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"),
    (0, 2, "external data file"), (0, 3, "compression type"),
    (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
]

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# L1 entries
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED = 0x7F000000000001FF

# L2 entries (standard descriptor)
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_STD_RESERVED = 0x3F000000000001FE

REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED = 0x1FF

SUBCLUSTERS = 32                # per cluster with extended L2 entries

SNAPSHOT_ENTRY = Layout(">", "qcow2 snapshot", """
    l1_table_offset:Q l1_size:I id_str_size:H name_size:H date_sec:I
    date_nsec:I vm_clock_nsec:Q vm_state_size:I extra_data_size:I""")
SNAPSHOT_EXTRA = Layout(">", "qcow2 snapshot extra",
                        "vm_state_size_large:Q disk_size:Q icount:Q")

# Limits (qemu's, which keep hostile images within bounded memory).
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_BACKING_NAME = 1023
