"""Creating qcow2 images (`nbdplug create -f qcow2 -o ...`).

Layout, as qemu-img lays it out: the header cluster (header, extensions,
backing file name), the refcount table, the refcount blocks, the L1 table,
then (with preallocation=metadata) L2 tables and data clusters.
"""

import os
import struct

from nbdplug import options
from nbdplug.errors import UsageError
from nbdplug.hostfile import HostFile
from nbdplug.layout import be64_bytes
from . import structs as S

OPTIONS = {
    "cluster_size": options.size(65536),
    "compat": options.choice(3, {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}),
    "refcount_bits": options.integer(16),
    "extended_l2": options.boolean(),
    "preallocation": options.choice("off", ("off", "metadata")),
    "compression_type": options.choice("zlib", ("zlib", "zstd")),
    "lazy_refcounts": options.boolean(),
}


def _geometry(opts):
    """The create options (parsed) checked against each other."""
    cluster_size = opts["cluster_size"]
    refcount_bits = opts["refcount_bits"]
    if cluster_size & (cluster_size - 1) or \
            not 1 << S.MIN_CLUSTER_BITS <= cluster_size <= \
            1 << S.MAX_CLUSTER_BITS:
        raise UsageError(f"-o cluster_size={cluster_size}: a power of two "
                         "from 512 to 2M")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise UsageError(f"-o refcount_bits={refcount_bits}: a power of "
                         "two from 1 to 64")
    version = opts["compat"]
    extended = opts["extended_l2"]
    prealloc = opts["preallocation"]
    ctype = opts["compression_type"]
    if opts["lazy_refcounts"]:
        raise UsageError("-o lazy_refcounts=on is not supported")
    if version == 2 and (refcount_bits != 16 or extended or ctype != "zlib"):
        raise UsageError("compat=0.10 needs refcount_bits=16, no "
                         "extended_l2 and zlib compression")
    if extended and cluster_size < 16384:
        raise UsageError("extended_l2 needs cluster_size of at least 16K")
    return dict(cluster_size=cluster_size, refcount_bits=refcount_bits,
                version=version, extended=extended,
                prealloc=prealloc == "metadata",
                zstd=ctype == "zstd")


