"""VHD images we write (fixed, dynamic, differencing) through nbdkit and
our plugin, read back by qemu-img and by libvhdi (pyvhdi), both compared
with a model of the guest bytes; differencing disks follow their parent
locators; discard gives back space; check and create."""

import os
import random
import shutil
import struct

import pyvhdi
import pytest

from conftest import nbdplug, run, served
from nbdplug import ImageError, open_image
from nbdplug.formats.vhd import structs as vhd
from test_300_cli import assert_one_line_error
from test_500_vhd import (header_of, qemu_raw, qemu_vhd, read_all,
                          set_bat)

MiB = 1 << 20
SIZE = 12 * MiB
BLOCK = 2 * MiB


def libvhdi_read(path, parent=None):
    """The guest bytes as libvhdi reads them (a parent is set by hand:
    libvhdi does not follow locators)."""
    f = pyvhdi.file()
    f.open(str(path))
    keep = [f]
    if parent is not None:
        p = pyvhdi.file()
        p.open(str(parent))
        f.set_parent(p)
        keep.append(p)
    try:
        size = f.get_media_size()
        f.seek(0)
        return f.read(size)
    finally:
        for g in reversed(keep):
            g.close()


def guest_writes(h, model, seed, count=40):
    """Writes of every shape (unaligned, sector, block-crossing) through
    libnbd, mirrored in `model`."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:
            off, n = rng.randrange(len(model) - 9000), rng.randint(1, 9000)
        elif kind < 0.6:
            off = rng.randrange(len(model) // 512) * 512
            n = min(len(model) - off, 512 * rng.randint(1, 16))
        else:
            off = rng.randrange(len(model) // BLOCK) * BLOCK - 4096
            off, n = max(0, off), 3 * 4096
        data = rng.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    h.flush()


def assert_reads(path, model, parent=None):
    """Our plugin, qemu-img (for what it can read) and libvhdi agree with
    the model; check is clean."""
    assert read_all(path) == bytes(model)
    assert libvhdi_read(path, parent) == bytes(model)
    assert nbdplug("check", "-f", "vpc", path).returncode == 0


@pytest.mark.parametrize("opts", ["subformat=dynamic", "subformat=fixed",
                                  "subformat=dynamic,block_size=512K"])
def test_written_images_read_back_everywhere(tmp_path, opts):
    path = tmp_path / "disk.vhd"
    nbdplug("create", "-f", "vpc", "-o", opts, path, SIZE)
    model = bytearray(SIZE)
    with served(str(path), "vpc") as srv:
        guest_writes(srv.connect(), model, seed=len(opts))
    assert qemu_raw(path) == bytes(model)
    assert_reads(path, model)
    info = run(["qemu-img", "info", "-f", "vpc", str(path)]).stdout
    assert f"({SIZE} bytes)" in info


@pytest.fixture
def chain(tmp_path):
    """A qemu-written dynamic parent and our differencing child of it,
    with the child's own writes; returns (child, parent, model, own)."""
    base = tmp_path / "base"
    base.mkdir()
    parent = base / "parent.vhd"
    qemu_vhd(parent, SIZE)
    child = tmp_path / "child.vhd"
    nbdplug("create", "-f", "vpc", "-b", "base/parent.vhd", child)
    model = bytearray(qemu_raw(parent))
    own = bytearray(SIZE)           # the child's own layer, zeros elsewhere
    with served(str(child), "vpc") as srv:
        h = srv.connect()
        guest_writes(h, model, seed=7)
        for off, n in ((700, 3000), (5 * MiB, 512)):
            h.pwrite(b"\x5a" * n, off)
            model[off:off + n] = b"\x5a" * n
        h.flush()
    with open_image(str(child), "vpc") as disk:
        for run_ in disk.map(SIZE, 0):
            if run_.depth == 0:
                own[run_.offset:run_.offset + run_.length] = \
                    model[run_.offset:run_.offset + run_.length]
    return child, parent, model, own


def test_differencing_reads_follow_the_parent(chain):
    child, parent, model, own = chain
    assert_reads(child, model, parent)
    # qemu ignores parent locators: it reads only the child's own sectors.
    assert qemu_raw(child) == bytes(own)
    f = pyvhdi.file()
    f.open(str(child))
    assert f.get_parent_filename() == "base/parent.vhd"
    f.close()


