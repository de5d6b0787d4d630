"""Hostile VMDK images (tests/hostile.py): each is refused with one clear
line naming the file and the field, exit status 2, within the memory cap
and deadline, and nothing is written."""

import os
import struct

import pytest

from conftest import NBDPLUG, run
from hostile import assert_rejected
from nbdplug import CorruptImage, open_image
from nbdplug.disk import BACKING
from nbdplug.formats.vmdk.structs import GRAIN_MARKER, SPARSE_HEADER
from test_400_vmdk_read import qemu_vmdk, random_raw, vmware_stream

MiB = 1 << 20


def patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_field(path, field, value, footer=False):
    """Overwrite one header field (of the footer's copy if `footer`)."""
    base = os.path.getsize(path) - 1024 if footer else 0
    at = SPARSE_HEADER.offset(field)
    following = SPARSE_HEADER.fields[SPARSE_HEADER.fields.index(field) + 1]
    patch(path, base + at, value.to_bytes(
        SPARSE_HEADER.offset(following) - at, "little"))


def header(path):
    with open(path, "rb") as f:
        return SPARSE_HEADER.unpack_from(f.read(512))


def first_gte(path):
    """File offset of the first allocated grain table entry."""
    hdr = header(path)
    with open(path, "rb") as f:
        f.seek(hdr.gdOffset * 512)
        gt = int.from_bytes(f.read(4), "little")
        f.seek(gt * 512)
        table = struct.unpack(f"<{hdr.numGTEsPerGT}I",
                              f.read(4 * hdr.numGTEsPerGT))
    i = next(i for i, e in enumerate(table) if e)
    return gt * 512 + 4 * i, table[i]


def descriptor(path, *extent_lines, extra=""):
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=12345678\n'
                    'parentCID=ffffffff\ncreateType="monolithicFlat"\n'
                    + extra + "\n".join(extent_lines) + "\n")
    return path


@pytest.fixture
def sparse(tmp_path):
    return qemu_vmdk(tmp_path, "monolithicSparse", "partial")


# --- descriptors and extent names --------------------------------------------

def test_descriptor_megabytes_long(tmp_path):
    image = tmp_path / "big.vmdk"
    image.write_bytes(b"# Disk DescriptorFile\n" + b"# padding\n" * 500000)
    assert_rejected(image, "vmdk", "too large for a descriptor")


def test_descriptor_line_too_long(tmp_path):
    image = descriptor(tmp_path / "d.vmdk", 'RW 8 FLAT "' + "a" * 100000 +
                       '" 0')
    assert_rejected(image, "vmdk", "longer than 8192 bytes")


@pytest.mark.parametrize("field,value", [
    ("descriptorSize", 1 << 40), ("descriptorOffset", 1 << 40),
    ("descriptorOffset", 5)])
def test_embedded_descriptor_misplaced(sparse, field, value):
    """A reader reads the descriptor where qemu does (the sectors after
    the header); a writer, which rewrites it, refuses."""
    set_field(sparse, field, value)
    read_as_qemu_reads(sparse)
    if value > 5:
        assert_rejected(sparse, "vmdk", field, readonly=False)


def test_embedded_descriptor_damaged_lines_are_skipped(sparse):
    """qemu looks only for the keys it needs; a reader skips lines it does
    not understand and keys given twice."""
    with open(sparse, "rb") as f:
        f.seek(512)
        text = f.read(10240).split(b"\0")[0]
    damaged = text.replace(b"version=1", b"version=1\n?%$ garbage\n"
                           b"version=1").replace(b'"monolithicSparse"',
                                                 b'"x"')
    patch(sparse, 512, damaged)
    read_as_qemu_reads(sparse)
    with pytest.raises(CorruptImage, match="not understood"):
        open_image(str(sparse), "vmdk", readonly=False)


@pytest.mark.parametrize("name", ["/etc/passwd", "../../../../etc/passwd"])
def test_extent_outside_the_root(tmp_path, name):
    image = descriptor(tmp_path / "d.vmdk", f'RW 8 FLAT "{name}" 0')
    assert_rejected(image, "vmdk", "outside the allowed directories")


def test_extent_is_the_descriptor_itself(tmp_path):
    image = descriptor(tmp_path / "d.vmdk", 'RW 1 FLAT "d.vmdk" 0')
    assert_rejected(image, "vmdk", "refers to the image itself")


def test_extent_symlink_out_of_the_root(tmp_path):
    os.symlink("/etc/passwd", tmp_path / "link-flat.vmdk")
    image = descriptor(tmp_path / "d.vmdk", 'RW 8 FLAT "link-flat.vmdk" 0')
    assert_rejected(image, "vmdk", "outside the allowed directories")


@pytest.mark.parametrize("kind,match", [("b", "block device"),
                                        ("c", "not a regular file")])
