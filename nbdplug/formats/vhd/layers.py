"""Where the bytes of a sparse disk with a parent come from, shared by
VHD and VHDX: runs of this file, the parent or zeros, and finding the
parent a differencing disk names."""

import re

from nbdplug.disk import Run
from nbdplug.errors import CorruptImage, ImageError


def open_parent(disk, ctx, candidates, is_parent, identity, fallback=()):
    """Open the first of `candidates` [(name, field)] that is the parent
    (same size, `is_parent(parent)`); else raise the first refusal.
    `fallback` candidates are tried only when a candidate opened but was
    another disk: locators rewritten by a rebase that stopped before the
    header that names the new parent's identity."""
    if ctx.skip_backing:
        # rebase -u: the old parent is not opened (it may be gone).
        return None, candidates[0][0] if candidates else None
    errors, other_disk = [], False
    for name, field in candidates:
        try:
            parent = ctx.open_backing(disk.path, disk.format_name, name,
                                      disk.format_name, field)
        except ImageError as e:
            errors.append(e)
            continue
        if parent.size == disk.size and is_parent(parent):
            return parent, name
        what = identity if parent.size == disk.size else "size"
        parent.close()
        other_disk = True
        errors.append(CorruptImage(disk.path, disk.format_name,
                                   f"{name!r} is not the parent: its {what} "
                                   "differs", field))
    if other_disk and fallback:
        try:
            return open_parent(disk, ctx, fallback, is_parent, identity)
        except ImageError:
            pass            # the first refusal says more
    if errors:
        raise errors[0]
    raise CorruptImage(disk.path, disk.format_name, "differencing disk has "
                       "no parent locator we can follow", "parent locator")


ZERO = "zero"


def add_run(runs, offset, length, where):
    """Append (offset, length, where) to `runs`, merged with the last run
    where it continues it.  `where` is a host offset; None, the parent's
    bytes (zeros without a parent); or ZERO, zeros whatever the parent
    holds."""
    if runs:
        p_off, p_len, p_where = runs[-1]
        if isinstance(where, int):
            merge = isinstance(p_where, int) and where == p_where + p_len
        else:
            merge = where == p_where
        if merge:
            runs[-1] = (p_off, p_len + length, p_where)
            return
    runs.append((offset, length, where))


def read_runs(disk, src, runs, buf):
    """Fill `buf` from `runs`: host bytes from `src`, the rest from the
    parent or zeros."""
    view = memoryview(buf)
    pos = 0
    for offset, length, where in runs:
        part = view[pos:pos + length]
        if isinstance(where, int):
            src.pread(part, where)
        elif where is None and disk.backing is not None:
            disk.backing.pread(part, offset)
        else:
            part[:] = bytes(length)
        pos += length


def map_runs(disk, runs):
    """Disk.map's Runs for `runs`.  Like qemu, a range allocated nowhere
    is present and zero: the formats define it so."""
    out = []
    for offset, length, where in runs:
        if isinstance(where, int):
            out.append(Run(offset, length, True, False, True, 0,
                           (disk.path, where)))
        elif where is None and disk.backing is not None:
            out.extend(r._replace(depth=r.depth + 1)
                       for r in disk.backing.map(length, offset))
        else:
            out.append(Run(offset, length, True, True, False, 0, None))
    return out


def windows_path(name):
    """A Windows path as a path here: slashes, and no drive letter (which
    means nothing here; the path below it may)."""
    return re.sub(r"^[A-Za-z]:(?=/)", "", name.replace("\\", "/"))
