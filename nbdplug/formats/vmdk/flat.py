"""Simple extents: FLAT (and ESX's VMFS) store the guest bytes plainly in
a file from a sector offset on; ZERO extents store nothing and read as
zeros (Virtual Disk Format 1.1, "Simple Extents")."""

import errno

from nbdplug.errors import ReadOnlyDisk
from nbdplug.disk import DATA, ZERO

from .extent import Extent

_NO_ZERO_RANGE = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


class FlatExtent(Extent):
    kind = "FLAT"

    def __init__(self, path, file, start, length, access, base):
        super().__init__(path, file, start, length, access)
        self.base = base            # host byte offset of the extent's start

    def segments(self, offset, length):
        return [(DATA, length, self.base + offset)]

    def pwrite(self, buf, offset, background):
        self.file.pwrite(buf, self.base + offset)

    def holes(self, where, length):
        # qemu-img map reports a flat file's holes as zero (and data).
        out, end = [], where + length
        while where < end:
            data = min(self.file.next_data(where), end)
            stop = data if data > where else \
                min(self.file.next_hole(where), end)
            out.append((stop - where, data > where))
            where = stop
        return out

    def zero(self, offset, length, background_is_zero):
        try:
            self.file.zero_range(self.base + offset, length)
            return []
        except OSError as e:
            if e.errno not in _NO_ZERO_RANGE:
                raise
            return [(offset, length)]


class ZeroExtent(Extent):
    kind = "ZERO"

    def __init__(self, path, start, length, access):
        super().__init__(path, None, start, length, access)

    def segments(self, offset, length):
        return [(ZERO, length, None)]

    def pwrite(self, buf, offset, background):
        raise ReadOnlyDisk(self.path, "vmdk", "a ZERO extent cannot be "
                           "written", f"extent at {self.start}")

    def zero(self, offset, length, background_is_zero):
        return []
