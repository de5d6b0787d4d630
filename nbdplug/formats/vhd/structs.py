"""VHD structures and constants, declared once with the specification's
names (all values big-endian)."""

import struct

from nbdplug.layout import Layout

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


def round_up(n, to):
    return -(-n // to) * to
