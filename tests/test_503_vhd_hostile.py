"""Hostile VHD images: each is refused in one line naming the file and the
field, exit status 2, in bounded memory and time, the file unchanged."""

import struct

import pytest

from conftest import nbdplug, run
from hostile import assert_rejected
from test_500_vhd import (header_of, patch_footers, patch_header, qemu_raw,
                          read_all, set_bat)

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    """A qemu-written dynamic VHD with two blocks allocated."""
    path = tmp_path / "disk.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "force_size=on",
         str(path), "8M"])
    run(["qemu-io", "-f", "vpc", "-c", "write -P 1 0 4k", "-c",
         "write -P 2 4M 4k", str(path)])
    return path


@pytest.fixture
def child(tmp_path):
    """Our differencing child of a parent in the same directory."""
    nbdplug("create", "-q", "-f", "vpc", tmp_path / "parent.vhd", "4M")
    path = tmp_path / "child.vhd"
    nbdplug("create", "-q", "-f", "vpc", "-b", "parent.vhd", path)
    return path


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(raw)


def test_bad_footer_checksums(image):
    raw = bytearray(image.read_bytes())
    for at in (0, len(raw) - 512):
        raw[at + 64] ^= 0xFF                # the checksum field
    image.write_bytes(raw)
    assert_rejected(image, "vpc", "footer.checksum")


def test_bad_dynamic_header_checksum(image):
    """qemu does not check it: a reader reads on, a writer refuses."""
    corrupt(image, 512 + 40, b"\xde\xad")       # inside parent_unique_id
    assert read_all(image) == qemu_raw(image)
    assert_rejected(image, "vpc", "dynamic header checksum", readonly=False)


@pytest.mark.parametrize("version", [0x00020000, 0xFFFF, 0x40000000])
def test_unknown_versions(image, version):
    """qemu reads past unknown format and dynamic header versions: so do
    readers; a writer refuses them."""
    patch_footers(image, file_format_version=version)
    assert read_all(image) == qemu_raw(image)
    assert_rejected(image, "vpc", "format version", readonly=False)
    patch_footers(image, file_format_version=0x00010000)
    patch_header(image, header_version=version)
    assert read_all(image) == qemu_raw(image)
    assert_rejected(image, "vpc", "dynamic header version", readonly=False)


def test_no_footer_anywhere(image):
    corrupt(image, 0, bytes(512))
    corrupt(image, image.stat().st_size - 512, bytes(512))
    assert_rejected(image, "vpc", "footer.cookie")


@pytest.mark.parametrize("entry,match", [
    (0x7FFFFFF0, "past the end of the file"),
    (1, "overlaps the dynamic header"),
    (3, "overlaps the BAT"),
])
def test_bat_entries(image, entry, match):
    """A reader takes such blocks, as qemu does; a writer refuses."""
    set_bat(image, 3, entry)
    assert_rejected(image, "vpc", match, readonly=False)


@pytest.mark.parametrize("entry", [0, 1, 3])
def test_blocks_over_metadata_read_as_qemu(image, entry):
    """A block over the footer copy, the dynamic header or the BAT reads
    whole, its "bitmap" being metadata bytes, as qemu reads it."""
    set_bat(image, 1, entry)
    assert read_all(image) == qemu_raw(image)


def test_damaged_bitmap_reads_the_block_whole(image):
    """A dynamic disk's block reads whole whatever its bitmap says (as in
    qemu): a cleared bitmap loses no data."""
    first = struct.unpack_from(">I", image.read_bytes(),
                               header_of(image).table_offset)[0]
    corrupt(image, first * 512, bytes(512))
    assert read_all(image)[:4096] == b"\1" * 4096
    assert read_all(image) == qemu_raw(image)


