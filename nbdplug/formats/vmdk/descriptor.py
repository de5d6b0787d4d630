"""VMDK text descriptors: parsed within fixed bounds, and written.

A descriptor is a short text file, or text embedded in a monolithic sparse
extent, of the form (Virtual Disk Format 1.1, "The Descriptor File"):

    # Disk DescriptorFile
    version=1
    CID=fffffffe
    parentCID=ffffffff
    createType="monolithicSparse"
    parentFileNameHint="base.vmdk"          (delta disks only)
    RW 16777216 SPARSE "disk.vmdk"           (access, sectors, type, file)
    RW 4192256 FLAT "disk-f001.vmdk" 0       (flat: offset in sectors)
    ddb.adapterType = "ide"

Comments and blank lines are skipped; any other line must be a key=value
pair or an extent line, or the descriptor is refused.  Names are text the
image's author chose: they are only resolved through the open policy.
"""

import dataclasses
import re
import typing

from nbdplug.errors import CorruptImage, UnsupportedFeature
from .structs import DESCRIPTOR_MAGIC

# Bounds on text we read from images.  A descriptor for a 64 TiB disk in
# 2 GiB extents is about 1.3 MB; a line holds at most a path (PATH_MAX
# 4096) and a few fields.
MAX_DESCRIPTOR = 2 << 20
MAX_LINE = 8192
MAX_EXTENTS = 32768

NO_PARENT = 0xFFFFFFFF

CREATE_TYPES = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat", "streamOptimized", "vmfs",
}
# Extent types we read; the others are named in the refusal.
EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS")
OTHER_EXTENT_TYPES = ("VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")

_EXTENT = re.compile(rb'^(RW|RDONLY|NOACCESS)\s+(\d{1,20})\s+([A-Z]+)'
                     rb'(?:\s+"([^"]*)"(?:\s+(\d{1,20}))?)?$')
_KEY = re.compile(rb'^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*)$')
_CID = re.compile(rb'^(CID\s*=\s*"?)([0-9a-fA-F]{1,8})"?$')
_BOM = b"\xef\xbb\xbf"            # Windows editors save one


class ExtentLine(typing.NamedTuple):
    access: str                 # RW, RDONLY or NOACCESS
    sectors: int
    type: str                   # SPARSE, FLAT, ZERO or VMFS
    filename: typing.Optional[str]
    offset_sectors: int         # where a FLAT/VMFS extent starts in its file


@dataclasses.dataclass
class Descriptor:
    version: int
    cid: typing.Optional[int]
    parent_cid: int
    create_type: str
    parent_hint: typing.Optional[str]
    extents: list
    keys: dict                  # every key=value, ddb.* included
    cid_span: typing.Optional[tuple] = None   # (start, end) of CID's digits

    @property
    def has_parent(self):
        return self.parent_hint is not None


def parse(data, path, fmt="vmdk", lenient=False):
    """Parse descriptor bytes (text up to the first NUL) from `path`.

    `lenient` (the embedded descriptor of a sparse extent opened to read,
    where the header, not the text, gives the layout) skips lines it does
    not understand and keeps the first of a key given twice, as qemu,
    which only looks for the keys it needs."""
    def corrupt(reason, field="descriptor", cls=CorruptImage):
        return cls(path, fmt, reason, field)

    if len(data) > MAX_DESCRIPTOR:
        raise corrupt(f"descriptor is larger than {MAX_DESCRIPTOR} bytes")
    data = bytes(data).split(b"\0", 1)[0]
    keys, extents = {}, []
    cid_span = None
    pos = 0
    for number, raw in enumerate(data.split(b"\n"), 1):
        start, pos = pos, pos + len(raw) + 1
        try:
            line = _line(raw, number, keys, extents, corrupt)
        except (CorruptImage, UnsupportedFeature):
            if lenient:
                continue
            raise
        if line is not None:
            c = _CID.match(line)
            first = start + raw.index(line) + len(c.group(1))
            cid_span = (first, first + len(c.group(2)))
    return _interpret(keys, extents, cid_span, corrupt, lenient)


def _line(raw, number, keys, extents, corrupt):
    """Take one line into `keys` or `extents`; return the stripped line
    if it sets the CID."""
    if len(raw) > MAX_LINE:
        raise corrupt(f"line {number} is longer than {MAX_LINE} bytes")
    line = raw.strip().removeprefix(_BOM).strip()
    if not line or line.startswith(b"#"):
        return None
    m = _EXTENT.match(line)
    if m:
        if len(extents) >= MAX_EXTENTS:
            raise corrupt(f"more than {MAX_EXTENTS} extents")
        extents.append(_extent(m, number, corrupt))
        return None
    m = _KEY.match(line)
    if not m:
        shown = line[:40].decode("ascii", "backslashreplace")
        raise corrupt(f"line {number} is not understood: {shown!r}")
    key = m.group(1).decode()
    if key in keys:
        raise corrupt(f"line {number}: {key} is given twice")
    value = _unquote(m.group(2)).decode("utf-8", "surrogateescape")
    if key == "CID" and not _CID.match(line):
        raise corrupt("is not a 32-bit hexadecimal number", "CID")
    keys[key] = value
    return line if key == "CID" else None


