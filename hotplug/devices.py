"""The kernel objects behind an attachment: NBD devices, loop devices,
an nbdfuse mount, device-mapper targets.  Each maker returns what it made
and each remover tolerates an object that is already gone."""

import contextlib
import fcntl
import os
import stat
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


def nbd_connect(socket, readonly, taken, export=None):
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
        if export is not None:
            argv += ["-N", export]
        if readonly:
            argv.append("-readonly")
        if not _first_netns():
            # The kernel's nbd netlink family exists only in the first
            # network namespace; the ioctls work in any.
            argv.append("-nonetlink")
        try:
            run(argv, "nbd-client")
            return dev
        except UsageError as e:
            last = e
    raise last or UsageError("no free /dev/nbd device (modprobe nbd "
                             "nbds_max=N for more)")


def _first_netns():
    try:
        return os.stat("/proc/self/ns/net").st_ino == \
            os.stat("/proc/1/ns/net").st_ino
    except OSError:
        return True


def nbd_disconnect(dev):
    subprocess.run(["nbd-client", "-d", dev], capture_output=True)
    # The driver keeps a disconnected disk's partition nodes until its
    # next open, which re-reads the (now empty) table: open it now, so no
    # node of this image is left in /sys for the next user to trust.
    with contextlib.suppress(OSError):
        os.close(os.open(dev, os.O_RDONLY | os.O_CLOEXEC))


# --- partitions the kernel makes ------------------------------------------

def uevent_seqnum():
    """The sequence number of the kernel's latest uevent."""
    with open("/sys/kernel/uevent_seqnum") as f:
        return int(f.read())


def rescan_partitions(dev):
    """Have the kernel parse `dev`'s partition table now.  Returns the
    uevent sequence number from just before (the partitions it adds are
    announced after it), or None if the kernel would not.

    The scan the kernel does by itself on the first open after NBD
    connects is not enough: the driver asks for it before it sets the
    size, so an open in between (udev's, say) scans an empty disk and
    nothing scans again.  The disk is locked as systemd's block device
    locking asks, so udev has finished probing it and starts no probe
    until we are done: a partition open for a probe would make the
    kernel refuse (EBUSY)."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        seqnum = uevent_seqnum()
        try:
            fcntl.ioctl(fd, BLKRRPART)
        except OSError:     # EINVAL: no partition support; EBUSY: in use
            return None
        return seqnum
    finally:
        os.close(fd)        # read-only: no inotify event for udev


def kernel_partitions(dev):
    """{number: (node, start, size)} of the partitions the kernel made
    for `dev` (bytes, from /sys)."""
    name = sys_name(dev)
    out = {}
    for entry in os.listdir(f"/sys/block/{name}"):
        base = f"/sys/block/{name}/{entry}/"
        if os.path.exists(base + "partition"):
            number, start, size = (int(_read(base + key)) for key in
                                   ("partition", "start", "size"))
            out[number] = (f"/dev/{entry}", start * 512, size * 512)
    return out


def _read(path):
    with open(path) as f:
        return f.read()


@contextlib.contextmanager
def private_node(dev):
    """A node of our own for block device `dev`, for libparted: it opens
    the disk read-write (and every partition node, to flush them), and
    udev answers a write-close of a disk's node by re-reading its
    partition table, dropping and re-adding the partitions behind our
    back.  udev watches only its own nodes, not this one."""
    path = f"/dev/.nbdplug-{os.getpid()}-{sys_name(dev)}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)     # left by a crashed process with our pid
    os.mknod(path, 0o600 | stat.S_IFBLK, os.stat(dev).st_rdev)
    try:
        yield path
    finally:
        os.unlink(path)


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

def loop_attach(path, readonly, offset=0, size=None, options=()):
    if not os.path.exists("/dev/loop-control"):
        subprocess.run(["modprobe", "loop"], capture_output=True)
    argv = ["losetup", "--find", "--show", *options]
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
    """Is device-mapper here (loading its module if it must)?"""
    if not os.path.exists("/dev/mapper/control"):
        subprocess.run(["modprobe", "dm-mod"], capture_output=True)
    with contextlib.suppress(OSError):
        return os.path.exists("/dev/mapper/control") and subprocess.run(
            ["dmsetup", "version"], capture_output=True).returncode == 0
    return False
