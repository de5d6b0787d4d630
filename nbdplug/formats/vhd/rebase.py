"""Pointing a differencing VHD at another parent (`nbdplug rebase`).

The dynamic header names the parent: its unique id and modification
time, its name, and parent locators, whose data (the parent's path in
several forms) lies in sectors the image reserves between the header and
the BAT.  New locator data goes into those reserved areas only (the BAT
and blocks never move), written and flushed before the header, which is
one 1 KiB write.  A crash in between leaves the old header, whose unique
id no longer matches the parent the locators now name; the driver then
looks for the old parent by the name the old header records, so the disk
opens as before the rebase (and never over a parent of another id).

Dropping the parent (-b "") makes the disk dynamic: the disk type in the
footer copy at offset 0, then in the footer at the end, then the header
without parent fields.  Each state opens: the end footer wins while it
is valid (still differencing, with its parent), and a dynamic disk
ignores the header's parent fields.
"""

import bisect
import collections
import dataclasses

from nbdplug.errors import UnsupportedFeature, UsageError
from .create import parent_facts, with_checksum
from .structs import (DIFFERENCING, DYNAMIC, DYNAMIC_HEADER, FMT, FOOTER,
                      MACX, PARENT_LOCATOR, SECTOR, SUBFORMATS, UNUSED,
                      round_up)

# An in-use locator entry and the bytes its data may fill.
Area = collections.namedtuple("Area", "slot entry room")


def rebase(disk, backing, backing_fmt, new, copy):
    """Record `backing` (None: none), the VHD Disk `new`, as the parent
    of `disk` (opened writable); `copy` runs once the new header is known
    to be valid and to fit."""
    disk.check_writable()
    kind = disk.geom.disk_type
    if kind != DIFFERENCING:
        if backing is None:
            return              # nothing to drop (qemu-img does the same)
        raise UnsupportedFeature(disk.path, FMT, f"a {SUBFORMATS[kind]} "
                                 "VHD cannot be given a parent (changing "
                                 "the disk type is not supported)",
                                 "footer.disk_type")
    if backing is None:
        if copy is not None:
            copy()
        _flatten(disk)
        return
    if backing_fmt not in (None, FMT) or new.format_name != FMT:
        raise UsageError(f"{disk.path}: the parent of a differencing VHD "
                         f"must be a VHD ({FMT}), not "
                         f"{backing_fmt or new.format_name}")
    if new.size != disk.size:
        raise UsageError(f"{disk.path}: the new parent is {new.size} "
                         f"bytes, the disk {disk.size}: a VHD's parent is "
                         "the same size")
    _new_reference(disk, backing, new)
    if copy is not None:
        copy()
    header, writes = _new_reference(disk, backing, new)
    for offset, data in writes:
        disk.file.pwrite(data, offset)
    disk.file.flush()
    disk.file.pwrite(header, disk.geom.data_offset)
    disk.file.flush()
    disk.backing_name = backing
    disk.backing_format = FMT if backing else None


def _new_reference(disk, backing, new):
    """The new header and the [(offset, bytes)] of locator data it
    points at, or UsageError if they do not fit the image."""
    facts = parent_facts(disk.path, backing)
    if facts["unique_id"] != new.unique_id:
        raise UsageError(f"{disk.path}: {backing!r} changed while it was "
                         "being opened")
    hdr = _header(disk)
    areas = _areas(disk, hdr)
    entries = bytearray(hdr.parent_locator_entries)
    writes = []
    for area, (code, data) in _assign(disk.path, areas, facts["locators"]):
        if len(data) > area.room:
            raise UsageError(f"{disk.path}: the new {code.decode()} parent "
                             f"locator ({len(data)} bytes) does not fit "
                             f"the {area.room} bytes the image reserves")
        entry = area.entry._replace(platform_code=code,
                                    platform_data_length=len(data))
        PARENT_LOCATOR.pack_into(entries, area.slot * PARENT_LOCATOR.size,
                                 entry)
        # Padded to its sector (within the room), as create writes it.
        pad = min(area.room, round_up(len(data), SECTOR)) - len(data)
        writes.append((entry.platform_data_offset, data + bytes(pad)))
    hdr = hdr._replace(parent_unique_id=new.unique_id,
                       parent_time_stamp=facts["time_stamp"],
                       parent_unicode_name=facts["unicode_name"],
                       parent_locator_entries=bytes(entries))
    return with_checksum(DYNAMIC_HEADER, hdr._asdict()), writes


