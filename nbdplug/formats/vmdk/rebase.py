"""Pointing a VMDK delta disk at another parent (`nbdplug rebase`).

The parent is named by two descriptor keys: parentFileNameHint (where to
find it) and parentCID (the parent's content ID when the delta was made,
which the opener checks).  Only those two lines change; every other line
is kept as written.  The new text is written in one write over the old:
an embedded descriptor keeps its fixed region (NUL padded), a descriptor
file its length at least (newline padded, blank lines being ignored), so
a crash leaves the old text or the new one.
"""

from nbdplug.errors import UnsupportedFeature, UsageError
from . import descriptor
from .descriptor import NO_PARENT

FMT = "vmdk"


def new_descriptor(file, base, room, path, name, parent_cid):
    """The descriptor bytes to write at `base` of `file` to record parent
    `name` (None: no parent) with `parent_cid`; `room` is the embedded
    region's size, or None for a descriptor file (which may grow)."""
    if name is not None and any(c in name for c in '"\n\r\0'):
        raise UsageError(f"{path}: a VMDK parent name cannot hold quotes, "
                         "line breaks or NULs")
    length = room if room is not None else file.size()
    old = bytes(file.read(length, base)).split(b"\0", 1)[0]
    new = _edited(old, name, parent_cid)
    descriptor.parse(new, path)         # what we write must open again
    if room is not None:
        if len(new) > room:
            raise UsageError(f"{path}: the new descriptor ({len(new)} "
                             f"bytes) does not fit in the embedded "
                             f"descriptor ({room} bytes)")
        new += bytes(room - len(new))
    else:
        new += b"\n" * (len(old) - len(new))
    return new


def _edited(text, name, parent_cid):
    """`text` with parentCID set and parentFileNameHint replaced (after
    parentCID, where VMware writes it) or removed."""
    out, placed = [], False
    lines = text.split(b"\n")
    for line in lines:
        key = _key(line)
        if key == b"parentFileNameHint":
            continue
        if key == b"parentCID":
            line = b"parentCID=%08x" % parent_cid
            placed = True
        out.append(line)
        if key == b"parentCID" and name is not None:
            out.append(b'parentFileNameHint="%s"' % name.encode(
                "utf-8", "surrogateescape"))
    if not placed:
        # No parentCID line: add one (and the hint) after CID.
        at = next((i + 1 for i, line in enumerate(out)
                   if _key(line) == b"CID"), 1)
        add = [b"parentCID=%08x" % parent_cid]
        if name is not None:
            add.append(b'parentFileNameHint="%s"' % name.encode(
                "utf-8", "surrogateescape"))
        out[at:at] = add
    return b"\n".join(out)


def _key(line):
    stripped = line.strip()
    if stripped.startswith(b"#") or b"=" not in stripped:
        return None
    return stripped.split(b"=", 1)[0].strip()


def parent_cid_of(new, path):
    """The CID to record for parent Disk `new` (None: no parent)."""
    if new is None:
        return NO_PARENT
    if new.format_name != FMT or new.cid is None:
        raise UsageError(f"{path}: a VMDK parent must be a VMDK image with "
                         "a CID (use -F vmdk)")
    return new.cid


def rebase(disk, backing, backing_fmt, new=None, copy=None):
    """Name `backing` (None: none), the VMDK Disk `new`, as the parent of
    `disk` (opened writable), with its CID; `copy` (safe rebase's data
    step) runs once the new descriptor is known to be valid."""
    disk.check_writable()
    if backing_fmt not in (None, FMT):
        raise UnsupportedFeature(disk.path, FMT, "a VMDK parent must be a "
                                 f"VMDK image, not {backing_fmt}",
                                 "parentFileNameHint")
    cid = parent_cid_of(new, disk.path)
    room = disk.embedded_descriptor_room()

    def text():
        return new_descriptor(disk._desc_file, disk._desc_base, room,
                              disk.path, backing, cid)
    text()
    if copy is not None:
        copy()
    disk._desc_file.pwrite(text(), disk._desc_base)
    disk._desc_file.flush()
    disk.backing_name = backing
    disk.backing_format = FMT if backing else None