def test_extent_device_node(tmp_path, kind, match):
    node = tmp_path / "node-flat.vmdk"
    os.mknod(node, 0o600 | (0o060000 if kind == "b" else 0o020000),
             os.makedev(7, 0) if kind == "b" else os.makedev(1, 3))
    image = descriptor(tmp_path / "d.vmdk", 'RW 8 FLAT "node-flat.vmdk" 0')
    assert_rejected(image, "vmdk", match)


def test_extent_listed_twice(tmp_path):
    (tmp_path / "a.raw").write_bytes(bytes(8192))
    image = descriptor(tmp_path / "d.vmdk", 'RW 8 FLAT "a.raw" 0',
                       'RW 8 FLAT "a.raw" 8')
    assert_rejected(image, "vmdk", "is extent 1 already")


@pytest.mark.parametrize("line,match", [
    ('RW 8 VMFSSPARSE "x.vmdk"', "VMFSSPARSE extents are not supported"),
    ('RW 0 FLAT "x.vmdk" 0', "an extent of 0 sectors"),
    ('RW 8 FLAT', "needs a file name"),
    ('RW 8 ZERO "x.vmdk"', "names no file"),
    ('RWX 8 FLAT "x.vmdk" 0', "not understood"),
])
def test_extent_line_refused(tmp_path, line, match):
    assert_rejected(descriptor(tmp_path / "d.vmdk", line), "vmdk", match)


def test_total_size_huge(tmp_path):
    image = descriptor(tmp_path / "d.vmdk", *["RW 99999999999999 ZERO"] * 3)
    assert_rejected(image, "vmdk", "more than supported")


def test_parent_cid_mismatch(tmp_path):
    base = qemu_vmdk(tmp_path, "monolithicSparse", "empty", name="b.vmdk")
    child = descriptor(tmp_path / "c.vmdk", "RW 49152 ZERO",
                       extra='parentFileNameHint="b.vmdk"\n')
    assert_rejected(child, "vmdk", "parentCID", extra_files=[base])


def test_parent_is_itself(tmp_path):
    child = descriptor(tmp_path / "c.vmdk", "RW 8 ZERO",
                       extra='parentFileNameHint="c.vmdk"\n')
    assert_rejected(child, "vmdk", "parentFileNameHint")


# --- sparse extent headers and tables ----------------------------------------

@pytest.mark.parametrize("field,value,match", [
    ("numGTEsPerGT", 0, "numGTEsPerGT"),
    ("numGTEsPerGT", 0xFFFFFFFF, "numGTEsPerGT"),
    ("grainSize", 0, "grainSize"),
    ("grainSize", 1 << 40, "grainSize"),
    ("capacity", 1 << 62, "capacity"),
    ("version", 7, "version"),
    ("overHead", 1 << 20, "overHead"),        # qemu: "File truncated"
    ("rgdOffset", 1 << 54, "rgdOffset"),      # qemu cannot address it
])
def test_header_field(sparse, field, value, match):
    set_field(sparse, field, value)
    assert_rejected(sparse, "vmdk", match)


@pytest.mark.parametrize("field,value", [
    ("gdOffset", 1 << 30),          # a directory past the end: zeros
    ("gdOffset", 0),                # the directory over the header
    ("gdOffset", 1 << 55),          # the same, modulo 2**64 as in qemu
    ("grainSize", 100),             # not a power of two
    ("flags", 1 << 17),             # markers, but grains not compressed
])
def test_header_field_qemu_reads(sparse, field, value):
    """What qemu reads safely a reader reads alike; a writer refuses."""
    set_field(sparse, field, value)
    read_as_qemu_reads(sparse)
    assert_rejected(sparse, "vmdk", field, readonly=False)


def test_capacity_zero_with_descriptor(sparse):
    """qemu takes the file for a descriptor then, and refuses it."""
    set_field(sparse, "capacity", 0)
    assert_rejected(sparse, "vmdk", "capacity")


def read_as_qemu_reads(path):
    """qemu-img and nbdplug read the image, and read the same bytes."""
    out = path.with_suffix(".raw")
    run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(path),
         str(out)])
    with open_image(str(path), "vmdk") as disk:
        assert bytes(disk.read(disk.size, 0)) == out.read_bytes()


def test_newline_test_characters_damaged_are_ignored(sparse):
    """qemu ignores them; so do we, reading and writing."""
    patch(sparse, SPARSE_HEADER.offset("doubleEndLineChar1"), b"\n")
    read_as_qemu_reads(sparse)
    with open_image(str(sparse), "vmdk", readonly=False) as disk:
        disk.pwrite(b"x" * 512, 0)


def gd_entry_past_eof(path):
    patch(path, header(path).gdOffset * 512, struct.pack("<I", 1 << 30))
    return "grain table lies past the end"


def rgd_same_as_primary(path):
    """The redundant table made the same as the primary one: a write
    through one would change the other."""
    hdr = header(path)
    with open(path, "rb") as f:
        f.seek(hdr.gdOffset * 512)
        first = f.read(4)
    patch(path, hdr.rgdOffset * 512, first)
    return "overlaps"


