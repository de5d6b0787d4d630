"""Opening an image: pick the format, open it, and open its backing chain.

A format is probed only when the caller gives none, and probing never
chooses raw for a writable image: a guest that writes a qcow2 header into
its raw disk must not turn it into a qcow2 with a backing file of its
choosing.  Backing files are opened read-only, through the same policy,
and handed to the driver that names them (OpenContext.open_backing).
"""

import os
import stat

from . import policy as _policy
from .errors import ImageError, PolicyError, UnsupportedFeature, UsageError
from .formats import FORMATS, nbd, ram
from .hostfile import HostFile
from .locking import ImageLock

# A chain deeper than this is refused (and loops are caught earlier).
MAX_CHAIN_DEPTH = 64

# How long a read of a moving disk waits for its source to come back
# before failing with EIO (seconds; NBDPLUG_SOURCE_PATIENCE).
SOURCE_PATIENCE = float(os.environ.get("NBDPLUG_SOURCE_PATIENCE", "10"))


class OpenContext:
    """What one chain's drivers share while opening: the policy, O_DIRECT,
    format-specific options, the files already in the chain, and the one
    way drivers open host files (tests put a recording layer there)."""

    def __init__(self, policy, direct=False, options=None, chain=(),
                 file_factory=HostFile, share=False):
        self.policy = policy
        self.direct = direct
        self.options = dict(options or {})
        self.chain = tuple(chain)
        self.file_factory = file_factory
        self.share = share      # qemu's --force-share, for the whole chain
        self.skip_backing = False   # the top image's backing is not opened

    def open_file(self, path, readonly):
        """Open a host file for a driver (honouring O_DIRECT)."""
        return self.file_factory(path, readonly=readonly,
                                 direct=self.direct)

    def open_backing(self, referrer, referrer_fmt, name, fmt, field):
        """Open the file `name` that `referrer` (of format `referrer_fmt`)
        refers to in its `field`, read-only.

        `fmt` is the format the referrer records, or None to probe (safe
        here: a backing file is never opened for writing).
        """
        if self.skip_backing:
            return None         # rebase -u: the old reference may be stale
        if nbd.is_uri(name):
            raise PolicyError(referrer, referrer_fmt, f"refers to the "
                              f"remote export {name!r}; only a move that "
                              "nbdplug migrate start set up on this host "
                              "may", field)
        path = self.policy.resolve(referrer, name, referrer_fmt, field)
        if path in self.chain or len(self.chain) >= MAX_CHAIN_DEPTH:
            raise PolicyError(referrer, referrer_fmt,
                              f"{name!r} makes the backing chain loop or "
                              f"exceed {MAX_CHAIN_DEPTH} levels", field)
        if fmt is not None and fmt not in FORMATS:
            raise ImageError(referrer, referrer_fmt,
                             f"backing format {fmt!r} is not supported",
                             field)
        return self._open_child(path, fmt, self.policy)

    def _open_child(self, path, fmt, policy):
        child = OpenContext(policy, self.direct, None, self.chain + (path,),
                            self.file_factory, self.share)
        return open_in(path, fmt, True, child)

    def open_source(self, referrer, referrer_fmt, name, fmt, size, field):
        """Open the source of a move that `nbdplug migrate start` set up
        (the caller has verified its record): a remote export through a
        connection that comes back (formats/nbd.py Reconnecting), or a
        local image, which may lie outside the allowed roots or be a
        block device because migrate was told to read it."""
        if self.skip_backing:
            return None
        if self.policy.no_backing:      # refuses, naming --no-backing
            self.policy.resolve(referrer, name, referrer_fmt, field)
        if nbd.is_uri(name):
            return nbd.Reconnecting(name, size, SOURCE_PATIENCE)
        policy = _policy.OpenPolicy(
            self.policy.roots + [os.path.dirname(os.path.realpath(name))],
            allow_devices=True, image_root=False)
        path = policy.resolve(referrer, name, referrer_fmt, field)
        return self._open_child(path, fmt, policy)


