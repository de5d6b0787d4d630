"""The kernel lane (make test-kernel): kernel NBD, the kernel's own
partition nodes announced by udev, device-mapper.  These run inside a
stock Debian kernel booted with virtme-ng (tools/kernel-lane.sh)."""

import json
import os
import subprocess

import pytest

from conftest import run
from dm import table as dmtable
from test_600_hotplug import (LAYOUT, MiB, Hotplug, assert_clean, kill9,
                              make_gpt, marker, read_dev)

pytestmark = pytest.mark.kernel


@pytest.fixture
def hp():
    h = Hotplug()
    yield h
    h.close()
    assert not any(os.path.exists(f"/sys/block/{n}/pid")
                   for n in os.listdir("/sys/block") if n.startswith("nbd"))


@pytest.fixture
def gpt(tmp_path):
    files = tmp_path / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("guest\n")
    (files / "blob.bin").write_bytes(os.urandom(300000))
    return make_gpt(tmp_path / "gpt.raw", files=files)


def test_kernel_nbd_gpt_mount_write_umount(hp, gpt, tmp_path):
    disk, parts = hp.attach("-f", "raw", "--via", "nbd", gpt)
    assert disk.startswith("/dev/nbd")
    # The kernel's own nodes where it scanned the GPT (announced by
    # udev), else devices we mapped: either way all three, right bytes.
    assert sorted(parts) == ["p1", "p2", "p3"]
    assert read_dev(parts["p1"], 0, 64) == marker(1)[:64]
    assert read_dev(parts["p3"], 0, 64) == marker(3)[:64]
    hp("detach", disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "raw", "--via", "nbd", gpt, mnt)
    assert (mnt / "etc" / "hostname").read_text() == "guest\n"
    (mnt / "written").write_bytes(b"x" * 100000)
    hp("umount", mnt)
    hp("mount", "-f", "raw", "--readonly", gpt, mnt)
    assert (mnt / "written").read_bytes() == b"x" * 100000
    hp("umount", mnt)


def test_loop_partitions_on_device_mapper(hp, gpt):
    """Where the kernel made no partition nodes (a loop device without
    partition scanning), dm-linear targets give each partition a device."""
    disk, parts = hp.attach("-f", "raw", "--readonly", "--via", "loop", gpt)
    assert all(p.startswith("/dev/mapper/nbdplug-") for p in parts.values())
    assert read_dev(parts["p1"], 0, 64) == marker(1)[:64]
    assert read_dev(parts["p3"], 0, 64) == marker(3)[:64]


def test_kill9_while_mounted_then_detach_all(hp, gpt, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "raw", gpt, mnt)
    [entry] = hp.list()
    kill9(entry["server-pid"])
    assert not hp.list()[0]["alive"]
    hp("detach", "--all")
    assert not os.path.ismount(mnt)
    assert_clean(hp.run_dir)


def test_cp_r_between_images(hp, gpt, tmp_path):
    """The administrator's copy: mount a guest image and an empty one,
    cp -a, unmount, and find the same tree in the copy."""
    target = make_gpt(tmp_path / "target.raw")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    hp("mount", "-f", "raw", "--readonly", gpt, src)
    hp("mount", "-f", "raw", target, dst)
    run(["cp", "-a", f"{src}/.", str(dst)])
    hp("umount", dst)
    hp("mount", "-f", "raw", "--readonly", target, dst)
    try:
        run(["diff", "-r", "--no-dereference", str(src), str(dst)])
    finally:
        hp("umount", dst)
        hp("umount", src)


def test_dm_linear_over_two_attached_devices(hp, tmp_path):
    images = []
    for i, size in enumerate((3 * MiB, 5 * MiB)):
        path = tmp_path / f"part{i}.raw"
        path.write_bytes(bytes([0x30 + i]) * (size // 2) + os.urandom(
            size // 2))
        images.append(str(path))
    devs = [hp.attach("-f", "raw", "--readonly", img)[0] for img in images]
    table = dmtable.concat([(d, os.path.getsize(i))
                            for d, i in zip(devs, images)])
    name = f"nbdplug-test-{os.getpid()}"
    dev = dmtable.load(name, table, readonly=True)
    try:
        with open(dev, "rb") as f:
            got = f.read()
        assert got == b"".join(open(i, "rb").read() for i in images)
    finally:
        dmtable.remove(name)


def test_udev_rules_keep_blkid_away(hp, gpt):
    rules = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "hotplug", "rules")
    for name in os.listdir(rules):      # /etc is private to the guest
        run(["install", "-m", "644", os.path.join(rules, name),
             "/etc/udev/rules.d/"])
    run(["udevadm", "control", "--reload"])
    disk, parts = hp.attach("-f", "raw", "--via", "nbd", gpt)
    run(["udevadm", "settle"])
    props = run(["udevadm", "info", "--query=property", parts["p2"]]).stdout
    assert "NBDPLUG=1" in props and "UDISKS_IGNORE=1" in props
    assert "ID_FS_TYPE" not in props, props     # blkid never probed it
