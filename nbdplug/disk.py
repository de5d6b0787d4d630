"""The Disk interface: one open image, whoever asks for its blocks.

The nbdkit plugin, tapbridge, conversion and dm/ all call these methods.
Names and argument order follow nbdkit's plugin callbacks, so the plugin is
one delegating line per callback.  Offsets and lengths are bytes.

Requests are checked once, at the front: nbdkit checks them against the
size before calling the plugin, tapbridge's dispatcher checks each ring
request, and Disk.read checks what convert and compare ask.  Drivers trust
the offsets they are given (and never see one outside the disk).

A Disk is called from several threads at once.  Drivers guard their own
metadata with a lock and do data I/O outside it.

Also here: FormatSpec, what a format declares once, and the one segment
vocabulary (Run) that every driver's map yields and every consumer reads.
"""

import bisect
import dataclasses
import typing

from .errors import CorruptImage, ReadOnlyDisk, RequestError

MiB = 1 << 20

# --- segments ------------------------------------------------------------

# What a guest range is, as a driver's map says (Run.kind):
DATA = "data"               # stored bytes; Run.host says where when plain
COMPRESSED = "compressed"   # stored, but only the driver can decode them
ZERO = "zero"               # reads as zeros because the metadata says so
HOLE = "hole"               # allocated nowhere: no layer holds the range
# A driver's own walk also says BACKING for what this layer leaves to its
# backing file; the map it returns gives the backing file's runs there,
# one layer deeper (Run.depth > 0), or a HOLE.
BACKING = "backing"

# Extent flags, equal to nbdkit.EXTENT_HOLE / EXTENT_ZERO and NBD's
# base:allocation bits, so they cross the plugin boundary unchanged.
EXTENT_HOLE = 1
EXTENT_ZERO = 2


class Run(typing.NamedTuple):
    """Where a guest range comes from: one mapping walk, many consumers
    (pread's plan, NBD block status, `map`, convert, the dm fast path).

    kind:   DATA, COMPRESSED, ZERO or HOLE;
    depth:  the layer that supplies the bytes (0 is this image); for a
            HOLE the layer where the lookup ended (the last one, or the
            one whose backing file is too short), as qemu-img map says;
    host:   (path, host_offset) where the bytes sit plainly in the file
            of the layer at `depth` (DATA; ZERO where space is reserved);
    sparse: DATA whose host bytes are a hole of the host file (reads as
            zeros, as qemu reports it).
    """
    offset: int
    length: int
    kind: str
    depth: int = 0
    host: typing.Optional[tuple] = None
    sparse: bool = False

    # qemu-img map's flags, derived.
    @property
    def present(self):
        return self.kind != HOLE

    @property
    def data(self):
        return self.kind in (DATA, COMPRESSED)

    @property
    def zero(self):
        return self.kind in (ZERO, HOLE) or self.sparse


class Extent(typing.NamedTuple):
    offset: int
    length: int
    flags: int          # EXTENT_HOLE | EXTENT_ZERO bits; 0 is data


class HostRange(typing.NamedTuple):
    """Guest range stored plainly in this image's own file (dm/'s input):
    a write there may go straight to (path, host_offset) with no metadata
    change.  path None: only the driver can serve the range."""
    offset: int
    length: int
    path: typing.Optional[str]
    host_offset: typing.Optional[int]


def add_host_range(ranges, r):
    """Append `r` to `ranges`, merged with the last one where it continues
    it (both driver-only, or the same file with host offsets contiguous)."""
    if ranges:
        last = ranges[-1]
        if last.offset + last.length == r.offset and last.path == r.path \
                and (r.path is None or
                     last.host_offset + last.length == r.host_offset):
            ranges[-1] = last._replace(length=last.length + r.length)
            return
    ranges.append(r)


def host_ranges(runs):
    """HostRanges for resolved `runs`: this layer's DATA with a host is
    plain, the rest not."""
    out = []
    for run in runs:
        plain = run.kind == DATA and run.depth == 0 and run.host is not None
        add_host_range(out, HostRange(
            run.offset, run.length, *(run.host if plain else (None, None))))
    return out


