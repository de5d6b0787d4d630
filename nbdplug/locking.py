"""Image locks that qemu understands, and that qemu's locks stop.

qemu (block/file-posix.c) describes who uses an image with open-file-
description (OFD) read locks on single bytes: byte 100 + bit for each
permission a user holds, byte 200 + bit for each permission it refuses to
share with others.  A newcomer first takes its own bytes, then asks the
kernel (F_OFD_GETLK) whether anyone else holds a byte that conflicts:
200 + bit for each permission it wants, 100 + bit for each it refuses to
share.  Lock-then-test means two racing openers may both fail, never both
succeed.  We take the same bytes, so qemu-img will not write an image we
serve read-write, and we will not serve one that qemu is writing.

The lock lives on a file description of its own, held for as long as the
Disk is open: it goes away with the process that serves the image (nbdkit
running our plugin), whatever way that process ends.
"""

import errno
import fcntl
import os
import struct

# Permission bits (qemu's BLK_PERM_*), named as qemu's messages name them.
CONSISTENT_READ = 0
WRITE = 1
WRITE_UNCHANGED = 2
RESIZE = 3
PERM_NAMES = {CONSISTENT_READ: "consistent read", WRITE: "write",
              WRITE_UNCHANGED: "write unchanged", RESIZE: "resize"}

PERM_BASE = 100
SHARED_BASE = 200

# struct flock on Linux x86-64 and arm64: short l_type, short l_whence,
# off_t l_start, off_t l_len, pid_t l_pid (0 for OFD locks), padded.
_FLOCK = struct.Struct("@hhqqi4x")

# Filesystems without byte-range locks: go on unlocked, as qemu's
# locking=auto does.
_NO_LOCKS = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def wanted(readonly, share):
    """(perms held, perms not shared) for an opener, as qemu asks them.

    Read-write: read, write and resize, sharing neither write nor resize.
    Read-only: a consistent read, refusing writers unless `share`
    (qemu's -U/--force-share, which takes no exclusions at all).
    """
    if not readonly:
        return {CONSISTENT_READ, WRITE, RESIZE}, {WRITE, RESIZE}
    if share:
        return {CONSISTENT_READ}, set()
    return {CONSISTENT_READ}, {WRITE, RESIZE}


class ImageLock:
    """qemu-compatible locks on one image file; release() drops them."""

    def __init__(self, path, readonly, share=False):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._acquire(*wanted(readonly, share))
        except BaseException:
            self.release()
            raise

    def _acquire(self, perms, unshared):
        try:
            for bit in perms:
                self._set(PERM_BASE + bit, fcntl.F_RDLCK)
            for bit in unshared:
                self._set(SHARED_BASE + bit, fcntl.F_RDLCK)
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return
            raise
        for bit in sorted(perms):
            if self._held_by_other(SHARED_BASE + bit):
                raise Conflict(self.path, PERM_NAMES[bit], shared=False)
        for bit in sorted(unshared):
            if self._held_by_other(PERM_BASE + bit):
                raise Conflict(self.path, PERM_NAMES[bit], shared=True)

    def _set(self, byte, kind):
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK,
                    _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))

    def _held_by_other(self, byte):
        """Would a write lock on `byte` conflict with another opener's?"""
        out = fcntl.fcntl(self.fd, fcntl.F_OFD_GETLK,
                          _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0))
        return _FLOCK.unpack(out)[0] != fcntl.F_UNLCK

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)      # closing the description drops its locks
            self.fd = -1


class Conflict(OSError):
    """Another process holds the image in a way we may not share."""

    def __init__(self, path, perm, shared):
        what = f"shared \"{perm}\"" if shared else f"\"{perm}\""
        super().__init__(
            errno.EBUSY, f"failed to get {what} lock: the image is in use "
            "by another process (read-only access: --readonly "
            "--force-share)", path)
