"""The kernel lane (make test-kernel): kernel NBD, the kernel's own
partition nodes announced by udev, device-mapper.  These run inside a
stock Debian kernel booted with virtme-ng (tools/kernel-lane.sh), where
every Python start costs seconds, so the verbs run in this process."""

import os
import urllib.parse

import pytest

from conftest import run, served
from dm import table as dmtable
from hotplug import devices, partitions
from hotplug.udev import Watcher
from test_600_hotplug import (LAYOUT, MiB, Hotplug, kill9, make_gpt,
                              marker, read_dev)

pytestmark = pytest.mark.kernel
# Connects of one NBD device in test_kernel_partitions_every_time.
CYCLES = int(os.environ.get("NBDPLUG_LANE_CYCLES", "20"))


@pytest.fixture
def hp():
    h = Hotplug(in_process=True)
    yield h
    h.close()
    assert_kernel_clean()


def assert_kernel_clean():
    """No NBD device connected or holding partition nodes, no
    device-mapper target of ours (beyond what Hotplug.close checks:
    mounts, loop devices, state)."""
    for name in os.listdir("/sys/block"):
        if name.startswith("nbd"):
            assert not os.path.exists(f"/sys/block/{name}/pid"), name
            nodes = [n for n in os.listdir(f"/sys/block/{name}")
                     if n.startswith(name + "p")]
            assert nodes == [], nodes
    targets = run(["dmsetup", "ls"]).stdout
    assert "nbdplug-" not in targets, targets


@pytest.fixture
def files(tmp_path):
    files = tmp_path / "files"
    (files / "etc").mkdir(parents=True)
    (files / "etc" / "hostname").write_text("guest\n")
    (files / "blob.bin").write_bytes(os.urandom(300000))
    os.symlink("etc/hostname", files / "link")
    return files


@pytest.fixture
def gpt(tmp_path, files):
    return make_gpt(tmp_path / "gpt.raw", files=files)


def assert_kernel_partitions(disk, parts):
    """The kernel's own nodes, one per partition of LAYOUT, each at the
    table's offset and size (in /sys) and holding its bytes."""
    name = os.path.basename(disk)
    assert parts == {f"p{n}": f"{disk}p{n}" for n in (1, 2, 3)}
    for number, (start, length, fs) in enumerate(LAYOUT, 1):
        sys_dir = f"/sys/block/{name}/{name}p{number}"
        with open(f"{sys_dir}/start") as f:
            assert int(f.read()) * 512 == start * MiB
        with open(f"{sys_dir}/size") as f:
            assert int(f.read()) * 512 == length * MiB
        if not fs:
            assert read_dev(parts[f"p{number}"], 0, len(marker(number))) \
                == marker(number)


def test_kernel_nbd_gpt_mount_write_umount(hp, gpt, files, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "raw", "--via", "nbd", gpt, mnt)
    [entry] = hp.list()
    assert entry["via"] == "nbd" and entry["device"].startswith("/dev/nbd")
    assert_kernel_partitions(entry["device"], entry["partitions"])
    assert entry["mounts"] == [str(mnt)]
    assert (mnt / "etc" / "hostname").read_text() == "guest\n"
    assert (mnt / "blob.bin").read_bytes() == \
        (files / "blob.bin").read_bytes()
    data = os.urandom(100000)
    (mnt / "written").write_bytes(data)
    hp("umount", mnt)
    assert not os.path.ismount(mnt) and hp.list() == []
    hp("mount", "-f", "raw", "--readonly", gpt, mnt)
    assert (mnt / "written").read_bytes() == data
    hp("umount", mnt)


