"""Pointing a qcow2 image at another backing file (`nbdplug rebase`).

The backing file name lives in the first cluster, after the header
extensions, and its format in one of those extensions.  Both change
together, so the extension area and the name are rebuilt and the whole
first cluster is written in one write, then flushed, as qemu does: a
crash leaves the old header or the new one.
"""

import struct

from nbdplug.errors import UsageError
from . import structs as S
from .header import read_header


def rewrite_backing(file, path, name, fmt, before_write=None,
                    extensions=None):
    """Record backing file `name` (None: no backing file) of format `fmt`
    (None: not recorded) in the header of the qcow2 image in `file`;
    `extensions` ({type: data, or None to drop it}) changes others in
    the same write.

    `before_write` (safe rebase's data copy) runs once the new header is
    known to fit, so a refusal leaves the image untouched; the header is
    built again after it, since writing data may change header fields.
    """
    encoded = name.encode() if name is not None else b""
    if len(encoded) > S.MAX_BACKING_NAME:
        raise UsageError(f"{path}: backing file name is too long "
                         f"({len(encoded)} bytes; qcow2 allows "
                         f"{S.MAX_BACKING_NAME})")
    changes = {S.EXT_BACKING_FORMAT: fmt.encode() if encoded and fmt
               else None}
    changes.update(extensions or {})
    _new_first_cluster(file, path, encoded, changes)
    if before_write is not None:
        before_write()
    file.pwrite(_new_first_cluster(file, path, encoded, changes), 0)
    file.flush()


def _new_first_cluster(file, path, encoded, changes):
    geo = read_header(file, path)       # validates what we keep
    cs = geo.cluster_size
    first = bytes(file.read(cs, 0))
    header = first[:geo.header_length]
    # Every extension but those changed is kept as it is.
    kept = [(kind, data) for kind, data in _extensions(first, geo)
            if kind not in changes]
    kept[:0] = [(kind, data) for kind, data in changes.items()
                if data is not None]
    cluster = _first_cluster(header, kept, encoded, cs)
    if cluster is None:
        # The feature name table is only a courtesy to readers: give it
        # up before refusing (create does the same).
        cluster = _first_cluster(
            header, [e for e in kept if e[0] != S.EXT_FEATURE_NAMES],
            encoded, cs)
    if cluster is None:
        raise UsageError(f"{path}: backing file name of {len(encoded)} "
                         "bytes does not fit in the first cluster "
                         f"({cs} bytes) with the header extensions")
    return cluster


def _extensions(first, geo):
    """(type, data) of each extension before the end marker; read_header
    has already bounded the walk by the first cluster."""
    out = []
    pos = geo.header_length
    while pos + S.EXTENSION.size <= geo.extensions_end:
        ext = S.EXTENSION.unpack_from(first, pos)
        pos += S.EXTENSION.size
        if ext.type == S.EXT_END:
            break
        out.append((ext.type, first[pos:pos + ext.length]))
        pos += -(-ext.length // 8) * 8
    return out


def _first_cluster(header, extensions, name, cs):
    """The new first cluster, or None when it does not fit."""
    buf = bytearray(cs)
    buf[:len(header)] = header
    pos = len(header)
    for kind, data in extensions + [(S.EXT_END, b"")]:
        padded = -(-len(data) // 8) * 8
        if pos + S.EXTENSION.size + padded > cs:
            return None
        buf[pos:pos + S.EXTENSION.size] = S.EXTENSION.pack(kind, len(data))
        pos += S.EXTENSION.size
        buf[pos:pos + len(data)] = data
        pos += padded
    if pos + len(name) > cs:
        return None
    buf[pos:pos + len(name)] = name
    struct.pack_into(">QI", buf, S.HEADER_V2.offset("backing_file_offset"),
                     pos if name else 0, len(name))
    return bytes(buf)


def rebase(disk, backing, backing_fmt, new=None, copy=None):
    """Record `backing` (None: none) of `backing_fmt` in the header of
    `disk`, opened writable; `copy` (safe rebase's data step) runs once
    the new reference is known to fit, before it is written.  `new`, the
    new backing Disk, is not needed here."""
    disk.check_writable()
    rewrite_backing(disk.file, disk.path, backing, backing_fmt, copy)
    disk.backing_name = backing
    disk.backing_format = backing_fmt if backing else None
