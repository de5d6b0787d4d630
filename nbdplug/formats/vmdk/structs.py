"""VMDK on-disk structures, declared once with the specification's names.

References: VMware "Virtual Disk Format 1.1" (hosted sparse extents,
stream-optimized compressed extents) and "Virtual Disk Format 5.0" (the
zeroed-grain flag of version 2).  Everything is little-endian; offsets and
sizes in headers, grain directories and grain tables count 512-byte sectors.
"""

from nbdplug.layout import Layout

SECTOR = 512

SPARSE_MAGIC = b"KDMV"          # hosted sparse extent ("VMDK" read as LE)
COWD_MAGIC = b"COWD"            # ESX Server sparse extent (not supported)
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"

SPARSE_HEADER = Layout("<", "SparseExtentHeader", " ".join((
    "magicNumber:4s version:I flags:I capacity:Q grainSize:Q",
    "descriptorOffset:Q descriptorSize:Q numGTEsPerGT:I",
    "rgdOffset:Q gdOffset:Q overHead:Q uncleanShutdown:B",
    "singleEndLineChar:1s nonEndLineChar:1s doubleEndLineChar1:1s",
    "doubleEndLineChar2:1s compressAlgorithm:H pad:433s")))
assert SPARSE_HEADER.size == SECTOR

# flags
FLAG_NEWLINE_TEST = 1 << 0      # the four end-of-line characters are valid
FLAG_REDUNDANT_GD = 1 << 1      # rgdOffset names a redundant directory
FLAG_ZEROED_GRAIN = 1 << 2      # a grain table entry of 1 reads as zeros
FLAG_COMPRESSED = 1 << 16       # grains are deflate-compressed
FLAG_MARKERS = 1 << 17          # grains and metadata carry markers
KNOWN_FLAGS = (FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD | FLAG_ZEROED_GRAIN |
               FLAG_COMPRESSED | FLAG_MARKERS)

# What a file transferred in text mode would have damaged.
NEWLINE_CHARS = (b"\n", b" ", b"\r", b"\n")

COMPRESSION_NONE = 0
COMPRESSION_DEFLATE = 1

# gdOffset of a stream-optimized header whose directory is in the footer.
GD_AT_END = 0xFFFFFFFFFFFFFFFF

# A grain table entry of 1 in an extent with FLAG_ZEROED_GRAIN.
ZEROED_GRAIN = 1

# Stream-optimized markers.  A grain marker (size != 0) precedes the
# compressed bytes of one grain; val is the grain's first sector in the
# extent.  A metadata marker (size == 0) fills a sector and precedes `val`
# sectors of metadata of the given type.
GRAIN_MARKER = Layout("<", "grain marker", "val:Q size:I")
METADATA_MARKER = Layout("<", "metadata marker",
                         "val:Q size:I type:I pad:496s")
MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

GTE_SIZE = 4                    # grain directory and table entries: uint32


def compress_bound(length):
    """The most bytes deflate (zlib's compressBound) turns `length` into:
    an incompressible grain is stored a little larger than itself."""
    return length + (length >> 12) + (length >> 14) + (length >> 25) + 13
