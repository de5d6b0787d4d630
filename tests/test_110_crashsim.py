"""The crash-state harness itself: it accepts a driver that flushes and
catches one that does not."""

import os
import random

import pytest

from crashsim import Recorder, crash_states, run_workload, write_state
from nbdplug import open_image

MiB = 1 << 20


def guest_bytes(path):
    with open_image(path, "raw") as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
        return bytes(buf)


def record(tmp_path, seed, flush=True):
    d = tmp_path / "img"
    d.mkdir()
    path = d / "disk.raw"
    initial = random.Random(seed).randbytes(MiB)
    path.write_bytes(initial)
    rec = Recorder(d)
    disk = open_image(str(path), "raw", readonly=False,
                      file_factory=rec.open_file)
    if not flush:
        disk.flush = lambda: None          # a driver that lies
    run_workload(disk, rec, random.Random(seed), initial, ops=120,
                 cluster=4096, trim=False)
    disk.close()
    return rec, initial


def test_raw_crash_states_hold_flushed_writes(tmp_path):
    rec, initial = record(tmp_path, 1)
    count = 0
    for files, expect in crash_states(rec, random.Random(2), initial):
        write_state(files, tmp_path / "state")
        expect.verify(guest_bytes(str(tmp_path / "state" / "disk.raw")))
        count += 1
    assert count > 50


def test_harness_catches_a_driver_that_does_not_flush(tmp_path):
    rec, initial = record(tmp_path, 3, flush=False)
    # With no file flushes logged, the only crash point is the end, where
    # every write is still pending: losing them all must be caught.
    states = list(crash_states(rec, random.Random(4), initial))
    files, expect = states[0]
    write_state(files, tmp_path / "state")
    with pytest.raises(AssertionError, match="neither the flushed data"):
        expect.verify(guest_bytes(str(tmp_path / "state" / "disk.raw")))
    assert os.path.exists(tmp_path / "state" / "disk.raw")