class Pins:
    """Host ranges a loaded device-mapper table maps (dm/ sets them on the
    Disk).  While a range is pinned the driver must not free, move or
    share it: what it would free there waits in quarantine, and is freed
    once a table that no longer maps it is live (Disk.unpinned).
    Immutable: replaced whole, so readers need no lock."""

    def __init__(self, ranges=()):
        spans = {}
        for path, start, length in sorted(ranges):
            starts, ends = spans.setdefault(path, ([], []))
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], start + length)
            else:
                starts.append(start)
                ends.append(start + length)
        self._spans = spans

    def __bool__(self):
        return bool(self._spans)

    def overlaps(self, path, offset, length):
        """Does [offset, offset + length) of `path` meet a pinned range?"""
        span = self._spans.get(path)
        if span is None:
            return False
        starts, ends = span
        i = bisect.bisect_left(ends, offset + 1)    # first end > offset
        return i < len(starts) and starts[i] < offset + length


def add_run(runs, run):
    """Append `run` to `runs`, merged with the last one where it continues
    it (same kind, depth and flags; host offsets contiguous)."""
    if runs:
        last = runs[-1]
        if (last.kind, last.depth, last.sparse) == \
                (run.kind, run.depth, run.sparse) and \
                last.offset + last.length == run.offset and \
                _host_continues(last, run):
            runs[-1] = last._replace(length=last.length + run.length)
            return
    runs.append(run)


def _host_continues(a, b):
    if a.host is None or b.host is None:
        return a.host is None and b.host is None
    return a.host[0] == b.host[0] and a.host[1] + a.length == b.host[1]


