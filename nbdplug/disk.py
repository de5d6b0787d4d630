"""The Disk interface: one open image, whoever asks for its blocks.

The nbdkit plugin, tapbridge, conversion and dm/ all call these methods.
Names and argument order follow nbdkit's plugin callbacks, so the plugin is
one delegating line per callback.  Offsets and lengths are bytes.

A Disk is called from several threads at once.  Drivers guard their own
metadata with a lock and do data I/O outside it.
"""

import typing

from .errors import ReadOnlyDisk, RequestError

# Extent flags, equal to nbdkit.EXTENT_HOLE / EXTENT_ZERO and NBD's
# base:allocation bits, so they cross the plugin boundary unchanged.
HOLE = 1
ZERO = 2

MiB = 1 << 20


class Extent(typing.NamedTuple):
    offset: int
    length: int
    flags: int          # HOLE | ZERO bits; 0 is allocated data


class Run(typing.NamedTuple):
    """Where a guest range comes from: one mapping walk, many consumers.

    present: allocated in this image or a backing image;
    zero:    reads as zeros;
    data:    backed by stored bytes (not a hole, not a zero flag);
    depth:   the layer that supplies the bytes (0 is this image); for a
             range allocated nowhere, the layer where the lookup ended
             (the last one, or the one whose backing file is too short),
             as qemu-img map reports it;
    host:    (path, host_offset) when the bytes sit plainly in the file of
             the layer at `depth`, else None.
    """
    offset: int
    length: int
    present: bool
    zero: bool
    data: bool
    depth: int
    host: typing.Optional[tuple]


class HostRange(typing.NamedTuple):
    """Guest range stored plainly in this image's own file (dm/'s input)."""
    offset: int
    length: int
    path: typing.Optional[str]      # None: not plain here (use userspace)
    host_offset: typing.Optional[int]


class Disk:
    """Base class for image drivers; subclasses fill in the I/O methods."""

    format_name = None          # the key in opener.FORMATS

    # Block size hints (nbdkit block_size): minimum, preferred, maximum.
    min_block = 1
    preferred_block = 4096
    max_block = 32 * MiB

    # Capabilities, fixed at open (nbdkit can_*).
    can_trim = False
    can_zero = False
    can_fua = True
    can_multi_conn = True

    def __init__(self, path, size, readonly):
        self.path = path
        self.size = size
        self.readonly = readonly
        self.backing = None     # the next Disk in the chain, if any

    # --- data ---------------------------------------------------------

    def pread(self, buf, offset):
        """Fill the writable memoryview `buf` from guest `offset`."""
        raise NotImplementedError

    def read(self, count, offset):
        """`count` bytes from guest `offset` as a memoryview over a new
        bytearray, read in requests of at most max_block (a remote
        server's limit)."""
        view = memoryview(bytearray(count))
        for pos in range(0, count, self.max_block):
            self.pread(view[pos:pos + self.max_block], offset + pos)
        return view

    def pwrite(self, buf, offset, fua=False):
        raise NotImplementedError

    def flush(self):
        """Make every write acknowledged so far durable."""

    def trim(self, count, offset, fua=False):
        raise NotImplementedError

    def zero(self, count, offset, may_trim=False, fua=False):
        raise NotImplementedError

    # --- helpers for drivers ------------------------------------------

    def check_request(self, count, offset, write=False):
        """Refuse a request outside the disk, or a write to a read-only
        disk, before it touches anything."""
        if write and self.readonly:
            self.check_writable()
        if offset < 0 or count < 0 or offset + count > self.size:
            raise RequestError(self.path, self.format_name,
                               f"request {offset}+{count} is beyond the end "
                               f"of the disk ({self.size})")

    def read_backing(self, buf, offset):
        """What a range this layer does not store reads as: the backing
        image's bytes, zeros past its end (or everywhere without one)."""
        n = 0
        if self.backing is not None:
            n = max(0, min(len(buf), self.backing.size - offset))
            if n:
                self.backing.pread(buf[:n], offset)
        if n < len(buf):
            buf[n:] = bytes(len(buf) - n)

    def map_backing(self, count, offset):
        """Runs of a range this layer does not store: the backing image's,
        one layer deeper; past its end (or without one) allocated nowhere,
        at this layer's depth, as qemu-img map reports it."""
        n, runs = 0, []
        if self.backing is not None:
            n = max(0, min(count, self.backing.size - offset))
            if n:
                runs = [r._replace(depth=r.depth + 1)
                        for r in self.backing.map(n, offset)]
        if n < count:
            runs.append(Run(offset + n, count - n, False, True, False, 0,
                            None))
        return runs

    # --- allocation ---------------------------------------------------

    def map(self, count, offset):
        """Runs (see Run) covering [offset, offset + count) in order."""
        raise NotImplementedError

    def extents(self, count, offset):
        """NBD block status: HOLE where no stored bytes back the range,
        ZERO where it reads as zeros (as qemu-nbd reports them).
        Adjacent equal runs are merged."""
        out = []
        for run in self.map(count, offset):
            flags = (0 if run.data else HOLE) | (ZERO if run.zero else 0)
            if out and out[-1].flags == flags:
                last = out[-1]
                out[-1] = Extent(last.offset, last.length + run.length, flags)
            else:
                out.append(Extent(run.offset, run.length, flags))
        return out

    def host_mapping(self, count, offset):
        """Where guest bytes sit plainly in this image's own file."""
        out = []
        for run in self.map(count, offset):
            if run.depth == 0 and run.host is not None:
                path, host_offset = run.host
                out.append(HostRange(run.offset, run.length, path,
                                     host_offset))
            else:
                out.append(HostRange(run.offset, run.length, None, None))
        return out

    # --- description --------------------------------------------------

    def files(self):
        """Paths of the host files this layer owns (for disk usage)."""
        return [self.path]

    def info(self):
        """Format-specific facts for `nbdplug info` (JSON-able dict)."""
        return {}

    def chain(self):
        """This disk followed by its backing disks."""
        disk = self
        while disk is not None:
            yield disk
            disk = disk.backing

    # --- lifetime -----------------------------------------------------

    def check_writable(self):
        if self.readonly:
            raise ReadOnlyDisk(self.path, self.format_name,
                               "disk is read-only")

    def close(self):
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
