"""The record of a move in progress (`nbdplug migrate`), kept in the
qcow2 header as an extension of our own (qemu keeps extensions it does
not know, and ignores them).

While a disk moves, the image's backing file is the source: an NBD URI
or a local image.  A backing name from inside an image is chosen by
whoever wrote it, and a URI may name local key files and sockets, so the
open policy refuses both.  It lets this one backing name through only
when the record vouches for it: the record carries an HMAC of the
backing name and format under a key that only this host has (written by
`migrate start`, readable by root alone).  An image from elsewhere with a
remote backing, with or without a record, is still refused.

The record also holds the move's state (filling, or cancelled) and the
fill rate, changed in place.  Completion clears the backing name's
offset and length in the header's first sector, one atomic write, so a
crash leaves the move or its end.
"""

import hashlib
import hmac
import os
import secrets

from nbdplug.errors import UsageError
from . import structs as S
from .rebase import rewrite_backing

VERSION = 1
FILLING = 0
CANCELLED = 1
STATES = {FILLING: "filling", CANCELLED: "cancelled"}

KEY_BYTES = 32


def key_path():
    """The host's migration key (NBDPLUG_STATE_DIR, /var/lib/nbdplug)."""
    return os.path.join(os.environ.get("NBDPLUG_STATE_DIR",
                                       "/var/lib/nbdplug"), "migrate.key")


def host_key(create=False):
    """This host's key, made on first use when `create`; None when there
    is none (no image here can then vouch for a remote backing)."""
    path = key_path()
    try:
        with open(path, "rb") as f:
            key = f.read(KEY_BYTES + 1)
    except FileNotFoundError:
        if not create:
            return None
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)      # the first maker wins a race
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
        return host_key()
    if len(key) != KEY_BYTES:
        raise UsageError(f"{path}: not a migration key ({KEY_BYTES} bytes)")
    return key


def _mac(key, name, fmt):
    msg = b"nbdplug migration 1\0" + name.encode() + b"\0" + \
        (fmt or "").encode()
    return hmac.new(key, msg, hashlib.sha256).digest()


class Record:
    """A verified record: `state` (FILLING or CANCELLED), `rate` (bytes
    a second, 0 for no limit)."""

    def __init__(self, state, rate):
        self.state = state
        self.rate = rate

    @property
    def active(self):
        return self.state == FILLING


def verified(geo):
    """The Record in the header `geo` if this host's key vouches for the
    backing name and format there, else None."""
    data = geo.migration
    if not data or geo.backing_name is None or \
            len(data) != S.MIGRATION_RECORD.size:
        return None
    rec = S.MIGRATION_RECORD.unpack_from(data)
    key = host_key()
    if rec.version != VERSION or rec.state not in STATES or key is None:
        return None
    if not hmac.compare_digest(rec.mac, _mac(key, geo.backing_name,
                                             geo.backing_format)):
        return None
    return Record(rec.state, rec.rate)


def _pack(name, fmt, state, rate):
    return S.MIGRATION_RECORD.pack(VERSION, state, bytes(6), rate,
                                   _mac(host_key(create=True), name, fmt))


def write(file, path, name, fmt, state=FILLING, rate=0):
    """Point a new image at source `name` (format `fmt`) and record the
    move, in one header write (migrate start makes the image under a
    temporary name, so this write need not be atomic)."""
    rewrite_backing(file, path, name, fmt, extensions={
        S.EXT_NBDPLUG_MIGRATION: _pack(name, fmt, state, rate)})


def set_state(file, geo, state, rate):
    """Change the recorded state and rate in place: fields that stay
    valid whichever of them a torn write leaves."""
    rec = S.MIGRATION_RECORD
    at = geo.migration_at + rec.offset("state")
    data = rec.pack(VERSION, state, bytes(6), rate, bytes(32))
    file.pwrite(data[rec.offset("state"):rec.offset("mac")], at)
    file.flush()


def finish(file):
    """Drop the backing name, durably, in one write to the header's first
    sector (atomic on disk): every cluster the source holds is local.
    The record and the backing format stay behind, read by nobody (a
    record vouches only for the backing name it was made for)."""
    field = S.HEADER_V2.offset("backing_file_offset")
    file.pwrite(bytes(12), field)       # backing_file_offset and _size
    file.flush()
