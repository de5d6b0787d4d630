"""Binary structures declared once, with the specification's field names.

    HEADER = Layout(">", "qcow2 header", "magic:I version:I size:Q")
    hdr = HEADER.unpack_from(buf)       # hdr.version
    HEADER.offset("size")               # 8
    HEADER.pack(magic=..., version=3, size=1 << 30)

The byte order is stated once per structure ("<" or ">").  Field types are
struct format codes; a count prefix ("16s") declares a byte string.
"""

import array
import collections
import struct
import sys


class Layout:
    def __init__(self, byteorder, name, fields):
        self.name = name
        names, codes = [], []
        for item in fields.split():
            field, code = item.split(":")
            names.append(field)
            codes.append(code)
        self.struct = struct.Struct(byteorder + "".join(codes))
        self.size = self.struct.size
        self.fields = tuple(names)
        self.tuple = collections.namedtuple(name.replace(" ", "_"), names)
        self._offsets = {}
        pos = 0
        for field, code in zip(names, codes):
            self._offsets[field] = pos
            pos += struct.calcsize(byteorder + code)

    def offset(self, field):
        """Byte offset of `field` from the start of the structure."""
        return self._offsets[field]

    def unpack_from(self, buf, offset=0):
        return self.tuple._make(self.struct.unpack_from(buf, offset))

    def pack(self, *args, **kwargs):
        return self.struct.pack(*self.tuple(*args, **kwargs))

    def pack_into(self, buf, offset, value):
        self.struct.pack_into(buf, offset, *value)


def be64_array(raw):
    """Big-endian 64-bit table bytes as an array of native ints (the form
    qcow, qcow2 and VHD-like tables take on disk)."""
    table = array.array("Q", bytes(raw))
    if sys.byteorder == "little":
        table.byteswap()
    return table


def be64_bytes(values):
    """The inverse of be64_array."""
    table = array.array("Q", values)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()
