"""Hostile VHDX images: each is refused in one line naming the file and
what is wrong, exit status 2, in bounded memory and time, the file
unchanged."""

import struct

import pytest

from conftest import nbdplug, run
from hostile import assert_rejected
from test_510_vhdx import qemu_vhdx, with_crc
from test_511_vhdx_log import GUID, LOG, log_entry, put_log

KiB, MiB = 1 << 10, 1 << 20
REGIONS = (192 * KiB, 256 * KiB)
BAT, METADATA = 2 * MiB, 3 * MiB        # where qemu puts them


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.vhdx"
    qemu_vhdx(path, 8 * MiB, "block_size=1M",
              writes=[(0, 64 * KiB, 1), (5 * MiB, 64 * KiB, 2)])
    return path


def patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(raw)


def patch_regions(path, index, **fields):
    """Change region table entry `index` in both copies, CRC mended."""
    raw = bytearray(path.read_bytes())
    names = ("guid", "file_offset", "length", "required")
    for at in REGIONS:
        entry = at + 16 + 32 * index
        values = dict(zip(names, struct.unpack_from("<16sQII", raw, entry)))
        values.update(fields)
        struct.pack_into("<16sQII", raw, entry, *values.values())
        raw[at:at + 64 * KiB] = with_crc(raw[at:at + 64 * KiB])
    path.write_bytes(raw)


def metadata_item(path, n):
    """File offset of the n-th metadata item qemu wrote (file parameters,
    size, disk id, logical, physical sector size)."""
    return METADATA + struct.unpack_from(
        "<I", path.read_bytes(), METADATA + 32 + 32 * n + 16)[0]


def test_bad_header_checksums(image):
    for at in (64 * KiB, 128 * KiB):
        patch(image, at + 4, b"\xde\xad\xbe\xef")
    assert_rejected(image, "vhdx", "neither header copy is valid")


def test_bad_region_table_checksums(image):
    for at in REGIONS:
        patch(image, at + 4, b"\xde\xad\xbe\xef")
    assert_rejected(image, "vhdx", "neither region table copy")


@pytest.mark.parametrize("offset,match", [
    (METADATA, "metadata region overlaps the BAT"),
    (LOG, "overlaps the log"),
    (0, "overlaps the header section"),
])
def test_regions_overlapping(image, offset, match):
    patch_regions(image, 0, file_offset=offset)         # the BAT region
    assert_rejected(image, "vhdx", match)


def test_region_past_the_end_of_the_file(image):
    """Read as zeros past the end, as qemu reads it; a region that grows
    over the blocks is refused for that."""
    patch_regions(image, 1, length=1 << 30)
    assert_rejected(image, "vhdx", "block at 8388608 overlaps the metadata")


def test_unknown_required_region(image):
    patch_regions(image, 1, guid=bytes(range(16)), required=1)
    assert_rejected(image, "vhdx", "unknown required region")


@pytest.mark.parametrize("entry,match", [
    (6 | 4096 << 20, "past the end of the file"),
    (6 | 10 << 20, "past the end of the file"),     # the last MiB, and on
    (6 | 2 << 20, "overlaps the BAT"),
    (4, "payload block state 4"),
    (7 | 8 << 20, "payload block state 7"),     # not differencing
])
def test_bat_entries(image, entry, match):
    patch(image, BAT + 8 * 3, struct.pack("<Q", entry))
    assert_rejected(image, "vhdx", match)


def reads_as_qemu_reads(path, tmp_path):
    theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
    run(["qemu-img", "convert", "-f", "vhdx", "-O", "raw", str(path),
         str(theirs)])
    nbdplug("convert", "-f", "vhdx", "-O", "raw", path, ours)
    assert ours.read_bytes() == theirs.read_bytes()


def test_what_qemu_reads(image, tmp_path):
    """Read as qemu reads them: the last block cut short by a truncated
    file (by less than a sector, the rest zeros), a block over the header
    section, a metadata region whose length is not whole MiB, a header
    copy of another version (the other copy is used)."""
    raw = bytearray(image.read_bytes())
    last = max(struct.unpack_from("<Q", raw, BAT + 8 * i)[0] >> 20
               for i in range(8))
    del raw[(last + 1) * MiB - 100:]
    image.write_bytes(raw)
    patch(image, BAT + 8 * 3, struct.pack("<Q", 6))
    patch_regions(image, 1, length=MiB + 256)
    first = bytearray(image.read_bytes()[64 * KiB:128 * KiB])
    struct.pack_into("<Q", first, 8, 1 << 40)           # sequence number
    struct.pack_into("<H", first, 66, 2)                # version
    patch(image, 64 * KiB, with_crc(first))
    reads_as_qemu_reads(image, tmp_path)


def test_blocks_overlapping_each_other(image):
    first = struct.unpack_from("<Q", image.read_bytes(), BAT)[0]
    patch(image, BAT + 8 * 6, struct.pack("<Q", first))
    assert_rejected(image, "vhdx", "overlaps another block")


