"""VMDK images made by qemu-img (and one laid out as VMware streams it)
read through nbdkit and our plugin: every byte equals `qemu-img convert
-O raw`, and `nbdplug map` equals `qemu-img map`."""

import json
import os
import random
import struct
import zlib

import pytest

from conftest import nbdplug, run, served
from nbdplug import UnsupportedFeature, open_image

MiB = 1 << 20
GiB = 1 << 30
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized"]


# --- helpers the other VMDK suites share -------------------------------------

def qemu_raw(image, out):
    """qemu-img's reading of `image`, as a raw file."""
    run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(out)])
    return out


def plugin_raw(image, out, fmt="vmdk"):
    """Every byte of `image` read through nbdkit and our plugin (no
    block-status shortcuts), as a raw file."""
    with served(image, fmt, readonly=True) as srv:
        run(["nbdcopy", "--no-extents", srv.uri, str(out)])
    return out


def assert_same_file(a, b, chunk=4 * MiB):
    assert os.path.getsize(a) == os.path.getsize(b), (a, b)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        pos = 0
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                first = next(i for i in range(len(x)) if x[i:i + 1] !=
                             y[i:i + 1])
                raise AssertionError(f"{a} and {b} differ at byte "
                                     f"{pos + first}")
            if not x:
                return
            pos += len(x)


def assert_reads_like_qemu(image, tmp_path):
    plugin_raw(image, tmp_path / "ours.raw")
    qemu_raw(image, tmp_path / "qemu.raw")
    assert_same_file(tmp_path / "ours.raw", tmp_path / "qemu.raw")


def qemu_io(image, *commands):
    argv = ["qemu-io", "-f", "vmdk"]
    for c in commands:
        argv += ["-c", c]
    run(argv + [str(image)])


