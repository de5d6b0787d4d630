"""Creating fixed, dynamic and differencing VHDs."""

import os
import struct
import time
import urllib.parse
import uuid

from nbdplug import options
from nbdplug.errors import UsageError
from nbdplug.hostfile import HostFile
from .header import validate
from .structs import (COOKIE, CREATOR_APPLICATION, DEFAULT_BLOCK_SIZE,
                      DIFFERENCING, DYNAMIC, DYNAMIC_COOKIE, DYNAMIC_HEADER,
                      FIXED, FMT, FOOTER, MACX, MAX_BLOCK_SIZE, MAX_GEOMETRY,
                      MAX_SIZE, MIN_BLOCK_SIZE, MiB, NO_OFFSET,
                      PARENT_LOCATOR, SECTOR, VERSION, VHD_EPOCH, W2KU, W2RU,
                      checksum, round_up)


OPTIONS = {
    "subformat": options.choice("dynamic", ("dynamic", "fixed")),
    "block_size": options.size(DEFAULT_BLOCK_SIZE),
    # Unlike qemu-img, the size asked for by default; off rounds it up to
    # a CHS geometry as qemu-img does.
    "force_size": options.boolean(True),
}


def chs_geometry(size):
    """Cylinders, heads, sectors per track: the specification's appendix
    algorithm, or the maximum geometry when the result does not multiply
    back to `size` (qemu then reads the footer's size, as Hyper-V does)."""
    cylinders, heads, spt = _appendix_geometry(size // SECTOR)
    if cylinders * heads * spt * SECTOR != size:
        return MAX_GEOMETRY
    return cylinders, heads, spt


def geometry_size(size):
    """`size` rounded up to the first whole CHS geometry, as qemu-img
    create does unless told force_size=on (Virtual PC sizes a disk by its
    geometry)."""
    total = size // SECTOR
    extra = 0
    while True:
        c, h, s = _appendix_geometry(total + extra)
        if c * h * s >= total or (c, h, s) == (65535, 16, 255):
            return c * h * s * SECTOR
        extra += 1


def _appendix_geometry(total):
    """The specification's appendix: CHS for `total` sectors."""
    total = min(total, 65535 * 16 * 255)
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = total // spt
    else:
        spt = 17
        cth = total // spt
        heads = max(4, (cth + 1023) // 1024)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = total // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = total // spt
    return cth // heads, heads, spt


def _now():
    return max(0, int(time.time()) - VHD_EPOCH) & 0xFFFFFFFF


def _new_footer(size, disk_type):
    cylinders, heads, spt = chs_geometry(size)
    fields = dict(cookie=COOKIE, features=2, file_format_version=VERSION,
                  data_offset=NO_OFFSET if disk_type == FIXED else SECTOR,
                  time_stamp=_now(), creator_application=CREATOR_APPLICATION,
                  creator_version=0x00010000, creator_host_os=b"Wi2k",
                  original_size=size, current_size=size,
                  cylinders=cylinders, heads=heads, sectors_per_track=spt,
                  disk_type=disk_type, checksum=0,
                  unique_id=uuid.uuid4().bytes, saved_state=0,
                  reserved=bytes(427))
    return with_checksum(FOOTER, fields)


def with_checksum(layout, fields):
    raw = bytearray(layout.pack(**fields))
    struct.pack_into(">I", raw, layout.offset("checksum"),
                     checksum(raw, layout.offset("checksum")))
    return bytes(raw)


def parent_facts(path, backing):
    """What a differencing child records of its parent (already vetted
    by the open policy): unique id, size, time stamp and locators."""
    child_dir = os.path.dirname(os.path.abspath(path))
    parent = os.path.abspath(os.path.join(child_dir, backing))
    file = HostFile(parent)
    try:
        geom = validate(file, parent)
        mtime = int(os.fstat(file.fd).st_mtime)
    finally:
        file.close()
    relative = os.path.relpath(parent, child_dir)
    try:
        unicode_name = backing.encode("utf-16-be")
        locators = [
            (W2RU, (".\\" + relative.replace("/", "\\")).encode(
                "utf-16-le")),
            (W2KU, parent.replace("/", "\\").encode("utf-16-le")),
            (MACX, ("file://" + urllib.parse.quote(parent)).encode("utf-8")),
        ]
    except UnicodeEncodeError:
        # (Names not valid in UTF-8 reach us as lone surrogates.)
        raise UsageError(f"parent name {backing!r} cannot be written in "
                         "UTF-16") from None
    # 512 bytes, one UTF-16 unit kept for the terminating NUL.
    if len(unicode_name) > 510:
        raise UsageError(f"parent name {backing!r} is longer than the 255 "
                         "UTF-16 characters a VHD records")
    return {"size": geom.size, "unique_id": geom.unique_id,
            "time_stamp": max(0, mtime - VHD_EPOCH) & 0xFFFFFFFF,
            "name": backing, "unicode_name": unicode_name,
            "locators": locators}


def _dynamic_layout(size, block_size, footer, parent):
    """The bytes of a new dynamic or differencing VHD with an empty BAT:
    footer copy, dynamic header, locator data, BAT, footer."""
    entries = -(-size // block_size)
    pos = SECTOR + DYNAMIC_HEADER.size
    locator_entries, locator_data = bytearray(192), bytearray()
    for i, (code, data) in enumerate(parent["locators"] if parent else ()):
        space = round_up(len(data), SECTOR)
        # Space in bytes, as Virtual PC and Hyper-V write it (the
        # specification says sectors).
        PARENT_LOCATOR.pack_into(locator_entries, i * PARENT_LOCATOR.size,
                                 PARENT_LOCATOR.tuple(code, space, len(data),
                                                      0, pos))
        locator_data += data + bytes(space - len(data))
        pos += space
    header = dict(cookie=DYNAMIC_COOKIE, data_offset=NO_OFFSET,
                  table_offset=pos, header_version=VERSION,
                  max_table_entries=entries, block_size=block_size,
                  checksum=0, parent_unique_id=bytes(16),
                  parent_time_stamp=0, reserved1=0,
                  parent_unicode_name=bytes(512),
                  parent_locator_entries=bytes(locator_entries),
                  reserved2=bytes(256))
    if parent:
        header.update(parent_unique_id=parent["unique_id"],
                      parent_time_stamp=parent["time_stamp"],
                      parent_unicode_name=parent["unicode_name"])
    bat = b"\xff" * (4 * entries)
    bat += b"\xff" * (round_up(len(bat), SECTOR) - len(bat))
    return b"".join([footer, with_checksum(DYNAMIC_HEADER, header),
                     bytes(locator_data), bat, footer])


def create(path, size, opts, backing=None):
    """Write a new fixed, dynamic or differencing VHD; `opts` parsed from
    OPTIONS, `backing` an nbdplug.disk.Backing or None."""
    subformat, block_size = opts["subformat"], opts["block_size"]
    if not opts["force_size"]:
        size = geometry_size(size)
    if block_size & (block_size - 1) or \
            not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise UsageError(f"block_size {block_size}: a power of two from "
                         f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE // MiB}M")
    if size % SECTOR or size > MAX_SIZE:
        raise UsageError(f"size {size}: a VHD is a whole number of "
                         "512-byte sectors, at most 2040 GiB")
    parent = None
    if backing is not None:
        if subformat == "fixed":
            raise UsageError("a fixed VHD cannot have a parent")
        if backing.format != FMT:
            raise UsageError(f"the parent of a differencing VHD must be "
                             f"a VHD, not {backing.format}")
        parent = parent_facts(path, backing.name)
        if size != parent["size"]:
            raise UsageError(f"size {size} differs from the parent's "
                             f"{parent['size']}")
    disk_type = FIXED if subformat == "fixed" else \
        DIFFERENCING if parent else DYNAMIC
    footer = _new_footer(size, disk_type)
    with open(path, "xb") as f:
        if disk_type == FIXED:
            f.truncate(size)
            f.seek(size)
            f.write(footer)
            return
        f.write(_dynamic_layout(size, block_size, footer, parent))