def test_differencing_served_and_two_levels(chain, tmp_path):
    child, parent, model, _ = chain
    grandchild = tmp_path / "top.vhd"
    nbdplug("create", "-f", "vpc", "-b", "child.vhd", grandchild)
    with served(str(grandchild), "vpc") as srv:
        h = srv.connect()
        assert h.pread(SIZE, 0) == bytes(model)
        h.pwrite(b"\x77" * 1000, 4 * MiB + 100)
        model[4 * MiB + 100:4 * MiB + 1100] = b"\x77" * 1000
        h.flush()
    assert read_all(grandchild) == bytes(model)
    info = nbdplug("info", "--output=json", grandchild).stdout
    assert '"backing-filename": "child.vhd"' in info


def rewrite_locators(path, locators):
    """Replace the parent locators with `locators` [(code, data)], their
    data written over the old locator area (which our create leaves
    after the dynamic header)."""
    hdr = header_of(path)
    data = bytearray(path.read_bytes())
    at, entries = 1536, bytearray(192)
    for i, (code, blob) in enumerate(locators):
        vhd.PARENT_LOCATOR.pack_into(entries, 24 * i, vhd.PARENT_LOCATOR
                                     .tuple(code, 512, len(blob), 0, at))
        data[at:at + len(blob)] = blob
        at += 512
    assert at <= hdr.table_offset
    path.write_bytes(data)
    from test_500_vhd import patch_header
    patch_header(path, parent_locator_entries=bytes(entries))


@pytest.mark.parametrize("code,form", [
    (b"W2ru", ".\\base\\parent.vhd"),
    (b"W2ku", "C:{abs}"),
    (b"MacX", "file://localhost{url}"),
])
def test_each_locator_form(chain, code, form):
    child, parent, model, _ = chain
    absolute = str(parent).replace("/", "\\")
    text = form.format(abs=absolute, url=str(parent).replace(" ", "%20"))
    blob = text.encode("utf-8" if code == b"MacX" else "utf-16-le")
    rewrite_locators(child, [(code, blob)])
    assert read_all(child) == bytes(model)


def test_relative_locator_survives_a_move(chain, tmp_path):
    child, parent, model, _ = chain
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.move(str(tmp_path), str(moved))
    try:
        assert read_all(moved / "child.vhd") == bytes(model)
        # With only the (now stale) absolute locator, the parent is gone.
        rewrite_locators(moved / "child.vhd", [
            (b"W2ku", str(parent).replace("/", "\\").encode("utf-16-le"))])
        with pytest.raises(ImageError, match="parent.vhd"):
            read_all(moved / "child.vhd")
    finally:
        shutil.move(str(moved), str(tmp_path))


def test_parent_with_another_unique_id_is_refused(chain, tmp_path):
    child, parent, _, _ = chain
    os.unlink(parent)
    qemu_vhd(parent, SIZE)          # same name and size, a new disk
    proc = nbdplug("info", child, check=False)
    assert_one_line_error(proc, "child.vhd", "unique id differs")


def test_trim_and_zero_dynamic(tmp_path):
    """Trimmed and zeroed ranges read as zeros (qemu too); a block left
    empty is released: the last one shrinks the file, one in the middle
    is punched out."""
    path = tmp_path / "disk.vhd"
    nbdplug("create", "-f", "vpc", path, SIZE)
    model = bytearray(os.urandom(SIZE))
    with served(str(path), "vpc") as srv:
        h = srv.connect()
        h.pwrite(bytes(model), 0)
        h.flush()
        full_size = os.path.getsize(path)
        full_blocks = os.stat(path).st_blocks
        assert h.can_trim()
        h.trim(12 * 4096, 4096)                 # part of block 0
        h.trim(BLOCK, 2 * BLOCK)                # block 2, in the middle
        # The last block, and 1000 bytes before it that stay: trim drops
        # whole 4 KiB grains only.
        h.trim(BLOCK + 1000, SIZE - BLOCK - 1000)
        h.zero(BLOCK + 1000, 3 * BLOCK + 300)   # ragged at both ends
        h.flush()
        for off, n in ((4096, 12 * 4096), (2 * BLOCK, BLOCK),
                       (SIZE - BLOCK, BLOCK),
                       (3 * BLOCK + 300, BLOCK + 1000)):
            model[off:off + n] = bytes(n)
        assert h.pread(SIZE, 0) == bytes(model)
    span = 512 + BLOCK
    assert os.path.getsize(path) == full_size - span    # the file shrank
    assert os.stat(path).st_blocks <= full_blocks - 2 * span // 512
    hdr = header_of(path)
    bat = struct.unpack_from(">6I", path.read_bytes(), hdr.table_offset)
    assert bat[2] == bat[5] == vhd.UNUSED and bat[0] != vhd.UNUSED
    assert qemu_raw(path) == bytes(model)       # qemu ignores bitmaps
    assert_reads(path, model)