def random_raw(path, size, seed, holes=True):
    """A raw file of random MiBs, some left as holes."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for mib in range(size // MiB):
            if not holes or rng.random() < 0.6:
                f.seek(mib * MiB)
                f.write(rng.randbytes(MiB))
    return path


def qemu_vmdk(tmp_path, subformat, fill, size=24 * MiB, name="disk.vmdk"):
    """An image of `subformat` made by qemu: empty, partly written with
    qemu-io, or converted from random data."""
    image = tmp_path / name
    if fill == "full":
        src = random_raw(tmp_path / "src.raw", size, 7)
        run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o",
             f"subformat={subformat}", str(src), str(image)])
        return image
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
         f"subformat={subformat}", str(image), str(size)])
    if fill == "partial":
        if subformat == "streamOptimized":
            # qemu writes streams only as whole compressed clusters.
            qemu_io(image, "write -c -P 0x41 1M 64k",
                    "write -c -P 0x42 1088k 64k", "write -c -P 0x43 20M 64k")
        else:
            qemu_io(image, "write -P 0x41 1000k 300k",
                    "write -P 0x42 8M 512", "write -P 0x43 20M 1M")
    return image


# --- qemu-img's images, every subformat --------------------------------------

@pytest.mark.parametrize("fill", ["empty", "partial", "full"])
@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_qemu_image_reads_identically(tmp_path, subformat, fill):
    image = qemu_vmdk(tmp_path, subformat, fill)
    assert_reads_like_qemu(image, tmp_path)


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse",
                                       "twoGbMaxExtentFlat"])
def test_split_image_across_extents(tmp_path, subformat):
    """qemu splits at 2 GiB: reads that straddle the extent boundary.
    (Our own small-extent images are compared byte for byte in 401.)"""
    size = 2 * GiB + 4 * MiB
    image = qemu_vmdk(tmp_path, subformat, "empty", size=size)
    qemu_io(image, f"write -P 0x51 {2 * GiB - 100 * 1024} 300k",
            f"write -P 0x52 {2 * GiB + 3 * MiB} 1M", "write -P 0x53 0 4k")
    assert len([n for n in os.listdir(tmp_path) if "disk-" in n]) == 2
    qemu_raw(image, tmp_path / "qemu.raw")
    with open(tmp_path / "qemu.raw", "rb") as f, \
            served(image, "vmdk", readonly=True) as srv:
        h = srv.connect()
        assert h.get_size() == size
        for start in (0, 2 * GiB - 4 * MiB, 2 * GiB):
            f.seek(start)
            assert h.pread(4 * MiB, start) == f.read(4 * MiB), start
    if subformat.endswith("Sparse"):
        assert_map_like_qemu(image)


def test_two_level_parent_chain(tmp_path):
    """base (flat) <- mid (split sparse delta) <- top (sparse delta)."""
    base = qemu_vmdk(tmp_path, "monolithicFlat", "empty", name="base.vmdk")
    qemu_io(base, "write -P 1 0 8M")
    mid, top = tmp_path / "mid.vmdk", tmp_path / "top.vmdk"
    # Each layer is written before its child is made: writing a parent
    # changes its CID, which makes its children refuse (qemu's too).
    for child, parent, sub, writes in (
            (mid, base, "twoGbMaxExtentSparse", ["write -P 2 4M 8M"]),
            (top, mid, "monolithicSparse", ["write -P 3 10M 100k",
                                            "write -P 4 30720 1536"])):
        run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
             f"subformat={sub}", "-b", parent.name, "-F", "vmdk",
             str(child)])
        qemu_io(child, *writes)
    assert_reads_like_qemu(top, tmp_path)
    assert_map_like_qemu(top)
    info = json.loads(nbdplug("info", "--output=json", top).stdout)
    assert info["backing-filename"] == "mid.vmdk"
    assert info["backing-image"]["backing-image"]["format-specific"][
        "data"]["create-type"] == "monolithicFlat"


def test_zeroed_grains(tmp_path):
    image = tmp_path / "z.vmdk"
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "zeroed_grain=on",
         str(image), "8M"])
    qemu_io(image, "write -P 7 0 256k", "write -z 64k 128k",
            "write -z 4M 64k")
    assert_reads_like_qemu(image, tmp_path)
    assert_map_like_qemu(image)


def assert_map_like_qemu(image):
    ours = json.loads(nbdplug("map", "--output=json", image).stdout)
    theirs = json.loads(run(["qemu-img", "map", "--output=json",
                             str(image)]).stdout)
    assert ours == theirs


@pytest.mark.parametrize("fill", ["partial", "full"])
def test_map_matches_qemu(tmp_path, fill):
    assert_map_like_qemu(qemu_vmdk(tmp_path, "monolithicSparse", fill))


# --- a stream laid out as VMware writes one ----------------------------------

GRAIN = 64 * 1024


def vmware_stream(path, data, gtes=512):
    """A streamOptimized extent as VMware streams it: grains behind
    markers, each grain table behind a GT marker after its grains, then
    the directory, the footer (with the real gdOffset) and end-of-stream;
    the header's gdOffset says "at the end".  Written from the
    specification, independently of our writer."""
    sectors = len(data) // 512
    desc = (b'# Disk DescriptorFile\nversion=1\nCID=12345678\n'
            b'parentCID=ffffffff\ncreateType="streamOptimized"\n\n'
            b'# Extent description\nRW %d SPARSE "%s"\n\n'
            b'# The Disk Data Base\n#DDB\n\nddb.adapterType = "lsilogic"\n'
            % (sectors, os.path.basename(path).encode()))

    def header(gd_offset):
        return struct.pack("<4sIIQQQQIQQQB4sH", b"KDMV", 3,
                           1 | 1 << 16 | 1 << 17, sectors, 128, 1, 20, gtes,
                           0, gd_offset, 128, 0, b"\n \r\n", 1).ljust(512,
                                                                   b"\0")

    def meta(count, kind):
        return struct.pack("<QII", count, 0, kind).ljust(512, b"\0")

    out = bytearray(header(0xFFFFFFFFFFFFFFFF))
    out += desc.ljust(20 * 512, b"\0")
    out += bytes(128 * 512 - len(out))
    grains = len(data) // GRAIN
    gd = []
    for first in range(0, grains, gtes):
        gt = []
        for gi in range(first, min(first + gtes, grains)):
            chunk = data[gi * GRAIN:(gi + 1) * GRAIN]
            if not any(chunk):
                gt.append(0)
                continue
            gt.append(len(out) // 512)
            packed = zlib.compress(chunk)
            out += struct.pack("<QI", gi * 128, len(packed)) + packed
            out += bytes(-len(out) % 512)
        table = struct.pack(f"<{gtes}I", *(gt + [0] * (gtes - len(gt))))
        out += meta(len(table) // 512, 1)
        gd.append(len(out) // 512)
        out += table
    gd_table = struct.pack(f"<{len(gd)}I", *gd)
    out += meta(-(-len(gd_table) // 512), 2)
    gd_offset = len(out) // 512
    out += gd_table + bytes(-len(gd_table) % 512)
    out += meta(1, 3) + header(gd_offset) + bytes(512)
    with open(path, "wb") as f:
        f.write(out)


def test_vmware_style_stream(tmp_path):
    import pyvmdk
    rng = random.Random(3)
    data = bytearray(40 * MiB)          # two grain tables' worth
    for start in (0, 5 * MiB, 33 * MiB, 40 * MiB - 300 * 1024):
        data[start:start + 200 * 1024] = rng.randbytes(200 * 1024)
    data[6 * MiB:7 * MiB] = bytes(range(256)) * 4096   # compresses well
    image = tmp_path / "stream.vmdk"
    vmware_stream(str(image), bytes(data))
    ours = plugin_raw(image, tmp_path / "ours.raw").read_bytes()
    assert ours == data
    h = pyvmdk.handle()
    h.open(str(image))
    h.open_extent_data_files()
    assert h.read_buffer_at_offset(len(data), 0) == data
    info = json.loads(nbdplug("info", "--output=json", image).stdout)
    assert info["format-specific"]["data"]["extents"][0]["compressed"]
    with pytest.raises(UnsupportedFeature, match="cannot be written: its "
                       "grain directory is in a footer"):
        open_image(str(image), "vmdk", readonly=False)
