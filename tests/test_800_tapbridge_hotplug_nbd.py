"""block-nbdplug run as libxl runs it (see test_800_tapbridge_hotplug):
the image attached through nbdplug (kernel NBD, or nbdplug's fallback
where the kernel has none, as here) becomes blkback's physical device."""

import json
import os
import sys

import pytest

from conftest import run

from test_800_tapbridge_hotplug import BE, BLOCK_NBDPLUG

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import hotplug, libxl_add_vbd, qcow2_with_data  # noqa: E402
from tbharness import odd_dir, xs  # noqa: E402,F401 (fixtures)

MiB = 1 << 20

# The `nbdplug` command the scripts find on PATH (with the dom0 verbs).
NBDPLUG = os.path.join(os.path.dirname(sys.executable), "nbdplug")


def attached():
    return json.loads(run([NBDPLUG, "list", "--output", "json"]).stdout)


@pytest.fixture
def detach_all():
    before = {e["device"] for e in attached()}
    yield
    for e in attached():
        if e["device"] not in before:
            run([NBDPLUG, "detach", e["device"]], check=False)


@pytest.mark.parametrize("mode", ["w", "r"])
def test_nbdplug_add_gives_blkback_a_device(xs, odd_dir, detach_all, mode):
    image = qcow2_with_data(odd_dir / "guest,1:x.qcow2")
    libxl_add_vbd(xs, f"qcow2:{image}", mode=mode,
                  script="/etc/xen/scripts/block-nbdplug")
    proc = hotplug(xs, BLOCK_NBDPLUG, "add")
    assert proc.returncode == 0, proc.stderr
    keys = xs.tree(BE)
    dev = keys["physical-device-path"]
    st = os.stat(dev)
    assert keys["physical-device"] == \
        f"{os.major(st.st_rdev):x}:{os.minor(st.st_rdev):x}"
    assert keys["hotplug-status"] == "connected"
    with open(dev, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x3c" * 65536
    (entry,) = [e for e in attached() if e["device"] == dev]
    assert entry["image"] == image and entry["format"] == "qcow2"
    assert entry["readonly"] == (mode == "r")
    # A second add changes nothing; remove detaches, once.
    assert hotplug(xs, BLOCK_NBDPLUG, "add").returncode == 0
    assert [e["device"] for e in attached()].count(dev) == 1
    for _ in range(2):
        proc = hotplug(xs, BLOCK_NBDPLUG, "remove")
        assert proc.returncode == 0, proc.stderr
    assert dev not in [e["device"] for e in attached()]


def test_nbdplug_add_failure_reports_and_attaches_nothing(
        xs, tmp_path, detach_all):
    before = attached()
    libxl_add_vbd(xs, f"qcow2:{tmp_path}/missing.qcow2",
                  script="/etc/xen/scripts/block-nbdplug")
    proc = hotplug(xs, BLOCK_NBDPLUG, "add")
    assert proc.returncode == 1
    assert xs.read(f"{BE}/hotplug-status") == "error"
    assert "missing.qcow2" in xs.read(f"{BE}/hotplug-error")
    assert xs.read(f"{BE}/physical-device") is None
    assert attached() == before


@pytest.mark.kernel
def test_nbdplug_add_gives_blkback_the_fast_device(xs, odd_dir, detach_all):
    """In the kernel lane: blkback's device is the fast device (device-
    mapper: what the image stores plainly goes kernel to kernel), over
    kernel NBD for the rest."""
    image = qcow2_with_data(odd_dir / "guest.qcow2")
    libxl_add_vbd(xs, f"qcow2:{image}",
                  script="/etc/xen/scripts/block-nbdplug")
    proc = hotplug(xs, BLOCK_NBDPLUG, "add")
    assert proc.returncode == 0, proc.stderr
    dev = xs.read(f"{BE}/physical-device-path")
    assert dev.startswith("/dev/mapper/nbdplug-")
    with open("/proc/devices") as f:
        dm_major = [int(line.split()[0]) for line in f
                    if line.split()[1:] == ["device-mapper"]][0]
    assert xs.read(f"{BE}/physical-device").startswith(f"{dm_major:x}:")
    (entry,) = [e for e in attached() if e["device"] == dev]
    assert entry["via"] == "fast" and entry["nbd"].startswith("/dev/nbd")
    with open(dev, "rb") as f:
        f.seek(MiB)
        assert f.read(65536) == b"\x3c" * 65536
    assert hotplug(xs, BLOCK_NBDPLUG, "remove").returncode == 0
    name = os.path.basename(entry["nbd"])
    assert not os.path.exists(f"/sys/block/{name}/pid")
    assert "nbdplug-" not in run(["dmsetup", "ls"]).stdout
