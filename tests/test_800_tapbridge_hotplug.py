"""The Xen hotplug scripts run as libxl runs them: argv [script, add|
remove], stdin /dev/null, XENBUS_PATH relative to dom0's home, and Xen's
own xenstore-read/-write (xenstore-utils) talking to the test xenstore
server."""

import os
import sys

import pytest

from conftest import REPO
from tapbridge.abi import BLKIF_OP_READ
from tapbridge.shm import ShmTransport

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "tapbridge"))
from tbharness import (BACKEND, Frontend, ShmDir, hotplug,  # noqa: E402
                       libxl_add_vbd, qcow2_with_data, sector_data,
                       vbd_backend, wait_for)
from tbharness import odd_dir, xs  # noqa: E402,F401 (fixtures)

SCRIPTS = os.path.join(REPO, "hotplug", "xen")
BLOCK_NBDPLUG = os.path.join(SCRIPTS, "block-nbdplug")
BLOCK_TAPBRIDGE = os.path.join(SCRIPTS, "block-tapbridge")
BE = BACKEND.format(domid=1, devid=51712)
MiB = 1 << 20


# --- block-tapbridge ---------------------------------------------------------
# The script hands the image to the running daemon, which opens it and
# answers; so these run `tapbridge serve-xen`'s backend in process.

def no_ring(domid, refs, order, port, persistent):
    raise AssertionError("no frontend here")


def test_tapbridge_add_resolves_the_target(xs, odd_dir):
    image = qcow2_with_data(odd_dir / "guest,1:x.qcow2")
    with vbd_backend(xs, no_ring) as vbd:
        libxl_add_vbd(xs, f"qcow2:{image}")
        wait_for(lambda: xs.read(f"{BE}/state") == "2", 10, "InitWait")
        proc = hotplug(xs, BLOCK_TAPBRIDGE, "add")
        assert proc.returncode == 0, proc.stderr
        keys = xs.tree(BE)
        assert keys["hotplug-status"] == "connected"
        assert keys["tapbridge-status"] == "opened"
        assert keys["physical-device-path"] == image
        assert keys["tapbridge-format"] == "qcow2"
        assert "physical-device" not in keys and "hotplug-error" not in keys
        assert keys["params"] == f"qcow2:{image}"        # verbatim
        assert vbd.devices[BE].disk.format_name == "qcow2"
        # A second add is a no-op; remove has nothing to undo, every time.
        assert hotplug(xs, BLOCK_TAPBRIDGE, "add").returncode == 0
        for _ in range(2):
            assert hotplug(xs, BLOCK_TAPBRIDGE, "remove").returncode == 0


@pytest.mark.parametrize("target,fmt", [
    ("tap:aio:{}", "raw"), ("tap2:raw:{}", "raw"), ("aio:{}", "raw")])
def test_tapbridge_add_takes_the_blktap_forms(xs, tmp_path, target, fmt):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(MiB))
    with vbd_backend(xs, no_ring):
        libxl_add_vbd(xs, target.format(image))
        proc = hotplug(xs, BLOCK_TAPBRIDGE, "add")
        assert proc.returncode == 0, proc.stderr
        assert xs.read(f"{BE}/tapbridge-format") == fmt
        assert xs.read(f"{BE}/physical-device-path") == str(image)


@pytest.mark.parametrize("target,message", [
    ("qcow2:{dir}/missing.qcow2", "missing.qcow2"),
    ("{dir}/disk.img", "format not recognised"),
    ("qcow2:{dir}/disk.img", "qcow2"),
    ("nosuchformat:{dir}/disk.img", "nosuchformat"),
])
def test_tapbridge_add_failures_say_why(xs, tmp_path, target, message):
    (tmp_path / "disk.img").write_bytes(bytes(MiB))
    with vbd_backend(xs, no_ring):
        libxl_add_vbd(xs, target.format(dir=tmp_path))
        proc = hotplug(xs, BLOCK_TAPBRIDGE, "add")
        assert proc.returncode == 1
        assert xs.read(f"{BE}/hotplug-status") == "error"
        error = xs.read(f"{BE}/hotplug-error")
        assert message in error and "\n" not in error, error
        assert "Traceback" not in proc.stderr


def test_tapbridge_add_without_the_daemon_says_so(xs, tmp_path):
    (tmp_path / "disk.img").write_bytes(bytes(MiB))
    libxl_add_vbd(xs, f"raw:{tmp_path}/disk.img")
    proc = hotplug(xs, BLOCK_TAPBRIDGE, "add", env={"TAPBRIDGE_WAIT": "1"})
    assert proc.returncode == 1
    assert "tapbridge serve-xen running" in xs.read(f"{BE}/hotplug-error")


def test_scripts_need_libxls_environment(xs):
    for script in (BLOCK_TAPBRIDGE, BLOCK_NBDPLUG):
        proc = hotplug(xs, script, "add", xenbus_path=None)
        assert proc.returncode == 2 and "XENBUS_PATH" in proc.stderr
        proc = hotplug(xs, script, "frobnicate")
        assert proc.returncode == 2 and "usage" in proc.stderr


def test_xl_attach_sequence_with_tapbridge(xs, tmp_path, odd_dir):
    """libxl's order: backend dir, wait for InitWait, run add, frontend
    connects; the guest then reads the image through the ring."""
    image = odd_dir / "disk.raw"
    image.write_bytes(sector_data(0, 2 * MiB // 512, 4))
    shm = ShmDir(tmp_path / "shm", 8)
    guest = Frontend(shm, 0)
    # Shared memory stands in for the guest's granted pages.
    with vbd_backend(xs, lambda domid, refs, order, port, persistent:
                     ShmTransport(shm.path, order, persistent)):
        be, fe = libxl_add_vbd(xs, f"raw:{image}")
        wait_for(lambda: xs.read(f"{be}/state") == "2", 10, "InitWait")
        proc = hotplug(xs, BLOCK_TAPBRIDGE, "add")
        assert proc.returncode == 0, proc.stderr
        xs.write_all({f"{fe}/ring-ref": 9, f"{fe}/event-channel": 4,
                      f"{fe}/protocol": "x86_64-abi", f"{fe}/state": 3})
        wait_for(lambda: xs.read(f"{be}/state") == "4", 10, "Connected")
        assert xs.read(f"{be}/sectors") == str(2 * MiB // 512)
        guest.req(BLKIF_OP_READ, 1, 8, [(2, 0, 7)])
        guest.push()
        assert guest.get(1) == [(1, BLKIF_OP_READ, 0)]
        assert shm.page(2) == sector_data(8, 8, 4)
        xs.write_all({f"{be}/online": 0, f"{be}/state": 5})
        xs.write(f"{fe}/state", 6)
        wait_for(lambda: xs.read(f"{be}/state") == "6", 10, "Closed")
        assert hotplug(xs, BLOCK_TAPBRIDGE, "remove").returncode == 0
