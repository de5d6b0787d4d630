"""Crash states of a moving disk: guest writes, zeroes and trims, reads
that copy clusters from the source, the background fill and its end (the
header write that drops the source) all recorded under the driver; every
crash state opens, checks without corruption in nbdplug and qemu-img, and
reads as the source overlaid with every write acknowledged before the
last completed flush.  No state has a cluster allocated with partial
data: that would read differently from the model.

CRASH_STATES scales the count, as in the other crash tests.
"""

import json
import os
import random
import subprocess
import threading

from conftest import nbdplug
from crashsim import (Recorder, assert_checks_clean, crash_states,
                      run_workload, write_state)
from nbdplug import open_image

MiB = 1 << 20
# At least enough states to reach the end of the move in the log.
TARGET = max(200, int(os.environ.get("CRASH_STATES", "2000")) // 10)


def guest(path):
    with open_image(path, "qcow2", readonly=True) as disk:
        return bytes(disk.read(disk.size, 0))


def test_crash_states_of_a_moving_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("NBDPLUG_STATE_DIR", str(tmp_path / "key"))
    d = tmp_path / "img"
    d.mkdir()
    size = 2 * MiB
    rng = random.Random(17)
    source = bytearray(rng.randbytes(size))
    source[MiB:MiB + 256 * 1024] = bytes(256 * 1024)        # a hole
    (d / "source.raw").write_bytes(source)
    path = str(d / "disk.qcow2")
    nbdplug("migrate", "start", "--no-wait", "--rate", "1M",
            d / "source.raw", path)
    rec = Recorder(d)
    disk = open_image(path, "qcow2", readonly=False,
                      file_factory=rec.open_file)
    stop = threading.Event()

    def reader():               # copy-on-read beside the guest's writes
        r = random.Random(3)
        while not stop.is_set():
            n = r.choice((512, 4096, 65536))
            disk.pread(memoryview(bytearray(n)),
                       r.randrange(0, size - n) // 512 * 512)

    # The guest's I/O and the reader while the fill runs, then more I/O
    # after the end of the move: crash states on both sides of the end
    # within the first TARGET, however fast the fill goes.
    t = threading.Thread(target=reader)
    t.start()
    try:
        model = run_workload(disk, rec, rng, bytes(source), ops=40,
                             cluster=65536, max_sectors=3 * 128)
        assert disk.move.wait(60)       # the end of the move is recorded
    finally:
        stop.set()
        t.join()
    run_workload(disk, rec, rng, bytes(model), ops=2 * TARGET,
                 cluster=65536, max_sectors=3 * 128)
    disk.close()
    assert "backing-filename" not in json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", path], capture_output=True,
        text=True).stdout)

    state_dir = tmp_path / "state"
    count = moving = 0
    for files, expect in crash_states(rec, rng, bytes(source), variants=4):
        write_state(files, state_dir)
        spath = str(state_dir / "disk.qcow2")
        assert_checks_clean(spath, "qcow2", count)
        expect.verify(guest(spath))
        with open_image(spath, "qcow2") as disk:
            moving += disk.backing is not None
        count += 1
        if count >= TARGET:
            break
    assert count >= TARGET, f"only {count} crash states"
    assert 0 < moving < count, (moving, count)  # before and after the end
