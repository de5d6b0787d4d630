"""Data through the blkif ring: bytes land exactly where the segments say
(canaries around them untouched), indirect requests with hundreds of
segments, discard, flush and barrier ordering, malformed requests, and
one code path: what the ring wrote, nbdkit with our plugin reads back."""

import hashlib
import os
import random
import signal
import struct
import sys
import time

import pytest

from nbdplug import open_image
from tapbridge.abi import (BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
                           BLKIF_OP_READ, BLKIF_OP_WRITE,
                           BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP,
                           BLKIF_RSP_ERROR, BLKIF_RSP_OKAY)

from conftest import run, served

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import (Backend, Frontend, ShmDir, WatchedDisk,  # noqa: E402
                       dispatcher_thread, sector_data)

MiB = 1 << 20
DISK = 8 * MiB
PROTOCOLS = ["x86_64-abi", "x86_32-abi"]
CANARY = b"\xa5" * 4096
OK, ERR, NOTSUPP = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP


def make_raw(path, size=DISK, seed=1):
    with open(path, "wb") as f:
        f.write(sector_data(0, size // 512, seed))
    return str(path)


def image_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def image(tmp_path):
    return make_raw(tmp_path / "disk.raw")


def start(tmp_path, image, pages=64, order=0, protocol="x86_64-abi", **kw):
    shm = ShmDir(tmp_path / "shm", pages)
    fe = Frontend(shm, order, protocol)
    be = Backend(shm, image, order=order, protocol=protocol, **kw)
    return shm, fe, be


def one(fe, op, req_id, sector, segs, nseg=None):
    fe.req(op, req_id, sector, segs, nseg)
    fe.push()
    return fe.get(1)[0][2]


def segment_bytes(segs):
    return sum((last - first + 1) * 512 for _, first, last in segs)


# Scattered pages, partial pages, and a run of adjacent ones.
SEGS = [(3, 0, 7), (9, 1, 1), (4, 3, 6), (5, 7, 7), (6, 0, 0), (7, 0, 7),
        (8, 0, 3), (20, 2, 5), (11, 0, 7), (12, 0, 7), (13, 4, 7)]


# Each data test also runs with the data pages kept mapped (persistent
# grants), through the same staging code the Xen transport uses.
PERSISTENT = pytest.mark.parametrize("extra", [(), ("--persistent",)],
                                     ids=["copy", "persistent"])


@PERSISTENT
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_read_fills_exactly_the_segments(tmp_path, image, protocol, extra):
    shm, fe, be = start(tmp_path, image, protocol=protocol, extra=extra)
    for g in range(64):
        shm.fill(g, CANARY)
    sector = 1001
    assert one(fe, BLKIF_OP_READ, 1, sector, SEGS) == OK
    disk = image_bytes(image)[sector * 512:]
    pos = 0
    for gref, first, last in SEGS:
        page = shm.page(gref)
        n = (last - first + 1) * 512
        assert page[first * 512:(last + 1) * 512] == disk[pos:pos + n], gref
        assert page[:first * 512] == CANARY[:first * 512], gref
        assert page[(last + 1) * 512:] == CANARY[(last + 1) * 512:], gref
        pos += n
    untouched = set(range(64)) - {g for g, _, _ in SEGS}
    assert all(shm.page(g) == CANARY for g in untouched)
    be.stop()


@PERSISTENT
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_write_lays_segments_end_to_end(tmp_path, image, protocol, extra):
    before = image_bytes(image)
    shm, fe, be = start(tmp_path, image, protocol=protocol, extra=extra)
    for g in range(64):
        shm.fill(g, sector_data(10000 + 8 * g, 8, 7))
    sector = 333
    assert one(fe, BLKIF_OP_WRITE, 2, sector, SEGS) == OK
    assert be.stop()[0] == 0
    expect = shm.gather(SEGS)
    after = image_bytes(image)
    start_ = sector * 512
    assert after[start_:start_ + len(expect)] == expect
    assert after[:start_] == before[:start_]
    assert after[start_ + len(expect):] == before[start_ + len(expect):]


def write_indirect_list(shm, list_grefs, segs):
    """Segment descriptors, 512 to a page, in the frontend's pages."""
    raw = b"".join(struct.pack("<IBB2x", g, f, la) for g, f, la in segs)
    for i, gref in enumerate(list_grefs):
        chunk = raw[i * 4096:(i + 1) * 4096]
        shm.fill(gref, chunk + bytes(4096 - len(chunk)))


@PERSISTENT
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_indirect_request_with_256_segments(tmp_path, image, protocol,
                                            extra):
    rng = random.Random(8)
    shm, fe, be = start(tmp_path, image, pages=1024, protocol=protocol,
                        extra=extra)
    data_grefs = rng.sample(range(2, 1024), 512)
    segs = [(g, rng.randrange(4), rng.randrange(4, 8))
            for g in data_grefs[:256]]
    for g, _, _ in segs:
        shm.fill(g, bytes([rng.randrange(256)]) * 4096)
    write_indirect_list(shm, [1], segs)
    fe.indirect(BLKIF_OP_WRITE, 0xABCD, 4096, 256, [1])
    fe.push()
    # The response echoes indirect_op, not BLKIF_OP_INDIRECT.
    assert fe.get(1) == [(0xABCD, BLKIF_OP_WRITE, OK)]
    expect = shm.gather(segs)
    read_segs = [(g, f, la) for g, (_, f, la) in zip(data_grefs[256:], segs)]
    for g, _, _ in read_segs:
        shm.fill(g, CANARY)
    write_indirect_list(shm, [0], read_segs)
    fe.indirect(BLKIF_OP_READ, 0xABCE, 4096, 256, [0])
    fe.push()
    assert fe.get(1) == [(0xABCE, BLKIF_OP_READ, OK)]
    assert shm.gather(read_segs) == expect
    for g, f, la in read_segs:
        page = shm.page(g)
        assert page[:f * 512] + page[(la + 1) * 512:] == \
            CANARY[:f * 512] + CANARY[(la + 1) * 512:]
    assert be.stop()[0] == 0
    assert image_bytes(image)[4096 * 512:4096 * 512 + len(expect)] == expect


def test_indirect_lists_spanning_pages(tmp_path, image):
    """With a larger advertised maximum, a segment list runs over several
    indirect pages, read in the order the request lists them."""
    rng = random.Random(9)
    shm = ShmDir(tmp_path / "shm", 1600)
    fe = Frontend(shm)
    disk = open_image(image, "raw", readonly=False)
    segs = [(g, 0, 7) for g in rng.sample(range(10, 1600), 1100)]
    for g, _, _ in segs:
        shm.fill(g, sector_data(8 * g, 8, 3))
    write_indirect_list(shm, [7, 2, 5], segs)
    with dispatcher_thread(shm, disk, max_indirect=1536):
        fe.indirect(BLKIF_OP_WRITE, 1, 0, 1100, [7, 2, 5])
        fe.push()
        assert fe.get(1) == [(1, BLKIF_OP_WRITE, OK)]
    disk.close()
    expect = b"".join(shm.page(g) for g, _, _ in segs)
    assert image_bytes(image)[:len(expect)] == expect


def test_discard_trims_whole_4k_blocks(tmp_path, image):
    before = image_bytes(image)
    shm, fe, be = start(tmp_path, image)
    fe.discard(1, 1, 30)                # bytes 512..15872
    fe.discard(2, 64, 16, flag=1)       # secure: bytes 32768..40960
    fe.discard(3, 101, 3, flag=1)       # secure, unaligned: all of it
    fe.discard(4, 200, 4)               # no whole block: nothing
    fe.push()
    assert sorted(fe.get(4)) == [(i, BLKIF_OP_DISCARD, OK)
                                 for i in range(1, 5)]
    assert be.stop()[0] == 0
    after = image_bytes(image)
    assert after[512:4096] == before[512:4096]
    assert after[4096:12288] == bytes(8192)
    assert after[12288:15872] == before[12288:15872]
    assert after[32768:40960] == bytes(8192)
    assert after[101 * 512:104 * 512] == bytes(1536)
    assert after[100 * 512:101 * 512] == before[100 * 512:101 * 512]
    assert after[200 * 512:204 * 512] == before[200 * 512:204 * 512]


def test_discard_unsupported_is_eopnotsupp_every_time(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    disk.can_trim = False
    with dispatcher_thread(shm, disk):
        for i in range(3):
            fe.discard(i, 8 * i, 8, flag=i % 2)
        fe.push()
        assert sorted(fe.get(3)) == [(i, BLKIF_OP_DISCARD, NOTSUPP)
                                     for i in range(3)]
    assert not [c for c in disk.calls if c[0] in ("trim", "zero")]
    disk.disk.close()


def test_flush_writes_then_flushes(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    with dispatcher_thread(shm, disk):
        assert one(fe, BLKIF_OP_FLUSH_DISKCACHE, 1, 0, []) == OK
        assert disk.calls == [("flush", None, 0), ("flush done", None, 0)]
        disk.calls.clear()
        # Linux blkfront's pure flush names sector 2**64 - 1.
        assert one(fe, BLKIF_OP_FLUSH_DISKCACHE, 3, 2**64 - 1, []) == OK
        assert disk.calls == [("flush", None, 0), ("flush done", None, 0)]
        disk.calls.clear()
        shm.fill(1, b"F" * 4096)
        assert one(fe, BLKIF_OP_FLUSH_DISKCACHE, 2, 16, [(1, 0, 7)]) == OK
        assert disk.calls == [("pwrite", 8192, 4096),
                              ("pwrite done", 8192, 4096),
                              ("flush", None, 0), ("flush done", None, 0)]
    disk.disk.close()
    assert image_bytes(image)[8192:12288] == b"F" * 4096


def test_barrier_drains_before_and_holds_back_after(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    started, release = disk.hold(0)         # the write before the barrier
    with dispatcher_thread(shm, disk, workers=4):
        fe.req(BLKIF_OP_WRITE, 1, 0, [(1, 0, 7)])
        fe.req(BLKIF_OP_WRITE_BARRIER, 2, 8, [(2, 0, 7)])
        fe.req(BLKIF_OP_WRITE, 3, 16, [(3, 0, 7)])
        fe.push()
        assert started.wait(30)
        time.sleep(0.3)     # the barrier has had every chance to jump ahead
        assert ("pwrite", 4096, 4096) not in disk.calls
        assert ("pwrite", 8192, 4096) not in disk.calls
        release.set()
        assert sorted(fe.get(3)) == [(1, 1, OK), (2, 2, OK), (3, 1, OK)]
    names = [c[:2] for c in disk.calls]
    assert names.index(("pwrite done", 0)) < names.index(("pwrite", 4096))
    assert names.index(("pwrite done", 4096)) < names.index(("flush", None))
    assert names.index(("flush done", None)) < names.index(("pwrite", 8192))
    disk.disk.close()


def test_requests_complete_out_of_order(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    started, release = disk.hold(0)
    with dispatcher_thread(shm, disk, workers=2):
        fe.req(BLKIF_OP_READ, 1, 0, [(1, 0, 7)])
        fe.req(BLKIF_OP_READ, 2, 8, [(2, 0, 7)])
        fe.push()
        assert started.wait(30)
        assert fe.get(1) == [(2, BLKIF_OP_READ, OK)]
        release.set()
        assert fe.get(1) == [(1, BLKIF_OP_READ, OK)]
    disk.disk.close()


def test_the_consumer_serves_calls_that_do_not_wait(tmp_path, image):
    """Calls that only use the CPU are made by the thread that takes the
    requests off the ring (no hand-off to a worker); once calls wait on
    storage, workers make them, several at once."""
    shm = ShmDir(tmp_path / "shm", 40)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    with dispatcher_thread(shm, disk, workers=4):
        for round_ in range(3):
            for i in range(16):
                fe.req(BLKIF_OP_READ, i, 8 * i, [(i + 1, 0, 7)])
            fe.push()
            assert len(fe.get(16)) == 16
        assert not [t for t in disk.threads if t.startswith("tapbridge-")]
        disk.threads.clear()
        disk.delay = 0.005
        for round_ in range(3):
            for i in range(32):
                fe.req(BLKIF_OP_READ, i, 8 * i, [(i + 1, 0, 7)])
            fe.push()
            assert len(fe.get(32)) == 32
        workers = {t for t in disk.threads[-32:]
                   if t.startswith("tapbridge-worker-")}
        assert len(workers) > 1, disk.threads
    disk.disk.close()


def test_answer_published_while_a_later_request_is_stuck(tmp_path, image):
    """Responses are published per batch; one worker stuck on the batch's
    last request does not hold back the answers it already wrote."""
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    started, release = disk.hold(0)
    with dispatcher_thread(shm, disk, workers=1):
        fe.req(BLKIF_OP_READ, 1, 8, [(1, 0, 7)])
        fe.req(BLKIF_OP_READ, 2, 0, [(2, 0, 7)])
        fe.push()
        assert started.wait(30)
        assert fe.get(1) == [(1, BLKIF_OP_READ, OK)]
        release.set()
        assert fe.get(1) == [(2, BLKIF_OP_READ, OK)]
    disk.disk.close()


def test_request_copied_once_before_validation(tmp_path, image):
    """The frontend rewrites a request's slot while it is in flight: the
    backend acts on the copy it validated (no double fetch)."""
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    started, release = disk.hold(4096)
    shm.fill(1, b"1" * 4096)
    with dispatcher_thread(shm, disk):
        fe.req(BLKIF_OP_WRITE, 1, 8, [(1, 0, 7)])
        fe.push()
        assert started.wait(30)
        with open(os.path.join(shm.path, "ring"), "r+b") as ring:
            ring.seek(64 + 1)               # slot 0: nr_segments
            ring.write(b"\xff")
            ring.seek(64 + 16)              # sector_number
            ring.write(struct.pack("<Q", 99999999))
            ring.seek(64 + 24)              # seg[0].gref
            ring.write(struct.pack("<I", 5))
        release.set()
        assert fe.get(1) == [(1, BLKIF_OP_WRITE, OK)]
    disk.disk.close()
    assert disk.calls[:2] == [("pwrite", 4096, 4096),
                              ("pwrite done", 4096, 4096)]
    assert image_bytes(image)[4096:8192] == b"1" * 4096


def test_segments_become_one_driver_call(tmp_path, image):
    shm = ShmDir(tmp_path / "shm", 600)
    fe = Frontend(shm)
    disk = WatchedDisk(open_image(image, "raw", readonly=False))
    with dispatcher_thread(shm, disk):
        # 11 adjacent pages: guest memory used in place; scattered
        # segments: one bounce buffer; either way one call.
        assert one(fe, BLKIF_OP_WRITE, 1, 0, [(g, 0, 7)
                                              for g in range(11)]) == OK
        assert one(fe, BLKIF_OP_READ, 2, 0, SEGS) == OK
        segs = [(g, 0, 7) for g in range(500, 244, -1)]
        write_indirect_list(shm, [1], segs)
        fe.indirect(BLKIF_OP_READ, 3, 0, 256, [1])
        fe.push()
        assert fe.get(1) == [(3, BLKIF_OP_READ, OK)]
    disk.disk.close()
    assert [c for c in disk.calls if c[0] in ("pread", "pwrite")] == [
        ("pwrite", 0, 11 * 4096), ("pread", 0, segment_bytes(SEGS)),
        ("pread", 0, MiB)]


MALFORMED = [
    # (op, sector, segments, nr_segments, status)
    (BLKIF_OP_READ, 0, [], 0, ERR),
    (BLKIF_OP_WRITE, 0, [], 0, ERR),
    (BLKIF_OP_WRITE, 0, [(1, 0, 7)] * 11, 12, ERR),
    (BLKIF_OP_WRITE, 0, [(1, 0, 7)] * 11, 255, ERR),
    (BLKIF_OP_WRITE, 0, [(1, 5, 4)], None, ERR),
    (BLKIF_OP_WRITE, 0, [(1, 0, 8)], None, ERR),
    (BLKIF_OP_WRITE, 0, [(1, 0, 7), (2, 7, 6)], None, ERR),
    (BLKIF_OP_WRITE, DISK // 512 - 7, [(1, 0, 7)], None, ERR),
    (BLKIF_OP_WRITE, 2 ** 64 - 1, [(1, 0, 7)], None, ERR),
    (BLKIF_OP_WRITE, 2 ** 55, [(1, 0, 7)], None, ERR),
    (BLKIF_OP_WRITE, 0, [(1, 0, 7), (64, 0, 7)], None, ERR),    # bad gref
    (BLKIF_OP_WRITE, 0, [(2 ** 32 - 1, 0, 0)], None, ERR),
    (BLKIF_OP_FLUSH_DISKCACHE, 0, [(1, 0, 7), (99, 0, 0)], None, ERR),
    (BLKIF_OP_WRITE_BARRIER, 0, [(1, 0, 9)], None, ERR),
    (4, 0, [(1, 0, 7)], None, NOTSUPP),
    (7, 0, [(1, 0, 7)], None, NOTSUPP),
    (255, 0, [(1, 0, 7)], None, NOTSUPP),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_malformed_requests_get_errors_and_write_nothing(tmp_path, image,
                                                         protocol):
    before = hashlib.sha256(image_bytes(image)).digest()
    shm, fe, be = start(tmp_path, image, protocol=protocol)
    for g in range(64):
        shm.fill(g, b"\x77" * 4096)
    expect = []
    for i, (op, sector, segs, nseg, status) in enumerate(MALFORMED):
        fe.req(op, 100 + i, sector, segs, nseg)
        expect.append((100 + i, op, status))
    # Indirect: bad inner operation, too many segments, bad list grant.
    write_indirect_list(shm, [3], [(1, 0, 7)] * 300)
    fe.indirect(BLKIF_OP_FLUSH_DISKCACHE, 200, 0, 1, [3])
    fe.indirect(BLKIF_OP_WRITE, 201, 0, 257, [3])
    fe.indirect(BLKIF_OP_WRITE, 202, 0, 0, [3])
    fe.indirect(BLKIF_OP_WRITE, 203, 0, 8, [4096])
    expect += [(200, BLKIF_OP_FLUSH_DISKCACHE, ERR),
               (201, BLKIF_OP_WRITE, ERR), (202, BLKIF_OP_WRITE, ERR),
               (203, BLKIF_OP_WRITE, ERR)]
    fe.discard(204, DISK // 512 - 1, 2)
    expect.append((204, BLKIF_OP_DISCARD, ERR))
    fe.push()
    assert sorted(fe.get(len(expect))) == sorted(expect)
    # The ring still works afterwards.
    assert one(fe, BLKIF_OP_READ, 300, 0, [(1, 0, 7)]) == OK
    rc, err = be.stop()
    assert rc == 0 and "Traceback" not in err
    assert hashlib.sha256(image_bytes(image)).digest() == before


def test_readonly_refuses_every_write_type(tmp_path, image):
    before = image_bytes(image)
    shm, fe, be = start(tmp_path, image, readonly=True)
    shm.fill(1, b"w" * 4096)
    fe.req(BLKIF_OP_WRITE, 1, 0, [(1, 0, 7)])
    fe.req(BLKIF_OP_FLUSH_DISKCACHE, 2, 0, [])
    fe.req(BLKIF_OP_FLUSH_DISKCACHE, 3, 0, [(1, 0, 7)])
    fe.req(BLKIF_OP_WRITE_BARRIER, 4, 0, [(1, 0, 7)])
    fe.discard(5, 0, 8)
    write_indirect_list(shm, [2], [(1, 0, 7)])
    fe.indirect(BLKIF_OP_WRITE, 6, 0, 1, [2])
    fe.req(BLKIF_OP_READ, 7, 0, [(3, 0, 7)])
    fe.push()
    assert sorted(fe.get(7)) == [
        (1, 1, ERR), (2, 3, ERR), (3, 3, ERR), (4, 2, ERR), (5, 5, ERR),
        (6, 1, ERR), (7, 0, OK)]
    assert shm.page(3) == before[:4096]
    assert be.stop()[0] == 0
    assert image_bytes(image) == before


def workload(fe, shm, rng, model, count, sectors):
    """Random writes through the ring, mirrored into `model`; each one
    acknowledged before it counts."""
    for i in range(count):
        nseg = rng.randrange(1, 12)
        segs = [(rng.randrange(64), 0, 7) for _ in range(nseg)]
        for g, _, _ in segs:
            shm.fill(g, bytes([rng.randrange(1, 256)]) * 4096)
        sector = rng.randrange(0, sectors - 8 * nseg)
        data = b"".join(shm.page(g) for g, _, _ in segs)
        assert one(fe, BLKIF_OP_WRITE, i, sector, segs) == OK
        model[sector * 512:sector * 512 + len(data)] = data


FORMATS = ["raw", "qcow2", "vpc", "vmdk", "qcow"]
QEMU_CHECKS = {"qcow2", "vmdk"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_nbdkit_reads_back_what_the_ring_wrote(tmp_path, fmt):
    """One code path: the plugin serving the image afterwards sees
    exactly the bytes the ring wrote (and qemu-img finds it clean)."""
    raw = make_raw(tmp_path / "base.raw", 4 * MiB, seed=5)
    path = str(tmp_path / f"disk.{fmt}")
    run(["qemu-img", "convert", "-f", "raw", "-O", fmt, raw, path])
    model = bytearray(image_bytes(raw))
    shm, fe, be = start(tmp_path, path, fmt=fmt)
    workload(fe, shm, random.Random(fmt), model, 60, 4 * MiB // 512)
    fe.discard(999, 2048, 16)
    fe.push()
    assert fe.get(1)[0][2] in (OK, NOTSUPP)     # as the driver can trim
    assert be.stop()[0] == 0
    with served(path, fmt) as srv:
        got = srv.connect().pread(4 * MiB, 0)
    # Discarded blocks read as zeros or as before; all else exactly.
    lo, hi = 2048 * 512, 2064 * 512
    assert got[:lo] == model[:lo] and got[hi:] == model[hi:]
    for off in range(lo, hi, 4096):
        assert got[off:off + 4096] in (model[off:off + 4096], bytes(4096))
    if fmt in QEMU_CHECKS:
        run(["qemu-img", "check", "-f", fmt, path])


def test_kill_and_restart_loses_no_acknowledged_flushed_write(tmp_path,
                                                              image):
    rng = random.Random(12)
    model = bytearray(image_bytes(image))
    shm, fe, be = start(tmp_path, image)
    workload(fe, shm, rng, model, 40, DISK // 512)
    assert one(fe, BLKIF_OP_FLUSH_DISKCACHE, 500, 0, []) == OK
    durable = bytes(model)
    # Mid-stream: a ring's worth of writes in flight, then SIGKILL.
    for k in range(32):
        shm.fill(k, b"\x5a" * 4096)
        fe.req(BLKIF_OP_WRITE, 1000 + k, 8 * k, [(k, 0, 7)])
    fe.push()
    be.proc.send_signal(signal.SIGKILL)
    be.stop()
    answered, withdrawn = fe.recover()
    assert len(answered) + withdrawn == 32
    be = Backend(shm, image)
    st = fe.state()
    assert f"from index {st['rsp_prod']}" in be.banner
    # The new backend serves the same ring: reads see every acknowledged
    # write (flushed before the kill, or answered since).
    for k in range(32):
        fe.req(BLKIF_OP_READ, 2000 + k, 8 * k, [(40 + k % 20, 0, 7)])
        fe.push()
        assert fe.get(1) == [(2000 + k, BLKIF_OP_READ, OK)]
        got = shm.page(40 + k % 20)
        if (1000 + k, BLKIF_OP_WRITE, OK) in answered:
            assert got == b"\x5a" * 4096
        else:       # lost or landed: nothing else
            assert got in (durable[k * 4096:(k + 1) * 4096], b"\x5a" * 4096)
    assert be.stop()[0] == 0
    after = image_bytes(image)
    assert after[32 * 4096:] == durable[32 * 4096:]


def test_sigterm_answers_requests_in_flight(tmp_path, image):
    shm, fe, be = start(tmp_path, image)
    write_indirect_list(shm, [0], [(g, 0, 7) for g in range(1, 33)])
    for k in range(32):
        fe.indirect(BLKIF_OP_WRITE, k, 256 * k, 32, [0])
    fe.push()
    time.sleep(0.05)        # let it consume some
    rc, err = be.stop()
    assert rc == 0 and err == ""
    answered = fe.poll()
    st = fe.state()
    # Every request it took got its response; the rest wait in the ring.
    assert st["rsp_prod"] == len(answered)
    assert all(status == OK for _, _, status in answered)
    be = Backend(shm, image)
    rest = fe.get(32 - len(answered))
    assert sorted(r[0] for r in answered + rest) == list(range(32))
    assert be.stop()[0] == 0


def test_persistent_grants_stay_mapped_bounded_and_unmapped_at_close(
        tmp_path, image):
    """Each page is mapped once for the life of the ring and reused (the
    guest's later bytes are what a later write takes); past the bound
    requests are still served, by copy; closing unmaps every page."""
    shm = ShmDir(tmp_path / "shm", 64)
    fe = Frontend(shm)
    disk = open_image(image, "raw", readonly=False)
    with dispatcher_thread(shm, disk, persistent=True) as d:
        transport, grants = d.transport, d.transport.grants
        grants.limit = 6
        for round_ in range(3):
            for g in range(1, 5):
                shm.fill(g, sector_data(100 * round_ + 8 * g, 8, round_))
            segs = [(1, 0, 7), (2, 0, 7), (3, 2, 5), (4, 0, 7), (1, 0, 7)]
            assert one(fe, BLKIF_OP_WRITE, round_, 64, segs) == OK
            assert transport.maps == 4      # once each, in the first round
            expect = shm.gather(segs)
            assert image_bytes(image)[64 * 512:64 * 512 + len(expect)] == \
                expect
        # Grants 5.. go past the bound of 6: served by copy, not mapped.
        for g in range(5, 12):
            shm.fill(g, CANARY)
        segs = [(g, 0, 7) for g in range(5, 12)]
        assert one(fe, BLKIF_OP_READ, 9, 0, segs) == OK
        assert shm.gather(segs) == image_bytes(image)[:7 * 4096]
        assert len(grants) == 6 and transport.maps == 6
        assert transport.unmaps == 0
    assert transport.unmaps == 6
    disk.close()


def test_discard_in_whole_clusters_of_the_image(tmp_path):
    """A qcow2 image's discards trim whole 64 KiB clusters (its
    discard-granularity); the parts of clusters keep their data."""
    path = str(tmp_path / "disk.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", path, "16M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 256k", path])
    shm = ShmDir(tmp_path / "shm", 8)
    fe = Frontend(shm)
    disk = open_image(path, "qcow2", readonly=False)
    with dispatcher_thread(shm, disk) as d:
        assert d.discard_granularity == 65536
        fe.discard(1, 64, 256)          # bytes 32 KiB .. 160 KiB
        fe.push()
        assert fe.get(1) == [(1, BLKIF_OP_DISCARD, OK)]
    disk.close()
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", path,
         str(tmp_path / "out.raw")])
    data = image_bytes(tmp_path / "out.raw")[:256 << 10]
    assert data[:64 << 10] == b"\x3c" * (64 << 10)
    assert data[64 << 10:128 << 10] == bytes(64 << 10)
    assert data[128 << 10:] == b"\x3c" * (128 << 10)
