"""The fast-path table: what is stored plainly goes to the host file, the
rest to the image's NBD device.

A disk's Layout is its host mapping (Disk.host_mapping) as pieces in
sectors: a direct piece (path, host offset), where the kernel moves the
data through a loop device of that file, or an NBD piece, which the
driver serves through nbdkit at the same guest offset.  Adjacent pieces
that continue each other merge.  The table loaded is the Layout bounded
to MAX_TARGETS targets: past that, the smallest direct pieces go back to
the NBD path (see bounded).

Why a bound: the kernel finds a bio's target by binary search, so the
table's size barely matters to reads and writes, but a flush is sent to
every target (Linux before 6.10 sends one per target, even when they
share a device): each loop target's is an fsync of the file, each NBD
target's a round trip to the server (which returns at once when nothing
was written since the last one, dm/plugin.py).  MAX_TARGETS keeps a
flush to about a thousand such requests (in the kernel lane, 4 KiB
write + fsync ran 4 to 7 times slower at the bound than on a table of
one target; make bench), and the table text (about 40 bytes a line)
small.
"""

import bisect
import os
import stat
import typing

from .table import SECTOR, Table

MAX_TARGETS = 1024
NBD = "nbd"             # the NBD device, in `map --dm` and Piece.path


class Piece(typing.NamedTuple):
    start: int              # guest sector
    end: int
    path: typing.Optional[str] = None   # None: the NBD path
    host: int = 0           # host sector of `start` in `path`

    @property
    def length(self):
        return self.end - self.start


def _continues(a, b):
    return a.end == b.start and a.path == b.path and \
        (a.path is None or a.host + a.length == b.host)


def _add(pieces, piece):
    if piece.end <= piece.start:
        return
    if pieces and _continues(pieces[-1], piece):
        pieces[-1] = pieces[-1]._replace(end=piece.end)
    else:
        pieces.append(piece)


