"""attach / mount / umount / list / detach on this kernel (nbdfuse + loop,
partitions mapped from the table pyparted reads), and that nothing is
left behind: not after detach, not after 100 cycles, not after kill -9.

Each test has its own state directory (NBDPLUG_RUN_DIR), so detach --all
only ever touches what the test attached.  The kernel-NBD versions of
these run in the kernel lane (test_600_kernel.py)."""

import contextlib
import io
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

import parted
import pytest

import hotplug.cli
from conftest import REPO, nbdplug, run, served
from nbdplug.formats import ram

MiB = 1 << 20
HOTPLUG = [sys.executable, "-m", "hotplug.cli"]
# (start MiB, length MiB, filesystem or None); a GPT like an installer's.
LAYOUT = [(1, 8, None), (9, 16, "ext4"), (25, 6, None)]
CYCLES = int(os.environ.get("NBDPLUG_CYCLES", "100"))


def make_gpt(path, layout=LAYOUT, size=32 * MiB, files=None):
    """A raw image with a GPT made by pyparted, a marker at the start of
    each partition without a filesystem, and ext4 where asked."""
    with open(path, "wb") as f:
        f.truncate(size)
    dev = parted.getDevice(str(path))
    disk = parted.freshDisk(dev, "gpt")
    per_mib = MiB // dev.sectorSize
    for start, length, _ in layout:
        geo = parted.Geometry(dev, start=start * per_mib,
                              length=length * per_mib)
        disk.addPartition(parted.Partition(
            disk=disk, type=parted.PARTITION_NORMAL, geometry=geo),
            constraint=parted.Constraint(exactGeom=geo))
    disk.commit()
    for number, (start, length, fs) in enumerate(layout, 1):
        if fs:
            argv = [f"mkfs.{fs}", "-q", "-F", "-E", f"offset={start * MiB}"]
            if files:
                argv += ["-d", str(files)]
            run(argv + [str(path), f"{length}M"])
        else:
            with open(path, "r+b") as f:
                f.seek(start * MiB)
                f.write(marker(number))
    return str(path)


def marker(number):
    return f"partition {number} ".encode() * 32


