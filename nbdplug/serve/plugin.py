"""nbdkit plugin serving nbdplug images: one, or several named exports.

    nbdkit python /path/to/nbdplug/serve/plugin.py file=IMAGE [format=qcow2]
        [readonly=true] [snapshot=NAME] [force-share=true] [limit=N]
        [direct=true] [backing-root=DIR]... [no-backing=true]
        [allow=NET[,NET]...] [handshake-limit=SECONDS]

    nbdkit python plugin.py export=a file=A.qcow2 format=qcow2
        export=b file=B.raw format=raw readonly=true limit=2

file, format, readonly, snapshot, force-share, limit and description
belong to the latest export=NAME (before any, to the unnamed export "");
direct, backing-root, no-backing, allow (client networks; others
are refused) and handshake-limit (a TCP client still without an export
open after so many seconds is hung up; 0: never) apply to every export.

Each export's Disk is opened once in get_ready and shared by every
connection to it, so they see one cache and one allocator (hence
multi-conn is safe).  Every request callback delegates to it in one
line; errors become the errno a client should see via nbdkit.set_error.
"""

import errno
import ipaddress
import os
import sys

# nbdkit runs this file as __main__ and does not put its directory on
# sys.path: add the repository root (two levels up) so the package imports.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

import nbdkit  # noqa: E402  (the module nbdkit embeds)

from nbdplug.errors import UsageError  # noqa: E402
from nbdplug.opener import open_image  # noqa: E402
from nbdplug.policy import OpenPolicy  # noqa: E402
from nbdplug.serve import connections  # noqa: E402
from nbdplug.options import parse_bool  # noqa: E402
from nbdplug.serve.exports import ExportTable, parse_count  # noqa: E402

API_VERSION = 2

_settings = {"direct": False, "no-backing": False, "backing-root": [],
             "allow": [], "handshake-limit": connections.HANDSHAKE_LIMIT}
_exports = ExportTable()
_stop = connections.StopOnSignal(nbdkit.shutdown)
_handshakes = connections.HandshakeLimit()


def config(key, value):
    if _exports.configure(key, value):
        return
    if key in ("direct", "no-backing"):
        _settings[key] = parse_bool(key, value)
    elif key == "handshake-limit":
        _settings[key] = parse_count(key, value, "seconds")
    elif key == "backing-root":
        _settings[key].append(value)
    elif key == "allow":
        try:
            _settings[key] += [ipaddress.ip_network(a, strict=False)
                               for a in value.split(",")]
        except ValueError as e:
            raise UsageError(f"allow={value}: {e}") from None
    else:
        raise UsageError(f"unknown parameter {key!r}")


def config_complete():
    _exports.check()


def thread_model():
    # One thread a connection, its requests in turn; connections run side
    # by side, sharing each export's Disk (thread-safe: tapbridge calls
    # drivers from a pool too).  SERIALIZE_ALL_REQUESTS lets a client that
    # never finishes its handshake stall every other (nbdkit 1.32 holds
    # the all-requests lock through the handshake).  PARALLEL's worker
    # threads take turns at the GIL, at 10-30% more CPU a request.
    # Figures: README, "Benchmark".
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def get_ready():
    policy = OpenPolicy(roots=_settings["backing-root"],
                        no_backing=_settings["no-backing"])
    _exports.open_all(lambda export: open_image(
        export.image, export.format, readonly=export.writable is False,
        policy=policy, direct=_settings["direct"], share=export.share,
        options={"snapshot": export.snapshot} if export.snapshot else None))


def after_fork():
    _stop.start()
    _handshakes.start(_settings["handshake-limit"])


def cleanup():
    _handshakes.end()
    _stop.end()
    _exports.close_all()


def preconnect(readonly):
    if not (_settings["allow"] or _settings["handshake-limit"]):
        return
    client = connections.this_client()      # None on a Unix socket
    if client is None:
        return
    if _settings["allow"] and not client.allowed(_settings["allow"]):
        message = f"client {client} is not in allow="
        if not client.hang_up():
            raise PermissionError(errno.EACCES, message)  # nbdkit drops it
        connections.log(message + ": hung up")
        return
    _handshakes.begin(client)


def list_exports(readonly, is_tls):
    return _exports.listing()


def default_export(readonly, is_tls):
    return _exports.default_name()


def open(readonly):
    try:
        disk = _exports.connect(nbdkit.export_name())
    except Exception as e:
        _fail(e)
        raise
    _handshakes.opened()
    return disk


def close(h):
    _handshakes.closed()
    _exports.disconnect(h)


def export_description(h):
    return _exports.description(h)


def get_size(h):
    return h.size


def block_size(h):
    return h.min_block, h.preferred_block, h.max_block


def is_rotational(h):
    return False


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return h.can_trim and not h.readonly


def can_zero(h):
    return h.can_zero and not h.readonly


def can_fast_zero(h):
    return False


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return h.can_multi_conn


def can_extents(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def _fail(e):
    """Choose the errno the client sees, then let nbdkit log the error.
    OSError, ImageError and ExportError carry one."""
    code = errno.ENOMEM if isinstance(e, MemoryError) else \
        getattr(e, "errno", None)
    nbdkit.set_error(code if isinstance(code, int) and code else errno.EIO)


def pread(h, buf, offset, flags):
    try:
        h.pread(buf, offset)
    except Exception as e:
        _fail(e)
        raise


def pwrite(h, buf, offset, flags):
    try:
        h.pwrite(buf, offset, flags & nbdkit.FLAG_FUA != 0)
    except Exception as e:
        _fail(e)
        raise


def flush(h, flags):
    try:
        h.flush()
    except Exception as e:
        _fail(e)
        raise


def trim(h, count, offset, flags):
    try:
        h.trim(count, offset, flags & nbdkit.FLAG_FUA != 0)
    except Exception as e:
        _fail(e)
        raise


def zero(h, count, offset, flags):
    try:
        h.zero(count, offset, flags & nbdkit.FLAG_MAY_TRIM != 0,
               flags & nbdkit.FLAG_FUA != 0)
    except Exception as e:
        _fail(e)
        raise


def extents(h, count, offset, flags):
    try:
        runs = h.extents(count, offset)
    except Exception as e:
        _fail(e)
        raise
    if flags & nbdkit.FLAG_REQ_ONE:
        runs = runs[:1]
    return [(r.offset, r.length, r.flags) for r in runs]

