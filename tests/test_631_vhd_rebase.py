"""nbdplug rebase of differencing VHDs: the parent's unique id, time
stamp, name and locators it records (read back by our driver and by
libvhdi, given the parent by hand), the guest bytes a safe rebase and a
flatten keep, the images it refuses to touch.  qemu ignores parent
locators: it is a reference only for the child's own blocks (and for a
flattened, dynamic disk)."""

import os
import shutil
import struct

import pyvhdi
import pytest

from conftest import nbdplug
from nbdplug.formats.vhd import structs as vhd
from test_500_vhd import (header_of, patch_header, qemu_raw, qemu_vhd,
                          read_all)
import test_501_vhd_write
from test_501_vhd_write import SIZE, libvhdi_read
from test_630_rebase import assert_refused, qcow2

chain = test_501_vhd_write.chain        # the fixture: parent <- child


def footer_at(path, at):
    data = path.read_bytes()
    return vhd.FOOTER.unpack_from(data, at if at >= 0 else len(data) + at)


def unique_id(path):
    return footer_at(path, -512).unique_id


def locators(path):
    """{code: data} of the parent locators in use."""
    hdr, data, out = header_of(path), path.read_bytes(), {}
    for i in range(8):
        e = vhd.PARENT_LOCATOR.unpack_from(hdr.parent_locator_entries,
                                           24 * i)
        if e.platform_code != bytes(4):
            off = e.platform_data_offset
            out[e.platform_code] = data[off:off + e.platform_data_length]
    return out


def assert_header_checksum(path):
    raw = path.read_bytes()
    at = struct.unpack_from(">Q", raw, 16)[0]
    buf = raw[at:at + 1024]
    assert header_of(path).checksum == vhd.checksum(
        buf, vhd.DYNAMIC_HEADER.offset("checksum"))


def libvhdi_parent_name(path):
    f = pyvhdi.file()
    f.open(str(path))
    try:
        return f.get_parent_filename()
    finally:
        f.close()


def test_unsafe_after_moving_the_parent(chain, tmp_path):
    child, parent, model, own = chain
    os.rename(tmp_path / "base", tmp_path / "moved")
    moved = tmp_path / "moved" / "parent.vhd"
    with pytest.raises(Exception, match="parent"):
        read_all(child)
    stamp = os.stat(moved).st_mtime
    nbdplug("rebase", "-u", "-b", "moved/parent.vhd", child)
    assert read_all(child) == bytes(model)
    assert libvhdi_read(child, moved) == bytes(model)
    assert libvhdi_parent_name(child) == "moved/parent.vhd"
    assert qemu_raw(child) == bytes(own)
    hdr = header_of(child)
    assert hdr.parent_unique_id == unique_id(moved)
    assert hdr.parent_time_stamp == int(stamp) - vhd.VHD_EPOCH
    locs = locators(child)
    assert locs[b"W2ru"].decode("utf-16-le") == ".\\moved\\parent.vhd"
    assert locs[b"W2ku"].decode("utf-16-le") == \
        str(moved).replace("/", "\\")
    assert_header_checksum(child)
    assert nbdplug("check", child).returncode == 0
    # The relative locator alone finds it after the whole tree moves.
    shutil.move(str(tmp_path), str(tmp_path) + "-2")
    try:
        assert read_all(tmp_path.parent / (tmp_path.name + "-2") /
                        "child.vhd") == bytes(model)
    finally:
        shutil.move(str(tmp_path) + "-2", str(tmp_path))


def other_parent(tmp_path):
    """A VHD of the chain's size that agrees with the old parent on some
    ranges and differs on others."""
    other = tmp_path / "other.vhd"
    qemu_vhd(other, SIZE, writes=[(0, 64 * 1024, 0x11),
                                  (2 * vhd.MiB, 5 * vhd.MiB, 0x77)])
    return other


def test_a_crash_between_locators_and_header(chain, tmp_path):
    """The state a crash can leave: the new locator data, the old header.
    The old parent is found by the name that header records: the disk
    reads as before the rebase."""
    child, parent, model, _ = chain
    before = child.read_bytes()
    other_parent(tmp_path)
    nbdplug("rebase", "-u", "-b", "other.vhd", child)
    after = bytearray(child.read_bytes())
    at = struct.unpack_from(">Q", before, 16)[0]         # dynamic header
    assert after[at:at + 1024] != before[at:at + 1024]
    after[at:at + 1024] = before[at:at + 1024]
    assert after != before          # the locator data did change
    child.write_bytes(after)
    assert read_all(child) == bytes(model)


