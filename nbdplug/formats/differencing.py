"""What VHD and VHDX share: sector bitmaps kept as integers, and finding
the parent a differencing disk names."""

import re

from nbdplug.errors import CorruptImage, ImageError


def bit_runs(bits, first, last):
    """(start, end, present) runs of equal bits of the int `bits` in
    [first, last)."""
    i = first
    while i < last:
        present = bool(bits >> i & 1)
        # The run ends at the first bit that differs: the lowest set bit
        # of the rest, complemented when the run is of ones.
        rest = ~(bits >> i) if present else bits >> i
        j = min(last, i + (rest & -rest).bit_length() - 1) if rest else last
        yield i, j, present
        i = j


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


def windows_path(name):
    """A Windows path as a path here: slashes, and no drive letter (which
    means nothing here; the path below it may)."""
    return re.sub(r"^[A-Za-z]:(?=/)", "", name.replace("\\", "/"))
