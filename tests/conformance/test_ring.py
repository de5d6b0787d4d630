"""Every format through tapbridge's blkif ring in shared memory, driven by
the C frontend built on Xen's ring.h: whole-disk reads equal the
reference; writes, discard and flush land as a model says; read-only
images answer writes with an error and stay as they were."""

import hashlib
import os
import sys

import pytest

from conformance.formats import ROWS, WRITABLE, MiB
from conftest import nbdplug, qemu_img_check_clean, qemu_img_compare, served
from nbdplug import open_image
from tapbridge.abi import (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ,
                           BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP,
                           BLKIF_RSP_ERROR, BLKIF_RSP_OKAY)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "tapbridge"))
from tbharness import Backend, Frontend, ShmDir, sector_data  # noqa: E402

PAGES = 11              # one request's segments, a page each
CHUNK = PAGES * 4096


def start(tmp_path, image, fmt, readonly=False):
    shm = ShmDir(tmp_path / "shm", PAGES)
    return shm, Frontend(shm), Backend(shm, image, fmt=fmt,
                                       readonly=readonly)


def request(fe, op, sector, pages=PAGES):
    fe.req(op, 1, sector, [(g, 0, 7) for g in range(pages)])
    fe.push()
    return fe.get(1)[0][2]


def read_all(shm, fe, size):
    out = bytearray()
    for offset in range(0, size, CHUNK):
        pages = min(PAGES, (size - offset) // 4096)
        assert request(fe, BLKIF_OP_READ, offset // 512, pages) == \
            BLKIF_RSP_OKAY
        out += shm.gather([(g, 0, 7) for g in range(pages)])
    return bytes(out)


def can_trim(image, row):
    """Whether the driver offers discard (the backend says so to the
    frontend in feature-discard)."""
    with open_image(image, row.fmt, readonly=False) as disk:
        return disk.can_trim


def test_ring_reads_equal_the_reference(fixture, tmp_path):
    reference = fixture.reference_bytes()
    size = len(reference) // 4096 * 4096
    shm, fe, be = start(tmp_path, fixture.image, fixture.row.fmt,
                        readonly=True)
    try:
        assert read_all(shm, fe, size) == reference[:size]
    finally:
        fe.close()
        rc, err = be.stop()
        assert rc == 0, err


@pytest.mark.parametrize("row", WRITABLE, ids=str)
def test_ring_writes_discard_and_flush(fixture, private, tmp_path):
    row = fixture.row
    model = bytearray(fixture.reference_bytes())
    trims = can_trim(private, row)
    shm, fe, be = start(tmp_path, private, row.fmt)
    try:
        for g in range(PAGES):
            shm.fill(g, sector_data(8 * g, 8, 3))
        data = shm.gather([(g, 0, 7) for g in range(PAGES)])
        for offset in (0, MiB + 4096, 5 * MiB - 8192):
            assert request(fe, BLKIF_OP_WRITE, offset // 512) == \
                BLKIF_RSP_OKAY
            model[offset:offset + CHUNK] = data
        # Discard a range, then write it again: what a discard leaves
        # is the format's to say, what the write leaves is not.
        fe.discard(2, 7 * MiB // 512, 128)
        fe.push()
        assert fe.get(1)[0][2] == (BLKIF_RSP_OKAY if trims
                                   else BLKIF_RSP_EOPNOTSUPP)
        assert request(fe, BLKIF_OP_WRITE, 7 * MiB // 512) == BLKIF_RSP_OKAY
        model[7 * MiB:7 * MiB + CHUNK] = data
        fe.req(BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [], 0)
        fe.push()
        assert fe.get(1)[0][2] == BLKIF_RSP_OKAY
    finally:
        fe.close()
        assert be.stop()[0] == 0
    expect = tmp_path / "model.raw"
    expect.write_bytes(model)
    with served(private, row.fmt, readonly=True) as srv:
        qemu_img_compare(str(expect), srv.uri, "raw", "raw")
    if row.qemu_checks:
        qemu_img_check_clean(private)
    if row.checks:
        assert nbdplug("check", "-f", row.fmt, private).returncode == 0


def test_ring_refuses_writes_to_a_read_only_image(fixture, private,
                                                  tmp_path):
    before = None if private.startswith("ram:") else \
        hashlib.sha256(open(private, "rb").read()).digest()
    shm, fe, be = start(tmp_path, private, fixture.row.fmt, readonly=True)
    try:
        assert request(fe, BLKIF_OP_WRITE, 0) == BLKIF_RSP_ERROR
        fe.discard(2, 0, 8)
        fe.push()
        assert fe.get(1)[0][2] != BLKIF_RSP_OKAY
    finally:
        fe.close()
        assert be.stop()[0] == 0
    if before is not None:
        assert hashlib.sha256(open(private, "rb").read()).digest() == before


@pytest.mark.parametrize("row", [r for r in ROWS if not r.writable],
                         ids=str)
def test_ring_cannot_serve_unwritable_format_writable(fixture, tmp_path):
    with pytest.raises(AssertionError, match="read-only"):
        start(tmp_path, fixture.image, fixture.row.fmt)
