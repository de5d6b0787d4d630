"""Hostile qcow2 images (in the style of qemu's iotest 080), written by
the tests: each is refused with one clear error naming the field, in
bounded memory and time, and the file is not written."""

import errno
import os

import nbd
import pytest

from conftest import nbdplug, run, served
from hostile import assert_rejected
from test_320_qcow2_write import _l2_entry_offset, _peek, _poke

MiB = 1 << 20
HDR = {"cluster_bits": (20, ">I"), "size": (24, ">Q"),
       "l1_size": (36, ">I"), "l1_table_offset": (40, ">Q"),
       "refcount_table_offset": (48, ">Q"),
       "refcount_table_clusters": (56, ">I"), "nb_snapshots": (60, ">I"),
       "snapshots_offset": (64, ">Q"), "incompatible_features": (72, ">Q"),
       "header_length": (100, ">I"), "backing_file_offset": (8, ">Q"),
       "backing_file_size": (16, ">I"), "crypt_method": (32, ">I")}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "hostile.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", str(path), "64M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 128k",
         "-c", "write -P 8 1M 64k", str(path)])
    return path


def patch(path, field, value):
    offset, fmt = HDR[field]
    _poke(path, offset, fmt, value)


HEADER_CASES = [
    ("cluster_bits", 8, "cluster_bits"),
    ("cluster_bits", 22, "cluster_bits"),
    ("cluster_bits", 0xFFFFFFFF, "cluster_bits"),
    ("l1_table_offset", 0x10200, "not cluster aligned"),
    ("l1_size", 0x10000000, "too large"),          # 2 GiB of L1
    ("l1_size", 0, "too small"),
    ("refcount_table_offset", 0x10001, "not cluster aligned"),
    ("refcount_table_clusters", 0x1000000, "too large"),
    ("nb_snapshots", 5_000_000, "snapshots exceed"),
    ("incompatible_features", 1 << 40, "unsupported incompatible"),
    ("crypt_method", 1, "encrypted"),
    ("header_length", 1 << 20, "header_length"),
    ("size", 1 << 63, "too large"),
]


@pytest.mark.parametrize("field,value,match", HEADER_CASES,
                         ids=[f"{f}={v:#x}" for f, v, _ in HEADER_CASES])
def test_hostile_header_fields(image, field, value, match):
    patch(image, field, value)
    assert_rejected(image, "qcow2", match)


WRITER_CASES = [
    ("l1_table_offset", 1 << 40, "past the end"),
    ("l1_table_offset", 0, "overlaps the header"),
    ("refcount_table_offset", 1 << 40, "past the end"),
    ("refcount_table_offset", 0, "overlaps the header"),
    ("refcount_table_clusters", 0, "refcount table"),
]


@pytest.mark.parametrize("field,value,match", WRITER_CASES,
                         ids=[f"{f}={v:#x}" for f, v, _ in WRITER_CASES])
def test_tables_a_writer_refuses(image, field, value, match):
    """Tables over the header or past the end of the file: qemu reads
    such an image (what lies past the end reads as zeros) and so do we,
    but a writer refuses it."""
    patch(image, field, value)
    if field != "refcount_table_clusters":      # qemu refuses that one
        run(["qemu-img", "info", str(image)])
        nbdplug("info", image)
    assert_rejected(image, "qcow2", match, readonly=False)


def test_snapshot_table_of_garbage(image):
    """1000 snapshots over the data: qemu opens it (the entries are
    garbage, their L1 tables unusable) and its check reports corruption;
    so do we."""
    patch(image, "nb_snapshots", 1000)
    patch(image, "snapshots_offset", 0x30000)
    run(["qemu-img", "info", str(image)])
    nbdplug("info", image)
    proc = nbdplug("check", image, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert run(["qemu-img", "check", str(image)],
               check=False).returncode == 2


def test_header_extension_overflows(image):
    # The first extension (the feature table) claims more than the cluster.
    _poke(image, 112 + 4, ">I", 0x7FFFFFF0)
    assert_rejected(image, "qcow2", "overflows")


def test_backing_name_too_long(image):
    patch(image, "backing_file_offset", 1024)
    patch(image, "backing_file_size", 5000)
    assert_rejected(image, "qcow2", "longer than 1023")


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside.raw",
                                    "link-out.raw"])
def test_backing_escaping_root(tmp_path, target):
    outside = tmp_path.parent / "outside.raw"
    outside.write_bytes(b"secret" * 1000)
    d = tmp_path / "root"
    d.mkdir()
    (d / "link-out.raw").symlink_to(outside)
    path = d / "img.qcow2"
    # Written by qemu-img, then pointed elsewhere (qemu would follow it).
    run(["qemu-img", "create", "-f", "qcow2", "-b", str(outside), "-F",
         "raw", "-u", str(path), "6000"])
    name = target.encode()
    off = _peek(path, 8, ">Q")
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(name)
    patch(path, "backing_file_size", len(name))
    assert_rejected(path, "qcow2", "outside the allowed directories")


def test_backing_device_node(tmp_path):
    dev = tmp_path / "loopdev"
    os.mknod(dev, 0o600 | 0o060000, os.makedev(7, 0))    # a block device
    path = tmp_path / "img.qcow2"
    run(["qemu-img", "create", "-f", "qcow2", "-b", "loopdev", "-F", "raw",
         "-u", str(path), "1M"])
    assert_rejected(path, "qcow2", "block device")


def test_refcount_block_past_eof_refused_for_writing(image):
    rt = _peek(image, 48, ">Q")
    _poke(image, rt, ">Q", 1 << 40)
    assert_rejected(image, "qcow2", "past the end", readonly=False)


@pytest.mark.parametrize("kind", ["past_eof", "compressed_past_eof",
                                  "compressed_garbage"])
def test_bad_l2_entries_fail_reads_cleanly(image, kind):
    l2e = _l2_entry_offset(image, 0)
    entry = _peek(image, l2e, ">Q")
    if kind == "past_eof":
        _poke(image, l2e, ">Q", (1 << 63) | (1 << 40))
    else:
        csize_shift = 62 - (16 - 8)
        host = os.path.getsize(image) + (1 << 30) \
            if kind == "compressed_past_eof" else (entry & 0xFFFFFFFFFE00)
        # Compressed, 200 sectors long: over the end, or random data.
        _poke(image, l2e, ">Q", (1 << 62) | (200 << csize_shift) | host)
    before = image.read_bytes()
    with served(str(image), "qcow2", readonly=True) as srv:
        h = srv.connect()
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 0)
        assert e.value.errno == "EIO"
        # The server survives and serves other clusters.
        assert h.pread(4096, MiB) == b"\x08" * 4096
    proc = nbdplug("check", image, check=False)
    assert proc.returncode in (2, 3) or "ERROR" in proc.stdout
    assert image.read_bytes() == before
    assert errno.EIO
