"""Hostile qcow v1 images (tests/hostile.py): each is refused in one line
naming the file and the field, within bounded memory and time, and left
as it was."""

import struct

import pytest

from conftest import nbdplug, run
from hostile import assert_rejected
from nbdplug.formats.qcow import HEADER, QCOW_MAGIC

MiB = 1 << 20


def header(**fields):
    values = dict(magic=QCOW_MAGIC, version=1, backing_file_offset=0,
                  backing_file_size=0, mtime=0, size=4 * MiB,
                  cluster_bits=12, l2_bits=9, padding=0, crypt_method=0,
                  l1_table_offset=HEADER.size)
    values.update(fields)
    return HEADER.pack(**values)


def image(path, hdr=None, l1=(0, 0), tail=b"", pad=4096):
    """Header, L1 table entries, then `tail` from offset `pad`."""
    data = bytearray(hdr if hdr is not None else header())
    data += struct.pack(f">{len(l1)}Q", *l1)
    data += bytes(max(0, pad - len(data)))
    data += tail
    path.write_bytes(data)
    return path


DATA = bytes(4096)         # a data cluster after the L2 table


def l2(*entries):
    """A 4 KiB L2 table (512 entries) with the first entries given."""
    return struct.pack(">512Q", *entries, *([0] * (512 - len(entries))))


CASES = {
    "short file": (lambda p: p.write_bytes(b"QFI\xfb\0\0\0\1" + bytes(20)),
                   "too short"),
    "qcow2 version": (lambda p: image(p, header(version=2)), "version 2"),
    "cluster_bits 8": (lambda p: image(p, header(cluster_bits=8)),
                       "cluster_bits"),
    "cluster_bits 17": (lambda p: image(p, header(cluster_bits=17)),
                        "cluster_bits"),
    "cluster_bits 255": (lambda p: image(p, header(cluster_bits=255)),
                         "cluster_bits"),
    "l2_bits 5": (lambda p: image(p, header(l2_bits=5)), "l2_bits"),
    "l2_bits 14": (lambda p: image(p, header(l2_bits=14)), "l2_bits"),
    "AES": (lambda p: image(p, header(crypt_method=1)), "AES-encrypted"),
    "unknown encryption": (lambda p: image(p, header(crypt_method=7)),
                           "encryption method"),
    "size 1": (lambda p: image(p, header(size=1)), "too small"),
    "size 2^62": (lambda p: image(p, header(size=1 << 62)),
                  "L1 table larger"),
    "size 2^64-1": (lambda p: image(p, header(size=(1 << 64) - 1)),
                    "L1 table larger"),
    "L1 past EOF": (lambda p: image(p, header(l1_table_offset=1 << 62)),
                    "l1_table_offset"),
    "L1 in header": (lambda p: image(p, header(l1_table_offset=8)),
                     "overlaps the header"),
    "L1 entry past EOF": (lambda p: image(p, l1=(1 << 40, 0)),
                          "past the end of the file"),
    "L1 entry into L1": (lambda p: image(p, l1=(56, 0)),
                         "overlaps the header or L1"),
    "L1 entries share a table": (
        lambda p: image(p, header(size=64 * MiB), l1=[4096] * 32,
                        tail=l2()), "more L2 tables than the file holds"),
    "L2 entry past EOF": (
        lambda p: image(p, l1=(4096, 0), tail=l2(8192, 1 << 50) + DATA),
        "past the end of the file"),
    "L2 entry into header": (
        lambda p: image(p, l1=(4096, 0), tail=l2(0x10) + DATA),
        "overlaps the header"),
    "compressed past EOF": (
        lambda p: image(p, l1=(4096, 0),
                        tail=l2((1 << 63) | (4000 << 51) | 12000) + DATA),
        "past the end of the file"),
    "compressed length 0": (
        lambda p: image(p, l1=(4096, 0), tail=l2((1 << 63) | 8192) + DATA),
        "length 0"),
    "backing name too long": (
        lambda p: image(p, header(backing_file_offset=48,
                                  backing_file_size=5000)), "too long"),
    "backing name past EOF": (
        lambda p: image(p, header(backing_file_offset=1 << 40,
                                  backing_file_size=10)),
        "outside the file"),
    "backing name with NUL": (
        lambda p: image(p, header(backing_file_offset=4096,
                                  backing_file_size=5), tail=b"ab\0cd"),
        "NUL"),
    "backing outside the root": (
        lambda p: image(p, header(backing_file_offset=4096,
                                  backing_file_size=11),
                        tail=b"/etc/passwd"),
        "outside the allowed directories"),
    "backing is itself": (
        lambda p: image(p, header(backing_file_offset=4096,
                                  backing_file_size=len(p.name)),
                        tail=p.name.encode()),
        "the image itself"),
}


WRITER_ONLY = ("L1 entry past EOF", "L2 entry past EOF",
               "compressed past EOF", "L1 in header", "L1 entry into L1",
               "L2 entry into header")


@pytest.mark.parametrize("case", CASES)
def test_hostile_image_is_refused(case, tmp_path):
    make, match = CASES[case]
    path = tmp_path / "bad.qcow"
    make(path)
    # Past the end of the file is zeros to a reader (as to qemu); only a
    # writer refuses those.
    assert_rejected(path, "qcow", match,
                    readonly=case not in WRITER_ONLY)


@pytest.mark.parametrize("case", ["L1 entry past EOF", "L2 entry past EOF",
                                  "L1 in header", "L1 entry into L1"])
def test_reader_reads_what_qemu_reads(case, tmp_path):
    """Tables over the header and what lies past the end of the file:
    qemu reads them (zeros past the end); so does a reader."""
    path = tmp_path / "bad.qcow"
    CASES[case][0](path)
    theirs, ours = tmp_path / "theirs.raw", tmp_path / "ours.raw"
    run(["qemu-img", "convert", "-f", "qcow", "-O", "raw", str(path),
         str(theirs)])
    nbdplug("convert", "-f", "qcow", "-O", "raw", path, ours)
    assert ours.read_bytes() == theirs.read_bytes()


def test_unaligned_cluster_is_refused(tmp_path):
    """qemu fails to read a plain cluster that is not sector aligned
    (as "L2 entry into header", which a writer refuses first for its
    overlap)."""
    path = tmp_path / "bad.qcow"
    image(path, l1=(4096, 0), tail=l2(8192 + 16) + DATA)
    assert_rejected(path, "qcow", "not sector aligned")



def test_backing_loop_is_refused(tmp_path):
    a, b = tmp_path / "a.qcow", tmp_path / "b.qcow"
    for this, other in ((a, b), (b, a)):
        name = other.name.encode()
        image(this, header(backing_file_offset=4096,
                           backing_file_size=len(name)), tail=name)
    assert_rejected(a, "qcow", "loop", extra_files=[b])
