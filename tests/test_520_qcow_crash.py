"""Crash states of qcow v1 images we write (tests/crashsim.py): each one
opens, checks without corruption (leaks are allowed), holds every write
acknowledged before the last completed flush, and reads the same through
qemu-img.  CRASH_STATES (default 1000) sets how many states are tried."""

import os
import random

import pytest

from conftest import nbdplug, run
from crashsim import Recorder, crash_states, run_workload, write_state
from nbdplug import open_image
from nbdplug import check_image
from nbdplug.formats.qcow import QcowDisk

TARGET = int(os.environ.get("CRASH_STATES", "1000"))
KiB = 1 << 10

# (cluster size, guest size, backing file bytes or None)
SETUPS = {
    "4k-clusters": (4096, 1024 * KiB, None),
    "512-over-raw": (512, 256 * KiB, random.Random(1).randbytes(256 * KiB)),
}


def make(tmp_path, setup):
    cluster, size, base = SETUPS[setup]
    d = tmp_path / "img"
    d.mkdir()
    args = ["-o", f"cluster_size={cluster}"]
    if base is not None:
        (d / "base.raw").write_bytes(base)
        args += ["-b", "base.raw"]
    nbdplug("create", "-q", "-f", "qcow", *args, d / "t.qcow", size)
    return d, cluster, base or bytes(size)


def guest_bytes(path):
    with open_image(str(path), "qcow") as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
        return bytes(buf)


def crash_images(tmp_path, setup, seed, ops):
    """Record one random workload; yield (state dir, expectation)."""
    d, cluster, initial = make(tmp_path, setup)
    rec = Recorder(d)
    disk = open_image(str(d / "t.qcow"), "qcow", readonly=False,
                      file_factory=rec.open_file)
    rng = random.Random(seed)
    run_workload(disk, rec, rng, initial, ops=ops, cluster=cluster)
    disk.close()
    state = tmp_path / "state"
    for files, expect in crash_states(rec, rng, initial):
        write_state(files, state)
        yield state, expect
    for path in d.iterdir():
        path.unlink()
    d.rmdir()


@pytest.mark.parametrize("setup", SETUPS)
def test_crash_states_open_check_and_keep_flushed_data(setup, tmp_path):
    want = -(-TARGET // len(SETUPS))
    count = 0
    seed = 0
    while count < want:
        seed += 1
        for state, expect in crash_images(tmp_path, setup, seed, ops=150):
            image = state / "t.qcow"
            report = check_image(str(image), "qcow")
            assert report.corruptions == 0, (seed, count, report.messages)
            guest = guest_bytes(image)
            expect.verify(guest)
            if count % 97 == 0:         # the peer reads it the same
                out = state / "qemu.raw"
                run(["qemu-img", "convert", "-f", "qcow", "-O", "raw",
                     str(image), str(out)])
                assert out.read_bytes() == guest
                out.unlink()
            count += 1
    assert count >= want


def test_pointing_before_data_is_durable_is_caught(tmp_path, monkeypatch):
    """The same harness fails a driver that writes L2/L1 entries without
    first making the new clusters durable."""
    allocate = QcowDisk._write_allocating

    def unordered(self, *args):
        self.file.flush = lambda: None
        try:
            allocate(self, *args)
        finally:
            del self.file.flush
    monkeypatch.setattr(QcowDisk, "_write_allocating", unordered)
    failures = 0
    for state, expect in crash_images(tmp_path, "4k-clusters", 1, ops=60):
        image = state / "t.qcow"
        try:
            if check_image(str(image), "qcow").corruptions:
                raise AssertionError("corrupt")
            expect.verify(guest_bytes(image))
        except Exception:
            failures += 1
    assert failures > 0
