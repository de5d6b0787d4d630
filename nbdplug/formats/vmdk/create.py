"""Creating VMDK images of every common subformat.

    nbdplug create -f vmdk -o subformat=twoGbMaxExtentSparse,
        adapter_type=lsilogic,hwversion=6 disk.vmdk 40G

Sparse extents are laid out as VMware and qemu lay them out: header,
embedded descriptor (monolithic only), redundant directory and its tables,
directory and its tables, grains from overHead on, all tables
preallocated.  streamOptimized uses the same layout with deflated grains
behind markers (version 3, as ESXi requires), and ends in a footer and an
end-of-stream marker.  Flat extents are sparse files of their full size.
A delta disk (-b) is monolithicSparse or twoGbMaxExtentSparse, records
the parent's CID, and names the parent as given.
"""

import os

from nbdplug import options
from nbdplug.errors import UsageError
from . import descriptor
from .descriptor import ExtentLine
from .structs import (COMPRESSION_DEFLATE, COMPRESSION_NONE, FLAG_COMPRESSED,
                      FLAG_MARKERS, FLAG_NEWLINE_TEST, FLAG_REDUNDANT_GD,
                      FLAG_ZEROED_GRAIN, GTE_SIZE, MARKER_EOS, MARKER_FOOTER,
                      METADATA_MARKER, SECTOR, SPARSE_HEADER, SPARSE_MAGIC)

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse",
              "twoGbMaxExtentFlat", "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
OPTIONS = {
    "subformat": options.choice("monolithicSparse", SUBFORMATS),
    "adapter_type": options.choice("ide", ADAPTER_TYPES),
    "hwversion": options.integer(4),
    "zeroed_grain": options.boolean(),
}

GRAIN_SECTORS = 128             # 64 KiB, VMware's and qemu's grain
GTES_PER_GT = 512
DESCRIPTOR_SECTORS = 20         # room for an embedded descriptor
# Split extents hold 2047 MiB, as VMware's do: a full sparse extent with
# its tables still stays below 2 GiB.
SPLIT_SECTORS = 4192256


