"""Metadata overlap checks: a guest write through a crafted pointer never
lands on metadata.

Each qcow2 image below points a guest cluster (or an L2 table) at one
class of metadata qemu guards; a write through nbdplug serve is refused
with EIO, that metadata is left as it was, the image is marked corrupt
(as qemu does: "Preventing invalid write on metadata") and every later
write is refused while reads go on.  qcow (version 1) refuses the same
without a corrupt bit; VMDK and VHD refuse the equivalent at open.
"""

import shutil
import struct

import nbd
import pytest

from conftest import qemu_img_info, run, served
from nbdplug import open_image
from nbdplug.errors import CorruptImage
from nbdplug.formats.qcow2 import structs as S
from nbdplug.formats.qcow2.header import read_header
from nbdplug.formats.qcow2.tables import load_table
from nbdplug.hostfile import HostFile

KiB, MiB = 1 << 10, 1 << 20
CS = 64 * KiB
COPIED = S.QCOW_OFLAG_COPIED


def qemu_io(image, fmt, *commands):
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    run(argv + [str(image)])


def poke(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def peek(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class Layout:
    """Where qemu put the structures of a qcow2 image."""

    def __init__(self, path):
        f = HostFile(str(path))
        try:
            self.geo = geo = read_header(f, str(path))
            self.l1 = load_table(f, geo.l1_table_offset, geo.l1_size)
            self.reftable = load_table(f, geo.refcount_table_offset,
                                       geo.refcount_table_clusters * CS // 8)
        finally:
            f.close()

    def l2(self, index=0):
        return self.l1[index] & S.L1E_OFFSET_MASK

    def l2_entry(self, guest):
        """Host offset of the L2 entry of guest offset `guest`."""
        return self.l2(guest >> 29) + 8 * ((guest >> 16) & 8191)


@pytest.fixture
def image(tmp_path):
    """qcow2 v3, 64 KiB clusters, two clusters of data at 0 and 64k."""
    path = tmp_path / "o.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "4M"])
    qemu_io(path, "qcow2", "write -P 1 0 128k")
    return path


def with_snapshot(path):
    """A snapshot, then a write that gives the active L1 its own copy of
    the L2 table: the old one is the snapshot's alone (inactive L2)."""
    run(["qemu-img", "snapshot", "-c", "s1", str(path)])
    qemu_io(path, "qcow2", "write -P 3 1M 64k")


def snapshot_table(path):
    lay = Layout(path)
    return lay.geo.snapshots_offset


def snapshot_l1(path):
    lay = Layout(path)
    raw = peek(path, lay.geo.snapshots_offset, 8)
    return struct.unpack(">Q", raw)[0]


def inactive_l2(path):
    return struct.unpack(">Q", peek(path, snapshot_l1(path), 8))[0] & \
        S.L1E_OFFSET_MASK


def bitmap_directory(path):
    run(["qemu-img", "bitmap", "--add", str(path), "b0"])
    with open(path, "rb") as f:
        first = f.read(CS)
    pos = read_header(HostFile(str(path)), str(path)).header_length
    while True:
        kind, length = struct.unpack_from(">II", first, pos)
        if kind == S.EXT_BITMAPS:
            return struct.unpack_from(">Q", first, pos + 8 + 16)[0]
        pos += 8 + -(-length // 8) * 8


# name: (prepare the image, host offset of the metadata the guest
# cluster at offset 0 is pointed at)
TARGETS = {
    "active L1 table": (None, lambda p: Layout(p).geo.l1_table_offset),
    "active L2 table": (None, lambda p: Layout(p).l2()),
    "refcount table": (None,
                       lambda p: Layout(p).geo.refcount_table_offset),
    "refcount block": (None, lambda p: Layout(p).reftable[0]),
    "snapshot table": (with_snapshot, snapshot_table),
    "inactive L1 table": (with_snapshot, snapshot_l1),
    "inactive L2 table": (with_snapshot, inactive_l2),
    "bitmap directory": (None, bitmap_directory),
}


def assert_refused(image, target, name, guest=0,
                   readable=(64 * KiB, b"\x01")):
    """A write to `guest` (its cluster pointed at `target`) is refused:
    by the driver naming `name` as qemu does, and through nbdkit with EIO;
    the target is untouched, the image marked corrupt, later writes
    refused, reads served."""
    before = peek(image, target, CS)
    copy = image.with_suffix(".copy")
    shutil.copy(image, copy)
    with open_image(str(copy), "qcow2", readonly=False) as disk:
        with pytest.raises(CorruptImage, match=r"Preventing invalid write "
                           rf"on metadata \(overlaps with {name}\)"):
            disk.pwrite(b"\xee" * 4096, guest)
        assert disk.stopped
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\xee" * 4096, guest)
        assert e.value.errno == "EIO"
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xee" * 4096, 2 * MiB)       # anywhere now
        offset, byte = readable
        assert h.pread(4096, offset) == byte * 4096
    assert peek(image, target, CS) == before
    assert qemu_img_info(image)["format-specific"]["data"]["corrupt"]
    with pytest.raises(CorruptImage, match="corrupt"):
        open_image(str(image), "qcow2", readonly=False)


@pytest.mark.parametrize("name", TARGETS)
def test_guest_write_onto_metadata_refused(image, name):
    prepare, where = TARGETS[name]
    if prepare:
        prepare(image)
    target = where(image)
    lay = Layout(image)
    poke(image, lay.l2_entry(0), COPIED | target)
    # The write in place needs an L2 table of its own (COPIED): after a
    # snapshot qemu left the active one shared.
    poke(image, lay.geo.l1_table_offset, lay.l1[0] | COPIED)
    assert_refused(image, target, name)


def test_l2_entry_at_the_header_allocates_instead(image):
    """Offset 0 means "not allocated": qemu and nbdplug both write the
    guest cluster elsewhere, and the header stays."""
    lay = Layout(image)
    poke(image, lay.l2_entry(0), COPIED)
    header = peek(image, 0, CS)
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        h.pwrite(b"\xee" * 4096, 0)
        h.flush()
        assert h.pread(4096, 0) == b"\xee" * 4096
    assert peek(image, 0, CS) == header


def test_l2_table_on_a_refcount_block(image):
    """An L1 entry pointing at a refcount block: allocating a cluster
    whose L2 entry (a refcount of a cluster past the end of the file, so
    0) lies in the block would write metadata onto metadata."""
    lay = Layout(image)
    poke(image, lay.geo.l1_table_offset, COPIED | lay.reftable[0])
    assert_refused(image, lay.reftable[0], "(active L2 table|refcount "
                   "block)", guest=40 * CS, readable=(41 * CS, b"\0"))


def test_plain_writes_still_take_the_fast_path(image):
    """The checks refuse nothing on a sound image: rewrites of allocated
    clusters, allocations, zeroing and discard all go through and qemu-img
    check finds the image clean."""
    with served(str(image), "qcow2") as srv:
        h = srv.connect()
        for i in range(16):
            h.pwrite(bytes([i + 1]) * 4096, i * 4096)
        h.pwrite(b"\x05" * CS, 2 * MiB)
        h.zero(CS, 0)
        h.trim(CS, 2 * MiB)
        h.flush()
    run(["qemu-img", "check", str(image)])


# --- qcow (version 1): no corrupt bit, the same refusals --------------------

@pytest.fixture
def qcow(tmp_path):
    """qemu's qcow: 4 KiB clusters, 2 MiB per L2 table; data at 0 and in
    a second table at 2M."""
    path = tmp_path / "o.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", str(path), "4M"])
    qemu_io(path, "qcow", "write -P 1 0 8k", "write -P 2 2M 4k")
    return path


def qcow_tables(path):
    from nbdplug.formats.qcow import HEADER
    raw = path.read_bytes()
    l1_offset = HEADER.unpack_from(raw).l1_table_offset
    return struct.unpack_from(">2Q", raw, l1_offset)


@pytest.mark.parametrize("op", ["write", "zero", "trim"])
@pytest.mark.parametrize("which", [0, 1])
def test_qcow_entry_onto_an_l2_table(qcow, op, which):
    """The L2 entry of guest cluster 1 pointed at an L2 table (its own,
    or the other one): writing, zeroing or trimming that cluster would
    destroy the table."""
    tables = qcow_tables(qcow)
    target = tables[which]
    poke(qcow, tables[0] + 8, target)
    before = peek(qcow, target, 4096)
    with served(str(qcow), "qcow") as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error) as e:
            {"write": lambda: h.pwrite(b"\xee" * 4096, 4096),
             "zero": lambda: h.zero(4096, 4096),
             "trim": lambda: h.trim(4096, 4096)}[op]()
        assert e.value.errno == "EIO"
        with pytest.raises(nbd.Error):
            h.pwrite(b"\xee" * 4096, 3 * MiB)       # stopped writing
        assert h.pread(4096, 0) == b"\x01" * 4096
    assert peek(qcow, target, 4096) == before
    with open_image(str(qcow), "qcow", readonly=False) as disk:
        with pytest.raises(CorruptImage, match=r"Preventing invalid write "
                           r"on metadata \(overlaps with L2 table\)"):
            disk.pwrite(b"\xee" * 512, 4096)


def test_qcow_tables_sharing_bytes_refused_for_writing(qcow):
    tables = qcow_tables(qcow)
    from nbdplug.formats.qcow import HEADER
    l1_offset = HEADER.unpack_from(qcow.read_bytes()).l1_table_offset
    poke(qcow, l1_offset + 8, tables[0])     # one table, two L1 entries
    before = qcow.read_bytes()
    with pytest.raises(CorruptImage, match="overlap"):
        open_image(str(qcow), "qcow", readonly=False)
    with open_image(str(qcow), "qcow") as disk:      # reading is safe
        assert bytes(disk.read(4096, 0)) == b"\x01" * 4096
    assert qcow.read_bytes() == before


# --- VMDK and VHD: a writable open refuses the equivalent ---------------------

def vmdk_grain_onto_directory(tmp_path):
    from nbdplug.formats.vmdk.structs import SPARSE_HEADER
    path = tmp_path / "o.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", str(path), "4M"])
    qemu_io(path, "vmdk", "write -P 1 0 64k")
    raw = bytearray(path.read_bytes())
    hdr = SPARSE_HEADER.unpack_from(raw)
    gt = struct.unpack_from("<I", raw, hdr.gdOffset * 512)[0]
    struct.pack_into("<I", raw, gt * 512, hdr.gdOffset)  # grain 0 -> GD
    path.write_bytes(raw)
    return path, "vmdk", "into the metadata"


def vhd_block_onto_bat(tmp_path):
    from test_500_vhd import header_of, set_bat
    path = tmp_path / "o.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", str(path), "8M"])
    qemu_io(path, "vpc", "write -P 1 0 4k")
    set_bat(path, 1, header_of(path).table_offset // 512)
    return path, "vpc", "overlaps the BAT"


@pytest.mark.parametrize("craft", [vmdk_grain_onto_directory,
                                   vhd_block_onto_bat])
def test_other_formats_refuse_at_open(tmp_path, craft):
    """VMDK and VHD need no run-time check: a writable open already
    refuses a grain or block over the tables, and leaves the file."""
    path, fmt, match = craft(tmp_path)
    before = path.read_bytes()
    with pytest.raises(CorruptImage, match=match):
        open_image(str(path), fmt, readonly=False)
    assert path.read_bytes() == before