def open_image(path, format=None, readonly=True, policy=None, direct=False,
               options=None, file_factory=HostFile, share=False):
    """Open the image at `path` and its backing chain as a Disk.

    `options` are format-specific (e.g. a qcow2 snapshot to open);
    `file_factory` replaces HostFile (the crash-state tests record I/O);
    `share` reads an image others may be writing (qemu's --force-share).
    An NBD URI (nbd://, nbds://, nbd+unix://...) opens a remote export.
    """
    if nbd.is_uri(path):
        return nbd.NbdDisk.open(path, format, readonly, options)
    check_format(format)
    path, format = image_name(path, format)
    ctx = new_context(path, policy, direct, options, file_factory)
    ctx.share = share
    return open_in(path, format, readonly, ctx)


def check_format(fmt):
    """Refuse a format name nbdplug does not know, in one line."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r} (known: "
                         + ", ".join(sorted(FORMATS)) + ")")


def names_a_file(name):
    """False for names that are not paths: NBD URIs and ram:NAME."""
    return not (nbd.is_uri(name) or (isinstance(name, str) and
                                     name.startswith("ram:")))


def image_name(path, fmt, create=False):
    """(path, format) of what a user named: `ram:NAME` (or, when creating
    with -f ram, a bare NAME) names a shared RAM disk: its file and format
    (see formats/ram.py); anything else is itself."""
    named = isinstance(path, str) and path.startswith("ram:")
    if not (named or (create and fmt == "ram")):
        return path, fmt
    if fmt not in (None, "ram"):
        raise UsageError(f"{path}: a RAM disk has format ram, not {fmt}")
    return ram.path_for(path), "ram"


def new_context(path, policy, direct=False, options=None,
                file_factory=HostFile):
    """The OpenContext for the chain whose top image is `path`."""
    return OpenContext((policy or _policy.DEFAULT).for_image(path), direct,
                       options, (os.path.realpath(path),), file_factory)


def open_in(path, fmt, readonly, ctx):
    """Open `path` (format `fmt`, probed when None) within `ctx`, locked
    as qemu locks images."""
    check_openable(path)
    if fmt is None:
        fmt = probe(path)
        if fmt is None:
            if not readonly:
                raise ImageError(path, None,
                                 "format not recognised; say -f raw to "
                                 "open it writable as raw")
            fmt = "raw"
    spec = FORMATS[fmt]
    lock = None
    try:
        # Locked before the driver reads a byte, as qemu does (locking.py);
        # a RAM disk is meant to be written by several servers at once.
        if fmt != "ram":
            lock = ImageLock(path, readonly, ctx.share)
        # A read-only format is opened read-only first, so a damaged
        # image says what is wrong with it.
        disk = spec.open(path, readonly or not spec.writable, ctx)
        if not readonly and not spec.writable:
            disk.close()
            raise UnsupportedFeature(path, fmt, f"{fmt} images are read-only "
                                     "(open with --readonly)")
    except BaseException as e:
        if lock is not None:
            lock.release()
        if isinstance(e, OSError):
            raise ImageError(path, fmt, e.strerror or str(e)) from None
        raise
    if lock is not None:
        _unlock_on_close(disk, lock)
    return disk


def _unlock_on_close(disk, lock):
    close = disk.close

    def close_and_unlock():
        try:
            close()
        finally:
            lock.release()
    disk.close = close_and_unlock


def check_openable(path):
    """Refuse what is not a regular file or block device, in one line."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ImageError(path, None, e.strerror) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(path, None, "is a directory, not an image")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ImageError(path, None, "is not a regular file or block device")


def probe(path):
    """Name of the non-raw format whose signature `path` carries, or None."""
    try:
        file = HostFile(path, readonly=True)
    except OSError as e:
        raise ImageError(path, None, e.strerror) from None
    try:
        for name, spec in FORMATS.items():
            if spec.probe is not None and spec.probe(file):
                return name
        return None
    finally:
        file.close()


