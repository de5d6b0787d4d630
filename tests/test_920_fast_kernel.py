"""The fast device in the kernel lane (real dm-mod, nbd.ko, loop): reads
equal qemu-img's for every format's plain and driver-only ranges; fio's
verified random writes with trims and zeroes through both paths, the
table growing as the driver allocates (reloads that never stall the
I/O), a snapshot's clusters never written in place; kill -9 of the
server under a mounted filesystem, restart, fsck clean; nothing left.

Every nbdkit start costs seconds under QEMU without KVM, so the reads
test serves all its images from one nbdkit (named exports) and builds
each fast device with the same manager code the server runs (read-only:
no pins or notes are needed); the write, stall and restart tests go
through `nbdplug attach --fast` / `mount` themselves."""

import contextlib
import errno
import fcntl
import glob
import json
import mmap
import os
import struct
import threading
import time

import pytest

from conftest import qemu_img_check_clean, qemu_io, run
from dm import manager, table as dmtable
from dm.ioctl import Device
from dm.manager import Manager
from hotplug import devices, fast
from nbdplug import create_image, open_image
from nbdplug.serve import nbdkit as server
from nbdplug.serve.exports import Export
from test_600_hotplug import Hotplug, kill9
from test_600_kernel import assert_kernel_clean

pytestmark = pytest.mark.kernel
MiB = 1 << 20
KiB = 1 << 10
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F


def no_loop_under(path):
    listing = json.loads(run(["losetup", "--list", "--json"]).stdout or
                         '{"loopdevices": []}')
    for dev in listing["loopdevices"]:
        assert str(path) not in (dev.get("back-file") or ""), dev


@pytest.fixture
def hp(tmp_path):
    h = Hotplug(in_process=True)
    yield h
    h.close()
    assert_kernel_clean()
    no_loop_under(tmp_path)


def qemu_img(*args):
    return run(["qemu-img", *[str(a) for a in args]])


def raw_bytes(image, fmt, snapshot=None):
    out = f"{image}.{snapshot or 'now'}.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw",
             *(["-l", f"snapshot.name={snapshot}"] if snapshot else []),
             image, out)
    with open(out, "rb") as f:
        data = f.read()
    os.unlink(out)
    return data


def build_images(d):
    """{name: (image, format)}: every case the issue names, with holes."""
    out = {}

    def qemu(name, fmt, opts, *commands, backing=None):
        image = d / f"{name}.{fmt}"
        argv = ["create", "-q", "-f", fmt] + (["-o", opts] if opts else [])
        if backing:
            argv += ["-b", backing.name, "-F", fmt]
        qemu_img(*argv, image, "8M")
        if commands:
            qemu_io(image, fmt, *commands)
        out[name] = (str(image), fmt)
        return image
    base = qemu("base", "qcow2", "", "write -P 0x10 0 8M")
    # v3, extended L2, over a backing file: data, a zeroed and a
    # compressed cluster, single subclusters; then a snapshot, after
    # which only what is written again is this image's alone.
    top = qemu("qcow2-v3", "qcow2", "extended_l2=on",
               "write -P 0x21 0 1M", "write -z 2M 64k",
               "write -c -P 0x22 3M 64k", "write -P 0x23 4100k 2k",
               backing=base)
    qemu_img("snapshot", "-c", "s1", top)
    qemu_io(top, "qcow2", "write -P 0x24 512k 64k")
    qemu("qcow2-v2", "qcow2", "compat=0.10", "write -P 0x31 1M 1M",
         "write -c -P 0x32 6M 64k")
    qemu("qcow", "qcow", "", "write -P 0x41 1M 1M", "write -P 0x42 5M 4k")
    qemu("vmdk-split", "vmdk", "subformat=twoGbMaxExtentSparse",
         "write -P 0x51 1M 1M")
    qemu("vmdk-flat", "vmdk", "subformat=monolithicFlat",
         "write -P 0x52 2M 64k")
    parent = qemu("vhd-dynamic", "vpc", "subformat=dynamic",
                  "write -P 0x61 0 1M", "write -P 0x62 5M 4k")
    child = d / "vhd-diff.vpc"
    create_image(str(child), "vpc", None, backing=parent.name,
                 backing_fmt="vpc")
    with open_image(str(child), "vpc", readonly=False) as disk:
        disk.pwrite(b"\x63" * 8192, 512 * KiB)
        disk.pwrite(b"\x64" * 4096, 6 * MiB)
    out["vhd-diff"] = (str(child), "vpc")
    return out


