"""The kernel objects behind an attachment: NBD devices, loop devices,
an nbdfuse mount, device-mapper targets.  Each maker returns what it made
and each remover tolerates an object that is already gone."""

import contextlib
import errno
import fcntl
import os
import subprocess
import time

from nbdplug.errors import UsageError

from . import procs

BLKRRPART = 0x125F      # <linux/fs.h>: re-read the partition table


def run(argv, what=None):
    """Run a tool; its last stderr line becomes a one-line UsageError."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise UsageError(f"{what or argv[0]}: " + (
            lines[-1] if lines else f"exit status {proc.returncode}"))
    return proc.stdout


def sys_name(dev):
    """'/dev/nbd0' → 'nbd0'."""
    return os.path.basename(os.path.realpath(dev))


# --- kernel NBD -----------------------------------------------------------

def nbd_available():
    """Is kernel NBD here (loading the module if it must)?"""
    if not os.path.exists("/sys/block/nbd0"):
        subprocess.run(["modprobe", "nbd"], capture_output=True)
    return os.path.exists("/sys/block/nbd0")


def nbd_connected(dev):
    return os.path.exists(f"/sys/block/{sys_name(dev)}/pid")


def nbd_connect(socket, readonly, taken):
    """Connect a free /dev/nbdN to the server on `socket`; its path.

    The caller holds the run-directory lock, so no other attach of ours
    picks the same device; `taken` are devices our records hold.  Other
    tools may still race us: the kernel refuses a busy device, and we go
    on to the next one.
    """
    names = sorted((n for n in os.listdir("/sys/block")
                    if n.startswith("nbd")), key=lambda n: int(n[3:]))
    last = None
    for name in names:
        dev = f"/dev/{name}"
        if dev in taken or nbd_connected(dev):
            continue
        argv = ["nbd-client", "-unix", socket, dev, "-b", "512"]
        if readonly:
            argv.append("-readonly")
        try:
            run(argv, "nbd-client")
            return dev
        except UsageError as e:
            last = e
    raise last or UsageError("no free /dev/nbd device (modprobe nbd "
                             "nbds_max=N for more)")


def nbd_disconnect(dev):
    subprocess.run(["nbd-client", "-d", dev], capture_output=True)


def reread_partitions(dev):
    """Ask the kernel to scan the partition table now (synchronously);
    a kernel or device that cannot is not an error: we map them.  The
    kernel refuses (EBUSY) while udev still holds the new disk for its
    first probe, so that refusal is retried for a bounded time."""
    deadline = time.monotonic() + 10
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while True:
            try:
                fcntl.ioctl(fd, BLKRRPART)
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    return
            time.sleep(0.05)
    finally:
        os.close(fd)


# --- nbdfuse --------------------------------------------------------------

def fuse_start(socket, mountdir, readonly):
    """Serve the NBD export as the file mountdir/disk with nbdfuse;
    returns (pid, start time) once it is ready (it writes its pidfile)."""
    os.makedirs(mountdir, exist_ok=True)
    pidfile = mountdir + ".pid"
    argv = ["nbdfuse", "-P", pidfile]
    if readonly:
        argv.append("-r")
    argv += [os.path.join(mountdir, "disk"), "--unix", socket]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    # nbdfuse writes its pidfile (no newline) once the FUSE mount serves;
    # it stays in the foreground, so an exit before that is a failure.
    deadline = time.monotonic() + 30
    while not (os.path.ismount(mountdir) and os.path.getsize(pidfile)
               if os.path.exists(pidfile) else False):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            err = proc.communicate()[1].strip().splitlines()
            raise UsageError("nbdfuse: " + (err[-1] if err else
                                            "did not start serving"))
        time.sleep(0.005)
    proc.stderr.close()
    return proc.pid, procs.start_time(proc.pid)


def mounted(path):
    """Is something mounted on `path`?  (From the mount table: a FUSE
    mount whose server died fails stat, so os.path.ismount misses it.)"""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def fuse_stop(mountdir, pid, started):
    if mounted(mountdir):
        if subprocess.run(["fusermount3", "-u", mountdir],
                          capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", mountdir],
                           capture_output=True)
    if pid and not procs.wait_exit(pid, 10):
        procs.stop(pid, started)


# --- loop -----------------------------------------------------------------

def loop_attach(path, readonly, offset=0, size=None):
    if not os.path.exists("/dev/loop-control"):
        subprocess.run(["modprobe", "loop"], capture_output=True)
    argv = ["losetup", "--find", "--show"]
    if readonly:
        argv.append("--read-only")
    if offset:
        argv += ["--offset", str(offset)]
    if size is not None:
        argv += ["--sizelimit", str(size)]
    return run(argv + [path], "losetup").strip()


def drop_partitions(dev):
    """Remove partition nodes added by hand (parted's BLKPG calls) on a
    loop device we do not let the kernel scan: they would outlive the
    loop device's detach and show another image's offsets later."""
    subprocess.run(["partx", "--delete", dev], capture_output=True)


def loop_detach(dev):
    subprocess.run(["losetup", "--detach", dev], capture_output=True)


# --- device-mapper --------------------------------------------------------

def dm_available():
    with contextlib.suppress(OSError):
        return os.path.exists("/dev/mapper/control") and subprocess.run(
            ["dmsetup", "version"], capture_output=True).returncode == 0
    return False