def create(path, size, opts, backing=None):
    """A new image; `opts` parsed from OPTIONS, `backing` an
    nbdplug.disk.Backing or None."""
    o = _geometry(opts)
    if size % 512:
        raise UsageError(f"image size {size} is not a multiple of 512")
    cs = o["cluster_size"]
    cb = cs.bit_length() - 1
    entry_size = 16 if o["extended"] else 8
    l2_entries = cs // entry_size
    guest_clusters = -(-size // cs)
    l1_entries = -(-guest_clusters // l2_entries)
    l1_clusters = max(1, -(-l1_entries * 8 // cs))
    per_block = cs * 8 // o["refcount_bits"]

    header = _header_cluster(o, size, cs, cb, l1_entries,
                             backing and backing.name,
                             backing and backing.format)
    prealloc_clusters = (l1_entries + guest_clusters) if o["prealloc"] \
        else 0
    # Refcount blocks and table must cover every cluster, themselves too.
    blocks = table = 1
    while True:
        used = 1 + table + blocks + l1_clusters + prealloc_clusters
        need_blocks = -(-used // per_block)
        need_table = -(-need_blocks * 8 // cs)
        if (need_blocks, need_table) == (blocks, table):
            break
        blocks, table = need_blocks, need_table
    reftable_at = 1
    blocks_at = reftable_at + table
    l1_at = blocks_at + blocks
    l2_at = l1_at + l1_clusters
    data_at = l2_at + l1_entries
    metadata_end = l2_at + (l1_entries if o["prealloc"] else 0)

    struct.pack_into(">Q", header, S.HEADER_V2.offset("l1_table_offset"),
                     l1_at << cb)
    struct.pack_into(">QI", header,
                     S.HEADER_V2.offset("refcount_table_offset"),
                     reftable_at << cb, table)

    file = HostFile(path, readonly=False, create=True)
    try:
        file.pwrite(header, 0)
        file.pwrite(be64_bytes([(blocks_at + i) << cb
                                 for i in range(blocks)]
                                + [0] * (table * cs // 8 - blocks)),
                    reftable_at << cb)
        for i in range(blocks):
            file.pwrite(_refcount_block(i, per_block, used, cs,
                                        o["refcount_bits"]),
                        (blocks_at + i) << cb)
        l1 = [0] * (l1_clusters * cs // 8)
        if o["prealloc"]:
            for i in range(l1_entries):
                l1[i] = ((l2_at + i) << cb) | S.QCOW_OFLAG_COPIED
                entries = []
                for j in range(l2_entries):
                    g = i * l2_entries + j
                    if g < guest_clusters:
                        entries.append(((data_at + g) << cb) |
                                       S.QCOW_OFLAG_COPIED)
                        if o["extended"]:
                            entries.append(0xFFFFFFFF)
                    else:
                        entries += [0] * (entry_size // 8)
                file.pwrite(be64_bytes(entries), (l2_at + i) << cb)
            file.truncate((data_at + guest_clusters) << cb)
        file.pwrite(be64_bytes(l1), l1_at << cb)
        end = max(metadata_end, l1_at + l1_clusters) << cb
        if file.size() < end:
            file.truncate(end)
        file.flush()
    except BaseException:
        file.close()
        os.unlink(path)
        raise
    file.close()


def _header_cluster(o, size, cs, cb, l1_entries, backing, backing_fmt):
    """The first cluster: header, extensions, backing file name."""
    buf = bytearray(cs)
    incompatible = (S.INCOMPAT_EXTL2 if o["extended"] else 0) | \
        (S.INCOMPAT_COMPRESSION if o["zstd"] else 0)
    fields = dict(magic=S.MAGIC, version=o["version"],
                  backing_file_offset=0, backing_file_size=0,
                  cluster_bits=cb, size=size, crypt_method=0,
                  l1_size=l1_entries, l1_table_offset=0,
                  refcount_table_offset=0, refcount_table_clusters=0,
                  nb_snapshots=0, snapshots_offset=0)
    if o["version"] == 2:
        S.HEADER_V2.pack_into(buf, 0, S.HEADER_V2.tuple(**fields))
        pos = S.HEADER_V2.size
    else:
        fields.update(incompatible_features=incompatible,
                      compatible_features=0, autoclear_features=0,
                      refcount_order=o["refcount_bits"].bit_length() - 1,
                      header_length=S.V3_HEADER_LENGTH,
                      compression_type=S.COMPRESSION_ZSTD if o["zstd"]
                      else S.COMPRESSION_ZLIB)
        S.HEADER_V3.pack_into(buf, 0, S.HEADER_V3.tuple(**fields))
        pos = S.V3_HEADER_LENGTH
    exts = []
    if backing_fmt:
        exts.append((S.EXT_BACKING_FORMAT, backing_fmt.encode()))
    names = b"".join(S.FEATURE_NAME.pack(t, b, name.encode())
                     for t, b, name in S.FEATURE_NAMES)
    name_len = len(backing.encode()) if backing is not None else 0
    used = pos + sum(8 + -(-len(d) // 8) * 8 for _, d in exts) + 8
    # The feature name table is only a courtesy: leave it out when it
    # would not fit in a small first cluster.
    if o["version"] == 3 and used + 8 + len(names) + name_len <= cs:
        exts.append((S.EXT_FEATURE_NAMES, names))
    exts.append((S.EXT_END, b""))
    for kind, data in exts:
        padded = -(-len(data) // 8) * 8
        if pos + 8 + padded > cs:
            raise UsageError("header extensions do not fit in one cluster")
        buf[pos:pos + 8] = S.EXTENSION.pack(kind, len(data))
        buf[pos + 8:pos + 8 + len(data)] = data
        pos += 8 + padded
    if backing is not None:
        name = backing.encode()
        if len(name) > S.MAX_BACKING_NAME or pos + len(name) > cs:
            raise UsageError(f"backing file name is too long "
                             f"({len(name)} bytes)")
        buf[pos:pos + len(name)] = name
        struct.pack_into(">QI", buf, S.HEADER_V2.offset(
            "backing_file_offset"), pos, len(name))
    return buf


def _refcount_block(index, per_block, used, cs, bits):
    """Refcount block `index` counting clusters [0, used) once each."""
    block = bytearray(cs)
    first = index * per_block
    n = max(0, min(per_block, used - first))
    if bits >= 8:
        width = bits // 8
        one = (1).to_bytes(width, "big")
        for i in range(n):
            block[i * width:(i + 1) * width] = one
    else:
        for i in range(n):
            pos = i * bits
            block[pos // 8] |= 1 << (pos % 8)
    return block
