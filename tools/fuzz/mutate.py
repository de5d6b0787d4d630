"""Mutations of a seed image, aimed where a reader trusts the file.

Each format's seed is parsed once into a Shape: its header fields, its
tables of pointers (with the unit and flag bits of their entries), the
offsets a hostile pointer would aim at (the header, every table, data,
the end of the file) and, for VHD and VHDX, how to re-seal checksums so
a mutation gets past them.  A case is one to three of: bit flips, a
boundary integer in a field, a cross-linked, self-pointing, metadata-
pointing or past-the-end table entry, a truncation or extension, and
(VMDK) an edit of the descriptor text.  The layouts come from nbdplug's
own declarations: they only say where to aim.
"""

import random
import struct
import typing

from nbdplug.formats import qcow as QCOW
from nbdplug.formats.qcow2 import structs as Q2
from nbdplug.formats.vhd import structs as VHD
from nbdplug.formats.vhdx import disk as VHDX
from nbdplug.formats.vhdx.log import crc32c
from nbdplug.formats.vmdk import structs as VMDK

KiB, MiB = 1 << 10, 1 << 20


class Field(typing.NamedTuple):
    offset: int
    width: int
    order: str          # "<" or ">"
    name: str


class Table(typing.NamedTuple):
    """Entries that point into the file: entry = (offset // unit) << shift
    under `mask`, other bits (flags) kept."""
    name: str
    offset: int
    count: int
    width: int
    order: str
    unit: int = 1
    shift: int = 0
    mask: int = (1 << 64) - 1
    step: int = 1       # entries between pointers (extended L2: 2)


class Shape(typing.NamedTuple):
    fields: list
    tables: list
    targets: list       # byte offsets worth pointing at
    align: int          # the format's allocation unit
    text: typing.Optional[tuple] = None     # (offset, length) descriptor
    reseal: typing.Optional[typing.Callable] = None


def _layout_fields(layout, base, prefix=""):
    """Field records of a nbdplug Layout placed at `base`."""
    names = layout.fields
    order = layout.struct.format[0]
    out = []
    for i, name in enumerate(names):
        start = layout.offset(name)
        end = layout.offset(names[i + 1]) if i + 1 < len(names) \
            else layout.size
        if end - start <= 8:
            out.append(Field(base + start, end - start, order,
                             prefix + name))
    return out


def _u(data, offset, fmt):
    return struct.unpack_from(fmt, data, offset)[0]


# --- shapes --------------------------------------------------------------

