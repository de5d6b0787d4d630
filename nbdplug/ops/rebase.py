"""`nbdplug rebase`: point an image at another backing file, as qemu-img
rebase does, for the formats that have it.

Safe mode's data step is the same for every format: before an image is
pointed at a new backing chain, copy into it every byte the old chain
supplies that the new chain would read differently, so the guest sees
the same disk.

Writes go through the image's driver, which orders data before the
metadata pointing at it; the caller flushes before changing the
reference, so a crash at any point leaves a disk that reads the same.
"""

from nbdplug.errors import UnsupportedFeature, UsageError
from nbdplug.formats import FORMATS
from nbdplug.opener import (check_format, check_openable, names_a_file,
                            new_context, open_in, probe)

CHUNK = 1 << 20         # bytes compared at a time
PIECE = 64 << 10        # unit of writing: only differing pieces are written


def rebase_image(path, fmt=None, backing=None, backing_fmt=None,
                 unsafe=False, policy=None):
    """Point the image at `path` at backing file `backing` ("" or None:
    none), like qemu-img rebase.  Safe mode first copies into the image
    whatever the old chain supplies that the new chain reads differently;
    `unsafe` only rewrites the reference (the old chain is not opened).
    """
    check_format(fmt)
    check_format(backing_fmt)
    if not names_a_file(path):
        raise UsageError(f"{path}: only image files can be rebased")
    backing = backing or None
    if backing is None and backing_fmt:
        raise UsageError("-F needs a backing file (-b)")
    check_openable(path)
    fmt = fmt or probe(path) or "raw"
    spec = FORMATS[fmt]
    if spec.rebase is None:
        raise UnsupportedFeature(path, fmt, "rebase is not supported for "
                                 "this image format")
    # The new chain is opened first, through the policy (roots, loops,
    # the image itself), so bad input fails before the image is opened.
    new = None
    if backing is not None:
        new = new_context(path, policy).open_backing(
            path, fmt, backing, backing_fmt, "backing file")
    try:
        ctx = new_context(path, policy)
        ctx.skip_backing = unsafe
        with open_in(path, fmt, False, ctx) as disk:
            def copy():
                copy_differences(disk, new)
                disk.flush()
            spec.rebase(disk, backing, backing_fmt or (
                new.format_name if new is not None else None), new,
                None if unsafe else copy)
    finally:
        if new is not None:
            new.close()


def copy_differences(disk, new):
    """Write into `disk` (open writable, over its old chain) the old
    chain's bytes wherever `new` (a Disk, or None for no backing) differs
    and `disk`'s own layer does not allocate the range."""
    for run in disk.map(disk.size, 0):
        if run.present and run.depth == 0:
            continue            # the image's own bytes hide either chain
        end = run.offset + run.length
        for pos in range(run.offset, end, CHUNK):
            n = min(CHUNK, end - pos)
            old = bytearray(n)
            disk.pread(memoryview(old), pos)
            ahead = read_chain(new, pos, n)
            if old != ahead:
                _write_differences(disk, old, ahead, pos)


def read_chain(disk, offset, count):
    """What a backing chain reads at [offset, offset + count): zeros past
    its end, and everywhere without one."""
    buf = bytearray(count)
    if disk is not None:
        n = max(0, min(count, disk.size - offset))
        if n:
            disk.pread(memoryview(buf)[:n], offset)
    return buf


def _write_differences(disk, old, new, offset):
    """Write the PIECEs of `old` that differ from `new`, adjacent ones
    together; zeros as zero requests where the driver has them."""
    pos = 0
    while pos < len(old):
        if old[pos:pos + PIECE] == new[pos:pos + PIECE]:
            pos += PIECE
            continue
        start = pos
        while pos < len(old) and old[pos:pos + PIECE] != new[pos:pos + PIECE]:
            pos += PIECE
        data = memoryview(old)[start:pos]
        if disk.can_zero and old.count(0, start, pos) == len(data):
            disk.zero(len(data), offset + start)
        else:
            disk.pwrite(data, offset + start)