def test_trim_differencing_shows_the_parent(chain):
    child, parent, model, own = chain
    parent_bytes = qemu_raw(parent)
    with served(str(child), "vpc") as srv:
        h = srv.connect()
        h.trim(SIZE, 0)
        h.flush()
        assert h.pread(SIZE, 0) == parent_bytes
        h.zero(4096, 700)       # zeroes must read zero, not the parent
        h.flush()
    expected = bytearray(parent_bytes)
    expected[700:4796] = bytes(4096)
    assert_reads(child, expected, parent)
    hdr = header_of(child)
    bat = struct.unpack_from(">6I", child.read_bytes(), hdr.table_offset)
    assert sum(e != vhd.UNUSED for e in bat) == 1


def two_blocks(tmp_path):
    """A dynamic VHD with blocks 0 and 2 allocated."""
    path = tmp_path / "disk.vhd"
    nbdplug("create", "-f", "vpc", path, SIZE)
    with open_image(str(path), "vpc", readonly=False) as disk:
        disk.pwrite(b"\x11" * 4096, 0)
        disk.pwrite(b"\x22" * 4096, 5 * MiB)
    return path


def test_check_reports_and_repairs_leaks(tmp_path):
    path = two_blocks(tmp_path)
    size = os.path.getsize(path)
    set_bat(path, 2, vhd.UNUSED)            # the last block: now leaked
    proc = nbdplug("check", "-f", "vpc", path, check=False)
    assert proc.returncode == 3, proc.stdout
    assert "Leaked" in proc.stdout
    nbdplug("check", "-f", "vpc", "-r", "leaks", path)
    assert os.path.getsize(path) == size - 512 - BLOCK
    assert nbdplug("check", "-f", "vpc", path).returncode == 0
    assert qemu_raw(path)[:4096] == b"\x11" * 4096


def test_check_reports_overlapping_blocks(tmp_path):
    path = two_blocks(tmp_path)
    hdr = header_of(path)
    first = struct.unpack_from(">I", path.read_bytes(), hdr.table_offset)[0]
    set_bat(path, 2, first + 8)
    proc = nbdplug("check", "--output=json", "-f", "vpc", path, check=False)
    assert proc.returncode == 2 and '"corruptions": 1' in proc.stdout


@pytest.mark.parametrize("args,words", [
    (["-o", "subformat=sparse"], ["subformat"]),
    (["-o", "block_size=3M"], ["block_size"]),
    (["-o", "cluster_size=64K"], ["cluster_size"]),
    (["-o", "subformat=fixed", "-b", "parent.vhd"], ["fixed"]),
])
def test_create_refuses_bad_options(tmp_path, args, words):
    nbdplug("create", "-q", "-f", "vpc", tmp_path / "parent.vhd", "1M")
    path = tmp_path / "new.vhd"
    proc = nbdplug("create", "-f", "vpc", *args, path, "1M", check=False)
    assert_one_line_error(proc, *words)
    assert not path.exists()


def test_create_size_limits(tmp_path):
    proc = nbdplug("create", "-f", "vpc", tmp_path / "a.vhd", "2041G",
                   check=False)
    assert_one_line_error(proc, "2040 GiB")
    proc = nbdplug("create", "-f", "vpc", tmp_path / "b.vhd", "1000",
                   check=False)
    assert_one_line_error(proc, "sectors")
    nbdplug("create", "-f", "vpc", tmp_path / "c.vhd", "2040G")
    assert run(["qemu-img", "info", str(tmp_path / "c.vhd")]).stdout \
        .count(f"({2040 << 30} bytes)") == 1


def test_fast_path_maps_only_claimed_sectors(tmp_path):
    """A dynamic disk reads its blocks whole, as qemu does, but dm's fast
    path maps only sectors the bitmap claims: a write that bypasses the
    driver must leave nothing to record for readers that honour bitmaps
    (Windows).  A trimmed grain keeps reading as zeros, as DATA."""
    from nbdplug.disk import DATA
    from nbdplug.formats.vhd.structs import GRAIN
    image = str(tmp_path / "d.vhd")
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o",
         "subformat=dynamic,force_size=on", image, "4M"])
    with open_image(image, "vpc", readonly=False) as disk:
        disk.pwrite(b"\x5a" * (2 * MiB), 0)
        disk.trim(GRAIN, GRAIN)
        plain = [(r.offset, r.length) for r in disk.host_mapping(2 * MiB, 0)
                 if r.path is not None]
        assert plain == [(0, GRAIN), (2 * GRAIN, 2 * MiB - 2 * GRAIN)]
        assert [r.kind for r in disk.map(2 * MiB, 0)] == [DATA]
        assert disk.read(GRAIN, GRAIN) == bytes(GRAIN)
