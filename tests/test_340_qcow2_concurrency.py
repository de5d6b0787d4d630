"""Several writers at once on one qcow2 disk: random reads, writes,
trims and zeroes on overlapping and disjoint regions for a fixed time.
The final image must equal a model of the acknowledged operations and
check clean.

The model is per 512-byte sector: an operation W can be the one whose
bytes survive unless another operation on that sector started after W
was acknowledged.  Writers use distinct data, so a surviving sector must
equal one of its candidates exactly.
"""

import random
import threading
import time

import pytest

from conftest import run, served
from nbdplug import check_image, create_image, open_image
from test_320_qcow2_write import qemu_check

MiB = 1 << 20
SECTOR = 512
DURATION = 4.0


class Log:
    def __init__(self):
        self.lock = threading.Lock()
        self.ops = []       # (start_ns, end_ns, offset, length, data|None)

    def add(self, start, end, offset, length, data):
        with self.lock:
            self.ops.append((start, end, offset, length, data))


def worker(io, log, rng, region, stop):
    """`io` has pwrite/zero/trim/pread/flush; `region` (start, length)
    keeps some workers disjoint while others overlap everything."""
    lo, span = region
    while not stop.is_set():
        sectors = rng.choice((1, 8, 128, 300))
        off = lo + rng.randrange((span - sectors * SECTOR) // SECTOR) * \
            SECTOR
        length = sectors * SECTOR
        kind = rng.random()
        t0 = time.monotonic_ns()
        if kind < 0.55:
            data = rng.randbytes(length)
            io.pwrite(data, off)
        elif kind < 0.7:
            data = bytes(length)
            io.zero(length, off)
        elif kind < 0.8:
            data = None                 # trimmed: any content
            io.trim(length, off)
        elif kind < 0.95:
            io.pread(length, off)
            continue
        else:
            io.flush()
            continue
        log.add(t0, time.monotonic_ns(), off, length, data)


def verify(final, size, log, initial=None):
    """Each sector holds what it held at first (`initial`, else zeros) if
    never touched, else the bytes of an operation on it that no other
    operation certainly superseded (one that started after it was
    acknowledged)."""
    per_sector = {}
    for op in log.ops:
        _, _, off, length, _ = op
        for s in range(off // SECTOR, (off + length) // SECTOR):
            per_sector.setdefault(s, []).append(op)
    bad = []
    for s in range(size // SECTOR):
        got = final[s * SECTOR:(s + 1) * SECTOR]
        ops = per_sector.get(s)
        if not ops:
            if got != (initial[s * SECTOR:(s + 1) * SECTOR] if initial
                       else bytes(SECTOR)):
                bad.append(s)
            continue
        latest_start = max(op[0] for op in ops)
        candidates = [op for op in ops if op[1] >= latest_start]
        if any(op[4] is None for op in candidates):
            continue                    # a trim may have left anything
        rel = [s * SECTOR - op[2] for op in candidates]
        if not any(op[4][r:r + SECTOR] == got
                   for op, r in zip(candidates, rel)):
            bad.append(s)
    assert not bad, f"{len(bad)} sectors (first {bad[:5]}) hold bytes no " \
        "acknowledged operation left"


class DiskIO:
    """The Disk interface with NBD-like method names and signatures."""

    def __init__(self, disk):
        self.disk = disk

    def pwrite(self, data, off):
        self.disk.pwrite(data, off)

    def zero(self, n, off):
        self.disk.zero(n, off)

    def trim(self, n, off):
        self.disk.trim(n, off)

    def pread(self, n, off):
        buf = bytearray(n)
        self.disk.pread(memoryview(buf), off)
        return buf

    def flush(self):
        self.disk.flush()


def regions(size):
    half = size // 2
    # Two workers share the first half; one each owns a quarter... and a
    # fourth ranges over everything, overlapping all of them.
    return [(0, half), (0, half), (half, size // 4), (0, size)]


def run_workers(ios, size, seconds=DURATION, seed=0):
    """A worker on each of `ios` (its own region of `size` bytes) for
    `seconds`; the Log of what they did.  A worker's error stops them
    all and fails the test."""
    log, stop, errors = Log(), threading.Event(), []

    def run(*args):
        try:
            worker(*args)
        except Exception as e:
            errors.append(e)
            stop.set()
    threads = [threading.Thread(target=run, args=(
        io, log, random.Random(seed + i), r, stop))
        for i, (io, r) in enumerate(zip(ios, regions(size)))]
    for t in threads:
        t.start()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    return log


@pytest.mark.parametrize("layout", ["4k", "64k-extl2"])
def test_driver_threads(tmp_path, layout):
    size = 8 * MiB
    path = str(tmp_path / "img.qcow2")
    opts = {"cluster_size": "4096"} if layout == "4k" else \
        {"cluster_size": "65536", "extended_l2": "on"}
    create_image(path, "qcow2", size, opts)
    disk = open_image(path, "qcow2", readonly=False)
    log = run_workers([DiskIO(disk)] * 4, size)
    disk.close()
    _final_checks(path, size, log)


def test_four_nbd_connections(tmp_path):
    size = 8 * MiB
    path = str(tmp_path / "img.qcow2")
    create_image(path, "qcow2", size, {"cluster_size": "4096"})
    with served(path, "qcow2") as srv:
        handles = [srv.connect() for _ in range(4)]
        log = run_workers(handles, size, seed=10)
        handles[0].flush()
    _final_checks(path, size, log)


def _final_checks(path, size, log):
    assert len(log.ops) > 100
    with open_image(path, "qcow2") as disk:
        final = bytearray(size)
        disk.pread(memoryview(final), 0)
    verify(bytes(final), size, log)
    report = check_image(path, "qcow2")
    assert report.corruptions == 0 and report.leaks == 0, report.messages
    theirs = qemu_check(path)
    assert theirs.get("corruptions", 0) == 0 and \
        theirs.get("leaks", 0) == 0, theirs
    # qemu reads the same bytes.
    raw = path + ".raw"
    run(["qemu-img", "convert", "-O", "raw", path, raw])
    with open(raw, "rb") as f:
        assert f.read() == bytes(final)


def test_model_rejects_lost_or_foreign_bytes():
    log = Log()
    log.add(0, 10, 0, 1024, b"a" * 1024)
    log.add(20, 30, 512, 512, b"b" * 512)         # after the first: wins
    log.add(25, 26, 2048, 512, b"c" * 512)
    good = b"a" * 512 + b"b" * 512 + bytes(1024) + b"c" * 512
    verify(good, 2560, log)
    for bad in (b"a" * 1024 + bytes(1536),                  # lost write
                b"a" * 512 + b"b" * 512 + b"x" * 512 + bytes(512) +
                b"c" * 512):                                # foreign bytes
        with pytest.raises(AssertionError, match="sectors"):
            verify(bad, 2560, log)
