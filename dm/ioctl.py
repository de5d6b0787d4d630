"""Reloading a device-mapper table in place: the kernel's ioctls
(<linux/dm-ioctl.h>) on /dev/mapper/control, for the live manager.

Creating and removing devices stays with dmsetup (table.py), which also
has udev make /dev/mapper/NAME.  A reload is load (into the inactive
slot), suspend, resume: three ioctls, made from the server's own process
many times a minute, so without a dmsetup process each time.  The calls
go through ctypes, which lets go of the GIL: a suspend waits for the NBD
requests in flight, and the server's threads must be free to answer them.
"""

import ctypes
import errno
import os
import struct

from nbdplug.errors import UsageError

CONTROL = "/dev/mapper/control"
VERSION = (4, 0, 0)         # what we need of the interface

# struct dm_ioctl: version[3], data_size, data_start, target_count,
# open_count, flags, event_nr, padding, dev, name[128], uuid[129], data[7]
HEADER = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16]
TARGET = struct.Struct("=QQiI16s")

TABLE_LOAD, TABLE_CLEAR, DEV_SUSPEND, DEV_STATUS = 9, 10, 6, 7

READONLY = 1 << 0
SUSPEND = 1 << 1
ACTIVE_PRESENT = 1 << 5
INACTIVE_PRESENT = 1 << 6
SKIP_LOCKFS = 1 << 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)


class DmError(UsageError):
    """A device-mapper ioctl failed; errno says why."""

    def __init__(self, message, code):
        super().__init__(message)
        self.errno = code


def _request(cmd):
    """_IOWR(0xfd, cmd, struct dm_ioctl)."""
    return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | cmd


def _targets(table):
    out = bytearray()
    for t in table.targets:
        params = " ".join(str(a) for a in t.args).encode() + b"\0"
        params += bytes(-(TARGET.size + len(params)) % 8)
        out += TARGET.pack(t.start, t.length, 0, TARGET.size + len(params),
                           t.kind.encode()) + params
    return bytes(out), len(table.targets)


class Device:
    """One device-mapper device, by name."""

    def __init__(self, name):
        self.name = name

    def _call(self, cmd, flags=0, data=b"", count=0, out=0):
        size = HEADER.size + max(len(data), out)
        buf = ctypes.create_string_buffer(size)
        buf[:HEADER.size] = HEADER.pack(
            *VERSION, size, HEADER.size, count, 0, flags, 0, 0, 0,
            self.name.encode(), b"", b"")
        buf[HEADER.size:HEADER.size + len(data)] = data
        fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
        try:
            if _libc.ioctl(fd, _request(cmd), buf) < 0:
                code = ctypes.get_errno()
                raise DmError(f"device-mapper {self.name}: "
                              f"{os.strerror(code)}", code)
        finally:
            os.close(fd)
        return HEADER.unpack_from(buf.raw), buf.raw

    def load(self, table, readonly=False):
        """Put `table` in the inactive slot (live at the next resume)."""
        data, count = _targets(table)
        self._call(TABLE_LOAD, READONLY if readonly else 0, data, count)

    def clear(self):
        """Drop the inactive table."""
        self._call(TABLE_CLEAR)

    def suspend(self):
        """Stop new I/O (queued in the kernel) and wait for what is in
        flight.  The filesystem above is not frozen: a reload changes
        where sectors are, never what they hold."""
        self._call(DEV_SUSPEND, SUSPEND | SKIP_LOCKFS)

    def resume(self):
        """Swap in the inactive table, if any, and let I/O flow again
        (suspending first if need be, again without freezing)."""
        self._call(DEV_SUSPEND, SKIP_LOCKFS)

    def status(self):
        """{"suspended", "active", "inactive", "readonly", "open"}."""
        header, _ = self._call(DEV_STATUS)
        flags = header[7]
        return {"suspended": bool(flags & SUSPEND),
                "active": bool(flags & ACTIVE_PRESENT),
                "inactive": bool(flags & INACTIVE_PRESENT),
                "readonly": bool(flags & READONLY), "open": header[6]}

    def exists(self):
        try:
            self.status()
            return True
        except DmError as e:
            if e.errno == errno.ENXIO:
                return False
            raise