def test_safe_rebase_keeps_guest_bytes(chain, tmp_path):
    child, parent, model, _ = chain
    other = other_parent(tmp_path)
    nbdplug("rebase", "-b", "other.vhd", child)
    assert header_of(child).parent_unique_id == unique_id(other)
    assert read_all(child) == bytes(model)
    assert libvhdi_read(child, other) == bytes(model)
    assert libvhdi_parent_name(child) == "other.vhd"
    assert_header_checksum(child)
    assert nbdplug("check", child).returncode == 0
    os.unlink(parent)
    assert read_all(child) == bytes(model)


def test_flatten(chain, tmp_path):
    child, parent, model, _ = chain
    nbdplug("rebase", "-b", "", child)
    os.unlink(parent)
    for at in (0, -512):
        footer = footer_at(child, at)
        assert footer.disk_type == vhd.DYNAMIC
    assert header_of(child).parent_locator_entries == bytes(192)
    assert_header_checksum(child)
    assert read_all(child) == bytes(model)
    assert libvhdi_read(child) == bytes(model)
    # Dynamic now: qemu reads it all.
    assert qemu_raw(child) == bytes(model)
    assert nbdplug("check", child).returncode == 0
    assert "backing" not in nbdplug("info", child).stdout


def test_unsafe_flatten_drops_the_parent(chain):
    child, parent, model, own = chain
    nbdplug("rebase", "-u", "-b", "", child)
    assert read_all(child) == bytes(own)
    assert libvhdi_read(child) == bytes(own)
    assert nbdplug("check", child).returncode == 0


@pytest.mark.parametrize("unsafe", [True, False])
def test_refusals(chain, tmp_path, unsafe):
    child, parent, _, _ = chain
    u = ["-u"] if unsafe else []
    qcow2(tmp_path / "q.qcow2", str(SIZE))
    assert_refused(u + ["-b", "q.qcow2", child], child, "must be a VHD")
    assert_refused(u + ["-b", "q.qcow2", "-F", "qcow2", child], child,
                   "must be a VHD")
    small = tmp_path / "small.vhd"
    qemu_vhd(small, SIZE // 2)
    assert_refused(u + ["-b", "small.vhd", child], child, "same size")
    assert_refused(u + ["-b", "missing.vhd", child], child, "missing.vhd")
    assert_refused(u + ["-b", "child.vhd", child], child, "image itself")
    # A name longer than the header's 512 bytes of UTF-16.
    assert_refused(u + ["-b", "./" * 130 + "base/parent.vhd", child],
                   child, "longer than")
    # A path longer than the absolute locator's reserved sector.
    deep = tmp_path / ("d" * 240)
    deep.mkdir()
    other = other_parent(tmp_path)
    os.rename(other, deep / "p.vhd")
    assert_refused(u + ["-b", "d" * 240 + "/p.vhd", child], child,
                   "does not fit")


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
def test_refused_for_disks_without_a_parent(tmp_path, subformat):
    qemu_vhd(tmp_path / "p.vhd", SIZE)
    disk = tmp_path / "d.vhd"
    qemu_vhd(disk, SIZE, subformat)
    assert_refused(["-u", "-b", "p.vhd", disk], disk, "cannot be given a "
                   "parent")
    before = disk.read_bytes()
    nbdplug("rebase", "-b", "", disk)      # nothing to drop
    assert disk.read_bytes() == before


def shape_locators(path, entries):
    """Replace the locator entries with [(code, offset, length)] (data
    space one sector, in bytes)."""
    table = bytearray(192)
    for i, (code, off, n) in enumerate(entries):
        vhd.PARENT_LOCATOR.pack_into(table, 24 * i, vhd.PARENT_LOCATOR
                                     .tuple(code, 512, n, 0, off))
    patch_header(path, parent_locator_entries=bytes(table))


def entries(path):
    """{code: (offset, length)} of the locators in use."""
    hdr, out = header_of(path), {}
    for i in range(8):
        e = vhd.PARENT_LOCATOR.unpack_from(hdr.parent_locator_entries,
                                           24 * i)
        out[e.platform_code] = (e.platform_data_offset,
                                e.platform_data_length)
    return out


def test_refused_shared_or_missing_locator_areas(chain):
    child, _, _, _ = chain
    w2ru, w2ku = entries(child)[b"W2ru"], entries(child)[b"W2ku"]
    # Both locators in one area.
    shape_locators(child, [(b"W2ru", *w2ru), (b"W2ku", w2ru[0], w2ku[1])])
    assert_refused(["-u", "-b", "base/parent.vhd", child], child,
                   "overlaps the parent locator")
    # An area over the dynamic header.
    shape_locators(child, [(b"W2ru", *w2ru), (b"W2ku", 1024, w2ku[1])])
    assert_refused(["-u", "-b", "base/parent.vhd", child], child,
                   "overlaps the dynamic header")
    # No area for the relative form.
    shape_locators(child, [(b"W2ku", *w2ku)])
    assert_refused(["-u", "-b", "base/parent.vhd", child], child,
                   "W2ru")
