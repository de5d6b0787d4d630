"""VMDK images we create, written through nbdkit and our plugin with a
random workload, read back identically by qemu-img and by libvmdk (an
independent reader), with `qemu-img check` and `nbdplug check` clean;
delta disks, the CID rule, the unclean-shutdown flag, stream re-packing."""

import hashlib
import os
import random
import signal
import threading

import nbd
import pytest

from conftest import nbdplug, run, served
from nbdplug import ReadOnlyDisk, open_image
from nbdplug.serve import nbdkit as server
from nbdplug.formats.vmdk import create as vmdk_create
from nbdplug.formats.vmdk.structs import SPARSE_HEADER
from test_400_vmdk_read import (SUBFORMATS, assert_map_like_qemu, qemu_raw,
                                qemu_vmdk, random_raw)

MiB = 1 << 20
UNCLEAN = SPARSE_HEADER.offset("uncleanShutdown")


@pytest.fixture(autouse=True)
def small_splits(monkeypatch):
    """Split images in 4 MiB extents, so a small disk has several."""
    monkeypatch.setattr(vmdk_create, "SPLIT_SECTORS", 4 * MiB // 512)


def create(path, size, **options):
    nbdplug("create", "-q", "-f", "vmdk", "-o",
            ",".join(f"{k}={v}" for k, v in options.items()), path, size)
    return path


def workload(h, model, rng, ops=150):
    """Random writes (some unaligned, some FUA), write-zeroes and flushes
    through NBD, applied to `model` too; reads back some of it as it goes."""
    size = len(model)
    for _ in range(ops):
        r = rng.random()
        offset = rng.randrange(size - 1)
        if r < 0.7:
            offset -= offset % 512
        length = min(rng.choice((512, 4096, 65536, 200000, 1 << 20)),
                     size - offset)
        kind = rng.random()
        if kind < 0.1:
            h.flush()
        elif kind < 0.2:
            h.zero(length, offset)
            model[offset:offset + length] = bytes(length)
        else:
            data = rng.randbytes(length)
            h.pwrite(data, offset,
                     nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
            model[offset:offset + length] = data
        if rng.random() < 0.1:
            assert h.pread(length, offset) == model[offset:offset + length]
    return model


def libvmdk_bytes(image, parent=None):
    import pyvmdk
    h = pyvmdk.handle()
    h.open(str(image))
    h.open_extent_data_files()
    if parent is not None:
        p = pyvmdk.handle()
        p.open(str(parent))
        p.open_extent_data_files()
        h.set_parent(p)
    return h.read_buffer_at_offset(h.get_media_size(), 0)


def assert_checks_clean(image):
    run(["qemu-img", "check", str(image)])
    assert "No errors were found" in nbdplug("check", image).stdout


def assert_peers_read(image, model, tmp_path, parent=None):
    assert qemu_raw(image, tmp_path / "qemu.raw").read_bytes() == model
    assert libvmdk_bytes(image, parent) == model
    assert_checks_clean(image)


def descriptor_of(path):
    with open_image(str(path)) as disk:
        return disk.descriptor


def header(path):
    with open(path, "rb") as f:
        return SPARSE_HEADER.unpack_from(f.read(512))


def digest(*paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_random_workload_reads_back_in_every_reader(tmp_path, subformat):
    image = create(tmp_path / "disk.vmdk", "24M", subformat=subformat,
                   adapter_type="lsilogic")
    cid = descriptor_of(image).cid
    with served(image, "vmdk") as srv:
        h = srv.connect()
        model = workload(h, bytearray(24 * MiB), random.Random(subformat))
        assert h.pread(24 * MiB, 0) == model
    assert_peers_read(image, model, tmp_path)
    with open_image(str(image)) as disk:
        assert disk.cid != cid and len(f"{disk.cid:x}") <= 8
        assert not disk.dirty
    if subformat.endswith("Sparse") or subformat == "streamOptimized":
        extents = [p for p in tmp_path.iterdir()
                   if p.name.startswith("disk") and "-f" not in p.name]
        assert all(header(p).uncleanShutdown == 0 for p in extents
                   if p.read_bytes()[:4] == b"KDMV")


@pytest.mark.parametrize("subformat", ["monolithicSparse",
                                       "twoGbMaxExtentSparse"])
def test_delta_disk_over_a_qemu_parent(tmp_path, subformat):
    base = qemu_vmdk(tmp_path, "monolithicSparse", "partial",
                     name="base.vmdk")
    before = digest(base)
    child = tmp_path / "child.vmdk"
    nbdplug("create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}",
            "-b", "base.vmdk", "-F", "vmdk", child)
    parent_cid = descriptor_of(base).cid
    with open_image(str(child)) as disk:
        assert disk.descriptor.parent_cid == parent_cid
        assert disk.size == 24 * MiB and disk.backing_name == "base.vmdk"
    model = bytearray(qemu_raw(base, tmp_path / "base.raw").read_bytes())
    with served(child, "vmdk") as srv:
        h = srv.connect()
        assert h.pread(24 * MiB, 0) == model
        workload(h, model, random.Random(5), ops=80)
    assert digest(base) == before
    assert_peers_read(child, model, tmp_path, parent=base)
    assert_map_like_qemu(child)


def test_writing_a_parent_changes_its_cid_and_orphans_children(tmp_path):
    base = create(tmp_path / "base.vmdk", "8M")
    child = tmp_path / "child.vmdk"
    nbdplug("create", "-q", "-f", "vmdk", "-b", "base.vmdk", child)
    before = digest(base)
    open_image(str(base), "vmdk", readonly=False).close()   # no write
    open_image(str(child)).close()
    assert digest(base) == before
    width = len(descriptor_of(base).keys["CID"])
    with open_image(str(base), "vmdk", readonly=False) as disk:
        disk.pwrite(b"\1" * 512, 0)
    assert len(descriptor_of(base).keys["CID"]) == width
    proc = nbdplug("info", child, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "parentCID" in proc.stderr and "parent changed" in proc.stderr


def test_killed_server_leaves_unclean_flag_then_recovers(tmp_path):
    image = create(tmp_path / "disk.vmdk", "8M")
    sock = str(tmp_path / "s.sock")
    argv = ["nbdkit", "-U", sock, "-P", sock + ".pid"] + \
        server.plugin_args(str(image), "vmdk")
    pid = server.start_background(argv, sock + ".pid")
    h = nbd.NBD()
    h.connect_uri(server.unix_uri(sock))
    model = bytearray(8 * MiB)
    workload(h, model, random.Random(9), ops=40)
    h.flush()
    os.kill(pid, signal.SIGKILL)
    del h
    assert header(image).uncleanShutdown == 1
    assert nbdplug("check", image, check=False).returncode in (0, 3)
    assert qemu_raw(image, tmp_path / "q.raw").read_bytes() == model
    # Make the redundant tables disagree, as a crash between the two
    # entry writes would, then let the next write bring them together.
    hdr = header(image)
    with open(image, "r+b") as f:
        f.seek(hdr.rgdOffset * 512)
        first_rgt = int.from_bytes(f.read(4), "little")
        f.seek(first_rgt * 512 + 4 * 100)
        f.write((12345).to_bytes(4, "little"))
    assert "not closed cleanly" in nbdplug("check", image).stdout
    with open_image(str(image), "vmdk", readonly=False) as disk:
        disk.pwrite(b"\2" * 4096, 0)
        model[:4096] = b"\2" * 4096
    assert header(image).uncleanShutdown == 0
    assert_checks_clean(image)
    assert "differ" not in nbdplug("check", image).stdout
    assert qemu_raw(image, tmp_path / "q.raw").read_bytes() == model


def test_stream_grains_are_repacked_not_rewritten(tmp_path):
    image = create(tmp_path / "s.vmdk", "4M", subformat="streamOptimized")
    with open_image(str(image), "vmdk", readonly=False) as disk:
        disk.pwrite(b"a" * 4096, 0)
        size_one = os.path.getsize(image)
        disk.pwrite(b"b" * 4096, 8192)          # the same grain again
        disk.flush()
        assert os.path.getsize(image) > size_one
    expect = bytearray(4 * MiB)
    expect[:4096], expect[8192:12288] = b"a" * 4096, b"b" * 4096
    data = image.read_bytes()
    assert data[-512:] == bytes(512)            # end-of-stream marker
    assert data[-1024:-1020] == b"KDMV"         # the footer's header
    assert_peers_read(image, expect, tmp_path)


def test_stream_written_sequentially_by_nbdcopy(tmp_path):
    src = random_raw(tmp_path / "src.raw", 16 * MiB, 4)
    image = create(tmp_path / "s.vmdk", "16M", subformat="streamOptimized")
    with served(image, "vmdk") as srv:
        run(["nbdcopy", str(src), srv.uri])
    assert_peers_read(image, src.read_bytes(), tmp_path)
    assert os.path.getsize(image) < os.path.getsize(src)


def test_zero_marks_zeroed_grains(tmp_path):
    image = create(tmp_path / "z.vmdk", "4M", zeroed_grain="on")
    with open_image(str(image), "vmdk", readonly=False) as disk:
        disk.pwrite(b"\7" * (256 << 10), 0)
        size = os.path.getsize(image)
        disk.zero(128 << 10, 64 << 10)
        assert os.path.getsize(image) == size        # no data written
        runs = [r for r in disk.map(256 << 10, 0)]
    assert [(r.offset, r.zero, r.data) for r in runs] == [
        (0, False, True), (64 << 10, True, False), (192 << 10, False, True)]
    assert_map_like_qemu(image)
    expect = bytearray(4 * MiB)
    expect[:64 << 10] = expect[192 << 10:256 << 10] = b"\7" * (64 << 10)
    assert qemu_raw(image, tmp_path / "q.raw").read_bytes() == expect


def test_rdonly_and_zero_extents(tmp_path):
    (tmp_path / "a.raw").write_bytes(b"A" * MiB)
    (tmp_path / "b.raw").write_bytes(b"B" * MiB)
    image = tmp_path / "d.vmdk"
    image.write_text('# Disk DescriptorFile\nversion=1\nCID=0000abcd\n'
                     'parentCID=ffffffff\ncreateType="monolithicFlat"\n'
                     'RW 2048 FLAT "a.raw" 0\nRW 1024 ZERO\n'
                     'RDONLY 1024 FLAT "b.raw" 1024\n')
    with open_image(str(image), "vmdk", readonly=False) as disk:
        assert disk.size == 2 * MiB
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
        assert buf == b"A" * MiB + bytes(MiB // 2) + b"B" * (MiB // 2)
        disk.pwrite(b"x" * 512, 0)
        disk.zero(4096, MiB)                    # a ZERO extent is zero
        for offset in (MiB, MiB + MiB // 2):
            with pytest.raises(ReadOnlyDisk):
                disk.pwrite(b"x" * 512, offset)
    assert (tmp_path / "a.raw").read_bytes()[:513] == b"x" * 512 + b"A"
    assert "CID=" in image.read_text() and "0000abcd" not in \
        image.read_text()


def test_threads_allocating_the_same_grains(tmp_path):
    image = create(tmp_path / "t.vmdk", "8M")
    slots = 8 * MiB // 4096
    with open_image(str(image), "vmdk", readonly=False) as disk:
        def writer(t):
            for slot in range(t, slots, 4):
                disk.pwrite(bytes([t + 1]) * 4096, slot * 4096)
        threads = [threading.Thread(target=writer, args=(t,))
                   for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        buf = bytearray(8 * MiB)
        disk.pread(memoryview(buf), 0)
    expect = b"".join(bytes([s % 4 + 1]) * 4096 for s in range(slots))
    assert buf == expect
    assert qemu_raw(image, tmp_path / "q.raw").read_bytes() == expect
    assert_checks_clean(image)
    assert "Leaked" not in nbdplug("check", image).stdout