def _unquote(value):
    value = value.strip()
    if len(value) >= 2 and value[:1] == value[-1:] == b'"':
        return value[1:-1]
    return value


def _extent(m, number, corrupt):
    access, sectors, kind, name, offset = m.groups()
    kind = kind.decode()
    if kind in OTHER_EXTENT_TYPES:
        raise corrupt(f"line {number}: {kind} extents are not supported",
                      cls=UnsupportedFeature)
    if kind not in EXTENT_TYPES:
        raise corrupt(f"line {number}: unknown extent type {kind!r}")
    if kind == "ZERO":
        if name is not None:
            raise corrupt(f"line {number}: a ZERO extent names no file")
    elif name is None or not name:
        raise corrupt(f"line {number}: a {kind} extent needs a file name")
    if offset is not None and kind not in ("FLAT", "VMFS"):
        raise corrupt(f"line {number}: only flat extents take an offset")
    if int(sectors) == 0:
        raise corrupt(f"line {number}: an extent of 0 sectors")
    return ExtentLine(access.decode(), int(sectors), kind,
                      None if name is None
                      else name.decode("utf-8", "surrogateescape"),
                      int(offset or 0))


def _interpret(keys, extents, cid_span, corrupt, lenient=False):
    if lenient:
        # Only what reading takes: the CID and the parent (qemu reads no
        # more), unusable values dropped.
        keys = dict(keys)
        for key, check in (("version", ("1", "2", "3").__contains__),
                           ("createType", CREATE_TYPES.__contains__),
                           ("parentCID", _is_hex), ("CID", _is_hex),
                           ("parentFileNameHint", bool)):
            if key in keys and not check(keys[key]):
                del keys[key]
        keys.setdefault("createType", "monolithicSparse")
    version = keys.get("version", "1")
    if version not in ("1", "2", "3"):
        raise corrupt(f"descriptor version {version!r} is not supported",
                      "version", UnsupportedFeature)
    create_type = keys.get("createType")
    if create_type is None:
        raise corrupt("no createType: not a VMDK descriptor", "createType")
    if create_type not in CREATE_TYPES:
        raise corrupt(f"{create_type!r} disks are not supported",
                      "createType", UnsupportedFeature)
    cid = _hex(keys["CID"], "CID", corrupt) if "CID" in keys else None
    parent_cid = _hex(keys.get("parentCID", "ffffffff"), "parentCID",
                      corrupt)
    hint = keys.get("parentFileNameHint")
    if hint is not None and not hint:
        raise corrupt("is empty", "parentFileNameHint")
    return Descriptor(int(version), cid, parent_cid, create_type, hint,
                      extents, keys, cid_span if "CID" in keys else None)


def _is_hex(text):
    return re.fullmatch(r"[0-9a-fA-F]{1,8}", text) is not None


def _hex(text, field, corrupt):
    if not _is_hex(text):
        raise corrupt("is not a 32-bit hexadecimal number", field)
    return int(text, 16)


def render(create_type, cid, extents, ddb, parent_cid=NO_PARENT,
           parent_hint=None):
    """Descriptor text for a new image, laid out as VMware writes it.

    `extents` are ExtentLine; `ddb` maps ddb.* keys to values.
    """
    lines = ["# Disk DescriptorFile", "version=1", f"CID={cid:08x}",
             f"parentCID={parent_cid:08x}", f'createType="{create_type}"']
    if parent_hint is not None:
        lines.append(f'parentFileNameHint="{parent_hint}"')
    lines += ["", "# Extent description"]
    for e in extents:
        line = f"{e.access} {e.sectors} {e.type}"
        if e.filename is not None:
            line += f' "{e.filename}"'
        if e.type in ("FLAT", "VMFS"):
            line += f" {e.offset_sectors}"
        lines.append(line)
    lines += ["", "# The Disk Data Base", "#DDB", ""]
    lines += [f'{key} = "{value}"' for key, value in ddb.items()]
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def is_descriptor(head):
    """Does a file starting with `head` look like a text descriptor?"""
    return head.removeprefix(_BOM).startswith(DESCRIPTOR_MAGIC)
