"""qcow2 crash states: every state opens, checks without corruption in
both nbdplug check and qemu-img check, and holds every write
acknowledged before the last completed flush.

CRASH_STATES sets how many states to replay (default 2,000 per run of
this file; `CRASH_STATES=10000` for the long run).
"""

import os
import random

import pytest

from crashsim import (Recorder, assert_checks_clean, crash_states,
                      run_workload, write_state)
from nbdplug import create_image, open_image

MiB = 1 << 20
TARGET = int(os.environ.get("CRASH_STATES", "2000"))

SCENARIOS = [
    # (name, create options, backing, share of the target)
    ("v3-64k", {"cluster_size": "65536"}, False, 0.25),
    ("v3-4k-backing", {"cluster_size": "4096"}, True, 0.25),
    ("extl2-backing", {"cluster_size": "65536", "extended_l2": "on"}, True,
     0.2),
    ("v2-512", {"cluster_size": "512", "compat": "0.10"}, False, 0.15),
    # 64-bit refcounts on 512-byte clusters: the refcount table grows.
    ("v3-512-refcount-growth", {"cluster_size": "512",
                                "refcount_bits": "64"}, False, 0.15),
]


def guest(path):
    with open_image(path, "qcow2", readonly=True) as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
        return bytes(buf)


@pytest.mark.parametrize("name,opts,backing,share", SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_crash_states(tmp_path, name, opts, backing, share):
    states_wanted = max(50, int(TARGET * share))
    d = tmp_path / "img"
    d.mkdir()
    growth = name.endswith("growth")
    size = 4 * MiB if growth else 2 * MiB
    initial = bytes(size)
    if backing:
        initial = random.Random(7).randbytes(size)
        (d / "base.raw").write_bytes(initial)
    path = str(d / "disk.qcow2")
    create_image(path, "qcow2", size, opts,
                 backing="base.raw" if backing else None,
                 backing_fmt="raw" if backing else None)
    rng = random.Random(hash(name) & 0xFFFF)
    rec = Recorder(d)
    disk = open_image(path, "qcow2", readonly=False,
                      file_factory=rec.open_file)
    cs = int(opts["cluster_size"])
    table_before = disk.refs.table_offset
    run_workload(disk, rec, rng, initial, ops=40 + 2 * states_wanted,
                 cluster=cs, max_sectors=256 if growth else 3 * cs // 512)
    assert (disk.refs.table_offset != table_before) == growth
    disk.close()

    state_dir = tmp_path / "state"
    count = 0
    for files, expect in crash_states(rec, rng, initial, variants=4):
        write_state(files, state_dir)
        spath = str(state_dir / "disk.qcow2")
        assert_checks_clean(spath, "qcow2", count)
        expect.verify(guest(spath))
        if count % 50 == 0:
            # A crash image must also open for writing (and recover).
            open_image(spath, "qcow2", readonly=False).close()
        count += 1
        if count >= states_wanted:
            break
    assert count >= states_wanted, f"only {count} crash states"
