"""Host mappings beyond the conformance rows (conformance/
test_host_mapping.py): the qcow2 cases (a snapshot's shared clusters,
extended L2 subclusters, version 2), VMDK's split and flat extents, a
differencing VHD's sector bitmaps; and the quarantine: a host cluster a
dm table maps (pinned) is never freed for reuse until unpinned."""

import os

import pytest

from conftest import nbdplug, qemu_img_check_clean, qemu_io, run
from nbdplug import open_image
from nbdplug.disk import Pins

MiB = 1 << 20
KiB = 1 << 10


def plain(disk):
    """[(guest offset, length)] of the plain ranges."""
    return [(r.offset, r.length) for r in disk.host_mapping(disk.size, 0)
            if r.path is not None]


def guest_bytes(image, fmt, snapshot=None):
    out = str(image) + ".raw"
    argv = ["qemu-img", "convert", "-f", fmt, "-O", "raw"]
    if snapshot:
        argv += ["-l", f"snapshot.name={snapshot}"]
    run(argv + [str(image), out])
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def write_plain(disk, pattern):
    """Write `pattern` straight into every plain range's host bytes (as
    the kernel does through a loop device); the ranges."""
    ranges = [r for r in disk.host_mapping(disk.size, 0) if r.path]
    for r in ranges:
        fd = os.open(r.path, os.O_WRONLY)
        try:
            os.pwrite(fd, pattern * r.length, r.host_offset)
        finally:
            os.close(fd)
    return ranges


def test_qcow2_snapshot_shared_clusters_are_never_plain(tmp_path):
    image = tmp_path / "snap.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "qcow2", "write -P 0x11 0 2M")
    run(["qemu-img", "snapshot", "-c", "s1", str(image)])
    qemu_io(image, "qcow2", "write -P 0x22 1M 64k")
    snap = guest_bytes(image, "qcow2", "s1")
    with open_image(str(image), "qcow2", readonly=False) as disk:
        # Only the cluster written after the snapshot is ours alone.
        assert plain(disk) == [(MiB, 64 * KiB)]
        disk.pwrite(b"\x33" * 4096, 0)      # copy-on-write: now ours
        assert plain(disk) == [(0, 64 * KiB), (MiB, 64 * KiB)]
        disk.prepare_writes()
        write_plain(disk, b"\x44")
        disk.flush()
    qemu_img_check_clean(image)
    assert guest_bytes(image, "qcow2", "s1") == snap
    now = guest_bytes(image, "qcow2")
    assert now[:64 * KiB] == b"\x44" * (64 * KiB)
    assert now[64 * KiB:MiB] == b"\x11" * (MiB - 64 * KiB)
    assert now[MiB:MiB + 64 * KiB] == b"\x44" * (64 * KiB)


def test_qcow2_extended_l2_only_allocated_subclusters(tmp_path):
    image = tmp_path / "ext.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
         "extended_l2=on,cluster_size=64k", str(image), "1M"])
    # Subclusters are 2 KiB: two of them written, one zeroed.
    qemu_io(image, "qcow2", "write -P 0x55 0 2k", "write -P 0x56 8k 2k",
            "write -z 16k 2k")
    with open_image(str(image), "qcow2", readonly=False) as disk:
        assert plain(disk) == [(0, 2 * KiB), (8 * KiB, 2 * KiB)]
        disk.prepare_writes()
        write_plain(disk, b"\x77")
    qemu_img_check_clean(image)
    now = guest_bytes(image, "qcow2")
    assert now[:2 * KiB] == now[8 * KiB:10 * KiB] == b"\x77" * (2 * KiB)
    assert now[2 * KiB:8 * KiB] == bytes(6 * KiB)


def test_qcow2_v2_and_autoclear_bits_before_direct_writes(tmp_path):
    v2 = tmp_path / "v2.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10",
         str(v2), "1M"])
    qemu_io(v2, "qcow2", "write -P 0x12 64k 128k")
    with open_image(str(v2), "qcow2", readonly=False) as disk:
        assert plain(disk) == [(64 * KiB, 128 * KiB)]
    v3 = tmp_path / "bitmap.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(v3), "1M"])
    run(["qemu-img", "bitmap", "--add", str(v3), "b0"])
    assert autoclear(v3) == 1           # the bitmaps extension is valid
    with open_image(str(v3), "qcow2", readonly=False) as disk:
        disk.prepare_writes()       # as before a writable table loads
        assert autoclear(v3) == 0   # durable before any direct write


def autoclear(image):
    from nbdplug.formats.qcow2.structs import HEADER_V3
    with open(image, "rb") as f:
        f.seek(HEADER_V3.offset("autoclear_features"))
        return int.from_bytes(f.read(8), "big")


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse",
                                       "monolithicFlat"])
