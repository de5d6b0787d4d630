"""Crash states of VMDK writes (tests/crashsim.py): a random workload on a
monolithicSparse and on a twoGbMaxExtentSparse disk, then the disk as a
crash at any point could leave it.  Every state must open, check without
corruption (leaks allowed), and read back all data flushed before the
crash.  CRASH_STATES (default 1000) is the number of states verified
across both subformats."""

import os
import random

import pytest

from conftest import run
from crashsim import Recorder, crash_states, run_workload, write_state
from nbdplug import create_image, open_image
from nbdplug import check_image
from nbdplug.formats.vmdk import create as vmdk_create

MiB = 1 << 20
SIZE = 4 * MiB
CRASH_STATES = int(os.environ.get("CRASH_STATES", "1000"))
QEMU_CHECK_EVERY = 40           # states between qemu-img checks


def record(directory, subformat, seed):
    """Create a disk in `directory`, run a workload on it under the
    recorder, and return the recorder."""
    directory.mkdir()
    path = str(directory / "disk.vmdk")
    create_image(path, "vmdk", SIZE, {"subformat": subformat})
    rec = Recorder(directory)
    disk = open_image(path, "vmdk", readonly=False,
                      file_factory=rec.open_file)
    run_workload(disk, rec, random.Random(seed), bytes(SIZE), ops=200,
                 cluster=65536, trim=False)
    disk.close()
    return rec


def guest_bytes(path):
    """The guest's view of a state, and whether it was left unclean."""
    with open_image(path, "vmdk") as disk:
        buf = bytearray(disk.size)
        disk.pread(memoryview(buf), 0)
        return bytes(buf), disk.dirty


@pytest.mark.parametrize("subformat", ["monolithicSparse",
                                       "twoGbMaxExtentSparse"])
def test_every_crash_state_opens_checks_and_holds_flushed_data(
        tmp_path, monkeypatch, subformat):
    monkeypatch.setattr(vmdk_create, "SPLIT_SECTORS", MiB // 512)
    quota = max(1, CRASH_STATES // 2)
    verified = seed = unclean = 0
    state_dir = tmp_path / "state"
    image = str(state_dir / "disk.vmdk")
    while verified < quota:
        seed += 1
        rec = record(tmp_path / f"run{seed}", subformat, seed)
        if subformat == "twoGbMaxExtentSparse":
            assert len(rec.base) == 5           # descriptor + 4 extents
        for files, expect in crash_states(rec, random.Random(seed), bytes(
                SIZE)):
            write_state(files, state_dir)
            report = check_image(image, "vmdk")
            assert report.corruptions == 0 and report.check_errors == 0, \
                (verified, report.messages)
            data, dirty = guest_bytes(image)
            expect.verify(data)
            if verified % QEMU_CHECK_EVERY == 0:
                run(["qemu-img", "check", image])
            unclean += dirty
            verified += 1
            if verified >= quota:
                break
    # Most states are crashes mid-session, with uncleanShutdown set.
    assert verified >= quota and unclean > verified // 2
