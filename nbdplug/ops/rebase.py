"""Safe rebase's data step, for any format: before an image is pointed at
a new backing chain, copy into it every byte the old chain supplies that
the new chain would read differently, so the guest sees the same disk.

Writes go through the image's driver, which orders data before the
metadata pointing at it; the caller flushes before changing the
reference, so a crash at any point leaves a disk that reads the same.
"""

CHUNK = 1 << 20         # bytes compared at a time
PIECE = 64 << 10        # unit of writing: only differing pieces are written


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