class Hotplug:
    """The nbdplug dom0 verbs with a private state directory.

    in_process: run the command's main() in this process (its output and
    exit status captured alike) rather than a new interpreter: in the
    kernel lane, under QEMU without KVM, each Python start costs seconds.
    """

    def __init__(self, in_process=False):
        # Short: socket paths under it must fit in 108 bytes.
        self.run_dir = tempfile.mkdtemp(prefix="nbdplug-run.")
        self.env = dict(os.environ, NBDPLUG_RUN_DIR=self.run_dir)
        self.in_process = in_process

    def __call__(self, *args, check=True):
        argv = [str(a) for a in args]
        if not self.in_process:
            return run(HOTPLUG + argv, check=check, cwd=REPO, env=self.env)
        out, err = io.StringIO(), io.StringIO()
        with patched_environ(NBDPLUG_RUN_DIR=self.run_dir), \
                contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            try:
                status = hotplug.cli.main(argv)
            except SystemExit as e:     # argparse's usage errors
                status = e.code
        proc = subprocess.CompletedProcess(argv, status, out.getvalue(),
                                           err.getvalue())
        if check and status != 0:
            raise AssertionError(f"nbdplug {argv} exited {status}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def attach(self, *args):
        lines = self("attach", *args).stdout.splitlines()
        parts = dict(line.split() for line in lines[1:])
        return lines[0], parts

    def list(self):
        return json.loads(self("list", "--output=json").stdout)

    def close(self):
        self("detach", "--all")
        assert_clean(self.run_dir)
        shutil.rmtree(self.run_dir)


@contextlib.contextmanager
def patched_environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


@pytest.fixture
def hp():
    h = Hotplug()
    yield h
    h.close()


@pytest.fixture
def gpt(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "hello.txt").write_text("hello from the guest\n")
    return make_gpt(tmp_path / "gpt.raw", files=files)


def assert_clean(run_dir):
    """No loop device, FUSE or mount of ours, no NBD connected to our
    sockets, no state left (checked in /sys, /proc/mounts and losetup)."""
    with open("/proc/mounts") as f:
        mounts = f.read()
    assert run_dir not in mounts, mounts
    loops = run(["losetup", "--list", "--json"]).stdout
    for dev in json.loads(loops or '{"loopdevices": []}')["loopdevices"]:
        assert run_dir not in (dev.get("back-file") or ""), dev
    for name in os.listdir("/sys/block"):
        backing = f"/sys/block/{name}/loop/backing_file"
        if os.path.exists(backing):
            with open(backing) as f:
                assert run_dir not in f.read(), name
    leftovers = [n for n in os.listdir(run_dir) if n != ".lock"]
    assert leftovers == [], leftovers


def one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nbdplug: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def kill9(pid):
    """SIGKILL `pid` and wait until it is gone (on a pidfd)."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert select.select([fd], [], [], 10)[0], f"{pid} survived"
    finally:
        os.close(fd)


def read_dev(dev, offset, length):
    with open(dev, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_attach_maps_every_partition(hp, gpt):
    disk, parts = hp.attach("-f", "raw", gpt)
    assert sorted(parts) == ["p1", "p2", "p3"]
    with open(gpt, "rb") as f:
        image = f.read()
    assert read_dev(disk, 0, 2 * MiB) == image[:2 * MiB]
    for number, (start, length, fs) in enumerate(LAYOUT, 1):
        dev = parts[f"p{number}"]
        with open(dev, "rb") as f:
            assert os.lseek(f.fileno(), 0, os.SEEK_END) == length * MiB
        if not fs:
            assert read_dev(dev, 0, 4096) == image[start * MiB:][:4096]
    [entry] = hp.list()
    assert entry["device"] == disk and entry["alive"]
    assert entry["partitions"] == parts
    hp("detach", disk)
    assert hp.list() == []
    assert_clean(hp.run_dir)


def test_attach_names_that_are_not_files(hp, gpt):
    """An NBD URI and a RAM disk are attached as given (not made into
    paths): partitions and bytes as from the file."""
    with open(gpt, "rb") as f:
        image = f.read()
    with served(gpt, "raw", readonly=True) as srv:
        disk, parts = hp.attach("--readonly", srv.uri)
        assert sorted(parts) == ["p1", "p2", "p3"]
        assert read_dev(parts["p3"], 0, 4096) == image[25 * MiB:][:4096]
        [entry] = hp.list()
        assert entry["image"] == srv.uri
        hp("detach", disk)
    name = f"hp{os.getpid()}"
    nbdplug("create", "-q", "-f", "ram", name, str(len(image)))
    try:
        with open(ram.path_for(name), "r+b") as f:
            f.seek(ram.DATA_OFFSET)
            f.write(image)
        disk, parts = hp.attach(f"ram:{name}")
        assert read_dev(disk, 0, len(image)) == image
        assert read_dev(parts["p1"], 0, 4096) == image[MiB:][:4096]
        [entry] = hp.list()
        assert entry["image"] == f"ram:{name}" and entry["format"] == "ram"
        hp("detach", f"ram:{name}")
    finally:
        nbdplug("rm-ram", name)


def test_mount_write_umount(hp, gpt, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = hp("mount", "-f", "raw", gpt, mnt).stdout
    assert "mounted on" in out
    assert (mnt / "hello.txt").read_text() == "hello from the guest\n"
    with open("/proc/mounts") as f:
        line = [ln for ln in f if f" {mnt} " in ln][0]
    assert "nodev" in line and "nosuid" in line
    (mnt / "new.txt").write_text("written through nbdplug\n")
    hp("umount", mnt)
    assert hp.list() == [] and not os.path.ismount(mnt)
    hp("mount", "-f", "raw", "--readonly", gpt, mnt)
    try:
        assert (mnt / "new.txt").read_text() == "written through nbdplug\n"
    finally:
        hp("umount", mnt)


def test_filesystem_on_the_whole_disk(hp, tmp_path):
    """No partition table, a filesystem from sector 0 (what libparted
    calls a "loop" label): no partition devices; mount uses the disk."""
    files = tmp_path / "files"
    files.mkdir()
    (files / "whole.txt").write_text("no table here\n")
    image = tmp_path / "whole.raw"
    run(["mkfs.ext4", "-q", "-d", files, image, "16M"])
    disk, parts = hp.attach("-f", "raw", "--readonly", image)
    assert parts == {}
    with open(image, "rb") as f:
        assert read_dev(disk, 0, 1 << 20) == f.read(1 << 20)
    hp("detach", disk)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "raw", "--readonly", image, mnt)
    try:
        assert (mnt / "whole.txt").read_text() == "no table here\n"
        [entry] = hp.list()
        assert entry["partitions"] == {}
    finally:
        hp("umount", mnt)


def test_partitions_every_time(hp, gpt):
    """CYCLES attach/detach cycles: all three partitions, right bytes."""
    for cycle in range(CYCLES):
        disk, parts = hp.attach("-f", "raw", "--readonly", gpt)
        assert sorted(parts) == ["p1", "p2", "p3"], (cycle, parts)
        assert read_dev(parts["p3"], 0, 64) == marker(3)[:64], cycle
        hp("detach", gpt)
    assert_clean(hp.run_dir)


@pytest.mark.parametrize("victim", ["server", "fuse"])
def test_kill9_then_detach_all(hp, gpt, tmp_path, victim):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    hp("mount", "-f", "raw", gpt, mnt)
    [entry] = hp.list()
    record = json.load(open(next(
        os.path.join(hp.run_dir, d, "state.json")
        for d in os.listdir(hp.run_dir) if not d.startswith("."))))
    kill9(record["server_pid" if victim == "server" else "fuse_pid"])
    [entry] = hp.list()
    assert not entry["alive"]
    assert "DEAD" in hp("list").stdout
    hp("detach", "--all")
    assert not os.path.ismount(mnt)
    assert_clean(hp.run_dir)


def test_locks_and_force_share(hp, gpt):
    disk, _ = hp.attach("-f", "raw", gpt)
    one_line_error(hp("attach", "-f", "raw", gpt, check=False),
                   "already attached", disk)
    proc = run(["qemu-io", "-f", "raw", "-c", "write 0 512", gpt],
               check=False)
    assert proc.returncode != 0 and "lock" in proc.stderr
    ro, parts = hp.attach("-f", "raw", "--readonly", "--force-share", gpt)
    assert read_dev(parts["p1"], 0, 64) == marker(1)[:64]
    assert len(hp.list()) == 2


def test_bad_input_leaves_nothing(hp, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(16 * MiB)
    one_line_error(hp("mount", "-f", "raw", blank, mnt, check=False),
                   "no partition table")
    two = make_gpt(tmp_path / "two.raw", [(1, 8, "ext4"), (9, 8, "ext4")],
                   size=20 * MiB)
    one_line_error(hp("mount", "-f", "raw", two, mnt, check=False),
                   "several partitions", "--partition", "p1 (ext4", "p2")
    one_line_error(hp("mount", "-f", "raw", two, tmp_path / "nope",
                      check=False), "no such directory")
    one_line_error(hp("mount", "-f", "raw", "--partition", "7", two, mnt,
                      check=False), "no partition 7")
    assert hp.list() == []
    hp("mount", "-f", "raw", "--partition", "2", two, mnt)
    one_line_error(hp("mount", "-f", "raw", "--partition", "1", two, mnt,
                      check=False), "already")
    other = make_gpt(tmp_path / "other.raw")
    one_line_error(hp("mount", "-f", "raw", other, mnt, check=False),
                   "already mounted")
    one_line_error(hp("umount", tmp_path, check=False), "not mounted")
    one_line_error(hp("detach", two, check=False), "umount it first")
    one_line_error(hp("attach", "-f", "raw", tmp_path / "missing.raw",
                      check=False), "missing.raw")
    assert len(hp.list()) == 1
    hp("umount", mnt)
    assert hp.list() == []


def test_nbdplug_core_never_imports_hotplug():
    code = ("import sys, nbdplug.cli, nbdplug.opener; "
            "bad = {'hotplug', 'pyudev', 'parted', 'tqdm'} & "
            "{m.split('.')[0] for m in sys.modules}; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
