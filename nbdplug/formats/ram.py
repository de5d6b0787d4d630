"""ram: a named disk in shared memory that several servers use at once.

`ram:NAME` is the file /dev/shm/nbdplug/NAME: a 4 KiB header (magic,
version, size), then the guest bytes.  Every opener (nbdkit instances,
tapbridge) reads and writes the same tmpfs pages, so a write through one
is seen by all the others at once; nothing is cached, so multi-conn is
safe.  It lives until `nbdplug rm-ram NAME` (or a reboot).

The bytes are read and written with pread/pwrite on the file rather
than through a shared mapping: on tmpfs, touching a mapping allocates a
page even to read a hole, and once tmpfs is full the next touch kills
the server with SIGBUS, where pwrite returns ENOSPC.  Trim punches holes
(the memory goes back), and extents come from SEEK_DATA/SEEK_HOLE.

Otherwise this is raw, past the header: RamDisk is a RawDisk over the
file's data window.
"""

import os
import re

from nbdplug.disk import FormatSpec
from nbdplug.errors import CorruptImage, UnsupportedFeature, UsageError
from nbdplug.hostfile import HostFile
from nbdplug.layout import Layout
from .raw import RawDisk

FORMAT = "ram"
RAM_DIR = "/dev/shm/nbdplug"
PREFIX = "ram:"

HEADER = Layout("<", "ram header", "magic:8s version:I reserved:I size:Q")
MAGIC = b"NBDPLRAM"
VERSION = 1
DATA_OFFSET = 4096          # page aligned data, header alone in page 0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


def path_for(name):
    """The shared-memory file of the RAM disk `name` (or `ram:name`)."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    if not _NAME.match(name):
        raise UsageError(f"RAM disk name {name!r}: use up to 64 letters, "
                         "digits, '.', '_' or '-', not starting with a "
                         "punctuation mark")
    return os.path.join(RAM_DIR, name)


def remove(name):
    """Delete a RAM disk; servers that have it open keep it until they
    close it."""
    path = path_for(name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        raise UsageError(f"no RAM disk named {name!r}") from None


class _Window:
    """The guest bytes of a RAM disk file: its HostFile, shifted past the
    header, as RawDisk uses a file."""

    direct = False
    is_block = False

    def __init__(self, file, size):
        self.file = file
        self.path = file.path
        self._size = size

    def size(self):
        return self._size

    def pread(self, buf, offset):
        self.file.pread(buf, DATA_OFFSET + offset)

    def pwrite(self, buf, offset):
        self.file.pwrite(buf, DATA_OFFSET + offset)

    def flush(self):
        self.file.flush()

    def punch(self, offset, length):
        self.file.punch(DATA_OFFSET + offset, length)

    def zero_range(self, offset, length):
        self.file.zero_range(DATA_OFFSET + offset, length)

    def write_zeroes(self, offset, length):
        self.file.write_zeroes(DATA_OFFSET + offset, length)

    def next_data(self, offset):
        return min(self.file.next_data(DATA_OFFSET + offset),
                   DATA_OFFSET + self._size) - DATA_OFFSET

    def next_hole(self, offset):
        return min(self.file.next_hole(DATA_OFFSET + offset),
                   DATA_OFFSET + self._size) - DATA_OFFSET

    def close(self):
        self.file.close()


class RamDisk(RawDisk):
    format_name = FORMAT
    can_multi_conn = True   # nothing cached: every opener sees one memory
    host_base = DATA_OFFSET

    def __init__(self, file, size, readonly):
        super().__init__(_Window(file, size), readonly)

    @classmethod
    def probe(cls, file):
        return bytes(file.read(len(MAGIC), 0)) == MAGIC

    @classmethod
    def open(cls, path, readonly, ctx):
        file = ctx.open_file(path, readonly)
        try:
            hdr = HEADER.unpack_from(file.read(HEADER.size, 0))
            if hdr.magic != MAGIC:
                raise CorruptImage(path, FORMAT, "not an nbdplug RAM disk",
                                   "magic")
            if hdr.version != VERSION:
                raise UnsupportedFeature(path, FORMAT, f"RAM disk version "
                                         f"{hdr.version}", "version")
            if DATA_OFFSET + hdr.size != file.size():
                raise CorruptImage(path, FORMAT, f"size {hdr.size} does not "
                                   "match the file", "size")
            return cls(file, hdr.size, readonly)
        except BaseException:
            file.close()
            raise

    @staticmethod
    def create(path, size, opts, backing=None):
        size = -(-size // 512) * 512
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        file = HostFile(path, readonly=False, create=True)
        try:
            file.pwrite(HEADER.pack(magic=MAGIC, version=VERSION, reserved=0,
                                    size=size), 0)
            file.truncate(DATA_OFFSET + size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            file.close()


# Not resizable: servers have its fixed size mapped.
SPEC = FormatSpec(FORMAT, open=RamDisk.open, probe=RamDisk.probe,
                  create=RamDisk.create)