def test_vmdk_split_and_flat_extents(tmp_path, subformat):
    image = tmp_path / "split.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         f"subformat={subformat}", str(image), "4M"])
    qemu_io(image, "vmdk", "write -P 0x61 1M 128k")
    before = guest_bytes(image, "vmdk")
    with open_image(str(image), "vmdk", readonly=False) as disk:
        ranges = [(r.offset, r.length) for r in
                  disk.host_mapping(disk.size, 0) if r.path]
        paths = {r.path for r in disk.host_mapping(disk.size, 0) if r.path}
        assert paths and str(image) not in paths    # the extent files
        if subformat == "monolithicFlat":
            assert ranges == [(0, 4 * MiB)]
        else:
            assert ranges == [(MiB, 128 * KiB)]
        disk.prepare_writes()
        write_plain(disk, b"\x62")
    qemu_img_check_clean(image)
    now = guest_bytes(image, "vmdk")
    for offset, length in ranges:
        assert now[offset:offset + length] == b"\x62" * length
        before = before[:offset] + b"\x62" * length + \
            before[offset + length:]
    assert now == before


def test_vhd_differencing_only_sectors_whose_bit_is_set(tmp_path):
    base, child = tmp_path / "base.vhd", tmp_path / "child.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", str(base), "4M"])
    qemu_io(base, "vpc", "write -P 0x71 0 4M")
    nbdplug("create", "-q", "-f", "vpc", "-b", "base.vhd", "-F", "vpc",
            child)
    with open_image(str(child), "vpc", readonly=False) as disk:
        # Written in 4 KiB grains: eight sectors each.
        disk.pwrite(b"\x72" * 1024, 4096)
        disk.pwrite(b"\x73" * 512, 2 * MiB + 512)
        assert plain(disk) == [(4096, 4096), (2 * MiB, 4096)]


def test_qcow2_trimmed_cluster_waits_while_pinned(tmp_path):
    """A cluster a loaded table maps is not freed by a trim (which would
    let the next allocation reuse it) until the pins let it go."""
    image = tmp_path / "q.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "qcow2", "write -P 0x11 0 64k")
    with open_image(str(image), "qcow2", readonly=False) as disk:
        [r] = [r for r in disk.host_mapping(disk.size, 0) if r.path]
        disk.set_pins(Pins([(r.path, r.host_offset, r.length)]))
        disk.trim(64 * KiB, 0)
        disk.flush()
        disk.pwrite(b"\x22" * 65536, MiB)       # allocates a cluster
        [new] = [x for x in disk.host_mapping(disk.size, 0) if x.path]
        assert new.host_offset != r.host_offset
        disk.set_pins(Pins())
        disk.flush()                            # now the free goes ahead
        disk.pwrite(b"\x33" * 65536, 2 * MiB)
        ranges = {x.offset: x.host_offset
                  for x in disk.host_mapping(disk.size, 0) if x.path}
        assert ranges[2 * MiB] == r.host_offset   # reused
    qemu_img_check_clean(image)


def test_qcow2_quarantine_leaks_at_worst(tmp_path):
    """A server killed while a freed cluster waits leaves a leak, never a
    cluster with two owners."""
    image = tmp_path / "q.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"])
    qemu_io(image, "qcow2", "write -P 0x11 0 64k")
    disk = open_image(str(image), "qcow2", readonly=False)
    [r] = [r for r in disk.host_mapping(disk.size, 0) if r.path]
    disk.set_pins(Pins([(r.path, r.host_offset, r.length)]))
    disk.trim(64 * KiB, 0)
    disk.flush()
    # As if killed now (no close, no last flush): check it beside us.
    proc = run(["qemu-img", "check", "-U", str(image)], check=False)
    disk.file.close()
    assert proc.returncode == 3 and "1 leaked cluster" in proc.stdout


def test_vhd_emptied_block_waits_while_pinned(tmp_path):
    image = tmp_path / "d.vhd"
    run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic",
         str(image), "8M"])
    with open_image(str(image), "vpc", readonly=False) as disk:
        disk.pwrite(b"\x11" * (2 * MiB), 2 * MiB)    # block 1
        disk.pwrite(b"\x12" * 4096, 4 * MiB)         # block 2, the last
        ranges = [r for r in disk.host_mapping(disk.size, 0) if r.path]
        last = max(ranges, key=lambda r: r.host_offset)
        disk.set_pins(Pins([(r.path, r.host_offset, r.length)
                            for r in ranges]))
        size = os.path.getsize(image)
        disk.trim(2 * MiB, 4 * MiB)     # empties the last block: kept
        assert os.path.getsize(image) == size
        disk.pwrite(b"\x13" * 512, 6 * MiB)          # a new block
        new = [r for r in disk.host_mapping(disk.size, 0)
               if r.path and r.offset == 6 * MiB]
        assert new[0].host_offset > last.host_offset
        assert disk.read(2 * MiB, 4 * MiB) == bytes(2 * MiB)
        disk.set_pins(Pins())           # released now
        assert disk.bat[2] == 0xFFFFFFFF
    nbdplug("check", image)
