"""Converting an image: any format we read to any format we write.

The source's allocation map decides what is copied: data is read and
written, holes and zeros are left unwritten on the fresh target (which
reads as zeros) or made zero where the target has a backing file.  Data
that turns out to be all zeros is treated as zeros, as qemu-img convert
does.  Reads run ahead in a few threads (the drivers release the GIL in
their I/O) while the main thread writes in guest order, so targets that
want sequential writes (streamOptimized VMDK, compressed clusters) get
them; at most DEPTH windows are in memory.  The target is flushed before
success is reported.
"""

import collections
import concurrent.futures
import contextlib
import os
import sys

from nbdplug.disk import MiB
from nbdplug.errors import UsageError
from nbdplug.hostfile import DeferredFlushFile
from nbdplug.formats import FORMATS
from nbdplug.opener import check_format, open_image

from .create import create_image

WINDOW = 4 * MiB    # the unit read ahead, mapped and written
DEPTH = 8           # windows in flight: bounds memory to DEPTH * WINDOW
READERS = 4
# Zero detection works in units of the target's cluster (writing part of
# a cluster allocates all of it anyway) or of 4 KiB, like qemu-img's -S.
MIN_GRANULE = 4096

# Actions for a range of the source.
COPY, ZERO, SKIP = "copy", "zero", "skip"


def convert(src_path, dst_path, out_fmt, src_fmt=None, options=None,
            compress=False, backing=None, backing_fmt=None, share=False,
            policy=None, progress=False):
    """Write the contents of `src_path` to a new image `dst_path`.

    `backing`: the new image gets this backing file, and ranges the
    source's top layer does not allocate are left to it (qemu-img -B).
    `compress`: compressed writes, for formats that declare them.
    `progress`: show a progress bar on stderr.
    """
    check_format(out_fmt)
    if compress and not FORMATS[out_fmt].compress:
        raise UsageError(f"format {out_fmt!r} does not support compression")
    with open_image(src_path, src_fmt, readonly=True, policy=policy,
                    share=share) as src:
        # Image formats count in 512-byte sectors: round up, as qemu-img
        # convert does (the tail reads as zeros).
        size = src.size if out_fmt == "raw" else -(-src.size // 512) * 512
        create_image(dst_path, out_fmt, size, options, backing=backing,
                     backing_fmt=backing_fmt, policy=policy)
        files = [dst_path]
        try:
            with open_image(dst_path, out_fmt, readonly=False,
                            policy=policy,
                            options={"compress": True} if compress
                            else None,
                            file_factory=DeferredFlushFile) as dst, \
                    progress_bar(src.size, progress) as update:
                files = dst.files()     # split VMDKs have several
                copy(src, dst, keep_backing=backing is not None,
                     progress=update)
                dst.flush()
            _sync(files)
        except BaseException:
            for path in files:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise


def _sync(paths):
    """Make the finished target durable: its files, then the directory
    entries that name them."""
    dirs = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(os.path.dirname(os.path.abspath(path)))
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy(src, dst, keep_backing=False, progress=None):
    """Copy `src` onto `dst`, a Disk at least as large that reads as
    zeros (or as its backing file, when `keep_backing`)."""
    zero_target = ZERO if keep_backing else SKIP
    granule = max(MIN_GRANULE, dst.cluster_size or 0)
    zeros = bytes(granule)
    with concurrent.futures.ThreadPoolExecutor(READERS) as pool:
        pending = collections.deque()
        offset = 0
        while offset < src.size or pending:
            while offset < src.size and len(pending) < DEPTH:
                length = min(WINDOW, src.size - offset)
                pending.append(pool.submit(_read_window, src, offset,
                                           length, keep_backing))
                offset += length
            for start, length, action, data in pending.popleft().result():
                if action == COPY:
                    _write_data(dst, start, data, zero_target, zeros)
                elif action == ZERO and zero_target == ZERO:
                    dst.zero(length, start, may_trim=True)
                if progress:
                    progress(length)


def _read_window(src, offset, length, keep_backing):
    """Segments (start, length, action, bytes or None) covering the
    window, adjacent equal actions merged, data read."""
    segments = []
    for run in src.map(length, offset):
        if keep_backing and run.depth > 0:
            action = SKIP
        else:
            action = COPY if run.data else ZERO
        if segments and segments[-1][2] == action:
            start, n, _, _ = segments[-1]
            segments[-1] = (start, n + run.length, action, None)
        else:
            segments.append((run.offset, run.length, action, None))
    out = []
    for start, n, action, _ in segments:
        if action != COPY:
            out.append((start, n, action, None))
            continue
        out.append((start, n, action, src.read(n, start)))
    return out


def _write_data(dst, start, buf, zero_action, zeros):
    """Write `buf` at `start`, except granules (len(zeros), aligned to
    guest offsets) that are all zeros: those get `zero_action`."""
    granule = len(zeros)
    end = start + len(buf)
    view, zview = memoryview(buf), memoryview(zeros)   # compare, no copies
    pos = start
    while pos < end:
        # Collect a run of granules that are all zero, or all not.
        first = pos
        is_zero = None
        while pos < end:
            stop = min(end, (pos // granule + 1) * granule)
            zero = view[pos - start:stop - start] == zview[:stop - pos]
            if is_zero is None:
                is_zero = zero
            elif zero != is_zero:
                break
            pos = stop
        if not is_zero:
            data = view[first - start:pos - start]
            for i in range(0, len(data), dst.max_block):
                dst.pwrite(data[i:i + dst.max_block], first + i)
        elif zero_action == ZERO:
            dst.zero(pos - first, first, may_trim=True)


@contextlib.contextmanager
def progress_bar(total, enabled):
    """A progress callback: a tqdm bar on stderr when `enabled`."""
    if not enabled:
        yield None
        return
    import tqdm     # only here: the plugin path never needs it
    with tqdm.tqdm(total=total, unit="B", unit_scale=True,
                   unit_divisor=1024, desc="converting", file=sys.stderr,
                   dynamic_ncols=True) as bar:
        yield bar.update
