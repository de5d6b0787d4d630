"""Every format served to several connections at once: nbdkit runs each
connection's requests on a thread of its own, all on the one Disk of the
export.  Four clients read it all in different orders; on a writable
format four clients write, zero, trim, read and flush over overlapping
and disjoint ranges for a while, and the image then holds what the
acknowledged operations allow (the model of test_340), reads the same
through qemu, and checks without corruption."""

import random
import threading

import pytest

from conformance.formats import SIZE, WRITABLE
from conftest import (nbdplug, qemu_img_check_clean, qemu_img_compare,
                      served)
from test_340_qcow2_concurrency import run_workers, verify

DURATION = 1.5      # seconds of writing


class Client:
    """A libnbd handle; where the export cannot trim, trims are zeroes
    (which the model accepts in their place: a trim may leave anything)."""

    def __init__(self, h):
        self.pwrite, self.zero, self.pread, self.flush = \
            h.pwrite, h.zero, h.pread, h.flush
        self.trim = h.trim if h.can_trim() else h.zero


@pytest.mark.parametrize("row", WRITABLE, ids=str)
def test_four_connections_write_at_once(fixture, private, tmp_path):
    row = fixture.row
    with served(private, row.fmt) as srv:
        handles = [Client(srv.connect()) for _ in range(4)]
        log = run_workers(handles, SIZE, DURATION)
        handles[0].flush()
    assert len(log.ops) > 100
    final = tmp_path / "final.raw"
    with served(private, row.fmt, readonly=True) as srv:
        final.write_bytes(srv.connect().pread(SIZE, 0))
    verify(final.read_bytes(), SIZE, log, fixture.reference_bytes())
    if row.qemu_reads:
        qemu_img_compare(str(final), private, "raw", row.fmt)
    if row.qemu_checks:
        qemu_img_check_clean(private)
    if row.checks:
        # No corruption; leaks allowed (qcow's trim punches whole file
        # system blocks only, and its clusters need not be aligned).
        assert nbdplug("check", "-f", row.fmt, private,
                       check=False).returncode in (0, 3)


def test_four_connections_read_at_once(fixture):
    """Each reads the whole disk in its own order of 64 KiB pieces."""
    reference = fixture.reference_bytes()
    piece = 64 << 10
    wrong = []

    def reader(h, seed):
        offsets = list(range(0, SIZE, piece))
        random.Random(seed).shuffle(offsets)
        for off in offsets:
            if h.pread(piece, off) != reference[off:off + piece]:
                wrong.append(off)
    with served(fixture.image, fixture.row.fmt, readonly=True) as srv:
        threads = [threading.Thread(target=reader, args=(srv.connect(), i))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not wrong, f"{len(wrong)} pieces differ (first {wrong[:3]})"
