"""qcow v1 images written by us (created with `nbdplug create`, written
through nbdkit and our plugin, or by threads on the Disk) read back
identically through qemu-img and through libqcow (pyqcow), and check
clean; `nbdplug check` finds what is wrong with damaged ones."""

import json
import random
import struct
import threading

import pyqcow
import pytest

from conftest import nbdplug, run, served
from nbdplug import CorruptImage, open_image
from nbdplug import check_image
from nbdplug.formats.qcow import HEADER
from test_520_qcow_read import compressible, qemu_raw

MiB = 1 << 20


def create(path, size, *args):
    nbdplug("create", "-q", "-f", "qcow", *args, path, size)
    return str(path)


def assert_reads(image, model, tmp_path):
    """qemu-img and pyqcow read `model` from `image`; it checks clean."""
    assert qemu_raw(image, tmp_path) == model
    f = pyqcow.file()
    f.open(str(image))
    try:
        assert f.get_media_size() == len(model)
        assert f.read_buffer_at_offset(len(model), 0) == model
    finally:
        f.close()
    report = check_image(str(image), "qcow")
    assert (report.corruptions, report.leaks) == (0, 0), report.messages


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
def test_writes_through_plugin_read_back_in_qemu_and_pyqcow(
        cluster_size, tmp_path):
    image = create(tmp_path / "t.qcow", "6M", "-o",
                   f"cluster_size={cluster_size}")
    model = bytearray(6 * MiB)
    rng = random.Random(cluster_size)
    with served(image, "qcow") as srv:
        h = srv.connect()
        # Sector-aligned and not, across clusters and L2 tables, and
        # overwrites of what was just allocated.
        for offset, length in ((0, 512), (100, 7000), (4095, 2),
                               (MiB - 3000, 70000), (2 * MiB - 1, 3),
                               (6 * MiB - 513, 513), (5000, 300000)):
            data = rng.randbytes(length)
            h.pwrite(data, offset)
            model[offset:offset + length] = data
        h.flush()
        assert h.pread(6 * MiB, 0) == model
    assert_reads(image, bytes(model), tmp_path)


