"""raw: the image is the disk, byte for byte (regular file or block device).

Holes come from SEEK_DATA/SEEK_HOLE; trim punches a hole; zero uses
FALLOC_FL_ZERO_RANGE (or a punch when trimming is allowed) and falls back
to writing zeros; flush is fdatasync.
"""

import errno

from nbdplug.disk import DATA, ZERO, Disk, FormatSpec, HostRange, Run
from nbdplug.errors import UnsupportedFeature
from nbdplug.hostfile import DIRECT_ALIGN

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV)


class RawDisk(Disk):
    format_name = "raw"
    can_trim = True
    can_zero = True
    host_base = 0           # file offset of guest byte 0

    def __init__(self, file, readonly):
        super().__init__(file.path, file.size(), readonly)
        self.file = file
        if file.direct or file.is_block:
            self.min_block = 512 if not file.direct else DIRECT_ALIGN
        # Reads go straight to the host file: no per-request Python frame.
        self.pread = file.pread

    @classmethod
    def open(cls, path, readonly, ctx):
        return cls(ctx.open_file(path, readonly), readonly)

    @staticmethod
    def create(path, size, opts, backing=None):
        with open(path, "xb") as f:
            f.truncate(size)

    @staticmethod
    def resize(disk, size, shrink=False):
        """Grow (sparse) or cut the open image's file (resize_image has
        checked that a cut was asked for)."""
        if disk.file.is_block:
            raise UnsupportedFeature(disk.path, "raw", "is a block device: "
                                     "its size is the device's own")
        disk.file.truncate(size)
        disk.file.flush()
        disk.size = size

    def pwrite(self, buf, offset, fua=False):
        self.check_writable()
        self.file.pwrite(buf, offset)
        if fua:
            self.file.flush()

    def flush(self):
        self.file.flush()

    def trim(self, count, offset, fua=False):
        self.check_writable()
        try:
            self.file.punch(offset, count)
        except OSError as e:
            # Trim is advisory: where nothing can be freed, do nothing.
            if e.errno not in _UNSUPPORTED:
                raise
        if fua:
            self.file.flush()

    def zero(self, count, offset, may_trim=False, fua=False):
        self.check_writable()
        attempts = ([self.file.punch] if may_trim else []) + \
            [self.file.zero_range]
        for attempt in attempts:
            try:
                attempt(offset, count)
                break
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
        else:
            self.file.write_zeroes(offset, count)
        if fua:
            self.file.flush()

    def map(self, count, offset):
        end = offset + count
        if self.file.is_block:
            return [Run(offset, count, DATA,
                        host=(self.path, self.host_base + offset))]
        runs = []
        pos = offset
        while pos < end:
            data = self.file.next_data(pos)
            if data > pos:              # a hole up to the next data
                stop = min(data, end)
                runs.append(Run(pos, stop - pos, ZERO,
                                host=(self.path, self.host_base + pos)))
                pos = stop
                continue
            stop = min(self.file.next_hole(pos), end)
            runs.append(Run(pos, stop - pos, DATA,
                            host=(self.path, self.host_base + pos)))
            pos = stop
        return runs

    def host_mapping(self, count, offset):
        """All of it: every guest byte sits at its own place in the file
        and may be overwritten there."""
        return [HostRange(offset, count, self.path, self.host_base + offset)]

    def info(self):
        return {}

    def close(self):
        self.file.close()


# Never chosen by probing (no probe): see the opener.
SPEC = FormatSpec("raw", open=RawDisk.open, create=RawDisk.create,
                  resize=RawDisk.resize)