def test_bitmap_past_end_of_file(image):
    """A block whose bitmap starts inside the file but ends past it."""
    size = image.stat().st_size
    set_bat(image, 3, size // 512 - 1)
    assert_rejected(image, "vpc", "past the end of the file",
                    readonly=False)


def test_blocks_overlapping_each_other(image):
    hdr = header_of(image)
    first = struct.unpack_from(">I", image.read_bytes(), hdr.table_offset)[0]
    set_bat(image, 1, first + 1)
    assert_rejected(image, "vpc", "overlaps the block of BAT[0]",
                    readonly=False)


@pytest.mark.parametrize("block_size", [0, 0xFFFFFFFF, 1 << 31, 3 * MiB,
                                        256])
def test_block_sizes(image, block_size):
    patch_header(image, block_size=block_size)
    assert_rejected(image, "vpc", "block size")


def test_bat_too_small_and_too_large(image, tmp_path):
    patch_header(image, max_table_entries=2)
    assert_rejected(image, "vpc", "cannot map")
    patch_header(image, max_table_entries=0xFFFFFFFF)
    assert_rejected(image, "vpc", "max_table_entries")


def test_bat_outside_the_file(image):
    patch_header(image, table_offset=1 << 40)
    assert_rejected(image, "vpc", "table_offset")


@pytest.mark.parametrize("fields,match", [
    ({"disk_type": 7}, "disk_type"),
    ({"current_size": 2041 << 30}, "2040 GiB"),
    ({"data_offset": 1 << 50}, "data_offset"),
])
def test_footer_fields(image, fields, match):
    patch_footers(image, **fields)
    assert_rejected(image, "vpc", match)


def test_fixed_disk_shorter_than_its_size(tmp_path):
    """A reader, as qemu, reads what lies past the end as zeros (the
    footer among the guest's bytes); a writer refuses."""
    path = tmp_path / "fixed.vhd"
    nbdplug("create", "-q", "-f", "vpc", "-o", "subformat=fixed", path,
            "1M")
    patch_footers(path, current_size=64 * MiB)
    assert read_all(path) == qemu_raw(path)
    assert_rejected(path, "vpc", "too short", readonly=False)


def _locator(path, index, **fields):
    hdr = header_of(path)
    entries = bytearray(hdr.parent_locator_entries)
    from nbdplug.formats.vhd import structs as vhd
    loc = vhd.PARENT_LOCATOR.unpack_from(entries, 24 * index)
    vhd.PARENT_LOCATOR.pack_into(entries, 24 * index,
                                 loc._replace(**fields))
    patch_header(path, parent_locator_entries=bytes(entries))


def test_locator_with_absurd_length(child):
    _locator(child, 0, platform_data_length=0xFFFFFFF0)
    assert_rejected(child, "vpc", "absurd")


def test_locator_data_outside_the_file(child):
    _locator(child, 1, platform_data_offset=1 << 40)
    assert_rejected(child, "vpc", "outside the file")


def test_locators_pointing_outside_the_root(child, tmp_path):
    """Every locator names a real VHD outside the image's directory."""
    outside = tmp_path.parent / (tmp_path.name + "-outside.vhd")
    nbdplug("create", "-q", "-f", "vpc", outside, "4M")
    try:
        from test_501_vhd_write import rewrite_locators
        rewrite_locators(child, [
            (b"W2ru", "..\\" .encode("utf-16-le") + outside.name.encode(
                "utf-16-le")),
            (b"W2ku", str(outside).encode("utf-16-le")),
            (b"MacX", f"file://{outside}".encode()),
        ])
        assert_rejected(child, "vpc", "outside the allowed directories",
                        extra_files=[outside])
    finally:
        outside.unlink()


def test_locator_naming_the_image_itself(child):
    from test_501_vhd_write import rewrite_locators
    rewrite_locators(child, [(b"W2ru", ".\\child.vhd".encode("utf-16-le"))])
    assert_rejected(child, "vpc", "the image itself")


def test_locator_not_utf16(child):
    from test_501_vhd_write import rewrite_locators
    rewrite_locators(child, [(b"W2ru", b"\x00\xd8\x00\xd8")])
    assert_rejected(child, "vpc", "UTF-16")