def shape_qcow2(data):
    version = _u(data, 4, ">I")
    layout = Q2.HEADER_V3 if version == 3 else Q2.HEADER_V2
    hdr = layout.unpack_from(data)
    cs = 1 << hdr.cluster_bits
    fields = _layout_fields(layout, 0)
    extended = version == 3 and hdr.incompatible_features & Q2.INCOMPAT_EXTL2
    tables, targets = [], [0, hdr.l1_table_offset,
                           hdr.refcount_table_offset, len(data)]
    pointer = dict(width=8, order=">", mask=Q2.L1E_OFFSET_MASK)
    tables.append(Table("L1", hdr.l1_table_offset, hdr.l1_size, **pointer))
    for i in range(hdr.l1_size):
        l2 = _u(data, hdr.l1_table_offset + 8 * i, ">Q") & Q2.L1E_OFFSET_MASK
        if l2 and l2 + cs <= len(data):
            targets.append(l2)
            tables.append(Table(f"L2[{i}]", l2, cs // 8,
                                step=2 if extended else 1, **pointer))
            for j in range(0, cs // 8, 2 if extended else 1):
                host = _u(data, l2 + 8 * j, ">Q") & Q2.L2E_OFFSET_MASK
                if host:
                    targets.append(host)
    reft = Table("refcount table", hdr.refcount_table_offset,
                 hdr.refcount_table_clusters * cs // 8, width=8, order=">",
                 mask=Q2.REFT_OFFSET_MASK)
    tables.append(reft)
    width = max(1, (1 << (hdr.refcount_order if version == 3 else 4)) // 8)
    for i in range(min(reft.count, 64)):
        block = _u(data, reft.offset + 8 * i, ">Q") & Q2.REFT_OFFSET_MASK
        if block and block + cs <= len(data):
            targets.append(block)
            fields += [Field(block + k * width, width, ">", "refcount")
                       for k in range(0, min(cs // width, 64))]
    if hdr.nb_snapshots:
        targets.append(hdr.snapshots_offset)
        pos = hdr.snapshots_offset
        for n in range(hdr.nb_snapshots):
            e = Q2.SNAPSHOT_ENTRY.unpack_from(data, pos)
            fields += _layout_fields(Q2.SNAPSHOT_ENTRY, pos, f"snapshot{n}.")
            tables.append(Table(f"snapshot {n} L1", e.l1_table_offset,
                                e.l1_size, **pointer))
            targets.append(e.l1_table_offset)
            pos += Q2.SNAPSHOT_ENTRY.size + e.extra_data_size + \
                e.id_str_size + e.name_size
            pos = -(-pos // 8) * 8
    # The header extensions, one field per word.
    ext_end = min(cs, len(data))
    fields += [Field(o, 4, ">", "extension") for o in
               range(hdr.header_length if version == 3 else 72, ext_end, 4)
               if any(data[o:o + 4])]
    return Shape(fields, tables, sorted(set(targets)), cs)


def shape_qcow(data):
    hdr = QCOW.HEADER.unpack_from(data)
    fields = _layout_fields(QCOW.HEADER, 0)
    l2_bytes = 8 << hdr.l2_bits
    l1_entries = -(-hdr.size // (1 << (hdr.cluster_bits + hdr.l2_bits)))
    tables = [Table("L1", hdr.l1_table_offset, l1_entries, 8, ">")]
    targets = [0, hdr.l1_table_offset, len(data)]
    for i in range(l1_entries):
        l2 = _u(data, hdr.l1_table_offset + 8 * i, ">Q")
        if l2 and l2 + l2_bytes <= len(data):
            targets.append(l2)
            tables.append(Table(f"L2[{i}]", l2, l2_bytes // 8, 8, ">",
                                mask=(1 << 63) - 1))
            targets += [e & ((1 << 63) - 1) for e in
                        struct.unpack_from(f">{l2_bytes // 8}Q", data, l2)
                        if e]
    return Shape(fields, tables, sorted(set(targets)), 1 << hdr.cluster_bits)


def shape_vmdk(data):
    S = VMDK
    hdr = S.SPARSE_HEADER.unpack_from(data)
    fields = _layout_fields(S.SPARSE_HEADER, 0)
    tables, targets = [], [0, len(data)]
    where = hdr
    if hdr.gdOffset == S.GD_AT_END:
        footer = len(data) - 1024
        where = S.SPARSE_HEADER.unpack_from(data, footer)
        fields += _layout_fields(S.SPARSE_HEADER, footer, "footer.")
    grain_sectors = max(1, hdr.grainSize)
    gtes = max(1, hdr.numGTEsPerGT)
    gd_entries = -(-hdr.capacity // (grain_sectors * gtes))
    sector = dict(width=4, order="<", unit=512, mask=0xFFFFFFFF)
    for name, gd in (("GD", where.gdOffset), ("RGD", where.rgdOffset)):
        if not gd or gd * 512 >= len(data):
            continue
        targets.append(gd * 512)
        tables.append(Table(name, gd * 512, gd_entries, **sector))
        for i in range(gd_entries):
            gt = _u(data, gd * 512 + 4 * i, "<I")
            if gt and gt * 512 + 4 * gtes <= len(data):
                targets.append(gt * 512)
                tables.append(Table(f"{name} GT[{i}]", gt * 512, gtes,
                                    **sector))
                targets += [e * 512 for e in struct.unpack_from(
                    f"<{gtes}I", data, gt * 512) if e > 1]
    text = None
    if hdr.descriptorOffset and hdr.descriptorSize:
        text = (hdr.descriptorOffset * 512, hdr.descriptorSize * 512)
        targets.append(text[0])
    return Shape(fields, tables, sorted(set(targets)),
                 grain_sectors * 512, text=text)


def shape_vpc(data):
    S = VHD
    foot_at = len(data) - 512
    fields = _layout_fields(S.FOOTER, foot_at, "footer.")
    foot = S.FOOTER.unpack_from(data, foot_at)
    tables, targets = [], [0, len(data)]
    if foot.disk_type != S.FIXED and foot.data_offset + 1024 <= len(data):
        fields += _layout_fields(S.FOOTER, 0, "footer copy.")
        hdr = S.DYNAMIC_HEADER.unpack_from(data, foot.data_offset)
        fields += _layout_fields(S.DYNAMIC_HEADER, foot.data_offset,
                                 "header.")
        targets += [foot.data_offset, hdr.table_offset]
        tables.append(Table("BAT", hdr.table_offset, hdr.max_table_entries,
                            4, ">", unit=512, mask=0xFFFFFFFF))
        for i in range(hdr.max_table_entries):
            entry = _u(data, hdr.table_offset + 4 * i, ">I")
            if entry != S.UNUSED:
                targets.append(entry * 512)
                fields.append(Field(entry * 512, 4, ">", f"bitmap[{i}]"))
    return Shape(fields, tables, sorted(set(targets)), 512,
                 reseal=reseal_vpc)


def reseal_vpc(data):
    """Recompute the checksums of the footers and the dynamic header."""
    S = VHD
    for at in (0, len(data) - 512):
        if at >= 0 and data[at:at + 8] == S.COOKIE:
            _seal_sum(data, at, S.FOOTER.size, S.FOOTER.offset("checksum"))
            foot = S.FOOTER.unpack_from(data, at)
            hdr_at = foot.data_offset
            if hdr_at + 1024 <= len(data) and \
                    data[hdr_at:hdr_at + 8] == S.DYNAMIC_COOKIE:
                _seal_sum(data, hdr_at, S.DYNAMIC_HEADER.size,
                          S.DYNAMIC_HEADER.offset("checksum"))


def _seal_sum(data, at, size, field):
    block = data[at:at + size]
    struct.pack_into(">I", data, at + field, VHD.checksum(block, field))


def shape_vhdx(data):
    S = VHDX
    fields, tables, targets = [], [], [0, len(data)]
    for at in S.HEADER_OFFSETS:
        fields += _layout_fields(S.HEADER, at, "header.")
        targets.append(at)
    bat = meta = None
    for at in S.REGION_TABLE_OFFSETS:
        fields += _layout_fields(S.REGION_TABLE_HEADER, at, "regions.")
        count = _u(data, at + 8, "<I")
        for i in range(min(count, 8)):
            pos = at + S.REGION_TABLE_HEADER.size + \
                i * S.REGION_TABLE_ENTRY.size
            fields += _layout_fields(S.REGION_TABLE_ENTRY, pos, "region.")
            e = S.REGION_TABLE_ENTRY.unpack_from(data, pos)
            targets.append(e.file_offset)
            if e.guid == S.BAT_REGION:
                bat = e
            elif e.guid == S.METADATA_REGION:
                meta = e
    if meta is not None and meta.file_offset + 64 * KiB <= len(data):
        count = _u(data, meta.file_offset + 10, "<H")
        for i in range(min(count, 16)):
            pos = meta.file_offset + 32 + 32 * i
            fields += _layout_fields(S.METADATA_TABLE_ENTRY, pos, "item.")
            e = S.METADATA_TABLE_ENTRY.unpack_from(data, pos)
            item = meta.file_offset + e.offset
            fields += [Field(item + k, 4, "<", "item value")
                       for k in range(0, min(e.length, 16), 4)]
    if bat is not None and bat.file_offset + bat.length <= len(data):
        tables.append(Table("BAT", bat.file_offset, bat.length // 8, 8, "<",
                            unit=MiB, shift=20, mask=~0xFFFFF & ((1 << 64)
                                                                 - 1)))
        fields += [Field(bat.file_offset + 8 * i, 1, "<", "BAT state")
                   for i in range(min(bat.length // 8, 16))]
        for i in range(bat.length // 8):
            entry = _u(data, bat.file_offset + 8 * i, "<Q")
            if entry >> 20:
                targets.append((entry >> 20) << 20)
    return Shape(fields, tables, sorted(set(targets)), MiB,
                 reseal=reseal_vhdx)


def reseal_vhdx(data):
    """Recompute the CRC-32C of both headers and both region tables."""
    S = VHDX
    for at, size in [(a, S.HEADER_SIZE) for a in S.HEADER_OFFSETS] + \
            [(a, S.REGION_TABLE_SIZE) for a in S.REGION_TABLE_OFFSETS]:
        if at + size > len(data):
            continue
        struct.pack_into("<I", data, at + 4, 0)
        struct.pack_into("<I", data, at + 4, crc32c(data[at:at + size]))


SHAPES = {"qcow2": shape_qcow2, "qcow": shape_qcow, "vmdk": shape_vmdk,
          "vpc": shape_vpc, "vhdx": shape_vhdx}


# --- mutations -----------------------------------------------------------

def _boundaries(width, old, file_size, align):
    top = (1 << (8 * width)) - 1
    values = [0, 1, 2, top, top - 1, 1 << (8 * width - 1),
              (1 << (8 * width - 1)) - 1, old + 1, old - 1, old * 2,
              old // 2, old ^ 0x80, file_size, file_size // 512,
              file_size // align, file_size // align + 1, 0x7FFFFFFF,
              0x80000000, 0xFFFFFFFF, 512, 4096, 65536, MiB, 1 << 30,
              1 << 40, 1 << 62]
    return [v for v in values if 0 <= v <= top]


def _put(data, field, value):
    data[field.offset:field.offset + field.width] = value.to_bytes(
        field.width, "little" if field.order == "<" else "big")


def _get(data, field):
    return int.from_bytes(data[field.offset:field.offset + field.width],
                          "little" if field.order == "<" else "big")


def flip(rng, data, shape):
    if shape.fields and rng.random() < 0.7:
        f = rng.choice(shape.fields)
        if f.offset + f.width > len(data):
            return "flip (field gone)"
        bit = rng.randrange(8 * f.width)
        _put(data, f, _get(data, f) ^ (1 << bit))
        return f"flip bit {bit} of {f.name} at {f.offset:#x}"
    if not data:
        return "flip (empty file)"
    at = rng.randrange(min(len(data), 4 * MiB))
    data[at] ^= 1 << rng.randrange(8)
    return f"flip a bit of byte {at:#x}"


def boundary(rng, data, shape):
    f = rng.choice(shape.fields)
    if f.offset + f.width > len(data):
        return "boundary (field gone)"
    value = rng.choice(_boundaries(f.width, _get(data, f), len(data),
                                   shape.align))
    _put(data, f, value)
    return f"{f.name} at {f.offset:#x} := {value:#x}"


def pointer(rng, data, shape):
    """Aim a table entry at another entry's target (cross-link), its own
    table (self), other metadata, past the end, or off alignment."""
    tables = [t for t in shape.tables if t.count and
              t.offset + t.width * t.count <= len(data)]
    if not tables:
        return boundary(rng, data, shape)
    t = rng.choice(tables)
    i = rng.randrange(0, t.count, t.step)
    field = Field(t.offset + t.width * i, t.width, t.order, t.name)
    old = _get(data, field)
    kind = rng.choice(["cross", "self", "metadata", "past end", "unaligned",
                       "zero"])
    if kind == "cross":
        others = [j for j in range(0, min(t.count, 4096), t.step)
                  if j != i and _get(data, field._replace(
                      offset=t.offset + t.width * j))]
        if others:
            j = rng.choice(others)
            value = _get(data, field._replace(offset=t.offset + t.width * j))
            _put(data, field, value)
            return f"{t.name}[{i}] := {t.name}[{j}] ({value:#x})"
        kind = "metadata"
    if kind == "self":
        target = t.offset
    elif kind == "metadata":
        target = rng.choice(shape.targets)
    elif kind == "past end":
        target = len(data) + rng.choice([0, shape.align, 1 << 30])
    elif kind == "unaligned":
        target = rng.choice(shape.targets) + rng.choice([1, 512, 4096])
    else:
        target = 0
    flags = old & ~t.mask
    if rng.random() < 0.3:
        flags ^= 1 << (8 * t.width - 1)         # qcow2's COPIED and kin
    value = (((target // t.unit) << t.shift) & t.mask) | flags
    _put(data, field, value)
    return f"{t.name}[{i}] := {value:#x} ({kind})"


def truncate(rng, data, shape):
    n = len(data)
    size = rng.choice([rng.randrange(n + 1), n - 1, n - 512, n // 2, n + 1,
                       n + 512, -(-n // shape.align) * shape.align - 1,
                       max(0, shape.align * rng.randrange(max(1, n //
                                                              shape.align)))])
    size = max(0, size)
    if size < n:
        del data[size:]
    else:
        data.extend(bytes(size - n))
    return f"size {n} -> {size}"


def _drop_line(lines, rng):
    k = rng.randrange(len(lines))
    return lines[:k] + lines[k + 1:]


def _extent_size(lines, rng):
    return [_edit_number(line, rng) if line.startswith((b"RW ", b"RDONLY "))
            else line for line in lines]


def _create_type(lines, rng):
    kind = rng.choice([b"vmfs", b"monolithicFlat", b"streamOptimized", b"x"])
    return [b'createType="' + kind + b'"' if line.startswith(b"createType")
            else line for line in lines]


def _garbage(lines, rng):
    return lines + [bytes(rng.randrange(32, 127) for _ in range(40))]


def _parent_cid(lines, rng):
    return [b"parentCID=12345678" if line.startswith(b"parentCID") else line
            for line in lines]


EDITS = [("blank", lambda lines, rng: []), ("drop line", _drop_line),
         ("duplicate line", lambda lines, rng: lines + [rng.choice(lines)]),
         ("extent size", _extent_size), ("create type", _create_type),
         ("garbage", _garbage), ("parent CID", _parent_cid)]


def _edit_number(line, rng):
    parts = line.split(b" ")
    if len(parts) > 1 and parts[1].isdigit():
        n = int(parts[1])
        parts[1] = str(rng.choice([0, 1, n - 1, n + 1, n * 2, 1 << 40])
                       ).encode()
    return b" ".join(parts)


def descriptor(rng, data, shape):
    if shape.text is None:
        return flip(rng, data, shape)
    at, size = shape.text
    text = bytes(data[at:at + size]).split(b"\0", 1)[0]
    lines = text.split(b"\n") or [b""]
    name, edit = rng.choice(EDITS)
    new = b"\n".join(edit(lines, rng) if lines else lines)
    data[at:at + size] = new[:size].ljust(size, b"\0")
    return f"descriptor: {name}"


OPERATORS = [(flip, 3), (boundary, 3), (pointer, 4), (truncate, 1),
             (descriptor, 1)]


def mutate(rng, data, shape):
    """Apply one to three mutations to the bytearray `data`; returns
    what was done.  Checksums are re-sealed most of the time, so the
    mutation reaches the code behind them."""
    steps = []
    ops, weights = zip(*OPERATORS)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        op = rng.choices(ops, weights)[0]
        if not shape.fields and op in (flip, boundary):
            op = truncate
        steps.append(op(rng, data, shape))
    if shape.reseal and rng.random() < 0.8:
        shape.reseal(data)
        steps.append("checksums re-sealed")
    return "; ".join(steps)


def new_rng(seed):
    return random.Random(seed)