def gte_past_eof(path):
    offset, _ = first_gte(path)
    patch(path, offset, struct.pack("<I", 0x7FFFFFFF))
    return "past the end of the file"


@pytest.mark.parametrize("damage", [gd_entry_past_eof, rgd_same_as_primary,
                                    gte_past_eof])
def test_tables_a_reader_takes_and_a_writer_refuses(sparse, damage):
    """Read as qemu reads them (what lies past the end of the file as
    zeros; the redundant directory not at all), refused for writing."""
    match = damage(sparse)
    read_as_qemu_reads(sparse)
    assert_rejected(sparse, "vmdk", match, readonly=False)


def test_grain_table_entry_into_metadata_refused_for_writing(sparse):
    """A grain over the tables could be read, but writing it would
    overwrite them: a writable open refuses."""
    offset, _ = first_gte(sparse)
    patch(sparse, offset, struct.pack("<I", header(sparse).gdOffset))
    before = sparse.read_bytes()
    with pytest.raises(CorruptImage, match="into the metadata"):
        open_image(str(sparse), "vmdk", readonly=False)
    assert sparse.read_bytes() == before


# --- streams -----------------------------------------------------------------

@pytest.fixture
def stream(tmp_path):
    src = random_raw(tmp_path / "src.raw", 4 * MiB, 1, holes=False)
    image = tmp_path / "s.vmdk"
    run(["qemu-img", "convert", "-O", "vmdk", "-o",
         "subformat=streamOptimized", str(src), str(image)])
    return image


def first_marker(path):
    return first_gte(path)[1] * 512


@pytest.mark.parametrize("size", [10 * 65536, 0xFFFFFFFF, 0])
def test_compressed_grain_size_larger_than_a_grain(stream, size):
    patch(stream, first_marker(stream) + 8, struct.pack("<I", size))
    assert_rejected(stream, "vmdk", "compressed bytes, where a grain "
                    "deflates to 1 to")


def test_compressed_grain_marker_names_another_grain(stream):
    """qemu reads the grain without looking; a writer refuses."""
    patch(stream, first_marker(stream), struct.pack("<Q", 128 * 5))
    read_as_qemu_reads(stream)
    assert_rejected(stream, "vmdk", "marker names sector", readonly=False)


def test_compressed_grain_that_inflates_short(stream, tmp_path):
    """Grains larger than the header said they were written with inflate
    short: qemu fails reading them, so does a reader."""
    set_field(stream, "grainSize", 256)
    for argv in (["qemu-img"], NBDPLUG):
        proc = run(argv + ["convert", "-f", "vmdk", "-O", "raw",
                           str(stream), str(tmp_path / "out.raw")],
                   check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr


def test_compressed_grain_that_does_not_inflate(stream):
    """Found when the grain is read: that read fails, nothing else."""
    patch(stream, first_marker(stream) + GRAIN_MARKER.size + 100,
          b"garbage!")
    with open_image(str(stream)) as disk:
        buf = bytearray(65536)
        with pytest.raises(CorruptImage, match="grain 0: does not inflate"):
            disk.pread(memoryview(buf), 0)
        disk.pread(memoryview(buf), 65536)


def vmware(tmp_path):
    image = tmp_path / "vs.vmdk"
    vmware_stream(str(image), random_raw(tmp_path / "r.raw", 2 * MiB, 2,
                                         holes=False).read_bytes())
    return image


def test_stream_footer_pointing_into_itself(tmp_path):
    image = vmware(tmp_path)
    set_field(image, "gdOffset", os.path.getsize(image) // 512 - 2,
              footer=True)
    read_as_qemu_reads(image)       # reading the footer harms nothing
    assert_rejected(image, "vmdk", "outside the file before its footer",
                    readonly=False)


def test_stream_footer_missing(tmp_path):
    image = vmware(tmp_path)
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) - 512)
    assert_rejected(image, "vmdk", "footer")


def test_stream_footer_disagrees_with_header(tmp_path):
    image = vmware(tmp_path)
    set_field(image, "capacity", 1 << 30, footer=True)
    assert_rejected(image, "vmdk", "capacity differs")


def test_terabytes_of_unstored_tables_map_in_one_piece(sparse):
    """A 2 TiB capacity whose directory lies past the end of the file
    (zeros, as qemu reads it): the disk maps as one unallocated piece,
    not 32 million grains one by one."""
    set_field(sparse, "capacity", 1 << 32)
    set_field(sparse, "gdOffset", 1 << 30)
    with open_image(str(sparse), "vmdk") as disk:
        assert disk.size == 1 << 41
        assert disk.parts[0].segments(0, disk.size) == \
            [(BACKING, disk.size, None)]
        assert bytes(disk.read(512, disk.size - 512)) == bytes(512)