# --- what a format declares ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """A format, declared once (formats/__init__.py gathers them).

    open(path, readonly, ctx) -> Disk      opens an image (see opener)
    probe(HostFile) -> bool               its signature; None: never
                                          chosen by probing (raw)
    create(path, size, options, backing)  a new image; `options` parsed
                                          from `create_options`, `backing`
                                          an opener.Backing or None
    check(path, ctx, repair) -> report.CheckReport
    resize(disk, size, shrink)            on a disk opened writable
    rebase(disk, backing, backing_fmt, new, copy)
    Absent operations are None: the format does not have them.
    """
    name: str
    open: typing.Callable
    probe: typing.Optional[typing.Callable] = None
    create: typing.Optional[typing.Callable] = None
    create_options: dict = dataclasses.field(default_factory=dict)
    backing: bool = False           # takes a backing file (-b)
    backing_format: bool = False    # and records the backing's format
    check: typing.Optional[typing.Callable] = None
    resize: typing.Optional[typing.Callable] = None
    rebase: typing.Optional[typing.Callable] = None
    writable: bool = True           # can be opened for writing
    compress: bool = False          # writes compressed clusters (-c)


class Backing(typing.NamedTuple):
    """A new image's backing file: the name to record, its format, what
    probing the file finds (the format a reader will take it for where
    none is recorded), and the Disk the opener opened it as (through the
    policy)."""
    name: str
    format: str
    probed_as: str
    disk: object


# --- the interface -------------------------------------------------------------

class Disk:
    """Base class for image drivers; subclasses fill in the I/O methods."""

    format_name = None          # its FormatSpec's name

    # Block size hints (nbdkit block_size): minimum, preferred, maximum.
    min_block = 1
    preferred_block = 4096
    max_block = 32 * MiB

    # Capabilities, fixed at open (nbdkit can_*).
    can_trim = False
    can_zero = False
    can_fua = True
    can_multi_conn = True

    # What `info` shows where a format has it.
    cluster_size = None
    dirty = False
    snapshots = ()
    backing_format = None   # as the image records (or implies) it

    def __init__(self, path, size, readonly):
        self.path = path
        self.size = size
        self.readonly = readonly
        self.backing = None     # the next Disk in the chain, if any
        self.backing_name = None
        self.stopped = None     # why writing stopped (see stop_writing)

    # --- data ---------------------------------------------------------

    def pread(self, buf, offset):
        """Fill the writable memoryview `buf` from guest `offset`."""
        raise NotImplementedError

    def read(self, count, offset):
        """`count` bytes from guest `offset` as a memoryview over a new
        bytearray, checked against the size and read in requests of at
        most max_block (a remote server's limit)."""
        check_request(self, count, offset)
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
        one layer deeper; past its end (or without one) a HOLE at this
        layer's depth, as qemu-img map reports it."""
        n, runs = 0, []
        if self.backing is not None:
            n = max(0, min(count, self.backing.size - offset))
            if n:
                runs = [r._replace(depth=r.depth + 1)
                        for r in self.backing.map(n, offset)]
        if n < count:
            runs.append(Run(offset + n, count - n, HOLE))
        return runs

    def fill(self, buf, runs, file):
        """Fill `buf` from this layer's own walk `runs` (starting at the
        guest offset of buf's first byte): DATA from `file` at its host
        offset, BACKING from the backing file, ZERO as zeros."""
        pos = 0
        for run in runs:
            part = buf[pos:pos + run.length]
            if run.kind == DATA:
                file.pread(part, run.host[1])
            elif run.kind == BACKING:
                self.read_backing(part, run.offset)
            else:
                part[:] = bytes(run.length)
            pos += run.length

    def resolve(self, runs):
        """This layer's own walk as map returns it: each BACKING run
        replaced by what the backing file holds there."""
        out = []
        for run in runs:
            if run.kind == BACKING:
                out += self.map_backing(run.length, run.offset)
            else:
                out.append(run)
        return out

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
            flags = (0 if run.data else EXTENT_HOLE) | \
                (EXTENT_ZERO if run.zero else 0)
            if out and out[-1].flags == flags:
                last = out[-1]
                out[-1] = Extent(last.offset, last.length + run.length, flags)
            else:
                out.append(Extent(run.offset, run.length, flags))
        return out

    def host_mapping(self, count, offset):
        """HostRanges covering [offset, offset + count) in order: where the
        guest bytes sit plainly in this image's own files and may be
        overwritten there without any metadata change (dm/ maps those
        straight to the file), path None elsewhere.  The base rule is
        this layer's DATA with a host; a format whose data is not
        always writable in place says more (qcow2: never a shared
        cluster)."""
        return host_ranges(self.map(count, offset))

    # --- writes that bypass the driver (dm/'s fast path) ---------------

    pins = Pins()

    def prepare_writes(self):
        """Do now, durably, what the first write would do before its data
        (qcow2 clears autoclear bits, VMDK takes a new CID and marks its
        extents unclean): dm/ calls this before writes go straight to
        the host file through a writable table."""

    def set_pins(self, pins):
        """Pin the host ranges `pins` (a Pins), replacing the last set;
        frees that waited for the old ones may then go ahead."""
        old, self.pins = self.pins, pins
        if old:
            self.unpinned()

    def pinned(self, path, offset, length):
        """Must a free of these host bytes wait (see Pins)?"""
        return self.pins.overlaps(path, offset, length)

    def unpinned(self):
        """Pins were dropped: free what waited for them, where the
        driver holds such frees itself (qcow2 frees at its next flush)."""

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

    # --- integrity ------------------------------------------------------

    def check_writable(self):
        """Refuse a write to a read-only disk, or to one that stopped
        writing."""
        if self.stopped is not None:
            raise CorruptImage(self.path, self.format_name,
                               "refusing writes: " + self.stopped)
        if self.readonly:
            raise ReadOnlyDisk(self.path, self.format_name,
                               "disk is read-only")

    def stop_writing(self, error):
        """Inconsistent metadata found while serving: mark the image where
        the format can (mark_corrupt) and refuse every write from now on,
        each refusal saying why.  Reads go on.  The caller fails the
        request at hand with `error`."""
        if self.stopped is not None or self.readonly:
            return
        self.stopped = str(error)
        self.readonly = True        # close() then writes nothing either
        self.mark_corrupt()

    def mark_corrupt(self):
        """Record in the image that it is corrupt (qcow2's corrupt bit);
        best effort, formats without such a mark do nothing."""

    # --- lifetime -----------------------------------------------------

    def close(self):
        if self.backing is not None:
            self.backing.close()
            self.backing = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_request(disk, count, offset):
    """Refuse a request outside `disk` before it reaches the driver (the
    callers that take requests from outside call this, or check alike)."""
    if offset < 0 or count < 0 or offset + count > disk.size:
        raise RequestError(disk.path, disk.format_name,
                           f"request {offset}+{count} is beyond the end "
                           f"of the disk ({disk.size})")