def _header(disk):
    """The dynamic header as the file holds it (validated by the open)."""
    return DYNAMIC_HEADER.unpack_from(
        disk.file.read(DYNAMIC_HEADER.size, disk.geom.data_offset))


def _areas(disk, hdr):
    """The in-use locator entries and their data areas; refuses an area
    that is shared with or overlaps anything else in the file."""
    areas = []
    for slot in range(8):
        entry = PARENT_LOCATOR.unpack_from(hdr.parent_locator_entries,
                                           slot * PARENT_LOCATOR.size)
        if entry.platform_code != bytes(4):
            areas.append(Area(slot, entry, _room(entry)))
    geom = disk.geom
    others = [(o, o + n, name) for o, n, name in geom.metadata()
              if not name.startswith("parent locator")]
    others.append((disk._end, disk._end + SECTOR, "footer"))
    others += [(a.entry.platform_data_offset,
                a.entry.platform_data_offset + a.room,
                f"parent locator {a.slot}") for a in areas]
    span = geom.bitmap_size + geom.block_size
    blocks = sorted(e * SECTOR for e in disk.bat if e != UNUSED)
    for a in areas:
        start = a.entry.platform_data_offset
        end = start + a.room
        what = None
        if end > disk._end:
            what = "the end of the file"
        for o_start, o_end, name in others:
            if name != f"parent locator {a.slot}" and \
                    start < o_end and o_start < end:
                what = f"the {name}"
        i = bisect.bisect_left(blocks, end) - 1
        if i >= 0 and blocks[i] + span > start:
            what = f"the block at {blocks[i]}"
        if what:
            raise UnsupportedFeature(disk.path, FMT, f"the data area at "
                                     f"{start}+{a.room} overlaps {what}",
                                     f"parent locator {a.slot}")
    return areas


def _room(entry):
    """Bytes an entry's data area holds.  The specification counts
    platform_data_space in sectors; Virtual PC, Hyper-V and our create
    write bytes.  A whole number of sectors that holds the data is read
    as bytes (the smaller reading), anything else as sectors."""
    space = entry.platform_data_space
    if space % SECTOR == 0 and space >= entry.platform_data_length:
        return space
    return space * SECTOR


def _assign(path, areas, forms):
    """Pair each area with a new locator form: the form it held if we
    write that form, else one still unplaced.  The relative and absolute
    forms (what we, Windows and libvhdi-based tools follow) are required;
    the file URL is written only if there is room for it."""
    forms = dict(forms)
    pairs, rest = [], []
    for a in areas:
        code = a.entry.platform_code
        if code in forms:
            pairs.append((a, (code, forms.pop(code))))
        else:
            rest.append(a)
    for a in rest:
        if not forms:
            raise UnsupportedFeature(path, FMT, "it would keep naming the "
                                     "old parent (a locator form we do "
                                     "not write)", f"parent locator {a.slot}")
        code = next(iter(forms))
        pairs.append((a, (code, forms.pop(code))))
    missing = [c.decode() for c in forms if c != MACX]
    if missing:
        raise UsageError(f"{path}: the image reserves no parent locator "
                         f"area for the {' and '.join(missing)} form; "
                         "it cannot be rebased in place")
    return pairs


def _flatten(disk):
    """Make the disk dynamic: footers first (copy, then end), each
    durable before the next step, then the header's parent fields."""
    geom = disk.geom
    footer = FOOTER.unpack_from(geom.footer)._replace(disk_type=DYNAMIC)
    raw = with_checksum(FOOTER, footer._asdict())
    disk.file.pwrite(raw, 0)
    disk.file.flush()
    disk.file.pwrite(raw, disk._end)
    disk.file.flush()
    hdr = _header(disk)._replace(parent_unique_id=bytes(16),
                                 parent_time_stamp=0,
                                 parent_unicode_name=bytes(512),
                                 parent_locator_entries=bytes(192))
    disk.file.pwrite(with_checksum(DYNAMIC_HEADER, hdr._asdict()),
                     geom.data_offset)
    disk.file.flush()
    # Nothing refers to the old locator data now: free it.
    for _, offset, length in geom.locators:
        disk._zero_host(offset, round_up(length, SECTOR))
    disk.geom = dataclasses.replace(geom, disk_type=DYNAMIC, footer=raw,
                                    copy_valid=True, footer_at_end=True,
                                    parent_unique_id=b"", parent_name="",
                                    locators=())
    if disk.backing is not None:
        disk.backing.close()
        disk.backing = None
    disk.backing_name = disk.backing_format = None