@pytest.mark.parametrize("block_size", [0, 1 << 31, 0xFFFFFFFF, 3 * MiB,
                                        512 * KiB])
def test_block_sizes(image, block_size):
    patch(image, metadata_item(image, 0), struct.pack("<I", block_size))
    assert_rejected(image, "vhdx", "block size")


def test_virtual_size_beyond_64_tib(image):
    patch(image, metadata_item(image, 1), struct.pack("<Q", 65 << 40))
    assert_rejected(image, "vhdx", "virtual disk size")


def test_metadata_entry_count(image):
    patch(image, METADATA + 10, struct.pack("<H", 60000))
    assert_rejected(image, "vhdx", "entry_count")


def test_unknown_required_metadata_item(image):
    patch(image, METADATA + 32 + 32 * 4, bytes(range(16)))
    patch(image, METADATA + 32 + 32 * 4 + 24, struct.pack("<I", 4))
    assert_rejected(image, "vhdx", "unknown required metadata item")


# --- logs --------------------------------------------------------------------

def test_log_entry_claiming_gigabytes(image):
    entry = bytearray(log_entry(5, 0, GUID, zeros=[(BAT, 4096)]))
    struct.pack_into("<I", entry, 8, 0xFFFFF000)
    put_log(image, [(0, bytes(entry))], GUID)
    assert_rejected(image, "vhdx", "entry length")


def test_zero_descriptor_claiming_gigabytes(image):
    put_log(image, [(0, log_entry(5, 0, GUID, zeros=[(BAT, 1 << 40)]))],
            GUID)
    assert_rejected(image, "vhdx", "out of sequence or range")


def test_log_sequence_broken(image):
    """The newest entry names a tail that holds no entry."""
    put_log(image, [(8192, log_entry(5, 0, GUID, zeros=[(BAT, 4096)]))],
            GUID)
    assert_rejected(image, "vhdx", "is broken at 0")


def test_log_data_sector_damaged(image):
    put_log(image, [(0, log_entry(5, 0, GUID, writes=[(BAT, bytes(4096))],
                                  damage="data"))], GUID)
    assert_rejected(image, "vhdx", "damaged")


def test_log_of_a_longer_file(image):
    put_log(image, [(0, log_entry(5, 0, GUID, zeros=[(BAT, 4096)],
                                  flushed=1 << 40))], GUID)
    assert_rejected(image, "vhdx", "shorter than its log")


def test_log_full_of_torn_entries(image):
    entries = [(pos, log_entry(pos // 4096 + 1, pos, GUID,
                               zeros=[(BAT, 4096)], damage="crc")[:4096])
               for pos in range(0, LOG, 4096)]
    fat = []
    for pos, e in entries:      # each claims the whole log
        e = bytearray(e)
        struct.pack_into("<I", e, 8, LOG)
        fat.append((pos, bytes(e)))
    put_log(image, fat, GUID)
    assert_rejected(image, "vhdx", "fail their checksums")


def test_log_too_large_to_replay(image):
    with open(image, "r+b") as f:
        f.truncate(80 * MiB)
    raw = bytearray(image.read_bytes())
    for at in (64 * KiB, 128 * KiB):
        struct.pack_into("<I", raw, at + 68, 64 * MiB)      # log_length
        raw[at + 48:at + 64] = GUID
        raw[at:at + 4096] = with_crc(raw[at:at + 4096])
    image.write_bytes(raw)
    assert_rejected(image, "vhdx", "too large to replay")


# --- differencing ------------------------------------------------------------

def test_parent_outside_the_root(tmp_path):
    from test_510_vhdx import build_vhdx, current_header, linkage
    outside = tmp_path.parent / (tmp_path.name + "-parent.vhdx")
    qemu_vhdx(outside, 8 * MiB, "block_size=1M", writes=[])
    try:
        dw = struct.unpack_from("<16s", current_header(outside), 32)[0]
        child = tmp_path / "child.vhdx"
        build_vhdx(child, 8 * MiB, {}, parent={
            "parent_linkage": linkage(dw),
            "relative_path": "..\\" + outside.name,
            "absolute_win32_path": "C:" + str(outside).replace("/", "\\")})
        assert_rejected(child, "vhdx", "outside the allowed directories",
                        extra_files=[outside])
        # Allowed, it opens.
        nbdplug("info", "--backing-root", tmp_path.parent, child)
    finally:
        outside.unlink()


def test_partially_present_block_without_bitmap(tmp_path):
    from test_510_vhdx import build_vhdx
    child = tmp_path / "child.vhdx"
    build_vhdx(child, 8 * MiB, {1: ("partial", bytes(MiB), [0])},
               parent={"parent_linkage": "{" + "0" * 8 + "-0000-0000-0000-"
                       + "0" * 12 + "}", "relative_path": "p.vhdx"})
    raw = bytearray(child.read_bytes())
    sb = BAT + 8 * 4096                 # the chunk's sector bitmap entry
    raw[sb:sb + 8] = bytes(8)
    child.write_bytes(raw)
    assert_rejected(child, "vhdx", "without a sector bitmap")