@contextlib.contextmanager
def fast_device(name, image, fmt, sock, tmp_path):
    """A read-only fast device of export `name`, built by the manager."""
    made = []
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(open_image(image, fmt, share=True))
        nbd = devices.nbd_connect(sock, True, set(), export=name)
        stack.callback(devices.nbd_disconnect, nbd)
        loops = {}
        for path in disk.files():
            loops[path] = devices.loop_attach(path, True)
            stack.callback(devices.loop_detach, loops[path])
        m = Manager(disk, str(tmp_path / f"{name}.ctl"))
        dm_name = f"nbdplug-test-{name}"
        stack.callback(dmtable.remove, dm_name)
        made.append(m.start(dm_name, nbd, loops, readonly=True))
        stack.callback(m.stop)
        dev = f"/dev/mapper/{dm_name}"
        assert Device(dm_name).status()["readonly"]
        sys_name = os.path.basename(os.path.realpath(dev))
        with open(f"/sys/block/{sys_name}/ro") as f:
            assert f.read().strip() == "1"
        yield dev, made[0]


def test_reads_equal_qemu_img_convert(tmp_path):
    assert devices.nbd_available() and devices.dm_available()
    images = build_images(tmp_path)
    sock = str(tmp_path / "s.sock")
    exports = [Export(name, image, fmt, writable=False)
               for name, (image, fmt) in images.items()]
    server.start_background(["nbdkit", "-r", "-U", sock, "-P", sock + ".pid"]
                            + server.exports_plugin_args(exports),
                            sock + ".pid")
    try:
        for name, (image, fmt) in images.items():
            want = raw_bytes(image, fmt)
            if name == "vhd-diff":      # qemu ignores a VHD's parent
                with open_image(image, fmt) as disk:
                    want = bytes(disk.read(disk.size, 0))
            with fast_device(name, image, fmt, sock, tmp_path) as (dev, st):
                with open(dev, "rb") as f:
                    assert_same(f.read(), want, name)
                # Both paths carry something, but where all is plain.
                if name not in ("base", "vmdk-flat"):
                    assert 0 < st["direct-bytes"] < len(want), (name, st)
                    assert st["direct-targets"] < st["targets"], (name, st)
    finally:
        server.stop(sock + ".pid")


def assert_same(got, want, what):
    if got != want:
        at = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b) \
            if len(got) == len(want) else min(len(got), len(want))
        raise AssertionError(f"{what}: first difference at byte {at} "
                             f"({len(got)} bytes read, {len(want)} wanted)")


def record_of(hp):
    [path] = glob.glob(os.path.join(hp.run_dir, "*", "state.json"))
    with open(path) as f:
        return json.load(f)


def settle(control, timeout=60):
    """Wait until the manager has taken in every request so far."""
    deadline = time.monotonic() + timeout
    while True:
        st = manager.request(control, "status")
        if not st["pending"]:
            time.sleep(2 * manager.INTERVAL)
            st2 = manager.request(control, "status")
            if not st2["pending"] and st2["reloads"] == st["reloads"]:
                return st2
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def fio(dev, *args):
    out = run(["fio", "--name=t", f"--filename={dev}", "--direct=1",
               "--ioengine=libaio", "--output-format=json", *args]).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def flushes(dev):
    """Flush requests `dev` has completed (/sys/block/*/stat)."""
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        return int(f.read().split()[15])


def block_op(dev, op, offset, length):
    fd = os.open(dev, os.O_WRONLY)
    try:
        fcntl.ioctl(fd, op, struct.pack("=QQ", offset, length))
    finally:
        os.close(fd)


