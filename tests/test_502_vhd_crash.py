"""VHD crash states: every state opens, `nbdplug check` finds no
corruption, and it holds every write acknowledged before the last
completed flush; qemu-img reads the dynamic ones the same way.

CRASH_STATES sets how many dynamic-disk states to replay (default
1,000; differencing disks get half as many again).
"""

import os
import random

import pytest

from crashsim import Recorder, crash_states, run_workload, write_state
from nbdplug import check_image, create_image, open_image
from test_500_vhd import qemu_raw

MiB = 1 << 20
SIZE = 2 * MiB
BLOCK = 64 * 1024
TARGET = int(os.environ.get("CRASH_STATES", "1000"))


def guest(path):
    with open_image(path, "vpc") as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
        return bytes(buf)


@pytest.mark.parametrize("kind,share", [("dynamic", 1.0),
                                        ("differencing", 0.5)])
def test_crash_states(tmp_path, kind, share):
    wanted = max(50, int(TARGET * share))
    d = tmp_path / "img"
    d.mkdir()
    initial = bytes(SIZE)
    backing = None
    if kind == "differencing":
        initial = random.Random(5).randbytes(SIZE)
        create_image(str(d / "parent.vhd"), "vpc", SIZE,
                     {"block_size": str(BLOCK)})
        with open_image(str(d / "parent.vhd"), "vpc",
                        readonly=False) as parent:
            parent.pwrite(initial, 0)
        backing = "parent.vhd"
    path = str(d / "disk.vhd")
    create_image(path, "vpc", SIZE, {"block_size": str(BLOCK)},
                 backing=backing, backing_fmt="vpc" if backing else None)
    rng = random.Random(len(kind))
    rec = Recorder(d)
    disk = open_image(path, "vpc", readonly=False,
                      file_factory=rec.open_file)
    run_workload(disk, rec, rng, initial, ops=40 + wanted // 3,
                 cluster=BLOCK, max_sectors=3 * BLOCK // 512)
    disk.close()

    state_dir = tmp_path / "state"
    count = 0
    for files, expect in crash_states(rec, rng, initial, variants=4):
        write_state(files, state_dir)
        spath = str(state_dir / "disk.vhd")
        report = check_image(spath, "vpc")
        assert report.corruptions == 0, (count, report.messages[:5])
        expect.verify(guest(spath))
        if count % 50 == 0:
            if kind == "dynamic":
                # qemu ignores bitmaps; where it matters, so do the bytes.
                expect.verify(qemu_raw(spath))
            # A crash image opens for writing too (and stays clean).
            open_image(spath, "vpc", readonly=False).close()
            assert check_image(spath, "vpc").corruptions == 0
        count += 1
        if count >= wanted:
            break
    assert count >= wanted, f"only {count} crash states"