def pieces_of(ranges):
    """HostRanges as pieces: a direct range whose edges are not whole
    sectors in the guest or in the file keeps its whole sectors; the
    rest goes to the NBD path."""
    out = []
    for r in ranges:
        start = -(-r.offset // SECTOR)
        end = (r.offset + r.length) // SECTOR
        if r.path is None or (r.host_offset - r.offset) % SECTOR:
            _add(out, Piece(r.offset // SECTOR, -(-(r.offset + r.length) //
                                                  SECTOR)))
            continue
        host = (r.host_offset + start * SECTOR - r.offset) // SECTOR
        _add(out, Piece(r.offset // SECTOR, start))
        _add(out, Piece(start, end, r.path, host))
        _add(out, Piece(end, -(-(r.offset + r.length) // SECTOR)))
    return _normal(out)


def _normal(pieces):
    """Pieces in order with none overlapping (an NBD piece rounded out
    to sectors yields to the direct one beside it), merged."""
    out = []
    for p in pieces:
        if out and p.start < out[-1].end:
            if p.path is None:
                p = p._replace(start=out[-1].end)
            else:
                last = out.pop()
                _add(out, last._replace(end=p.start))
        _add(out, p)
    return out


class Layout:
    """A disk's pieces covering [0, sectors), kept up to date range by
    range as the driver allocates."""

    def __init__(self, disk):
        self.disk = disk
        self.sectors = disk.size // SECTOR
        self.pieces = _clip(pieces_of(disk.host_mapping(disk.size, 0)),
                            self.sectors)

    def update(self, ranges):
        """Read the host mapping again over [(offset, length)] byte ranges
        (sorted, disjoint) and splice it in."""
        fresh = []
        for offset, length in ranges:
            fresh += _clip(pieces_of(self.disk.host_mapping(length, offset)),
                           self.sectors)
        if fresh:
            self.pieces = splice(self.pieces, fresh)

    def direct_bytes(self):
        return sum(p.length for p in self.pieces if p.path) * SECTOR


def _clip(pieces, sectors):
    out = []
    for p in pieces:
        if p.start < sectors:
            _add(out, p._replace(end=min(p.end, sectors)))
    return out


def splice(pieces, fresh):
    """`pieces` with the spans `fresh` covers (sorted, disjoint) replaced
    by `fresh`."""
    out = []
    starts = [p.start for p in pieces]
    pos = 0         # sectors below pos are done
    for f in fresh:
        if f.start > pos:
            _copy(out, pieces, starts, pos, f.start)
        _add(out, f)
        pos = f.end
    _copy(out, pieces, starts, pos, pieces[-1].end if pieces else pos)
    return out


def _copy(out, pieces, starts, a, b):
    """Append the parts of `pieces` within [a, b)."""
    i = max(0, bisect.bisect_right(starts, a) - 1)
    while i < len(pieces) and pieces[i].start < b:
        p = pieces[i]
        lo, hi = max(p.start, a), min(p.end, b)
        if lo < hi:
            _add(out, Piece(lo, hi, p.path,
                            p.host + lo - p.start if p.path else 0))
        i += 1


def bounded(pieces, limit=MAX_TARGETS):
    """At most `limit` targets: the smallest direct pieces go back to the
    NBD path until the table fits (demoting a piece between two NBD
    pieces saves two targets, beside one saves one)."""
    if len(pieces) <= limit:
        return pieces
    nbd = [p.path is None for p in pieces]
    count = len(pieces)
    for _, i in sorted((p.length, i) for i, p in enumerate(pieces)
                       if p.path):
        if count <= limit:
            break
        count -= (i > 0 and nbd[i - 1]) + (i + 1 < len(nbd) and nbd[i + 1])
        nbd[i] = True
    out = []
    for p, to_nbd in zip(pieces, nbd):
        _add(out, Piece(p.start, p.end) if to_nbd else p)
    return out


def direct(pieces):
    """(path, host byte offset, byte length) of the direct pieces."""
    return [(p.path, p.host * SECTOR, p.length * SECTOR) for p in pieces
            if p.path]


def fit(pieces, sizes):
    """Direct pieces past the end of their device (a loop device is as
    long as its file was when last sized) go to the NBD path."""
    out = []
    for p in pieces:
        if p.path:
            room = sizes[p.path] // SECTOR - p.host
            if room < p.length:
                _add(out, p._replace(end=p.start + max(0, room)))
                _add(out, Piece(p.start + max(0, room), p.end))
                continue
        _add(out, p)
    return out


def table(pieces, nbd, devices):
    """The dm table: `nbd` the NBD device, `devices` {host path: device}."""
    t = Table()
    for p in pieces:
        if p.path:
            t.append(p.length, "linear", devices[p.path], p.host)
        else:
            t.append(p.length, "linear", nbd, p.start)
    return t


def is_block_device(path):
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def would_load(disk, limit=MAX_TARGETS):
    """The table `attach --fast` would load for `disk` (map --dm): NBD
    for its NBD device and each host file's path for its loop device."""
    pieces = bounded(Layout(disk).pieces, limit)
    return table(pieces, NBD, {p.path: p.path for p in pieces if p.path})



def newly_direct(old, new):
    """[(start, end)] sectors where `new` maps straight to a file and
    `old` did not map them so (NBD, or elsewhere)."""
    out = []
    starts = [p.start for p in old]
    for p in new:
        if not p.path:
            continue
        same = []
        _copy(same, old, starts, p.start, p.end)
        pos = p.start
        for q in same:
            if q.path != p.path or q.host != p.host + q.start - p.start:
                _span(out, q.start, q.end)
            pos = q.end
        _span(out, pos, p.end)
    return out


def _span(out, a, b):
    if a >= b:
        return
    if out and out[-1][1] == a:
        out[-1] = (out[-1][0], b)
    else:
        out.append((a, b))