def test_writes_trims_zeroes_promotion_and_snapshot(hp, tmp_path):
    image = tmp_path / "w.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "32M")
    qemu_io(image, "qcow2", "write -P 0x31 0 8M")
    qemu_img("snapshot", "-c", "s1", image)     # [0, 8M) shared from now
    qemu_io(image, "qcow2", "write -P 0x32 4M 2M")      # ours alone again
    snap = raw_bytes(image, "qcow2", "s1")
    dev, _ = hp.attach("--fast", "-f", "qcow2", image)
    control = record_of(hp)["control"]
    where = lambda o: manager.request(control, "where", offset=o)["where"]
    assert (where(0), where(4 * MiB), where(16 * MiB)) == \
        ("nbd", "direct", "nbd")
    before = manager.request(control, "status")
    # A flush on the device reaches both paths: the loop device (an
    # fsync of the file) and the NBD device (the driver's flush).
    rec = record_of(hp)
    [loop] = rec["loops"].values()
    counts = {d: flushes(d) for d in (loop, rec["nbd"])}
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert all(flushes(d) > n for d, n in counts.items()), counts
    # Verified random writes over all of it: shared clusters (copied on
    # write by the driver), holes (allocated by it), and its own
    # clusters (straight to the file); promotions meanwhile.
    job = fio(dev, "--rw=randwrite", "--bs=4k", "--iodepth=16",
              "--size=32M", "--verify=crc32c", "--verify_fatal=1",
              "--verify_state_save=0")
    assert job["error"] == 0
    during = settle(control)
    assert during["reloads"] >= before["reloads"] + 3, (before, during)
    # No request waited long while tables were swapped under it.
    assert job["write"]["clat_ns"]["max"] < 5e9, job["write"]["clat_ns"]
    assert during["direct-bytes"] > before["direct-bytes"]
    assert (where(0), where(16 * MiB)) == ("direct", "direct")
    with open(dev, "rb") as f:
        model = bytearray(f.read())
    # Trims and zeroes of whole clusters on both paths, and writes.
    for op, offset, length in ((BLKDISCARD, 1 * MiB, 256 * KiB),
                               (BLKZEROOUT, 6 * MiB, 128 * KiB),
                               (BLKDISCARD, 20 * MiB, 64 * KiB),
                               (BLKZEROOUT, 30 * MiB, 1 * MiB)):
        block_op(dev, op, offset, length)
        model[offset:offset + length] = bytes(length)
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)       # page aligned, as O_DIRECT wants
    try:
        for offset in (1 * MiB + 64 * KiB, 20 * MiB, 31 * MiB):
            buf[:] = bytes([offset >> 20]) * 4096
            os.pwrite(fd, buf, offset)
            model[offset:offset + 4096] = buf[:]
        os.fsync(fd)
    finally:
        os.close(fd)
    settle(control)
    with open(dev, "rb") as f:
        assert_same(f.read(), model, "the fast device")
    hp("detach", dev)
    qemu_img_check_clean(image)
    assert_same(raw_bytes(image, "qcow2"), model, "the image")
    assert_same(raw_bytes(image, "qcow2", "s1"), snap, "the snapshot")


class Writer(threading.Thread):
    """Writes, fsyncs and reads back 4 KiB blocks of a file until the
    `with` block ends; .ops done, .errors met."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.ops, self.errors = path, 0, []
        self.stop = threading.Event()

    def run(self):
        with open(self.path, "w+b") as f:
            while not self.stop.is_set():
                block = bytes([self.ops % 251]) * 4096
                at = (self.ops % 256) * 4096
                try:
                    os.pwrite(f.fileno(), block, at)
                    os.fsync(f.fileno())
                    if os.pread(f.fileno(), 4096, at) != block:
                        self.errors.append(f"block {at} read back wrong")
                except OSError as e:
                    self.errors.append(str(e))
                    return
                self.ops += 1

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.join()


def last_target_on(dm_name, dev):
    """The first sector of the live table's last target on `dev`."""
    rdev = os.stat(dev).st_rdev
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    lines = [line.split() for line in run(
        ["dmsetup", "table", dm_name]).stdout.splitlines()]
    return [int(f[0]) for f in lines if f[3] == want][-1]


def test_kill9_restart_fsck(hp, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    blob = os.urandom(3 * MiB)
    (files / "blob").write_bytes(blob)
    raw = tmp_path / "fs.raw"
    run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,"
         "lazy_journal_init=0", "-d", str(files), str(raw), "64M"])
    image = tmp_path / "fs.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, image)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "qcow2", "-o", "noatime", image, mnt)
    rec = record_of(hp)
    assert rec["via"] == "fast"
    (mnt / "late").write_bytes(b"late" * 100000)
    # A live restart (an upgrade) while a writer keeps going: its I/O
    # waits in the kernel while the servers change, and fails nowhere.
    with Writer(mnt / "busy") as writer:
        time.sleep(1)
        hp("restart", image)
        done = writer.ops
        time.sleep(1)
    assert writer.errors == [] and writer.ops > done > 0, writer.errors
    rec = record_of(hp)
    run(["sync"])
    settle(rec["control"])
    nbd_sector = last_target_on(rec["dm_name"], rec["nbd"])
    kill9(rec["server_pid"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    # What the image stores plainly reads on, kernel to kernel...
    assert (mnt / "blob").read_bytes() == blob
    fd = os.open(rec["device"], os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, 4096)
    try:
        # ...what only the driver serves fails until the restart.
        with pytest.raises(OSError) as failed:
            os.preadv(fd, [buf], nbd_sector * 512)
        assert failed.value.errno == errno.EIO
        hp("restart", image)
        os.preadv(fd, [buf], nbd_sector * 512)
    finally:
        os.close(fd)
    assert hp.list()[0]["alive"]
    (mnt / "after").write_bytes(b"after" * 100000)
    assert (mnt / "late").read_bytes() == b"late" * 100000
    hp("umount", mnt)
    qemu_img_check_clean(image)
    out = tmp_path / "after.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out)
    run(["e2fsck", "-fn", str(out)])