def test_kernel_partitions_every_time(tmp_path):
    """Attach's partition step on each connect of an NBD device to two
    images in turn, tables of their own: every partition of the image
    connected now has the kernel's node, at the table's offset and with
    its bytes, never a node left from the image before."""
    other = [(2, 4, None), (6, 10, None)]
    images = [(make_gpt(tmp_path / "a.raw"), LAYOUT),
              (make_gpt(tmp_path / "b.raw", other), other)]
    with served(images[0][0], "raw", readonly=True) as a, \
            served(images[1][0], "raw", readonly=True) as b:
        sockets = [urllib.parse.parse_qs(urllib.parse.urlsplit(
            s.uri).query)["socket"][0] for s in (a, b)]
        for cycle in range(CYCLES):
            layout = images[cycle % 2][1]
            watcher = Watcher()         # before the device exists
            dev = devices.nbd_connect(sockets[cycle % 2], True, set())
            record = {"device": dev, "via": "nbd", "readonly": True,
                      "dir": str(tmp_path)}
            try:
                partitions.map_partitions(record, lambda r: None, watcher)
                assert [(p["made"], p["start"], p["size"])
                        for p in record["partitions"]] == \
                    [("kernel", start * MiB, length * MiB)
                     for start, length, _ in layout], cycle
                for p, (_, _, fs) in zip(record["partitions"], layout):
                    n = p["number"]
                    if not fs:
                        assert read_dev(p["device"], 0, len(marker(n))) \
                            == marker(n), (cycle, n)
            finally:
                partitions.unmap_partitions(record)
                devices.nbd_disconnect(dev)
    assert_kernel_clean()


def test_loop_partitions_on_device_mapper(hp, gpt):
    """Where the kernel made no partition nodes (a loop device without
    partition scanning), dm-linear targets give each partition a device."""
    disk, parts = hp.attach("-f", "raw", "--readonly", "--via", "loop", gpt)
    assert disk.startswith("/dev/loop")
    assert sorted(parts) == ["p1", "p2", "p3"]
    assert all(p.startswith("/dev/mapper/nbdplug-") for p in parts.values())
    with open(gpt, "rb") as f:
        image = f.read()
    for number, (start, length, _) in enumerate(LAYOUT, 1):
        assert read_dev(parts[f"p{number}"], 0, length * MiB) == \
            image[start * MiB:(start + length) * MiB], number


def test_kill9_while_mounted_then_detach_all(hp, gpt, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "raw", gpt, mnt)
    [entry] = hp.list()
    kill9(entry["server-pid"])
    assert not hp.list()[0]["alive"]
    hp("detach", "--all")
    assert not os.path.ismount(mnt)
    assert hp.list() == []
    # hp's teardown checks /sys, /proc/mounts, losetup and dmsetup.


def test_cp_r_between_images(hp, gpt, files, tmp_path):
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
    hp("umount", src)
    hp("mount", "-f", "raw", "--readonly", target, dst)
    try:
        run(["diff", "-r", "--no-dereference", "-x", "lost+found",
             str(files), str(dst)])
    finally:
        hp("umount", dst)


def test_dm_linear_over_two_attached_devices(hp, tmp_path):
    images = []
    for i, size in enumerate((3 * MiB, 5 * MiB)):
        path = tmp_path / f"part{i}.raw"
        path.write_bytes(bytes([0x30 + i]) * (size // 2) + os.urandom(
            size // 2))
        images.append(str(path))
    devs = [hp.attach("-f", "raw", "--readonly", "--via", "nbd", img)[0]
            for img in images]
    assert all(d.startswith("/dev/nbd") for d in devs)
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


@pytest.fixture
def our_udev_rules():
    """hotplug/rules installed in the guest's /etc (private to the VM),
    and removed again so later tests see a stock udev."""
    rules = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "hotplug", "rules")
    names = os.listdir(rules)
    for name in names:
        run(["install", "-m", "644", os.path.join(rules, name),
             "/etc/udev/rules.d/"])
    run(["udevadm", "control", "--reload"])
    yield
    for name in names:
        os.unlink(os.path.join("/etc/udev/rules.d", name))
    run(["udevadm", "control", "--reload"])


def test_udev_rules_keep_blkid_away(our_udev_rules, hp, gpt):
    disk, parts = hp.attach("-f", "raw", "--via", "nbd", gpt)
    assert_kernel_partitions(disk, parts)
    # attach returned after udev had run its rules on each partition.
    props = run(["udevadm", "info", "--query=property", parts["p2"]]).stdout
    assert "NBDPLUG=1" in props and "UDISKS_IGNORE=1" in props
    assert "ID_FS_TYPE" not in props, props     # blkid never probed it