def create(path, size, opts, backing=None):
    """A new image; `opts` parsed from OPTIONS, `backing` an
    nbdplug.disk.Backing or None."""
    if not 1 <= opts["hwversion"] <= 99:
        raise UsageError(f"hwversion={opts['hwversion']}: expected a "
                         "virtual hardware version, 1 to 99")
    subformat = opts["subformat"]
    sectors = -(-size // SECTOR)
    if sectors <= 0:
        raise UsageError("a VMDK disk needs a size above 0")
    parent_cid = descriptor.NO_PARENT
    if backing is not None:
        if subformat not in ("monolithicSparse", "twoGbMaxExtentSparse"):
            raise UsageError(f"a {subformat} disk cannot have a parent; use "
                             "monolithicSparse or twoGbMaxExtentSparse")
        if backing.format != "vmdk":
            raise UsageError(f"the parent of a VMDK disk must be VMDK, not "
                             f"{backing.format}")
        if backing.disk.cid is None:
            raise UsageError(f"{backing.name}: the parent has no descriptor "
                             "to take a CID from")
        parent_cid = backing.disk.cid
    zeroed = opts["zeroed_grain"]
    if zeroed and subformat not in ("monolithicSparse",
                                    "twoGbMaxExtentSparse"):
        raise UsageError("zeroed_grain needs a sparse subformat")
    cid = int.from_bytes(os.urandom(4), "little") % 0xFFFFFFFE
    stem = os.path.basename(path)
    if stem.endswith(".vmdk"):
        stem = stem[:-5]
    directory = os.path.dirname(os.path.abspath(path))
    ddb = _ddb(sectors, opts["adapter_type"], opts["hwversion"])

    def text(lines):
        return descriptor.render(subformat, cid, lines, ddb, parent_cid,
                                 backing and backing.name)

    created = []
    try:
        if subformat in ("monolithicSparse", "streamOptimized"):
            name = os.path.basename(path)
            desc = text([ExtentLine("RW", sectors, "SPARSE", name, 0)])
            _write_sparse(path, sectors, desc, created,
                          stream=subformat == "streamOptimized",
                          zeroed=zeroed)
            return
        kind = "SPARSE" if subformat.endswith("Sparse") else "FLAT"
        if subformat == "monolithicFlat":
            sizes, names = [sectors], [f"{stem}-flat.vmdk"]
        else:
            sizes = [min(SPLIT_SECTORS, sectors - start)
                     for start in range(0, sectors, SPLIT_SECTORS)]
            letter = kind[0].lower()
            names = [f"{stem}-{letter}{i:03d}.vmdk"
                     for i in range(1, len(sizes) + 1)]
        lines = [ExtentLine("RW", n, kind, name, 0)
                 for n, name in zip(sizes, names)]
        desc = text(lines)
        for n, name in zip(sizes, names):
            extent = os.path.join(directory, name)
            if kind == "SPARSE":
                _write_sparse(extent, n, None, created, zeroed=zeroed)
            else:
                _write_file(extent, [], n * SECTOR, created)
        _write_file(path, [(0, desc)], len(desc), created)
    except BaseException:
        for p in created:
            try:
                os.unlink(p)
            except OSError:
                pass
        raise


def _ddb(sectors, adapter_type, hwversion):
    """The disk database: BIOS geometry as VMware derives it (16 heads
    for IDE, 255 for SCSI adapters; 63 sectors per track; IDE cylinders
    stop at the ATA limit of 16383, where qemu does not stop)."""
    heads = 16 if adapter_type == "ide" else 255
    cylinders = sectors // (heads * 63)
    if adapter_type == "ide":
        cylinders = min(cylinders, 16383)
    return {"ddb.virtualHWVersion": str(hwversion),
            "ddb.geometry.cylinders": str(cylinders),
            "ddb.geometry.heads": str(heads),
            "ddb.geometry.sectors": "63",
            "ddb.adapterType": adapter_type}


def _write_sparse(path, sectors, desc, created, stream=False, zeroed=False):
    """A hosted sparse extent of `sectors`, every table preallocated."""
    gt_count = -(-sectors // (GRAIN_SECTORS * GTES_PER_GT))
    gd_sectors = -(-gt_count * GTE_SIZE // SECTOR)
    gt_sectors = GTES_PER_GT * GTE_SIZE // SECTOR
    desc_sectors = DESCRIPTOR_SECTORS if desc is not None else 0
    if desc is not None and len(desc) > desc_sectors * SECTOR:
        raise UsageError(f"the descriptor ({len(desc)} bytes) does not fit "
                         f"in {desc_sectors} sectors (parent name too long?)")
    rgd = 1 + desc_sectors
    gd = rgd + gd_sectors + gt_count * gt_sectors
    end = gd + gd_sectors + gt_count * gt_sectors
    overhead = -(-end // GRAIN_SECTORS) * GRAIN_SECTORS
    flags = FLAG_NEWLINE_TEST | FLAG_REDUNDANT_GD
    if stream:
        flags |= FLAG_COMPRESSED | FLAG_MARKERS
    if zeroed:
        flags |= FLAG_ZEROED_GRAIN
    header = SPARSE_HEADER.pack(
        magicNumber=SPARSE_MAGIC, version=3 if stream else 2 if zeroed else 1,
        flags=flags, capacity=sectors, grainSize=GRAIN_SECTORS,
        descriptorOffset=1 if desc is not None else 0,
        descriptorSize=desc_sectors, numGTEsPerGT=GTES_PER_GT,
        rgdOffset=rgd, gdOffset=gd, overHead=overhead, uncleanShutdown=0,
        singleEndLineChar=b"\n", nonEndLineChar=b" ",
        doubleEndLineChar1=b"\r", doubleEndLineChar2=b"\n",
        compressAlgorithm=COMPRESSION_DEFLATE if stream else COMPRESSION_NONE,
        pad=b"")

    def directory(first_table):
        return b"".join((first_table + gd_sectors + i * gt_sectors)
                        .to_bytes(GTE_SIZE, "little")
                        for i in range(gt_count))

    parts = [(0, header), (rgd * SECTOR, directory(rgd)),
             (gd * SECTOR, directory(gd))]
    if desc is not None:
        parts.append((SECTOR, desc))
    size = overhead * SECTOR
    if stream:
        parts.append((size, METADATA_MARKER.pack(1, 0, MARKER_FOOTER, b"") +
                      header + METADATA_MARKER.pack(0, 0, MARKER_EOS, b"")))
        size += 3 * SECTOR
    _write_file(path, parts, size, created)


def _write_file(path, parts, size, created):
    """A new file of `size` bytes (sparse where nothing is written) with
    `parts` (offset, bytes) in it, durable when this returns; its path
    joins `created` once it exists."""
    with open(path, "xb") as f:
        created.append(path)
        f.truncate(size)
        for offset, data in parts:
            f.seek(offset)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