def test_nbdcopy_fills_image(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(random.Random(7).randbytes(8 * MiB) + bytes(4 * MiB))
    image = create(tmp_path / "t.qcow", "12M")
    with served(image, "qcow") as srv:
        run(["nbdcopy", "--connections=4", str(src), srv.uri])
    assert_reads(image, src.read_bytes(), tmp_path)
    # nbdcopy zeroed the tail instead of writing it: nothing allocated.
    report = check_image(image, "qcow")
    assert report.allocated_clusters == 8 * MiB // 4096


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow"])
def test_writes_over_a_backing_file_copy_the_rest_of_the_cluster(
        backing_fmt, tmp_path):
    base_bytes = random.Random(8).randbytes(3 * MiB)
    (tmp_path / "base.raw").write_bytes(base_bytes)
    base = "base.raw"
    if backing_fmt == "qcow":
        run(["qemu-img", "convert", "-O", "qcow", str(tmp_path / "base.raw"),
             str(tmp_path / "base.qcow")])
        base = "base.qcow"
    image = create(tmp_path / "t.qcow", "4M", "-b", base)
    model = bytearray(base_bytes + bytes(MiB))
    with served(image, "qcow") as srv:
        h = srv.connect()
        for offset, length, byte in ((600, 1000, 1), (MiB + 4000, 9000, 2),
                                     (3 * MiB - 100, 5000, 3)):
            h.pwrite(bytes([byte]) * length, offset)
            model[offset:offset + length] = bytes([byte]) * length
        assert h.pread(4 * MiB, 0) == model
    assert qemu_raw(image, tmp_path) == model
    # (libqcow 20201213 hangs reading a child of a qemu-made qcow parent,
    # so qemu-img is the only other reader here.)
    report = check_image(image, "qcow")
    assert (report.corruptions, report.leaks) == (0, 0), report.messages
    info = json.loads(nbdplug("info", "-f", "qcow", "--output=json",
                              image).stdout)
    assert info["backing-filename"] == base


def test_trim_and_zero(tmp_path):
    (tmp_path / "base.raw").write_bytes(b"\xbb" * (2 * MiB))
    plain = create(tmp_path / "plain.qcow", "2M")
    over = create(tmp_path / "over.qcow", "2M", "-b", "base.raw")
    for image, below in ((plain, 0), (over, 0xbb)):
        model = bytearray([below]) * (2 * MiB)
        with served(image, "qcow") as srv:
            h = srv.connect()
            h.pwrite(b"\x01" * MiB, 0)
            model[:MiB] = b"\x01" * MiB
            # Trim unmaps whole clusters only: what lies below shows.
            h.trim(10000, 1000)
            model[4096:8192] = bytes([below]) * 4096
            # Zero reads as zeros everywhere, the backing file included.
            h.zero(3000, 50000)
            h.zero(300000, 600000)
            h.zero(4096, MiB + 8192)
            for offset, length in ((50000, 3000), (600000, 300000),
                                   (MiB + 8192, 4096)):
                model[offset:offset + length] = bytes(length)
            h.flush()
            assert h.pread(2 * MiB, 0) == model
        assert qemu_raw(image, tmp_path) == model
        report = check_image(image, "qcow")
        assert (report.corruptions, report.leaks) == (0, 0), report.messages


def test_trim_gives_space_back(tmp_path):
    image = create(tmp_path / "t.qcow", "8M")
    with open_image(image, "qcow", readonly=False) as disk:
        disk.pwrite(random.Random(9).randbytes(8 * MiB), 0)
        disk.flush()
        full = (tmp_path / "t.qcow").stat().st_blocks
        disk.trim(8 * MiB, 0)
        disk.flush()
    assert (tmp_path / "t.qcow").stat().st_blocks < full // 8
    assert qemu_raw(image, tmp_path) == bytes(8 * MiB)
    assert check_image(image, "qcow").exit_code() == 0


def test_writes_into_compressed_clusters(tmp_path):
    src = tmp_path / "src.raw"
    src.write_bytes(compressible(2 * MiB, 10))
    image = str(tmp_path / "t.qcow")
    run(["qemu-img", "convert", "-c", "-O", "qcow", str(src), image],
        check=False)                # see test_520_qcow_read._compressed
    assert check_image(image, "qcow").compressed_clusters > 0
    model = bytearray(src.read_bytes())
    with open_image(image, "qcow", readonly=False) as disk:
        for offset in (100, 4096 * 7 + 5, MiB + 4000):
            disk.pwrite(b"\xee" * 300, offset)
            model[offset:offset + 300] = b"\xee" * 300
        disk.zero(4096, 8192)
        model[8192:12288] = bytes(4096)
        disk.flush()
    assert_reads(image, bytes(model), tmp_path)


def test_threads_writing_one_cluster_lose_nothing(tmp_path):
    """Several threads (as tapbridge's pool calls a Disk) writing
    sectors of the same unallocated clusters at once."""
    image = create(tmp_path / "t.qcow", "1M")
    model = bytearray(MiB)
    with open_image(image, "qcow", readonly=False) as disk:
        def writer(n):
            for sector in range(n, MiB // 512, 8):
                disk.pwrite(bytes([n + 1]) * 512, sector * 512)
        threads = [threading.Thread(target=writer, args=(n,))
                   for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        disk.flush()
    for sector in range(MiB // 512):
        model[sector * 512:(sector + 1) * 512] = bytes([sector % 8 + 1]) * 512
    assert_reads(image, bytes(model), tmp_path)


def test_blktap_layout(tmp_path):
    """The layout Xen's 2006 blktap qcow-create wrote: Xen's extended
    header after qemu's, the L1 table on its own 4 KiB page."""
    size = 8 * MiB
    l1_entries = size >> 21
    hdr = HEADER.pack(magic=0x514649FB, version=1, backing_file_offset=0,
                      backing_file_size=0, mtime=0, size=size,
                      cluster_bits=12, l2_bits=9, padding=0, crypt_method=0,
                      l1_table_offset=4096)
    xen = struct.pack(">4I", 0x58454EFB, 0, 512, 1)  # XEN magic, sparse
    image = tmp_path / "t.qcow"
    image.write_bytes(hdr + xen + bytes(4096 - len(hdr) - len(xen)
                                        + 8 * l1_entries))
    model = bytearray(size)
    with open_image(str(image), "qcow", readonly=False) as disk:
        for offset, length in ((0, 4096), (3 * MiB - 7, 9000),
                               (size - 512, 512)):
            data = random.Random(offset).randbytes(length)
            disk.pwrite(data, offset)
            model[offset:offset + length] = data
    assert_reads(str(image), bytes(model), tmp_path)


def test_created_image_as_qemu_sees_it(tmp_path):
    image = create(tmp_path / "t.qcow", "1000")      # rounded up to 1024
    info = json.loads(run(["qemu-img", "info", "--output=json",
                           image]).stdout)
    assert (info["format"], info["virtual-size"], info["cluster-size"]) == \
        ("qcow", 1024, 4096)
    hdr = HEADER.unpack_from((tmp_path / "t.qcow").read_bytes())
    assert (hdr.version, hdr.cluster_bits, hdr.l2_bits, hdr.crypt_method) \
        == (1, 12, 9, 0)


@pytest.mark.parametrize("args, message", [
    (["-o", "cluster_size=1000"], "power of two"),
    (["-o", "cluster_size=128k"], "power of two"),
    (["-o", "compat=1.1"], "compat"),
    (["-b", "base.qcow", "-F", "raw"], "would be read as"),
    (["-b", "../elsewhere.raw"], "outside the allowed"),
])
def test_create_refuses_bad_options(args, message, tmp_path):
    run(["qemu-img", "create", "-f", "qcow", str(tmp_path / "base.qcow"),
         "1M"])
    proc = nbdplug("create", "-f", "qcow", *args, tmp_path / "t.qcow", "1M",
                   check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and message in proc.stderr
    assert not (tmp_path / "t.qcow").exists()


def _entry(image, index):
    """Host offset of the L2 entry for guest cluster `index` (4 KiB
    clusters, index below 512: the first L2 table)."""
    data = open(image, "rb").read()
    hdr = HEADER.unpack_from(data)
    l2 = struct.unpack_from(">Q", data, hdr.l1_table_offset)[0]
    return l2 + 8 * index


def _poke(image, offset, value):
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def _written(tmp_path):
    image = create(tmp_path / "t.qcow", "1M")
    with open_image(image, "qcow", readonly=False) as disk:
        disk.pwrite(random.Random(11).randbytes(64 * 1024), 0)
    return image


def test_check_finds_leaks_and_repairs_them(tmp_path):
    image = _written(tmp_path)
    with open(image, "ab") as f:
        f.write(b"\x01" * 3 * 4096)                 # nothing points here
    proc = nbdplug("check", "-f", "qcow", image, check=False)
    assert proc.returncode == 3, proc.stdout
    out = json.loads(nbdplug("check", "-f", "qcow", "--output=json", image,
                             check=False).stdout)
    assert out["leaks"] == 3 and "corruptions" not in out
    nbdplug("check", "-f", "qcow", "-r", "leaks", image, check=False)
    assert nbdplug("check", "-f", "qcow", image).returncode == 0


@pytest.mark.parametrize("damage, message", [
    ("past_eof", "past the end of the file"),
    ("overlap", "overlaps other metadata or data"),
    ("into_l1", "overlaps the header or L1 table"),
])
def test_check_finds_corruption(damage, message, tmp_path):
    image = _written(tmp_path)
    first = struct.unpack(">Q", open(image, "rb").read()[
        _entry(image, 0):_entry(image, 0) + 8])[0]
    value = {"past_eof": 1 << 40, "overlap": first, "into_l1": 16}[damage]
    _poke(image, _entry(image, 5), value)
    proc = nbdplug("check", "-f", "qcow", image, check=False)
    assert proc.returncode == 2
    assert message in proc.stdout
    # A writer refuses the image at open, naming the entry (a reader
    # takes a cluster past the end of the file as zeros, as qemu does).
    if damage != "overlap":
        with pytest.raises(CorruptImage, match="entry 5"):
            open_image(image, "qcow", readonly=damage == "into_l1")


def test_bad_compressed_cluster_fails_reads_and_stops_writes(tmp_path):
    image = _written(tmp_path)
    # A "compressed" cluster of 100 bytes of plain data: no deflate stream.
    data_offset = struct.unpack(">Q", open(image, "rb").read()[
        _entry(image, 1):_entry(image, 1) + 8])[0]
    _poke(image, _entry(image, 1), (1 << 63) | (100 << 51) | data_offset)
    with open_image(image, "qcow", readonly=False) as disk:
        buf = bytearray(4096)
        with pytest.raises(CorruptImage, match="compressed cluster"):
            disk.pread(memoryview(buf), 4096)
        disk.pread(memoryview(buf), 8192)           # other clusters serve
        with pytest.raises(CorruptImage, match="refusing writes"):
            disk.pwrite(b"x" * 512, 8192)
